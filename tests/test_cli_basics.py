import os
import subprocess
import sys

import pytest
from click.testing import CliRunner

from clipsearch import __version__
from clipsearch.cli import cli


def test_version():
    result = CliRunner().invoke(cli, ["--version"])
    assert result.exit_code == 0
    assert result.output.strip() == f"clipsearch, version {__version__}"


def test_unknown_command_is_a_usage_error():
    result = CliRunner().invoke(cli, ["frobnicate"])
    assert result.exit_code == 2
    assert "No such command 'frobnicate'" in result.output


def run_without(tmp_path, blocked: tuple[str, ...], *args: str) -> subprocess.CompletedProcess:
    """`clipsearch ARGS` in a fresh process where importing any of the `blocked` packages fails."""
    folder = tmp_path / ("no-" + "-".join(blocked))
    for name in blocked:
        (folder / name).mkdir(parents=True, exist_ok=True)
        (folder / name / "__init__.py").write_text(f"raise ImportError('this command must not import {name}')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(folder), *sys.path])}
    code = "import sys; from clipsearch.cli import main; sys.argv = ['clipsearch', *sys.argv[1:]]; main()"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, timeout=300)


def run_without_torch(tmp_path, *args: str) -> subprocess.CompletedProcess:
    """`clipsearch ARGS` in a fresh process where `import torch` fails."""
    return run_without(tmp_path, ("torch",), *args)


@pytest.mark.parametrize(
    "args",
    [["--help"], ["models"], ["models", "--json"], ["index", "--help"], ["query", "--help"], ["train", "--help"]],
)
def test_help_and_model_listing_do_not_import_torch(tmp_path, args):
    result = run_without_torch(tmp_path, *args)
    assert result.returncode == 0, result.stderr
    assert result.stdout and not result.stderr

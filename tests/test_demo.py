"""`clipsearch demo`: the README's offline first run, end to end with shapes-mini."""

from __future__ import annotations

import json
import re

from click.testing import CliRunner

from clipsearch.cli import cli


def test_demo_generates_indexes_and_finds_the_asked_colour(tmp_path):
    result = CliRunner().invoke(cli, ["demo", "--dir", str(tmp_path / "demo"), "--images", "40"])
    assert result.exit_code == 0, result.output
    blocks = re.findall(r'query: "a (\w+) (\w+) (\w+)"\n((?:  .*\n?){3})', result.stdout)
    assert len(blocks) == 3, result.stdout
    manifest = [json.loads(line) for line in (tmp_path / "demo" / "images" / "manifest.jsonl").read_text().splitlines()]
    colours = {row["image"]: row["colour"] for row in manifest}
    for _size, colour, _shape, hits in blocks:
        top = hits.splitlines()[0].split()
        assert top[0] == "1" and colours[top[2]] == colour, (colour, hits)


def test_demo_runs_again_without_reindexing(tmp_path):
    args = ["demo", "--dir", str(tmp_path / "demo"), "--images", "12", "--query", "a red circle"]
    CliRunner().invoke(cli, args)
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert "Indexed 0 new, 12 unchanged, 0 failed." in result.stderr

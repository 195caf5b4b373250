"""`clipsearch demo`: the README's offline first run, end to end with shapes-mini."""

from __future__ import annotations

import json
import os
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

    # the suggested query names a scene of the set that none of the three showed, and finds it
    [suggested] = re.findall(r'^Try: clipsearch query --db (.+) --model shapes-mini "(.+)"$', result.stderr, re.M)
    assert suggested[0] == str(tmp_path / "demo" / "db")
    size, colour, shape = re.fullmatch(r"a (\w+) (\w+) (\w+)", suggested[1]).groups()
    assert (size, colour, shape) not in [block[:3] for block in blocks]
    assert any((row["size"], row["colour"], row["shape"]) == (size, colour, shape) for row in manifest)
    query = CliRunner().invoke(cli, ["query", suggested[1], "--db", suggested[0], "--model", "shapes-mini", "-n", "1"])
    assert query.exit_code == 0, query.output
    assert colours[os.path.basename(query.stdout.splitlines()[1].split()[2])] == colour


def test_demo_runs_again_without_reindexing(tmp_path):
    args = ["demo", "--dir", str(tmp_path / "demo"), "--images", "12", "--query", "a red circle"]
    CliRunner().invoke(cli, args)
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert "Indexed 0 new, 12 unchanged, 0 failed." in result.stderr

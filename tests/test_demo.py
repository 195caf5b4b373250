"""`clipsearch demo`: the README's offline first run, end to end with shapes-mini."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request

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


def test_demo_serve_serves_the_demo_store_until_interrupted(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, "-m", "clipsearch", "demo", "--dir", str(tmp_path / "demo"), "--images", "8"]
    process = subprocess.Popen(
        [*command, "--serve", "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        status, deadline = None, time.monotonic() + 300  # it generates and indexes first
        while status is None and time.monotonic() < deadline and process.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/status", timeout=30) as response:
                    status = json.loads(response.read())
            except OSError:
                time.sleep(0.3)
        assert status is not None, process.communicate()[1] if process.poll() is not None else "no answer in time"
        assert status["images"] == 8 and status["model"] == "shapes-mini" and status["roots"] == [{"name": "images"}]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=30) as response:
            assert b'src="/static/app.js"' in response.read()
    finally:
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=60)
    assert process.returncode == 0, err
    assert 'query: "' in out and f"Serving 8 images (shapes-mini) from {tmp_path / 'demo' / 'db'}" in err
    assert f"at http://127.0.0.1:{port}/" in err


def test_demo_open_without_serve_is_a_usage_error(tmp_path):
    result = CliRunner().invoke(cli, ["demo", "--dir", str(tmp_path / "demo"), "--open"])
    assert result.exit_code == 2 and "--open opens the served page: pass --serve too" in result.stderr
    assert not (tmp_path / "demo").exists()

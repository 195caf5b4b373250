"""`clipsearch serve` as a user runs it: a real process on a free loopback port, and its refusals."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from clipsearch.library import Library
from retrieval.shapes import generate

SERVE = [sys.executable, "-m", "clipsearch", "serve"]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    generate(root / "photos", 6, seed=3, size_range=(96, 128))
    Library(db=root / "db", model="shapes-mini").index([root / "photos"], workers=0, progress=False)
    return root / "db"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*SERVE, *args], capture_output=True, text=True, timeout=120, env=env)


def test_a_served_store_answers_over_http(store):
    port = free_port()
    process = subprocess.Popen(
        [*SERVE, "--db", str(store), "--model", "shapes-mini", "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        status = None
        while status is None and time.monotonic() < deadline and process.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/status", timeout=10) as response:
                    status = json.loads(response.read())
                    headers = response.headers
            except OSError:
                time.sleep(0.2)
        assert status is not None, process.stderr.read() if process.poll() is not None else "no answer in time"
        assert status["images"] == 6 and status["model"] == "shapes-mini" and status["roots"] == [{"name": "photos"}]
        assert headers["X-Content-Type-Options"] == "nosniff" and "Access-Control-Allow-Origin" not in headers
        url = f"http://127.0.0.1:{port}/api/search?q=a%20red%20circle&k=3&threshold=none"
        with urllib.request.urlopen(url, timeout=30) as response:
            assert len(json.loads(response.read())["results"]) == 3
    finally:
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=60)
    assert process.returncode == 0, err
    assert f"at http://127.0.0.1:{port}/" in err


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.0.2.7"])
def test_a_network_address_without_a_token_is_a_usage_error(store, host):
    done = run("--db", str(store), "--host", host, "--port", str(free_port()))
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        f"Error: --host {host} would show your photos to the network: also pass --token (or set CLIPSEARCH_TOKEN)"
    ]


def test_a_malformed_token_is_a_usage_error(store):
    done = run("--db", str(store), "--token", "short", "--port", str(free_port()))
    assert done.returncode == 2 and len(done.stderr.splitlines()) == 1 and "at least 8" in done.stderr


def test_a_port_in_use_fails_with_one_line(store):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        done = run("--db", str(store), "--model", "shapes-mini", "--port", str(port))
    assert done.returncode == 1 and len(done.stderr.splitlines()) == 1
    assert f"cannot listen on 127.0.0.1:{port}" in done.stderr and "--port" in done.stderr


def test_a_missing_store_fails_with_one_line(tmp_path):
    done = run("--db", str(tmp_path / "none"), "--model", "shapes-mini", "--port", str(free_port()))
    assert done.returncode == 1 and done.stderr.splitlines() == [
        f"Error: no image store at {tmp_path / 'none'}; run `clipsearch index FOLDER` first"
    ]


def test_without_the_serve_extra_it_says_what_to_install(tmp_path):
    # a site-packages without Starlette, as after a plain `pip install clipsearch`
    blocker = tmp_path / "sitecustomize.py"
    blocker.write_text(
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('starlette', 'uvicorn', 'python_multipart'):\n"
        "            raise ModuleNotFoundError(f'No module named {name!r}')\n"
        "sys.meta_path.insert(0, Block())\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    done = run("--port", str(free_port()), env=env)
    assert done.returncode == 1
    assert done.stderr.splitlines() == ["Error: the web app needs `pip install 'clipsearch[serve]'`"]


def test_connections_to_the_listening_socket_do_not_wait_for_delayed_acks():
    import asyncio

    from clipsearch.commands.serve import _listen

    listener = _listen("127.0.0.1", free_port())
    port = listener.getsockname()[1]

    async def main() -> int:
        accepted: asyncio.Future[int] = asyncio.get_running_loop().create_future()

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            accepted.set_result(writer.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            writer.close()

        server = await asyncio.start_server(handle, sock=listener)  # as uvicorn serves the socket it is given
        async with server:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            nodelay = await asyncio.wait_for(accepted, timeout=60)
            writer.close()
        return nodelay

    assert asyncio.run(main()) != 0  # Nagle off: an answer's headers and body leave at once


def test_a_store_of_another_model_fails_with_one_line_after_the_page_is_up(store, tiny):
    done = run("--db", str(store), "--model", str(tiny), "--port", str(free_port()))
    assert done.returncode == 1
    (line,) = done.stderr.splitlines()
    assert line.startswith("Error: the store at") and "no images indexed with model 'tiny'" in line

"""Serve speed: `clipsearch serve` on a 100k-image store, measured from outside, over HTTP on loopback.

- Cold start: a new `clipsearch serve` process until the first byte of its answer to `GET /` (served at once,
  while the text tower, the store and the FAISS index load on another thread), and until the answer to its first
  text search (which waits for them), interleaved run by run with `python -c "import torch"`. Target: the first
  page byte at most 2 s after importing torch would have taken.
- Warm latency: a real uvicorn on 127.0.0.1 and one keep-alive HTTP client: `GET /api/search?q=TEXT&k=50` (every
  text different: each one goes through the text tower; cut at the API's default threshold, "auto", as the page
  searches, unless --threshold says otherwise) and `GET /api/search?like=ID&k=50` ("more like this", a
  random stored id). p50/p95 of the client's wall time and of the app's own time (its `Server-Timing` header),
  and the server process's CPU time per request (what a request costs on an idle core: on shared cores the wall
  times include waiting for a turn); for reference, encoding a query text alone in the benchmark's process, right
  after. Target: text p50 <= 25 ms.
- Thumbnails: `GET /thumb/{id}` of camera-sized JPEGs (4000x3000, EXIF) with a cold cache, one request at a
  time and two at once (the server makes at most two at once); then the same again, cached.

The store: a ViT-B/32-architecture checkpoint with random weights (the real model's cost, no download), 100k
planted vectors written through the store's own write API (`benchmarks.query_speed.build_cold_store`, clustered
like image embeddings; 100k picks an IVF index), plus the photos, indexed with `clipsearch.Library`.

    python benchmarks/serve_speed.py                  # the full run (~5-10 min on 2 cores)
    python benchmarks/serve_speed.py --size 20000 --queries 30 --cold-runs 2 --photos 8   # a quick look
"""

from __future__ import annotations

import argparse
import http.client
import json
import math
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import urlencode

import numpy as np

# ---- knobs ----------------------------------------------------------------------------------------------
SIZE = 100_000  # planted vectors in the store
K = 50  # results per search (a page of the web app)
QUERIES = 200  # timed searches of each kind
WARMUP = 10  # untimed searches first
COLD_RUNS = 5  # timed cold starts (and as many `import torch` runs, interleaved)
PHOTOS = 24  # camera-sized JPEGs for the thumbnail measurement
PHOTO_SIZE = (4000, 3000)
SEED = 0


def free_port() -> int:
    """A port nobody listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clipsearch_command() -> list[str]:
    """The installed entry point, as a user runs it (or the module when not installed)."""
    script = Path(sys.executable).parent / "clipsearch"
    return [str(script)] if script.exists() else [sys.executable, "-m", "clipsearch"]


def build(root: Path, size: int, photos: int) -> tuple[Path, Path]:
    """The store (planted vectors plus indexed photos) and the checkpoint; returns (checkpoint, db)."""
    from benchmarks.query_speed import build_cold_store
    from clipsearch.library import Library
    from retrieval.shapes import generate

    started = time.perf_counter()
    checkpoint, db = build_cold_store(root, size)
    folder = root / "photos"
    generate(folder, photos, seed=SEED, image_size=PHOTO_SIZE, formats=("jpeg",))
    Library(db=db, model=checkpoint).index([folder], progress=False)
    print(
        f"# store of {size:,} vectors + {photos} photos built in {time.perf_counter() - started:.0f} s", file=sys.stderr
    )
    return checkpoint, db


def start_server(checkpoint: Path, db: Path, env: dict[str, str]) -> tuple[subprocess.Popen, int, float, float]:
    """A `clipsearch serve` process; returns it, its port, and the seconds until the first byte of `GET /` and
    until the answer to a first text search (which waits for the model, the store and the index)."""
    port = free_port()
    command = [*clipsearch_command(), "serve", "--db", str(db), "--model", str(checkpoint), "--port", str(port)]
    started = time.perf_counter()
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    while True:
        if process.poll() is not None:
            raise SystemExit(f"clipsearch serve failed:\n{process.stderr.read()}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                s.sendall(f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n".encode())
                if s.recv(1):
                    break
        except OSError:
            time.sleep(0.01)
    first_byte = time.perf_counter() - started
    status = Client(port).get(f"/api/search?q=a+photo&k={K}")[0]
    if status != 200:
        raise SystemExit(f"the first search answered {status}")
    return process, port, first_byte, time.perf_counter() - started


def stop(process: subprocess.Popen) -> None:
    """Stop a server with Ctrl-C, as a user does."""
    process.send_signal(2)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def cold(checkpoint: Path, db: Path, env: dict[str, str], runs: int) -> dict:
    """Median cold start of `clipsearch serve` and of `python -c "import torch"`, interleaved."""
    serve_times, search_times, torch_times = [], [], []
    for i in range(runs + 1):  # the first pair is untimed: it fills the page cache
        started = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import torch"], env=env, check=True)
        torch_s = time.perf_counter() - started
        process, _, serve_s, search_s = start_server(checkpoint, db, env)
        stop(process)
        if i:
            serve_times.append(serve_s)
            search_times.append(search_s)
            torch_times.append(torch_s)

    def over(times: list[float]) -> float:
        return round(statistics.median(s - t for s, t in zip(times, torch_times, strict=True)), 3)

    return {
        "serve_first_byte_s": round(statistics.median(serve_times), 3),
        "first_search_s": round(statistics.median(search_times), 3),
        "import_torch_s": round(statistics.median(torch_times), 3),
        "over_torch_s": over(serve_times),
        "first_search_over_torch_s": over(search_times),
        "serve_runs_s": [round(t, 3) for t in serve_times],
        "search_runs_s": [round(t, 3) for t in search_times],
        "torch_runs_s": [round(t, 3) for t in torch_times],
    }


class Client:
    """One keep-alive HTTP connection to the server."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)

    def get(self, path: str, headers: dict[str, str] | None = None) -> tuple[int, bytes, float, float]:
        """(status, body, client wall seconds, the app's own milliseconds from Server-Timing)."""
        started = time.perf_counter()
        self.connection.request("GET", path, headers={"Host": f"127.0.0.1:{self.port}", **(headers or {})})
        response = self.connection.getresponse()
        body = response.read()
        elapsed = time.perf_counter() - started
        timing = response.getheader("server-timing", "app;dur=nan")
        return response.status, body, elapsed, float(timing.split("dur=")[1])


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux; NaN elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return math.nan
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def latencies(client: Client, paths: list[str], warmup: int, pid: int) -> dict:
    """p50/p95 of client wall time and of in-app time over `paths` (the first `warmup` untimed), and the server's
    CPU time per request: what a request costs on an otherwise idle core, whatever else the machine runs."""
    wall, app = [], []
    for i, path in enumerate(paths):
        if i == warmup:
            cpu_start = cpu_seconds(pid)
        status, body, elapsed, app_ms = client.get(path)
        if status != 200:
            raise SystemExit(f"GET {path}: {status} {body[:200]!r}")
        if i >= warmup:
            wall.append(elapsed * 1000)
            app.append(app_ms)
    cpu_ms = (cpu_seconds(pid) - cpu_start) * 1000 / len(wall)
    return {
        "p50_ms": round(float(np.percentile(wall, 50)), 2),
        "p95_ms": round(float(np.percentile(wall, 95)), 2),
        "app_p50_ms": round(float(np.percentile(app, 50)), 2),
        "app_p95_ms": round(float(np.percentile(app, 95)), 2),
        "server_cpu_ms": round(cpu_ms, 2),
    }


def encode_reference(checkpoint: Path, texts: list[str], warmup: int) -> dict:
    """p50 of encoding one query text in this process, as the server does it (`query_text_model`, its weights
    prepacked, one thread): the part of a text search no server can save; the rest is the server's own overhead."""
    from clipsearch.library import encode_query_texts, query_text_model
    from retrieval.model.loading import load_model
    from retrieval.model.prepacked import prepacked_text_model

    model, _ = load_model(checkpoint, device="cpu", towers="text")
    model = prepacked_text_model(query_text_model(model))
    times = []
    for i, text in enumerate(texts):
        started = time.perf_counter()
        encode_query_texts(model, [text])
        if i >= warmup:
            times.append((time.perf_counter() - started) * 1000)
    return {"encode_p50_ms": round(float(np.percentile(times, 50)), 2)}


def thumbnails(port: int, ids: list[int]) -> dict:
    """Thumbnails/s with a cold cache, one at a time and two at once, and the cached latency."""
    half = len(ids) // 2
    one = Client(port)
    started = time.perf_counter()
    for i in ids[:half]:
        assert one.get(f"/thumb/{i}")[0] == 200
    serial = half / (time.perf_counter() - started)

    rest = ids[half:]
    failures: list[str] = []

    def worker(share: list[int]) -> None:
        client = Client(port)
        for i in share:
            status = client.get(f"/thumb/{i}")[0]
            if status != 200:
                failures.append(f"{i}: {status}")

    started = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(rest[j::2],)) for j in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    parallel = len(rest) / (time.perf_counter() - started)
    if failures:
        raise SystemExit(f"thumbnails failed: {failures}")
    cached = [one.get(f"/thumb/{i}")[2] * 1000 for i in ids]
    return {
        "cold_per_s_serial": round(serial, 2),
        "cold_per_s_two_clients": round(parallel, 2),
        "cached_p50_ms": round(statistics.median(cached), 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=SIZE, help="planted vectors in the store")
    parser.add_argument("--queries", type=int, default=QUERIES, help="timed searches of each kind")
    parser.add_argument("--cold-runs", type=int, default=COLD_RUNS, help="timed cold starts (0: skip)")
    parser.add_argument("--photos", type=int, default=PHOTOS, help="4000x3000 JPEGs to thumbnail (>= 2)")
    parser.add_argument("--threshold", default=None, help="the text searches' threshold (default: the API's, auto)")
    args = parser.parse_args()
    from benchmarks.query_speed import TEXTS  # the same queries as the query benchmark's

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="serve_speed_") as tmp:
        root = Path(tmp)
        env = {**os.environ, "CLIPSEARCH_CACHE": str(root / "cache"), "CLIPSEARCH_HOME": str(root / "db")}
        os.environ["CLIPSEARCH_CACHE"] = env["CLIPSEARCH_CACHE"]  # the weights hash is remembered there
        checkpoint, db = build(root, args.size, args.photos)
        summary: dict = {"benchmark": "serve_speed", "size": args.size, "k": K, "threshold": args.threshold or "auto"}
        if args.cold_runs:
            summary["cold"] = cold(checkpoint, db, env, args.cold_runs)
        process, port, _, _ = start_server(checkpoint, db, env)
        try:
            client = Client(port)
            n = args.queries + WARMUP
            texts = [TEXTS[i % len(TEXTS)] + f" {i}" for i in range(n)]
            cut = {} if args.threshold is None else {"threshold": args.threshold}
            text_paths = [f"/api/search?{urlencode({'q': t, 'k': K, **cut})}" for t in texts]
            summary["text"] = latencies(client, text_paths, WARMUP, process.pid)
            summary["text"].update(encode_reference(checkpoint, [t + " again" for t in texts], WARMUP))
            rng = random.Random(SEED)
            likes = [f"/api/search?like={rng.randint(1, args.size)}&k={K}" for _ in range(n)]
            client = Client(port)  # a new connection: the idle one was closed while the encoder was timed
            summary["like"] = latencies(client, likes, WARMUP, process.pid)
            status = json.loads(client.get("/api/status")[1])
            photo_ids = json.loads(client.get("/api/search?q=photo&k=500&in=photos&threshold=none")[1])["results"]
            summary["thumbs"] = thumbnails(port, [int(h["id"]) for h in photo_ids])
            summary["index"] = status["models"][0]["ann"].get("type")
        finally:
            stop(process)
    summary["total_s"] = round(time.perf_counter() - started, 1)
    th = summary["thumbs"]
    print(f"{'search':>8} {'p50 ms':>7} {'p95 ms':>7} {'app p50':>8} {'app p95':>8} {'cpu ms':>7}")
    for name in ("text", "like"):
        r = summary[name]
        print(
            f"{name:>8} {r['p50_ms']:>7.2f} {r['p95_ms']:>7.2f} {r['app_p50_ms']:>8.2f} {r['app_p95_ms']:>8.2f} "
            f"{r['server_cpu_ms']:>7.2f}"
        )
    print(f"encoding a query text alone, in this process meanwhile: {summary['text']['encode_p50_ms']:.2f} ms p50")
    print(
        f"thumbnails of {PHOTO_SIZE[0]}x{PHOTO_SIZE[1]} JPEGs, cold cache: {th['cold_per_s_serial']:.1f}/s one at a "
        f"time, {th['cold_per_s_two_clients']:.1f}/s two at once; cached: {th['cached_p50_ms']:.1f} ms"
    )
    if "cold" in summary:
        c = summary["cold"]
        print(
            f"cold `clipsearch serve`: first page byte {c['serve_first_byte_s']:.2f} s, first search answered "
            f"{c['first_search_s']:.2f} s; `import torch`: {c['import_torch_s']:.2f} s; differences "
            f"{c['over_torch_s']:.2f} s and {c['first_search_over_torch_s']:.2f} s"
        )
    print(json.dumps(summary))


if __name__ == "__main__":
    main()

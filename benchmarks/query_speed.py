"""Query speed: warm text-query latency per FAISS index type at 100k and 1M vectors, and a cold `clipsearch query`.

Warm: in one process, a ViT-B/32-architecture text tower (random weights, in the precision `Library` queries
with by default: `query_text_model`, bfloat16 on CPUs with native bfloat16) encodes each query text and the
index returns its top 10; p50/p95 of the whole (encode + search) and of each stage, in wall time, plus the
p50 of the thread's CPU time (both stages run on the calling thread), which is what the query costs on an
idle core when the machine's cores are shared. Queries/s counts the
search alone, one query at a time. Recall@10 is measured against exact search with held-out vectors drawn
from the stored collection's distribution (random-weight text vectors have no relation to it).

Cold (`--cold` runs only this): a whole `clipsearch query` process on a store of 100k planted vectors (synthetic,
written through the store's own write API, with a saved random-weights ViT-B/32 checkpoint (`--cold-arch`: another
preset's, e.g. MobileCLIP2-S0) as the model and its text tower exported (ONNX, and the numpy tower's weights), as
the first query leaves it), interleaved run by run with `python -c "pass"`, `python -c "import onnxruntime"` and
`python -c "import torch"`. The store is unchanged since its index was saved (as after `clipsearch index`), so the
default table output is answered from the saved index without opening LanceDB and the text is encoded in numpy
without torch or ONNX Runtime; `--json` needs every result's metadata from the store (LanceDB), and is timed too.
The page cache is warm (the first, untimed round reads the files, and writes the byte-code of any module that has
none, as an installed package has; so PYTHONDONTWRITEBYTECODE is dropped from the processes' environment); "cold"
means a new process that imports and loads everything. A stage split of the same query, in a process of its own per
round: imports (the CLI and the library), catalogue (the saved index and its paths, FAISS), tokenize (the vocabulary
included), encode (opening the text tower and running it), search, print.

The vectors are random but clustered like image embeddings: unit vectors around 4096 centres, spread in a
shared 64-dimensional subspace plus isotropic noise.

    python benchmarks/query_speed.py                       # the full run (~10-15 min on 2 cores)
    python benchmarks/query_speed.py --sizes 20000 --kinds flat ivf --cold-size 20000   # a quick look
    python benchmarks/query_speed.py --cold                # the cold query alone
    python benchmarks/query_speed.py --cold --cold-arch MobileCLIP2-S0   # ... on the default model's architecture
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SIZES = (100_000, 1_000_000)  # stored vectors
KINDS = ("flat", "hnsw", "ivf", "ivfpq")  # index types, each built over each size
DIM = 512  # ViT-B/32's embedding width
ARCH = "ViT-B/32"  # architecture of the (random-weights) text tower that encodes the queries
QUERIES = 100  # timed warm queries per index
WARMUP = 5  # untimed queries first
RECALL_QUERIES = 200  # held-out vectors for recall@10
K = 10
HNSW_M = 16  # links per node; 16 (not 32) keeps the 1M build within a few minutes on 2 cores
HNSW_EF_CONSTRUCTION = 40
COLD_SIZE = 100_000  # images in the store the cold query runs on
COLD_RUNS = 5  # timed process runs (after one untimed run)
CENTRES, RANK, SPREAD, NOISE = 4096, 64, 0.45, 0.2  # the clustered data's shape
SEED = 0
TEXTS = (
    "a photo of a dog",
    "a red car parked on the street",
    "sunset over the sea",
    "two children playing football in a park",
    "a bowl of ramen",
    "snow covered mountains",
    "a cat sleeping on a sofa",
    "an old black and white portrait",
)


def clustered(n: int, seed: int) -> np.ndarray:
    """n unit vectors around shared centres, spread in a shared low-rank subspace plus isotropic noise."""
    shared = np.random.default_rng(SEED)
    centres = shared.standard_normal((CENTRES, DIM), dtype=np.float32) / np.sqrt(DIM)
    basis = np.linalg.qr(shared.standard_normal((DIM, RANK)))[0].astype(np.float32)
    rng = np.random.default_rng(seed)
    out = np.empty((n, DIM), np.float32)
    for start in range(0, n, 100_000):  # in chunks: the temporaries of 1M rows at once would double memory
        m = min(100_000, n - start)
        x = centres[rng.integers(0, CENTRES, m)]
        x += SPREAD * (rng.standard_normal((m, RANK), dtype=np.float32) @ basis.T) / np.sqrt(RANK)
        x += NOISE * rng.standard_normal((m, DIM), dtype=np.float32) / np.sqrt(DIM)
        out[start : start + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile in milliseconds."""
    return float(np.percentile(values, q) * 1000)


def text_encoder():
    """A function text -> [1, D] unit vector through the ViT-B/32 text tower with random weights."""
    import torch

    from clipsearch.library import encode_query_texts, query_text_model
    from retrieval.model.clip import CLIP
    from retrieval.model.config import PRESETS

    torch.manual_seed(SEED)
    model = query_text_model(CLIP(PRESETS[ARCH], towers="text").eval())
    return lambda text: encode_query_texts(model, [text])  # as `Library.search` encodes a query


def exact_neighbours(queries: np.ndarray, vectors: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """True top-K ids by brute force, in chunks of the collection."""
    best_scores = np.full((len(queries), K), -np.inf, np.float32)
    best_ids = np.full((len(queries), K), -1, np.int64)
    for start in range(0, len(vectors), 200_000):
        scores = queries @ vectors[start : start + 200_000].T
        merged_scores = np.concatenate([best_scores, scores], axis=1)
        merged_ids = np.concatenate([best_ids, np.broadcast_to(ids[start : start + 200_000], scores.shape)], axis=1)
        top = np.argpartition(-merged_scores, K - 1, axis=1)[:, :K]
        best_scores = np.take_along_axis(merged_scores, top, axis=1)
        best_ids = np.take_along_axis(merged_ids, top, axis=1)
    return best_ids


def bench_index(index, encode, held_out: np.ndarray, truth: np.ndarray) -> dict:
    """Warm latency (encode + search), search queries/s and recall@10 of one built index."""
    texts = [TEXTS[i % len(TEXTS)] + ("" if i < len(TEXTS) else f" {i}") for i in range(QUERIES + WARMUP)]
    total, cpu, encode_times, search_times = [], [], [], []
    for i, text in enumerate(texts):
        start, cpu_start = time.perf_counter(), time.thread_time()
        vector = encode(text)
        encoded = time.perf_counter()
        index.search(vector, K)
        done, cpu_done = time.perf_counter(), time.thread_time()
        if i >= WARMUP:
            total.append(done - start)
            cpu.append(cpu_done - cpu_start)
            encode_times.append(encoded - start)
            search_times.append(done - encoded)
    _, found = index.search(held_out, K)  # batched: recall only
    single = []
    for row in held_out[:QUERIES]:
        start = time.perf_counter()
        index.search(row[None, :], K)
        single.append(time.perf_counter() - start)
    recall = float(np.mean([len(set(f) & set(t)) / K for f, t in zip(found, truth, strict=True)]))
    return {
        "p50_ms": round(percentile(total, 50), 2),
        "p95_ms": round(percentile(total, 95), 2),
        # both stages run on this one thread, so its CPU time is the latency on an otherwise idle core
        "cpu_p50_ms": round(percentile(cpu, 50), 2),
        "encode_p50_ms": round(percentile(encode_times, 50), 2),
        "search_p50_ms": round(percentile(search_times, 50), 3),
        "search_qps": round(len(single) / sum(single), 1),
        "recall_at_10": round(recall, 4),
    }


def warm(sizes: list[int], kinds: list[str]) -> list[dict]:
    """Build each index type over each size and measure it."""
    from retrieval.ann import AnnIndex, IndexParams

    encode = text_encoder()
    held_out = clustered(RECALL_QUERIES, seed=SEED + 1)
    rows = []
    for n in sizes:
        started = time.perf_counter()
        vectors = clustered(n, seed=SEED + 2)
        ids = np.arange(1, n + 1, dtype=np.int64)
        truth = exact_neighbours(held_out, vectors, ids)
        print(f"# {n:,} vectors generated in {time.perf_counter() - started:.1f} s", file=sys.stderr)
        for kind in kinds:
            started = time.perf_counter()
            params = IndexParams(kind, hnsw_m=HNSW_M, ef_construction=HNSW_EF_CONSTRUCTION)
            index = AnnIndex.build(ids, vectors, params=params)
            build_s = time.perf_counter() - started
            row = {"n": n, "kind": kind, "build_s": round(build_s, 1), **bench_index(index, encode, held_out, truth)}
            p = index.params
            row["params"] = {
                "nlist": p.nlist,
                "nprobe": p.nprobe,
                "M": p.hnsw_m,
                "efSearch": p.ef_search,
                "pq_m": p.pq_m,
            }
            rows.append(row)
            print(json.dumps(row), file=sys.stderr)
            del index
            gc.collect()
        del vectors
        gc.collect()
    return rows


def build_cold_store(root: Path, n: int, arch: str = ARCH) -> tuple[Path, Path]:
    """A random-weights checkpoint of the preset `arch` and a store of n planted rows for it, with its FAISS index
    saved."""
    import torch

    from retrieval.ann import open_index
    from retrieval.model.checkpoint import save_checkpoint
    from retrieval.model.config import PRESETS
    from retrieval.model.family import build_towers
    from retrieval.model.loading import load_model
    from retrieval.model.query_text import export_text_tower
    from retrieval.store import ImageRow, Store, utc_now
    from retrieval.types import ImageMetadata

    name = "".join(c if c.isalnum() else "-" for c in arch.lower()) + "-random"  # "vit-b-32-random"
    checkpoint = root / name
    torch.manual_seed(SEED)
    save_checkpoint(build_towers(PRESETS[arch]).eval(), checkpoint, name=name)
    model, _ = load_model(checkpoint, device="cpu", towers="text")
    db = root / "db"
    store = Store.open(db, model.info, create=True)
    vectors = clustered(n, seed=SEED + 3)
    assert model.info.embed_dim == DIM, f"{arch} embeds in {model.info.embed_dim} dimensions, the planted data {DIM}"
    now = utc_now()
    for start in range(0, n, 50_000):  # the store's write API, a few large commits
        ids = store.allocate_ids(min(50_000, n - start))
        store.apply(
            [
                ImageRow(
                    int(i),
                    f"/photos/{i:07d}.jpg",
                    1_000_000 + int(i),
                    0,
                    ImageMetadata(f"{i:064x}", 4000, 3000, "JPEG", None, None, None),
                    now,
                    vectors[start + j],
                )
                for j, i in enumerate(ids)
            ]
        )
    open_index(store)  # saved beside the store, as `clipsearch index` leaves it
    export_text_tower(model)  # as the first query (or `clipsearch index`) leaves it: the text tower in ONNX
    return checkpoint, db


def wall_seconds(argv: list[str], env: dict[str, str]) -> tuple[float, float]:
    """Wall-clock and CPU (user + system) seconds of one run of a process, which must succeed. The CPU time is what
    the process costs on an idle machine, which a loaded one inflates far less than the wall time."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run(argv, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed:\n{done.stderr}")
    return elapsed, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


# The cold query's stages, timed in a process of their own as `clipsearch query TEXT -n 10` runs them.
STAGES = """
import json, sys, time
start = time.perf_counter()
import click
from clipsearch.cli import cli
from clipsearch.library import Library
from retrieval.query import search_saved
imported = time.perf_counter()
library = Library(db=sys.argv[1], model=sys.argv[2], text_precision="float32")
library._check_searchable()
saved = library._saved_index()
assert saved is not None, "the saved index is not current"
catalogued = time.perf_counter()
from retrieval.model.tokenizer import tokenize
tokens = tokenize([sys.argv[3]], truncate=True)
tokenized = time.perf_counter()
encoder = library._onnx_text_encoder(1)
assert encoder is not None, "no fresh text export"
vector = encoder.encode_texts(tokens)[0]
encoded = time.perf_counter()
results = search_saved(saved, vector, 10)
searched = time.perf_counter()
with open("/dev/null", "w") as null:
    for r in results:
        click.echo(f"{r.rank:>4}  {r.score:>6.3f}  {r.path}", file=null)
printed = time.perf_counter()
marks = [start, imported, catalogued, tokenized, encoded, searched, printed]
names = ["imports", "catalogue", "tokenize", "encode", "search", "print"]
print(json.dumps({n: b - a for n, a, b in zip(names, marks, marks[1:])}))
print(type(encoder).__name__, file=sys.stderr)
"""


def stage_seconds(argv: list[str], env: dict[str, str]) -> dict[str, float]:
    """The per-stage seconds one run of the `STAGES` process reports."""
    done = subprocess.run(argv, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"the stage split failed:\n{done.stderr}")
    return json.loads(done.stdout)


def cold(n: int, runs: int, arch: str = ARCH) -> dict:
    """Median wall times of whole processes, interleaved run by run so that drifts in machine load hit each alike: a
    text `clipsearch query` (table output, then --json), `python -c "pass"`, `python -c "import onnxruntime"` and
    `python -c "import torch"`; the query's ratio to `import torch`; and the median of each stage of the query."""
    with tempfile.TemporaryDirectory(prefix="query_speed_") as tmp:
        root = Path(tmp)
        env = {**os.environ, "CLIPSEARCH_CACHE": str(root / "cache"), "CLIPSEARCH_HOME": str(root / "db")}
        env.pop("PYTHONDONTWRITEBYTECODE", None)  # byte-code is written once, in the untimed round, as installed
        os.environ["CLIPSEARCH_CACHE"] = env["CLIPSEARCH_CACHE"]  # the weights hash and the ONNX export live there
        started = time.perf_counter()
        checkpoint, db = build_cold_store(root, n, arch)
        print(f"# cold store of {n:,} rows built in {time.perf_counter() - started:.1f} s", file=sys.stderr)
        script = Path(sys.executable).parent / "clipsearch"  # the installed entry point, as a user runs it
        clipsearch = (
            [str(script)] if script.exists() else [sys.executable, "-c", "from clipsearch.cli import main; main()"]
        )
        query = [*clipsearch, "query", "a photo of a dog", "--model", str(checkpoint), "--db", str(db), "-n", "10"]
        commands = {
            "query": query,
            "json": [*query, "--json"],
            "python": [sys.executable, "-c", "pass"],
            "onnxruntime": [sys.executable, "-c", "import onnxruntime"],
            "torch": [sys.executable, "-c", "import torch"],
        }
        stages_argv = [sys.executable, "-c", STAGES, str(db), str(checkpoint), "a photo of a dog"]
        times: dict[str, list[float]] = {name: [] for name in commands}
        cpu: dict[str, list[float]] = {name: [] for name in commands}
        stages: list[dict[str, float]] = []
        for i in range(runs + 1):  # the first round, untimed, warms the page cache
            for name, argv in commands.items():
                elapsed, cpu_seconds = wall_seconds(argv, env)
                if i:
                    times[name].append(elapsed)
                    cpu[name].append(cpu_seconds)
            split = stage_seconds(stages_argv, env)
            if i:
                stages.append(split)
    median = {name: statistics.median(values) for name, values in times.items()}
    median_cpu = {name: statistics.median(values) for name, values in cpu.items()}
    return {
        "n": n,
        "arch": arch,
        "clipsearch_query_s": round(median["query"], 3),
        "clipsearch_query_json_s": round(median["json"], 3),
        "python_s": round(median["python"], 3),
        "import_onnxruntime_s": round(median["onnxruntime"], 3),
        "import_torch_s": round(median["torch"], 3),
        "query_vs_import_torch": round(median["query"] / median["torch"], 3),
        "json_vs_import_torch": round(median["json"] / median["torch"], 3),
        "cpu_s": {name: round(value, 3) for name, value in median_cpu.items()},
        "cpu_query_vs_import_torch": round(median_cpu["query"] / median_cpu["torch"], 3),
        "stages_ms": {name: round(statistics.median(s[name] for s in stages) * 1000, 1) for name in stages[0]},
        "load_average": [round(x, 2) for x in os.getloadavg()],
        **{f"{name}_runs_s": [round(t, 3) for t in values] for name, values in times.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES), help="stored vectors per warm run")
    parser.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS, help="index types")
    parser.add_argument("--cold-size", type=int, default=COLD_SIZE, help="images in the cold query's store (0: skip)")
    parser.add_argument("--cold-runs", type=int, default=COLD_RUNS, help="timed cold process runs")
    parser.add_argument("--cold", action="store_true", help="only the cold query (no warm runs)")
    parser.add_argument("--cold-arch", default=ARCH, help="preset of the cold query's model (e.g. MobileCLIP2-S0)")
    args = parser.parse_args()

    started = time.perf_counter()
    rows = [] if args.cold else warm(args.sizes, args.kinds)
    print(
        f"{'n':>9} {'index':>6} {'build s':>8} {'p50 ms':>7} {'p95 ms':>7} {'cpu ms':>7} {'enc ms':>7} "
        f"{'search ms':>9} {'q/s':>8} {'recall@10':>9}"
    )
    for r in rows:
        print(
            f"{r['n']:>9,} {r['kind']:>6} {r['build_s']:>8.1f} {r['p50_ms']:>7.2f} {r['p95_ms']:>7.2f} "
            f"{r['cpu_p50_ms']:>7.2f} {r['encode_p50_ms']:>7.2f} {r['search_p50_ms']:>9.3f} {r['search_qps']:>8.1f} "
            f"{r['recall_at_10']:>9.3f}"
        )
    summary: dict = {"benchmark": "query_speed", "warm": rows}
    for n in [] if args.cold else args.sizes:
        at_n = {r["kind"]: r for r in rows if r["n"] == n}
        if "flat" in at_n:
            exact_qps = at_n["flat"]["search_qps"]
            good = [r for k, r in at_n.items() if k != "flat" and r["recall_at_10"] >= 0.95]
            if good:
                best = max(good, key=lambda r: r["search_qps"])
                summary[f"best_approximate_at_{n}"] = {
                    "kind": best["kind"],
                    "speedup_vs_exact": round(best["search_qps"] / exact_qps, 1),
                    "recall_at_10": best["recall_at_10"],
                }
    if args.cold_size:
        summary["cold"] = cold(args.cold_size, args.cold_runs, args.cold_arch)
        c = summary["cold"]
        print(
            f"cold `clipsearch query` ({c['arch']}) on {c['n']:,} images: {c['clipsearch_query_s']:.2f} s median "
            f"({c['clipsearch_query_json_s']:.2f} s with --json); `python -c 'import onnxruntime'`: "
            f"{c['import_onnxruntime_s']:.2f} s; `python -c 'import torch'`: {c['import_torch_s']:.2f} s; "
            f"query / import torch = {c['query_vs_import_torch']:.2f}x (target <= 0.35), --json "
            f"{c['json_vs_import_torch']:.2f}x; CPU seconds {c['cpu_s']['query']:.2f} against "
            f"{c['cpu_s']['torch']:.2f}, {c['cpu_query_vs_import_torch']:.2f}x; "
            f"`python -c pass`: {c['python_s']:.2f} s; stages (ms, median): "
            + ", ".join(f"{name} {ms:.0f}" for name, ms in c["stages_ms"].items())
            + f"; load average {c['load_average'][0]:.2f}"
        )
    summary["total_s"] = round(time.perf_counter() - started, 1)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()

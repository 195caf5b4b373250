"""The index half of `distributed_speed.py --part index`: the sharded on-disk IVF-PQ (`retrieval.ondisk`) at 1M-10M.

Index part: for each size, synthetic 512-d vectors are generated in streamed chunks (10M x 512 float32 is
20 GB: never held) into a Lance dataset (`id`, `vector`: the store's columns) that stands for the store. Then,
each in its own process so their peak RSS is theirs alone:
- the build (`ondisk.build_from_lance`: train on a sample, add in shard processes, merge into on-disk lists,
  calibrate nprobe): wall time split by stage, index size on disk, peak RSS of the driver and of the largest
  shard worker;
- a query process that maps the index and searches single queries (re-ranking `RERANK_FACTOR * k` candidates
  with exact vectors taken from the Lance dataset): p50 latency after a warm-up (page cache warm: the files
  were just written), recall@10 against the exact top 10 found by a streamed exact scan, peak RSS;
- where the vectors fit in RAM (`--flat-max`, default 1M), a flat (exact) FAISS index in the same run: build
  time, p50 latency, peak RSS.

The vectors are clustered like image embeddings: unit vectors around 4096 random centres on the sphere plus
isotropic noise (cosine ~0.8 to the centre); uniformly random vectors would be a pathological case for any IVF.

    python -m benchmarks.distributed_speed --part index                    # 1M (~10 min on 2 quiet cores)
    nice -n 19 python -m benchmarks.distributed_speed --part index --sizes 1000000 2000000 5000000

The last line printed is one JSON object per size (`{"part": "index", ...}`) for scripts.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

logger = logging.getLogger("ondisk_index")

SIZES = (1_000_000,)  # vectors per index-part run
DIM = 512  # ViT-B/32's embedding width
CENTRES, NOISE = 4096, 0.75  # the clustered data's shape: centres on the sphere, isotropic noise norm
CHUNK = 100_000  # rows generated (and written) at a time
QUERIES = 200  # held-out query vectors for recall@10 and latency
WARMUP = 20  # untimed queries first
K = 10
FLAT_MAX = 1_000_000  # sizes up to this also get a flat index (it holds all vectors: 2 GB at 1M)
SEED = 0


# ---- index part ----------------------------------------------------------------------------------


def _centres() -> np.ndarray:
    centres = np.random.default_rng(SEED).standard_normal((CENTRES, DIM), dtype=np.float32)
    return centres / np.linalg.norm(centres, axis=1, keepdims=True)


def synthetic_chunk(start: int, stop: int, seed: int = 1) -> np.ndarray:
    """Rows [start, stop) of the synthetic collection: the same rows whoever generates them (seeded per chunk)."""
    assert start % CHUNK == 0 and stop - start <= CHUNK
    rng = np.random.default_rng([seed, start // CHUNK])
    m = stop - start
    x = _centres()[rng.integers(0, CENTRES, m)]
    x += rng.standard_normal((m, DIM), dtype=np.float32) * (NOISE / np.sqrt(DIM))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


class TopK:
    """The exact top k ids of each query, updated chunk by chunk: bounded memory whatever the collection's size."""

    def __init__(self, queries: np.ndarray, k: int) -> None:
        self.queries, self.k = queries, k
        self.scores = np.full((len(queries), k), -np.inf, np.float32)
        self.ids = np.full((len(queries), k), -1, np.int64)

    def update(self, start: int, vectors: np.ndarray) -> None:
        """Merge rows [start, start + len(vectors)) into the running top k."""
        stop = start + len(vectors)
        scores = np.concatenate([self.scores, self.queries @ vectors.T], axis=1)
        ids = np.concatenate([self.ids, np.broadcast_to(np.arange(start, stop), (len(self.queries), stop - start))], 1)
        top = np.argpartition(-scores, self.k - 1, axis=1)[:, : self.k]
        self.scores, self.ids = np.take_along_axis(scores, top, axis=1), np.take_along_axis(ids, top, axis=1)


def _batches(n: int, truth: TopK | None) -> Iterator[object]:
    import pyarrow as pa

    for start in range(0, n, CHUNK):
        stop = min(start + CHUNK, n)
        vectors = synthetic_chunk(start, stop)
        if truth is not None:  # the ground truth in the same pass: 10M vectors are generated once, not twice
            truth.update(start, vectors)
        if start % (10 * CHUNK) == 0:
            logger.info("dataset: %d of %d rows generated (load %.1f)", start, n, os.getloadavg()[0])
        yield pa.record_batch(
            [
                pa.array(np.arange(start, stop, dtype=np.int64)),
                pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), DIM),
            ],
            names=["id", "vector"],
        )


def write_dataset(uri: str, n: int, truth: TopK | None = None) -> float:
    """Stream n synthetic rows into a Lance dataset, updating `truth` on the way; returns seconds."""
    import lance
    import pyarrow as pa

    started = time.perf_counter()
    schema = pa.schema([pa.field("id", pa.int64()), pa.field("vector", pa.list_(pa.float32(), DIM))])
    lance.write_dataset(pa.RecordBatchReader.from_batches(schema, _batches(n, truth)), uri, schema=schema)
    return time.perf_counter() - started


def exact_truth(n: int, queries: np.ndarray, k: int) -> np.ndarray:
    """Exact top-k ids of each query by a streamed scan over the regenerated collection."""
    truth = TopK(queries, k)
    for start in range(0, n, CHUNK):
        truth.update(start, synthetic_chunk(start, min(start + CHUNK, n)))
    return truth.ids


def held_out_queries() -> np.ndarray:
    """Query vectors from the collection's distribution but not in it (another seed)."""
    return synthetic_chunk(0, QUERIES, seed=2)


@dataclass(frozen=True)
class _Child:
    """What a measuring child process prints: its JSON line and peak RSS."""

    report: dict
    seconds: float


def _run_child(args: list[str]) -> _Child:
    started = time.perf_counter()
    command = [sys.executable, __file__, *args]
    done = subprocess.run(command, stdout=subprocess.PIPE, text=True, check=False)  # its log goes to our stderr
    if done.returncode:
        raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}): see its log above")
    return _Child(json.loads(done.stdout.strip().splitlines()[-1]), time.perf_counter() - started)


def _peak_rss_mb() -> float:
    """This process's peak RSS (VmHWM). Not ru_maxrss: Linux carries that over an exec from the forked parent."""
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith("VmHWM:")).split()[1]) / 1024


def _children_rss_mb() -> float:
    """The largest finished child's ru_maxrss: an upper bound (it includes this process's RSS when it forked)."""
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # Linux: kilobytes


def child_build(uri: str, out: str, workers: int) -> dict:
    """(Child) build the on-disk index over the dataset; save what a query process needs."""
    import lance

    from retrieval import ondisk

    version = lance.dataset(uri).version
    started = time.perf_counter()
    index = ondisk.build_from_lance(uri, version, Path(out), "bench", workers=workers)
    seconds = time.perf_counter() - started
    index.write(Path(out) / "bench.delta.faiss")
    np.save(Path(out) / "bench.rows.npy", index.reader.row_map)
    with open(Path(out) / "bench.json", "w") as f:
        json.dump({"params": index.params.__dict__, "version": version, "written_as": index.written_as}, f)
    return {
        "build_s": seconds,
        "stages_s": index.stage_seconds,
        "params": index.params.__dict__,
        "calibrated_recall": index.calibrated_recall,  # on the build's own calibration queries (sampled rows)
        # CPU time of the driver and its shard processes: what the build costs, whatever else shares the cores
        "cpu_s": sum(
            getattr(resource.getrusage(who), field)
            for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
            for field in ("ru_utime", "ru_stime")
        ),
        "driver_rss_mb": _peak_rss_mb(),
        "worker_rss_mb": _children_rss_mb(),
    }


def child_query(uri: str, out: str, n: int) -> dict:
    """(Child) map the saved index, search single queries: latencies and the found ids."""
    from retrieval import ondisk
    from retrieval.faiss_index import IndexParams

    out_dir = Path(out)
    meta = json.loads((out_dir / "bench.json").read_text())
    reader = ondisk.LanceRows(uri, meta["version"], np.load(out_dir / "bench.rows.npy", mmap_mode="r"))
    index = ondisk.DiskIndex.open(
        out_dir / "bench.faiss",
        out_dir / "bench.ivfdata",
        IndexParams(**meta["params"]),
        out_dir / "bench.delta.faiss",
        None,
        reader,
        written_as=meta["written_as"],
    )
    return _time_queries(index.search)


def child_flat(n: int) -> dict:
    """(Child) a flat index over the whole collection, built from streamed chunks, and its query latency."""
    import faiss

    started = time.perf_counter()
    flat = faiss.IndexFlatIP(DIM)
    for start in range(0, n, CHUNK):
        flat.add(synthetic_chunk(start, min(start + CHUNK, n)))
    build = time.perf_counter() - started
    return {"build_s": build, **_time_queries(lambda q, k: flat.search(q, k))}


def _time_queries(search) -> dict:
    import faiss

    faiss.omp_set_num_threads(1)  # one query at a time on one thread, as `AnnIndex` searches a single query
    queries = held_out_queries()
    for q in queries[:WARMUP]:
        search(q[None, :], K)
    times, found = [], []
    for q in queries:
        started = time.perf_counter()
        _, ids = search(q[None, :], K)
        times.append(time.perf_counter() - started)
        found.append(ids[0])
    return {
        "p50_ms": 1000 * statistics.median(times),
        "p95_ms": 1000 * float(np.percentile(times, 95)),
        "found": np.asarray(found).tolist(),
        "rss_mb": _peak_rss_mb(),
    }


def _recall(found: list[list[int]], truth: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(t.tolist())) / K for f, t in zip(found, truth, strict=True)]))


def _size_on_disk(out: Path) -> int:
    return sum(p.stat().st_size for p in out.glob("bench.*") if p.suffix in (".faiss", ".ivfdata"))


def run_index_part(sizes: list[int], workdir: Path, workers: int, flat_max: int) -> list[dict]:
    """The index part: one result dict per size (also printed as a table)."""
    results = []
    for n in sizes:
        root = Path(tempfile.mkdtemp(prefix=f"ondisk-{n}-", dir=workdir))
        try:
            uri = str(root / "vectors.lance")
            top = TopK(held_out_queries(), K)
            write_s = write_dataset(uri, n, top)
            truth = top.ids
            logger.info("dataset written in %.0f s; building", write_s)
            out = root / "index"
            out.mkdir()
            build = _run_child(["--child", "build", uri, str(out), str(workers)])
            logger.info("built: %s", {k: v for k, v in build.report.items()})
            query = _run_child(["--child", "query", uri, str(out), str(n)]).report
            logger.info("queried: p50 %.1f ms, RSS %.0f MB", query["p50_ms"], query["rss_mb"])
            result = {
                "part": "index",
                "vectors": n,
                "write_dataset_s": round(write_s, 1),
                "build_s": round(build.report["build_s"], 1),
                "build_cpu_s": round(build.report["cpu_s"], 1),
                "stages_s": {k: round(v, 1) for k, v in build.report["stages_s"].items()},
                "params": {k: build.report["params"][k] for k in ("nlist", "nprobe", "pq_m", "rerank")},
                "index_bytes": _size_on_disk(out),
                "raw_bytes": n * DIM * 4,
                "build_driver_rss_mb": round(build.report["driver_rss_mb"]),
                "build_worker_rss_mb": round(build.report["worker_rss_mb"]),
                "query_rss_mb": round(query["rss_mb"]),
                "recall_at_10": round(_recall(query["found"], truth), 4),
                "calibration_recall_at_10": round(build.report["calibrated_recall"], 4),
                "p50_ms": round(query["p50_ms"], 2),
                "p95_ms": round(query["p95_ms"], 2),
                "flat": None,
            }
            if n <= flat_max:
                flat = _run_child(["--child", "flat", str(n)]).report
                result["flat"] = {
                    "build_s": round(flat["build_s"], 1),
                    "p50_ms": round(flat["p50_ms"], 2),
                    "rss_mb": round(flat["rss_mb"]),
                    "recall_at_10": round(_recall(flat["found"], truth), 4),
                }
            results.append(result)
            _print_index_result(result)
        finally:
            shutil.rmtree(root, ignore_errors=True)
    return results


def _print_index_result(r: dict) -> None:
    gb = 1024**3
    print(
        f"{r['vectors']:>11,} vectors  build {r['build_s']:7.1f} s ({r['build_cpu_s']:.0f} CPU s) {r['stages_s']}  "
        f"index {r['index_bytes'] / gb:.2f} GB (raw {r['raw_bytes'] / gb:.1f} GB)  "
        f"RSS build {r['build_driver_rss_mb']} MB driver / {r['build_worker_rss_mb']} MB worker, "
        f"query {r['query_rss_mb']} MB  recall@10 {r['recall_at_10']:.3f} (calibration "
        f"{r['calibration_recall_at_10']:.3f})  p50 {r['p50_ms']:.1f} ms  {r['params']}",
        file=sys.stderr,
    )
    if r["flat"]:
        f = r["flat"]
        print(
            f"{'':>11}  flat: build {f['build_s']:.1f} s  p50 {f['p50_ms']:.1f} ms  RSS {f['rss_mb']} MB  "
            f"recall@10 {f['recall_at_10']:.3f}",
            file=sys.stderr,
        )
    else:
        print(f"{'':>11}  flat: not run (the vectors do not fit in RAM; raise --flat-max to force)", file=sys.stderr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=["index"], default="index", help="which half of the benchmark to run")
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES), help="vectors per index-part run")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="shard processes")
    parser.add_argument("--flat-max", type=int, default=FLAT_MAX, help="largest size that also gets a flat index")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()), help="where the data goes")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(process)d %(name)s: %(message)s", stream=sys.stderr)
    if args.child:
        kind, *rest = args.child
        if kind == "build":
            report = child_build(rest[0], rest[1], int(rest[2]))
        elif kind == "query":
            report = child_query(rest[0], rest[1], int(rest[2]))
        else:
            report = child_flat(int(rest[0]))
        print(json.dumps(report))
        return
    if args.part == "index":
        for result in run_index_part(args.sizes, args.workdir, args.workers, args.flat_max):
            print(json.dumps(result))


if __name__ == "__main__":
    main()

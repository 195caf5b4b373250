"""Peak memory of `clipsearch index`: the summed PSS of its process tree (the CLI, the forkserver, the decoder
workers, multiprocessing's resource tracker), beside one process holding the same model and a batch of inputs.

PSS splits each shared page between the processes sharing it, so the sum over a tree counts every page once:
it is what the run costs the machine. It is read from `/proc/<pid>/smaps_rollup` (Linux; no psutil needed)
every POLL_SECONDS, the tree from `/proc/<pid>/task/*/children`.

The photos are `benchmarks/index_speed.py`'s (photo-sized JPEGs, generated once into its cache); the model is its
random-weights ViT-B/32 checkpoint. The reference is a process that loads the same model's image tower, as
`clipsearch index` does, and encodes one batch of BATCH preprocessed images: "one process holding the model plus
its decode buffers" (the pipeline holds at most 2 batches + 8 decoded images in flight).

    python benchmarks/index_memory.py                 # 160 photos, 2 runs of each
    python benchmarks/index_memory.py --photos 40 --runs 1
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

PHOTOS = 160
RUNS = 2  # runs of each, interleaved; the peak is a maximum, so its median is reported
BATCH = 32
POLL_SECONDS = 0.05

_REFERENCE = """
import sys, numpy as np, torch
from retrieval.model.loading import load_model
from retrieval.model.encode import encode_images
model, preprocess = load_model(sys.argv[1], device="cpu", towers="image")
paths = sys.argv[2:]
pixels = torch.stack([preprocess(p) for p in paths])  # [B, 3, S, S]
encode_images(model, pixels)
"""


def tree(pid: int) -> list[int]:
    """`pid` and all its descendants."""
    out, todo = [], [pid]
    while todo:
        current = todo.pop()
        out.append(current)
        try:
            for task in Path(f"/proc/{current}/task").iterdir():
                todo.extend(int(c) for c in (task / "children").read_text().split())
        except OSError:
            continue
    return out


def pss_kb(pid: int) -> int:
    """A process's PSS in kB (0 when it has gone)."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def peak_pss(command: list[str]) -> tuple[float, int, float]:
    """Run `command`; (peak summed PSS of its tree in MB, most processes at once, wall seconds)."""
    peak, most = 0, 0
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    done = threading.Event()
    stderr: list[str] = []
    reader = threading.Thread(target=lambda: (stderr.append(process.stderr.read()), done.set()), daemon=True)
    reader.start()
    while process.poll() is None:
        pids = tree(process.pid)
        peak, most = max(peak, sum(pss_kb(p) for p in pids)), max(most, len(pids))
        time.sleep(POLL_SECONDS)
    done.wait()
    if process.returncode != 0:
        raise SystemExit(f"{command} failed:\n{''.join(stderr)}")
    return peak / 1024, most, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--photos", type=int, default=PHOTOS)
    parser.add_argument("--runs", type=int, default=RUNS)
    parser.add_argument("--workers", type=int, default=None, help="--workers for clipsearch index [its default]")
    args = parser.parse_args()

    from benchmarks.index_speed import ARCH, CACHE, checkpoint, photos_folder

    CACHE.mkdir(parents=True, exist_ok=True)
    folder = photos_folder(CACHE, args.photos)
    paths = sorted(folder.glob("*.jpg"))[: args.photos]
    model = checkpoint(CACHE, ARCH, "vit-b-32-random")
    workers = [] if args.workers is None else ["--workers", str(args.workers)]
    index, reference = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for run in range(args.runs):
            command = [sys.executable, "-m", "clipsearch", "index", str(folder), "--db", f"{tmp}/db{run}", "--model",
                       str(model), "--quiet", *workers]  # fmt: skip
            index.append(peak_pss(command))
            reference.append(peak_pss([sys.executable, "-c", _REFERENCE, str(model), *map(str, paths[:BATCH])]))
    index_mb = statistics.median(r[0] for r in index)
    reference_mb = statistics.median(r[0] for r in reference)
    print(f"{len(paths)} photos from {folder}, model {ARCH} (random weights)")
    print(f"clipsearch index      peak tree PSS {index_mb:7.0f} MB  ({max(r[1] for r in index)} processes at most)")
    print(f"one process + batch   peak PSS      {reference_mb:7.0f} MB")
    print(f"ratio {index_mb / reference_mb:.2f}x")
    result = {"photos": len(paths), "index_pss_mb": round(index_mb), "reference_pss_mb": round(reference_mb)}
    result.update(ratio=round(index_mb / reference_mb, 2), runs={"index": index, "reference": reference})
    print(json.dumps(result))


if __name__ == "__main__":
    main()

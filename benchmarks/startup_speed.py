"""Start-up: an unchanged re-run of `clipsearch index` on a folder of many small images.

The folder (FILES tiny JPEGs in sub-folders of 100, generated once into --workdir) is indexed once with the bundled
shapes-mini model, untimed. Then, interleaved REPEATS times: a whole `clipsearch index FOLDER` process (wall time),
`python -c pass` (the bare interpreter) as the reference, and a split of the same work in one process timed stage by
stage: interpreter start, imports (the CLI and the modules an unchanged run needs), the walk, the catalogue read
(`retrieval.catalog.load_catalog`) and the plan (`indexer.sync.compare`, the part of `plan_sync` it needs). Medians
are printed, with one line a machine can parse at the end. The page cache is warm (the untimed first run has read
everything), and so is Python's bytecode cache (`__pycache__`), as after `pip install`, whatever
PYTHONDONTWRITEBYTECODE says: compiling clipsearch's modules on every run would add ~0.1 s that no user sees.

    python benchmarks/startup_speed.py                       # 10,000 files, 5 repeats
    python benchmarks/startup_speed.py --files 2000 --repeats 3   # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FILES = 10_000  # images in the folder
REPEATS = 5  # timed, interleaved runs of each
PER_FOLDER = 100  # images per sub-folder
MODEL = "shapes-mini"  # bundled: no download
TARGET_SECONDS = 1.0  # issue 14: an unchanged re-run of 10,000 files

# The split, run in a fresh interpreter: the same steps `finish_if_unchanged` takes, each timed.
_SPLIT = """
import json, os, sys, time
from pathlib import Path
t0 = time.perf_counter()
import clipsearch.cli, indexer.unchanged
from collections import Counter
from indexer.sync import compare
from indexer.walk import walk
from indexer.unchanged import catalogued_table
from retrieval.catalog import load_catalog
from retrieval.model.registry import known_identity
from retrieval.store_state import StoreState
t1 = time.perf_counter()
folder, db = os.path.abspath(sys.argv[1]), sys.argv[2]
found = list(walk([folder], (), Counter()))
t2 = time.perf_counter()
table = catalogued_table(Path(db), known_identity(sys.argv[3]))
model, catalog = load_catalog(db, table)
failures = StoreState(Path(db) / f"{table}.state.json").failures()
t3 = time.perf_counter()
plan = compare(found, catalog, [folder], failures)
t4 = time.perf_counter()
assert not plan.work and not plan.vanished and plan.unchanged == len(found), "the folder is not unchanged"
print(json.dumps({"imports": t1 - t0, "walk": t2 - t1, "catalogue": t3 - t2, "plan": t4 - t3}))
"""


def make_folder(folder: Path, n: int) -> None:
    """n distinct tiny JPEGs under `folder`, PER_FOLDER a sub-folder (kept when it is there already)."""
    import numpy as np
    from PIL import Image

    marker = folder / f".complete-{n}"
    if marker.exists():
        return
    rng = np.random.default_rng(0)
    for i in range(n):
        sub = folder / f"{i // PER_FOLDER:04d}"
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(sub / f"{i:06d}.jpg", quality=90)
    marker.touch()


def timed(command: list[str], env: dict[str, str]) -> tuple[float, str]:
    """Wall time of a process, and its stdout; the process must succeed."""
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(map(str, command))} failed:\n{done.stderr}")
    return seconds, done.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=FILES)
    parser.add_argument("--repeats", type=int, default=REPEATS)
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "clipsearch-startup-bench")
    args = parser.parse_args()

    folder, db = args.workdir / f"photos-{args.files}", args.workdir / f"db-{args.files}"
    make_folder(folder, args.files)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]), *sys.path])}
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    index = [sys.executable, "-m", "clipsearch", "index", str(folder), "--db", str(db), "--model", MODEL, "--json"]
    seconds, out = timed(index, env)  # the first run indexes everything (or brings an old store up to date)
    first = json.loads(out)
    print(f"first run: {first['indexed']} indexed, {first['unchanged']} unchanged in {seconds:.1f} s")

    runs: dict[str, list[float]] = {"index": [], "python": []}
    split: dict[str, list[float]] = {"imports": [], "walk": [], "catalogue": [], "plan": []}
    for _ in range(args.repeats):
        seconds, out = timed(index, env)
        summary = json.loads(out)
        if summary["indexed"] or summary["unchanged"] != args.files:
            raise SystemExit(f"the re-run was not unchanged: {summary}")
        runs["index"].append(seconds)
        runs["python"].append(timed([sys.executable, "-c", "pass"], env)[0])
        _, out = timed([sys.executable, "-c", _SPLIT, str(folder), str(db), MODEL], env)
        for stage, value in json.loads(out).items():
            split[stage].append(value)

    median = {name: statistics.median(values) for name, values in {**runs, **split}.items()}
    print(f"unchanged re-run of {args.files} files, median of {args.repeats} (interleaved):")
    print(f"  clipsearch index (whole process)  {median['index']:6.3f} s   target <= {TARGET_SECONDS:.1f} s")
    print(f"  python -c pass (interpreter)      {median['python']:6.3f} s")
    for stage in split:
        print(f"  {stage:<33} {median[stage]:6.3f} s")
    print(
        "RESULT startup_speed files={} index_s={:.3f} python_s={:.3f} imports_s={:.3f} walk_s={:.3f} "
        "catalogue_s={:.3f} plan_s={:.3f}".format(
            args.files,
            median["index"],
            median["python"],
            *(median[s] for s in ("imports", "walk", "catalogue", "plan")),
        )
    )


if __name__ == "__main__":
    main()

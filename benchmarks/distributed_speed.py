"""Scaling out, measured on one machine: the Ray engine against the local engine on the same photos.

Engines part (`--part engines`): `clipsearch index PHOTOS --json` in a subprocess on a fresh store, once with the
local engine (decoder processes + the model in the main process) and once with `--engine ray` (a Ray cluster
started by the command on this machine, decode tasks, one encoder actor), interleaved `--repeats` times on the same
photo-sized JPEGs and the same ViT-B/32 random weights. Reported, as medians:
- images/s of each engine over its own run time (`seconds` of the summary: after the model is loaded, and for Ray
  after the cluster has started), and the ratio Ray / local: what the engine costs when it cannot add machines;
- the wall time of each command, and Ray's extra start-up (cluster start, actor start, model shipped to it);
- each engine's stage split (decode, encode, write, and for Ray `wait`: the driver waiting on the pipeline).

On one machine the Ray engine cannot be faster: the same cores decode and encode, plus Ray's scheduling, object
store copies and start-up. What it buys is the ability to add machines and GPUs (README, "Scaling out").

Overhead part (`--part overhead`): both engines in one process on thumbnails with a tiny model, so that what is
left is each engine's fixed cost: Ray's cluster start-up (once), and per run its actor start, the model shipped to
the actor and Ray Data's pipeline start.

    python -m benchmarks.distributed_speed --photos 200 --repeats 3
    python -m benchmarks.distributed_speed --part overhead --photos 200 --repeats 3

Index part (`--part index`): the sharded on-disk IVF-PQ built and queried at 1M-10M synthetic vectors; it runs
`benchmarks/ondisk_index.py` with the other arguments (see its `--help`: `--sizes`, `--workers`, `--flat-max`).

    python benchmarks/distributed_speed.py --part index --sizes 1000000
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

from benchmarks.index_speed import CACHE, checkpoint, photos_folder

# ---- knobs ----------------------------------------------------------------------------------------------
PHOTOS = 200  # photo-sized JPEGs (4000x3000, EXIF) indexed by both engines
REPEATS = 3  # interleaved repetitions (medians reported)
ARCH = "ViT-B/32"  # random weights: the speed is the architecture's
BATCH = 32  # encoder batch, both engines
ACTORS = 1  # Ray encoder actors; with 2 cores, one encodes while Ray's decode tasks take the other


def run_index(folder: Path, db: Path, model: Path, extra: list[str]) -> tuple[dict, float]:
    """`clipsearch index --json` in a subprocess: (its summary, wall seconds)."""
    command = [sys.executable, "-c", "from clipsearch.cli import main; main()", "index", str(folder), "--db", str(db),
               "--model", str(model), "--json", "--quiet", "--batch-size", str(BATCH), *extra]  # fmt: skip
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"clipsearch index {' '.join(extra)} failed ({done.returncode}):\n{done.stderr}")
    return json.loads(done.stdout), wall


def engines(args: argparse.Namespace) -> dict:
    """The Ray engine against the local engine on the same photos (see the module docstring)."""
    folder = photos_folder(args.cache, args.photos)
    photos = len(sorted(folder.glob("*.jpg"))[: args.photos])
    if photos != args.photos:
        raise SystemExit(f"{folder} has {photos} photos, not {args.photos}")
    model = checkpoint(args.cache, ARCH, "vit-b-32-random")
    local, ray, local_walls, ray_walls, local_stages, ray_stages, loads = [], [], [], [], [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):  # interleaved, so drifts in machine load hit both engines alike
            loads.append(os.getloadavg()[0])
            for name, extra, speeds, walls, stages in (
                ("local", [], local, local_walls, local_stages),
                ("ray", ["--engine", "ray", "--actors", str(args.actors)], ray, ray_walls, ray_stages),
            ):
                summary, wall = run_index(folder, Path(tmp) / f"{name}{r}", model, extra)
                if summary["indexed"] != photos:
                    raise SystemExit(f"the {name} engine indexed {summary['indexed']} of {photos}: {summary}")
                speeds.append(photos / summary["seconds"])
                walls.append(wall)
                stages.append(summary["stage_seconds"])

    def med(values):
        return round(statistics.median(values), 3)

    return {
        "photos": photos,
        "arch": ARCH,
        "cpu_cores": os.cpu_count(),
        "ray_actors": args.actors,
        "local_images_per_s": med(local),
        "ray_images_per_s": med(ray),
        "ray_over_local": round(statistics.median(r / lo for r, lo in zip(ray, local, strict=True)), 3),
        "local_wall_s": med(local_walls),
        "ray_wall_s": med(ray_walls),
        # what Ray adds before and around the run: cluster start-up, actor start, the model shipped to the actor
        "ray_extra_wall_s": med([rw - lw for rw, lw in zip(ray_walls, local_walls, strict=True)]),
        "local_stage_seconds": {k: med([s[k] for s in local_stages]) for k in local_stages[0]},
        "ray_stage_seconds": {k: med([s[k] for s in ray_stages]) for k in ray_stages[0]},
        "load_average_1min": loads + [os.getloadavg()[0]],
        "runs": {"local": local, "ray": ray, "local_wall": local_walls, "ray_wall": ray_walls},
    }


def overhead(args: argparse.Namespace) -> dict:
    """Ray's fixed cost: both engines in this process on `args.photos` thumbnail-sized JPEGs with a tiny model, where
    decoding and encoding take almost nothing; the cluster is started once, its start-up timed apart."""
    import ray
    from PIL import Image

    from indexer.options import IndexOptions
    from indexer.pipeline import index_folders
    from indexer.ray_engine import RayOptions, index_with_ray
    from retrieval.model.loading import load_model
    from retrieval.store import Store

    model, preprocess = load_model(checkpoint(args.cache, "tiny-vit", "tiny-random"), device="cpu", towers="image")
    options = IndexOptions(batch_size=BATCH, progress=False)
    local, ray_runs = [], []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "thumbs"
        folder.mkdir()
        for i in range(args.photos):
            Image.new("RGB", (64, 48), (i % 256, (7 * i) % 256, (13 * i) % 256)).save(folder / f"{i:04d}.jpg")
        start = time.perf_counter()
        ray.init(include_dashboard=False, logging_level="ERROR", log_to_driver=False)
        startup = time.perf_counter() - start
        try:
            for r in range(args.repeats):
                local_store = Store.open(Path(tmp) / f"local{r}", model.info, create=True)
                local.append(index_folders([folder], model, preprocess, local_store, options).seconds)
                ray_store = Store.open(Path(tmp) / f"ray{r}", model.info, create=True)
                ray_options = RayOptions(actors=args.actors)
                ray_runs.append(index_with_ray([folder], model, preprocess, ray_store, options, ray_options).seconds)
        finally:
            ray.shutdown()
    return {
        "thumbnails": args.photos,
        "ray_cluster_startup_s": round(startup, 3),
        "local_run_s": round(statistics.median(local), 3),
        "ray_run_s": round(statistics.median(ray_runs), 3),
        # per run, on a running cluster: actor start, the model shipped to it, Ray Data's pipeline start and hand-offs
        "ray_overhead_per_run_s": round(statistics.median(r - lo for r, lo in zip(ray_runs, local, strict=True)), 3),
        "runs": {"local": local, "ray": ray_runs},
    }


def main() -> None:
    first = argparse.ArgumentParser(add_help=False)
    first.add_argument("--part")
    known, rest = first.parse_known_args()
    if known.part == "index":  # its own script and options (its --help too)
        script = Path(__file__).with_name("ondisk_index.py")
        os.execv(sys.executable, [sys.executable, str(script), "--part", "index", *rest])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parts = (
        "engines: both engines on photos; overhead: Ray's fixed cost on thumbnails; index: the sharded on-disk "
        "IVF-PQ (benchmarks/ondisk_index.py) [engines]"
    )
    parser.add_argument("--part", choices=("engines", "overhead", "index"), default="engines", help=parts)
    parser.add_argument("--photos", type=int, default=PHOTOS, help=f"photo-sized JPEGs [{PHOTOS}]")
    parser.add_argument("--repeats", type=int, default=REPEATS, help=f"interleaved repetitions [{REPEATS}]")
    parser.add_argument("--actors", type=int, default=ACTORS, help=f"Ray encoder actors [{ACTORS}]")
    parser.add_argument("--cache", type=Path, default=CACHE, help=f"where generated data is kept [{CACHE}]")
    args = parser.parse_args()
    args.cache.mkdir(parents=True, exist_ok=True)
    if args.part == "overhead":
        result = overhead(args)
        print(f"Ray cluster start-up {result['ray_cluster_startup_s']:.1f} s; per run on {result['thumbnails']} "
              f"thumbnails: local {result['local_run_s']:.2f} s, Ray {result['ray_run_s']:.2f} s")  # fmt: skip
        print(json.dumps(result))
        return
    result = engines(args)
    print(f"{result['photos']} photos, {result['arch']} on {result['cpu_cores']} cores")
    print(f"local engine {result['local_images_per_s']:8.2f} images/s  wall {result['local_wall_s']:.1f} s  "
          f"(stages {result['local_stage_seconds']})")  # fmt: skip
    print(f"ray engine   {result['ray_images_per_s']:8.2f} images/s  wall {result['ray_wall_s']:.1f} s  "
          f"(stages {result['ray_stage_seconds']})")  # fmt: skip
    print(f"ray / local {result['ray_over_local']:.2f}; Ray adds {result['ray_extra_wall_s']:.1f} s of wall time")
    print(json.dumps(result))


if __name__ == "__main__":
    main()

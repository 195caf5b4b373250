"""How fast `clipsearch index` embeds a folder of photos, against the classic CLIP loop and the bare encoder.

Measured in one run, on the same photo-sized JPEGs (4000x3000 with EXIF, from `retrieval.shapes`) and the
same ViT-B/32 random weights:
- pipeline: `clipsearch index PHOTOS` in a subprocess on a fresh store (decoder workers, batching, commits);
  images/s over the pipeline's own time and the stage split; then one more run, untimed, for the peak memory of
  its whole process tree (sampling memory takes CPU the timed runs should not share);
- reference: the classic loop in one process — PIL open, the exact CLIP transform (`Preprocess(fast=False)`:
  full decode, bicubic resize), `encode_image` of openai/CLIP's `model.py` in batches of 32;
- encoder-only: our encoder on pre-decoded tensors, batches of 32 (the ceiling for the pipeline);
- rerun: `clipsearch index` again on an unchanged folder of many small files (store made once, cached).

Targets on a 2-core CPU: pipeline >= 1.5x reference, >= 85% of encoder-only, peak memory <= 2 GB; rerun < 5 s.

The CPU may be shared: the three throughput measurements are interleaved and each repetition's ratios are
computed from measurements taken minutes apart at most; the reported ratios are the medians of those.

    python benchmarks/index_speed.py --photos 320 --repeats 3 [--reference-model-py clip/model.py]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

# ---- knobs ----------------------------------------------------------------------------------------------
PHOTOS = 320  # photo-sized JPEGs to index: 10 batches, so filling the first one and the cold first call weigh little
PHOTO_SIZE = (4000, 3000)
SMALL_FILES = 10_000  # files in the unchanged-rerun folder
REPEATS = 3  # timed repetitions of each measurement (medians reported)
BATCH = 32  # encoder batch, as in the classic loop
ARCH = "ViT-B/32"
SEED = 0
CACHE = Path(os.environ.get("CLIPSEARCH_BENCH_CACHE", Path.home() / ".cache" / "clipsearch-bench"))
MEMORY_POLL_SECONDS = 0.1  # RSS sampling period
PSS_EVERY = 10  # PSS every this many RSS samples


def photos_folder(cache: Path, n: int, content: str = "shapes") -> Path:
    """`n` photo-sized JPEGs with EXIF, generated once and reused.

    "shapes" are scenes of `retrieval.shapes`: smooth, so their JPEGs are small (~0.9 MB at 12 MP). "texture"
    photos have detail down to single pixels and sensor grain (`draft_fidelity.texture_photo`), which makes their
    files as large as a camera's (several MB) and their entropy decoding as slow.
    """
    from retrieval.shapes import generate

    stem = f"{'photos' if content == 'shapes' else content}-{PHOTO_SIZE[0]}x{PHOTO_SIZE[1]}"
    folder = cache / f"{stem}-{n}"
    if len(list(folder.glob("*.jpg"))) >= n:
        return folder
    for larger in cache.glob(f"{stem}-*"):  # a set of N photos starts with the set of n < N: link those
        photos = sorted(larger.glob("*.jpg"))
        if larger != folder and len(photos) >= n:
            folder.mkdir(exist_ok=True)
            for photo in photos[:n]:
                if not (folder / photo.name).exists():
                    os.link(photo, folder / photo.name)
            return folder
    print(f"generating {n} {content} photos of {PHOTO_SIZE[0]}x{PHOTO_SIZE[1]} in {folder} ...", file=sys.stderr)
    if content == "shapes":
        generate(folder, n, SEED, image_size=PHOTO_SIZE, formats=["jpeg"], exif=True, progress=True)
    else:
        texture_photos(folder, n)
    return folder


def texture_photos(folder: Path, n: int) -> None:
    """`n` texture photos with camera EXIF; photo i depends only on i, so a set is a prefix of a larger one."""
    import numpy as np
    from PIL import ExifTags, Image
    from tqdm import tqdm

    from benchmarks.draft_fidelity import texture_photo

    folder.mkdir(parents=True, exist_ok=True)
    exif = Image.Exif()
    exif[ExifTags.Base.Make], exif[ExifTags.Base.Model] = "Canon", "Canon EOS 5D Mark IV"
    exif.get_ifd(ExifTags.IFD.Exif)[ExifTags.Base.DateTimeOriginal] = "2021:06:01 12:00:00"
    for i in tqdm(range(n), desc="texture photos", unit="img"):
        texture_photo(PHOTO_SIZE, np.random.default_rng([SEED, i])).save(folder / f"{i:06d}.jpg", quality=90, exif=exif)


def checkpoint(cache: Path, arch: str, name: str) -> Path:
    """A random-weight model of `arch` saved in our checkpoint format (so the CLI loads the same weights)."""
    import torch

    from retrieval.model.checkpoint import save_checkpoint
    from retrieval.model.clip import CLIP
    from retrieval.model.config import PRESETS

    folder = cache / f"model-{name}"
    if not (folder / "config.json").is_file():
        torch.manual_seed(SEED)
        save_checkpoint(CLIP(PRESETS[arch]), folder, name=name)
    return folder


def tree_memory(pid: int, stop: threading.Event, peak: dict[str, int]) -> None:
    """Sample the summed RSS and PSS (shared pages split between sharers) of a process and its children.

    RSS is cheap to read; PSS walks every mapping of every process (~4 ms each, holding the process's memory map
    lock), which at the RSS rate would itself slow the pipeline measurably on 2 cores, so it is read less often.
    """
    import psutil

    try:
        root = psutil.Process(pid)
        tick = 0
        while not stop.is_set():
            rss = pss = 0
            full = tick % PSS_EVERY == 0
            for proc in [root, *root.children(recursive=True)]:
                try:
                    info = proc.memory_full_info() if full else proc.memory_info()
                    rss, pss = rss + info.rss, pss + getattr(info, "pss", info.rss)
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue
            peak["rss"] = max(peak["rss"], rss)
            if full:
                peak["pss"] = max(peak["pss"], pss)
            tick += 1
            time.sleep(MEMORY_POLL_SECONDS)
    except psutil.NoSuchProcess:
        return


def run_cli_index(
    folder: Path, db: Path, model: Path, extra: list[str], memory: bool = False
) -> tuple[dict, float, dict[str, int]]:
    """`clipsearch index --json` in a subprocess: (its summary, wall seconds, peak memory of its tree).

    With `memory`, a thread samples the tree's memory meanwhile; reading it costs CPU the pipeline needs on a
    2-core machine, so timed runs go without and memory gets a run of its own.
    """
    command = [sys.executable, "-c", "from clipsearch.cli import main; main()", "index", str(folder), "--db", str(db),
               "--model", str(model), "--json", *extra]  # fmt: skip
    peak = {"rss": 0, "pss": 0}
    stop = threading.Event()
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    sampler = threading.Thread(target=tree_memory, args=(process.pid, stop, peak), daemon=True)
    if memory:
        sampler.start()
    out, err = process.communicate()
    wall = time.perf_counter() - start
    stop.set()
    if memory:
        sampler.join()
    if process.returncode != 0:
        raise SystemExit(f"clipsearch index failed ({process.returncode}):\n{err}")
    return json.loads(out), wall, peak


def reference_loop(paths: list[Path], state_dict: dict, config, model_py: Path | None) -> tuple[float, dict]:
    """The classic loop: open, exact CLIP transform, openai/CLIP's encode_image in batches. Returns seconds and
    the split by stage."""
    import torch

    from retrieval.model.preprocess import Preprocess, open_image

    # the encoder benchmark's loader for openai/CLIP's model.py (by file path: benchmarks/ is not a package
    # on the path when this runs as a script)
    spec = importlib.util.spec_from_file_location("encode_speed", Path(__file__).with_name("encode_speed.py"))
    encode_speed = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(encode_speed)
    model = encode_speed.build_reference(encode_speed.load_reference(model_py), config, state_dict)
    preprocess = Preprocess.from_config(config, fast=False)
    stages = dict.fromkeys(("read", "decode", "transform", "encode"), 0.0)
    start = time.perf_counter()
    with torch.no_grad():
        for i in range(0, len(paths), BATCH):
            tensors = []
            for path in paths[i : i + BATCH]:
                t0 = time.perf_counter()
                image = open_image(path)
                t1 = time.perf_counter()
                rgb = preprocess.decode(image)
                t2 = time.perf_counter()
                tensors.append(preprocess.transform(rgb))
                t3 = time.perf_counter()
                stages["read"] += t1 - t0
                stages["decode"] += t2 - t1
                stages["transform"] += t3 - t2
            t4 = time.perf_counter()
            features = model.encode_image(torch.stack(tensors))
            (features / features.norm(dim=-1, keepdim=True)).numpy()
            stages["encode"] += time.perf_counter() - t4
    return time.perf_counter() - start, stages


def encoder_only(model, pixels) -> float:
    """Seconds for our encoder over pre-decoded tensors in batches."""
    from retrieval.model.encode import encode_images

    start = time.perf_counter()
    for i in range(0, len(pixels), BATCH):
        encode_images(model, pixels[i : i + BATCH])
    return time.perf_counter() - start


def small_files_store(cache: Path, n: int, tiny: Path) -> tuple[Path, Path]:
    """A folder of `n` small PNGs and a store that already indexes all of them (both cached)."""
    import numpy as np
    from PIL import Image

    folder, db = cache / f"small-{n}", cache / f"small-{n}-db"
    if len(list(folder.rglob("*.png"))) < n:
        print(f"writing {n} small files in {folder} ...", file=sys.stderr)
        folder.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(SEED)
        for i in range(n):
            sub = folder / f"{i // 1000:02d}"
            sub.mkdir(exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(sub / f"{i:05d}.png")
    run_cli_index(folder, db, tiny, ["--quiet"])  # brings the cached store up to date (fast when it is)
    return folder, db


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--photos", type=int, default=PHOTOS, help=f"photo-sized JPEGs to index [{PHOTOS}]")
    parser.add_argument("--small-files", type=int, default=SMALL_FILES, help=f"files for the rerun [{SMALL_FILES}]")
    parser.add_argument("--repeats", type=int, default=REPEATS, help=f"timed repetitions [{REPEATS}]")
    parser.add_argument("--workers", type=int, default=None, help="--workers for clipsearch index [its default]")
    parser.add_argument("--cache", type=Path, default=CACHE, help=f"where generated data is kept [{CACHE}]")
    parser.add_argument("--reference-model-py", type=Path, default=None, help="openai/CLIP's clip/model.py")
    parser.add_argument("--content", choices=("shapes", "texture"), default="shapes",
                        help="smooth scenes (~0.9 MB files) or detailed, camera-sized files [shapes]")  # fmt: skip
    args = parser.parse_args()

    import torch

    from retrieval.model.loading import load_model

    args.cache.mkdir(parents=True, exist_ok=True)
    folder = photos_folder(args.cache, args.photos, args.content)
    paths = sorted(folder.glob("*.jpg"))[: args.photos]
    vit = checkpoint(args.cache, ARCH, "vit-b-32-random")
    start = time.perf_counter()
    model, preprocess = load_model(vit, towers="both")
    load_seconds = time.perf_counter() - start
    extra = ["--quiet"] + ([] if args.workers is None else ["--workers", str(args.workers)])

    pipeline, reference, encoder, walls, stages, reference_stages, loads = [], [], [], [], [], [], []
    pixels = torch.stack([preprocess(p) for p in paths[: min(len(paths), 2 * BATCH)]])
    pixels = pixels.repeat((len(paths) + len(pixels) - 1) // len(pixels), 1, 1, 1)[: len(paths)]  # [N, 3, S, S]
    encoder_only(model, pixels[:BATCH])  # warm-up
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):  # interleaved, so drifts in machine load hit every measurement alike
            loads.append(os.getloadavg()[0])
            encoder.append(len(paths) / encoder_only(model, pixels))
            summary, wall, _ = run_cli_index(folder, Path(tmp) / f"db{r}", vit, extra)
            if summary["indexed"] != len(paths):
                raise SystemExit(f"the pipeline indexed {summary['indexed']} of {len(paths)} photos: {summary}")
            pipeline.append(len(paths) / summary["seconds"])
            walls.append(wall)
            stages.append(summary["stage_seconds"])
            seconds, split = reference_loop(paths, model.state_dict(), model.config, args.reference_model_py)
            reference.append(len(paths) / seconds)
            reference_stages.append(split)
            encoder[-1] = (encoder[-1] + len(paths) / encoder_only(model, pixels)) / 2  # before and after
        _, _, peak = run_cli_index(folder, Path(tmp) / "db-memory", vit, extra, memory=True)

    tiny = checkpoint(args.cache, "tiny-vit", "tiny-random")
    small, small_db = small_files_store(args.cache, args.small_files, tiny)
    reruns = []
    for _ in range(args.repeats):
        summary, wall, _ = run_cli_index(small, small_db, tiny, ["--quiet"])
        assert summary["unchanged"] == args.small_files and summary["indexed"] == 0, summary
        reruns.append(wall)

    def med(values):
        return round(statistics.median(values), 3)

    def med_stages(rows):
        return {k: med([r[k] for r in rows]) for k in rows[0]}

    result = {
        "photos": len(paths),
        "photo_size": f"{PHOTO_SIZE[0]}x{PHOTO_SIZE[1]}",
        "content": args.content,
        # Generated scenes are smooth, so their JPEGs are smaller than a camera's (often 3-6 MB at 12 MP), and
        # entropy decoding, which draft() cannot shorten, grows with the file.
        "photo_mean_mb": round(statistics.mean(p.stat().st_size for p in paths) / 1e6, 2),
        "arch": ARCH,
        "threads": torch.get_num_threads(),
        "cpu_cores": os.cpu_count(),
        "pipeline_images_per_s": med(pipeline),
        "pipeline_wall_s_incl_startup": med(walls),
        "reference_images_per_s": med(reference),
        "encoder_only_images_per_s": med(encoder),
        "speedup_vs_reference": round(statistics.median(p / r for p, r in zip(pipeline, reference, strict=True)), 2),
        "fraction_of_encoder_only": round(statistics.median(p / e for p, e in zip(pipeline, encoder, strict=True)), 3),
        "pipeline_stage_seconds": med_stages(stages),
        "reference_stage_seconds": med_stages(reference_stages),
        "peak_rss_mb_sum": round(peak["rss"] / 2**20),
        "peak_pss_mb_sum": round(peak["pss"] / 2**20),
        "vit_b32_load_s": round(load_seconds, 2),
        "unchanged_rerun_files": args.small_files,
        "unchanged_rerun_s": med(reruns),
        "load_average_1min": loads + [os.getloadavg()[0]],
        "runs": {"pipeline": pipeline, "reference": reference, "encoder": encoder, "rerun": reruns},
    }
    print(f"{len(paths)} {args.content} photos of {result['photo_size']}, {result['photo_mean_mb']} MB each on average")
    print(f"pipeline      {result['pipeline_images_per_s']:8.2f} images/s  (stages {result['pipeline_stage_seconds']})")
    print(
        f"reference     {result['reference_images_per_s']:8.2f} images/s  (stages {result['reference_stage_seconds']})"
    )
    print(f"encoder-only  {result['encoder_only_images_per_s']:8.2f} images/s")
    print(f"speed-up {result['speedup_vs_reference']}x (target >= 1.5), {result['fraction_of_encoder_only']:.0%} of "
          f"encoder-only (target >= 85%), peak memory {result['peak_pss_mb_sum']} MB PSS / "
          f"{result['peak_rss_mb_sum']} MB RSS summed over processes (target <= 2048)")  # fmt: skip
    print(f"unchanged rerun of {args.small_files} files: {result['unchanged_rerun_s']} s (target < 5)")
    print(json.dumps(result))


if __name__ == "__main__":
    main()

"""How fast `clipsearch index` embeds a folder of photos, against the strongest simple CPU loop and the classic one.

Every contender runs in a subprocess of its own on the same photo-sized JPEGs (4000x3000 with EXIF) and the same
ViT-B/32 random weights, interleaved repetition by repetition:
- clipsearch fp32: `clipsearch index PHOTOS` on a fresh store (decoder workers, the encoder in ONNX Runtime,
  batching, commits), and clipsearch int8: the same with `--precision int8`;
- ORT reference: the strongest simple CPU loop, as rclip indexes — one process, a thread pool (one thread per
  core) decoding with JPEG `draft()`, PIL's bicubic shortest-side resize and centre crop, the same fp32 ONNX
  export in an ONNX Runtime session with default options, batches of 8; it imports no torch;
- openai/CLIP reference (when its `clip/model.py` is at hand): open, full decode, the exact CLIP transform,
  openai/CLIP's `encode_image` in torch, batches of 32.
For each: images/s over its own loop (start-up excluded: imports, model load, session creation), wall seconds
including start-up, CPU-seconds per image over the whole process tree for the whole run (each process's
user+system time, sampled every 0.2 s), and, in one more untimed run each, the peak PSS and RSS of the tree.
Encoder-only: the ONNX Runtime encoders (fp32, int8) on pre-decoded pixels at the pipeline's batch size, timed
as `encode_speed.py` times them. The pipeline's stage split and the references' say where the time goes.

Targets (issue 14) on a 2-core CPU: clipsearch fp32 >= 1.3x the ORT reference's images/s with no more CPU-s per
image, int8 >= 1.8x; unchanged rerun measured separately.

The CPU may be shared: repetitions interleave the contenders, ratios are computed per repetition (measurements
minutes apart at most) and the medians reported.

    python benchmarks/index_speed.py --photos 160 --repeats 3 [--content texture] [--reference-model-py clip/model.py]
"""

from __future__ import annotations

import argparse
import importlib.metadata
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

from indexer.options import IndexOptions

# ---- knobs ----------------------------------------------------------------------------------------------
PHOTOS = 320  # photo-sized JPEGs to index: 10 batches, so filling the first one and the cold first call weigh little
PHOTO_SIZE = (4000, 3000)
SMALL_FILES = 10_000  # files in the unchanged-rerun folder
REPEATS = 3  # timed repetitions of each measurement (medians reported)
BATCH = 32  # encoder batch of the classic loop (openai/CLIP's notebooks)
ORT_BATCH = 8  # encoder batch of the ORT reference (rclip's)
ARCH = "ViT-B/32"
SEED = 0
CACHE = Path(os.environ.get("CLIPSEARCH_BENCH_CACHE", Path.home() / ".cache" / "clipsearch-bench"))
MEMORY_POLL_SECONDS = 0.1  # RSS sampling period in memory runs
PSS_EVERY = 10  # PSS every this many RSS samples
CPU_POLL_SECONDS = 0.2  # CPU-time sampling period (reading /proc/PID/stat: negligible next to the work)


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


def tree_usage(pid: int, stop: threading.Event, usage: dict[str, float], memory: bool) -> None:
    """Sample a process tree from /proc (Linux): each process's user+system CPU seconds and context switches (the
    last value seen per process is summed), and with `memory` the summed RSS and PSS (shared pages split between
    sharers).

    CPU times are cheap to read. PSS walks every mapping of every process (holding the process's memory map lock),
    which at the RSS rate would itself slow the pipeline measurably on 2 cores, so it is read less often, and only in
    runs that are not timed.
    """
    from benchmarks.index_memory import tree

    tick_seconds = os.sysconf("SC_CLK_TCK")
    cpu: dict[int, float] = {}
    switches: dict[int, int] = {}
    tick = 0
    while not stop.is_set():
        rss = pss = 0
        full = memory and tick % PSS_EVERY == 0
        for proc in tree(pid):
            try:
                # after the ")" closing the command name: state is field 3, utime and stime fields 14 and 15
                fields = Path(f"/proc/{proc}/stat").read_text().rpartition(")")[2].split()
                cpu[proc] = (int(fields[11]) + int(fields[12])) / tick_seconds
                status = _proc_fields(f"/proc/{proc}/status")
                switches[proc] = status["voluntary_ctxt_switches"] + status["nonvoluntary_ctxt_switches"]
                if memory:
                    rss += status["VmRSS"] * 1024
                    pss += _proc_fields(f"/proc/{proc}/smaps_rollup")["Pss"] * 1024 if full else 0
            except (OSError, KeyError, IndexError, ValueError):  # gone meanwhile, or a zombie without memory
                continue
        usage["cpu"] = sum(cpu.values())
        usage["switches"] = sum(switches.values())
        usage["rss"] = max(usage["rss"], rss)
        if full:
            usage["pss"] = max(usage["pss"], pss)
        tick += 1
        time.sleep(MEMORY_POLL_SECONDS if memory else CPU_POLL_SECONDS)


def _proc_fields(path: str) -> dict[str, int]:
    """The "Name: number [kB]" lines of a /proc file (status, smaps_rollup) as {name: number}."""
    out = {}
    for line in Path(path).read_text().splitlines():
        name, _, rest = line.partition(":")
        value = rest.split()
        if value and value[0].isdigit():
            out[name] = int(value[0])
    return out


def run_measured(command: list[str], memory: bool = False) -> tuple[dict, float, dict[str, float]]:
    """Run a contender's command (it prints one JSON object last): (that object, wall seconds, its tree's usage:
    CPU seconds, and with `memory` peak RSS and PSS in bytes)."""
    usage = {"cpu": 0.0, "switches": 0, "rss": 0, "pss": 0}
    stop = threading.Event()
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    sampler = threading.Thread(target=tree_usage, args=(process.pid, stop, usage, memory), daemon=True)
    sampler.start()
    out, err = process.communicate()
    wall = time.perf_counter() - start
    stop.set()
    sampler.join()
    if process.returncode != 0:
        raise SystemExit(f"{' '.join(command[:6])} ... failed ({process.returncode}):\n{err}")
    return json.loads(out.strip().splitlines()[-1]), wall, usage


def index_command(folder: Path, db: Path, model: Path, extra: list[str]) -> list[str]:
    """`clipsearch index --json` as a subprocess command."""
    return [sys.executable, "-c", "from clipsearch.cli import main; main()", "index", str(folder), "--db", str(db),
            "--model", str(model), "--json", *extra]  # fmt: skip


def run_cli_index(
    folder: Path, db: Path, model: Path, extra: list[str], memory: bool = False
) -> tuple[dict, float, dict[str, float]]:
    """`clipsearch index --json` in a subprocess: (its summary, wall seconds, its tree's usage)."""
    return run_measured(index_command(folder, db, model, extra), memory)


def reference_command(kind: str, folder: Path, n: int, spec: dict) -> list[str]:
    """This script in reference mode, as a subprocess command."""
    return [sys.executable, str(Path(__file__).resolve()), "--run-reference", kind, "--folder", str(folder),
            "--photos", str(n), "--spec", json.dumps(spec)]  # fmt: skip


def ort_reference(paths: list[Path], spec: dict) -> dict:
    """The strongest simple CPU loop: a thread pool decoding with draft(), ONNX Runtime fp32 in batches of 8.

    Imports numpy, Pillow and onnxruntime only (no torch, nothing of clipsearch's), as rclip does.
    """
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np
    import onnxruntime as ort
    from PIL import Image

    size = spec["image_size"]
    mean = np.array(spec["mean"], dtype=np.float32).reshape(3, 1, 1)
    std = np.array(spec["std"], dtype=np.float32).reshape(3, 1, 1)

    def pixels(path: Path) -> np.ndarray:
        with Image.open(path) as image:
            image.draft("RGB", (size, size))  # JPEG: decode at 1/2, 1/4 or 1/8 scale, no smaller than the input
            image = image.convert("RGB")
        width, height = image.size
        scale = size / min(width, height)
        resized = image.resize((max(size, round(width * scale)), max(size, round(height * scale))), Image.BICUBIC)
        left, top = (resized.width - size) // 2, (resized.height - size) // 2
        array = np.asarray(resized.crop((left, top, left + size, top + size)), dtype=np.float32) / 255.0
        return (array.transpose(2, 0, 1) - mean) / std  # [3, S, S]

    start = time.perf_counter()
    session = ort.InferenceSession(spec["onnx"], providers=["CPUExecutionProvider"])
    setup = time.perf_counter() - start
    start = time.perf_counter()
    encode = wait = 0.0
    cores = len(os.sched_getaffinity(0))
    with ThreadPoolExecutor(max_workers=cores) as pool:
        decoded = pool.map(pixels, paths)  # decodes ahead while the session runs
        for i in range(0, len(paths), ORT_BATCH):
            t0 = time.perf_counter()
            batch = np.stack([next(decoded) for _ in paths[i : i + ORT_BATCH]])
            t1 = time.perf_counter()
            features = session.run(None, {session.get_inputs()[0].name: batch})[0]
            features / np.linalg.norm(features, axis=1, keepdims=True)
            wait, encode = wait + t1 - t0, encode + time.perf_counter() - t1
    return {"seconds": time.perf_counter() - start, "setup_s": setup, "stages": {"wait_decode": wait, "encode": encode}}


def openai_reference(paths: list[Path], spec: dict) -> dict:
    """The classic loop: open, exact CLIP transform, openai/CLIP's encode_image in batches of 32."""
    import torch

    from retrieval.model.loading import load_model
    from retrieval.model.preprocess import Preprocess, open_image

    start = time.perf_counter()
    # the encoder benchmark's loader for openai/CLIP's model.py (by file path: benchmarks/ is not a package
    # on the path when this runs as a script)
    loader = importlib.util.spec_from_file_location("encode_speed", Path(__file__).with_name("encode_speed.py"))
    encode_speed = importlib.util.module_from_spec(loader)
    loader.loader.exec_module(encode_speed)
    ours, _ = load_model(spec["model"], device="cpu")
    model_py = Path(spec["reference_model_py"]) if spec.get("reference_model_py") else None
    model = encode_speed.build_reference(encode_speed.load_reference(model_py), ours.config, ours.state_dict())
    preprocess = Preprocess.from_config(ours.config, fast=False)
    setup = time.perf_counter() - start
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
    return {"seconds": time.perf_counter() - start, "setup_s": setup, "stages": stages}


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


def _installed(distribution: str) -> bool:
    try:
        importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def run_reference(args: argparse.Namespace) -> None:
    """Reference mode (a subprocess of the benchmark): run one reference loop, print its JSON."""
    paths = sorted(args.folder.glob("*.jpg"))[: args.photos]
    spec = json.loads(args.spec)
    result = ort_reference(paths, spec) if args.run_reference == "onnx" else openai_reference(paths, spec)
    print(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--photos", type=int, default=PHOTOS, help=f"photo-sized JPEGs to index [{PHOTOS}]")
    parser.add_argument("--small-files", type=int, default=SMALL_FILES,
                        help=f"files for the unchanged rerun; 0 skips it [{SMALL_FILES}]")  # fmt: skip
    parser.add_argument("--repeats", type=int, default=REPEATS, help=f"timed repetitions [{REPEATS}]")
    parser.add_argument("--workers", type=int, default=None, help="--workers for clipsearch index [its default]")
    parser.add_argument("--batch-size", type=int, default=None, help="--batch-size for clipsearch index [its default]")
    parser.add_argument("--cache", type=Path, default=CACHE, help=f"where generated data is kept [{CACHE}]")
    parser.add_argument("--reference-model-py", type=Path, default=None,
                        help="openai/CLIP's clip/model.py (else clip-anytorch's; without either, skipped)")  # fmt: skip
    parser.add_argument("--content", choices=("shapes", "texture"), default="shapes",
                        help="smooth scenes (~0.9 MB files) or detailed, camera-sized files [shapes]")  # fmt: skip
    parser.add_argument("--memory-in-timed-runs", action="store_true",
                        help="sample memory during the timed runs instead of in runs of their own (half the runs; "
                        "PSS reads then cost the timed runs a little CPU)")  # fmt: skip
    parser.add_argument("--arch", default=ARCH, help=f"architecture preset, random weights [{ARCH}]")
    parser.add_argument("--no-openai-reference", action="store_true", help="skip the openai/CLIP loop (the slowest)")
    parser.add_argument("--run-reference", choices=("onnx", "openai"), help=argparse.SUPPRESS)
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run_reference:
        run_reference(args)
        return

    import numpy as np

    from retrieval.model.loading import load_model
    from retrieval.model.onnx_export import ensure_export

    loader = importlib.util.spec_from_file_location("encode_speed", Path(__file__).with_name("encode_speed.py"))
    encode_speed = importlib.util.module_from_spec(loader)
    loader.loader.exec_module(encode_speed)
    cpu = encode_speed.cpu_description()
    print(cpu, file=sys.stderr)

    args.cache.mkdir(parents=True, exist_ok=True)
    folder = photos_folder(args.cache, args.photos, args.content)
    paths = sorted(folder.glob("*.jpg"))[: args.photos]
    vit = checkpoint(args.cache, args.arch, "vit-b-32-random" if args.arch == ARCH else f"{args.arch}-random")
    start = time.perf_counter()
    model, preprocess = load_model(vit, towers="image", device="cpu")
    load_seconds = time.perf_counter() - start
    # Exported before anything is timed: `clipsearch index` makes the export on first use, once per model.
    start = time.perf_counter()
    onnx = {p: ensure_export(model, p, "image") for p in ("float32", "int8")}
    export_seconds = time.perf_counter() - start
    encoders = encode_speed.onnx_encoders(model)
    batch = args.batch_size or IndexOptions().batch_size
    extra = ["--quiet"] + ([] if args.workers is None else ["--workers", str(args.workers)])
    extra += [] if args.batch_size is None else ["--batch-size", str(args.batch_size)]
    spec = {"onnx": str(onnx["float32"] / "image" / "model.onnx"), "image_size": preprocess.image_size,
            "mean": list(preprocess.mean), "std": list(preprocess.std), "model": str(vit),
            "reference_model_py": str(args.reference_model_py) if args.reference_model_py else None}  # fmt: skip
    commands = {
        "clipsearch fp32": lambda db: index_command(folder, db, vit, extra),
        "clipsearch int8": lambda db: index_command(folder, db, vit, [*extra, "--precision", "int8"]),
        "ORT reference": lambda db: reference_command("onnx", folder, len(paths), spec),
    }
    if args.no_openai_reference:
        pass
    elif args.reference_model_py or _installed("clip-anytorch"):
        commands["openai/CLIP reference"] = lambda db: reference_command("openai", folder, len(paths), spec)
    else:
        print("openai/CLIP reference skipped: pass --reference-model-py clip/model.py", file=sys.stderr)

    pixels = np.stack([preprocess(p).numpy() for p in paths[: min(len(paths), 2 * batch)]])
    pixels = np.concatenate([pixels] * ((len(paths) + len(pixels) - 1) // len(pixels)))[: len(paths)]
    rows: dict[str, dict[str, list]] = {name: {"rate": [], "wall": [], "cpu": [], "stages": []} for name in commands}
    encoder: dict[str, list[float]] = {"float32": [], "int8": []}
    peaks: dict[str, dict[str, float]] = {}
    loads = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):  # interleaved, so drifts in machine load hit every measurement alike
            loads.append(os.getloadavg()[0])
            for p, enc in encoders.items():
                encoder[p].append(encode_speed.encoder_images_per_s(enc.encode_images, pixels, batch, 1))
            for name, command in commands.items():
                out, wall, usage = run_measured(
                    command(Path(tmp) / f"{name.replace(' ', '-')}-{r}"), memory=args.memory_in_timed_runs
                )
                if args.memory_in_timed_runs:
                    peaks[name] = {k: max(peaks.get(name, {}).get(k, 0), usage[k]) for k in ("rss", "pss")}
                if "indexed" in out and out["indexed"] != len(paths):
                    raise SystemExit(f"{name} indexed {out['indexed']} of {len(paths)} photos: {out}")
                rows[name]["rate"].append(len(paths) / out["seconds"])
                rows[name]["wall"].append(wall)
                rows[name]["cpu"].append(usage["cpu"] / len(paths))
                rows[name]["stages"].append(out.get("stage_seconds") or out["stages"])
                print(f"repeat {r} {name}: {len(paths) / out['seconds']:.2f} images/s, {wall:.1f} s wall, "
                      f"{usage['cpu'] / len(paths):.3f} CPU-s/image, {usage}, stages {rows[name]['stages'][-1]}",
                      file=sys.stderr, flush=True)  # fmt: skip
        if not args.memory_in_timed_runs:
            peaks = {name: run_measured(command(Path(tmp) / f"{name.replace(' ', '-')}-memory"), memory=True)[2]
                     for name, command in commands.items()}  # fmt: skip

    reruns = []
    if args.small_files:
        tiny = checkpoint(args.cache, "tiny-vit", "tiny-random")
        small, small_db = small_files_store(args.cache, args.small_files, tiny)
        for _ in range(args.repeats):
            summary, wall, _ = run_cli_index(small, small_db, tiny, ["--quiet"])
            assert summary["unchanged"] == args.small_files and summary["indexed"] == 0, summary
            reruns.append(wall)

    def med(values):
        return round(statistics.median(values), 3)

    def ratio(name: str, key: str, against: str = "ORT reference") -> float:
        pairs = zip(rows[name][key], rows[against][key], strict=True)
        return round(statistics.median(a / b for a, b in pairs), 3)

    contenders = {
        name: {
            "images_per_s": med(row["rate"]),
            "wall_s_incl_startup": med(row["wall"]),
            "cpu_s_per_image": med(row["cpu"]),
            "speed_vs_ort_reference": ratio(name, "rate"),
            "cpu_vs_ort_reference": ratio(name, "cpu"),
            "peak_pss_mb": round(peaks[name]["pss"] / 2**20),
            "peak_rss_mb": round(peaks[name]["rss"] / 2**20),
            "stage_seconds": {k: med([s[k] for s in row["stages"]]) for k in row["stages"][0]},
        }
        for name, row in rows.items()
    }
    result = {
        "photos": len(paths),
        "photo_size": f"{PHOTO_SIZE[0]}x{PHOTO_SIZE[1]}",
        "content": args.content,
        # Generated scenes are smooth, so their JPEGs are smaller than a camera's (often 3-6 MB at 12 MP), and
        # entropy decoding, which draft() cannot shorten, grows with the file.
        "photo_mean_mb": round(statistics.mean(p.stat().st_size for p in paths) / 1e6, 2),
        "arch": args.arch,
        "cpu": cpu,
        "pipeline_batch": batch,
        "contenders": contenders,
        "encoder_only_images_per_s": {p: med(v) for p, v in encoder.items()},
        "vit_b32_load_s": round(load_seconds, 2),
        "export_s_fp32_and_int8": round(export_seconds, 1),
        "unchanged_rerun_files": args.small_files,
        "unchanged_rerun_s": med(reruns) if reruns else None,
        "load_average_1min": loads + [os.getloadavg()[0]],
        "runs": {name: {k: v for k, v in row.items() if k != "stages"} for name, row in rows.items()},
    }
    print(
        f"{cpu}\n{len(paths)} {args.content} photos of {result['photo_size']}, "
        f"{result['photo_mean_mb']} MB each on average"
    )
    print(
        f"{'':<22} {'images/s':>9} {'vs ORT ref':>10} {'CPU-s/img':>10} {'vs ORT ref':>10} {'PSS MB':>7} {'RSS MB':>7}"
    )
    for name, c in contenders.items():
        speed, cpu_ratio = c["speed_vs_ort_reference"], c["cpu_vs_ort_reference"]
        print(f"{name:<22} {c['images_per_s']:>9.2f} {speed:>9.2f}x {c['cpu_s_per_image']:>10.3f} {cpu_ratio:>9.2f}x "
              f"{c['peak_pss_mb']:>7} {c['peak_rss_mb']:>7}")  # fmt: skip
    for name, c in contenders.items():
        print(f"  {name} stages (s): {c['stage_seconds']}")
    print(f"encoder-only (ONNX Runtime, batch {batch}): fp32 {result['encoder_only_images_per_s']['float32']:.2f}, "
          f"int8 {result['encoder_only_images_per_s']['int8']:.2f} images/s")  # fmt: skip
    print("targets: clipsearch fp32 >= 1.3x the ORT reference with CPU-s/image <= 1.0x; int8 >= 1.8x")
    if reruns:
        print(f"unchanged rerun of {args.small_files} files: {result['unchanged_rerun_s']} s")
    print(json.dumps(result))


if __name__ == "__main__":
    main()

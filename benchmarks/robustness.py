"""Hostile image files against `clipsearch index`: no hang, bounded memory, and every file accounted for.

It writes a corpus of hostile files to a temporary folder:
- 1-pixel-thin images (100000x1, 1x100000, and a 65000x8 JPEG) and large ones in both orientations;
- decompression bombs: PNGs of zeros far above --max-megapixels (both orientations) and one just under it, GIF,
  JPEG and TIFF headers claiming 65535x65535-class images;
- every format the installed Pillow writes (plus compressed TIFF and lossless WebP variants), intact, with bits
  flipped (several seeds), and truncated;
- a zero-byte file, text named .png, a PNG named .jpg and a JPEG named .gif;
- a broken symlink, a symlink loop between two files, a folder symlink pointing at its parent, a FIFO and a
  symlink to /dev/zero named like images, a folder named like an image, and an unreadable file. The benchmark
  may run as root, which reads a chmod-000 file all the same: then the unreadable file is a symlink to
  /proc/self/mem, whose read at offset 0 fails (EIO);
- image files of formats nothing installed decodes (.svg, .jxl, camera raw).

It indexes the folder with the bundled shapes-mini model in a subprocess (`clipsearch index DIR --model
shapes-mini --db STORE --json`) under an address-space limit (RLIMIT_AS, inherited by the decoder workers)
while sampling the resident memory of the whole process tree, then checks:
- the run ends within TIMEOUT_SECONDS with exit status 0, and its stderr holds only clipsearch's log lines;
- the tree's peak RSS (summed over processes, so shared pages count more than once) stays under RSS_BOUND_MB;
- every intact file is stored with the vector of what Pillow decodes from it (cosine >= MIN_COSINE with the
  embedding computed here, in this process); every file that must fail is recorded with a stage and a reason and
  is not stored; a damaged file is either stored (then Pillow must fully decode it, and the vector must match)
  or failed with a reason; files that are not regular are neither; unsupported formats are counted.
A file removed while the run reads it is covered by the indexer's tests (tests/test_index_bad_input.py), not here.

    python benchmarks/robustness.py                  # the full corpus (~4 MB on disk), ~1 minute on 2 cores
    python benchmarks/robustness.py --flips 1 --max-megapixels 2 --keep /tmp/corpus

Prints one summary line, `robustness: files=... stored=... failed=... unsupported=... skipped=... violations=...
peak_rss_mb=... seconds=...`, then the violations (if any) and one JSON object with every figure. Exits with
status 1 when anything is violated. Linux only (it reads /proc).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import resource
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
import warnings
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

# ---- knobs ----------------------------------------------------------------------------------------------
FLIPS = 3  # bit-flipped copies of each format (one seed each)
FLIPPED_BITS = 16  # bits flipped per copy, anywhere past the first 8 bytes
MAX_MEGAPIXELS = 25.0  # the run's --max-megapixels; bombs are made around it
THIN = 100_000  # long side of the 1-pixel-thin PNGs
LARGE = (8_000, 2_000)  # a large JPEG under the limit, and its transpose
WORKERS = 2  # decoder processes
MODEL = "shapes-mini"
TIMEOUT_SECONDS = 600.0  # the whole index run; a hang fails the benchmark
ADDRESS_SPACE_GB = 8.0  # RLIMIT_AS of every process of the run (torch alone maps ~1.5 GB of address space)
RSS_BOUND_MB = 3_000.0  # the run's peak RSS, summed over its process tree
MIN_COSINE = 0.999  # stored vector against the embedding of what Pillow decodes
MEMORY_POLL_SECONDS = 0.05
SEED = 0
# stderr lines of the run must be clipsearch's own log lines (the CLI logs as "LEVEL logger: message")
OUR_LOG_LINE = re.compile(r"(DEBUG|INFO|WARNING|ERROR|CRITICAL) (clipsearch|indexer|retrieval)[\w.]*: ")

# What must become of a file: stored ("good"), recorded as failed ("fail"), either as Pillow's full decode
# decides ("damaged"), neither ("skip": not a regular file), or counted as an unsupported format ("unsupported").
Corpus = dict[str, str]


def pattern(seed: int, size: tuple[int, int] = (96, 72)):
    """A distinct smooth RGB image per seed."""
    from PIL import Image

    coarse = np.random.default_rng(seed).integers(0, 256, (4, 4, 3), dtype=np.uint8)
    return Image.fromarray(coarse).resize(size, Image.Resampling.BILINEAR)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_of_zeros(path: Path, width: int, height: int) -> None:
    """A greyscale PNG whose every pixel is 0, compressed row by row: ~1 kB per MP on disk, width*height in RAM."""
    compressor = zlib.compressobj(9)
    row = bytes(width + 1)  # filter byte + pixels
    idat = bytearray()
    for _ in range(height):
        idat += compressor.compress(row)
    idat += compressor.flush()
    header = _png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + header + _png_chunk(b"IDAT", bytes(idat)) + _png_chunk(b"IEND", b""))


def gif_bomb(path: Path) -> None:
    """A GIF whose screen and only frame claim 65535x65535 pixels (4.3 GP), with one pixel of data."""
    screen = b"GIF89a" + struct.pack("<HHBBB", 65535, 65535, 0, 0, 0)
    frame = b"," + struct.pack("<HHHHB", 0, 0, 65535, 65535, 0) + b"\x08\x02\x4c\x01\x00"
    path.write_bytes(screen + frame + b";")


def jpeg_bomb(path: Path) -> None:
    """A real JPEG whose frame header is changed to claim 65500x65500 pixels, its scan cut short."""
    buffer = io.BytesIO()
    pattern(1).save(buffer, "JPEG")
    data = bytearray(buffer.getvalue())
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", 65500, 65500)
    path.write_bytes(bytes(data[: data.index(b"\xff\xda") + 64]))


def tiff_bomb(path: Path) -> None:
    """A TIFF header claiming one 60000x60000 greyscale strip of 3.6 GB, followed by 8 bytes."""
    entries = [(256, 4, 60000), (257, 4, 60000), (258, 3, 8), (259, 3, 1), (262, 3, 1), (273, 4, 8 + 2 + 9 * 12 + 4),
               (277, 3, 1), (278, 4, 60000), (279, 4, 3_600_000_000)]  # fmt: skip
    ifd = struct.pack("<H", len(entries))
    for tag, kind, value in entries:
        field = struct.pack("<HH", value, 0) if kind == 3 else struct.pack("<I", value)  # SHORT or LONG, 4 bytes
        ifd += struct.pack("<HHI", tag, kind, 1) + field
    path.write_bytes(b"II*\x00" + struct.pack("<I", 8) + ifd + struct.pack("<I", 0) + bytes(8))


def writable_formats() -> list[tuple[str, str, dict]]:
    """(format, extension, save options) for every format the installed Pillow both writes and the indexer reads,
    plus compressed TIFF and lossless WebP."""
    from PIL import Image

    from indexer.formats import supported_extensions

    Image.init()
    by_format: dict[str, list[str]] = {}
    for ext, format_id in Image.registered_extensions().items():
        if ext in supported_extensions() and format_id in Image.SAVE:
            by_format.setdefault(format_id, []).append(ext)
    chosen = []
    for format_id, exts in sorted(by_format.items()):
        ext = min(exts, key=lambda e: (e != "." + format_id.lower(), e not in (".jpg", ".tif"), len(e), e))
        chosen.append((format_id, ext, {}))
    chosen += [("TIFF", ".tif", {"compression": c}) for c in ("tiff_deflate", "tiff_lzw", "jpeg", "packbits")]
    return chosen + [("WEBP", ".webp", {"lossless": True})]


def encoded(format_id: str, save_args: dict, seed: int) -> bytes | None:
    """A pattern image saved as `format_id` (in the first mode the format takes), or None if it takes none."""
    for mode in ("RGB", "L", "P", "1"):
        buffer = io.BytesIO()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)  # Pillow deprecates writing some (IM)
                pattern(seed).convert(mode).save(buffer, format_id, **save_args)
        except (OSError, ValueError, KeyError, TypeError):
            continue
        return buffer.getvalue()
    return None


def flipped(data: bytes, seed: int) -> bytes:
    """`data` with FLIPPED_BITS random bits flipped past its first 8 bytes (the signature stays)."""
    rng = np.random.default_rng(seed)
    out = bytearray(data)
    for offset, bit in zip(rng.integers(8, len(data), FLIPPED_BITS), rng.integers(0, 8, FLIPPED_BITS), strict=True):
        out[offset] ^= 1 << int(bit)
    return bytes(out)


def make_corpus(root: Path, flips: int, max_megapixels: float, thin: int, large: tuple[int, int]) -> Corpus:
    """Write the hostile files under `root`; returns relative path -> what must become of the file."""
    root.mkdir(parents=True)
    corpus: Corpus = {}

    def put(name: str, kind: str, data: bytes | None = None, make: Callable[[Path], None] | None = None) -> None:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if make is not None:
            make(path)
        elif data is not None:
            path.write_bytes(data)
        corpus[name] = kind

    # Size: thin, large, bombs.
    put("thin/wide.png", "good", make=lambda p: pattern(2, (thin, 1)).save(p))
    put("thin/tall.png", "good", make=lambda p: pattern(3, (1, thin)).save(p))
    put("thin/wide.jpg", "good", make=lambda p: pattern(4, (65000, 8)).save(p, quality=80))
    put("large/wide.jpg", "good", make=lambda p: pattern(5, large).save(p, quality=80))
    put("large/tall.jpg", "good", make=lambda p: pattern(6, large[::-1]).save(p, quality=80))
    side = int((4 * max_megapixels * 1e6) ** 0.5)  # 4x the limit
    put("bombs/wide.png", "fail", make=lambda p: png_of_zeros(p, 4 * side, side // 4))
    put("bombs/tall.png", "fail", make=lambda p: png_of_zeros(p, side // 4, 4 * side))
    under = int((0.9 * max_megapixels * 1e6) ** 0.5)  # decoded: the most a file may cost
    put("bombs/under-the-limit.png", "good", make=lambda p: png_of_zeros(p, under, under))
    put("bombs/screen.gif", "fail", make=gif_bomb)
    put("bombs/frame.jpg", "fail", make=jpeg_bomb)
    put("bombs/strip.tif", "fail", make=tiff_bomb)

    # Every format: intact, bit-flipped, truncated.
    for i, (format_id, ext, save_args) in enumerate(writable_formats()):
        data = encoded(format_id, save_args, seed=10 + i)
        if data is None:
            continue
        stem = f"formats/{format_id.lower()}{'-' + '-'.join(map(str, save_args.values())) if save_args else ''}"
        put(f"{stem}{ext}", "good", data)
        for seed in range(flips):
            put(f"{stem}-flipped{seed}{ext}", "damaged", flipped(data, SEED + seed))
        put(f"{stem}-truncated{ext}", "damaged", data[: len(data) // 2])

    # Names that lie, and empty or unreadable files.
    put("names/empty.jpg", "fail", b"")
    put("names/notes.png", "fail", b"shopping list: eggs, milk\n")
    put("names/png-content.jpg", "good", make=lambda p: pattern(7).save(p, "PNG"))
    put("names/jpeg-content.gif", "good", make=lambda p: pattern(8).save(p, "JPEG"))
    if os.geteuid() == 0:  # root reads a chmod-000 file; reading /proc/self/mem at offset 0 fails instead
        put("names/unreadable.jpg", "fail", make=lambda p: os.symlink("/proc/self/mem", p))
    else:
        put("names/unreadable.jpg", "fail", make=lambda p: (pattern(9).save(p, "JPEG"), os.chmod(p, 0)))

    # The file system: links, loops, things that are not files.
    put("links/broken.jpg", "fail", make=lambda p: os.symlink(root / "links" / "nowhere.jpg", p))
    put("links/loop-a.jpg", "fail", make=lambda p: os.symlink(root / "links" / "loop-b.jpg", p))
    put("links/loop-b.jpg", "fail", make=lambda p: os.symlink(root / "links" / "loop-a.jpg", p))
    put("links/parent", "skip", make=lambda p: os.symlink(root / "links", p))  # a folder loop: walked once
    put("links/fifo.jpg", "skip", make=lambda p: os.mkfifo(p))  # reading it would block for ever
    put("links/zeros.png", "skip", make=lambda p: os.symlink("/dev/zero", p))  # reading it would never end
    put("links/folder.jpg/inside.png", "good", make=lambda p: pattern(11).save(p))

    # Image formats nothing installed decodes.
    from indexer.formats import supported_extensions

    for name in ("vector.svg", "photo.jxl", "camera.cr2", "phone.heic"):
        if os.path.splitext(name)[1] not in supported_extensions():
            put(f"unsupported/{name}", "unsupported", b"<not decoded here>")
    return corpus


def tree_rss(pid: int) -> int:
    """Resident bytes of a process and all its descendants, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    total, todo = 0, [pid]
    while todo:
        current = todo.pop()
        todo += children.get(current, [])
        try:
            with open(f"/proc/{current}/statm") as f:
                total += int(f.read().split()[1]) * resource.getpagesize()
        except (OSError, IndexError, ValueError):
            continue
    return total


def run_index(folder: Path, db: Path, max_megapixels: float, workers: int, timeout: float, address_space_gb: float
              ) -> tuple[subprocess.CompletedProcess | None, float, int]:  # fmt: skip
    """`clipsearch index` in a subprocess under RLIMIT_AS: (the completed process or None on a timeout, wall
    seconds, peak RSS of its process tree in bytes)."""
    limit = int(address_space_gb * 2**30)

    def limit_memory() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    cli = [sys.executable, "-c", "from clipsearch.cli import main; main()"]
    options = ["--model", MODEL, "--db", str(db), "--workers", str(workers), "--max-megapixels", str(max_megapixels)]
    command = [*cli, "index", str(folder), "--json", *options]
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               preexec_fn=limit_memory, start_new_session=True)  # fmt: skip
    peak = [0]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], tree_rss(process.pid))
            time.sleep(MEMORY_POLL_SECONDS)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        out, err = process.communicate(timeout=timeout)
        done: subprocess.CompletedProcess | None = subprocess.CompletedProcess(command, process.returncode, out, err)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)  # its session: the run, its forkserver and its decoder workers
        process.communicate()
        done = None
    stop.set()
    sampler.join()
    return done, time.perf_counter() - start, peak[0]


@contextlib.contextmanager
def quiet_libraries() -> Iterator[None]:
    """No Pillow warnings, and libtiff's and libjpeg's lines (written to file descriptor 2) to /dev/null, while this
    process decodes the damaged files itself."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "wb") as devnull, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        os.dup2(devnull.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def pillow_reference(path: Path, preprocess, max_megapixels: float):
    """What the indexer should store for `path`: the transform of what Pillow fully decodes from it, or None when
    Pillow refuses the file (or it is above the megapixel limit, as drafted for a JPEG)."""
    from PIL import Image

    try:
        with Image.open(path) as probe:
            if probe.format == "JPEG":
                probe.draft("RGB", (preprocess.image_size, preprocess.image_size))
            if probe.size[0] * probe.size[1] > max_megapixels * 1e6:
                return None
        with Image.open(path) as full:
            full.load()  # the whole file at full size: any damage Pillow reports shows here
        with Image.open(path) as image:
            return preprocess(image)
    except Exception:  # whatever Pillow raises on a damaged file
        return None


def check(corpus: Corpus, root: Path, db: Path, summary: dict, max_megapixels: float) -> tuple[list[str], dict]:
    """The violations of what must become of each file, and counts."""
    import torch

    from retrieval.model.encode import encode_images
    from retrieval.model.loading import load_model
    from retrieval.store import Store

    model, preprocess = load_model(MODEL, towers="image")
    store = Store.open(db, model.info)
    ids, vectors = store.all_vectors()
    stored = dict(zip((r["path"] for r in store.rows(ids, columns=["path"])), vectors, strict=True))
    failed = {f["path"]: f for f in summary["failures"]}
    violations: list[str] = []
    counts = {"damaged_stored": 0, "damaged_failed": 0, "failed_although_pillow_decodes": 0}
    compare = []  # (name, stored vector, reference tensor) of the stored files
    for name, kind in sorted(corpus.items()):
        path = str(root / name)
        if kind == "unsupported":
            continue
        is_stored, failure = path in stored, failed.get(path)
        if failure is not None and not (failure.get("stage") and failure.get("reason")):
            violations.append(f"{name}: failed without a stage and a reason: {failure}")
        if is_stored and failure is not None:
            violations.append(f"{name}: both stored and failed")
        if kind == "skip":
            if is_stored or failure is not None:
                violations.append(f"{name}: not a regular file, yet {'stored' if is_stored else 'failed'}")
            continue
        if kind == "fail" and (is_stored or failure is None):
            violations.append(f"{name}: must fail, but {'was stored' if is_stored else 'is not reported'}")
            continue
        if kind in ("good", "damaged") and not is_stored and failure is None:
            violations.append(f"{name}: neither stored nor failed")
            continue
        if kind == "fail":
            continue
        with quiet_libraries():
            reference = pillow_reference(root / name, preprocess, max_megapixels)
        if kind == "damaged":
            counts["damaged_stored" if is_stored else "damaged_failed"] += 1
            counts["failed_although_pillow_decodes"] += failure is not None and reference is not None
        if kind == "good" and not is_stored:
            violations.append(f"{name}: intact, but failed: {failure}")
            continue
        if is_stored and reference is None:
            violations.append(f"{name}: stored, but Pillow cannot fully decode it")
        elif is_stored:
            compare.append((name, stored[path], reference))
    if compare:  # one batch: the model is small, the files many
        with torch.no_grad():
            expected = encode_images(model, torch.stack([reference for _, _, reference in compare]))
        for (name, vector, _), wanted in zip(compare, expected, strict=True):
            cosine = float(np.dot(vector, wanted) / np.linalg.norm(vector) / np.linalg.norm(wanted))
            if cosine < MIN_COSINE:
                violations.append(f"{name}: stored vector is not Pillow's image (cosine {cosine:.4f})")
    unsupported = sum(1 for kind in corpus.values() if kind == "unsupported")
    if sum(summary.get("unsupported", {}).values()) != unsupported:
        violations.append(f"unsupported formats counted {summary.get('unsupported')}, {unsupported} in the corpus")
    return violations, counts


def run(folder: Path, flips: int = FLIPS, max_megapixels: float = MAX_MEGAPIXELS, thin: int = THIN,
        large: tuple[int, int] = LARGE, workers: int = WORKERS, timeout: float = TIMEOUT_SECONDS,
        address_space_gb: float = ADDRESS_SPACE_GB, rss_bound_mb: float = RSS_BOUND_MB) -> dict:  # fmt: skip
    """Make the corpus under `folder`, index it, check it: every figure, and the violations."""
    start = time.perf_counter()
    corpus = make_corpus(folder / "corpus", flips, max_megapixels, thin, large)
    generated = time.perf_counter() - start
    done, seconds, peak = run_index(
        folder / "corpus", folder / "db", max_megapixels, workers, timeout, address_space_gb
    )
    result = {
        "files": len(corpus),
        "corpus_seconds": round(generated, 2),
        "seconds": round(seconds, 2),
        "peak_rss_mb": round(peak / 2**20, 1),
        "rss_bound_mb": rss_bound_mb,
        "address_space_gb": address_space_gb,
        "max_megapixels": max_megapixels,
        "workers": workers,
    }
    violations = []
    if done is None:
        violations.append(f"the run did not end within {timeout:g} s")
    elif done.returncode != 0:
        violations.append(f"the run exited with status {done.returncode}: {done.stderr[-2000:]}")
    if peak > rss_bound_mb * 2**20:
        violations.append(f"peak RSS {peak / 2**20:.0f} MB above the {rss_bound_mb:g} MB bound")
    if done is not None and done.returncode == 0:
        summary = json.loads(done.stdout)
        noise = [line for line in done.stderr.splitlines() if not OUR_LOG_LINE.match(line)]
        if noise:
            violations.append(f"{len(noise)} stderr lines not from clipsearch, e.g. {noise[0]!r}")
        found, counts = check(corpus, folder / "corpus", folder / "db", summary, max_megapixels)
        violations += found
        result |= counts
        result |= {k: summary[k] for k in ("indexed", "failed", "worker_restarts")}
        result["unsupported"] = sum(summary.get("unsupported", {}).values())
        result["reasons"] = sorted({f["reason"].split(" (")[0] for f in summary["failures"]})
    result["skipped"] = sum(1 for kind in corpus.values() if kind == "skip")
    result["kinds"] = {kind: list(corpus.values()).count(kind) for kind in sorted(set(corpus.values()))}
    result["violations"] = violations
    return result


def summary_line(result: dict) -> str:
    """The one line of `key=value` figures a script can parse."""
    return (
        f"robustness: files={result['files']} stored={result.get('indexed', 0)} failed={result.get('failed', 0)} "
        f"unsupported={result.get('unsupported', 0)} skipped={result['skipped']} "
        f"violations={len(result['violations'])} peak_rss_mb={result['peak_rss_mb']} seconds={result['seconds']}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--flips", type=int, default=FLIPS, help="bit-flipped copies of each format")
    parser.add_argument("--max-megapixels", type=float, default=MAX_MEGAPIXELS, help="the run's limit")
    parser.add_argument("--workers", type=int, default=WORKERS, help="decoder processes of the run")
    parser.add_argument("--timeout", type=float, default=TIMEOUT_SECONDS, help="seconds the run may take")
    parser.add_argument("--rss-bound-mb", type=float, default=RSS_BOUND_MB, help="peak RSS allowed to the run")
    parser.add_argument("--keep", type=Path, default=None, help="write the corpus and store here and keep them")
    args = parser.parse_args()
    if args.keep is not None:
        folder = args.keep
        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
        result = run(folder, args.flips, args.max_megapixels, workers=args.workers, timeout=args.timeout,
                     rss_bound_mb=args.rss_bound_mb)  # fmt: skip
    else:
        with tempfile.TemporaryDirectory() as tmp:
            result = run(Path(tmp), args.flips, args.max_megapixels, workers=args.workers, timeout=args.timeout,
                         rss_bound_mb=args.rss_bound_mb)  # fmt: skip
    print(summary_line(result))
    for violation in result["violations"]:
        print(f"  violation: {violation}")
    print(json.dumps(result))
    if result["violations"]:
        raise SystemExit(1)


if __name__ == "__main__":
    main()

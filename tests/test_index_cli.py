"""`clipsearch index` / `clipsearch status` end to end: output, JSON, exit codes, and the write lock."""

from __future__ import annotations

import io
import json
import os
import re
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image
from test_index_support import damaged, pattern, tiny_checkpoint, write_images

from clipsearch.cli import cli
from indexer.lock import IndexLock
from retrieval.ann import index_path, load_index
from retrieval.model.loading import load_model
from retrieval.store import Store


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("model") / "tiny")


def index(checkpoint, db, *args):
    return CliRunner().invoke(cli, ["index", *args, "--model", str(checkpoint), "--db", str(db), "--workers", "0"])


def test_index_json_summary_and_status(tmp_path, checkpoint):
    photos = tmp_path / "photos"
    write_images(photos, 6)
    (photos / "broken.jpg").write_bytes(b"\xff\xd8 not really")
    result = index(checkpoint, tmp_path / "db", str(photos), "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert {k: summary[k] for k in ("indexed", "unchanged", "moved", "removed", "failed")} == {
        "indexed": 6, "unchanged": 0, "moved": 0, "removed": 0, "failed": 1,
    }  # fmt: skip
    assert summary["total"] == 6 and summary["model"] == "tiny-test"
    assert summary["failures"] == [{"path": str(photos / "broken.jpg"), "stage": "decode",
                                    "reason": "not an image Pillow can read"}]  # fmt: skip

    again = index(checkpoint, tmp_path / "db", str(photos))
    assert again.exit_code == 0
    lines = again.stdout.splitlines()
    assert lines[0].startswith(
        "Indexed 0 images (0 new, 0 changed, 0 duplicates; 0 encoded), 6 unchanged, 0 moved, 0 removed, 0 failed, "
        "1 failed before (skipped) in"
    )
    assert lines[1:] == [
        "Skipped 1 file that failed before and did not change since (`clipsearch status` lists the failures; "
        "--retry-failed reads them again).",
        f"Store: {tmp_path / 'db'} (6 images, model tiny-test)",
    ]

    status = CliRunner().invoke(cli, ["status", "--db", str(tmp_path / "db"), "--json"])
    [entry] = json.loads(status.output)["models"]
    assert entry["count"] == 6 and entry["state"] == "complete" and entry["last_run"]["unchanged"] == 6
    assert {k: entry["ann"][k] for k in ("built", "type", "vectors", "up_to_date")} == {
        "built": True, "type": "flat", "vectors": 6, "up_to_date": True,
    }  # fmt: skip
    model, _ = load_model(checkpoint, towers="image")
    assert entry["table"] == Store.open(tmp_path / "db", model.info).table_name
    text = CliRunner().invoke(cli, ["status", "--db", str(tmp_path / "db")])
    assert "Search index: flat, 6 vectors, up to date\n" in text.output


def test_index_keeps_the_faiss_index_in_step(tmp_path, checkpoint):
    photos = tmp_path / "photos"
    paths = write_images(photos, 5)
    model, _ = load_model(checkpoint, towers="image")
    assert index(checkpoint, tmp_path / "db", str(photos), "-q").exit_code == 0
    store = Store.open(tmp_path / "db", model.info)
    saved, meta = load_index(index_path(store))
    assert meta["store_version"] == store.version
    assert np.array_equal(np.sort(saved.ids()), np.sort(store.ids())) and len(saved) == 5

    paths[0].unlink()
    write_images(photos, 2, start=5)
    assert index(checkpoint, tmp_path / "db", str(photos), "-q").exit_code == 0
    store = Store.open(tmp_path / "db", model.info)
    saved, meta = load_index(index_path(store))
    assert meta["store_version"] == store.version and store.count() == 6
    assert np.array_equal(np.sort(saved.ids()), np.sort(store.ids()))
    query = store.vectors_for(store.ids()[:1])
    _, found = saved.search(query, 1)
    assert found[0, 0] == store.ids()[0]


def test_strict_exit_code(tmp_path, checkpoint):
    photos = tmp_path / "photos"
    write_images(photos, 2)
    assert index(checkpoint, tmp_path / "db", str(photos), "--strict", "-q").exit_code == 0
    (photos / "empty.png").write_bytes(b"")
    assert index(checkpoint, tmp_path / "db", str(photos), "-q").exit_code == 0
    assert index(checkpoint, tmp_path / "db", str(photos), "--strict", "-q").exit_code == 1


def test_status_without_a_store(tmp_path):
    result = CliRunner().invoke(cli, ["status", "--db", str(tmp_path / "none")])
    assert result.exit_code == 1
    assert result.output == f"Error: no image store at {tmp_path / 'none'}; run `clipsearch index FOLDER` first\n"


def test_second_concurrent_index_waits_then_exits_clearly(tmp_path, checkpoint):
    photos = tmp_path / "photos"
    write_images(photos, 2)
    model, _ = load_model(checkpoint, towers="image")
    store = Store.open(tmp_path / "db", model.info, create=True)
    # Another process holds the lock, as a running `clipsearch index` would.
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; from indexer.lock import IndexLock; "
         "IndexLock(Path(sys.argv[1])).acquire(); print('locked', flush=True); time.sleep(60)",
         str(tmp_path / "db" / f"{store.table_name}.lock")],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline() == "locked\n"
        start = time.monotonic()
        result = index(checkpoint, tmp_path / "db", str(photos), "--lock-wait", "1")
        waited = time.monotonic() - start
        assert result.exit_code == 1
        assert result.output == (
            f"Error: another `clipsearch index` (pid {holder.pid}) is writing to {tmp_path / 'db'}; wait for it to "
            "finish and run this again (or pass --lock-wait SECONDS to wait longer)\n"
        )
        assert waited >= 1
        status = json.loads(CliRunner().invoke(cli, ["status", "--db", str(tmp_path / "db"), "--json"]).output)
        assert status["models"][0]["state"] == "indexing" and status["models"][0]["indexing_pid"] == holder.pid
        assert store.count() == 0
    finally:
        holder.kill()
        holder.wait()
    # the kernel dropped the dead holder's lock: the next run goes ahead
    assert IndexLock(tmp_path / "db" / f"{store.table_name}.lock").holder() is None
    assert index(checkpoint, tmp_path / "db", str(photos)).exit_code == 0 and store.count() == 2


def test_the_progress_bar_ends_with_every_file_counted(tmp_path, checkpoint):
    photos = tmp_path / "photos"
    write_images(photos, 5)
    result = index(checkpoint, tmp_path / "db", str(photos), "--batch-size", "2")
    assert result.exit_code == 0, result.output
    last = result.stderr.replace("\r", "\n").strip().splitlines()[-1]
    assert "5/5" in last and "new=5" in last, last  # the last, partial batch counted too


def test_a_failed_file_is_not_read_again_until_it_changes(tmp_path, checkpoint):
    photos, db = tmp_path / "photos", tmp_path / "db"
    write_images(photos, 2)
    broken = photos / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n but nothing after")

    def run(*args):
        result = index(checkpoint, db, str(photos), "--json", *args)
        assert result.exit_code == 0, result.output
        return json.loads(result.output)

    first = run()
    assert (first["failed"], first["failed_unchanged"]) == (1, 0)
    again = run()  # nothing changed: the broken file is not even opened
    assert (again["failed"], again["failed_unchanged"], again["unchanged"]) == (0, 1, 2)
    assert again["failures"] == []
    status = json.loads(CliRunner().invoke(cli, ["status", "--db", str(db), "--json"]).output)
    assert status["models"][0]["failures"] == [
        {"path": str(broken), "stage": "decode", "reason": "not an image Pillow can read"}
    ]  # still listed

    retried = run("--retry-failed")
    assert (retried["failed"], retried["failed_unchanged"]) == (1, 0)
    stat = broken.stat()
    os.utime(broken, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))  # touched: maybe fixed, so read it
    assert (run()["failed"], run()["failed_unchanged"]) == (1, 1)

    [image] = write_images(tmp_path, 1, start=7, ext=".png")
    os.replace(image, broken)  # now a real image under the failed name
    fixed = run()
    assert (fixed["failed"], fixed["failed_unchanged"], fixed["new"]) == (0, 0, 1)
    status = json.loads(CliRunner().invoke(cli, ["status", "--db", str(db), "--json"]).output)
    assert status["models"][0]["failures"] == [] and status["models"][0]["count"] == 3


def test_index_without_model_goes_on_with_the_stores_model(tmp_path):
    photos, db = tmp_path / "photos", tmp_path / "db"
    write_images(photos, 2)
    first = CliRunner().invoke(cli, ["index", str(photos), "--db", str(db), "--model", "shapes-mini", "-q"])
    assert first.exit_code == 0, first.output
    write_images(photos, 1, start=2)
    # No --model, no $CLIPSEARCH_MODEL, an empty cache and no network: ViT-B/32 cannot be had, shapes-mini can.
    again = CliRunner().invoke(cli, ["index", str(photos), "--db", str(db), "--json", "--workers", "0"])
    assert again.exit_code == 0, again.output
    summary = json.loads(again.output)
    assert (summary["model"], summary["new"], summary["unchanged"], summary["total"]) == ("shapes-mini", 1, 2, 3)


def test_index_with_an_unknown_model_fails_at_once_without_torch(tmp_path):
    from test_cli_basics import run_without_torch

    write_images(tmp_path / "photos", 1)
    photos = str(tmp_path / "photos")
    result = run_without_torch(tmp_path, "index", photos, "--model", "ViT-B/33", "--db", str(tmp_path / "db"))
    assert result.returncode == 1
    assert result.stderr.startswith("Error: unknown model 'ViT-B/33': not a registry name and no file or folder at")
    assert result.stderr.count("\n") == 1 and "ViT-B/32" in result.stderr  # one line, naming the choices


def test_summary_wording_for_one_image_and_for_an_empty_folder(tmp_path, checkpoint):
    photos = tmp_path / "photos"
    write_images(photos, 1)
    one = index(checkpoint, tmp_path / "db", str(photos))
    assert one.stdout.startswith("Indexed 1 image (1 new, 0 changed, 0 duplicates; 1 encoded), 0 unchanged,")
    assert f"Store: {tmp_path / 'db'} (1 image, model tiny-test)\n" in one.stdout

    (tmp_path / "empty" / "notes").mkdir(parents=True)
    (tmp_path / "empty" / "notes" / "readme.txt").write_text("no pictures here")
    empty = index(checkpoint, tmp_path / "db", str(tmp_path / "empty"))
    assert empty.exit_code == 0
    assert empty.stdout.splitlines()[1] == (
        f"No image files found in {tmp_path / 'empty'}: clipsearch indexes JPEG, PNG, WebP, GIF, BMP and TIFF files "
        "(and others Pillow reads) in these folders and their sub-folders, except hidden folders."
    )


def test_log_lines_never_land_on_the_progress_bar(tmp_path, checkpoint):
    photos = tmp_path / "photos"
    write_images(photos, 3)
    (photos / "broken.jpg").write_bytes(b"\xff\xd8 not really")
    command = [sys.executable, "-m", "clipsearch", "-v", "index", str(photos), "--model", str(checkpoint),
               "--db", str(tmp_path / "db"), "--workers", "0"]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "indexing:" in done.stderr  # the bar is drawn (stderr is not a terminal, but the bar is asked for)
    logged = [line for line in done.stderr.split("\n") if "skipping" in line]
    assert len(logged) == 1
    # tqdm's writer clears the bar ("\r   \r") before the line; a plain handler would append it to the bar
    assert logged[0].rsplit("\r", 1)[-1].startswith("INFO indexer.pipeline: skipping ")


def test_the_progress_bar_gives_no_time_left_until_it_has_settled():
    from indexer.progress import Progress

    out = io.StringIO()
    bar = Progress(total=1000, settle=64, file=out, ncols=100, mininterval=0)
    bar.start_t -= 10  # ten seconds of worker start-up before the first file
    bar.update(4)
    assert "<?" in str(bar) and "file/s" not in str(bar) and "it/s" not in str(bar)
    bar.update(96)
    shown = str(bar)
    assert "<?" not in shown and "it/s" in shown  # 100 files in ~10 s: about 1.5 minutes left
    assert re.search(r"<0[01]:[0-9][0-9],", shown), shown
    bar.close()


def test_failure_reasons_say_what_is_wrong_and_keep_pillows_message(tmp_path, checkpoint):
    photos = tmp_path / "photos"
    write_images(photos, 1)

    def decoder_error_2(e: Exception) -> bool:
        return str(e) == "decoder error -2"

    (photos / "flipped.tif").write_bytes(
        damaged(pattern(1, (256, 192)), "TIFF", decoder_error_2, compression="tiff_lzw")
    )
    jpeg = (photos / "img0000.jpg").read_bytes()
    (photos / "no-scan.jpg").write_bytes(jpeg[: jpeg.index(b"\xff\xda")] + b"\xff\xd9")  # headers, no image data
    pattern(2, (200, 150)).save(photos / "cut.png")
    (photos / "cut.png").write_bytes((photos / "cut.png").read_bytes()[:-300])
    with pytest.raises(OSError, match="cannot load this image"):
        Image.open(photos / "no-scan.jpg").load()

    result = index(checkpoint, tmp_path / "db", str(photos), "--json")

    assert result.exit_code == 0, result.output
    reasons = {f["path"]: (f["stage"], f["reason"]) for f in json.loads(result.stdout)["failures"]}
    assert reasons == {
        str(photos / "flipped.tif"): ("decode", "corrupt or truncated image data (decoder error -2)"),
        str(photos / "no-scan.jpg"): ("decode", "no image data in the file (cannot load this image)"),
        str(photos / "cut.png"): ("decode", "truncated file: the image data ends early (image file is truncated)"),
    }


def _decoder_error_2(e: Exception) -> bool:
    return str(e) == "decoder error -2"


def test_what_image_libraries_say_goes_to_the_debug_log_not_stderr(tmp_path, checkpoint):
    photos = tmp_path / "photos"
    write_images(photos, 2)
    pattern(3).save(photos / "odd-tag.tif", tiffinfo={33432: "a copyright notice longer than four bytes"})
    tiff = bytearray((photos / "odd-tag.tif").read_bytes())
    ifd = int.from_bytes(tiff[4:8], "little")
    entries = [ifd + 2 + 12 * i for i in range(int.from_bytes(tiff[ifd : ifd + 2], "little"))]
    [copyright] = [e for e in entries if int.from_bytes(tiff[e : e + 2], "little") == 33432]
    tiff[copyright + 8 : copyright + 12] = (len(tiff) - 4).to_bytes(4, "little")  # its text runs past the end
    (photos / "odd-tag.tif").write_bytes(tiff)  # Pillow warns (and skips the tag), then decodes it all right
    damaged_tiff = damaged(pattern(4, (256, 192)), "TIFF", _decoder_error_2, compression="tiff_deflate")
    (photos / "damaged.tif").write_bytes(damaged_tiff)
    load = (
        "import sys\nfrom PIL import Image\nfor p in sys.argv[1:]:\n  try: Image.open(p).load()\n  except OSError: pass"
    )
    said = subprocess.run([sys.executable, "-c", load, photos / "odd-tag.tif", photos / "damaged.tif"],
                          capture_output=True, text=True, check=True).stderr  # fmt: skip
    assert "UserWarning: Truncated File Read" in said and "ZIPDecode: Decoding error" in said  # libtiff: fd 2
    cli = [sys.executable, "-c", "from clipsearch.cli import main; main()"]

    quiet = subprocess.run([*cli, "index", photos, "--model", checkpoint, "--db", tmp_path / "db", "--workers", "1",
                            "--json"], capture_output=True, text=True)  # fmt: skip
    verbose = subprocess.run([*cli, "-vv", "index", photos, "--model", checkpoint, "--db", tmp_path / "db2",
                              "--workers", "0", "--json"], capture_output=True, text=True)  # fmt: skip

    assert quiet.returncode == 0 and verbose.returncode == 0, quiet.stderr + verbose.stderr
    assert json.loads(quiet.stdout)["indexed"] == json.loads(verbose.stdout)["indexed"] == 3
    assert quiet.stderr == ""  # the failure is in the summary, once, and nothing a library printed is here
    assert json.loads(quiet.stdout)["failures"] == [
        {"path": str(photos / "damaged.tif"), "stage": "decode",
         "reason": "corrupt or truncated image data (decoder error -2)"}
    ]  # fmt: skip
    debug = [line for line in verbose.stderr.splitlines() if line.startswith("DEBUG indexer.pipeline: ")]
    libraries = [line for line in verbose.stderr.splitlines() if "ZIPDecode" in line or "Truncated File" in line]
    assert set(libraries) <= set(debug), libraries  # never on a line of their own
    assert f"DEBUG indexer.pipeline: {photos / 'odd-tag.tif'}: UserWarning: Truncated File Read" in debug, debug
    assert any(f"{photos / 'damaged.tif'}: ZIPDecode: Decoding error" in line for line in debug), debug


def psd_bytes(image: Image.Image) -> bytes:
    """A minimal Photoshop file (Pillow reads PSD but does not write it): 8-bit RGB, raw planes, no layers."""
    width, height = image.size
    header = b"8BPS" + struct.pack(">H6xHIIHH", 1, 3, height, width, 8, 3) + struct.pack(">III", 0, 0, 0)
    return header + struct.pack(">H", 0) + b"".join(image.getchannel(band).tobytes() for band in "RGB")


def test_every_format_pillow_decodes_is_indexed_and_unreadable_ones_are_counted(tmp_path, checkpoint):
    photos = tmp_path / "photos"
    photos.mkdir()
    formats = {"a.mpo": "MPO", "b.jp2": "JPEG2000", "c.tga": "TGA", "d.ppm": "PPM", "e.ico": "ICO",
               "f.apng": "PNG", "g.jfif": "JPEG"}  # fmt: skip
    for i, (name, fmt) in enumerate(formats.items()):
        more = {"save_all": True, "append_images": [pattern(100 + i)]} if fmt in ("MPO", "PNG") else {}
        pattern(i).save(photos / name, fmt, **more)
    (photos / "h.psd").write_bytes(psd_bytes(pattern(50)))
    formats["h.psd"] = "PSD"
    for name in ("logo.svg", "icon.svg", "photo.jxl"):
        (photos / name).write_text("<not decoded>")

    result = index(checkpoint, tmp_path / "db", str(photos), "--json")
    text = index(checkpoint, tmp_path / "db", str(photos))

    assert result.exit_code == 0 and text.exit_code == 0, result.output + text.output
    summary = json.loads(result.stdout)
    assert (summary["indexed"], summary["failed"]) == (len(formats), 0), summary["failures"]
    assert summary["unsupported"] == {".jxl": 1, ".svg": 2}
    model, _ = load_model(checkpoint, towers="image")
    store = Store.open(tmp_path / "db", model.info)
    assert {Path(r["path"]).name: r["format"] for r in store.rows(store.ids())} == formats
    assert text.stdout.splitlines()[1] == (
        "3 files skipped as unsupported formats (2 .svg, 1 .jxl; install pillow-jxl-plugin for JPEG XL)"
    )


def test_decoder_workers_import_neither_torch_nor_lancedb(tmp_path, checkpoint):
    # Each worker reports the heavy modules it holds once it is ready; they would cost seconds and hundreds of MB
    # per worker, for decoding that needs only Pillow and numpy.
    photos = tmp_path / "photos"
    write_images(photos, 6)
    cli = [sys.executable, "-c", "from clipsearch.cli import main; main()"]
    done = subprocess.run([*cli, "-vv", "index", photos, "--model", checkpoint, "--db", tmp_path / "db", "--workers",
                           "2", "--json"], capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["indexed"] == 6
    ready = [line for line in done.stderr.splitlines() if line.startswith("DEBUG indexer.pool: decoder worker")]
    assert len(ready) == 2, done.stderr
    assert all(line.endswith("; heavy modules loaded: none") for line in ready), ready

"""Bad input never stops or hangs a run: every kind of broken, odd or hostile file, in one folder.

Each failure must be recorded with its path, stage and reason; every good file must be indexed.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import subprocess
import sys
from datetime import datetime

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image, ImageFile
from test_index_support import FaultyDecoder, damaged, pattern, tiny_model, vectors_by_path

from clipsearch.cli import cli
from indexer.decode import Decoder, DecodeTask
from indexer.pipeline import IndexOptions, index_folders
from retrieval.store import Store

MAX_MP = 0.5  # a low limit, so a small file can stand for a decompression bomb


def jpeg_bytes(image: Image.Image, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", **kwargs)
    return buffer.getvalue()


def make_folder(root) -> tuple[dict[str, str], dict[str, tuple[str, str]]]:
    """Good files (name -> what they are) and bad ones (name -> (stage, reason fragment))."""
    root.mkdir()
    good: dict[str, str] = {}
    bad: dict[str, tuple[str, str]] = {}

    pattern(1).save(root / "plain.jpg")
    good["plain.jpg"] = "plain"
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees
    exif[0x010F] = "Canon\x00"
    exif[0x0110] = "EOS R5"
    exif.get_ifd(0x8769)[0x9003] = "2021:07:04 18:30:05"  # DateTimeOriginal
    pattern(2, (60, 30)).save(root / "exif.jpg", exif=exif)
    good["exif.jpg"] = "EXIF-rotated, dated, with a camera"
    pattern(3).convert("CMYK").save(root / "cmyk.jpg")
    good["cmyk.jpg"] = "CMYK JPEG"
    deep = (np.asarray(pattern(4).convert("L"), dtype=np.uint16) * 257).astype(np.uint16)
    Image.fromarray(deep).save(root / "sixteen.png")
    assert Image.open(root / "sixteen.png").mode.startswith("I")
    good["sixteen.png"] = "16-bit greyscale PNG"
    palette = pattern(5).convert("P", palette=Image.Palette.ADAPTIVE, colors=8)
    palette.save(root / "palette.png", transparency=0)
    good["palette.png"] = "palette with transparency"
    frames = [pattern(6), pattern(7)]
    frames[0].save(root / "animated.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    frames[0].save(root / "animated.webp", save_all=True, append_images=frames[1:], duration=100)
    good["animated.gif"] = good["animated.webp"] = "animation (first frame)"
    pattern(8, (1600, 1200)).save(root / "huge.jpg", quality=70)
    good["huge.jpg"] = "2 MP JPEG, decoded reduced by draft under a 0.5 MP limit"
    for name in ("with space.png", "new\nline.png", os.fsdecode(b"caf\xe9.png")):
        pattern(len(good) + 20).save(root / name)
        good[name] = "odd name"

    (root / "empty.jpg").write_bytes(b"")
    bad["empty.jpg"] = ("read", "empty file (0 bytes)")
    whole = jpeg_bytes(pattern(9, (200, 150)))
    (root / "truncated.jpg").write_bytes(whole[: len(whole) // 2])
    bad["truncated.jpg"] = ("decode", "truncated")
    (root / "notes.png").write_text("this is not an image\n")
    bad["notes.png"] = ("decode", "not an image Pillow can read")
    pattern(10, (1000, 800)).save(root / "bomb.png")
    bad["bomb.png"] = ("decode", "above the 0.5 MP limit; raise --max-megapixels")
    os.symlink(root / "no-such-target.jpg", root / "broken.jpg")
    bad["broken.jpg"] = ("walk", "broken symbolic link")
    if os.geteuid() == 0:  # root reads any chmod-000 file; /proc/self/mem fails to read at offset 0 instead
        os.symlink("/proc/self/mem", root / "unreadable.jpg")
        bad["unreadable.jpg"] = ("read", "cannot read (Input/output error)")
    else:
        pattern(11).save(root / "unreadable.jpg")
        os.chmod(root / "unreadable.jpg", 0)
        bad["unreadable.jpg"] = ("read", "cannot read (Permission denied)")
    pattern(12).save(root / "vanish.jpg")
    bad["vanish.jpg"] = ("read", "the file vanished during the run")
    pattern(13).save(root / "poison.jpg")
    bad["poison.jpg"] = ("worker", "decoder worker crashed (SIGSEGV)")
    pattern(14).save(root / "hang.jpg")
    bad["hang.jpg"] = ("worker", "decoding took longer than 4 s")
    return good, bad


@pytest.fixture(scope="module")
def indexed(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bad")
    model, preprocess = tiny_model()
    root = tmp / "photos"
    good, bad = make_folder(root)
    store = Store.open(tmp / "db", model.info, create=True)
    options = IndexOptions(workers=2, batch_size=4, max_megapixels=MAX_MP, decode_timeout=4, progress=False)
    decoder = FaultyDecoder(preprocess, MAX_MP)
    summary = index_folders([root], model, preprocess, store, options, decoder=decoder)
    return {"root": root, "good": good, "bad": bad, "store": store, "summary": summary, "model": model,
            "preprocess": preprocess, "options": options, "decoder": decoder, "db": tmp / "db"}  # fmt: skip


def test_every_good_file_is_indexed(indexed):
    root, good, store = indexed["root"], indexed["good"], indexed["store"]
    stored = vectors_by_path(store)
    assert sorted(stored) == sorted(str(root / name) for name in good)
    assert all(np.isfinite(v).all() and abs(np.linalg.norm(v) - 1) < 1e-5 for v in stored.values())
    assert indexed["summary"].indexed == len(good)


def test_every_bad_file_is_recorded_with_stage_and_reason(indexed):
    root, bad, summary = indexed["root"], indexed["bad"], indexed["summary"]
    failures = {os.path.relpath(f.path, root): (f.stage, f.reason) for f in summary.failures}
    assert sorted(failures) == sorted(bad)
    for name, (stage, fragment) in bad.items():
        assert failures[name][0] == stage, name
        assert fragment in failures[name][1], (name, failures[name])
    assert summary.failed == len(bad)
    assert summary.worker_restarts == 2  # the crashed worker and the hung one were replaced
    assert sorted(f.path for f in indexed["store"].state.failures()) == sorted(str(root / n) for n in bad)


def test_metadata_of_odd_images(indexed):
    store = indexed["store"]
    by_name = {os.path.basename(r["path"]): r for r in store.rows(store.ids())}
    exif = by_name["exif.jpg"]
    assert (exif["width"], exif["height"]) == (30, 60)  # as displayed after the EXIF rotation
    assert exif["taken_at"] == datetime(2021, 7, 4, 18, 30, 5)
    assert (exif["camera_make"], exif["camera_model"]) == ("Canon", "EOS R5")
    assert (by_name["huge.jpg"]["width"], by_name["huge.jpg"]["height"]) == (1600, 1200)
    assert by_name["animated.gif"]["format"] == "GIF" and by_name["animated.webp"]["format"] == "WEBP"
    assert by_name["plain.jpg"]["taken_at"] is None and by_name["plain.jpg"]["camera_make"] is None
    assert os.path.exists(by_name[os.fsdecode(b"caf\xe9.png")]["path"])
    assert os.path.exists(by_name["new\nline.png"]["path"])


def test_first_frame_of_an_animation_is_what_gets_encoded(indexed):
    from retrieval.model.encode import encode_images

    root, store, model, preprocess = indexed["root"], indexed["store"], indexed["model"], indexed["preprocess"]
    first = preprocess(pattern(6)).unsqueeze(0)
    expected = encode_images(model, first)[0]
    stored = vectors_by_path(store)
    np.testing.assert_allclose(stored[str(root / "animated.gif")], expected, atol=2e-2)  # GIF quantises colours
    np.testing.assert_allclose(stored[str(root / "animated.webp")], expected, atol=2e-2)
    assert not np.allclose(
        stored[str(root / "animated.webp")], encode_images(model, preprocess(pattern(7))[None])[0], atol=2e-2
    )


def test_rerun_skips_unchanged_failures_and_retries_on_request(indexed):
    store, root, good, bad = indexed["store"], indexed["root"], indexed["good"], indexed["bad"]
    (root / "vanish.jpg").write_bytes(b"")  # it vanished last time; now it is back, empty
    options = dataclasses.replace(indexed["options"], workers=1)
    summary = index_folders([root], indexed["model"], indexed["preprocess"], store, options, indexed["decoder"])
    assert summary.unchanged == len(good) and summary.indexed == 0
    # read again: the file that came back, and what the walk reports each time (it has no size or mtime)
    again = {"vanish.jpg"} | {name for name, (stage, _) in bad.items() if stage == "walk"}
    assert {os.path.relpath(f.path, root) for f in summary.failures} == again
    assert summary.failed_unchanged == len(bad) - len(again)
    assert len(store.state.failures()) == len(bad)

    (root / "vanish.jpg").write_bytes(b"")  # the faulty decoder removed it again
    retried = dataclasses.replace(options, retry_failed=True)
    summary = index_folders([root], indexed["model"], indexed["preprocess"], store, retried, indexed["decoder"])
    assert summary.failed == len(bad) and summary.failed_unchanged == 0
    assert store.count() == len(good) == len(set(store.ids().tolist()))


def test_status_shows_failures(indexed):
    result = CliRunner().invoke(cli, ["status", "--db", str(indexed["db"]), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    [entry] = report["models"]
    assert entry["count"] == len(indexed["good"]) and entry["state"] == "complete"
    assert {os.path.basename(f["path"]): f["stage"] for f in entry["failures"]} == {
        name: stage for name, (stage, _) in indexed["bad"].items()
    }
    text = CliRunner().invoke(cli, ["status", "--db", str(indexed["db"])])
    assert text.exit_code == 0
    assert f"Failed files ({len(indexed['bad'])}):" in text.output
    assert f"{indexed['root'] / 'empty.jpg'}: read: empty file (0 bytes)" in text.output
    assert "State: complete" in text.output and f"Images: {len(indexed['good'])}" in text.output


# Decodes files under an address-space limit a little above what the process already maps (torch maps a lot).
_UNDER_A_MEMORY_LIMIT = """
import resource, sys
from indexer.decode import Decoder, DecodeTask
from retrieval.model.preprocess import Preprocess

decoder = Decoder(Preprocess(224))
with open("/proc/self/status") as f:
    mapped = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
limit = mapped + int(sys.argv[1]) * 2**20
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
for path in sys.argv[2:]:
    result = decoder(DecodeTask(path))
    print(type(result).__name__, tuple(result.pixels.shape) if hasattr(result, "pixels") else result, flush=True)
"""


def test_very_thin_images_decode_within_a_small_memory_limit(tmp_path):
    # 177-byte PNGs: resizing the short side to 224 px first would make a 22400000x224 image (15 GB)
    Image.new("RGB", (100_000, 1), (200, 30, 30)).save(tmp_path / "wide.png")
    Image.new("RGB", (1, 100_000), (30, 30, 200)).save(tmp_path / "tall.png")
    script = [
        sys.executable,
        "-c",
        _UNDER_A_MEMORY_LIMIT,
        "300",
        str(tmp_path / "wide.png"),
        str(tmp_path / "tall.png"),
    ]
    done = subprocess.run(script, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.splitlines() == ["Decoded (224, 224, 3)", "Decoded (224, 224, 3)"]  # uint8 crops


def test_files_pillow_cannot_fully_decode_fail_and_store_nothing(tmp_path):
    model, preprocess = tiny_model()
    root = tmp_path / "photos"
    root.mkdir()
    pattern(1).save(root / "good.png")
    names = ["flipped.png", "flipped.jpg", "flipped.webp", "flipped.gif", "flipped.tif"]
    for name, fmt, save_args in zip(names, ["PNG", "JPEG", "WEBP", "GIF", "TIFF"], [{}, {"quality": 90}, {}, {},
                                    {"compression": "tiff_lzw"}], strict=True):  # fmt: skip
        (root / name).write_bytes(damaged(pattern(2, (256, 192)), fmt, **save_args))
        with pytest.raises((OSError, SyntaxError, ValueError)):  # Pillow itself reports the damage
            Image.open(root / name).load()
    store = Store.open(tmp_path / "db", model.info, create=True)

    summary = index_folders([root], model, preprocess, store, IndexOptions(workers=0, progress=False))

    assert sorted(vectors_by_path(store)) == [str(root / "good.png")]
    failures = {os.path.basename(f.path): f for f in summary.failures}
    assert sorted(failures) == sorted(names)
    assert all(f.stage == "decode" and f.reason for f in failures.values()), failures


def test_truncated_files_fail_even_when_the_application_lets_pillow_load_them(tmp_path, monkeypatch):
    _, preprocess = tiny_model()
    for name, fmt in [("cut.png", "PNG"), ("cut.jpg", "JPEG")]:
        buffer = io.BytesIO()
        pattern(3, (200, 150)).save(buffer, fmt)
        (tmp_path / name).write_bytes(buffer.getvalue()[: len(buffer.getvalue()) * 2 // 3])
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)  # as an application might, for its own viewing

    results = [Decoder(preprocess)(DecodeTask(str(tmp_path / name))) for name in ("cut.png", "cut.jpg")]

    assert [(type(r).__name__, r.stage) for r in results] == [("Failed", "decode")] * 2, results
    assert ImageFile.LOAD_TRUNCATED_IMAGES  # left as the application set it


def test_a_plugin_raising_an_unusual_error_fails_the_file_not_the_run(tmp_path):
    # Pillow's AVIF plugin raises RuntimeError on some damage; decoding in this process (--workers 0) must survive it.
    def runtime_error(e: Exception) -> bool:
        return isinstance(e, RuntimeError)

    (tmp_path / "damaged.avif").write_bytes(damaged(pattern(4, (64, 48)), "AVIF", refused=runtime_error))
    _, preprocess = tiny_model()

    result = Decoder(preprocess)(DecodeTask(str(tmp_path / "damaged.avif")))

    assert type(result).__name__ == "Failed" and result.stage == "decode", result
    assert result.reason.startswith("corrupt or truncated image data (RuntimeError: "), result.reason

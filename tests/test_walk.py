"""The folder walk: which files count as images, what is skipped, and odd file systems."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

from indexer.formats import supported_extensions
from indexer.walk import is_image_name, walk


def touch(path, data: bytes = b"x") -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return str(path)


def found_paths(roots, **kwargs) -> list[str]:
    return [f.path for f in walk(roots, **kwargs) if f.error is None]


def test_extensions_are_case_insensitive_and_others_ignored(tmp_path):
    expected = [
        touch(tmp_path / name) for name in ("a.JPG", "b.jpeg", "c.Png", "d.webp", "e.GIF", "f.bmp", "g.TIF", "h.tiff")
    ]
    for name in ("notes.txt", "raw.cr2", "movie.mp4", "jpg", "noext"):
        touch(tmp_path / name)
    assert found_paths([tmp_path]) == expected


def test_heic_and_avif_follow_the_installed_plugins():
    from PIL import features

    assert (".avif" in supported_extensions()) == (features.check("avif") or _importable("pillow_avif"))
    assert (".heic" in supported_extensions()) == _importable("pillow_heif")


def _importable(module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        return False
    return True


def test_skips_hidden_system_and_appledouble(tmp_path):
    keep = touch(tmp_path / "photos" / "keep.jpg")
    touch(tmp_path / "photos" / ".hidden" / "x.jpg")
    touch(tmp_path / "photos" / "@eaDir" / "keep.jpg" / "SYNOPHOTO_THUMB_XL.jpg")
    touch(tmp_path / "photos" / ".git" / "y.png")
    touch(tmp_path / "photos" / "node_modules" / "pkg" / "logo.png")
    touch(tmp_path / "photos" / "._keep.jpg")
    assert found_paths([tmp_path]) == [keep]
    # a hidden folder given explicitly as a root is walked
    assert found_paths([tmp_path / "photos" / ".hidden"]) == [str(tmp_path / "photos" / ".hidden" / "x.jpg")]


def test_exclude_globs_match_names_and_relative_paths(tmp_path):
    a = touch(tmp_path / "a.jpg")
    touch(tmp_path / "a.tmp.jpg")
    touch(tmp_path / "thumbs" / "t.jpg")
    touch(tmp_path / "2020" / "raw" / "r.jpg")
    b = touch(tmp_path / "2020" / "b.jpg")
    assert found_paths([tmp_path], exclude=("*.tmp.jpg", "thumbs", "2020/raw")) == [
        a,
        b,
    ]  # files first, then subfolders


def test_symlink_loops_and_duplicate_roots_yield_each_file_once(tmp_path):
    real = touch(tmp_path / "lib" / "sub" / "p.jpg")
    os.symlink(tmp_path / "lib", tmp_path / "lib" / "sub" / "loop")  # sub/loop -> lib: a cycle
    os.symlink(tmp_path / "lib" / "sub", tmp_path / "alias")
    found = found_paths([tmp_path / "lib", tmp_path / "lib", tmp_path / "alias"])
    assert found == [real]


def test_symlinked_file_is_followed_and_broken_symlink_reported(tmp_path):
    target = touch(tmp_path / "store" / "t.png")
    (tmp_path / "photos").mkdir()
    os.symlink(target, tmp_path / "photos" / "link.png")
    os.symlink(tmp_path / "missing.jpg", tmp_path / "photos" / "broken.jpg")
    results = list(walk([tmp_path / "photos"]))
    assert [(r.path, r.error) for r in results] == [
        (str(tmp_path / "photos" / "broken.jpg"), "broken symbolic link"),
        (str(tmp_path / "photos" / "link.png"), None),
    ]
    assert results[1].size == 1


def test_fifo_named_like_an_image_is_not_opened(tmp_path):
    os.mkfifo(tmp_path / "pipe.jpg")  # reading it would block forever
    keep = touch(tmp_path / "ok.jpg")
    assert found_paths([tmp_path]) == [keep]


def test_odd_names_and_missing_root(tmp_path):
    names = ["with space.jpg", "new\nline.jpg", os.fsdecode(b"caf\xe9.jpg")]
    made = sorted(touch(tmp_path / n) for n in names)
    assert sorted(found_paths([tmp_path])) == made
    missing = list(walk([tmp_path / "nope"]))
    assert len(missing) == 1 and missing[0].error.startswith("cannot read the folder or file")


def test_a_single_file_root_and_size_mtime(tmp_path):
    path = touch(tmp_path / "one.webp", b"12345")
    os.utime(path, ns=(1_600_000_000_000_000_001, 1_600_000_000_000_000_001))
    [entry] = list(walk([path]))
    assert (entry.path, entry.size, entry.mtime_ns, entry.error) == (path, 5, 1_600_000_000_000_000_001, None)


def test_extensions_come_from_what_pillow_decodes(tmp_path):
    readable = ("a.mpo", "b.jp2", "c.psd", "d.tga", "e.ppm", "f.ico", "g.apng", "h.JFIF", "i.qoi", "j.dds")
    expected = [touch(tmp_path / name) for name in readable]
    # write-only for Pillow (PDF), rendered by Ghostscript (EPS), a video's header only (MPEG), stubs (HDF5, WMF)
    for name in ("doc.pdf", "figure.eps", "clip.mpg", "data.h5", "drawing.wmf"):
        touch(tmp_path / name)
    assert found_paths([tmp_path]) == expected


def test_image_files_nothing_decodes_are_counted_by_extension(tmp_path):
    for name in ("logo.svg", "icon.SVG", "photo.jxl", "raw.cr2", "phone.heic", "notes.txt", "movie.mp4", "._logo.svg"):
        touch(tmp_path / "photos" / name)
    touch(tmp_path / "photos" / "keep.jpg")
    counts: Counter[str] = Counter()

    found = found_paths([tmp_path], unsupported=counts)

    assert found == [str(tmp_path / "photos" / "keep.jpg")]
    expected = {".svg": 2, ".jxl": 1, ".cr2": 1} | ({} if ".heic" in supported_extensions() else {".heic": 1})
    assert counts == expected


def test_exclude_globs_match_relative_paths_of_files_deep_down(tmp_path):
    keep = touch(tmp_path / "2020" / "06" / "keep.jpg")
    touch(tmp_path / "2020" / "06" / "drop.jpg")
    touch(tmp_path / "2020" / "06" / "thumbs" / "t.jpg")
    other = touch(tmp_path / "2021" / "06" / "drop.jpg")
    assert found_paths([tmp_path], exclude=("2020/06/drop.jpg", "2020/*/thumbs/*")) == [keep, other]
    assert found_paths([tmp_path / "2020"], exclude=("06/drop.jpg",)) == [keep, str(tmp_path / "2020/06/thumbs/t.jpg")]


def test_image_names_are_told_by_the_extension_splitext_gives():
    names = ["a.jpg", "A.JPEG", "b.tar.png", ".hidden.jpg", ".jpg", "..jpg", "...png", "._a.jpg", "jpg", "a.", "a",
             "a.jpg.txt", ". .jpg", "a..jpg", "_.webp", ".._a.jpg"]  # fmt: skip
    by_splitext = [not n.startswith("._") and os.path.splitext(n)[1].lower() in supported_extensions() for n in names]
    assert [is_image_name(n) for n in names] == by_splitext
    assert by_splitext.count(True) == 8  # the list has both kinds


def _formats_in_a_new_process(*paths) -> dict:
    """`supported_extensions()` in a fresh interpreter (`paths` first on its path), and whether it imported Pillow."""
    code = (
        "import json, sys\n"
        "from indexer.formats import supported_extensions\n"
        "found = sorted(supported_extensions())\n"
        "print(json.dumps({'pillow': 'PIL' in sys.modules, 'extensions': found}))\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([*map(str, paths), *sys.path])}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_the_image_extensions_are_remembered_until_pillow_or_a_plugin_changes(tmp_path):
    expected = sorted(supported_extensions())
    first, second = _formats_in_a_new_process(), _formats_in_a_new_process()
    assert (first["pillow"], second["pillow"]) == (True, False)  # asked Pillow once, then remembered
    assert first["extensions"] == second["extensions"] == expected

    plugin = tmp_path / "plugins" / "pillow_jxl"  # a plugin installed since (one that registers nothing)
    plugin.mkdir(parents=True)
    (plugin / "__init__.py").write_text("")
    assert _formats_in_a_new_process(tmp_path / "plugins") == {"pillow": True, "extensions": expected}
    assert _formats_in_a_new_process(tmp_path / "plugins")["pillow"] is False
    assert _formats_in_a_new_process()["pillow"] is True  # and removed again

    remembered = Path(os.environ["CLIPSEARCH_CACHE"]) / "image-extensions.json"
    data = json.loads(remembered.read_text())
    remembered.write_text(json.dumps({**data, "extensions": [".jpg", 1]}))  # damaged: not trusted
    assert _formats_in_a_new_process() == {"pillow": True, "extensions": expected}
    remembered.write_text("{not json")
    assert _formats_in_a_new_process() == {"pillow": True, "extensions": expected}

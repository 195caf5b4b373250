"""A store that cannot be written: queries still answer from a read-only one, and a full disk stops `index` with
one line saying what to do, with the store intact and no temporary files left.

Tests run as root, where file modes do not stop writes, so the read-only store is a read-only bind mount and the
full disk a small tmpfs; both need mount(8) and the right to mount.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_index_support import tiny_checkpoint, write_images

from retrieval.ann import index_path
from retrieval.model.loading import load_model
from retrieval.store import Store


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("model") / "tiny")


def clipsearch(*args: str | Path) -> subprocess.CompletedProcess:
    """The CLI in a subprocess, so that its stderr holds exactly what a user would see."""
    command = [sys.executable, "-c", "from clipsearch.cli import main; main()", *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, timeout=600)


def mount(*args: str | Path) -> None:
    """Run mount(8), skipping the test when mounting is not possible here."""
    try:
        run = subprocess.run(["mount", *map(str, args)], capture_output=True, text=True)
    except FileNotFoundError:
        pytest.skip("no mount(8) here, so no read-only or full file system to test against")
    if run.returncode != 0:
        pytest.skip(f"cannot mount here ({run.stderr.strip()}); these tests need root and the right to mount")


def temporary_files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.name.endswith(".tmp")]


@pytest.fixture
def read_only(tmp_path) -> Iterator[tuple[Path, Path]]:
    """A folder and a read-only view of it (a bind mount)."""
    folder, view = tmp_path / "db", tmp_path / "db-read-only"
    folder.mkdir()
    view.mkdir()
    mount("--bind", folder, view)
    try:
        mount("-o", "remount,bind,ro", view)
        with pytest.raises(OSError):
            (view / "probe").touch()
        yield folder, view
    finally:
        subprocess.run(["umount", str(view)], check=True)


@pytest.fixture
def small_disk(tmp_path) -> Iterator[Path]:
    """A 4 MiB file system of its own."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mount("-t", "tmpfs", "-o", "size=4m", "tmpfs", disk)
    try:
        yield disk
    finally:
        subprocess.run(["umount", str(disk)], check=True)


def fill(disk: Path, leave: int = 0) -> Path:
    """Fill `disk` up, then give back `leave` bytes; returns the file that takes the space."""
    filler = disk / "filler"
    # Unbuffered: a buffered file would keep the bytes that did not fit and fail again as it closes, whenever the
    # free space is no multiple of the chunk.
    with filler.open("wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 65536)
        except OSError:
            pass
    with filler.open("r+b") as f:
        f.truncate(max(filler.stat().st_size - leave, 0))
    return filler


def stored(checkpoint: Path, db: Path) -> int:
    model, _ = load_model(checkpoint, towers="image")
    return Store.open(db, model.info).count()


def test_a_read_only_store_answers_queries_and_refuses_indexing_in_one_line(tmp_path, checkpoint, read_only):
    folder, view = read_only
    photos = tmp_path / "photos"
    write_images(photos, 6)
    assert clipsearch("index", photos, "--db", folder, "--model", checkpoint, "--workers", "0", "-q").returncode == 0
    model, _ = load_model(checkpoint, towers="image")
    index_path(Store.open(folder, model.info)).unlink()  # so a query has to build the search index, and save it
    files = sorted(p.name for p in folder.iterdir())

    query = clipsearch("query", "anything", "--db", view, "--model", checkpoint, "-n", "6")
    assert query.returncode == 0, query.stderr
    assert len(query.stdout.splitlines()) == 1 + 6  # the header and every image
    (warning,) = query.stderr.splitlines()
    assert f"could not save the search index in {view} (Read-only file system)" in warning
    assert "until the directory is writable" in warning

    more = tmp_path / "more"
    write_images(more, 2, start=10)
    index = clipsearch("index", more, "--db", view, "--model", checkpoint, "--workers", "0", "-q")
    assert index.returncode == 1
    assert index.stderr.splitlines() == [
        f"Error: cannot write to the store at {view} (Read-only file system); mount it read-write (or use another "
        "--db), then run the same command again to carry on"
    ]
    assert sorted(p.name for p in folder.iterdir()) == files and stored(checkpoint, folder) == 6


def test_a_full_disk_stops_indexing_in_one_line_and_the_store_carries_on_once_freed(tmp_path, checkpoint, small_disk):
    db = small_disk / "db"
    photos = tmp_path / "photos"
    write_images(photos, 20)
    assert clipsearch("index", photos, "--db", db, "--model", checkpoint, "--workers", "0", "-q").returncode == 0
    write_images(photos, 280, start=20)
    filler = fill(small_disk, leave=64 * 1024)  # room for a few commits, not for all

    index = clipsearch("index", photos, "--db", db, "--model", checkpoint, "--commit-every", "16", "-q")
    assert index.returncode == 1
    assert index.stderr.splitlines() == [
        f"Error: cannot write to the store at {db} (No space left on device); free some space on its disk, then "
        "run the same command again to carry on"
    ]
    assert temporary_files(small_disk) == []
    saved = stored(checkpoint, db)
    assert 20 <= saved < 300

    fill(small_disk)  # whatever the failed run gave back
    model, _ = load_model(checkpoint, towers="image")
    index_path(Store.open(db, model.info)).unlink()  # so the query has to write a new search index
    query = clipsearch("query", "anything", "--db", db, "--model", checkpoint, "-n", "3")
    assert query.returncode == 0, query.stderr
    assert len(query.stdout.splitlines()) == 1 + 3
    (warning,) = query.stderr.splitlines()
    assert "could not save the search index" in warning and "(No space left on device)" in warning
    assert temporary_files(small_disk) == []

    filler.unlink()
    again = clipsearch("index", photos, "--db", db, "--model", checkpoint, "-q")
    assert again.returncode == 0, again.stderr
    assert f"{saved} unchanged" in again.stdout  # what the full disk let through was kept, and is not redone
    query = clipsearch("query", "anything", "--db", db, "--model", checkpoint, "-n", "3")
    assert query.returncode == 0 and query.stderr == "" and len(query.stdout.splitlines()) == 1 + 3
    assert stored(checkpoint, db) == 300 and temporary_files(small_disk) == []

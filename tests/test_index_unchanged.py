"""An unchanged re-run of `clipsearch index` plans against the catalogue copy beside the table and finishes
without torch, LanceDB, the model or workers; a copy that does not match the table is never trusted."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
from click.testing import CliRunner
from test_cli_basics import run_without
from test_index_support import pattern, write_images

from clipsearch.cli import cli
from retrieval.catalog import catalog_path, load_catalog
from retrieval.model.loading import load_model

MODEL = "shapes-mini"
# What differs between two runs doing the same: their timing.
TIMING = ("seconds", "stage_seconds", "files_per_second")


def index(photos, db, *args: str) -> dict:
    """A full-blown `clipsearch index --json` in this process (torch is loaded here anyway)."""
    result = CliRunner().invoke(cli, ["index", str(photos), "--db", str(db), "--model", MODEL, "--json", *args])
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def table(db) -> str:
    return load_model(MODEL, device="cpu", towers="image")[0].info.table_name


def untimed(summary: dict) -> dict:
    return {k: v for k, v in summary.items() if k not in TIMING}


def test_an_unchanged_rerun_imports_neither_torch_nor_lancedb_and_says_the_same(tmp_path):
    photos, db = tmp_path / "photos", tmp_path / "db"
    write_images(photos, 5)
    (photos / "broken.jpg").write_bytes(b"\xff\xd8 not an image")
    os.symlink(tmp_path / "nowhere.jpg", photos / "dangling.jpg")
    first = index(photos, db, "--workers", "0")
    assert (first["indexed"], first["failed"]) == (5, 2)
    assert load_catalog(db, table(db)) is not None  # written by the full run

    fast = run_without(
        tmp_path, ("torch", "lancedb"), "index", str(photos), "--db", str(db), "--model", MODEL, "--json"
    )
    assert fast.returncode == 0, fast.stderr
    shutil.rmtree(tmp_path / "no-torch-lancedb")
    catalog_path(db, table(db)).unlink()  # the same run again, the full way
    full = index(photos, db, "--workers", "0")

    quick = json.loads(fast.stdout)
    assert untimed(quick) == untimed(full)
    assert (quick["unchanged"], quick["indexed"], quick["failed"], quick["failed_unchanged"], quick["total"]) == (
        5, 0, 1, 1, 5,
    )  # fmt: skip  # the dangling link fails in every walk; the broken file was skipped as failed before
    runs = json.loads((db / f"{table(db)}.state.json").read_text())["runs"]
    assert [run["state"] for run in runs] == ["complete"] * 3
    assert untimed({k: runs[1][k] for k in quick if k in runs[1]}) == untimed(
        {k: runs[2][k] for k in quick if k in runs[2]}
    )
    text = run_without(tmp_path, ("torch", "lancedb"), "index", str(photos), "--db", str(db), "--model", MODEL)
    assert text.returncode == 0, text.stderr
    lines = text.stdout.splitlines()
    assert lines[0].startswith("Indexed 0 images (0 new, 0 changed, 0 duplicates; 0 encoded), 5 unchanged, 0 moved, ")
    assert lines[-1] == f"Store: {db} (5 images, model {MODEL})"


def test_new_changed_and_removed_files_take_the_full_run(tmp_path):
    photos, db = tmp_path / "photos", tmp_path / "db"
    paths = write_images(photos, 4)
    index(photos, db, "--workers", "0")
    write_images(photos, 1, start=10)
    pattern(20).save(paths[0])
    os.utime(paths[0], ns=(1, 1))
    paths[1].unlink()
    summary = index(photos, db, "--workers", "0")
    assert (summary["new"], summary["changed"], summary["removed"], summary["unchanged"]) == (1, 1, 1, 2)
    assert index(photos, db, "--workers", "0")["unchanged"] == 4


def test_a_tampered_catalogue_is_not_trusted(tmp_path):
    photos, db = tmp_path / "photos", tmp_path / "db"
    paths = write_images(photos, 3)
    index(photos, db, "--workers", "0")
    pattern(30).save(paths[0])  # changed on disk; then the copy is edited to say it is as stored
    copy = catalog_path(db, table(db))
    with np.load(copy) as data:
        arrays = {name: data[name] for name in data.files}
    row = [bytes(p) for p in np.split(arrays["paths"], arrays["offsets"][1:-1])].index(os.fsencode(paths[0]))
    stat = paths[0].stat()
    arrays["sizes"][row], arrays["mtimes_ns"][row] = stat.st_size, stat.st_mtime_ns
    with copy.open("wb") as f:
        np.savez(f, **arrays)
    assert load_catalog(db, table(db)) is None
    summary = index(photos, db, "--workers", "0")
    assert (summary["changed"], summary["unchanged"]) == (1, 2)

    copy.write_bytes(b"PK\x03\x04 not a zip at all")
    assert load_catalog(db, table(db)) is None
    assert index(photos, db, "--workers", "0")["unchanged"] == 3


def test_a_run_killed_before_it_rewrote_the_catalogue_leaves_a_copy_that_is_not_trusted(tmp_path):
    # The copy left behind says photo 0 is as it was before the killed run; the photo is then restored to exactly
    # that (bytes and mtime), while the table holds the vector of the version the killed run committed. Trusting
    # the copy would skip the photo and keep the wrong vector.
    photos, db = tmp_path / "photos", tmp_path / "db"
    paths = write_images(photos, 3)
    index(photos, db, "--workers", "0")
    original, stat = paths[0].read_bytes(), paths[0].stat()
    pattern(40).save(paths[0])
    kill_before_copy = (
        "import os, signal, sys\n"
        "import indexer.pipeline\n"
        "indexer.pipeline.save_catalog = lambda *args, **kwargs: os.kill(os.getpid(), signal.SIGKILL)\n"
        "from clipsearch.cli import main\n"
        "sys.argv = ['clipsearch', *sys.argv[1:]]\n"
        "main()\n"
    )
    args = ["index", str(photos), "--db", str(db), "--model", MODEL, "--workers", "0", "--json"]
    killed = subprocess.run([sys.executable, "-c", kill_before_copy, *args], capture_output=True, timeout=600)
    assert killed.returncode == -9
    paths[0].write_bytes(original)
    os.utime(paths[0], ns=(stat.st_atime_ns, stat.st_mtime_ns))

    assert load_catalog(db, table(db)) is None
    summary = index(photos, db, "--workers", "0")
    assert (summary["changed"], summary["unchanged"], summary["encoded"]) == (1, 2, 1)
    assert index(photos, db, "--workers", "0")["unchanged"] == 3

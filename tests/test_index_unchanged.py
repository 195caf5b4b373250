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
from retrieval.catalog import Catalog, catalog_model, catalog_path, load_catalog, save_catalog, table_fingerprint
from retrieval.model.loading import load_model

MODEL = "shapes-mini"
# What differs between two runs doing the same: their timing.
TIMING = ("seconds", "stage_seconds", "files_per_second")
DIGEST = 64  # the copy ends with the hex SHA-256 of the rest
# What an unchanged run has no use for: each would cost start-up time (numpy alone ~0.1 s).
HEAVY = ("numpy", "PIL", "pyarrow", "lancedb", "lance", "torch", "onnxruntime", "tqdm", "multiprocessing")


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


def loaded_by(*args: str) -> tuple[subprocess.CompletedProcess, list[str]]:
    """`clipsearch ARGS` in a fresh process, and which of the HEAVY packages it had imported when it exited."""
    code = (
        "import atexit, json, sys\n"
        f"heavy = {HEAVY!r}\n"
        "report = lambda: print('LOADED', json.dumps([m for m in heavy if m in sys.modules]), file=sys.stderr)\n"
        "atexit.register(report)\n"
        "from clipsearch.cli import main\n"
        "sys.argv = ['clipsearch', *sys.argv[1:]]\n"
        "main()\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, timeout=300)
    [line] = [line for line in done.stderr.splitlines() if line.startswith("LOADED ")]
    return done, json.loads(line.removeprefix("LOADED "))


def test_an_unchanged_rerun_imports_nothing_it_does_not_need(tmp_path):
    photos, db = tmp_path / "photos", tmp_path / "db"
    write_images(photos, 3)
    index(photos, db, "--workers", "0")
    args = ("index", str(photos), "--db", str(db), "--model", MODEL, "--json")
    loaded_by(*args)  # the image extensions are remembered in the cache dir by the first process that needs them
    done, loaded = loaded_by(*args)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["unchanged"] == 3
    assert loaded == []
    write_images(photos, 1, start=10)  # a new file: the full run, whose imports the check does see
    full, loaded = loaded_by(*args, "--workers", "0")
    assert full.returncode == 0 and json.loads(full.stdout)["new"] == 1, full.stderr
    assert {"numpy", "PIL", "lancedb"} <= set(loaded)


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
    model, catalog = load_catalog(db, table(db))
    row = catalog.paths.index(os.fsencode(paths[0]))
    stat = paths[0].stat()
    catalog.sizes[row], catalog.mtimes_ns[row] = stat.st_size, stat.st_mtime_ns
    header = copy.read_bytes().split(b"\n", 2)[1]
    (tmp_path / "edited").mkdir()
    save_catalog(tmp_path / "edited", table(db), json.loads(header)["fingerprint"], model, catalog)
    edited = catalog_path(tmp_path / "edited", table(db)).read_bytes()
    copy.write_bytes(edited[:-DIGEST] + copy.read_bytes()[-DIGEST:])  # the edit, under the digest of before
    assert load_catalog(db, table(db)) is None
    summary = index(photos, db, "--workers", "0")
    assert (summary["changed"], summary["unchanged"]) == (1, 2)

    copy.write_bytes(b"PK\x03\x04 not a catalogue at all")
    assert load_catalog(db, table(db)) is None
    assert index(photos, db, "--workers", "0")["unchanged"] == 3
    copy.write_bytes(copy.read_bytes()[:-1])  # cut short
    assert load_catalog(db, table(db)) is None


def test_the_catalogue_copy_gives_back_what_was_saved(tmp_path):
    (tmp_path / "images_t.lance" / "_versions").mkdir(parents=True)
    (tmp_path / "images_t.lance" / "_versions" / "1.manifest").write_bytes(b"v1")
    fingerprint = table_fingerprint(tmp_path / "images_t.lance")
    model = load_model(MODEL, device="cpu", towers="image")[0].info
    paths = [b"/p/a.jpg", b"/p/caf\xe9 \n.jpg", b"", "/p/\u00e9t\u00e9.png".encode()]
    rows = Catalog(  # as `Store.catalog()` reads them: numpy columns
        ids=np.array([3, 1, 2**40, 7], np.int64),
        paths=paths,
        sizes=np.array([0, 1, 2**33, 5], np.int64),
        mtimes_ns=np.array([-1, 1_600_000_000_000_000_001, 0, 2**62], np.int64),
        hashes=["ab" * 32, "cd" * 32, "", "ef" * 32],
    )
    save_catalog(tmp_path, "images_t", fingerprint, model, rows)
    loaded_model, loaded = load_catalog(tmp_path, "images_t")
    assert loaded_model == model == catalog_model(tmp_path, "images_t")
    assert [list(column) for column in loaded] == [list(column) for column in rows]

    save_catalog(tmp_path, "images_t", fingerprint, model, Catalog(np.zeros(0, np.int64), [], [], [], []))
    assert [list(column) for column in load_catalog(tmp_path, "images_t")[1]] == [[]] * 5

    save_catalog(tmp_path, "images_t", fingerprint, model, rows._replace(paths=[b"/p/a\0b.jpg", *paths[1:]]))
    assert load_catalog(tmp_path, "images_t") is None  # no file has such a name; it must not shift the rows
    save_catalog(tmp_path, "images_t", fingerprint, model, rows)
    (tmp_path / "images_t.lance" / "_versions" / "2.manifest").write_bytes(b"v2")  # a commit since
    assert load_catalog(tmp_path, "images_t") is None


def test_an_earlier_versions_catalogue_copy_is_replaced(tmp_path):
    photos, db = tmp_path / "photos", tmp_path / "db"
    write_images(photos, 2)
    index(photos, db, "--workers", "0")
    legacy = db / f"{table(db)}.catalog.npz"  # what an earlier version left: it is never read
    legacy.write_bytes(b"PK\x03\x04")
    catalog_path(db, table(db)).unlink()
    assert index(photos, db, "--workers", "0")["unchanged"] == 2  # the full run, which writes the copy
    assert load_catalog(db, table(db)) is not None and not legacy.exists()


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

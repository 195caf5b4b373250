"""`clipsearch index` on a CPU with a fresh ONNX export of the model runs it without importing torch or loading the
weights (issue 14), storing what a run that loads the model stores; a stale export is never run: the model is
loaded and exported again."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import weakref
from pathlib import Path

import numpy as np
import pytest
from test_index_support import write_images

from clipsearch.library import Library
from retrieval.model.export_files import identity_from_exports
from retrieval.model.identity import ModelInfo
from retrieval.model.loading import load_model
from retrieval.model.onnx_runtime import MODEL_FILE, find_export
from retrieval.store import Store


@pytest.fixture(autouse=True)
def _own_exports(tmp_path, monkeypatch):
    """Each test starts without exports, so the first run here makes the one the next runs find."""
    monkeypatch.setenv("CLIPSEARCH_EXPORTS", str(tmp_path / "exports"))


def index(tmp_path: Path, model: Path, db: str, blocked: bool = False) -> subprocess.CompletedProcess:
    """`clipsearch index photos --db DB --model MODEL --json` in a fresh process, with `import torch` made to fail
    when `blocked`."""
    paths = [str(Path(__file__).resolve().parents[1]), *sys.path]
    if blocked:
        folder = tmp_path / "no-torch" / "torch"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "__init__.py").write_text("raise ImportError('this index run must not import torch')\n")
        paths.insert(0, str(folder.parent))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}
    command = [sys.executable, "-c", "from clipsearch.cli import main; main()", "index", str(tmp_path / "photos"),
               "--db", str(tmp_path / db), "--model", str(model), "--device", "cpu", "--workers", "0",
               "--json"]  # fmt: skip
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)


def vectors_by_name(db: Path) -> tuple[ModelInfo, str, dict[str, np.ndarray]]:
    """(the identity the store records, its table, {file name: vector})."""
    (stored,) = Store.models(db)
    store = Store.open(db, stored.model)
    ids = store.ids()
    names = {int(r["id"]): Path(r["path"]).name for r in store.rows(ids, columns=["id", "path"])}
    return stored.model, stored.table_name, {names[int(i)]: v for i, v in zip(ids, store.vectors_for(ids), strict=True)}


def reference(tmp_path: Path, model: Path) -> tuple[ModelInfo, str, dict[str, np.ndarray]]:
    """What a run with the model loaded in torch stores for the photos (its encoder chosen by `choose_encoder`)."""
    loaded = load_model(model, device="cpu", towers="image")[0]
    assert Library(db=tmp_path / "loaded", model=loaded, device="cpu").index(tmp_path / "photos", workers=0).indexed
    return vectors_by_name(tmp_path / "loaded")


def assert_same_store(got: tuple, want: tuple) -> None:
    """Same identity, same table, vectors equal within 1e-6 for the same files."""
    assert got[0] == want[0] and got[1] == want[1]
    assert sorted(got[2]) == sorted(want[2])
    for name, vector in want[2].items():
        np.testing.assert_allclose(got[2][name], vector, atol=1e-6, rtol=0)


def test_a_run_with_a_fresh_export_needs_no_torch_and_stores_what_a_loaded_model_stores(tmp_path, tiny):
    write_images(tmp_path / "photos", 5)
    first = index(tmp_path, tiny, "db")
    assert first.returncode == 0, first.stderr
    info = load_model(tiny, device="cpu", towers="image")[0].info
    assert find_export(info, towers="image") is not None  # the first run exported the image tower
    write_images(tmp_path / "photos", 4, start=5)  # new files: the second run really encodes
    second = index(tmp_path, tiny, "db", blocked=True)
    assert second.returncode == 0, second.stderr
    assert json.loads(second.stdout)["indexed"] == 4
    assert_same_store(vectors_by_name(tmp_path / "db"), reference(tmp_path, tiny))


def test_a_stale_export_is_never_run_the_model_is_loaded_and_exported_again(tmp_path, tiny):
    write_images(tmp_path / "photos", 3)
    assert index(tmp_path, tiny, "db").returncode == 0
    info = load_model(tiny, device="cpu", towers="image")[0].info
    onnx = find_export(info, towers="image") / "image" / MODEL_FILE
    with onnx.open("ab") as f:  # a changed file: it no longer matches its record
        f.write(b"\0")
    write_images(tmp_path / "photos", 3, start=3)
    without_torch = index(tmp_path, tiny, "db", blocked=True)
    assert without_torch.returncode != 0
    assert "this index run must not import torch" in without_torch.stderr  # it went for torch, not the stale file
    with_torch = index(tmp_path, tiny, "db")
    assert with_torch.returncode == 0, with_torch.stderr
    assert json.loads(with_torch.stdout)["indexed"] == 3
    assert find_export(info, towers="image") is not None  # exported afresh
    assert_same_store(vectors_by_name(tmp_path / "db"), reference(tmp_path, tiny))


def test_exports_recording_two_spaces_for_the_same_weights_are_not_guessed_between(tmp_path, tiny):
    model = load_model(tiny, device="cpu", towers="image")[0]
    assert identity_from_exports((model.info.name, model.info.weights_sha256)) is None  # nothing exported yet
    write_images(tmp_path / "photos", 2)
    assert index(tmp_path, tiny, "db").returncode == 0
    known = identity_from_exports(("renamed", model.info.weights_sha256))
    assert known == ModelInfo.from_dict({**model.info.to_dict(), "name": "renamed"})
    # The same weights exported with other preprocessing (a checkpoint folder whose config was changed): which
    # one `load_model` would give cannot be told without loading it.
    other = ModelInfo.from_dict({**model.info.to_dict(), "mean": [0.5, 0.5, 0.5]})
    folder = find_export(model.info, towers="image")
    twin = folder.parent / folder.name.replace(folder.name.split("-")[1], "0" * 16) / "image"
    twin.mkdir(parents=True)
    record = json.loads((folder / "image" / "export.json").read_text())
    (twin / "export.json").write_text(json.dumps({**record, "identity": other.to_dict()}))
    assert identity_from_exports((model.info.name, model.info.weights_sha256)) is None


def test_an_export_is_read_once_to_hash_it_and_not_again_when_found(tiny, monkeypatch):
    """The 350 MB of ViT-B/32's export were hashed twice when made (in staging, again under the final path)."""
    from retrieval.model.onnx_export import ensure_export

    reads: list[str] = []
    real_open = Path.open

    def counting_open(self, mode="r", *args, **kwargs):  # passes through: only counts binary reads of an export
        if self.name == MODEL_FILE and "r" in mode and "b" in mode:
            reads.append(str(self))
        return real_open(self, mode, *args, **kwargs)

    model = load_model(tiny, device="cpu", towers="image")[0]
    monkeypatch.setattr(Path, "open", counting_open)
    ensure_export(model, towers="image")
    assert len(reads) == 1, reads
    assert find_export(model.info, towers="image") is not None
    assert len(reads) == 1, reads


def test_a_run_that_exports_lets_go_of_the_torch_model_before_it_encodes(tmp_path, tiny):
    """The first run (no export yet) loads the model to export it; it then encodes in ONNX Runtime alone."""
    from click.testing import CliRunner

    from clipsearch.cli import cli

    loaded = weakref.ref(load_model(tiny, device="cpu", towers="image")[0])  # what the run gets from the loader
    write_images(tmp_path / "photos", 2)
    args = ["index", str(tmp_path / "photos"), "--db", str(tmp_path / "db"), "--model", str(tiny), "--device", "cpu"]
    done = CliRunner().invoke(cli, [*args, "--workers", "0", "-q"])
    assert done.exit_code == 0, done.output
    assert find_export(load_model(tiny, device="cpu", towers="image")[0].info, towers="image") is not None
    assert loaded() is None  # freed: neither the run nor the loader's cache holds it

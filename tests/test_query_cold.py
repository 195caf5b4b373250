"""A one-shot text query runs without torch and ONNX Runtime (CLIP's or MobileCLIP2's text tower in numpy, from a
fresh export of the store's model; else its ONNX export) and, when the saved index is current, without LanceDB; it
gives the torch path's results, and never uses a stale export."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from test_index_support import write_images

from clipsearch.cli import cli
from clipsearch.library import Library
from retrieval.model.checkpoint import save_checkpoint
from retrieval.model.config import TextConfig
from retrieval.model.family import build_towers
from retrieval.model.loading import load_model
from retrieval.model.numpy_text import TOWER, WEIGHTS_FILE, find_numpy_text
from retrieval.model.onnx_export import ensure_export
from retrieval.model.onnx_runtime import MODEL_FILE, find_export

MODEL = "shapes-mini"
# The reduced MobileCLIP2-S0 of tests/test_mobileclip.py, whose image tower the MobileCLIP2 store is indexed with.
MOBILECLIP = Path(__file__).resolve().parent / "data" / "families" / "mobileclip2-s0-tiny"
BLOCKED = ("torch", "lancedb", "onnxruntime", "pyarrow")
# The query forms served from the saved index and the numpy text tower alone (no torch, ONNX Runtime or LanceDB).
FAST_FORMS = [
    ["a red circle"],
    ["a blue square", "--plain", "-n", "3"],
    ["a green triangle", "-f"],
    ["a red circle", "-0", "-t", "4"],
    ["a red circle", "--threshold", "0.05", "--show-weak"],
    ["a large blue circle", "--ensemble", "-n", "5"],
    ["2:a red circle", "+", "a blue square", "-", "green"],
    ["a red circle", "--index", "flat"],
]
# Forms that read the store (metadata, filters) but still encode without torch.
STORE_FORMS = [["a red circle", "--json"], ["a blue square", "--json", "--where", "width >= 0", "-n", "4"]]


@pytest.fixture(autouse=True)
def _exports_in_each_cache(monkeypatch):
    """Each cache here holds its own exports (or none): undo conftest's session-wide exports folder."""
    monkeypatch.delenv("CLIPSEARCH_EXPORTS", raising=False)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A store of 12 images indexed with shapes-mini, the text tower's ONNX export in `cache`, and a cache in which
    no export can be found or made (`torch-cache`: its `onnx` is a file), so a query there runs in torch."""
    root = tmp_path_factory.mktemp("cold")
    (root / "torch-cache").mkdir()
    (root / "torch-cache" / "onnx").write_text("not a folder")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CLIPSEARCH_CACHE", str(root / "cache"))
        patch.delenv("CLIPSEARCH_EXPORTS", raising=False)  # the exports live in each cache (conftest shares one)
        write_images(root / "photos", 12)
        done = CliRunner().invoke(cli, ["index", str(root / "photos"), "--db", str(root / "db"), "--model", MODEL,
                                        "--workers", "0", "-q"])  # fmt: skip
        assert done.exit_code == 0, done.output
        ensure_export(load_model(MODEL, device="cpu", towers="text")[0])
    return root


@pytest.fixture(scope="module")
def mobileclip_store(tmp_path_factory):
    """As `store`, indexed with a MobileCLIP2 checkpoint (`model`): the reduced S0's image tower and a random 2-layer
    text tower over CLIP's whole vocabulary, so real queries tokenize."""
    root = tmp_path_factory.mktemp("cold-mobileclip")
    (root / "torch-cache").mkdir()
    (root / "torch-cache" / "onnx").write_text("not a folder")
    fixture = load_model(MOBILECLIP, device="cpu", towers="image")[0]
    torch.manual_seed(0)
    model = build_towers(dataclasses.replace(fixture.config, text=TextConfig(width=64, heads=2, layers=2))).eval()
    model.visual.load_state_dict(fixture.visual.state_dict())
    save_checkpoint(model, root / "model", name="tiny-mobileclip")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CLIPSEARCH_CACHE", str(root / "cache"))
        patch.delenv("CLIPSEARCH_EXPORTS", raising=False)
        write_images(root / "photos", 12)
        done = CliRunner().invoke(cli, ["index", str(root / "photos"), "--db", str(root / "db"), "--model",
                                        str(root / "model"), "--workers", "0", "-q"])  # fmt: skip
        assert done.exit_code == 0, done.output
        ensure_export(load_model(root / "model", device="cpu", towers="text")[0])
    return root


def clipsearch(
    store: Path, args: list[str], cache: str = "cache", blocked: tuple[str, ...] = ()
) -> subprocess.CompletedProcess:
    """`clipsearch query ARGS` in a fresh process, with the packages in `blocked` made to fail on import."""
    paths = [str(Path(__file__).resolve().parents[1]), *sys.path]
    if blocked:
        folder = store / ("no-" + "-".join(blocked))
        for name in blocked:
            (folder / name).mkdir(parents=True, exist_ok=True)
            (folder / name / "__init__.py").write_text(f"raise ImportError('a cold query must not import {name}')\n")
        paths.insert(0, str(folder))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths), "CLIPSEARCH_CACHE": str(store / cache)}
    env.pop("CLIPSEARCH_MODEL", None)
    env.pop("CLIPSEARCH_EXPORTS", None)  # each cache holds its own exports (or none)
    command = [sys.executable, "-c", "from clipsearch.cli import main; main()", "query", "--db", str(store / "db")]
    return subprocess.run([*command, *args], capture_output=True, text=True, env=env, timeout=600)


@pytest.mark.parametrize("args", FAST_FORMS, ids=lambda a: " ".join(a))
def test_the_fast_forms_need_no_torch_onnxruntime_or_lancedb_and_print_what_torch_prints(store, args):
    fast = clipsearch(store, args, blocked=BLOCKED)
    assert fast.returncode == 0, fast.stderr
    slow = clipsearch(store, args, cache="torch-cache")
    assert slow.returncode == 0, slow.stderr
    assert fast.stdout == slow.stdout and fast.stdout
    assert fast.stderr == slow.stderr


@pytest.mark.parametrize("args", STORE_FORMS, ids=lambda a: " ".join(a))
def test_json_and_filters_open_the_store_but_not_torch(store, args):
    fast = clipsearch(store, args, blocked=("torch",))
    assert fast.returncode == 0, fast.stderr
    slow = clipsearch(store, args, cache="torch-cache")
    assert slow.returncode == 0, slow.stderr
    fast_rows, slow_rows = ([json.loads(line) for line in out.stdout.splitlines()] for out in (fast, slow))
    assert [r["path"] for r in fast_rows] == [r["path"] for r in slow_rows] and fast_rows
    for a, b in zip(fast_rows, slow_rows, strict=True):
        assert abs(a.pop("score") - b.pop("score")) <= 1e-4
        assert a == b


@pytest.mark.parametrize(
    "query",
    ["a red circle", [(2.0, "a red circle"), (1.0, "a blue square"), (-1.0, "green")], "a small green triangle"],
)
@pytest.mark.parametrize("ensemble", [False, True])
def test_onnx_ranks_and_scores_match_torch_within_1e_4(store, monkeypatch, query, ensemble):
    monkeypatch.setenv("CLIPSEARCH_CACHE", str(store / "cache"))
    onnx = Library(db=store / "db", model=MODEL, text_precision="float32")
    given = load_model(MODEL, device="cpu", towers="text")[0]  # a model passed in runs in torch, as it is
    torch_model = Library(db=store / "db", model=given, text_precision="float32")
    for metadata in (False, True):  # from the saved index alone, and through the store
        got = onnx.search(query, k=12, ensemble=ensemble, metadata=metadata)
        want = torch_model.search(query, k=12, ensemble=ensemble, metadata=metadata)
        assert onnx._onnx_text is not None and torch_model._onnx_text is None  # each took the path it stands for
        assert [r.path for r in got] == [r.path for r in want]
        np.testing.assert_allclose([r.score for r in got], [r.score for r in want], atol=1e-4, rtol=0)


def _corrupt(path: Path) -> None:
    """Change a file after it was exported and checked."""
    with path.open("ab") as f:
        f.write(b"\0")


def test_a_stale_export_is_never_used(store, tmp_path):
    stale = tmp_path / "stale-cache"
    subprocess.run(["cp", "-r", str(store / "cache"), str(stale)], check=True)
    model_info = load_model(MODEL, device="cpu", towers="text")[0].info
    _corrupt(next(stale.glob(f"onnx/*/text/{MODEL_FILE}")))
    _corrupt(next(stale.glob(f"onnx/*/{TOWER}/{WEIGHTS_FILE}")))
    without_torch = clipsearch(store, ["a red circle"], cache=str(stale), blocked=("torch", "lancedb"))
    assert without_torch.returncode != 0
    assert "a cold query must not import torch" in without_torch.stderr  # it went for torch, not the stale files

    again = clipsearch(store, ["a red circle"], cache=str(stale))
    assert again.returncode == 0, again.stderr
    assert again.stdout == clipsearch(store, ["a red circle"], blocked=BLOCKED).stdout
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CLIPSEARCH_CACHE", str(stale))
        assert find_export(model_info, towers="text") is not None  # the torch run exported it afresh
        assert find_numpy_text(model_info) is not None


def test_without_a_fresh_numpy_tower_the_onnx_export_serves_the_query(store, tmp_path):
    stale = tmp_path / "stale-cache"
    subprocess.run(["cp", "-r", str(store / "cache"), str(stale)], check=True)
    _corrupt(next(stale.glob(f"onnx/*/{TOWER}/{WEIGHTS_FILE}")))
    without_numpy = clipsearch(store, ["a red circle"], cache=str(stale), blocked=("torch", "lancedb"))
    assert without_numpy.returncode == 0, without_numpy.stderr
    assert without_numpy.stdout == clipsearch(store, ["a red circle"], cache="torch-cache").stdout
    without_onnxruntime = clipsearch(store, ["a red circle"], cache=str(stale), blocked=BLOCKED)
    assert "a cold query must not import onnxruntime" in without_onnxruntime.stderr  # the ONNX export served it


def test_status_needs_no_torch(store):
    from test_cli_basics import run_without

    done = run_without(store, ("torch",), "status", "--db", str(store / "db"))
    assert done.returncode == 0, done.stderr
    assert "Images: 12" in done.stdout and "State: complete" in done.stdout


@pytest.mark.parametrize("args", [["a red circle"], ["a blue square", "--json", "-n", "8"], ["a green triangle", "-f"]])
def test_a_mobileclip_store_is_queried_without_torch_or_onnxruntime_as_torch_queries_it(mobileclip_store, args):
    args = [*args, "--model", str(mobileclip_store / "model")]
    fast = clipsearch(mobileclip_store, args, blocked=("torch", "onnxruntime"))
    assert fast.returncode == 0, fast.stderr
    slow = clipsearch(mobileclip_store, args, cache="torch-cache")
    assert slow.returncode == 0, slow.stderr
    if "--json" not in args:
        assert fast.stdout == slow.stdout and fast.stdout
        return
    fast_rows, slow_rows = ([json.loads(line) for line in out.stdout.splitlines()] for out in (fast, slow))
    assert [r["path"] for r in fast_rows] == [r["path"] for r in slow_rows] and len(fast_rows) == 8
    for a, b in zip(fast_rows, slow_rows, strict=True):
        assert abs(a.pop("score") - b.pop("score")) <= 1e-4
        assert a == b

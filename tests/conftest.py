"""Every test is offline and keeps its data and cache dirs inside its own tmp_path."""

from __future__ import annotations

import pytest
import torch

from retrieval.model.checkpoint import save_checkpoint
from retrieval.model.clip import CLIP
from retrieval.model.config import PRESETS


@pytest.fixture(scope="session")
def _shared_exports(tmp_path_factory):
    """ONNX exports, shared by the session's tests: keyed by model identity, so each test model is exported once."""
    return tmp_path_factory.mktemp("onnx-exports")


@pytest.fixture(autouse=True)
def _isolated_dirs(tmp_path, monkeypatch, _shared_exports):
    monkeypatch.setenv("CLIPSEARCH_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("CLIPSEARCH_EXPORTS", str(_shared_exports))
    monkeypatch.setenv("CLIPSEARCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("CLIPSEARCH_MODEL", raising=False)
    # The default model comes from the hub: a test that reaches for it by mistake fails at once, downloads nothing.
    monkeypatch.setenv("CLIPSEARCH_HUB_URL", "http://127.0.0.1:9")  # the discard port: nothing listens
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random CLIP (seed 0) saved in our format; returns its folder, usable as --model."""
    torch.manual_seed(0)
    return save_checkpoint(CLIP(PRESETS["tiny-vit"]).eval(), tmp_path_factory.mktemp("ckpt") / "tiny", name="tiny")


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    """Keep each phase's report on the test item (`item.report_call`), so a fixture's teardown can tell whether the
    test failed (the browser tests then save a screenshot)."""
    report = yield
    setattr(item, f"report_{report.when}", report)
    return report

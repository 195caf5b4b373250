"""Every test is offline and keeps its data and cache dirs inside its own tmp_path."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _isolated_dirs(tmp_path, monkeypatch):
    monkeypatch.setenv("CLIPSEARCH_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("CLIPSEARCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("CLIPSEARCH_MODEL", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")

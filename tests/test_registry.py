"""The default model: issue 13's rule over the registry's figures, used for new stores only; a store keeps going
with the model that filled it."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from test_index_support import write_images

from clipsearch.cli import cli
from retrieval.model import registry
from retrieval.model.registry import DEFAULT_MODEL, ModelSpec, available_models, get_spec, register_model


def test_the_default_is_the_most_accurate_model_that_encodes_images_no_slower_than_vit_b32():
    measured = [get_spec(name) for name in available_models() if get_spec(name).speed_vs_vit_b32 is not None]
    assert {"ViT-B/32", "MobileCLIP2-S0", "MobileCLIP2-S2", "ViT-B-32-SigLIP2-256"} <= {s.name for s in measured}
    assert get_spec("ViT-B/32").speed_vs_vit_b32 == 1.0
    eligible = [s for s in measured if s.speed_vs_vit_b32 >= 1.0 and s.flickr_t2i_r1 is not None]
    assert DEFAULT_MODEL == max(eligible, key=lambda s: s.flickr_t2i_r1).name
    spec = get_spec(DEFAULT_MODEL)
    assert spec.flickr_t2i_r1 > get_spec("ViT-B/32").flickr_t2i_r1 and not spec.bundled


def test_default_model_name_follows_the_environment(monkeypatch):
    assert registry.default_model_name() == DEFAULT_MODEL
    monkeypatch.setenv("CLIPSEARCH_MODEL", "ViT-B/32")
    assert registry.default_model_name() == "ViT-B/32"


@pytest.fixture
def stand_in_vit_b32(monkeypatch, tiny):
    """ "ViT-B/32" served by a tiny checkpoint: OpenAI's download cannot be had offline, and what is under test is
    which name `index` picks and records, not the weights."""
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    register_model(ModelSpec("ViT-B/32", "a stand-in for the test", path=tiny))
    monkeypatch.setenv("CLIPSEARCH_HUB_URL", "http://127.0.0.1:9")  # the discard port: no hub, no download


def test_a_store_filled_by_vit_b32_keeps_it_and_a_new_store_takes_the_new_default(tmp_path, stand_in_vit_b32):
    photos, old, new = tmp_path / "photos", tmp_path / "old", tmp_path / "new"
    write_images(photos, 2)
    runner = CliRunner()
    first = runner.invoke(
        cli, ["index", str(photos), "--db", str(old), "--model", "ViT-B/32", "--json", "--workers", "0"]
    )
    assert first.exit_code == 0, first.output
    write_images(photos, 1, start=2)

    again = runner.invoke(cli, ["index", str(photos), "--db", str(old), "--json", "--workers", "0"])  # no --model
    assert again.exit_code == 0, again.output
    summary = json.loads(again.output)
    assert (summary["model"], summary["new"], summary["unchanged"], summary["total"]) == ("ViT-B/32", 1, 2, 3)
    status = json.loads(runner.invoke(cli, ["status", "--db", str(old), "--json"]).output)
    assert [(m["model"]["name"], m["count"]) for m in status["models"]] == [("ViT-B/32", 3)]

    fresh = runner.invoke(cli, ["index", str(photos), "--db", str(new), "--json", "--workers", "0"])
    assert fresh.exit_code == 1
    message = fresh.stderr
    assert message.count("\n") == 1 and message.startswith("Error: ")
    assert f"{DEFAULT_MODEL!r}" in message and get_spec(DEFAULT_MODEL).hub_repo in message  # what to fetch
    assert not list(new.glob("images_*"))  # nothing was written for a model that could not load

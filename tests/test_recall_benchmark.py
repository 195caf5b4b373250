"""The recall@k benchmark: its recall computation on planted embeddings (a perfect model gives 1.0, an
unrelated one about k/N, several captions per image), and a small end-to-end run through the real indexer,
LanceDB store, FAISS index and query path with a tiny model."""

from __future__ import annotations

import json
from datetime import datetime, timezone

import numpy as np
import pytest

from benchmarks import recall_at_k as bench
from clipsearch.api import embed_images
from retrieval import shapes
from retrieval.ann import AnnIndex, open_index
from retrieval.datasets import read_captioned
from retrieval.metrics import recall_at_k
from retrieval.model.encode import encode_texts
from retrieval.model.identity import ModelInfo
from retrieval.model.loading import load_model
from retrieval.model.preprocess import CLIP_MEAN, CLIP_STD
from retrieval.query import search
from retrieval.store import ImageRow, Store
from retrieval.types import ImageMetadata

DIM = 32
KS = (1, 5, 10)


def _unit(x):
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def _faiss_hits(images, captions, k=10):
    """Ranked hits of every caption from a real exact FAISS index keyed by ids 100.. (not positions)."""
    ids = np.arange(100, 100 + len(images), dtype=np.int64)
    scores, hits = AnnIndex.build(ids, images, kind="flat").search(captions, k)
    return scores, hits, ids


def _planted(n_images, per_image, noise, seed=0):
    rng = np.random.default_rng(seed)
    images = _unit(rng.normal(size=(n_images, DIM)))
    owner = np.repeat(np.arange(n_images), per_image)
    captions = _unit(images[owner] + noise * rng.normal(size=(len(owner), DIM)))
    return images, captions, owner


def test_a_perfect_model_scores_one_both_ways():
    images, captions, owner = _planted(300, 3, noise=0.02)
    scores, hits, ids = _faiss_hits(images, captions)
    assert bench.text_to_image_recall(scores, hits, ids[owner]) == {1: 1.0, 5: 1.0, 10: 1.0}
    assert bench.image_to_text_recall(images, captions, owner) == {1: 1.0, 5: 1.0, 10: 1.0}


def test_an_unrelated_model_scores_about_k_over_n():
    n, per_image = 200, 5
    rng = np.random.default_rng(1)
    images = _unit(rng.normal(size=(n, DIM)))
    owner = np.repeat(np.arange(n), per_image)
    captions = _unit(rng.normal(size=(len(owner), DIM)))  # knows nothing about the images
    scores, hits, ids = _faiss_hits(images, captions)
    t2i = bench.text_to_image_recall(scores, hits, ids[owner])
    m = len(owner)
    for k in KS:  # 1,000 independent queries: 4 binomial standard deviations
        assert t2i[k] == pytest.approx(k / n, abs=4 * np.sqrt(k / n * (1 - k / n) / m) + 1e-3)
    i2t = bench.image_to_text_recall(images, captions, owner)
    for k in KS:  # any of 5 captions among M in the top k
        p = 1 - np.prod([(m - per_image - j) / (m - j) for j in range(k)])
        assert i2t[k] == pytest.approx(p, abs=4 * np.sqrt(p * (1 - p) / n) + 1e-3)


def test_several_captions_per_image_are_counted_per_direction():
    rng = np.random.default_rng(2)
    n = 100
    images = _unit(rng.normal(size=(n, DIM)))
    # caption 3i is the image itself, captions 3i+1 and 3i+2 are unrelated
    owner = np.repeat(np.arange(n), 3)
    captions = _unit(rng.normal(size=(3 * n, DIM)))
    captions[0::3] = images
    scores, hits, ids = _faiss_hits(images, captions)
    t2i = bench.text_to_image_recall(scores, hits, ids[owner])
    assert t2i[1] == pytest.approx(1 / 3, abs=0.03)  # only the exact third is found first
    assert bench.image_to_text_recall(images, captions, owner) == {1: 1.0, 5: 1.0, 10: 1.0}  # any caption counts
    # an image the indexer could not read is a miss both ways
    missing = ids[owner].copy()
    missing[owner == 0] = -1
    found = (hits == ids[owner][:, None]).any(axis=1)  # [M] own image among the 10 hits
    assert bench.text_to_image_recall(scores, hits, missing)[10] == pytest.approx((found & (owner != 0)).mean())
    indexed = np.arange(n) != 0
    assert bench.image_to_text_recall(images, captions, owner, indexed=indexed)[1] == pytest.approx(1 - 1 / n)


def test_image_to_text_chunks_agree_with_one_matrix(monkeypatch):
    images, captions, owner = _planted(70, 2, noise=0.9, seed=3)
    monkeypatch.setattr(bench, "IMAGE_TO_TEXT_CHUNK", 16)
    chunked = bench.image_to_text_recall(images, captions, owner)
    mask = owner[None, :] == np.arange(70)[:, None]
    assert chunked == pytest.approx(recall_at_k(images @ captions.T, mask, ks=KS), abs=1e-12)


def test_ranked_search_through_a_real_store_and_faiss_index(tmp_path):
    images, captions, owner = _planted(120, 2, noise=0.3, seed=4)
    info = ModelInfo("planted", "0" * 64, DIM, 32, CLIP_MEAN, CLIP_STD)
    store = Store.open(tmp_path / "db", info, create=True)
    now = datetime.now(timezone.utc)
    ids = store.allocate_ids(len(images))
    rows = [
        ImageRow(
            int(i), str(tmp_path / f"{j}.png"), 1, 0, ImageMetadata(f"{j:064x}", 8, 8, "PNG", None, None, None), now, v
        )  # fmt: skip
        for j, (i, v) in enumerate(zip(ids, images, strict=True))
    ]
    store.apply(rows)
    index = open_index(store, kind="flat")
    scores, hits, times = bench.ranked_search(lambda v: search(store, index, v, k=10), captions, 10)
    assert len(times) == len(captions)
    got = bench.text_to_image_recall(scores, hits, ids[owner])
    expected = recall_at_k(captions @ images.T, owner, ks=KS)  # an independent exact computation
    assert got == pytest.approx(expected, abs=1e-12)
    assert 0.2 < got[1] < 1.0  # noisy captions: neither trivial nor hopeless


# ---- end to end with a tiny model ----------------------------------------------------------------


@pytest.fixture(scope="module")
def gallery(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gallery")
    shapes.generate(folder, 16, seed=21, size_range=(32, 96))
    return folder / "manifest.jsonl"


def test_the_benchmark_matches_a_direct_computation(tiny, gallery):
    model, preprocess = load_model(tiny)
    dataset = read_captioned(gallery)
    result = bench.run(dataset, model, "flat", "a photo of {}", workers=0, progress=False, name="gallery")

    image_vectors = embed_images(dataset.images, (model, preprocess))
    caption_vectors = encode_texts(model, [f"a photo of {c}" for c in dataset.captions])
    similarity = caption_vectors @ image_vectors.T  # [M, N]
    assert result.text_to_image == pytest.approx(recall_at_k(similarity, dataset.caption_image, ks=KS), abs=1e-9)
    assert result.image_to_text == pytest.approx(recall_at_k(similarity.T, dataset.image_captions(), ks=KS), abs=1e-9)
    assert (result.images, result.captions, result.failed, result.index) == (16, 16, 0, "flat")
    assert set(result.seconds) == {"index", "encode_captions", "search", "image_to_text"}


def test_main_prints_a_table_one_json_line_and_a_plot(tiny, gallery, tmp_path, capsys):
    png = tmp_path / "recall.png"
    args = [str(gallery), "--model", str(tiny), "--index", "hnsw", "--limit", "10", "--workers", "0"]
    assert bench.main([*args, "--plot", str(png)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[1].split() == ["R@1", "R@5", "R@10"]
    assert out[2].startswith("text->image") and out[3].startswith("image->text")
    assert out[4].startswith("text->image (oracle)")
    summary = json.loads(out[-1])
    assert summary["benchmark"] == "recall_at_k"
    assert (summary["images"], summary["captions"], summary["index"], summary["model"]) == (10, 10, "hnsw", "tiny")
    oracle = shapes.oracle_recall(shapes.read_manifest(gallery)[:10])
    assert summary["oracle_text_to_image"] == {f"R@{k}": round(oracle[k], 4) for k in KS}
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    assert bench.main([*args, "--json"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["text_to_image"].keys() == {"R@1", "R@5", "R@10"}


def test_shapes_mini_recall_on_a_held_out_gallery(tmp_path):
    shapes.generate(tmp_path / "heldout", 100, seed=777, size_range=(64, 160))  # a seed shapes-mini never saw
    model, _ = load_model("shapes-mini")
    result = bench.run(read_captioned(tmp_path / "heldout" / "manifest.jsonl"), model, workers=0, progress=False)
    assert result.text_to_image[1] >= 0.5 and result.text_to_image[10] >= 0.9
    assert result.image_to_text[1] >= 0.5 and result.image_to_text[10] >= 0.9

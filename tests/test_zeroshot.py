"""Zero-shot classification: the ensembled classifier, softmax over 100 x cosine, top-k accuracy, and the
`clipsearch classify` / `clipsearch tag` commands on real files, a real LanceDB store and a tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from clipsearch.cli import cli
from clipsearch.library import Library
from retrieval import shapes
from retrieval.errors import QueryError
from retrieval.model.encode import encode_images, encode_texts
from retrieval.model.loading import load_model
from retrieval.model.preprocess import Preprocess
from retrieval.query import IMAGENET_TEMPLATES
from retrieval.store import Store
from retrieval.zeroshot import (
    DEFAULT_TEMPLATES,
    LOGIT_SCALE,
    build_classifier,
    parse_labels,
    read_labels_file,
    top_k_accuracy,
)

DIM = 16


def _unit(x):
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


class PlantedEncoder:
    """A text encoder with a fixed random unit vector per prompt; records what it was asked."""

    def __init__(self, seed=0):
        self.rng = np.random.default_rng(seed)
        self.table: dict[str, np.ndarray] = {}
        self.calls: list[list[str]] = []

    def __call__(self, texts):
        self.calls.append(list(texts))
        for text in texts:
            if text not in self.table:
                self.table[text] = _unit(self.rng.normal(size=DIM))
        return np.stack([self.table[t] for t in texts])


def test_class_vectors_are_the_renormalised_mean_over_templates():
    encoder = PlantedEncoder()
    templates = ("a photo of a {}.", "a drawing of a {}.", "{}")
    classifier = build_classifier(["cat", "dog"], encoder, templates)
    assert len(encoder.calls) == 1  # every prompt in one batch
    assert encoder.calls[0] == ["a photo of a cat.", "a drawing of a cat.", "cat", "a photo of a dog.",
                                "a drawing of a dog.", "dog"]  # fmt: skip
    for row, label in zip(classifier.weights, ["cat", "dog"], strict=True):
        expected = _unit(np.mean([encoder.table[t.format(label)] for t in templates], axis=0))
        np.testing.assert_allclose(row, expected, atol=1e-6)
    assert classifier.labels == ("cat", "dog")
    assert classifier.templates == templates


def test_default_templates_are_clips_eighty():
    assert DEFAULT_TEMPLATES == IMAGENET_TEMPLATES and len(DEFAULT_TEMPLATES) == 80
    encoder = PlantedEncoder()
    build_classifier(["cat"], encoder)
    assert len(encoder.calls[0]) == 80 and encoder.calls[0][0] == "a bad photo of a cat."


def test_probabilities_are_a_softmax_over_100_times_cosine():
    encoder = PlantedEncoder(1)
    classifier = build_classifier(["a", "b", "c", "d"], encoder, ("{}",))
    images = _unit(np.random.default_rng(2).normal(size=(5, DIM)))
    probabilities = classifier.probabilities(images)
    reference = torch.softmax(LOGIT_SCALE * torch.from_numpy(images @ classifier.weights.T).double(), dim=1)
    np.testing.assert_allclose(probabilities, reference.numpy(), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)

    top = classifier.predict(images, top=2)
    for row, predicted in zip(probabilities, top, strict=True):
        order = np.argsort(-row)[:2]
        assert [p.label for p in predicted] == [classifier.labels[i] for i in order]
        assert [p.probability for p in predicted] == pytest.approx(row[order].tolist())


def test_top_k_accuracy_on_planted_images():
    encoder = PlantedEncoder(3)
    labels = [f"class{i}" for i in range(10)]
    classifier = build_classifier(labels, encoder, ("{}",))
    rng = np.random.default_rng(4)
    targets = rng.integers(0, 10, size=2000)
    near = _unit(classifier.weights[targets] + 0.05 * rng.normal(size=(2000, DIM)))
    assert top_k_accuracy(classifier, near, targets) == {1: 1.0, 5: 1.0}
    unrelated = _unit(rng.normal(size=(2000, DIM)))
    chance = top_k_accuracy(classifier, unrelated, targets)
    assert chance[1] == pytest.approx(0.1, abs=0.03)
    assert chance[5] == pytest.approx(0.5, abs=0.05)
    # with fewer than five classes, top-5 is not reported
    assert set(top_k_accuracy(build_classifier(["x", "y"], encoder, ("{}",)), near[:5], [0, 1, 0, 1, 0])) == {1}


def test_labels_parsing_and_template_checks(tmp_path):
    assert parse_labels(" cat, dog ,,car ") == ["cat", "dog", "car"]
    with pytest.raises(QueryError, match="no labels"):
        parse_labels(" , ")
    with pytest.raises(QueryError, match=r"\['dog'\] given more than once"):
        parse_labels("dog,cat,dog")
    path = tmp_path / "labels.txt"
    path.write_text("# animals\ncat\n\n golden retriever \n", encoding="utf-8")
    assert read_labels_file(path) == ["cat", "golden retriever"]
    encoder = PlantedEncoder()
    for bad in ("a photo", "{} and {}", "a {0} {}", "{x} {}"):
        with pytest.raises(QueryError, match="one {}"):
            build_classifier(["cat"], encoder, (bad,))


# ---- with a real (tiny, random) model ------------------------------------------------------------


@pytest.fixture(scope="module")
def gallery(tmp_path_factory):
    """Twelve generated captioned images in a folder."""
    folder = tmp_path_factory.mktemp("gallery")
    shapes.generate(folder, 12, seed=11, size_range=(32, 96))
    return folder


def _expected(model, folder_or_paths, labels, templates):
    """Probabilities computed directly from the model, for comparison with the commands."""
    classifier = build_classifier(labels, lambda t: encode_texts(model, t), templates)
    preprocess = Preprocess.from_config(model.config)
    paths = folder_or_paths
    vectors = encode_images(model, torch.stack([preprocess(p) for p in paths]))
    return classifier, classifier.probabilities(vectors)


def test_classify_command_prints_top_labels_with_probabilities(tiny, gallery):
    model, _ = load_model(tiny)
    labels = ["red", "green", "blue", "yellow"]
    templates = ("a photo of a {} circle", "a {} square")
    paths = sorted(p for p in gallery.iterdir() if p.suffix != ".jsonl")
    args = ["classify", str(gallery), "--labels", ",".join(labels), "--model", str(tiny), "--top", "2"]
    args += [a for t in templates for a in ("--template", t)]

    result = CliRunner().invoke(cli, [*args, "--json"])
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["path"] for r in records] == [str(p) for p in paths]
    _, probabilities = _expected(model, paths, labels, templates)
    for record, row in zip(records, probabilities, strict=True):
        order = np.argsort(-row)[:2]
        assert [x["label"] for x in record["labels"]] == [labels[i] for i in order]
        assert [x["probability"] for x in record["labels"]] == pytest.approx(row[order].tolist(), abs=1e-5)

    table = CliRunner().invoke(cli, args)
    assert table.exit_code == 0, table.output
    first = table.stdout.splitlines()[0].split()
    assert first[0] == str(paths[0])
    assert first[1] == records[0]["labels"][0]["label"]
    assert float(first[2]) == pytest.approx(records[0]["labels"][0]["probability"], abs=1e-3)
    assert len(table.stdout.splitlines()) == len(paths)


def test_classify_reports_unreadable_files_and_goes_on(tiny, gallery, tmp_path):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    good = sorted(gallery.glob("*.jpg"))[0]
    result = CliRunner().invoke(cli, ["classify", str(broken), str(good), "--labels", "a,b", "--model", str(tiny)])
    assert result.exit_code == 0
    assert str(good) in result.stdout and str(broken) not in result.stdout
    assert f"{broken}: skipped:" in result.stderr
    only_broken = CliRunner().invoke(cli, ["classify", str(broken), "--labels", "a,b", "--model", str(tiny)])
    assert only_broken.exit_code == 1


def test_classify_names_each_failure_once_and_has_max_megapixels(tiny, tmp_path):
    big, broken = tmp_path / "big.png", tmp_path / "broken.jpg"
    Image.new("RGB", (1000, 1000), "red").save(big)  # 1 MP
    broken.write_bytes(b"not a jpeg")
    args = ["classify", str(big), str(broken), "--labels", "a,b", "--model", str(tiny)]
    refused = CliRunner().invoke(cli, [*args, "--max-megapixels", "0.5"])
    assert (refused.exit_code, refused.stdout) == (1, "")
    assert refused.stderr == (
        f"{big}: skipped: 1000x1000 is 1 MP, above the 0.5 MP limit; raise --max-megapixels to read it\n"
        f"{broken}: skipped: not an image Pillow can read\n"
    )
    as_json = CliRunner().invoke(cli, [*args, "--max-megapixels", "0.5", "--json"])
    assert [json.loads(line) for line in as_json.stderr.splitlines()] == [
        {"path": str(big), "error": "1000x1000 is 1 MP, above the 0.5 MP limit; raise --max-megapixels to read it"},
        {"path": str(broken), "error": "not an image Pillow can read"},
    ]
    accepted = CliRunner().invoke(cli, args)  # the default limit is 100 MP, as for `clipsearch index`
    assert accepted.exit_code == 0 and accepted.stdout.split()[0] == str(big)
    assert accepted.stderr == f"{broken}: skipped: not an image Pillow can read\n"
    zero = CliRunner().invoke(cli, [*args, "--max-megapixels", "0"])
    assert zero.exit_code == 2
    assert zero.output.splitlines()[-1] == "Error: Invalid value for '--max-megapixels': 0.0 is not in the range x>0."


def test_classify_label_options_conflict(tiny, gallery, tmp_path):
    labels_file = tmp_path / "labels.txt"
    labels_file.write_text("cat\ndog\n", encoding="utf-8")
    image = str(sorted(gallery.glob("*.jpg"))[0])
    both = CliRunner().invoke(cli, ["classify", image, "--labels", "a,b", "--labels-file", str(labels_file)])
    assert both.exit_code == 2 and "either --labels or --labels-file" in both.output
    neither = CliRunner().invoke(cli, ["classify", image])
    assert neither.exit_code == 2 and "--labels" in neither.output
    from_file = CliRunner().invoke(cli, ["classify", image, "--labels-file", str(labels_file), "--model", str(tiny)])
    assert from_file.exit_code == 0, from_file.output
    assert from_file.stdout.split()[1] in ("cat", "dog")


def test_tag_writes_filterable_labels_from_stored_vectors(tiny, gallery, tmp_path):
    db = tmp_path / "db"
    indexed = CliRunner().invoke(cli, ["index", str(gallery), "--db", str(db), "--model", str(tiny), "--workers", "0"])
    assert indexed.exit_code == 0, indexed.output
    colours, kinds = ["red", "green", "blue"], ["circle", "square"]
    result = CliRunner().invoke(
        cli,
        ["tag", "--labels", ",".join(colours), "--labels", ",".join(kinds), "--template", "a {} thing",
         "--db", str(db), "--model", str(tiny), "--json"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["tagged"] == 12

    model, _ = load_model(tiny)
    store = Store.open(db, model.info)
    ids, vectors = store.all_vectors()
    expected = {}
    for i, vector in zip(ids, vectors, strict=True):
        groups = [build_classifier(g, lambda t: encode_texts(model, t), ("a {} thing",)) for g in (colours, kinds)]
        expected[int(i)] = ",".join(c.predict(vector[None], 1)[0][0].label for c in groups)
    stored = {row["id"]: row["labels"] for row in store.rows(ids, columns=["id", "labels"])}
    assert stored == expected
    reds = {i for i, v in expected.items() if v.startswith("red,")}
    assert set(store.filter_ids("labels LIKE 'red,%'").tolist()) == reds
    hits = Library(db=db, model=str(tiny)).search("a shape", k=12, where="labels LIKE 'red,%'")
    assert {h.metadata["id"] for h in hits} == reds


def test_tag_refuses_bad_columns_and_conflicting_options(tiny, gallery, tmp_path):
    db = tmp_path / "db"
    CliRunner().invoke(cli, ["index", str(gallery), "--db", str(db), "--model", str(tiny), "--workers", "0"])
    own = CliRunner().invoke(cli, ["tag", "--labels", "a,b", "--column", "path", "--db", str(db), "--model", str(tiny)])
    assert own.exit_code == 1 and "cannot write column 'path'" in own.output
    labels_file = tmp_path / "l.txt"
    labels_file.write_text("a\nb\n", encoding="utf-8")
    both = CliRunner().invoke(cli, ["tag", "--labels", "a,b", "--labels-file", str(labels_file), "--db", str(db)])
    assert both.exit_code == 2
    empty = CliRunner().invoke(cli, ["tag", "--labels", "a,b", "--db", str(tmp_path / "none"), "--model", str(tiny)])
    assert empty.exit_code == 1 and "no image store" in empty.output


def test_indexing_after_tagging_keeps_working(tiny, gallery, tmp_path):
    db = tmp_path / "db"
    folder = tmp_path / "photos"
    folder.mkdir()
    first = sorted(p for p in gallery.iterdir() if p.suffix != ".jsonl")
    for p in first[:6]:
        (folder / p.name).write_bytes(p.read_bytes())
    run = ["index", str(folder), "--db", str(db), "--model", str(tiny), "--workers", "0"]
    assert CliRunner().invoke(cli, run).exit_code == 0
    tagged = CliRunner().invoke(cli, ["tag", "--labels", "a,b", "--db", str(db), "--model", str(tiny)])
    assert tagged.exit_code == 0, tagged.output
    for p in first[6:]:
        (folder / p.name).write_bytes(p.read_bytes())
    again = CliRunner().invoke(cli, run)
    assert again.exit_code == 0, again.output
    model, _ = load_model(tiny)
    store = Store.open(db, model.info)
    assert store.count() == 12
    labels = [row["labels"] for row in store.rows(store.ids(), columns=["labels"])]
    assert sum(v is not None for v in labels) == 6  # the earlier images keep theirs; new ones wait for a re-tag


def test_zero_shot_benchmark_matches_a_direct_computation(tiny, tmp_path, capsys):
    from benchmarks import zero_shot

    model, preprocess = load_model(tiny)
    folder = tmp_path / "colours"
    shapes.class_folders(folder, "colour", 3, seed=5, size_range=(32, 64))
    results = zero_shot.run_folder(model, preprocess, folder, ["shapes-colour", "plain"], progress=False)
    assert [(r.templates, r.classes, r.images) for r in results] == [("shapes-colour", 8, 24), ("plain", 8, 24)]

    paths = sorted(p for p in folder.rglob("*") if p.suffix in (".jpg", ".png", ".webp"))
    targets = np.array([list(shapes.COLOURS).index(p.parent.name) for p in paths])
    _, probabilities = _expected(model, paths, list(shapes.COLOURS), zero_shot.TEMPLATE_SETS["shapes-colour"])
    ranks = (probabilities > probabilities[np.arange(len(paths)), targets][:, None]).sum(axis=1)
    assert results[0].top1 == pytest.approx(np.mean(ranks < 1), abs=1e-4)
    assert results[0].top5 == pytest.approx(np.mean(ranks < 5), abs=1e-4)

    assert zero_shot.main(["--model", str(tiny), "--generated", "shape", "--n-per-class", "2", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["benchmark"] == "zero_shot"
    assert [(r["dataset"], r["templates"], r["images"]) for r in summary["results"]] == [
        ("generated shapes", "shapes-shape", 16)
    ]


# ---- with the bundled shapes-mini ------------------------------------------------------------------

HELD_OUT_SEED = 777  # never used to train shapes-mini (see its model card)


def test_shapes_mini_classifies_colours_zero_shot(tmp_path):
    folder = tmp_path / "colours"
    shapes.class_folders(folder, "colour", 5, seed=HELD_OUT_SEED, size_range=(64, 160))
    result = CliRunner().invoke(
        cli, ["classify", str(folder), "--labels", ",".join(shapes.COLOURS), "--model", "shapes-mini", "--json"]
    )
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(records) == 40
    correct = [r["labels"][0]["label"] == r["path"].split("/")[-2] for r in records]
    assert np.mean(correct) >= 0.9


def test_shapes_mini_tags_a_store_by_colour(tmp_path):
    gallery = tmp_path / "gallery"
    samples = shapes.generate(gallery, 40, seed=HELD_OUT_SEED, size_range=(64, 160))
    db = tmp_path / "db"
    run = ["index", str(gallery), "--db", str(db), "--model", "shapes-mini", "--workers", "0", "--json"]
    assert CliRunner().invoke(cli, run).exit_code == 0
    tagged = CliRunner().invoke(cli, ["tag", "--labels", ",".join(shapes.COLOURS), "--db", str(db)])
    assert tagged.exit_code == 0, tagged.output  # the store's only model is found without --model

    library = Library(db=db, model="shapes-mini")
    colour_of = {str(s.path): s.attributes.colour for s in samples if s.attributes.second is None}
    agree = []
    for colour in ("red", "blue", "yellow"):
        for hit in library.search(f"a {colour} shape", k=40, where=f"labels = '{colour}'"):
            if hit.path in colour_of:
                agree.append(colour_of[hit.path] == colour)
    assert len(agree) >= 8 and np.mean(agree) >= 0.9


# ---- SigLIP: independent sigmoid probabilities --------------------------------------------------------------

SIGLIP_FIXTURE = Path(__file__).resolve().parent / "data" / "families" / "siglip2-b32-tiny"


def test_sigmoid_probabilities_are_independent_per_label():
    encoder = PlantedEncoder()
    softmax = build_classifier(["cat", "dog", "car"], encoder, ("{}",))
    sigmoid = build_classifier(["cat", "dog", "car"], encoder, ("{}",), logit_scale=12.0, logit_bias=-3.0)
    images = _unit(np.random.default_rng(1).normal(size=(4, DIM)))
    cosines = images @ sigmoid.weights.T
    expected = 1 / (1 + np.exp(-(12.0 * cosines - 3.0)))
    assert (softmax.scoring, sigmoid.scoring) == ("softmax", "sigmoid")
    assert np.allclose(sigmoid.probabilities(images), expected, atol=1e-6)
    # One label's probability does not depend on which other labels are asked about.
    alone = build_classifier(["dog"], encoder, ("{}",), logit_scale=12.0, logit_bias=-3.0)
    assert np.allclose(alone.probabilities(images)[:, 0], expected[:, 1], atol=1e-6)
    assert np.isfinite(sigmoid.probabilities(images * 1e4)).all()  # no overflow for huge logits


def test_classify_with_siglip_prints_sigmoid_probabilities_with_the_models_scale_and_bias(gallery):
    from safetensors import safe_open

    with safe_open(str(SIGLIP_FIXTURE / "open_clip_model.safetensors"), framework="pt") as f:
        scale, bias = f.get_tensor("logit_scale").float().exp().item(), f.get_tensor("logit_bias").float().item()
    model, preprocess = load_model(SIGLIP_FIXTURE)
    labels = ["red", "green", "blue"]
    paths = sorted(p for p in gallery.iterdir() if p.suffix != ".jsonl")
    texts = encode_texts(model, labels)
    images = encode_images(model, torch.stack([preprocess(p) for p in paths]))
    expected = torch.sigmoid(torch.from_numpy(scale * images @ texts.T + bias)).numpy()

    args = ["classify", str(gallery), "--labels", ",".join(labels), "--template", "{}", "--model", str(SIGLIP_FIXTURE)]
    result = CliRunner().invoke(cli, [*args, "--top", "3", "--json"])
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["path"] for r in records] == [str(p) for p in paths]
    for record, row in zip(records, expected, strict=True):
        assert record["scoring"] == "sigmoid"
        got = {x["label"]: x["probability"] for x in record["labels"]}
        assert [got[label] for label in labels] == pytest.approx(row.tolist(), abs=2e-6)
    assert not np.allclose(expected.sum(axis=1), 1.0, atol=0.01)  # not a softmax

    table = CliRunner().invoke(cli, args)
    assert table.exit_code == 0, table.output
    assert f"sigmoid({scale:.2f} x cosine {bias:+.2f})" in table.stderr
    assert "independent per label" in table.stderr


def test_classify_with_clip_still_says_softmax(tiny, gallery):
    result = CliRunner().invoke(cli, ["classify", str(gallery), "--labels", "a,b", "--model", str(tiny), "--json"])
    assert result.exit_code == 0, result.output
    assert {json.loads(line)["scoring"] for line in result.stdout.splitlines()} == {"softmax"}
    table = CliRunner().invoke(cli, ["classify", str(gallery), "--labels", "a,b", "--model", str(tiny)])
    assert "sigmoid" not in table.stderr

"""Personal concepts (issue 16): the linear probe and CoOp over stored vectors, `@name` in queries, the concept
table, `clipsearch learn` / `concepts` / `tag --concept` / `similar --concept`, on real stores indexed with the
bundled shapes-mini model."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from clipsearch.cli import cli
from clipsearch.library import Library
from retrieval import shapes
from retrieval.ann import saved_tables
from retrieval.concepts import (
    ANCHOR_WEIGHT,
    Concept,
    ConceptBook,
    anchor_weight_for,
    fit_logistic,
    learn_concept,
    pick_method,
    resolve_terms,
    sample_negatives,
    train_coop,
    zero_shot_anchor,
)
from retrieval.errors import ModelMismatchError, QueryError
from retrieval.model.clip import CLIP
from retrieval.model.config import PRESETS
from retrieval.model.encode import encode_texts
from retrieval.model.loading import load_model
from retrieval.model.tokenizer import tokenize
from retrieval.query import Term, as_terms, encode_query, parse_terms

STEPS = "30"  # CoOp steps in tests: enough to move the context, few enough to stay quick


def _unit(x):
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, list(args))
    return result.exit_code, result.output


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    """30 generated scenes and 3 single-object scenes per colour indexed with shapes-mini, and unindexed
    example folders (4 images per colour)."""
    root = tmp_path_factory.mktemp("concepts")
    samples = shapes.generate(root / "photos", 30, seed=7, size_range=(64, 96))
    by_colour = shapes.class_folders(root / "photos" / "colours", "colour", 3, seed=9, size_range=(64, 96))
    samples += [sample for group in by_colour.values() for sample in group]
    shapes.class_folders(root / "examples", "colour", 4, seed=11, size_range=(64, 96))
    db = root / "db"
    Library(db=db, model="shapes-mini").index([root / "photos"], workers=0, progress=False)
    colours = {str(s.path): {o.colour for o in s.attributes.objects} for s in samples}
    return {"root": root, "db": db, "samples": samples, "colours": colours}


def cli_in(scenes, *args: str) -> tuple[int, str]:
    return run(*args, "--model", "shapes-mini", "--db", str(scenes["db"]))


# ---- the text tower from token embeddings ----------------------------------------------------------


@pytest.mark.parametrize("name", ["tiny-vit", "shapes-mini"])
def test_text_tower_from_token_embeddings_gives_encode_text_bit_for_bit(name):
    if name == "shapes-mini":
        model = load_model("shapes-mini", device="cpu", towers="text")[0]
    else:
        torch.manual_seed(0)
        model = CLIP(PRESETS[name], towers="text").eval()
    tokens = torch.from_numpy(tokenize(["a photo of a dog", "red", "a large blue circle on the left"]))
    eot = tokens.argmax(dim=-1)
    with torch.no_grad():
        expected = model.encode_text(tokens)
        got = model.encode_token_embeddings(model.token_embedding(tokens[:, : int(eot.max()) + 1]), eot)
    assert torch.equal(got, expected)


# ---- query terms -----------------------------------------------------------------------------------


def test_at_name_is_a_concept_term_alone_weighted_and_in_combinations():
    terms = parse_terms(["@rex", "+", "on a beach", "-", "indoors"])
    assert terms == [Term(1.0, "concept", "rex"), Term(1.0, "text", "on a beach"), Term(-1.0, "text", "indoors")]
    assert parse_terms(["2:@rex", "-0.5:@kitchen"]) == [Term(2.0, "concept", "rex"), Term(-0.5, "concept", "kitchen")]
    assert as_terms("@rex on a beach") == [Term(1.0, "concept", "rex"), Term(1.0, "text", "on a beach")]
    assert as_terms("mail me @ home") == [Term(1.0, "text", "mail me @ home")]  # only a leading @name
    with pytest.raises(QueryError, match="resolved first"):
        encode_query([Term(1.0, "concept", "rex")], None, None)


# ---- the probe and CoOp as functions ---------------------------------------------------------------


def test_logistic_regression_reaches_the_penalised_optimum():
    rng = np.random.default_rng(0)
    x = _unit(rng.normal(size=(40, 8)))
    y = (x[:, 0] + 0.3 * rng.normal(size=40) > 0).astype(np.int64)
    c = 3.0
    w, b = fit_logistic(x, y, c)
    # The gradient of C * sum(balanced CE) + |W|^2/2 vanishes at the optimum.
    xt, yt = torch.tensor(x, dtype=torch.float64), torch.tensor(y)
    wt = torch.tensor(w, dtype=torch.float64, requires_grad=True)
    bt = torch.tensor(b, dtype=torch.float64, requires_grad=True)
    counts = torch.bincount(yt).double()
    weight = (len(y) / (2 * counts))[yt]
    loss = c * (weight * torch.nn.functional.cross_entropy(xt @ wt.T + bt, yt, reduction="none")).sum()
    (loss + 0.5 * (wt**2).sum()).backward()
    assert float(wt.grad.abs().max()) < 1e-3 and float(bt.grad.abs().max()) < 1e-3
    assert np.mean(np.argmax(x @ w.T + b, axis=1) == y) > 0.8


def test_coop_gradients_reach_only_the_context_and_the_towers_stay_bit_identical():
    model = load_model("shapes-mini", device="cpu")[0]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {k: p.requires_grad for k, p in model.named_parameters()}
    rng = np.random.default_rng(0)
    x = _unit(rng.normal(size=(12, model.config.embed_dim)))
    anchor = zero_shot_anchor(model, ["thing", "rex"])
    fit = train_coop(model, ["thing", "rex"], x, np.arange(12) % 2, steps=5, seed=0, anchor=anchor)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in model.parameters())  # nothing of the model was differentiated into
    assert {k: p.requires_grad for k, p in model.named_parameters()} == flags
    init = model.token_embedding(torch.from_numpy(tokenize("a photo of a")[0, 1:5])).detach().numpy()
    assert fit.context.shape == (1, 4, model.config.text.width)
    assert not np.allclose(fit.context[0], init)  # the context did learn, starting from "a photo of a"
    np.testing.assert_allclose(np.linalg.norm(fit.text, axis=1), 1, atol=1e-5)


def test_coop_is_kept_near_the_zero_shot_class_vectors():
    model = load_model("shapes-mini", device="cpu", towers="text")[0]
    classes = ["circle", "square", "triangle"]
    anchor = zero_shot_anchor(model, classes, ("a photo of a red {}", "a photo of a blue {}"))
    expected = _unit(
        encode_texts(model, [f"a photo of a {c} {s}" for s in classes for c in ("red", "blue")])
        .reshape(3, 2, -1)
        .mean(1)
    )
    np.testing.assert_allclose(anchor, expected, atol=1e-6)  # the prompt-ensembled zero-shot vectors
    rng = np.random.default_rng(2)
    x = _unit(rng.normal(size=(6, model.config.embed_dim)))  # images that look like none of the classes
    y = np.arange(6) % 3
    start = train_coop(model, classes, x, y, steps=0, anchor=anchor)
    np.testing.assert_allclose(start.text, anchor, atol=1e-6)  # before any step, CoOp is the zero-shot classifier
    plain = train_coop(model, classes, x, y, steps=40, seed=0)
    kept = train_coop(model, classes, x, y, steps=40, seed=0, anchor=anchor)
    assert not np.allclose(kept.context, start.context)  # it did learn
    drift = [float(np.min(np.sum(fit.text * anchor, axis=1))) for fit in (plain, kept)]
    assert drift[1] > 0.9 > drift[0], drift  # plain CoOp leaves the zero-shot classes; KgCoOp stays near them
    by_default = train_coop(model, classes, x, y, steps=3, anchor=anchor)  # 2 examples a class
    explicit = train_coop(model, classes, x, y, steps=3, anchor=anchor, anchor_weight=ANCHOR_WEIGHT / 2)
    np.testing.assert_array_equal(by_default.text, explicit.text)  # the weight falls as 1/shots
    assert anchor_weight_for(16) == ANCHOR_WEIGHT / 16 and anchor_weight_for(0.5) == ANCHOR_WEIGHT
    with pytest.raises(QueryError, match=r"anchor must be \[3, 64\]"):
        train_coop(model, classes, x, y, steps=1, anchor=anchor[:2])


def test_auto_keeps_coop_unless_the_probe_did_better_on_held_out_examples():
    assert pick_method({"probe": 0.9, "coop": 0.8}) == "probe"
    assert pick_method({"probe": 0.8, "coop": 0.8}) == "coop"
    assert pick_method({"probe": 0.7, "coop": 0.8}) == "coop"
    assert pick_method({"probe": None, "coop": None}) == "coop"  # one example: nothing to hold out


def test_negatives_are_sampled_with_the_seed_and_never_among_the_positives():
    ids = np.arange(1, 101)
    first = sample_negatives(ids, [3, 5, 7], 20, seed=4)
    assert len(first) == 20 and not set(first) & {3, 5, 7}
    assert np.array_equal(first, sample_negatives(ids, [3, 5, 7], 20, seed=4))
    assert not np.array_equal(first, sample_negatives(ids, [3, 5, 7], 20, seed=5))


# ---- learning over a store ---------------------------------------------------------------------------


def _red_paths(scenes) -> list[str]:
    return [p for p, colours in scenes["colours"].items() if colours == {"red"}]


@pytest.mark.parametrize(("method", "given_negatives", "red_in_top_3"), [("probe", False, 3), ("coop", True, 2)])
def test_learn_from_unstored_examples_and_query_at_name(scenes, method, given_negatives, red_in_top_3):
    examples = scenes["root"] / "examples"
    negatives = [a for c in shapes.COLOURS if c != "red" for a in ("-x", str(examples / c))] if given_negatives else []
    code, out = cli_in(scenes, "learn", "reds", "-p", str(examples / "red"), *negatives, "--method", method,
                       "--steps", STEPS)  # fmt: skip
    assert code == 0, out
    source = "given" if given_negatives else "sampled from the store"
    assert (
        f"Learned @reds by {method} from 4 positive and {28 if given_negatives else 32} negative examples ({source}"
        in out
    )
    code, out = cli_in(scenes, "query", "@reds", "-n", "3", "--json")
    assert code == 0, out
    hits = [json.loads(line) for line in out.splitlines()]
    assert len(hits) == 3
    # about 1 stored scene in 9 shows red; the probe finds only red ones, CoOp from a made-up word ("reds") most
    assert sum("red" in scenes["colours"][h["path"]] for h in hits) >= red_in_top_3, hits
    code, out = cli_in(scenes, "concepts", "--json")
    (listed,) = [json.loads(line) for line in out.splitlines()]
    assert listed["name"] == "reds" and listed["method"] == method and listed["examples"] == 0  # none stored
    assert listed["params"]["positives"] == 4 and len(listed["params"]["positive_paths"]) == 4


def test_learn_auto_reports_both_methods_held_out_accuracy(scenes):
    red = str(scenes["root"] / "examples" / "red")
    code, out = cli_in(scenes, "learn", "auto_reds", "-p", red, "--steps", STEPS, "--seed", "1")
    assert code == 0, out
    line = next(line for line in out.splitlines() if line.startswith("Held-out accuracy: "))
    assert "(probe 0." in line and ", coop 0." in line and "; kept " in line, line


def test_learn_from_stored_examples_records_their_ids_and_is_reproducible(scenes):
    lib = Library(db=scenes["db"], model="shapes-mini")
    reds = _red_paths(scenes)[:3]
    first = lib.learn("stored_reds", reds, method="probe", seed=3)
    store = lib.store()
    assert sorted(first.example_ids) == sorted(store.id_for_path(p) for p in reds)
    assert not set(first.negative_ids) & set(first.example_ids)
    again = lib.learn("stored_reds", reds, method="probe", seed=3)
    assert np.array_equal(first.vector, again.vector) and first.negative_ids == again.negative_ids
    assert again.seed == 3 and again.method == "probe"
    assert "stored_reds" in [c.name for c in lib.concepts()]  # replaced, not duplicated
    assert [c.name for c in lib.concepts()].count("stored_reds") == 1


def test_a_probe_query_ranks_by_probability_shown_as_the_score(scenes):
    lib = Library(db=scenes["db"], model="shapes-mini")
    concept = lib.learn("probe_reds", _red_paths(scenes)[:3], method="probe", seed=0)
    hits = lib.search("@probe_reds", k=100)
    store = lib.store()
    expected = concept.probability(store.vectors_for([h.metadata["id"] for h in hits]))
    np.testing.assert_allclose([h.score for h in hits], expected, atol=1e-5)
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    ids, vectors = store.all_vectors()
    assert len(hits) == len(ids)
    above = lib.search("@probe_reds", k=100, threshold=0.5)
    assert len(above) == int((concept.probability(vectors) >= 0.5).sum())
    # in a combination the probe is its unit weight vector, combined like any vector
    combined = lib.search(["@probe_reds", "a circle"], k=5)
    direct = lib.search([concept.direction, "a circle"], k=5)
    assert [h.path for h in combined] == [h.path for h in direct]


def test_unknown_concept_is_one_line_listing_the_known_ones(scenes):
    Library(db=scenes["db"], model="shapes-mini").learn("known_one", _red_paths(scenes)[:2], method="probe")
    code, out = cli_in(scenes, "query", "@nosuch", "+", "a circle")
    assert code == 1
    assert out.count("\n") == 1 and out.startswith("Error: unknown concept @nosuch for model 'shapes-mini'")
    assert "@known_one" in out and "clipsearch learn nosuch" in out
    code, out = cli_in(scenes, "concepts", "rm", "nosuch")
    assert code == 1 and "unknown concept @nosuch" in out


def test_a_concept_of_another_model_is_refused(scenes, tiny):
    lib = Library(db=scenes["db"], model="shapes-mini")
    lib.learn("other_model", _red_paths(scenes)[:2], method="probe")
    Library(db=scenes["db"], model=str(tiny)).index([scenes["root"] / "photos"], workers=0, progress=False)
    code, out = run("query", "@other_model", "--model", str(tiny), "--db", str(scenes["db"]))
    assert code == 1, out
    assert "@other_model was learned with model shapes-mini, pass --model shapes-mini" in out
    tiny_store = Library(db=scenes["db"], model=str(tiny)).store()
    foreign = lib.concepts()[0]
    assert isinstance(foreign, Concept)
    with pytest.raises(ModelMismatchError, match=r"learned with model 'shapes-mini'.*not 'tiny'"):
        ConceptBook(tiny_store).save(foreign)
    with pytest.raises(ModelMismatchError, match="learned with model 'shapes-mini'"):
        resolve_terms([Term(1.0, "concept", foreign.name)], _BookWith(tiny_store, foreign))


class _BookWith(ConceptBook):
    """A concept book of one store whose table holds a row written by another model's book (as a copied store
    directory or a hand-edited table would): reading it must refuse it."""

    def __init__(self, store, concept):
        super().__init__(store)
        self._planted = concept

    def get(self, name):
        self._check_model(self._planted)
        return self._planted


def test_tag_concept_writes_a_column_where_can_filter(scenes):
    lib = Library(db=scenes["db"], model="shapes-mini")
    concept = lib.learn("tagged_reds", _red_paths(scenes)[:3], method="probe")
    code, out = cli_in(scenes, "tag", "--concept", "tagged_reds", "--json")
    assert code == 0, out
    summary = json.loads(out)
    ids, vectors = lib.store().all_vectors()
    assert summary["column"] == "tagged_reds" and summary["tagged"] == len(ids)
    assert summary["yes"] == int((concept.probability(vectors) >= 0.5).sum()) > 0
    code, out = cli_in(scenes, "query", "a shape", "--where", "tagged_reds = 'yes'", "-n", "100", "--json")
    assert code == 0, out
    assert len(out.splitlines()) == summary["yes"]
    code, out = cli_in(scenes, "tag", "--concept", "tagged_reds", "--labels", "red,blue")
    assert code == 2 and "either --concept or --labels" in out


def test_similar_with_a_concept_adds_its_vector(scenes):
    lib = Library(db=scenes["db"], model="shapes-mini")
    concept = lib.learn("similar_reds", _red_paths(scenes)[:3], method="probe")
    path = str(scenes["samples"][0].path)
    store = lib.store()
    own = store.id_for_path(path)
    vector = store.vectors_for([own])[0]
    got = lib.similar(path, k=5, concept="similar_reds")
    expected = [h for h in lib.search([vector, concept.direction], k=6) if h.metadata["id"] != own][:5]
    assert [h.path for h in got] == [h.path for h in expected]
    code, out = cli_in(scenes, "similar", path, "--concept", "similar_reds", "-n", "5", "--plain")
    assert code == 0 and [line.split("\t")[1] for line in out.splitlines()] == [h.path for h in got]


def test_a_concept_survives_reindexing_moves_and_deleted_examples(tmp_path):
    photos = tmp_path / "photos"
    samples = shapes.generate(photos, 24, seed=21, size_range=(64, 80))
    db = tmp_path / "db"
    lib = Library(db=db, model="shapes-mini")
    lib.index([photos], workers=0, progress=False)
    examples = [str(s.path) for s in samples[:4]]
    code, out = run("learn", "keep", *[a for p in examples for a in ("-p", p)], "--method", "coop", "--steps", STEPS,
                    "--model", "shapes-mini", "--db", str(db))  # fmt: skip
    assert code == 0, out
    assert saved_tables(db) == [(lib.store().model_info, 24)]  # the concept table does not hide the saved index
    before = Library(db=db, model="shapes-mini").concepts()[0]
    moved = photos / "moved"
    moved.mkdir()
    shutil.move(examples[0], moved / "renamed.png")
    for path in examples[1:3]:
        (photos / path).unlink()
    Library(db=db, model="shapes-mini").index([photos], workers=0, progress=False)
    lib = Library(db=db, model="shapes-mini")
    (after,) = lib.concepts()
    assert np.array_equal(after.vector, before.vector) and after.example_ids == before.example_ids
    assert lib.store().id_for_path(moved / "renamed.png") == before.example_ids[0]  # the move kept its id
    hits = lib.search("@keep", k=30)
    assert len(hits) == 24 - 2 and all(h.path not in examples[1:3] for h in hits)
    code, out = run("concepts", "rm", "keep", "--model", "shapes-mini", "--db", str(db))
    assert code == 0 and "Removed @keep." in out
    assert Library(db=db, model="shapes-mini").concepts() == []


def test_learn_refuses_bad_input_in_one_line(scenes):
    code, out = cli_in(scenes, "learn", "bad name", "-p", str(scenes["root"] / "examples" / "red"))
    assert code == 1 and out.count("\n") == 1 and "concept name 'bad name'" in out
    code, out = cli_in(scenes, "learn", "ok", "-p", str(scenes["root"] / "nowhere.png"))
    assert code == 1 and out.count("\n") == 1 and "no such file or folder" in out


def test_learn_concept_auto_keeps_the_better_held_out_method():
    model = load_model("shapes-mini", device="cpu", towers="text")[0]
    rng = np.random.default_rng(1)
    direction = _unit(rng.normal(size=64))
    pos = _unit(direction + 0.3 * rng.normal(size=(8, 64)))
    neg = _unit(-direction + 0.3 * rng.normal(size=(24, 64)))
    concept = learn_concept("planted", pos, neg, model.info, "auto", text_model=model, steps=10, seed=0)
    candidates = concept.params["candidates"]
    assert set(candidates) == {"probe", "coop"}
    assert concept.accuracy == max(candidates.values())
    assert concept.method == ("coop" if candidates["coop"] >= candidates["probe"] else "probe")


def test_learn_classes_makes_one_concept_per_folder_against_the_others(scenes, tmp_path):
    classes = tmp_path / "classes"
    for colour in ("red", "blue", "green"):
        shutil.copytree(scenes["root"] / "examples" / colour, classes / colour)
    code, out = cli_in(scenes, "learn", "--classes", str(classes), "--method", "probe", "--json")
    assert code == 0, out
    learned = {r["name"]: r for r in map(json.loads, out.splitlines())}
    assert set(learned) == {"red", "blue", "green"}
    assert all(r["params"]["positives"] == 4 and r["params"]["negatives"] == 8 for r in learned.values())
    lib = Library(db=scenes["db"], model="shapes-mini")
    hits = lib.search("@blue", k=2)
    assert all("blue" in scenes["colours"][h.path] for h in hits)
    code, out = cli_in(scenes, "learn", "rex", "--classes", str(classes))
    assert code == 2 and "--classes learns one concept per sub-folder" in out

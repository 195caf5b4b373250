"""Query terms: weights, + and -, image paths versus text, combination, filters, and how click hands them over."""

from __future__ import annotations

from datetime import date, datetime
from pathlib import Path

import click
import numpy as np
import pytest
from click.testing import CliRunner

from retrieval.errors import ImageLoadError, QueryError
from retrieval.query import (
    IMAGENET_TEMPLATES,
    SHORT_TEMPLATES,
    Term,
    as_terms,
    build_filter,
    encode_query,
    ensemble_prompts,
    parse_terms,
)


@pytest.fixture
def pool(tmp_path, monkeypatch):
    """An image file ./pool.jpg in the working directory (contents do not matter to parsing)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "pool.jpg").write_bytes(b"\xff\xd8")
    return Path("pool.jpg")


def test_weights_signs_and_images(pool):
    terms = parse_terms(["2:golden retriever", "+", "./pool.jpg", "-", "night"])
    assert terms == [Term(2.0, "text", "golden retriever"), Term(1.0, "image", pool), Term(-1.0, "text", "night")]


def test_words_without_operators_form_one_text(pool):
    assert parse_terms(["a", "red", "circle"]) == [Term(1.0, "text", "a red circle")]
    assert parse_terms(["dog", "pool.jpg", "cat"]) == [
        Term(1.0, "text", "dog"),
        Term(1.0, "image", pool),
        Term(1.0, "text", "cat"),
    ]


def test_weight_prefixes(pool):
    assert parse_terms(["0.5:pool.jpg"]) == [Term(0.5, "image", pool)]
    assert parse_terms(["-0.5:night", "sky"]) == [Term(-0.5, "text", "night sky")]
    assert parse_terms(["-", "3:rain"]) == [Term(-3.0, "text", "rain")]
    assert parse_terms(["0.5:./pool.jpg", "+2:été"]) == [Term(0.5, "image", pool), Term(2.0, "text", "été")]
    # a colon that does not follow a number is text
    assert parse_terms(["time: 10:30"]) == [Term(1.0, "text", "time: 10:30")]
    assert parse_terms(["nan:x"]) == [Term(1.0, "text", "nan:x")]


@pytest.mark.parametrize("text", ["16:9 screenshot", "16:9", "2: dog", "4:3:2 shot", "1e3:x", "inf:x"])
def test_a_number_and_colon_before_anything_but_a_letter_or_an_image_is_text(text, pool):
    """Only `W:` followed by a letter (or an image file name) is a weight; `16:9 screenshot` is searched as is."""
    assert parse_terms([text]) == [Term(1.0, "text", text)]
    assert parse_terms(["-", text]) == [Term(-1.0, "text", text)]


def test_missing_or_non_image_files_are_text(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.txt").write_text("hi")
    assert parse_terms(["notes.txt"]) == [Term(1.0, "text", "notes.txt")]
    assert parse_terms(["gone.jpg"]) == [Term(1.0, "text", "gone.jpg")]
    with pytest.raises(ImageLoadError, match="query image ./gone.jpg: no such file"):
        parse_terms(["dog", "+", "./gone.jpg"])
    with pytest.raises(ImageLoadError, match="query image ./gone.jpg: no such file"):
        parse_terms(["dog", "+", "2:./gone.jpg"])


@pytest.mark.parametrize(
    ("tokens", "url"),
    [
        (["https://example.com/dog.jpg"], "https://example.com/dog.jpg"),
        (["dog", "+", "2:HTTP://example.com/a?b=c"], "HTTP://example.com/a?b=c"),
        (["like http://x.org/cat.png please"], "http://x.org/cat.png"),
    ],
)
def test_urls_are_not_fetched(tokens, url):
    message = f"query term {url}: URLs are not fetched; download the image first and give its path"
    with pytest.raises(QueryError) as error:
        parse_terms(tokens)
    assert str(error.value) == message
    with pytest.raises(QueryError, match="URLs are not fetched"):
        as_terms(url)


@pytest.mark.parametrize("tokens", [[], ["+"], ["dog", "-"], ["  "]])
def test_bad_queries(tokens):
    with pytest.raises(QueryError):
        parse_terms(tokens)


def test_as_terms_for_the_python_api(pool):
    vector = np.ones(4, np.float32)
    terms = as_terms([(2, "dog"), pool, (-1, vector), "pool.jpg"])
    assert [(t.weight, t.kind) for t in terms] == [(2.0, "text"), (1.0, "image"), (-1.0, "vector"), (1.0, "image")]
    with pytest.raises(QueryError):
        as_terms(42)
    with pytest.raises(QueryError):
        as_terms([])


def _fake_text_encoder(table: dict[str, np.ndarray]):
    def encode(texts):
        return np.stack([table[t] for t in texts])

    return encode


def test_combination_is_renormalised_weighted_sum():
    e = np.eye(3, dtype=np.float32)
    encode = _fake_text_encoder({"x": e[0], "y": e[1], "z": e[2]})
    got = encode_query([Term(2, "text", "x"), Term(1, "text", "y"), Term(-1, "text", "z")], encode, None)
    expected = np.array([2, 1, -1], np.float32) / np.sqrt(6)
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    assert np.isclose(np.linalg.norm(got), 1)
    with pytest.raises(QueryError, match="cancel"):
        encode_query([Term(1, "text", "x"), Term(-1, "text", "x")], encode, None)


def test_images_and_vectors_combine_with_texts():
    e = np.eye(3, dtype=np.float32)
    seen = []

    def images(batch):
        seen.extend(batch)
        return np.stack([e[1]] * len(batch))

    got = encode_query(
        [Term(1, "text", "x"), Term(1, "image", "a.jpg"), Term(1, "vector", 5 * e[2])],
        _fake_text_encoder({"x": e[0]}),
        images,
    )
    np.testing.assert_allclose(got, np.ones(3) / np.sqrt(3), rtol=1e-6)
    assert seen == ["a.jpg"]


def test_ensemble_averages_over_templates():
    assert len(IMAGENET_TEMPLATES) == 80 and len(set(IMAGENET_TEMPLATES)) == 80
    assert set(SHORT_TEMPLATES) <= set(IMAGENET_TEMPLATES)
    assert all(t.count("{}") == 1 for t in IMAGENET_TEMPLATES)
    prompts = ensemble_prompts("dog", SHORT_TEMPLATES)
    assert prompts[0] == "itap of a dog." and len(prompts) == 7
    rng = np.random.default_rng(0)
    table = {
        p: v / np.linalg.norm(v) for p, v in zip(prompts, rng.standard_normal((7, 8)).astype(np.float32), strict=True)
    }
    got = encode_query(
        [Term(1, "text", "dog")], _fake_text_encoder(table), None, ensemble=True, templates=SHORT_TEMPLATES
    )
    mean = np.mean(list(table.values()), axis=0)
    np.testing.assert_allclose(got, mean / np.linalg.norm(mean), rtol=1e-5)


def test_build_filter(tmp_path):
    assert build_filter() is None
    sql = build_filter(
        "format = 'PNG'", in_dir=tmp_path / "it's", after=date(2020, 1, 2), before=datetime(2021, 3, 4, 5, 6, 7)
    )
    folder = str(tmp_path / "it's").replace("'", "''")
    assert sql == (
        f"starts_with(path, '{folder}/') AND taken_at >= TIMESTAMP '2020-01-02 00:00:00' "
        "AND taken_at < TIMESTAMP '2021-03-04 05:06:07' AND (format = 'PNG')"
    )


def test_click_hands_operators_and_dash_terms_through(pool):
    """`-` and `+` arrive as terms; `-0.5:x` too; real options still work anywhere; `--` ends options."""
    from clipsearch.commands.query import TermsCommand, terms_from

    captured = {}

    @click.command(cls=TermsCommand)
    @click.argument("terms", nargs=-1, required=True)
    @click.option("-n", "--top", default=10)
    def probe(terms, top):
        captured["terms"], captured["top"] = tuple(terms_from(terms)), top

    runner = CliRunner()
    result = runner.invoke(probe, ["2:golden retriever", "+", "pool.jpg", "-", "night", "-n", "3"])
    assert result.exit_code == 0, result.output
    assert captured == {"terms": ("2:golden retriever", "+", "pool.jpg", "-", "night"), "top": 3}
    assert [t.weight for t in parse_terms(captured["terms"])] == [2.0, 1.0, -1.0]

    result = runner.invoke(probe, ["dog", "-0.5:night"])
    assert result.exit_code == 0, result.output
    assert parse_terms(captured["terms"]) == [Term(1.0, "text", "dog"), Term(-0.5, "text", "night")]

    result = runner.invoke(probe, ["--", "-n", "dog", "-1:x"])
    assert result.exit_code == 0 and captured["terms"] == ("-n", "dog", "-1:x") and captured["top"] == 10

    result = runner.invoke(probe, ["dog", "--bogus"])
    assert result.exit_code == 2 and "No such option '--bogus'" in result.output


def test_negative_option_values_reach_click_unmarked():
    """A value after an option that takes one is never marked as a term, so click parses (or refuses) it."""
    from clipsearch.commands.query import TermsCommand, terms_from

    captured = {}

    @click.command(cls=TermsCommand)
    @click.argument("terms", nargs=-1, required=True)
    @click.option("-n", "--top", default=10, type=click.IntRange(min=1))
    @click.option("--threshold", type=float)
    @click.option("--where")
    @click.option("-f", "--paths", is_flag=True)
    def probe(terms, top, threshold, where, paths):
        captured.update(terms=tuple(terms_from(terms)), top=top, threshold=threshold, where=where, paths=paths)

    runner = CliRunner()
    for args, expected in [
        (["dog", "--threshold", "-0.5"], {"terms": ("dog",), "threshold": -0.5}),
        (["--threshold", "-.5", "dog"], {"terms": ("dog",), "threshold": -0.5}),
        (["--threshold=-0.5", "-0.5:night", "dog"], {"terms": ("-0.5:night", "dog"), "threshold": -0.5}),
        (["-0.5:night", "--threshold", "-2", "-n", "3"], {"terms": ("-0.5:night",), "threshold": -2.0, "top": 3}),
        (["dog", "--where", "-1:x"], {"terms": ("dog",), "where": "-1:x"}),
        (["dog", "-fn", "4", "-1:x"], {"terms": ("dog", "-1:x"), "top": 4, "paths": True}),
    ]:
        captured.clear()
        result = runner.invoke(probe, args)
        assert result.exit_code == 0, (args, result.output)
        assert {key: captured[key] for key in expected} == expected, args

    for args in (["dog", "-n", "-1"], ["dog", "-n-1"], ["-n", "-1", "dog"]):
        result = runner.invoke(probe, args)
        assert result.exit_code == 2, args
        assert result.output.splitlines()[-1] == "Error: Invalid value for '-n' / '--top': -1 is not in the range x>=1."
    result = runner.invoke(probe, ["dog", "--threshold", "-0.5:x"])
    assert result.exit_code == 2
    assert result.output.splitlines()[-1] == "Error: Invalid value for '--threshold': '-0.5:x' is not a valid float."

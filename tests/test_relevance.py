"""Calibrated relevance (`threshold="auto"`), weak results and date order, on a real store of generated scenes
indexed with the bundled shapes-mini model."""

from __future__ import annotations

import json
import logging
import math
from datetime import datetime

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import ExifTags, Image

from clipsearch.cli import cli
from clipsearch.library import Library
from retrieval.errors import QueryError
from retrieval.query import SearchResult
from retrieval.relevance import (
    CALIBRATIONS,
    PRESENT_HITS,
    Calibration,
    apply_cutoff,
    auto_cutoff,
    fit_calibration,
    presence,
    sort_by_date,
)
from retrieval.shapes import POSITIONS, Attributes, generate, render

BACKGROUNDS = ("grey", "white", "black", "brown", "pink", "cyan")
# The gallery: colour, shape and how many. Blue and circles are there, blue circles are not.
SCENES = (("red", "circle", 5), ("blue", "square", 4), ("red", "square", 4), ("blue", "triangle", 4))
# Capture dates of the red circles, deliberately not in score order.
DATES = ("2021:05:01 10:00:00", "2019:01:02 08:30:00", "2023:07:14 18:45:00", "2020:03:03 12:00:00", None)


def _save(image: Image.Image, path, taken: str | None) -> None:
    exif = Image.Exif()
    if taken is not None:
        exif.get_ifd(ExifTags.IFD.Exif)[ExifTags.Base.DateTimeOriginal] = taken
    image.save(path, quality=92, exif=exif)


@pytest.fixture(scope="module")
def gallery(tmp_path_factory):
    """17 single-object scenes, indexed with shapes-mini; returns the store and each file's (colour, shape)."""
    root = tmp_path_factory.mktemp("relevance")
    photos = root / "photos"
    photos.mkdir()
    labels, taken = {}, {}
    for colour, shape, count in SCENES:
        for i in range(count):
            position = POSITIONS[i % len(POSITIONS)]
            background = [b for b in BACKGROUNDS if b != colour][i]
            attributes = Attributes(shape, colour, ("large", "small")[i % 2], position, background, "flat")
            path = photos / f"{colour}-{shape}-{i}.jpg"
            date = DATES[i] if (colour, shape) == ("red", "circle") else None
            _save(render(attributes, 128, seed=i), path, date)
            labels[str(path)] = (colour, shape)
            taken[str(path)] = date
    db = root / "db"
    Library(db=db, model="shapes-mini").index([photos], workers=0, progress=False)
    return {"db": db, "labels": labels, "taken": taken}


def run(gallery, *args: str):
    return CliRunner().invoke(cli, [*args, "--model", "shapes-mini", "--db", str(gallery["db"])])


def red_circles(gallery) -> set[str]:
    return {p for p, label in gallery["labels"].items() if label == ("red", "circle")}


def test_auto_returns_the_matches_only(gallery):
    library = Library(db=gallery["db"], model="shapes-mini")
    everything = library.search("a red circle", k=20)
    assert len(everything) == len(gallery["labels"])  # without a threshold a query returns k images
    matches = library.search("a red circle", k=20, threshold="auto")
    assert {r.path for r in matches} == red_circles(gallery)
    assert [r.rank for r in matches] == list(range(1, len(matches) + 1))
    assert not any(r.weak for r in matches)


def test_auto_weighs_the_best_hits_however_few_results_are_asked_for(gallery):
    library = Library(db=gallery["db"], model="shapes-mini")
    matches = library.search("a red circle", k=20, threshold="auto")
    # the best red circle alone is p = 0.996, short of PRESENT_P: the four others make it a match
    assert CALIBRATIONS[library.model_info.weights_sha256].probability(matches[0].score) < 0.998
    for k in (1, 2):
        assert [r.path for r in library.search("a red circle", k=k, threshold="auto")] == [r.path for r in matches[:k]]
        saved = library.search("a red circle", k=k, threshold="auto", metadata=False)  # the no-LanceDB path
        assert [r.path for r in saved] == [r.path for r in matches[:k]]
    assert [r.rank for r in library.search("a red circle", k=2, threshold="auto", sort="date")] == [1, 2]


def test_auto_says_no_good_match_for_an_absent_combination(gallery):
    library = Library(db=gallery["db"], model="shapes-mini")
    assert library.search("a blue circle", k=20, threshold="auto") == []
    for output in ("--json", "--paths", "--null", "--plain"):
        result = run(gallery, "query", "a blue circle", "--threshold", "auto", output)
        assert (result.exit_code, result.stdout, result.stderr) == (0, "", "no good match\n"), output
    result = run(gallery, "query", "a blue circle", "--threshold", "auto")
    assert (result.exit_code, result.stdout, result.stderr) == (0, "", "no good match\n")


def test_show_weak_returns_the_rest_marked(gallery):
    weak = Library(db=gallery["db"], model="shapes-mini").search("a blue circle", k=3, threshold="auto", show_weak=True)
    assert len(weak) == 3 and all(r.weak for r in weak)
    result = run(gallery, "query", "a red circle", "--threshold", "auto", "--show-weak", "-n", "8", "--json")
    assert result.exit_code == 0, result.output
    hits = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(hits) == 8
    assert {h["path"] for h in hits if not h["weak"]} == red_circles(gallery)
    assert all(h["weak"] is (h["path"] not in red_circles(gallery)) for h in hits)
    table = run(gallery, "query", "a red circle", "--threshold", "auto", "--show-weak", "-n", "8")
    lines = table.stdout.splitlines()
    assert lines[0].split() == ["rank", "score", "weak", "path"]
    assert sum(line.split()[2] == "weak" for line in lines[1:]) == 8 - len(red_circles(gallery))


def test_sort_by_date_orders_the_matches_by_capture_time(gallery):
    result = run(gallery, "query", "a red circle", "--threshold", "auto", "--sort", "date", "--json")
    assert result.exit_code == 0, result.output
    hits = [json.loads(line) for line in result.stdout.splitlines()]
    assert {h["path"] for h in hits} == red_circles(gallery)
    expected = sorted(red_circles(gallery), key=lambda p: (gallery["taken"][p] is None, gallery["taken"][p] or ""))
    assert [h["path"] for h in hits] == expected  # oldest first, the undated one last
    assert [h["rank"] for h in hits] == [1, 2, 3, 4, 5]
    assert hits[0]["taken_at"] == "2019-01-02T08:30:00"


def test_float_thresholds_still_work_and_weak_ones_show(gallery):
    library = Library(db=gallery["db"], model="shapes-mini")
    everything = library.search("a red circle", k=20)
    cut = (everything[2].score + everything[3].score) / 2
    assert [r.path for r in library.search("a red circle", k=20, threshold=cut)] == [r.path for r in everything[:3]]
    marked = library.search("a red circle", k=20, threshold=cut, show_weak=True)
    assert [r.weak for r in marked] == [False] * 3 + [True] * (len(everything) - 3)
    result = run(gallery, "query", "a red circle", "--threshold", "-0.5", "--json", "-n", "20")
    assert result.exit_code == 0 and len(result.stdout.splitlines()) == len(gallery["labels"])


def test_bad_thresholds_and_auto_for_images_are_refused(gallery):
    result = run(gallery, "query", "a red circle", "--threshold", "high")
    assert result.exit_code == 2
    assert "'high' is neither a number nor 'auto'" in result.output
    photo = next(iter(red_circles(gallery)))
    for command in (["query", photo], ["similar", photo]):
        result = run(gallery, *command, "--threshold", "auto")
        assert result.exit_code == 1
        assert result.output == (
            "Error: threshold 'auto' is calibrated for text queries only; "
            "give a number for image, vector or @concept queries\n"
        )
    with pytest.raises(QueryError, match="unknown sort 'size'"):
        Library(db=gallery["db"], model="shapes-mini").search("a red circle", sort="size")


def test_auto_cutoff_rule():
    calibration = Calibration(slope=100.0, bias=-80.0, source="test")
    assert calibration.cosine_at(0.5) == pytest.approx(0.8)
    assert calibration.probability(calibration.cosine_at(0.95)) == pytest.approx(0.95)
    # a confident best hit: matches down to the p=0.5 cosine, or ln(20)/t below the best hit if that is higher
    assert auto_cutoff(0.9, 100.0, calibration) == pytest.approx(0.9 - math.log(20) / 100)
    assert auto_cutoff([0.9, 0.7], 100.0, calibration) == pytest.approx(0.9 - math.log(20) / 100)
    # p = 0.953 at 0.83: one such hit is not evidence enough (a near miss can score that), three are
    assert auto_cutoff(0.83, 10.0, calibration) == math.inf
    assert auto_cutoff([0.83, 0.83], 10.0, calibration) == math.inf  # 1 - 0.047^2 = 0.99775 < PRESENT_P
    assert auto_cutoff([0.83, 0.83, 0.83], 10.0, calibration) == pytest.approx(0.8)
    # five hits at p = 0.731 (0.81) make 1 - 0.269^5 = 0.9986; four do not; only the best PRESENT_HITS count
    assert auto_cutoff([0.81] * PRESENT_HITS, 10.0, calibration) == pytest.approx(0.8)
    assert auto_cutoff([0.81] * 4 + [0.5] * 20, 10.0, calibration) == math.inf
    assert presence([0.5] * 20 + [0.81] * 4, calibration) == pytest.approx(1 - (1 - calibration.probability(0.81)) ** 4)
    scores = np.array([0.1, 0.2, 0.3, 0.2, 0.9])  # median 0.2, MAD 0.1: the fallback cuts at 0.45
    assert auto_cutoff(0.9, 1.0, None, scores) == pytest.approx(0.45)
    assert auto_cutoff(0.4, 1.0, None, scores) == math.inf
    with pytest.raises(ValueError, match="calibration or the query's scores"):
        auto_cutoff(0.9, 100.0, None)


def test_apply_cutoff_and_sort_by_date_rank_anew():
    results = [SearchResult(f"/p{i}", s, i + 1, {"taken_at": t}) for i, (s, t) in enumerate(
        [(0.9, datetime(2022, 1, 1)), (0.8, None), (0.7, datetime(2020, 1, 1))]
    )]  # fmt: skip
    assert [(r.path, r.rank, r.weak) for r in apply_cutoff(results, 0.75)] == [("/p0", 1, False), ("/p1", 2, False)]
    shown = apply_cutoff(results, 0.75, show_weak=True)
    assert [r.weak for r in shown] == [False, False, True]
    assert [(r.path, r.rank) for r in sort_by_date(shown)] == [("/p2", 1), ("/p0", 2), ("/p1", 3)]


def test_fit_calibration_recovers_a_logistic():
    rng = np.random.default_rng(0)
    scores = rng.uniform(0.5, 1.0, 20_000)
    matches = rng.random(20_000) < 1 / (1 + np.exp(-(60 * scores - 45)))
    slope, bias = fit_calibration(scores, matches)
    assert slope == pytest.approx(60, rel=0.1) and -bias / slope == pytest.approx(0.75, abs=0.005)


def test_shapes_mini_ships_a_calibration(gallery):
    info = Library(db=gallery["db"], model="shapes-mini").model_info
    assert info.weights_sha256 in CALIBRATIONS


def test_auto_without_a_calibration_cuts_at_the_query_score_spread(tiny, tmp_path, caplog):
    """A model with no shipped calibration (a random tiny CLIP) falls back to the query's scores over the store."""
    photos = tmp_path / "photos"
    generate(photos, 12, seed=5, size_range=(64, 96))
    library = Library(db=tmp_path / "db", model=tiny, text_precision="float32")
    library.index([photos], workers=0, progress=False)
    with caplog.at_level(logging.INFO, logger="clipsearch.library"):
        shown = library.search("a red circle", k=12, threshold="auto", show_weak=True)
    assert "ships no relevance calibration" in caplog.text
    embedded = library.embeddings()
    scores = embedded.vectors @ library.encode("a red circle")
    temperature = float(library._model("text")[0].logit_scale.detach().exp())
    cutoff = auto_cutoff(float(scores.max()), temperature, None, scores)
    assert len(shown) == 12
    assert [r.weak for r in shown] == [r.score < cutoff for r in shown]
    assert [r.path for r in library.search("a red circle", k=12, threshold="auto")] == [
        r.path for r in shown if not r.weak
    ]

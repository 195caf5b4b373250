"""Semantic end-to-end checks with the bundled shapes-mini model: a folder of generated scenes is indexed, and
text queries find the asked colours, combined queries mix them, and `similar` finds near-duplicates first."""

from __future__ import annotations

import json
from collections import Counter

import pytest
from click.testing import CliRunner
from PIL import Image

from clipsearch.cli import cli
from clipsearch.library import Library
from retrieval.shapes import COLOURS, generate


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    """60 generated scenes plus three near-duplicates of the first, indexed with shapes-mini."""
    root = tmp_path_factory.mktemp("scenes")
    photos = root / "photos"
    samples = generate(photos, 60, seed=7, size_range=(96, 160))
    with Image.open(samples[0].path) as image:
        original = image.convert("RGB")
    copies = root / "photos" / "copies"
    copies.mkdir()
    original.save(copies / "reencoded.jpg", quality=40)
    original.resize((original.width * 2 // 3, original.height * 2 // 3)).save(copies / "resized.png")
    w, h = original.size
    original.crop((w // 12, h // 12, w - w // 12, h - h // 12)).save(copies / "cropped.webp")
    db = root / "db"
    Library(db=db, model="shapes-mini").index([photos], workers=0, progress=False)
    colours = {str(s.path): {o.colour for o in s.attributes.objects} for s in samples}
    return {"db": db, "samples": samples, "colours": colours, "copies": copies}


def query(scenes, *args: str) -> list[dict]:
    result = CliRunner().invoke(cli, [*args, "--model", "shapes-mini", "--db", str(scenes["db"]), "--json"])
    assert result.exit_code == 0, result.output
    return [json.loads(line) for line in result.output.splitlines()]


def test_text_queries_find_the_asked_colour(scenes):
    counts = Counter(c for colours in scenes["colours"].values() for c in colours)
    asked = [c for c in COLOURS if counts[c] >= 3]
    assert len(asked) >= 6
    right = 0
    for colour in asked:
        hits = query(scenes, "query", f"a {colour} shape", "-n", "3", "--where", "path NOT LIKE '%/copies/%'")
        assert colour in scenes["colours"][hits[0]["path"]], (colour, hits)  # the best hit always has the colour
        right += sum(colour in scenes["colours"][h["path"]] for h in hits)
    # shapes-mini is a small model: at rank 2-3 it may offer a near colour (yellow for orange), but rarely
    assert right >= 0.85 * 3 * len(asked), right


def test_weights_steer_a_combined_query(scenes):
    for heavy, light in (("blue", "green"), ("green", "blue")):
        hits = query(scenes, "query", f"3:a {heavy} shape", "+", f"a {light} shape", "-n", "2")
        assert all(heavy in scenes["colours"][h["path"]] for h in hits), (heavy, hits)
    hits = query(scenes, "query", "a green shape", "-", "a green shape", "+", "a blue shape", "-n", "2")
    assert all("blue" in scenes["colours"][h["path"]] for h in hits)


def test_similar_finds_the_near_duplicates_first(scenes):
    first = str(scenes["samples"][0].path)
    hits = query(scenes, "similar", first, "-n", "3")
    assert {h["path"] for h in hits} == {str(p) for p in scenes["copies"].iterdir()}

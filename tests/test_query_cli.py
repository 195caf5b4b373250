"""End to end through the CLI: a folder of generated images indexed with a tiny random model into a real
LanceDB store, then `clipsearch query` / `clipsearch similar` with filters, thresholds and output formats."""

from __future__ import annotations

import itertools
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from clipsearch.cli import cli
from clipsearch.library import Library
from retrieval.model.checkpoint import save_checkpoint
from retrieval.model.clip import CLIP
from retrieval.model.config import CLIPConfig, TextConfig, VisionConfig
from retrieval.model.encode import encode_texts
from retrieval.model.loading import load_model
from retrieval.store import Store

TINY = CLIPConfig(
    embed_dim=32,
    vision=VisionConfig(image_size=32, width=64, layers=2, heads=2, patch_size=8),
    text=TextConfig(width=64, heads=2, layers=2),
)
EXIF_IFD, DATE_TIME_ORIGINAL = 0x8769, 0x9003
OUT_OF_RANGE = "-1 is not in the range x>=1."


def tiny_checkpoint(folder: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    return save_checkpoint(CLIP(TINY), folder, name=f"tiny-{seed}")


def pattern(seed: int, size: int = 96) -> Image.Image:
    """A smooth random colour pattern: distinct per seed, and robust to re-encoding, resizing and cropping."""
    coarse = (np.random.default_rng(seed).random((3, 3, 3)) * 255).astype(np.uint8)
    return Image.fromarray(coarse).resize((size, size), Image.Resampling.BICUBIC)


def save_jpeg(image: Image.Image, path: Path, taken: str | None = None, quality: int = 95) -> None:
    exif = Image.Exif()
    if taken is not None:
        exif.get_ifd(EXIF_IFD)[DATE_TIME_ORIGINAL] = taken
    image.save(path, "JPEG", quality=quality, exif=exif)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Photos (12 distinct patterns, 3 near-duplicates of the first), a tiny model, and a store indexing them."""
    root = tmp_path_factory.mktemp("world")
    photos = root / "photos"
    (photos / "sub").mkdir(parents=True)
    for i in range(12):
        target = photos / ("sub" if i % 3 == 0 else "") / f"p{i:02d}"
        if i % 2:
            pattern(i).save(target.with_suffix(".png"))
        else:
            save_jpeg(pattern(i), target.with_suffix(".jpg"), taken=f"20{10 + i}:06:01 12:00:00")
    original = pattern(0)
    save_jpeg(original, photos / "dup_reencoded.jpg", quality=40)
    original.resize((60, 60), Image.Resampling.BILINEAR).save(photos / "dup_resized.png")
    original.crop((6, 6, 90, 90)).save(photos / "dup_cropped.png")
    checkpoint = tiny_checkpoint(root / "tiny", seed=0)
    db = root / "db"
    Library(db=db, model=checkpoint).index([photos], workers=0, progress=False)
    return {"root": root, "photos": photos, "checkpoint": checkpoint, "db": db}


def run(world, *args: str, db: Path | None = None):
    result = CliRunner().invoke(cli, [*args, "--model", str(world["checkpoint"]), "--db", str(db or world["db"])])
    return result


def json_lines(output: str) -> list[dict]:
    return [json.loads(line) for line in output.splitlines()]


def stored(world) -> tuple[np.ndarray, list[str], np.ndarray]:
    """(ids, paths, vectors) straight from the store."""
    embedded = Library(db=world["db"], model=world["checkpoint"]).embeddings()
    return embedded.ids, embedded.paths, embedded.vectors


def test_text_query_json_is_the_exact_ranking(world):
    result = run(world, "query", "a", "red", "circle", "--json", "-n", "5")
    assert result.exit_code == 0, result.output
    hits = json_lines(result.output)
    model, _ = load_model(world["checkpoint"], towers="text")
    query = encode_texts(model, ["a red circle"])[0]  # the CLI encodes in float32 (see `_library`)
    _, paths, vectors = stored(world)
    scores = vectors @ query
    order = np.argsort(-scores)[:5]
    assert [h["path"] for h in hits] == [paths[i] for i in order]
    assert [h["rank"] for h in hits] == [1, 2, 3, 4, 5]
    np.testing.assert_allclose([h["score"] for h in hits], scores[order], atol=1e-5)
    assert {"id", "size", "width", "height", "format", "taken_at", "mtime", "content_hash"} <= set(hits[0])
    assert "vector" not in hits[0]


def test_table_and_paths_output(world):
    as_json = json_lines(run(world, "query", "sunset", "--json").output)
    result = run(world, "query", "sunset", "--paths")
    assert result.exit_code == 0
    assert result.output == "".join(h["path"] + "\n" for h in as_json)
    table = run(world, "query", "sunset").output.splitlines()
    assert table[0].split() == ["rank", "score", "path"]
    first = table[1].split()
    assert (
        first[0] == "1"
        and first[2] == as_json[0]["path"]
        and float(first[1]) == pytest.approx(as_json[0]["score"], abs=1e-3)
    )
    assert len(table) == 1 + min(10, len(as_json))

    result = run(world, "query", "sunset", "--json", "--paths")
    assert result.exit_code == 2 and "--json and --paths" in result.output


def test_output_formats_for_any_file_name(world, tmp_path):
    """The table and --plain escape control characters; -0 gives every name exactly; rclip's -t and -f work."""
    photos, db = tmp_path / "photos", tmp_path / "db"
    photos.mkdir()
    names = ["new\nline.png", "tab\there.png", "plain.png", "esc\x1b.png"]
    for i, name in enumerate(names):
        pattern(i).save(photos / name)
    library = Library(db=db, model=world["checkpoint"], text_precision="float32")
    library.index([photos], workers=0, progress=False)
    hits = library.search("dog", k=3, metadata=False)
    escaped = ["new\\nline.png", "tab\\there.png", "plain.png", "esc\\x1b.png"]  # as repr() shows them
    shown = {str(photos / n): str(photos / e) for n, e in zip(names, escaped, strict=True)}
    table = "rank   score  path\n" + "".join(f"{h.rank:>4}  {h.score:>6.3f}  {shown[h.path]}\n" for h in hits)
    expected = {
        (): table,
        ("--plain",): "".join(f"{h.score:.3f}\t{shown[h.path]}\n" for h in hits),
        ("-f",): "".join(h.path + "\n" for h in hits),
        ("-0",): "".join(h.path + "\0" for h in hits),
        ("--paths", "--null"): "".join(h.path + "\0" for h in hits),
        ("-f0",): "".join(h.path + "\0" for h in hits),
    }
    for options, output in expected.items():
        for top in (["-n", "3"], ["-t", "3"], ["--top=3"]):
            result = run(world, "query", "dog", *top, *options, db=db)
            assert (result.exit_code, result.stdout) == (0, output), (options, top)
    everything = run(world, "query", "dog", "-t", "10", "-0", db=db).stdout
    assert sorted(everything.split("\0")[:-1]) == sorted(str(photos / n) for n in names)
    similar = run(world, "similar", str(photos / "plain.png"), "-0", db=db).stdout
    assert sorted(similar.split("\0")[:-1]) == sorted(str(photos / n) for n in names if n != "plain.png")

    for options, message in (
        (("--json", "--plain"), "--json and --plain"),
        (("--plain", "-0"), "--plain and --null"),
        (("-f", "--json", "-0"), "--json and --null"),
    ):
        result = run(world, "query", "dog", *options, db=db)
        assert result.exit_code == 2
        assert result.output.splitlines()[-1] == f"Error: {message} cannot be used together; choose one output format"


def test_similar_finds_near_duplicates_first(world, tmp_path):
    photos = world["photos"]
    dups = {str(photos / n) for n in ("dup_reencoded.jpg", "dup_resized.png", "dup_cropped.png")}
    result = run(world, "similar", str(photos / "sub" / "p00.jpg"), "--paths", "-n", "3")
    assert result.exit_code == 0, result.output
    assert set(result.output.splitlines()) == dups  # the image itself is left out

    outside = tmp_path / "query.png"  # not in the store: encoded on the fly, and its original comes first
    shutil.copy(photos / "sub" / "p00.jpg", outside.with_suffix(".jpg"))
    result = run(world, "similar", str(outside.with_suffix(".jpg")), "--json", "-n", "4")
    hits = json_lines(result.output)
    assert hits[0]["path"] == str(photos / "sub" / "p00.jpg") and hits[0]["score"] == pytest.approx(1.0, abs=1e-5)
    assert {h["path"] for h in hits[1:]} == dups


def test_combined_query_matches_its_definition(world):
    photos = world["photos"]
    image = photos / "p01.png"
    result = run(world, "query", "2:red", "+", str(image), "-", "blue", "--json", "-n", "20")
    assert result.exit_code == 0, result.output
    library = Library(db=world["db"], model=world["checkpoint"])
    expected = library.search([(2, "red"), (1, image), (-1, "blue")], k=20)
    hits = json_lines(result.output)
    assert sorted(h["path"] for h in hits) == sorted(r.path for r in expected)
    # The same order, up to near-ties (the near-duplicates) that the in-process bf16 text tower may swap.
    score = {r.path: r.score for r in expected}
    assert all(score[a["path"]] >= score[b["path"]] - 1e-3 for a, b in itertools.pairwise(hits))
    model, _ = load_model(world["checkpoint"], towers="text")
    red, blue = encode_texts(model, ["red", "blue"])
    ids, paths, vectors = stored(world)
    picture = vectors[paths.index(str(image))]
    combined = 2 * red + picture - blue
    combined /= np.linalg.norm(combined)
    assert expected[0].path == paths[int(np.argmax(vectors @ combined))]


def test_filters_hold_and_still_fill_k(world):
    photos = world["photos"]
    inside = json_lines(run(world, "query", "dog", "--in", str(photos / "sub"), "--json", "-n", "3").output)
    assert len(inside) == 3 and all(h["path"].startswith(str(photos / "sub") + "/") for h in inside)

    pngs = json_lines(run(world, "query", "dog", "--where", "format = 'PNG'", "--json").output)
    assert len(pngs) == 8 and all(h["format"] == "PNG" for h in pngs)  # 6 patterns + 2 duplicates

    dated = json_lines(run(world, "query", "dog", "--after", "2014-01-01", "--before", "2020-01-01", "--json").output)
    assert sorted(h["taken_at"][:4] for h in dated) == ["2014", "2016", "2018"]

    result = run(world, "query", "dog", "--where", "no_such_column = 1")
    assert result.exit_code == 1 and result.output.startswith("Error: invalid filter")


def test_in_a_missing_folder_is_an_error(world, tmp_path):
    """A typo in --in says so; a folder that is gone but still indexed (an unmounted disk) is searched."""
    missing = tmp_path / "no-such-folder"
    for command in (["query", "dog"], ["similar", str(world["photos"] / "p01.png")]):
        result = run(world, *command, "--in", str(missing))
        assert result.exit_code == 1
        assert (
            result.output
            == f"Error: --in {missing}: no such folder, and no indexed image is under it; check the path\n"
        )
    (tmp_path / "empty").mkdir()
    result = run(world, "query", "dog", "--in", str(tmp_path / "empty"))
    assert (result.exit_code, result.stdout, result.stderr) == (0, "", "no results\n")

    photos, db = tmp_path / "photos", tmp_path / "db"
    shutil.copytree(world["photos"] / "sub", photos)
    Library(db=db, model=world["checkpoint"]).index([photos], workers=0, progress=False)
    photos.rename(tmp_path / "unmounted")
    result = run(world, "query", "dog", "--in", str(photos), "--paths", db=db)
    assert result.exit_code == 0
    assert sorted(result.output.splitlines()) == [str(photos / n) for n in ("p00.jpg", "p03.png", "p06.jpg", "p09.png")]


def test_threshold(world):
    hits = json_lines(run(world, "query", "dog", "--json", "-n", "15").output)
    cut = (hits[4]["score"] + hits[5]["score"]) / 2  # between the 5th and 6th score (JSON rounds them)
    kept = json_lines(run(world, "query", "dog", "--json", "-n", "15", "--threshold", str(cut)).output)
    assert [h["path"] for h in kept] == [h["path"] for h in hits[:5]]
    result = run(world, "query", "dog", "--threshold", "1.01")
    assert result.exit_code == 0 and result.stdout == ""


def test_negative_numbers_are_option_values(world):
    """`--threshold -0.5` and `-n -1` reach click as they were typed, next to a negative-weight term."""
    photo = str(world["photos"] / "p01.png")
    for command in (["query", "dog", "-0.5:night"], ["similar", photo]):
        spaced = run(world, *command, "--threshold", "-0.5", "--json", "-n", "15")
        assert spaced.exit_code == 0, spaced.output
        joined = run(world, *command, "--threshold=-0.5", "--json", "-n", "15")
        # the first text query ran in torch and exported the text tower, the second runs in ONNX Runtime
        spaced_hits, joined_hits = json_lines(spaced.output), json_lines(joined.output)
        assert [h["path"] for h in spaced_hits] == [h["path"] for h in joined_hits]
        np.testing.assert_allclose([h["score"] for h in spaced_hits], [h["score"] for h in joined_hits], atol=1e-5)
        assert all(h["score"] >= -0.5 for h in spaced_hits)
        refused = run(world, *command, "-n", "-1")
        assert refused.exit_code == 2
        assert refused.output.splitlines()[-1] == f"Error: Invalid value for '-n' / '-t' / '--top': {OUT_OF_RANGE}"


def test_a_number_colon_text_is_searched_as_written(world):
    result = run(world, "query", "16:9 screenshot", "--json", "-n", "15")
    assert result.exit_code == 0, result.output
    model, _ = load_model(world["checkpoint"], towers="text")
    _, paths, vectors = stored(world)
    scores = vectors @ encode_texts(model, ["16:9 screenshot"])[0]
    hits = json_lines(result.output)
    assert [h["path"] for h in hits] == [paths[i] for i in np.argsort(-scores)]
    np.testing.assert_allclose([h["score"] for h in hits], np.sort(scores)[::-1], atol=1e-5)


def test_deleted_files_never_come_back(world, tmp_path):
    photos = tmp_path / "photos"
    shutil.copytree(world["photos"], photos)
    db = tmp_path / "db"
    library = Library(db=db, model=world["checkpoint"])
    library.index([photos], workers=0, progress=False)
    doomed = photos / "dup_cropped.png"
    before = run(world, "similar", str(photos / "sub" / "p00.jpg"), "--paths", "-n", "20", db=db).output
    assert str(doomed) in before
    doomed.unlink()
    library.index([photos], workers=0, progress=False)
    for args, count in ((("similar", str(photos / "sub" / "p00.jpg")), 13), (("query", "anything"), 14)):
        output = run(world, *args, "--paths", "-n", "50", db=db).output
        assert str(doomed) not in output and len(output.splitlines()) == count

    # an indexed file changed since: `similar` reads it again instead of trusting its stored vector
    shutil.copy(photos / "p05.png", photos / "sub" / "p00.jpg")
    output = run(world, "similar", str(photos / "sub" / "p00.jpg"), "--paths", "-n", "1", db=db).output
    assert output == f"{photos / 'p05.png'}\n"


def test_clear_errors(world, tmp_path):
    result = run(world, "query", "dog", db=tmp_path / "nothing")
    assert result.exit_code == 1 and result.output.startswith("Error: no image store at")

    empty = tmp_path / "empty"
    model, _ = load_model(world["checkpoint"], towers="text")
    Store.open(empty, model.info, create=True)
    result = run(world, "query", "dog", db=empty)
    assert result.exit_code == 1  # checked before the model loads, so it names the model as given
    assert result.output == (
        f"Error: no images indexed for model {str(world['checkpoint'])!r} in {empty}; "
        "run `clipsearch index FOLDER` first\n"
    )

    other = tiny_checkpoint(tmp_path / "other", seed=1)
    result = CliRunner().invoke(cli, ["query", "dog", "--model", str(other), "--db", str(world["db"])])
    assert result.exit_code == 1 and "(it has: tiny-0)" in result.output and len(result.output.splitlines()) == 1

    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    for args in (("similar", str(broken)), ("query", str(broken))):
        result = run(world, *args)
        assert result.exit_code == 1 and str(broken) in result.output and len(result.output.splitlines()) == 1
    result = run(world, "similar", str(tmp_path / "missing.jpg"))
    assert result.exit_code == 1 and "no such file" in result.output
    for command in ("query", "similar"):
        result = run(world, command, "https://example.com/dog.jpg")
        assert (result.exit_code, result.output) == (
            1,
            "Error: query term https://example.com/dog.jpg: URLs are not fetched; download the image first and give "
            "its path\n",
        )


@pytest.fixture
def unfetchable(tmp_path, monkeypatch):
    """A registry model that is not cached and cannot be fetched (its URL is a closed loopback port)."""
    from retrieval.model import registry

    spec = registry.ModelSpec("ViT-T/0", "never fetched", url="http://127.0.0.1:9/vit-t-0.pt", sha256="0" * 64)
    monkeypatch.setitem(registry._REGISTRY, spec.name, spec)
    monkeypatch.setenv("CLIPSEARCH_CACHE", str(tmp_path / "cache"))
    return spec


def test_nothing_to_search_fails_before_a_model_loads(world, tmp_path, unfetchable):
    """No store, an empty one, or one without this model's images: said at once, never after a download."""
    missing, empty = tmp_path / "missing", tmp_path / "empty"
    Store.open(empty, load_model(world["checkpoint"], towers="text")[0].info, create=True)
    expected = {
        missing: f"Error: no image store at {missing}; run `clipsearch index FOLDER` first\n",
        empty: f"Error: no images indexed for model 'ViT-T/0' in {empty}; run `clipsearch index FOLDER` first\n",
        world["db"]: f"Error: the store at {world['db']} has no images indexed with model 'ViT-T/0' (it has: tiny-0); "
        "pass --model with one of those, or run `clipsearch index FOLDER --model ViT-T/0`\n",
    }
    for command in (["query", "dog"], ["similar", str(world["photos"] / "p01.png")]):
        for db, message in expected.items():
            result = CliRunner().invoke(cli, [*command, "--model", "ViT-T/0", "--db", str(db)])
            assert (result.exit_code, result.output) == (1, message)
    assert not (tmp_path / "cache").exists()  # nothing was downloaded, nor even started


CUT_WARNING = (
    "WARNING retrieval.model.query_text: "
    "the query text is longer than the model's 77 tokens; only the first part is used\n"
)


def test_a_query_cut_at_77_tokens_is_warned_about_once(world, caplog):
    """One line on stderr however many texts (or prompt templates) run over; none when the text fits."""
    fits, too_long = " ".join(["red"] * 75), " ".join(["red"] * 76)  # 75 tokens + start and end = 77
    main = [sys.executable, "-c", "from clipsearch.cli import main; main()"]
    options = ["--paths", "-n", "1", "--model", str(world["checkpoint"]), "--db", str(world["db"])]
    for terms, warning in (([fits], ""), ([too_long, "-", "blue " * 80, "--ensemble"], CUT_WARNING)):
        done = subprocess.run([*main, "query", *terms, *options], capture_output=True, text=True, timeout=300)
        assert (done.returncode, done.stderr) == (0, warning), terms
        assert len(done.stdout.splitlines()) == 1

    library = Library(db=world["db"], model=world["checkpoint"])
    for query, ensemble, cut in ((fits, False, False), (too_long, False, True), ("blue", True, False)):
        caplog.clear()
        library.encode(query, ensemble=ensemble)
        assert [r.getMessage() + "\n" for r in caplog.records] == ([CUT_WARNING.split(": ", 1)[1]] if cut else [])


def test_ensemble_averages_the_prompt_templates(world):
    from retrieval.query import IMAGENET_TEMPLATES

    result = run(world, "query", "dog", "--ensemble", "--json", "-n", "15")
    assert result.exit_code == 0, result.output
    model, _ = load_model(world["checkpoint"], towers="text")
    prompts = encode_texts(model, [t.format("dog") for t in IMAGENET_TEMPLATES])
    query = prompts.mean(axis=0) / np.linalg.norm(prompts.mean(axis=0))
    _, paths, vectors = stored(world)
    hits = json_lines(result.output)
    assert sorted(h["path"] for h in hits) == sorted(paths)
    # FAISS and numpy round differently: near-ties may swap, so each rank's score is checked, within rounding
    scores = dict(zip(paths, vectors @ query, strict=True))
    np.testing.assert_allclose([scores[h["path"]] for h in hits], np.sort(vectors @ query)[::-1], atol=1e-5)


def test_a_text_query_loads_no_indexer_no_store_and_no_image_tower(world):
    code = (
        "import json, sys\n"
        "from click.testing import CliRunner\n"
        "from clipsearch.cli import cli\n"
        f"r = CliRunner().invoke(cli, ['query', 'dog', '--model', {str(world['checkpoint'])!r}, "
        f"'--db', {str(world['db'])!r}])\n"
        "assert r.exit_code == 0, r.output\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in ('indexer', 'lancedb', 'retrieval'))))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    loaded = json.loads(done.stdout)
    assert "retrieval.ann" in loaded  # the saved index answered: neither LanceDB nor the store were imported
    assert not [m for m in loaded if m.split(".")[0] in ("indexer", "lancedb") or m == "retrieval.store"]
    library = Library(db=world["db"], model=world["checkpoint"])
    library.search("dog")
    assert list(library._models) == ["text"]

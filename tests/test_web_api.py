"""The web app's JSON API through Starlette's in-process TestClient, over a real store of generated shapes
indexed with shapes-mini (built once for the module), a real FAISS index and real files on disk."""

from __future__ import annotations

import io
import itertools
import json
import os
import threading
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from starlette.testclient import TestClient

from clipsearch.library import Library
from clipsearch.web.app import create_app, start_warm_up
from retrieval.query import Term
from retrieval.regions import Box, StoredImage
from retrieval.shapes import COLOURS, SHAPES, Attributes, generate, render

BASE = "http://127.0.0.1:8765"


def scene(shape: str, colour: str, seed: int) -> Image.Image:
    """One large object in the middle of a flat grey background."""
    return render(Attributes(shape, colour, "large", "centre", "grey", "flat"), 128, seed=seed)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Two indexed roots: `photos` (40 random scenes with EXIF, four red circles, four blue squares, and one picture
    of a red circle beside a blue square) and `more` (three files the security tests damage)."""
    root = tmp_path_factory.mktemp("web")
    photos, more = root / "photos", root / "more"
    samples = generate(photos / "random", 40, seed=7, size_range=(96, 160))
    for i in range(4):
        scene("circle", "red", i).save(photos / f"red-circle-{i}.png")
        scene("square", "blue", 10 + i).save(photos / f"blue-square-{i}.png")
    pair = Image.new("RGB", (256, 128))
    pair.paste(scene("circle", "red", 99), (0, 0))
    pair.paste(scene("square", "blue", 98), (128, 0))
    pair.save(photos / "pair.png")
    more.mkdir()
    for i in range(3):
        scene("star", "yellow", 20 + i).save(more / f"victim-{i}.png")
    library = Library(db=root / "db", model="shapes-mini", row_cache=True)  # as `clipsearch serve` has it
    library.index([photos, more], workers=0, progress=False)
    ids = {str(p.relative_to(root)): library.store().id_for_path(p) for p in [*photos.rglob("*.*"), *more.iterdir()]}
    client = TestClient(create_app(library), base_url=BASE)
    return {"root": root, "library": library, "client": client, "ids": ids, "samples": samples}


def get(world, path, **params):
    return world["client"].get(path, params=params)


def search(world, **params) -> dict:
    response = get(world, "/api/search", **params)
    assert response.status_code == 200, response.text
    return response.json()


def names(body: dict) -> list[str]:
    return [f"{hit['root']}/{hit['path']}" for hit in body["results"]]


def test_status_says_what_the_store_holds_without_absolute_paths(world):
    response = get(world, "/api/status")
    assert response.status_code == 200 and response.headers["cache-control"] == "no-store"
    status = response.json()
    assert status["images"] == 52 and status["model"] == "shapes-mini" and status["db"] == "db"
    assert status["roots"] == [{"name": "photos"}, {"name": "more"}]
    (entry,) = status["models"]
    assert entry["count"] == 52 and entry["state"] == "complete" and entry["last_run"]["roots"] == ["photos", "more"]
    assert str(world["root"]) not in response.text


def test_a_text_search_answers_hits_with_relative_paths_and_metadata(world):
    body = search(world, q="a red circle", threshold="none", k=8)
    assert body["offset"] == 0 and body["k"] == 8 and body["next_offset"] == 8 and body["total_hint"] == 52
    hits = body["results"]
    assert [h["rank"] for h in hits] == list(range(1, 9))
    assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)
    assert sum(name.startswith("photos/red-circle-") for name in names(body)[:4]) >= 3
    first = hits[0]
    assert (
        first["id"].isdigit() and first["thumb"] == f"/thumb/{first['id']}" and first["file"] == f"/file/{first['id']}"
    )
    assert {"width", "height", "format", "taken_at", "camera"} <= set(first)
    assert str(world["root"]) not in json.dumps(body)
    jpegs = search(world, q="a shape", threshold="none", k=60, where="format = 'JPEG' AND camera_model IS NOT NULL")[
        "results"
    ]
    assert jpegs and all(h["camera"] and datetime.fromisoformat(h["taken_at"]) for h in jpegs)


def test_pages_cover_the_ranking_without_duplicates_or_gaps(world):
    whole = search(world, q="a green triangle", threshold="none", k=100, **{"in": "photos"})
    assert len(whole["results"]) == 49 and whole["next_offset"] is None and whole["total_hint"] == 49
    seen, offset = [], 0
    while offset is not None:
        body = search(world, q="a green triangle", threshold="none", k=6, offset=offset, **{"in": "photos"})
        assert [h["rank"] for h in body["results"]] == list(range(offset + 1, offset + 1 + len(body["results"])))
        seen += [h["id"] for h in body["results"]]
        offset = body["next_offset"]
    assert seen == [h["id"] for h in whole["results"]]
    assert search(world, q="x", threshold="none", k=5, offset=200)["results"] == []


def test_filters_by_folder_date_and_sql(world):
    assert {h["root"] for h in search(world, q="a shape", threshold="none", k=100, **{"in": "more"})["results"]} == {
        "more"
    }
    sub = search(world, q="a shape", threshold="none", k=100, **{"in": "photos/random"})["results"]
    assert len(sub) == 40 and all(h["path"].startswith("random/") for h in sub)
    dated = sorted(datetime.fromisoformat(h["taken_at"]) for h in sub if h["taken_at"])
    middle = dated[len(dated) // 2]
    day = middle.date().isoformat()
    after = search(world, q="a shape", threshold="none", k=100, after=day)["results"]
    before = search(world, q="a shape", threshold="none", k=100, before=day)["results"]
    assert after and before and len(after) + len(before) == len(dated)
    assert all(datetime.fromisoformat(h["taken_at"]).date().isoformat() >= day for h in after)
    assert all(datetime.fromisoformat(h["taken_at"]).date().isoformat() < day for h in before)
    pngs = search(world, q="a shape", threshold="none", k=100, where="format = 'PNG' AND width = 128")["results"]
    assert len(pngs) == 11 and all(h["format"] == "PNG" for h in pngs)


@pytest.mark.parametrize(
    "params",
    [
        {},
        {"q": "   "},
        {"q": "x", "k": "0"},
        {"q": "x", "k": "501"},
        {"q": "x", "k": "ten"},
        {"q": "x", "k": "-1"},
        {"q": "x", "k": "\u00b2"},  # a digit to str.isdigit(), not to int()
        {"q": "x", "offset": "\u0967"},
        {"q": "x" * 1001},
        {"q": "x", "after": "\u0662\u0660\u0662\u0663-01-01"},
        {"q": "x", "offset": "-1"},
        {"q": "x", "offset": "1e3"},
        {"q": "x", "after": "2023-13-01"},
        {"q": "x", "before": "yesterday"},
        {"q": "x", "after": "2023-02-30"},
        {"q": "x", "where": "no_such_column = 1"},
        {"q": "x", "where": "format = = "},
        {"q": "x", "where": "cast(path as int) > 0"},  # its error would quote an absolute path
        {"q": "x", "where": "\"PATH\" LIKE '/home/%'"},
        {"q": "x", "where": "path_bytes IS NOT NULL"},
        {"q": "x", "in": "../etc"},
        {"q": "x", "in": "photos/../../etc"},
        {"q": "x", "in": "/etc"},
        {"q": "x", "in": "nowhere"},
        {"q": "x", "box": "0,0,1,1"},
        {"like": "1", "box": "0,0,2,1"},
        {"like": "1", "box": "0.5,0,0.4,1"},
        {"like": "1", "box": "a,b,c,d"},
        {"q": "x", "colour": "red"},
        {"q": "x", "threshold": "high"},
        {"q": "x", "threshold": "2"},
        {"q": "x", "threshold": "nan"},
        {"q": "x", "weak": "maybe"},
    ],
)
def test_bad_parameters_are_400_with_a_one_line_error(world, params):
    response = get(world, "/api/search", **params)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error and "\n" not in error and "Traceback" not in error


def absent_query(world) -> str:
    """A "a {colour} {shape}" query the store holds no picture of and `Library.search` answers "no good match"."""
    present = {(o.colour, o.shape) for sample in world["samples"] for o in sample.attributes.objects}
    present |= {("red", "circle"), ("blue", "square"), ("yellow", "star")}
    for colour, shape in itertools.product(COLOURS, SHAPES):
        query = f"a {colour} {shape}"
        if (colour, shape) not in present and not world["library"].search(query, k=5, threshold="auto"):
            return query
    raise AssertionError("every combination has a good match")


def test_a_text_search_is_cut_at_the_calibrated_cutoff_by_default(world):
    body = search(world, q="a red circle", k=100)
    expected = world["library"].search("a red circle", k=100, threshold="auto")
    assert 4 <= len(expected) < 52 and [h["id"] for h in body["results"]] == [str(r.metadata["id"]) for r in expected]
    assert body["threshold"] == "auto" and body["no_good_match"] is False and body["next_offset"] is None
    assert not any(h["weak"] for h in body["results"])
    assert (
        min(h["score"] for h in body["results"])
        >= body["cutoff"]
        > max(h["score"] for h in search(world, q="a red circle", k=100, threshold="none")["results"][len(expected) :])
    )
    seen, offset = [], 0  # the pages of a cut ranking fit together and end where it ends
    while offset is not None:
        page = search(world, q="a red circle", k=3, offset=offset)
        seen += [h["id"] for h in page["results"]]
        offset = page["next_offset"]
    assert seen == [h["id"] for h in body["results"]]
    library_page = world["library"].search_page("a red circle", k=3, offset=3, threshold="auto")
    assert [str(r.metadata["id"]) for r in library_page.results] == seen[3:6]


def test_no_good_match_answers_nothing_and_the_weak_matches_on_request(world):
    query = absent_query(world)
    body = search(world, q=query)
    assert body["results"] == [] and body["no_good_match"] is True and body["cutoff"] is None
    assert body["next_offset"] is None and body["total_hint"] == 52
    weak = search(world, q=query, weak="1", k=10)
    ranking = search(world, q=query, threshold="none", k=10)
    assert [h["id"] for h in weak["results"]] == [h["id"] for h in ranking["results"]]
    assert all(h["weak"] for h in weak["results"]) and weak["no_good_match"] is True
    assert not any(h["weak"] for h in ranking["results"]) and ranking["threshold"] is None
    assert [h["rank"] for h in search(world, q=query, weak="1", k=4, offset=4)["results"]] == [5, 6, 7, 8]


def test_image_queries_have_no_cutoff_unless_given_a_number(world):
    row_id = str(world["ids"]["photos/red-circle-0.png"])
    like = search(world, like=row_id, k=51)
    assert len(like["results"]) == 51 and like["threshold"] is None and like["cutoff"] is None
    cut = search(world, like=row_id, k=51, threshold="0.9")
    assert cut["results"] and all(h["score"] >= 0.9 for h in cut["results"]) and cut["cutoff"] == 0.9
    assert [h["id"] for h in cut["results"]] == [h["id"] for h in like["results"]][: len(cut["results"])]
    marked = search(world, like=row_id, k=51, threshold="0.9", weak="1")["results"]
    assert [h["weak"] for h in marked] == [h["score"] < 0.9 for h in marked] and any(h["weak"] for h in marked)
    refused = get(world, "/api/search", like=row_id, threshold="auto")
    assert refused.status_code == 400 and "calibrated for text queries only" in refused.json()["error"]
    posted = world["client"].post("/api/search", json={"terms": [{"text": "a red circle"}, {"id": row_id}], "k": 51})
    assert posted.status_code == 200 and len(posted.json()["results"]) == 51 and posted.json()["threshold"] is None
    text_only = world["client"].post("/api/search", json={"terms": [{"text": "a red circle"}], "k": 51})
    assert [h["id"] for h in text_only.json()["results"]] == [
        h["id"] for h in search(world, q="a red circle", k=51)["results"]
    ]


def test_more_like_this_leaves_the_image_out(world):
    row_id = world["ids"]["photos/red-circle-0.png"]
    body = search(world, like=str(row_id), k=5)
    assert str(row_id) not in [h["id"] for h in body["results"]]
    assert all(n.startswith("photos/red-circle-") for n in names(body)[:3]), names(body)
    page = world["library"].similar_to_id(row_id, k=5)
    assert [h["id"] for h in body["results"]] == [str(r.metadata["id"]) for r in page.results]


@pytest.mark.parametrize("bad", ["abc", "12a", "-1", "1.0", "999999999", "../../etc/passwd", "1 OR 1=1", "0x10"])
def test_unknown_or_malformed_ids_are_404(world, bad):
    response = get(world, "/api/search", like=bad)
    assert response.status_code == 404 and response.json()["error"]
    posted = world["client"].post("/api/search", json={"terms": [{"id": bad}]})
    assert posted.status_code == 404 and posted.json()["error"]


@pytest.mark.parametrize(
    "path",
    [
        "/thumb/abc",
        "/thumb/..%2f..%2fetc%2fpasswd",
        "/file/%2e%2e%2f%2e%2e%2fetc%2fpasswd",
        "/file/%2e%2e",  # percent-encoded: the client would resolve a bare `..` to `/`, the page
        "/file/-1",
        "/file/1.0",
        "/file/99999999",
        "/file/%31%32abc",
        "/thumb/1/../../etc/passwd",
        "/static/../../../../etc/passwd",
        "/static/%2e%2e/%2e%2e/app.py",
        "/upload-thumb/../../etc/passwd",
        "/upload-thumb/uAAAAAAAAAAAAAAAA",
        "/etc/passwd",
    ],
)
def test_paths_in_urls_never_reach_the_file_system(world, path):
    response = world["client"].get(path)
    assert response.status_code == 404, (path, response.status_code, response.text[:200])
    assert response.headers["content-type"] == "application/json" and response.json()["error"]


def test_thumbnails_are_upright_small_cached_and_revalidated(world):
    client, library = world["client"], world["library"]
    rotated = next(s for s in world["samples"] if s.path.suffix == ".jpg" and _orientation(s.path) in (6, 8))
    row_id = world["ids"][str(rotated.path.relative_to(world["root"]))]
    response = client.get(f"/thumb/{row_id}")
    assert response.status_code == 200 and response.headers["content-type"] == "image/webp"
    content_hash = library.store().rows([row_id], columns=["content_hash"])[0]["content_hash"]
    assert response.headers["etag"] == f'"{content_hash}"'
    assert response.headers["cache-control"] == "private, max-age=31536000, immutable"
    with Image.open(io.BytesIO(response.content)) as thumb, Image.open(rotated.path) as original:
        assert max(thumb.size) <= 256 and thumb.format == "WEBP"
        upright = (original.height, original.width)  # orientation 6/8 turns the stored pixels sideways
        assert (thumb.width > thumb.height) == (upright[0] > upright[1])
    cached = library.db / "thumbs" / content_hash[:2] / f"{content_hash}-256.webp"
    assert cached.read_bytes() == response.content
    again = client.get(f"/thumb/{row_id}", headers={"If-None-Match": response.headers["etag"]})
    assert again.status_code == 304 and again.content == b"" and again.headers["etag"] == response.headers["etag"]
    assert client.get(f"/thumb/{row_id}", headers={"If-None-Match": '"other"'}).status_code == 200


def _orientation(path: Path) -> int:
    with Image.open(path) as image:
        return image.getexif().get(0x0112, 1)


def test_the_original_file_is_served_by_id(world):
    row_id = world["ids"]["photos/pair.png"]
    response = world["client"].get(f"/file/{row_id}")
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    assert response.content == (world["root"] / "photos" / "pair.png").read_bytes()
    assert response.headers["etag"].strip('"') == world["library"].image_file(row_id).content_hash
    part = world["client"].get(f"/file/{row_id}", headers={"Range": "bytes=0-7"})
    assert part.status_code == 206 and part.content == b"\x89PNG\r\n\x1a\n"


def test_a_box_over_each_half_finds_that_halfs_shape_first(world):
    pair = world["ids"]["photos/pair.png"]
    left = search(world, like=str(pair), box="0,0,0.5,1", k=4)
    right = search(world, like=str(pair), box="0.5,0,1,1", k=4)
    assert all(n.startswith("photos/red-circle-") for n in names(left)), names(left)
    assert all(n.startswith("photos/blue-square-") for n in names(right)), names(right)
    expected = world["library"].search_page(StoredImage(pair, Box(0.5, 0, 1, 1)), k=4)
    assert [h["id"] for h in right["results"]] == [str(r.metadata["id"]) for r in expected.results]


def upload(world, data: bytes, name: str = "x.png", client=None, field: str = "image"):
    return (client or world["client"]).post("/api/uploads", files={field: (name, data, "application/octet-stream")})


def png_bytes(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()


def test_an_upload_can_be_searched_whole_or_by_region_and_shows_a_thumbnail(world):
    data = (world["root"] / "photos" / "pair.png").read_bytes()
    response = upload(world, data)
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["upload"].startswith("u") and (body["width"], body["height"]) == (256, 128)
    assert body["thumb"] == f"/upload-thumb/{body['upload']}"
    thumb = world["client"].get(body["thumb"])
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/webp"
    assert world["client"].get(body["thumb"], headers={"If-None-Match": thumb.headers["etag"]}).status_code == 304
    whole = search(world, upload=body["upload"], k=1)
    assert names(whole) == ["photos/pair.png"] and whole["results"][0]["score"] > 0.999
    left = search(world, upload=body["upload"], box="0,0,0.5,1", k=4)
    assert all(n.startswith("photos/red-circle-") for n in names(left)), names(left)
    assert get(world, "/api/search", upload="uAAAAAAAAAAAAAAAA").status_code == 404
    assert "upload the image again" in get(world, "/api/search", upload="nope").json()["error"]


def test_a_weighted_combination_posted_as_json_matches_the_library(world):
    red, blue = world["ids"]["photos/red-circle-0.png"], world["ids"]["photos/blue-square-0.png"]
    uploaded = upload(world, png_bytes(scene("square", "blue", 55))).json()["upload"]
    terms = [
        {"text": "a red circle", "weight": 2},
        {"id": str(red), "weight": 1},
        {"upload": uploaded, "weight": -0.5},
        {"id": blue, "box": "0,0,1,1", "weight": 0.25},
    ]
    response = world["client"].post("/api/search", json={"terms": terms, "k": 5, "offset": 2, "in": "photos"})
    assert response.status_code == 200, response.text
    library = world["library"]
    upload_vector = world["client"].app.app.state.web.uploads[uploaded].vector
    query = [(2.0, Term(1.0, "text", "a red circle")), (1.0, StoredImage(red)), (-0.5, upload_vector)]
    query.append((0.25, StoredImage(blue, Box(0, 0, 1, 1))))
    expected = library.search_page(query, k=5, offset=2, in_dir=world["root"] / "photos")
    assert [h["id"] for h in response.json()["results"]] == [str(r.metadata["id"]) for r in expected.results]
    assert {str(red), str(blue)}.isdisjoint(h["id"] for h in response.json()["results"])
    np.testing.assert_allclose(
        [h["score"] for h in response.json()["results"]], [r.score for r in expected.results], atol=1e-5
    )


@pytest.mark.parametrize(
    "body",
    [
        "not json",
        "[1, 2]",
        "[" * 200_000,
        b"\xff\xfe{}",
        json.dumps({"terms": []}),
        json.dumps({"terms": "a dog"}),
        json.dumps({"terms": [{"text": "a"}], "colour": "red"}),
        json.dumps({"terms": [{"text": "a", "id": "1"}]}),
        json.dumps({"terms": [{}]}),
        json.dumps({"terms": [{"text": "a", "weight": "x"}]}),
        json.dumps({"terms": [{"text": "a", "weight": True}]}),
        json.dumps({"terms": [{"text": "a", "box": [0, 0, 1, 1]}]}),
        json.dumps({"terms": [{"text": ""}]}),
        json.dumps({"terms": [{"text": 5}]}),
        json.dumps({"terms": [{"id": "1", "box": [0, 0, 1]}]}),
        json.dumps({"terms": [{"text": "a"}], "k": "5x"}),
        json.dumps({"terms": [{"text": "a"}], "k": 2.5}),
        json.dumps({"terms": [{"text": "a"}], "after": 20230101}),
        json.dumps({"terms": [{"text": "a"}], "where": ["x"]}),
        json.dumps({"terms": [{"text": "a", "weight": 1}, {"text": "a", "weight": -1}]}),
        json.dumps({"terms": [{"text": "a"}] * 33}),
    ],
)
def test_bad_json_bodies_are_400(world, body):
    response = world["client"].post("/api/search", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 400, response.text
    assert response.json()["error"] and "\n" not in response.json()["error"]


def test_a_json_body_over_a_megabyte_is_413(world):
    body = json.dumps({"terms": [{"text": "x" * (1 << 20)}]})
    response = world["client"].post("/api/search", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 413 and response.json()["error"]


def test_uploads_that_are_not_images_too_large_or_bombs_are_4xx(world, tmp_path):
    text = upload(world, b"hello, I am a text file\n" * 10, name="notes.txt")
    assert text.status_code == 415 and "not an image" in text.json()["error"]
    assert upload(world, b"").status_code == 415
    assert upload(world, png_bytes(scene("ring", "red", 1)), field="file").status_code == 400
    plain = world["client"].post("/api/uploads", content=b"abc", headers={"content-type": "image/png"})
    assert plain.status_code == 400
    bomb = Image.new("1", (12_000, 12_000))  # 144 MP of zeros: a ~20 KB PNG that would decode to 432 MB of RGB
    data = io.BytesIO()
    bomb.save(data, "PNG")
    assert len(data.getvalue()) < 1 << 20
    refused = upload(world, data.getvalue())
    assert refused.status_code == 413 and "MP limit" in refused.json()["error"]

    small = TestClient(create_app(world["library"], max_upload_mb=0.05), base_url=BASE)
    big = os.urandom(200_000)
    assert upload(world, big, client=small).status_code == 413

    def chunks():  # no Content-Length: the limit holds while the body streams in
        yield b'--b\r\nContent-Disposition: form-data; name="image"; filename="x.png"\r\n\r\n'
        for _ in range(100):
            yield os.urandom(10_000)
        yield b"\r\n--b--\r\n"

    streamed = small.post("/api/uploads", content=chunks(), headers={"content-type": "multipart/form-data; boundary=b"})
    assert streamed.status_code == 413 and "limit" in streamed.json()["error"]


def test_text_that_names_a_local_file_or_a_url_is_only_ever_text(world):
    library = Library(db=world["library"].db, model="shapes-mini")
    client = TestClient(create_app(library), base_url=BASE)
    path = str(world["root"] / "photos" / "pair.png")
    as_text = client.get("/api/search", params={"q": path, "k": 3})
    assert as_text.status_code == 200 and "image" not in library._models  # the file was never read as an image
    assert client.get("/api/search", params={"q": "http://127.0.0.1:9/x.jpg", "k": 3}).status_code == 200


def test_every_response_carries_the_security_headers_and_no_cors(world):
    client = world["client"]
    for response in (
        client.get("/"),
        client.get("/api/status", headers={"Origin": "http://evil.example"}),
        client.get("/api/search", params={"q": "x"}),
        client.get("/thumb/abc"),
    ):
        headers = response.headers
        assert headers["x-content-type-options"] == "nosniff"
        assert headers["referrer-policy"] == "no-referrer"
        assert headers["content-security-policy"].startswith("default-src 'self'; img-src 'self' blob: data:;")
        assert "frame-ancestors 'none'" in headers["content-security-policy"]
        assert not [h for h in headers if h.startswith("access-control-")]
        assert headers["server-timing"].startswith("app;dur=")
    page = client.get("/")
    index = Path(__file__).parents[1] / "clipsearch" / "web" / "static" / "index.html"
    assert page.status_code == (200 if index.is_file() else 404)


@pytest.mark.parametrize("host", ["evil.example", "evil.example:8765", "127.0.0.1:9999", "localhost.evil:8765", ""])
def test_a_foreign_host_header_is_refused(world, host):
    response = world["client"].get("/api/status", headers={"Host": host})
    assert response.status_code == 421 and "Host" in response.json()["error"]


@pytest.mark.parametrize("host", ["127.0.0.1:8765", "localhost:8765", "[::1]:8765"])
def test_the_loopback_names_are_accepted(world, host):
    assert world["client"].get("/api/status", headers={"Host": host}).status_code == 200


def test_another_site_cannot_post_to_the_api(world):
    client = world["client"]
    evil = client.post("/api/search", json={"terms": [{"text": "x"}]}, headers={"Origin": "http://evil.example"})
    assert evil.status_code == 403
    same = client.post("/api/search", json={"terms": [{"text": "x"}]}, headers={"Origin": BASE})
    assert same.status_code == 200


def test_a_non_loopback_server_needs_its_token(world):
    with pytest.raises(ValueError, match="token"):
        create_app(world["library"], host="0.0.0.0")
    with pytest.raises(ValueError, match="at least 8"):
        create_app(world["library"], host="0.0.0.0", token="a b")
    token = "s3cret-token_1234"
    client = TestClient(create_app(world["library"], host="0.0.0.0", token=token), base_url="http://192.0.2.7:8765")
    assert client.get("/api/status").status_code == 401
    assert "token" in client.get("/api/status").json()["error"]
    assert client.get("/api/status", headers={"Authorization": "Bearer wrong-token"}).status_code == 401
    assert client.get("/api/status", headers={"Authorization": f"Bearer {token}"}).status_code == 200
    assert client.get("/thumb/abc", headers={"Authorization": f"Bearer {token}x"}).status_code == 401
    assert client.get("/?token=wrong-token-x", follow_redirects=False).status_code == 401
    opened = client.get(f"/?token={token}&q=red", follow_redirects=False)
    assert opened.status_code == 303 and opened.headers["location"] == "/?q=red"
    cookie = opened.headers["set-cookie"]
    assert cookie.startswith(f"clipsearch_token_8765={token};") and "HttpOnly" in cookie and "SameSite=Strict" in cookie
    assert client.get("/api/status").status_code == 200  # the client keeps the cookie, as a browser does


def test_a_deleted_or_swapped_file_is_not_served(world, tmp_path):
    client = world["client"]
    gone, swapped = world["ids"]["more/victim-0.png"], world["ids"]["more/victim-1.png"]
    for row_id in (gone, swapped):
        assert client.get(f"/file/{row_id}").status_code == 200
    (world["root"] / "more" / "victim-0.png").unlink()
    secret = tmp_path / "secret.png"
    scene("heart", "black", 3).save(secret)
    victim = world["root"] / "more" / "victim-1.png"
    victim.unlink()
    victim.symlink_to(secret)
    for row_id, why in ((gone, "gone"), (swapped, "no longer inside an indexed folder")):
        for path in (f"/file/{row_id}", f"/thumb/{row_id}"):
            response = client.get(path)
            assert response.status_code == 404 and why in response.json()["error"], (path, response.text)


def test_an_unexpected_error_is_a_json_500_without_details(world, monkeypatch):
    library = Library(db=world["library"].db, model="shapes-mini")
    client = TestClient(create_app(library), base_url=BASE, raise_server_exceptions=False)

    def broken():
        raise RuntimeError("secret internals /home/someone")

    monkeypatch.setattr(library, "roots", broken)
    response = client.get("/api/search", params={"q": "x"})
    assert response.status_code == 500 and response.json() == {"error": "internal error; see the server's log"}
    assert response.headers["x-content-type-options"] == "nosniff"


def test_a_warm_up_in_the_background_makes_searches_wait_or_say_why_they_cannot_run(world, tmp_path):
    library = Library(db=world["library"].db, model="shapes-mini", row_cache=True)
    app = create_app(library)
    calls = []
    start_warm_up(app, lambda images, error: calls.append((images, error))).join(timeout=300)
    assert calls == [(52, None)] and "text" in library._models and library._row_cache is not None
    assert TestClient(app, base_url=BASE).get("/api/search", params={"q": "x", "k": 1}).status_code == 200

    broken = create_app(Library(db=tmp_path / "none", model="shapes-mini"))
    start_warm_up(broken, lambda images, error: calls.append((images, error))).join(timeout=300)
    assert calls[1][0] is None and "no image store" in str(calls[1][1])
    client = TestClient(broken, base_url=BASE)
    assert client.get("/").status_code in (200, 404)  # the page does not need the store
    response = client.get("/api/search", params={"q": "x"})
    assert response.status_code == 503 and response.json()["error"].startswith("no image store at none;")
    assert str(tmp_path) not in response.text  # the store's absolute path is not handed out


def test_a_file_name_that_is_not_utf8_is_shown_escaped_and_still_served(tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    name = os.fsdecode(b"caf\xe9.png")
    scene("ring", "green", 1).save(photos / name)
    library = Library(db=tmp_path / "db", model="shapes-mini", row_cache=True)
    library.index([photos], workers=0, progress=False)
    client = TestClient(create_app(library), base_url=BASE)
    (hit,) = client.get("/api/search", params={"q": "a ring", "threshold": "none"}).json()["results"]
    assert (hit["root"], hit["path"]) == ("photos", "caf\\xe9.png")
    served = client.get(hit["file"])
    assert served.status_code == 200 and served.content == (photos / name).read_bytes()
    assert client.get(hit["thumb"]).status_code == 200


def test_status_names_a_model_given_as_a_checkpoint_path_by_its_name(tmp_path, tiny):
    photos = tmp_path / "photos"
    photos.mkdir()
    scene("ring", "green", 1).save(photos / "ring.png")
    library = Library(db=tmp_path / "db", model=tiny)
    library.index([photos], workers=0, progress=False)
    response = TestClient(create_app(library), base_url=BASE).get("/api/status")
    assert response.status_code == 200 and response.json()["model"] == "tiny"
    assert str(tmp_path) not in response.text and str(tiny) not in response.text


def one_line_error(response, status: int) -> str:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error and "\n" not in error and "Traceback" not in error
    return error


def test_a_concept_is_learned_from_stored_ids_listed_searched_and_forgotten(world):
    client, ids = world["client"], world["ids"]
    reds = [str(ids[f"photos/red-circle-{i}.png"]) for i in range(4)]
    blues = [str(ids[f"photos/blue-square-{i}.png"]) for i in range(4)]
    assert "reds" not in [c["name"] for c in client.get("/api/concepts").json()["concepts"]]
    learned = client.post(
        "/api/concepts", json={"name": "reds", "positives": reds, "negatives": blues, "method": "probe"}
    )
    assert learned.status_code == 201, learned.text
    concept = learned.json()["concept"]
    assert concept["name"] == "reds" and concept["query"] == "@reds" and concept["method"] == "probe"
    assert concept["examples"] == 4 and concept["negatives"] == 4 and 0 <= concept["accuracy"] <= 1
    assert str(world["root"]) not in learned.text  # the examples' paths stay on the server
    listed = client.get("/api/concepts").json()["concepts"]
    assert [c for c in listed if c["name"] == "reds"] == [concept]
    (stored,) = [c for c in world["library"].concepts() if c.name == "reds"]
    assert set(stored.example_ids) == {int(i) for i in reds} and set(stored.negative_ids) == {int(i) for i in blues}

    found = search(world, q="@reds", k=10)  # a probe alone ranks by its probability, shown as the score
    expected = world["library"].search("@reds", k=10)
    assert [h["id"] for h in found["results"]] == [str(r.metadata["id"]) for r in expected]
    assert sum(h["id"] in reds for h in found["results"][:5]) >= 3 and found["threshold"] is None
    assert all(0 <= h["score"] <= 1 for h in found["results"])
    sure = search(world, q="@reds", k=52, threshold="0.5")["results"]
    assert sure and all(h["score"] >= 0.5 for h in sure) and {h["id"] for h in sure} >= set(reds)
    combined = search(world, q="@reds on a grey background", k=10)
    together = world["library"].search("@reds on a grey background", k=10)
    assert [h["id"] for h in combined["results"]] == [str(r.metadata["id"]) for r in together]
    posted = client.post("/api/search", json={"terms": [{"text": "@reds"}, {"text": "a blue square", "weight": 0.5}]})
    assert posted.status_code == 200 and posted.json()["results"]

    unknown = one_line_error(get(world, "/api/search", q="@nope"), 400)
    assert "unknown concept @nope" in unknown and "@reds" in unknown
    assert client.delete("/api/concepts/reds").json() == {"removed": "reds"}
    assert "reds" not in [c["name"] for c in client.get("/api/concepts").json()["concepts"]]
    assert "unknown concept @reds" in one_line_error(client.delete("/api/concepts/reds"), 400)
    assert "unknown concept @reds" in one_line_error(get(world, "/api/search", q="@reds"), 400)


@pytest.mark.parametrize(
    ("body", "status", "says"),
    [
        ({"name": "2bad", "positives": ["1"]}, 400, "concept name '2bad'"),
        ({"name": "has space", "positives": ["1"]}, 400, "concept name"),
        ({"name": "x' OR '1'='1", "positives": ["1"]}, 400, "concept name"),
        ({"positives": ["1"]}, 400, "concept name"),
        ({"name": "ok", "positives": []}, 400, "positives must be a list of 1 to 1000 image ids"),
        ({"name": "ok", "positives": "1"}, 400, "positives must be a list"),
        ({"name": "ok", "positives": ["1"], "method": "svm"}, 400, "method must be one of probe, coop, auto"),
        ({"name": "ok", "positives": ["1"], "steps": 0}, 400, "steps must be from 1 to 2000"),
        ({"name": "ok", "positives": ["1"], "colour": "red"}, 400, "unknown field(s) ['colour']"),
        ({"name": "ok", "positives": ["../../etc/passwd"]}, 404, "an image id is the digits"),
        ({"name": "ok", "positives": ["999999999"]}, 404, "no image 999999999 in the store"),
    ],
)
def test_learning_refuses_bad_input_in_one_line(world, body, status, says):
    assert says in one_line_error(world["client"].post("/api/concepts", json=body), status)
    assert "ok" not in [c["name"] for c in world["client"].get("/api/concepts").json()["concepts"]]


def test_a_concept_name_in_a_url_is_checked_and_other_sites_cannot_learn_or_forget(world):
    client = world["client"]
    assert "concept name" in one_line_error(client.delete("/api/concepts/x' OR '1'='1"), 400)
    evil = {"Origin": "http://evil.example"}
    assert client.post("/api/concepts", json={"name": "evil", "positives": ["1"]}, headers=evil).status_code == 403
    assert client.delete("/api/concepts/evil", headers=evil).status_code == 403


def test_learning_runs_off_the_event_loop(world):
    app = create_app(world["library"])
    web = app.app.state.web
    reds = [str(world["ids"][f"photos/red-circle-{i}.png"]) for i in range(4)]
    answers = {}
    with TestClient(app, base_url=BASE) as client:
        body = {"name": "slow_reds", "positives": reds, "method": "coop", "steps": 400}
        learning = threading.Thread(target=lambda: answers.update(learned=client.post("/api/concepts", json=body)))
        learning.start()
        deadline = time.monotonic() + 120  # a safety net: the loop ends when the learning holds the library
        while not web.lock.locked() and learning.is_alive() and time.monotonic() < deadline:
            time.sleep(0.005)
        assert web.lock.locked(), "the learning never started"
        page = client.get("/")  # served by the event loop while the learning runs on a worker thread
        assert page.status_code == 200 and web.lock.locked() and learning.is_alive()
        learning.join(timeout=600)
    assert answers["learned"].status_code == 201, answers["learned"].text
    assert answers["learned"].json()["concept"]["method"] == "coop"
    assert client.delete("/api/concepts/slow_reds").status_code == 200


class CountingTable:
    """A store's real LanceDB table, counting how often its version is asked for."""

    def __init__(self, table) -> None:
        self.table, self.version_reads = table, 0

    def __getattr__(self, name):
        return getattr(self.table, name)

    @property
    def version(self):
        self.version_reads += 1
        return self.table.version


def test_a_search_page_reads_the_store_version_once_and_searches_the_index_once(world, monkeypatch):
    library = world["library"]
    store, index = library.store(), library.ann_index()
    counting = CountingTable(store._table)
    monkeypatch.setattr(store, "_table", counting)
    searches = []
    search_index = index.search
    monkeypatch.setattr(index, "search", lambda *args, **kw: searches.append(args[1]) or search_index(*args, **kw))
    page = library.search_page("a red circle", k=5, threshold="auto")
    assert page.results and counting.version_reads == 1 and len(searches) == 1
    assert store.version == counting.table.version  # unpinned again after the page


def test_auto_without_a_calibration_measures_the_spread_on_a_seeded_sample_kept_per_version(
    tmp_path, tiny, monkeypatch
):
    import clipsearch.library as library_module
    from retrieval.relevance import auto_cutoff

    generate(tmp_path / "photos", 12, seed=3, size_range=(64, 96))
    library = Library(db=tmp_path / "db", model=tiny)
    library.index([tmp_path / "photos"], workers=0, progress=False)
    monkeypatch.setattr(library_module, "SPREAD_SAMPLE", 5)
    store = library.store()
    sample = library._score_sample(store)
    assert sample.shape == (5, store.embed_dim) and library._score_sample(store) is sample  # read once per version
    ids, vectors = store.all_vectors()
    assert any(np.array_equal(sample[0], v) for v in vectors)  # stored vectors, drawn with a fixed seed
    again = Library(db=tmp_path / "db", model=tiny)
    assert np.array_equal(again._score_sample(again.store()), sample)
    vector = library.encode("a red circle")
    best = float((vectors @ vector).max())
    temperature = float(library._model("text")[0].logit_scale.detach().exp())
    expected = auto_cutoff(best, temperature, None, sample @ vector)
    assert library._auto_cutoff(best, vector, store) == pytest.approx(expected, abs=1e-6)

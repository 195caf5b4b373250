"""The page of `clipsearch serve` in a real headless Chromium (Playwright) against a real `clipsearch serve` process
over a store of generated shapes indexed with shapes-mini. What the page shows is compared with what the JSON API
answers for the same search. A failing test leaves `failure.png`, a screenshot of the page, in its tmp dir."""

from __future__ import annotations

from starlette.testclient import TestClient

from clipsearch.library import Library
from clipsearch.web.app import create_app, start_warm_up
from retrieval.shapes import generate


def test_an_empty_store_is_served_and_fills_without_a_restart(tmp_path):
    (tmp_path / "photos").mkdir()
    library = Library(db=tmp_path / "db", model="shapes-mini", row_cache=True)
    library.index([tmp_path / "photos"], workers=0, progress=False)
    app = create_app(library)
    ready = []
    start_warm_up(app, lambda images, error: ready.append((images, error))).join()
    assert ready == [(0, None)]
    client = TestClient(app, base_url="http://127.0.0.1:8765")
    status = client.get("/api/status")
    assert status.status_code == 200 and status.json()["images"] == 0
    empty = client.get("/api/search", params={"q": "a red circle"})
    assert empty.status_code == 503 and "run `clipsearch index FOLDER` first" in empty.json()["error"]

    generate(tmp_path / "photos", 3, seed=1, size_range=(96, 128))
    Library(db=tmp_path / "db", model="shapes-mini").index([tmp_path / "photos"], workers=0, progress=False)
    found = client.get("/api/search", params={"q": "a red circle"})
    assert found.status_code == 200 and len(found.json()["results"]) == 3

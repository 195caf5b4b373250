"""What a running server keeps between requests follows the store when `clipsearch index` changes it: a real store,
changed by another `Library` (as another process would) while the served one keeps its caches."""

from __future__ import annotations

import numpy as np
from starlette.testclient import TestClient

from clipsearch.library import Library
from clipsearch.web.app import create_app
from retrieval.shapes import generate

BASE = "http://127.0.0.1:8765"


def like(client: TestClient, row_id: int) -> tuple[int, list[tuple[str, float]]]:
    response = client.get("/api/search", params={"like": row_id, "k": 50})
    if response.status_code != 200:
        return response.status_code, []
    return 200, [(hit["id"], hit["score"]) for hit in response.json()["results"]]


def test_more_like_this_takes_each_stored_vector_from_the_version_served(tmp_path):
    photos, db = tmp_path / "photos", tmp_path / "db"
    old = generate(photos / "old", 12, seed=1, size_range=(64, 96))
    Library(db=db, model="shapes-mini").index([photos], workers=0, progress=False)
    served = Library(db=db, model="shapes-mini", row_cache=True)  # as `clipsearch serve` has it
    client = TestClient(create_app(served), base_url=BASE)
    store = served.store()

    def check_all() -> list[int]:
        """Every stored id's vector from the cache is the store's, and its "more like this" page is the one-shot
        library's (which reads the vector from the store)."""
        one_shot = Library(db=db, model="shapes-mini", text_precision="float32")
        ids = [int(i) for i in one_shot.store().ids()]
        for row_id in ids:
            assert np.array_equal(served._rows().vector(row_id), store.vectors_for([row_id])[0])
            expected = [
                (str(r.metadata["id"]), round(r.score, 6)) for r in one_shot.similar_to_id(row_id, k=50).results
            ]
            assert like(client, row_id) == (200, expected)
        return ids

    before = check_all()
    served_version = store.version
    for sample in old[:4]:  # the first rows go: every later row's position moves
        sample.path.unlink()
    generate(photos / "new", 5, seed=2, size_range=(64, 96))
    Library(db=db, model="shapes-mini").index([photos], workers=0, progress=False)
    assert store.version != served_version
    after = check_all()
    gone = sorted(set(before) - set(after))
    assert len(gone) == 4 and len(set(after) - set(before)) == 5
    for row_id in gone:
        assert like(client, row_id)[0] == 404


def test_the_roots_kept_between_requests_follow_an_index_run_that_adds_a_folder(tmp_path):
    db = tmp_path / "db"
    generate(tmp_path / "photos", 4, seed=1, size_range=(64, 96))
    Library(db=db, model="shapes-mini").index([tmp_path / "photos"], workers=0, progress=False)
    served = Library(db=db, model="shapes-mini", row_cache=True)
    client = TestClient(create_app(served), base_url=BASE)
    assert [r["name"] for r in client.get("/api/status").json()["roots"]] == ["photos"]
    assert served.roots() is served.roots()  # kept while the state file stays the same
    everything = {"q": "a shape", "k": 50, "threshold": "none"}
    assert client.get("/api/search", params={**everything, "in": "more"}).status_code == 400  # no such root yet

    generate(tmp_path / "more", 3, seed=2, size_range=(64, 96))
    Library(db=db, model="shapes-mini").index([tmp_path / "more"], workers=0, progress=False)
    assert [r["name"] for r in client.get("/api/status").json()["roots"]] == ["photos", "more"]
    hits = client.get("/api/search", params={**everything, "in": "more"}).json()["results"]
    assert len(hits) == 3 and {h["root"] for h in hits} == {"more"}
    assert client.get(hits[0]["thumb"]).status_code == 200  # its files are served: they are under a root now

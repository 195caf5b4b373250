"""The web app answers while `clipsearch index` writes to the same store from another process, and picks up
the new and deleted images without a restart."""

from __future__ import annotations

import subprocess
import sys
import time

from starlette.testclient import TestClient

from clipsearch.library import Library
from clipsearch.web.app import create_app
from retrieval.shapes import generate


def test_searches_during_an_index_run_in_another_process(tmp_path):
    photos, db = tmp_path / "photos", tmp_path / "db"
    first = generate(photos / "old", 10, seed=1, size_range=(96, 128))
    Library(db=db, model="shapes-mini").index([photos], workers=0, progress=False)
    client = TestClient(
        create_app(Library(db=db, model="shapes-mini", row_cache=True)), base_url="http://127.0.0.1:8765"
    )

    def everything() -> dict[str, str]:
        response = client.get("/api/search", params={"q": "a shape", "k": 500, "threshold": "none"})
        assert response.status_code == 200, response.text
        hits = response.json()["results"]
        assert len({h["id"] for h in hits}) == len(hits)
        return {h["path"]: h["id"] for h in hits}

    assert len(everything()) == 10
    added = generate(photos / "new", 30, seed=2, size_range=(96, 128))
    for sample in first[:3]:
        sample.path.unlink()
    command = [sys.executable, "-m", "clipsearch", "index", str(photos), "--db", str(db), "--model", "shapes-mini",
               "--workers", "0", "--batch-size", "4", "--commit-every", "4", "--quiet"]  # fmt: skip
    indexer = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    sizes, statuses = [], []
    try:
        deadline = time.monotonic() + 600  # a safety net only: the loop ends when the indexer does
        while indexer.poll() is None and time.monotonic() < deadline:
            seen = everything()
            sizes.append(len(seen))
            assert 7 <= len(seen) <= 40
            some = next(iter(seen.values()))
            assert client.get(f"/thumb/{some}").status_code in (200, 404)  # 404: deleted meanwhile, never a 500
            statuses.append(client.get("/api/status").json()["models"][0]["state"])
        _, err = indexer.communicate(timeout=600)
    finally:
        if indexer.poll() is None:
            indexer.kill()
    assert indexer.returncode == 0, err
    final = everything()
    assert sorted(final) == sorted([f"new/{s.path.name}" for s in added] + [f"old/{s.path.name}" for s in first[3:]]), (
        final
    )
    assert set(statuses) <= {"indexing", "complete", "interrupted"}
    print(f"{len(sizes)} searches during the run saw {sorted(set(sizes))} images")

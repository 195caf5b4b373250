"""Hub downloads against a real HTTP server on 127.0.0.1 laid out like the Hugging Face hub.

The server answers `/{repo}/resolve/{revision}/{file}`: small files directly with their git blob SHA-1 as
ETag, large (LFS) files with a redirect to `/cdn/{sha256}` carrying `X-Linked-Etag` (their SHA-256) and
`X-Linked-Size`, as the hub does; `/cdn/` honours Range requests.
"""

from __future__ import annotations

import hashlib
import os
import threading
import urllib.parse
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from retrieval.errors import ModelDownloadError
from retrieval.model import registry
from retrieval.model.hub import ensure_hub_files, hub_folder, is_cached
from retrieval.model.loading import load_model
from retrieval.model.registry import ModelSpec, register_model

FIXTURE = Path(__file__).resolve().parent / "data" / "families" / "siglip2-b32-tiny"
FILES = ("open_clip_config.json", "open_clip_model.safetensors", "tokenizer.json", "tokenizer_config.json")
REPO, REVISION = "timm/tiny-siglip2", "main"
LFS = {"open_clip_model.safetensors", "tokenizer.json"}


def _git_sha1(body: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(body) + body).hexdigest()


@pytest.fixture
def hub(monkeypatch):
    """A hub-like server holding the tiny SigLIP2 fixture under REPO; `cut`, `bad_etag` and `hits` steer it."""
    files = {name: (FIXTURE / name).read_bytes() for name in FILES}
    by_sha = {hashlib.sha256(body).hexdigest(): name for name, body in files.items()}
    state = SimpleNamespace(
        files=files,
        cut=set(),
        bad_etag=set(),
        no_hash=set(),
        hits=Counter(),
        ranges=[],
        served=Counter(),
        hop=False,
        revision=REVISION,
    )

    class Handler(BaseHTTPRequestHandler):
        def _resolve(self, head: bool) -> None:
            prefix = f"/{REPO}/resolve/{urllib.parse.quote(state.revision, safe='')}/"  # the only revision served
            if self.path.startswith(prefix) and state.hop:
                # As the hub resolves a branch: a hash-less redirect within the hub to the file at a commit.
                self.send_response(307)
                self.send_header("Location", self.path.replace(prefix, "/api/resolve-cache/commit0/"))
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            name = self.path.removeprefix(prefix).removeprefix("/api/resolve-cache/commit0/")
            prefix = "/api/resolve-cache/commit0/" if self.path.startswith("/api/") else prefix
            if not self.path.startswith(prefix) or name not in files:
                self.send_error(404, "Entry not found")
                return
            body = files[name]
            sha256 = hashlib.sha256(body).hexdigest()
            if name in LFS:
                announced = "0" * 64 if name in state.bad_etag else sha256
                self.send_response(302)
                if name in state.no_hash:  # to storage on another host (as the hub's is), saying nothing of it
                    self.send_header("Location", f"http://localhost:{self.server.server_address[1]}/cdn/{sha256}")
                else:
                    self.send_header("Location", f"/cdn/{sha256}")
                    self.send_header("X-Linked-Etag", f'"{announced}"')
                self.send_header("X-Linked-Size", str(len(body)))
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(200)
            if name not in state.no_hash:
                self.send_header("ETag", f'"{"0" * 40 if name in state.bad_etag else _git_sha1(body)}"')
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if not head:
                self.wfile.write(body)
                state.served[name] += len(body)

        def do_HEAD(self) -> None:
            state.hits["HEAD " + self.path] += 1
            self._resolve(head=True)

        def do_GET(self) -> None:
            state.hits["GET " + self.path] += 1
            if not self.path.startswith("/cdn/"):
                self._resolve(head=False)
                return
            name = by_sha[self.path.removeprefix("/cdn/")]
            body, start = files[name], 0
            if "Range" in self.headers:
                state.ranges.append(self.headers["Range"])
                start = int(self.headers["Range"].removeprefix("bytes=").split("-")[0])
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
            else:
                self.send_response(200)
            self.send_header("Content-Length", str(len(body) - start))
            self.end_headers()
            chunk = body[start:]
            if name in state.cut:
                state.cut.discard(name)
                chunk = chunk[: len(chunk) // 2]
                self.close_connection = True
            self.wfile.write(chunk)
            state.served[name] += len(chunk)

        def log_message(self, *args) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("CLIPSEARCH_HUB_URL", f"http://127.0.0.1:{httpd.server_address[1]}")
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    state.spec = ModelSpec("tiny-siglip2-hub", "test model", hub_repo=REPO, revision=REVISION, files=FILES)
    register_model(state.spec)
    yield state
    httpd.shutdown()
    httpd.server_close()


def test_hub_model_is_fetched_verified_and_matches_the_reference(hub):
    assert not is_cached(hub.spec)
    model, preprocess = load_model("tiny-siglip2-hub")
    folder = hub_folder(hub.spec)
    assert sorted(p.name for p in folder.iterdir() if not p.name.startswith(".")) == sorted(FILES)
    assert is_cached(hub.spec) and not list(folder.glob("*.part"))
    with np.load(FIXTURE / "reference.npz") as ref:
        with torch.no_grad():
            image = model.encode_image(torch.from_numpy(ref["pixels"]))
            tokens = model.tokenize([str(t) for t in ref["texts"]])
        assert tokens.tolist() == ref["tokens"].tolist()
        assert torch.allclose(image, torch.from_numpy(ref["image_features"]), atol=1e-5, rtol=0)
    assert model.info.name == "tiny-siglip2-hub" and preprocess.resize_mode == "squash"

    # Verified files are not fetched again.
    requests = sum(hub.hits.values())
    assert ensure_hub_files(hub.spec, progress=False) == folder
    assert sum(hub.hits.values()) == requests


def test_a_fetched_hub_models_identity_is_known_before_it_loads(hub):
    # What lets an unchanged re-run and a cold text query of a store skip loading the model (the default is a hub
    # model): the (name, weights hash) `load_model` records, known from the verified cache alone.
    assert registry.known_identity("tiny-siglip2-hub") is None  # not fetched yet: no hash to go by
    model, _ = load_model("tiny-siglip2-hub")
    requests = sum(hub.hits.values())
    assert registry.known_identity("tiny-siglip2-hub") == (model.info.name, model.info.weights_sha256)
    assert sum(hub.hits.values()) == requests  # from the cache alone
    weights = hub_folder(hub.spec) / "open_clip_model.safetensors"
    body = weights.read_bytes()
    weights.write_bytes(body[:-1] + bytes([body[-1] ^ 1]))  # changed since it was verified
    assert registry.known_identity("tiny-siglip2-hub") is None


def test_an_interrupted_download_resumes_where_it_stopped(hub):
    hub.cut.add("open_clip_model.safetensors")
    size = len(hub.files["open_clip_model.safetensors"])
    with pytest.raises(ModelDownloadError, match="run the same command again to resume") as failure:
        ensure_hub_files(hub.spec, progress=False)
    assert "\n" not in str(failure.value)
    part = hub_folder(hub.spec) / "open_clip_model.safetensors.part"
    assert part.stat().st_size == size // 2
    assert not (hub_folder(hub.spec) / "open_clip_model.safetensors").exists()

    ensure_hub_files(hub.spec, progress=False)
    assert hub.ranges == [f"bytes={size // 2}-"]
    assert hub.served["open_clip_model.safetensors"] == size  # half, then the other half: nothing twice
    assert (hub_folder(hub.spec) / "open_clip_model.safetensors").read_bytes() == hub.files[
        "open_clip_model.safetensors"
    ]
    assert not part.exists()


@pytest.mark.parametrize("name", ["open_clip_model.safetensors", "open_clip_config.json"])
def test_a_file_that_does_not_match_the_hubs_hash_is_refused(hub, name):
    hub.bad_etag.add(name)
    with pytest.raises(ModelDownloadError, match="does not match its hash"):
        ensure_hub_files(hub.spec, progress=False)
    folder = hub_folder(hub.spec)
    assert not (folder / name).exists() and not (folder / f"{name}.part").exists()
    assert not is_cached(hub.spec)


@pytest.mark.parametrize("name", ["open_clip_model.safetensors", "open_clip_config.json"])
def test_a_file_whose_hash_the_hub_does_not_announce_is_refused(hub, name):
    hub.no_hash.add(name)
    with pytest.raises(ModelDownloadError, match="the hub sent no hash for .* so it cannot be verified") as failure:
        ensure_hub_files(hub.spec, progress=False)
    assert "\n" not in str(failure.value)
    folder = hub_folder(hub.spec)
    assert not (folder / name).exists() and not (folder / f"{name}.part").exists() and not is_cached(hub.spec)
    assert not any(key.startswith("GET /cdn/") for key in hub.hits)  # a large file is not even fetched


def test_a_pinned_sha256_wins_over_the_hub(hub):
    pinned = ModelSpec(
        "tiny-pinned", "", hub_repo=REPO, files=FILES, file_sha256=(("open_clip_model.safetensors", "ab" * 32),)
    )
    with pytest.raises(ModelDownloadError, match="expected abab"):
        ensure_hub_files(pinned, progress=False)
    good = hashlib.sha256(hub.files["open_clip_model.safetensors"]).hexdigest()
    pin = (("open_clip_model.safetensors", good),)
    right = ModelSpec("tiny-pinned", "", hub_repo=REPO, files=FILES, file_sha256=pin)
    assert (ensure_hub_files(right, progress=False) / "open_clip_model.safetensors").is_file()


def test_offline_names_what_to_fetch_and_where_in_one_line(hub, monkeypatch):
    monkeypatch.setenv("CLIPSEARCH_HUB_URL", "http://127.0.0.1:9")  # the discard port: nothing listens
    with pytest.raises(ModelDownloadError) as failure:
        load_model("tiny-siglip2-hub")
    message = str(failure.value)
    assert "\n" not in message
    assert all(name in message for name in FILES)
    assert f"http://127.0.0.1:9/{REPO} (revision main)" in message
    assert str(hub_folder(hub.spec)) in message


def test_a_damaged_cached_file_is_fetched_again(hub):
    folder = ensure_hub_files(hub.spec, progress=False)
    (folder / "tokenizer_config.json").write_text("{}")
    ensure_hub_files(hub.spec, progress=False)
    assert (folder / "tokenizer_config.json").read_bytes() == hub.files["tokenizer_config.json"]


def test_files_put_in_place_by_hand_are_used_offline_and_verified_later(hub, monkeypatch):
    folder = hub_folder(hub.spec)
    folder.mkdir(parents=True)
    for name in FILES:
        (folder / name).write_bytes(hub.files[name])
    online = os.environ["CLIPSEARCH_HUB_URL"]
    monkeypatch.setenv("CLIPSEARCH_HUB_URL", "http://127.0.0.1:9")
    model, _ = load_model("tiny-siglip2-hub")  # what the offline message told the user to do works
    assert model.config.family == "siglip" and not is_cached(hub.spec)

    monkeypatch.setenv("CLIPSEARCH_HUB_URL", online)
    (folder / "tokenizer_config.json").write_text("{}")  # damaged by hand: replaced once the hub is reachable
    ensure_hub_files(hub.spec, progress=False)
    assert is_cached(hub.spec)
    assert (folder / "tokenizer_config.json").read_bytes() == hub.files["tokenizer_config.json"]
    assert not any(key.startswith("GET /cdn/") for key in hub.hits)  # the right large files were kept, not fetched


def test_redirects_within_the_hub_are_followed_to_the_files_hash(hub):
    hub.hop = True
    folder = ensure_hub_files(hub.spec, progress=False)
    assert all((folder / name).read_bytes() == hub.files[name] for name in FILES)
    assert hub.hits[f"HEAD /api/resolve-cache/commit0/{FILES[0]}"] == 1


def test_a_pinned_revision_is_the_one_fetched_and_cached(hub):
    commit = "0123456789abcdef0123456789abcdef01234567"
    hub.revision = commit  # the server now has the files at this commit only
    pinned = ModelSpec("tiny-siglip2-pinned", "test model", hub_repo=REPO, revision=commit, files=FILES)
    register_model(pinned)
    assert pinned.pinned and not hub.spec.pinned
    model, _ = load_model("tiny-siglip2-pinned")
    assert model.config.family == "siglip"
    assert hub_folder(pinned).name == commit and is_cached(pinned) and not is_cached(hub.spec)
    asked = [key.split(" ", 1)[1] for key in hub.hits if key.startswith("HEAD ")]
    assert asked and all(path.startswith(f"/{REPO}/resolve/{commit}/") for path in asked)
    with pytest.raises(ModelDownloadError, match="revision main"):  # the same files at "main" are not there
        ensure_hub_files(hub.spec, progress=False)


def test_a_revision_with_slashes_is_quoted_in_the_url_and_cached_in_one_folder(hub):
    hub.revision = "refs/pr/1"
    spec = ModelSpec("tiny-siglip2-pr", "test model", hub_repo=REPO, revision="refs/pr/1", files=FILES)
    folder = ensure_hub_files(spec, progress=False)
    assert folder.name == "refs--pr--1" and folder.parent.name == REPO.replace("/", "--")
    assert all((folder / name).read_bytes() == hub.files[name] for name in FILES)
    assert hub.hits[f"HEAD /{REPO}/resolve/refs%2Fpr%2F1/{FILES[0]}"] == 1


@pytest.mark.parametrize("revision", ["", "..", "../../elsewhere", "main/../..", "/main", "main/", "a b", "x?y"])
def test_a_revision_that_is_not_a_commit_branch_or_tag_is_refused(revision):
    with pytest.raises(ValueError, match="is not a commit hash or a branch or tag name"):
        ModelSpec("bad-revision", "test model", hub_repo=REPO, revision=revision, files=FILES)


def test_every_registry_entry_carries_a_revision_and_follows_main_until_pinned():
    hub_specs = [registry.get_spec(name) for name in registry.available_models() if registry.get_spec(name).on_hub]
    assert hub_specs and all(spec.revision == "main" and not spec.pinned for spec in hub_specs)

"""The download cache against a real HTTP server on 127.0.0.1 that the tests start."""

from __future__ import annotations

import copy
import hashlib
import io
import logging
import os
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from retrieval.errors import ModelDownloadError
from retrieval.model import registry
from retrieval.model.clip import CLIP
from retrieval.model.config import CLIPConfig, TextConfig, VisionConfig
from retrieval.model.download import cache_dir, cached_path, ensure_downloaded, file_sha256
from retrieval.model.encode import encode_images, encode_texts
from retrieval.model.loading import load_model
from retrieval.model.registry import ModelSpec, register_model
from tests.test_hostile_checkpoints import openai_archive

# One-head towers: the smallest CLIP whose text tower still takes the real tokenizer's ids.
TINY = CLIPConfig(
    embed_dim=32,
    vision=VisionConfig(image_size=32, width=64, layers=1, heads=1, patch_size=16),
    text=TextConfig(width=64, heads=1, layers=1),
)


@pytest.fixture
def server():
    """A real HTTP server: `files` maps URL paths to bodies, `hits` counts requests per path."""
    files: dict[str, bytes] = {}
    short: set[str] = set()  # paths whose response is cut off half-way
    hits: Counter[str] = Counter()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            hits[self.path] += 1
            body = files.get(self.path)
            if body is None:
                self.send_error(404, "Not Found")
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body[: len(body) // 2] if self.path in short else body)

        def log_message(self, *args) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield SimpleNamespace(url=f"http://127.0.0.1:{httpd.server_address[1]}", files=files, short=short, hits=hits)
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def isolated_registry(monkeypatch):
    """Registry entries added by a test vanish after it."""
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))


@pytest.fixture(scope="module")
def tiny_checkpoint() -> SimpleNamespace:
    """A tiny random CLIP, its torch.save bytes and their SHA-256."""
    torch.manual_seed(0)
    model = CLIP(TINY).eval()
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    body = buffer.getvalue()
    return SimpleNamespace(model=model, body=body, sha256=hashlib.sha256(body).hexdigest())


def _serve(server, tiny_checkpoint, name: str = "tiny-test", sha256: str | None = None) -> ModelSpec:
    """Serve the tiny checkpoint and register a model name pointing at it."""
    path = f"/models/{tiny_checkpoint.sha256}/tiny.pt"
    server.files[path] = tiny_checkpoint.body
    spec = ModelSpec(name, "tiny test model", url=server.url + path, sha256=sha256 or tiny_checkpoint.sha256)
    register_model(spec)
    return spec


def _leftovers() -> list[str]:
    """Files in the cache dir other than the hash memo."""
    root = cache_dir()
    return sorted(p.name for p in root.iterdir() if p.name != "file-hashes.json") if root.exists() else []


def test_first_download_then_cached(server, tiny_checkpoint, isolated_registry, capsys):
    spec = _serve(server, tiny_checkpoint)

    path = ensure_downloaded(spec)

    assert path == cache_dir() / "tiny.pt" == cached_path(spec)
    assert path.read_bytes() == tiny_checkpoint.body
    assert sum(server.hits.values()) == 1
    assert "downloading tiny.pt" in capsys.readouterr().err  # the progress bar is on stderr
    assert _leftovers() == ["tiny.pt"]

    assert ensure_downloaded(spec) == path
    assert sum(server.hits.values()) == 1


def test_load_model_by_registered_name(server, tiny_checkpoint, isolated_registry):
    _serve(server, tiny_checkpoint)

    model, preprocess = load_model("tiny-test")

    assert model.info.name == "tiny-test"
    assert model.info.weights_sha256 == tiny_checkpoint.sha256
    assert preprocess.image_size == 32
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    np.testing.assert_array_equal(encode_images(model, pixels), encode_images(tiny_checkpoint.model, pixels))
    texts = ["a red circle", "two blue squares on a white background"]
    np.testing.assert_array_equal(encode_texts(model, texts), encode_texts(tiny_checkpoint.model, texts))

    again, _ = load_model("tiny-test")
    assert again is model
    assert sum(server.hits.values()) == 1


def test_corrupted_cache_is_fetched_again(server, tiny_checkpoint, isolated_registry, caplog):
    spec = _serve(server, tiny_checkpoint)
    path = ensure_downloaded(spec)

    path.write_bytes(tiny_checkpoint.body[:1000])  # a partial file, as a crashed copy leaves
    with caplog.at_level(logging.WARNING, logger="retrieval.model.download"):
        assert ensure_downloaded(spec) == path
    assert "does not match the SHA-256" in caplog.text
    assert sum(server.hits.values()) == 2
    assert path.read_bytes() == tiny_checkpoint.body


def test_same_size_corruption_is_detected_once_modified(server, tiny_checkpoint, isolated_registry):
    spec = _serve(server, tiny_checkpoint)
    path = ensure_downloaded(spec)

    flipped = bytearray(tiny_checkpoint.body)
    flipped[len(flipped) // 2] ^= 0xFF
    path.write_bytes(bytes(flipped))
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))  # modified a second later

    ensure_downloaded(spec)
    assert sum(server.hits.values()) == 2
    assert path.read_bytes() == tiny_checkpoint.body


def test_http_404_is_a_clear_error(server, tiny_checkpoint, isolated_registry):
    spec = ModelSpec("missing", "not on the server", url=server.url + "/models/abc/gone.pt", sha256="0" * 64)
    register_model(spec)

    with pytest.raises(ModelDownloadError) as excinfo:
        load_model("missing")

    message = str(excinfo.value)
    assert "HTTP 404" in message
    assert spec.url in message
    assert str(cache_dir() / "gone.pt") in message
    assert "\n" not in message
    assert _leftovers() == []


def test_checksum_mismatch_saves_nothing(server, tiny_checkpoint, isolated_registry):
    spec = _serve(server, tiny_checkpoint, name="wrong-sum", sha256="ab" * 32)

    with pytest.raises(ModelDownloadError, match=r"SHA-256 is [0-9a-f]{64}, not the expected abab.*nothing was saved"):
        ensure_downloaded(spec)

    assert _leftovers() == []


def test_interrupted_download_leaves_no_file(server, tiny_checkpoint, isolated_registry):
    spec = _serve(server, tiny_checkpoint)
    server.short.add(spec.url.removeprefix(server.url))

    with pytest.raises(ModelDownloadError, match="cannot download"):
        ensure_downloaded(spec)

    assert _leftovers() == []


def test_server_down_gives_the_offline_message(tiny_checkpoint, isolated_registry):
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler)
    url = f"http://127.0.0.1:{httpd.server_address[1]}/models/{tiny_checkpoint.sha256}/tiny.pt"
    httpd.server_close()  # nothing listens on that port any more
    register_model(ModelSpec("offline", "unreachable", url=url, sha256=tiny_checkpoint.sha256))

    with pytest.raises(ModelDownloadError) as excinfo:
        load_model("offline")

    message = str(excinfo.value)
    assert message.startswith(f"cannot download {url} (")
    assert f"if this machine is offline, fetch that URL elsewhere and save it as {cache_dir() / 'tiny.pt'}" in message
    assert _leftovers() == []


def test_file_put_in_place_by_hand_is_used(tiny_checkpoint, isolated_registry):
    spec = ModelSpec("by-hand", "placed manually", url="http://127.0.0.1:9/x/tiny.pt", sha256=tiny_checkpoint.sha256)
    register_model(spec)
    cache_dir().mkdir(parents=True)
    (cache_dir() / "tiny.pt").write_bytes(tiny_checkpoint.body)

    model, _ = load_model("by-hand")  # port 9 (discard) never answers: this works only without a download

    assert model.info.weights_sha256 == tiny_checkpoint.sha256


def test_file_sha256_is_remembered_until_the_file_changes(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"first version")
    assert file_sha256(path) == hashlib.sha256(b"first version").hexdigest()
    assert str(path.resolve()) in (cache_dir() / "file-hashes.json").read_text()

    path.write_bytes(b"other version")  # same size
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert file_sha256(path) == hashlib.sha256(b"other version").hexdigest()


def test_register_model_needs_a_source():
    with pytest.raises(ValueError, match="needs a url and its sha256, a hub repository and files, or a path"):
        register_model(ModelSpec("nothing", "no url, no path"))
    with pytest.raises(ValueError):
        register_model(ModelSpec("no-sum", "url without checksum", url="http://127.0.0.1/x.pt"))


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("CLIPSEARCH_CACHE", str(tmp_path / "elsewhere"))
    assert cache_dir() == tmp_path / "elsewhere"
    monkeypatch.delenv("CLIPSEARCH_CACHE")
    assert cache_dir() == Path.home() / ".cache" / "clipsearch"


def test_a_download_loads_through_a_checked_float32_copy(server, tiny_checkpoint, isolated_registry):
    spec = _serve(server, tiny_checkpoint)
    texts = ["a red circle", "two blue squares on a white background"]
    expected = encode_texts(tiny_checkpoint.model, texts)

    model, _ = load_model("tiny-test", towers="text")
    copy = cache_dir() / "float32" / spec.sha256
    assert sorted(p.name for p in copy.iterdir()) == ["config.json", "converted.json", "model.safetensors"]
    assert model.info.weights_sha256 == spec.sha256  # the identity stays the download's
    np.testing.assert_array_equal(encode_texts(model, texts), expected)

    weights = copy / "model.safetensors"
    damaged = bytearray(weights.read_bytes())
    damaged[-1] ^= 0xFF  # same size: only the recorded hash can tell
    stat = weights.stat()
    weights.write_bytes(bytes(damaged))
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))  # even on a coarse clock
    model, _ = load_model("tiny-test", towers="text")
    np.testing.assert_array_equal(encode_texts(model, texts), expected)  # the copy was written again
    assert weights.read_bytes() != bytes(damaged)
    assert sum(server.hits.values()) == 1


def test_an_openai_style_torchscript_release_loads_through_the_registry(server, isolated_registry, tmp_path):
    torch.manual_seed(0)
    reference = CLIP(TINY).eval()
    with torch.no_grad():
        for tensor in reference.state_dict().values():
            tensor.copy_(tensor.half().float())  # the release is fp16: these values survive it exactly
    # A copy: the traced module shares its parameters, and the archive's .half() would convert them.
    body = openai_archive(tmp_path / "ViT-tiny.pt", copy.deepcopy(reference)).read_bytes()
    sha256 = hashlib.sha256(body).hexdigest()
    server.files[f"/models/{sha256}/ViT-tiny.pt"] = body
    register_model(
        ModelSpec("ViT-tiny", "a TorchScript release", url=f"{server.url}/models/{sha256}/ViT-tiny.pt", sha256=sha256)
    )

    model, _ = load_model("ViT-tiny")

    assert model.info.weights_sha256 == sha256
    assert (cache_dir() / "float32" / sha256 / "converted.json").is_file()  # read once, as data, then our format
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    np.testing.assert_array_equal(encode_images(model, pixels), encode_images(reference, pixels))
    texts = ["a red circle", "two blue squares on a white background"]
    np.testing.assert_array_equal(encode_texts(model, texts), encode_texts(reference, texts))

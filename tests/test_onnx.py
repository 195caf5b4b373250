"""The encoders in ONNX Runtime: parity with the torch model, stale exports refused, no torch needed to run them.

Tolerances: float32 exports within cosine 0.9999 and 1e-4 max abs difference of the torch vectors (measured:
~1e-7 for the tiny models, ~1e-6 for shapes-mini); int8 ones within cosine 0.99 (another embedding space).
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from retrieval.errors import ExportError
from retrieval.model.clip import CLIP
from retrieval.model.config import PRESETS
from retrieval.model.identity import ModelInfo
from retrieval.model.loading import load_model
from retrieval.model.onnx_export import ensure_export
from retrieval.model.onnx_runtime import MODEL_FILE, RECORD_FILE, OnnxEncoder, export_root, find_export

FAMILIES = Path(__file__).resolve().parent / "data" / "families"
BATCHES = (1, 3, 8)


@pytest.fixture(autouse=True)
def _own_exports(tmp_path, monkeypatch):
    """These tests damage exports: each has its own folder."""
    monkeypatch.setenv("CLIPSEARCH_EXPORTS", str(tmp_path / "exports"))


def _tiny() -> CLIP:
    torch.manual_seed(0)
    model = CLIP(PRESETS["tiny-vit"]).eval()
    model.info = ModelInfo.for_model(model, "tiny")
    return model


def _pixels(model, batch: int, seed: int) -> np.ndarray:
    size = model.config.vision.image_size
    return np.random.default_rng(seed).standard_normal((batch, 3, size, size), dtype=np.float32)


def _tokens(model, batch: int) -> torch.Tensor:
    texts = ["a photo of a cat", "red circle", "a very long description of a small blue square on grey"] * 3
    return model.tokenize(texts[:batch])


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(a * b, axis=1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def _check_parity(model, encoder: OnnxEncoder, min_cosine: float = 0.9999, max_abs: float | None = 1e-4) -> None:
    for batch in BATCHES:
        pixels = _pixels(model, batch, seed=batch)
        with torch.inference_mode():
            expected = model.encode_image(torch.from_numpy(pixels)).numpy()
        got = encoder.encode_images(pixels)
        assert got.shape == expected.shape and got.dtype == np.float32
        assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
        assert _cosines(got, expected).min() >= min_cosine
        if max_abs is not None:
            assert np.abs(got - expected).max() <= max_abs
        tokens = _tokens(model, batch)
        with torch.inference_mode():
            expected = model.encode_text(tokens).numpy()
        got = encoder.encode_texts(tokens.numpy())
        assert got.shape == expected.shape and got.dtype == np.float32
        assert _cosines(got, expected).min() >= min_cosine
        if max_abs is not None:
            assert np.abs(got - expected).max() <= max_abs


def test_tiny_clip_export_matches_torch():
    model = _tiny()
    root = ensure_export(model)
    assert find_export(model.info) == root
    encoder = OnnxEncoder.open(root)
    assert encoder.info == model.info and encoder.context_length == 77
    _check_parity(model, encoder)


def test_shapes_mini_export_matches_torch():
    model, _ = load_model("shapes-mini", device="cpu")
    _check_parity(model, OnnxEncoder.open(ensure_export(model)))


def test_siglip2_export_matches_torch():
    model, _ = load_model(FAMILIES / "siglip2-b32-tiny", device="cpu")
    assert model.config.family == "siglip"
    _check_parity(model, OnnxEncoder.open(ensure_export(model)))


def test_int8_export_is_close_to_float32_and_recorded_as_int8():
    model, _ = load_model("shapes-mini", device="cpu")
    root = ensure_export(model, precision="int8")
    assert root != ensure_export(model) and find_export(model.info, "int8") == root
    encoder = OnnxEncoder.open(root)
    assert encoder.info.precision == "int8" and encoder.info.table_name.endswith("_int8")
    _check_parity(model, encoder, min_cosine=0.99, max_abs=None)
    # The matrix products run on int8 weights (shapes-mini's image tower is a ResNet: its attention pool's).
    for tower in ("image", "text"):
        ops = {node.op_type for node in onnx.load(root / tower / MODEL_FILE).graph.node}
        assert {"DynamicQuantizeLinear", "MatMulInteger"} <= ops


def test_one_tower_is_exported_and_found_alone():
    full = _tiny()
    model = CLIP(full.config, towers="text").eval()
    model.load_state_dict(CLIP.state_dict_for_towers(full.state_dict(), "text"))
    model.info = full.info
    root = ensure_export(model)
    assert find_export(model.info, towers="text") == root
    assert find_export(model.info, towers="image") is None and find_export(model.info) is None
    with pytest.raises(ExportError, match="no usable image encoder export"):
        OnnxEncoder.open(root, towers="image")
    encoder = OnnxEncoder.open(root, towers="text")
    with pytest.raises(ValueError, match="no image tower"):
        encoder.encode_images(_pixels(model, 1, 0))


def test_other_weights_never_use_the_export():
    model = _tiny()
    ensure_export(model)
    torch.manual_seed(1)
    other = CLIP(PRESETS["tiny-vit"]).eval()
    other.info = ModelInfo.for_model(other, "tiny")
    assert find_export(other.info) is None
    # An export whose record names other weights (as if copied in under this model's key) is stale.
    root = export_root(model.info)
    record = json.loads((root / "image" / RECORD_FILE).read_text())
    record["identity"]["weights_sha256"] = other.info.weights_sha256
    (root / "image" / RECORD_FILE).write_text(json.dumps(record))
    assert find_export(model.info) is None
    with pytest.raises(ExportError, match="stale: it was exported from other weights"):
        OnnxEncoder.open(root)
    assert ensure_export(model) == root and find_export(model.info) == root  # made again
    _check_parity(model, OnnxEncoder.open(root))


@pytest.mark.parametrize("damage", ["tampered", "truncated", "deleted"])
def test_a_damaged_export_is_refused_then_made_again(damage):
    model = _tiny()
    root = ensure_export(model)
    path = root / "text" / MODEL_FILE
    data = path.read_bytes()
    if damage == "tampered":  # same size, one weight byte changed
        path.write_bytes(data[: len(data) // 2] + bytes([data[len(data) // 2] ^ 0xFF]) + data[len(data) // 2 + 1 :])
    elif damage == "truncated":
        path.write_bytes(data[: len(data) // 3])
    else:
        path.unlink()
    assert find_export(model.info) is None
    with pytest.raises(ExportError, match="stale"):
        OnnxEncoder.open(root)
    assert ensure_export(model) == root and find_export(model.info) == root
    _check_parity(model, OnnxEncoder.open(root))


def test_an_export_from_another_format_or_onnxruntime_is_stale():
    model = _tiny()
    root = ensure_export(model)
    record_file = root / "image" / RECORD_FILE
    record = json.loads(record_file.read_text())
    for key, value in (("format", 0), ("onnxruntime", "0.1.0")):
        record_file.write_text(json.dumps({**record, key: value}))
        assert find_export(model.info) is None
        with pytest.raises(ExportError, match="stale"):
            OnnxEncoder.open(root)
    ensure_export(model)
    assert find_export(model.info) == root


def test_text_tokens_of_another_length_are_refused():
    model = _tiny()
    encoder = OnnxEncoder.open(ensure_export(model))
    with pytest.raises(ValueError, match=r"tokens must be \[B, 77\]"):
        encoder.encode_texts(np.zeros((2, 10), dtype=np.int64))


def _torch_free_python(tmp_path: Path) -> dict[str, str]:
    """The environment of a Python where `import torch` raises ImportError (through a sitecustomize)."""
    site = tmp_path / "no_torch"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text("import sys\nsys.modules['torch'] = None\n")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(site), *filter(None, [env.get("PYTHONPATH")])])
    return env


def test_the_runtime_encodes_in_a_process_where_torch_cannot_be_imported(tmp_path):
    model = _tiny()
    ensure_export(model)
    pixels, tokens = _pixels(model, 2, seed=5), _tokens(model, 2).numpy()
    np.save(tmp_path / "pixels.npy", pixels)
    np.save(tmp_path / "tokens.npy", tokens)
    (tmp_path / "info.json").write_text(json.dumps(model.info.to_dict()))
    script = textwrap.dedent(
        f"""
        import json, sys
        import numpy as np
        try:
            import torch
        except ImportError:
            pass
        else:
            raise SystemExit("torch imported")
        from retrieval.model.onnx_runtime import OnnxEncoder, find_export
        root = find_export(json.load(open({str(tmp_path / "info.json")!r})))
        encoder = OnnxEncoder.open(root)
        np.save({str(tmp_path / "image.npy")!r}, encoder.encode_images(np.load({str(tmp_path / "pixels.npy")!r})))
        np.save({str(tmp_path / "text.npy")!r}, encoder.encode_texts(np.load({str(tmp_path / "tokens.npy")!r})))
        assert "torch" not in sys.modules or sys.modules["torch"] is None
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], env=_torch_free_python(tmp_path), capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    with torch.inference_mode():
        image = model.encode_image(torch.from_numpy(pixels)).numpy()
        text = model.encode_text(torch.from_numpy(tokens)).numpy()
    assert _cosines(np.load(tmp_path / "image.npy"), image).min() >= 0.9999
    assert _cosines(np.load(tmp_path / "text.npy"), text).min() >= 0.9999


def test_concurrent_exports_leave_one_fresh_export(tmp_path):
    model = _tiny()
    checkpoint = tmp_path / "ckpt"
    from retrieval.model.checkpoint import save_checkpoint

    save_checkpoint(model, checkpoint, name="tiny")
    script = textwrap.dedent(
        f"""
        from retrieval.model.loading import load_model
        from retrieval.model.onnx_export import ensure_export
        model, _ = load_model({str(checkpoint)!r}, device="cpu")
        print(ensure_export(model))
        """
    )
    runs = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True) for _ in range(2)]
    roots = {run.communicate()[0].strip() for run in runs}
    assert all(run.returncode == 0 for run in runs)
    loaded, _ = load_model(checkpoint, device="cpu")
    assert roots == {str(find_export(loaded.info))}
    assert not [p for p in Path(roots.pop()).iterdir() if p.name.startswith(".")]  # no staging left behind
    _check_parity(loaded, OnnxEncoder.open(find_export(loaded.info)))


_MAPPED_MEMORY = """
import ctypes, json, sys
import numpy as np

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                      "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2

if sys.argv[1] != "-":  # an encoder opened first, as `clipsearch index` opens one
    from retrieval.model.onnx_runtime import OnnxEncoder, find_export
    OnnxEncoder.open(find_export(json.load(open(sys.argv[1]))))
warm = np.ones(1 << 19)  # a 4 MB block, freed: glibc's default then serves blocks up to that size from its heap
del warm
before = libc.mallinfo2().hblkhd  # bytes in blocks of their own (mmap), which go back to the kernel when freed
block = np.ones(1 << 18)  # 2 MB, as a weight matrix or a batch
print((libc.mallinfo2().hblkhd - before) >> 20)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc")
def test_once_a_session_is_open_large_blocks_are_mapped_on_their_own(tmp_path):
    model = _tiny()
    ensure_export(model)
    (tmp_path / "info.json").write_text(json.dumps(model.info.to_dict()))

    def mapped_mb(info: str) -> int:
        out = subprocess.run([sys.executable, "-c", _MAPPED_MEMORY, info], capture_output=True, text=True, check=True)
        return int(out.stdout.strip())

    assert mapped_mb(str(tmp_path / "info.json")) == 2  # freed, its pages leave the process at once
    assert mapped_mb("-") == 0  # glibc's default: from the heap, which kept a session's parsed model when freed

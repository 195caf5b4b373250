"""Every checkpoint format round-trips through `load_model(path)` to the same outputs, and bad ones fail clearly."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pickle
import subprocess
import sys
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from retrieval.errors import CheckpointError, UnknownModelError
from retrieval.model import registry
from retrieval.model.checkpoint import read_checkpoint, save_checkpoint
from retrieval.model.clip import CLIP
from retrieval.model.config import PRESETS
from retrieval.model.encode import encode_images, encode_texts
from retrieval.model.loading import load_model, resolve_device
from retrieval.model.registry import ModelSpec, register_model
from retrieval.model.tokenizer import tokenize

ARCHITECTURES = ("tiny-vit", "tiny-rn")
TEXTS = ["a photo of a dog", "two red circles on a white background", "x", "ünïcödé 写真 🐶"]
# The format round trips use a 1000-token vocabulary (50x smaller checkpoints) and hand-made token rows:
# random ids, the end-of-text id (the largest) at different positions, zero padding.
VOCAB = 1000
TOKENS = torch.zeros(4, 77, dtype=torch.long)
for _row, _eot in enumerate((5, 20, 76, 1)):
    TOKENS[_row, :_eot] = torch.randint(1, VOCAB - 1, (_eot,), generator=torch.Generator().manual_seed(_row))
    TOKENS[_row, _eot] = VOCAB - 1


def tiny_model(preset: str, seed: int = 0, fp16_exact: bool = False) -> CLIP:
    """A random CLIP with every parameter and buffer randomised (BatchNorm statistics included).

    With `fp16_exact`, every value is representable in float16, so fp16 storage loses nothing.
    """
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    config = PRESETS[preset]
    model = CLIP(dataclasses.replace(config, text=dataclasses.replace(config.text, vocab_size=VOCAB))).eval()
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if not tensor.is_floating_point():
                continue
            noise = torch.randn(tensor.shape, generator=generator) * 0.05
            if name.endswith("running_var"):
                tensor.copy_(1.0 + noise.abs())
            else:
                tensor.add_(noise)
            if fp16_exact:
                tensor.copy_(tensor.half().float())
    return model


def outputs(model: CLIP) -> tuple[torch.Tensor, torch.Tensor]:
    """Unnormalised image and text features for fixed inputs."""
    size = model.config.vision.image_size
    pixels = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(42))
    with torch.inference_mode():
        return model.encode_image(pixels, normalize=False), model.encode_text(TOKENS, normalize=False)


def assert_same_outputs(loaded: CLIP, reference: CLIP) -> None:
    """Bit-identical features."""
    for got, want in zip(outputs(loaded), outputs(reference), strict=True):
        assert torch.equal(got, want)


@pytest.fixture
def isolated_registry(monkeypatch):
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))


@pytest.mark.parametrize("preset", ARCHITECTURES)
def test_openai_state_dict_round_trip(tmp_path, preset):
    reference = tiny_model(preset)
    path = tmp_path / "weights.pt"
    torch.save(reference.state_dict(), path)

    model, preprocess = load_model(path)

    assert_same_outputs(model, reference)
    assert model.config == reference.config
    assert not model.training
    assert all(p.dtype == torch.float32 and p.device.type == "cpu" for p in model.parameters())
    assert preprocess.image_size == reference.config.vision.image_size
    assert model.info.name == "weights"
    assert model.info.weights_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert model.info.embed_dim == 64


@pytest.mark.parametrize("preset", ARCHITECTURES)
def test_torchscript_archive_round_trip(tmp_path, preset):
    # Built like OpenAI's releases: a traced module with fp16 weights and three scalar attributes.
    reference = tiny_model(preset, fp16_exact=True)
    holder = tiny_model(preset, fp16_exact=True)
    size = holder.config.vision.image_size
    holder.register_buffer("input_resolution", torch.tensor(size))
    holder.register_buffer("context_length", torch.tensor(77))
    holder.register_buffer("vocab_size", torch.tensor(VOCAB))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer warns about data-dependent lengths
        traced = torch.jit.trace(holder, (torch.zeros(1, 3, size, size), TOKENS[:1]), check_trace=False)
    traced = traced.half()
    path = tmp_path / "RN-ish.pt"
    torch.jit.save(traced, str(path))
    expected = torch.jit.load(str(path)).state_dict()  # trusted: this test made the archive
    assert "input_resolution" in expected

    checkpoint = read_checkpoint(path)
    model, _ = load_model(path)

    assert checkpoint.format == "torchscript"
    # The archive is read as data, without torch.jit.load, to the same tensors (less OpenAI's scalars).
    assert set(checkpoint.state_dict) == set(expected) - {"input_resolution", "context_length", "vocab_size"}
    assert all(torch.equal(v, expected[k].float()) for k, v in checkpoint.state_dict.items())
    assert_same_outputs(model, reference)


@pytest.mark.parametrize("preset", ARCHITECTURES)
def test_safetensors_round_trip(tmp_path, preset):
    reference = tiny_model(preset)
    path = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(path))

    model, _ = load_model(path)

    assert read_checkpoint(path).format == "safetensors"
    assert_same_outputs(model, reference)


@pytest.mark.parametrize("preset", ARCHITECTURES)
def test_open_clip_checkpoint_round_trip(tmp_path, preset):
    reference = tiny_model(preset)
    path = tmp_path / "epoch_3.pt"
    state_dict = {f"module.{k}": v for k, v in reference.state_dict().items()}  # saved from DataParallel
    torch.save({"epoch": 3, "name": "run", "state_dict": state_dict}, path)

    model, _ = load_model(path)

    assert read_checkpoint(path).format == "open_clip"
    assert_same_outputs(model, reference)


@pytest.mark.parametrize("preset", ARCHITECTURES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_own_format_round_trip(tmp_path, preset, dtype):
    reference = tiny_model(preset, fp16_exact=True)
    folder = save_checkpoint(reference, tmp_path / "mine", name="my-model", description="test", dtype=dtype)

    model, _ = load_model(folder)

    meta = json.loads((folder / "config.json").read_text())
    assert meta["format"] == "clipsearch-checkpoint" and meta["version"] == 1
    assert meta["name"] == "my-model" and meta["description"] == "test"
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    assert model.info.name == "my-model"
    assert model.info.weights_sha256 == hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert_same_outputs(model, reference)


@pytest.mark.parametrize("weights", ["safetensors", "bin"])
def test_hugging_face_folder_matches_transformers(tmp_path, weights):
    transformers = pytest.importorskip("transformers")
    hf_config = transformers.CLIPConfig(
        text_config=dict(
            hidden_size=64,
            intermediate_size=256,
            num_hidden_layers=2,
            num_attention_heads=2,
            vocab_size=49408,
            max_position_embeddings=77,
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=0,
            hidden_act="quick_gelu",
        ),
        vision_config=dict(
            hidden_size=64,
            intermediate_size=256,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
            hidden_act="quick_gelu",
        ),
        projection_dim=32,
    )
    torch.manual_seed(0)
    hf_model = transformers.CLIPModel(hf_config).eval()
    hf_model.save_pretrained(tmp_path / "hf", safe_serialization=weights == "safetensors")
    pixels = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    tokens = torch.from_numpy(tokenize(TEXTS))
    with torch.inference_mode():
        expected = hf_model(input_ids=tokens, pixel_values=pixels)

    model, preprocess = load_model(tmp_path / "hf")

    assert read_checkpoint(tmp_path / "hf").format == "huggingface"
    assert preprocess.image_size == 32
    assert model.info.name == "hf"
    np.testing.assert_allclose(encode_images(model, pixels), expected.image_embeds.numpy(), rtol=0, atol=1e-5)
    np.testing.assert_allclose(encode_texts(model, TEXTS), expected.text_embeds.numpy(), rtol=0, atol=1e-5)


@pytest.mark.parametrize("preset", ARCHITECTURES)
def test_one_tower_matches_the_full_model(tmp_path, preset):
    reference = tiny_model(preset)
    torch.save(reference.state_dict(), tmp_path / "weights.pt")
    save_checkpoint(reference, tmp_path / "mine")
    size = reference.config.vision.image_size
    pixels = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(3))

    for source in (tmp_path / "weights.pt", tmp_path / "mine"):
        text_only, _ = load_model(source, towers="text")
        image_only, _ = load_model(source, towers="image")
        full, _ = load_model(source)
        assert text_only.visual is None and image_only.transformer is None and full.towers == "both"
        assert text_only.info == image_only.info == full.info  # same identity, so queries find the index
        with torch.inference_mode():
            assert torch.equal(text_only.encode_text(TOKENS), full.encode_text(TOKENS))
        np.testing.assert_array_equal(encode_images(image_only, pixels), encode_images(full, pixels))


def test_text_tower_from_safetensors_reads_only_text_tensors(tmp_path):
    reference = tiny_model("tiny-vit")
    path = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(path))

    checkpoint = read_checkpoint(path, towers="text")

    assert checkpoint.state_dict and not any(k.startswith("visual.") for k in checkpoint.state_dict)
    assert checkpoint.config == reference.config  # inferred from every tensor's shape all the same


def test_repeated_loads_share_objects_until_the_file_changes(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save(tiny_model("tiny-vit", seed=1).state_dict(), path)

    first = load_model(path)
    assert load_model(path) is first
    assert load_model(str(path), towers="text")[0] is first[0]  # the loaded full model serves one tower too

    torch.save(tiny_model("tiny-vit", seed=2).state_dict(), path)
    reloaded, _ = load_model(path)
    assert reloaded is not first[0]
    assert reloaded.info.weights_sha256 != first[0].info.weights_sha256


def test_default_model_comes_from_the_environment(tmp_path, monkeypatch):
    path = tmp_path / "default.pt"
    torch.save(tiny_model("tiny-vit").state_dict(), path)
    monkeypatch.setenv("CLIPSEARCH_MODEL", str(path))

    model, _ = load_model()

    assert model.info.name == "default"


def test_device_auto_is_cpu_here():
    expected = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    assert resolve_device("cpu") == torch.device("cpu")


def test_unknown_name_lists_the_available_models():
    with pytest.raises(UnknownModelError) as excinfo:
        load_model("ViT-B/33")
    message = str(excinfo.value)
    assert "'ViT-B/33'" in message
    assert "ViT-B/32" in message and "RN50x64" in message and "shapes-mini" in message


def test_missing_keys_are_named(tmp_path):
    state_dict = tiny_model("tiny-vit").state_dict()
    dropped = ["visual.ln_post.weight", "transformer.resblocks.1.mlp.c_fc.bias"]
    for key in dropped:
        del state_dict[key]
    torch.save(state_dict, tmp_path / "partial.pt")

    with pytest.raises(CheckpointError, match=r"missing 2 keys \(transformer\.resblocks\.1\.mlp\.c_fc\.bias, visual"):
        load_model(tmp_path / "partial.pt")


def test_unexpected_keys_are_named(tmp_path):
    state_dict = tiny_model("tiny-vit").state_dict()
    for i in range(7):
        state_dict[f"extra.head{i}.weight"] = torch.zeros(2)
    torch.save(state_dict, tmp_path / "extra.pt")

    with pytest.raises(CheckpointError, match=r"unexpected 7 keys \(extra\.head0\.weight, .*, \.\.\.\)") as excinfo:
        load_model(tmp_path / "extra.pt")
    assert "extra.pt" in str(excinfo.value)


def test_wrong_shapes_are_named(tmp_path):
    state_dict = tiny_model("tiny-vit").state_dict()
    state_dict["ln_final.bias"] = torch.zeros(5)
    torch.save(state_dict, tmp_path / "bad.pt")

    with pytest.raises(CheckpointError, match=r"wrong shape for 1 keys \(ln_final\.bias \(5,\) instead of \(128,\)\)"):
        load_model(tmp_path / "bad.pt")


@pytest.mark.parametrize(
    "filename, content",
    [
        ("garbage.pt", b"\x00\x01 not a checkpoint at all" * 10),
        ("garbage.safetensors", b"\xff" * 64),
        ("notes.bin", b"hello, these are notes"),
        ("empty.pth", b""),
    ],
)
def test_unreadable_files_name_the_path_and_the_formats(tmp_path, filename, content):
    path = tmp_path / filename
    path.write_bytes(content)

    with pytest.raises(CheckpointError) as excinfo:
        load_model(path)

    message = str(excinfo.value)
    assert str(path) in message
    assert "accepted: OpenAI TorchScript .pt" in message
    assert "\n" not in message


def cut_short(path: Path, keep: float = 0.5) -> Path:
    """Truncate a file as an interrupted download or copy leaves it."""
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


def hugging_face_folder(folder: Path, weights: str) -> Path:
    """A Hugging Face CLIP folder (config.json with transformers' defaults) holding one weights file of that name."""
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "clip"}))
    tensors = {f"text_model.encoder.layers.{i}.mlp.fc1.weight": torch.randn(256, 64) for i in range(4)}
    if weights.endswith(".safetensors"):
        save_file(tensors, str(folder / weights))
    else:
        torch.save(tensors, folder / weights)
    return folder / weights


def damaged(tmp_path: Path, kind: str) -> tuple[Path, Path]:
    """(what to load, the damaged file in it) for each way a model file arrives broken."""
    reference = tiny_model("tiny-vit")
    if kind == "hf-safetensors-half":
        weights = cut_short(hugging_face_folder(tmp_path / "hf", "model.safetensors"))
    elif kind == "hf-safetensors-header":
        weights = cut_short(hugging_face_folder(tmp_path / "hf", "model.safetensors"), keep=0.0001)
    elif kind == "hf-bin-half":
        weights = cut_short(hugging_face_folder(tmp_path / "hf", "pytorch_model.bin"))
    elif kind == "hf-bin-empty":
        weights = cut_short(hugging_face_folder(tmp_path / "hf", "pytorch_model.bin"), keep=0)
    elif kind == "hf-shard-missing":
        weights = hugging_face_folder(tmp_path / "hf", "model-00001-of-00002.safetensors")
        index = {"weight_map": {"a": weights.name, "b": "model-00002-of-00002.safetensors"}}
        (weights.parent / "model.safetensors.index.json").write_text(json.dumps(index))
        weights = weights.parent / "model-00002-of-00002.safetensors"
    elif kind == "hf-shard-list-half":
        shard = hugging_face_folder(tmp_path / "hf", "model-00001-of-00001.safetensors")
        weights = shard.parent / "model.safetensors.index.json"
        weights.write_text(json.dumps({"metadata": {}, "weight_map": {"a": shard.name, "b": shard.name}}))
        cut_short(weights)
    elif kind == "ours-half":
        weights = cut_short(save_checkpoint(reference, tmp_path / "mine") / "model.safetensors")
    elif kind == "safetensors-half":
        weights = tmp_path / "half-downloaded.safetensors"
        save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(weights))
        cut_short(weights, keep=0.99)
    elif kind == "state-dict-half":
        weights = tmp_path / "weights.pt"
        torch.save(reference.state_dict(), weights)
        cut_short(weights)
    elif kind == "torchscript-storage-short":  # the zip is whole, one tensor's bytes are not
        weights = tmp_path / "ViT-B-32.pt"
        traced = torch.jit.trace(nn.Linear(4, 3), torch.zeros(1, 4))
        torch.jit.save(traced, str(weights))
        with zipfile.ZipFile(weights) as archive:
            entries = {n: archive.read(n) for n in archive.namelist()}
        entries["ViT-B-32/data/0"] = entries["ViT-B-32/data/0"][:-4]
        with zipfile.ZipFile(weights, "w") as archive:
            for name, data in entries.items():
                archive.writestr(name, data)
    return (weights.parent if kind.startswith(("hf-", "ours-")) else weights), weights


DAMAGE = [
    "hf-safetensors-half",
    "hf-safetensors-header",
    "hf-bin-half",
    "hf-bin-empty",
    "hf-shard-missing",
    "hf-shard-list-half",
    "ours-half",
    "safetensors-half",
    "state-dict-half",
    "torchscript-storage-short",
]


@pytest.mark.parametrize("kind", DAMAGE)
def test_a_damaged_model_file_is_one_line_naming_it_and_the_fix(tmp_path, kind):
    target, weights = damaged(tmp_path, kind)

    with pytest.raises(CheckpointError) as excinfo:
        load_model(target)

    message = str(excinfo.value)
    assert str(weights) in message
    assert message.endswith("download or copy it again")
    assert "\n" not in message and len(message) < 400
    if kind.endswith("-half") and "list" not in kind:  # a cut-short weights file: the message says how much is there
        size = weights.stat().st_size
        assert f"is incomplete ({size} " in message


def test_a_damaged_model_on_the_command_line_is_one_error_line(tmp_path):
    target, weights = damaged(tmp_path, "hf-safetensors-half")
    command = [sys.executable, "-c", "from clipsearch.cli import main; main()", "index", str(tmp_path)]
    command += ["--model", str(target), "--db", str(tmp_path / "db"), "--workers", "0"]

    done = subprocess.run(command, capture_output=True, text=True, timeout=300)

    assert done.returncode == 1
    assert done.stdout == ""
    assert done.stderr.startswith(f"Error: {weights} is incomplete (") and done.stderr.count("\n") == 1, done.stderr


def test_a_pickle_of_something_else_is_refused(tmp_path):
    path = tmp_path / "list.pt"
    torch.save([torch.zeros(2)], path)
    with pytest.raises(CheckpointError, match="holds a list, not a state dict"):
        load_model(path)


def test_arbitrary_pickles_are_never_executed(tmp_path):
    path = tmp_path / "evil.pt"
    path.write_bytes(pickle.dumps(Path("/etc/passwd")))  # weights_only refuses any non-tensor class
    with pytest.raises(CheckpointError, match="cannot read"):
        load_model(path)


def test_bare_hugging_face_weights_point_to_the_folder(tmp_path):
    save_file({"text_model.embeddings.token_embedding.weight": torch.zeros(4, 2)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="Hugging Face CLIP weights; load the folder"):
        load_model(tmp_path / "model.safetensors")


def test_folder_without_a_known_config_is_refused(tmp_path):
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="neither a clipsearch checkpoint nor a Hugging Face CLIP config"):
        load_model(tmp_path / "other")
    with pytest.raises(CheckpointError, match="needs a readable config.json"):
        load_model(tmp_path / "empty")


def test_missing_bundled_weights_are_a_clear_error(tmp_path, isolated_registry):
    register_model(ModelSpec("bundled-test", "ships with the package", path=tmp_path / "not-installed"))
    with pytest.raises(CheckpointError, match=r"the bundled model 'bundled-test' is missing from this installation"):
        load_model("bundled-test")


def test_shapes_mini_is_registered_and_loads_offline_when_installed():
    assert "shapes-mini" in registry.available_models()
    spec = registry.get_spec("shapes-mini")
    assert spec.bundled and spec.url is None
    if (spec.path / "config.json").is_file():
        model, _ = load_model("shapes-mini", towers="text")
        assert model.info.name == "shapes-mini"
        assert encode_texts(model, ["a red circle"]).shape == (1, model.config.embed_dim)
    else:
        with pytest.raises(CheckpointError, match="missing from this installation"):
            load_model("shapes-mini")


def test_registry_names_and_urls():
    names = registry.available_models()
    assert names[:9] == [
        "RN50",
        "RN101",
        "RN50x4",
        "RN50x16",
        "RN50x64",
        "ViT-B/32",
        "ViT-B/16",
        "ViT-L/14",
        "ViT-L/14@336px",
    ]
    for name in names[:9]:
        spec = registry.get_spec(name)
        assert spec.url.startswith("https://openaipublic.azureedge.net/clip/models/")
        assert spec.url.split("/")[-2] == spec.sha256 and len(spec.sha256) == 64  # OpenAI's URLs carry the hash
    assert registry.get_spec("vit-b/32").name == "ViT-B/32"
    assert registry.get_spec("ViT-L/14@336px").filename == "ViT-L-14-336px.pt"


def test_saved_checkpoint_files_get_the_usual_permissions(tmp_path):
    model = CLIP(PRESETS["tiny-vit"])
    previous = os.umask(0o022)
    try:
        folder = save_checkpoint(model, tmp_path / "ckpt")
    finally:
        os.umask(previous)
    modes = {p.name: p.stat().st_mode & 0o777 for p in folder.iterdir()}
    assert modes == {"config.json": 0o644, "model.safetensors": 0o644}

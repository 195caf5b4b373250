"""Hugging Face `CLIPModel` checkpoints -> our OpenAI-layout state dict and `CLIPConfig`.

Every key goes through the one rename table `RENAMES`; the result is then checked key by key against the
shapes of a `CLIP` built (for free, on the meta device) from the converted config.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from retrieval.errors import CheckpointError
from retrieval.model.checkpoint import unreadable_weights_error
from retrieval.model.clip import CLIP
from retrieval.model.config import CLIPConfig, TextConfig, VisionConfig

logger = logging.getLogger(__name__)

# How a Hugging Face tensor becomes ours: copied as is, transposed (HF projections are bias-free Linear
# layers, OpenAI's are [in, out] matrices), or taken as the q / k / v third of OpenAI's fused in_proj.
COPY, TRANSPOSE, Q, K, V = "copy", "transpose", "q", "k", "v"

# One transformer block, relative to its tower's block prefix.
_BLOCK: tuple[tuple[str, str, str], ...] = (
    ("layer_norm1.weight", "ln_1.weight", COPY),
    ("layer_norm1.bias", "ln_1.bias", COPY),
    ("self_attn.q_proj.weight", "attn.in_proj_weight", Q),
    ("self_attn.k_proj.weight", "attn.in_proj_weight", K),
    ("self_attn.v_proj.weight", "attn.in_proj_weight", V),
    ("self_attn.q_proj.bias", "attn.in_proj_bias", Q),
    ("self_attn.k_proj.bias", "attn.in_proj_bias", K),
    ("self_attn.v_proj.bias", "attn.in_proj_bias", V),
    ("self_attn.out_proj.weight", "attn.out_proj.weight", COPY),
    ("self_attn.out_proj.bias", "attn.out_proj.bias", COPY),
    ("layer_norm2.weight", "ln_2.weight", COPY),
    ("layer_norm2.bias", "ln_2.bias", COPY),
    ("mlp.fc1.weight", "mlp.c_fc.weight", COPY),
    ("mlp.fc1.bias", "mlp.c_fc.bias", COPY),
    ("mlp.fc2.weight", "mlp.c_proj.weight", COPY),
    ("mlp.fc2.bias", "mlp.c_proj.bias", COPY),
)

# The rename table: (Hugging Face key, OpenAI key, how). "{i}" stands for a block index.
RENAMES: tuple[tuple[str, str, str], ...] = (
    ("logit_scale", "logit_scale", COPY),
    ("vision_model.embeddings.class_embedding", "visual.class_embedding", COPY),
    ("vision_model.embeddings.patch_embedding.weight", "visual.conv1.weight", COPY),
    ("vision_model.embeddings.position_embedding.weight", "visual.positional_embedding", COPY),
    ("vision_model.pre_layrnorm.weight", "visual.ln_pre.weight", COPY),  # sic: HF's spelling
    ("vision_model.pre_layrnorm.bias", "visual.ln_pre.bias", COPY),
    *(
        (f"vision_model.encoder.layers.{{i}}.{hf}", f"visual.transformer.resblocks.{{i}}.{ours}", how)
        for hf, ours, how in _BLOCK
    ),
    ("vision_model.post_layernorm.weight", "visual.ln_post.weight", COPY),
    ("vision_model.post_layernorm.bias", "visual.ln_post.bias", COPY),
    ("visual_projection.weight", "visual.proj", TRANSPOSE),
    ("text_model.embeddings.token_embedding.weight", "token_embedding.weight", COPY),
    ("text_model.embeddings.position_embedding.weight", "positional_embedding", COPY),
    *(
        (f"text_model.encoder.layers.{{i}}.{hf}", f"transformer.resblocks.{{i}}.{ours}", how)
        for hf, ours, how in _BLOCK
    ),
    ("text_model.final_layer_norm.weight", "ln_final.weight", COPY),
    ("text_model.final_layer_norm.bias", "ln_final.bias", COPY),
    ("text_projection.weight", "text_projection", TRANSPOSE),
)

# Buffers older transformers versions saved; they are recomputed, never learned.
_IGNORED = re.compile(r"(vision_model|text_model)\.embeddings\.position_ids")

_PATTERNS = [(re.compile(re.escape(hf).replace(r"\{i\}", r"(\d+)") + "$"), ours, how) for hf, ours, how in RENAMES]

# transformers' defaults for fields its config.json may leave out (it only writes non-default values).
_HF_VISION_DEFAULTS = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "image_size": 224,
    "patch_size": 32,
    "num_channels": 3,
}
_HF_TEXT_DEFAULTS = {
    "hidden_size": 512,
    "intermediate_size": 2048,
    "num_hidden_layers": 12,
    "num_attention_heads": 8,
    "max_position_embeddings": 77,
    "vocab_size": 49408,
}
_HF_COMMON_DEFAULTS = {"hidden_act": "quick_gelu", "layer_norm_eps": 1e-5}


def config_from_hf(hf_config: Mapping[str, Any]) -> CLIPConfig:
    """Translate a Hugging Face `CLIPConfig` (its config.json as a dict) into ours.

    Raises:
        CheckpointError: for architectures our CLIP cannot express (MLP ratio other than 4, mixed
            activations, unusual LayerNorm eps, non-RGB input).
    """
    vision = {**_HF_VISION_DEFAULTS, **_HF_COMMON_DEFAULTS, **_hf_sub_config(hf_config, "vision")}
    text = {**_HF_TEXT_DEFAULTS, **_HF_COMMON_DEFAULTS, **_hf_sub_config(hf_config, "text")}
    for name, sub in (("vision", vision), ("text", text)):
        if sub["intermediate_size"] != 4 * sub["hidden_size"]:
            raise CheckpointError(f"unsupported HF CLIP: {name} MLP is not 4x its width ({sub['intermediate_size']})")
        if sub["layer_norm_eps"] != 1e-5:
            raise CheckpointError(f"unsupported HF CLIP: {name} layer_norm_eps {sub['layer_norm_eps']} is not 1e-5")
    activations = {vision["hidden_act"], text["hidden_act"]}
    if activations not in ({"quick_gelu"}, {"gelu"}):
        raise CheckpointError(f"unsupported HF CLIP activations {sorted(activations)}: need quick_gelu or gelu")
    if vision["num_channels"] != 3:
        raise CheckpointError(f"unsupported HF CLIP: {vision['num_channels']} input channels instead of RGB")
    image_size, patch_size = _square(vision["image_size"]), _square(vision["patch_size"])
    return CLIPConfig(
        embed_dim=hf_config.get("projection_dim", 512),
        vision=VisionConfig(
            image_size=image_size,
            width=vision["hidden_size"],
            layers=vision["num_hidden_layers"],
            heads=vision["num_attention_heads"],
            patch_size=patch_size,
        ),
        text=TextConfig(
            context_length=text["max_position_embeddings"],
            vocab_size=text["vocab_size"],
            width=text["hidden_size"],
            heads=text["num_attention_heads"],
            layers=text["num_hidden_layers"],
        ),
        quick_gelu=activations == {"quick_gelu"},
    )


def convert_hf_state_dict(hf_state_dict: Mapping[str, torch.Tensor], config: CLIPConfig) -> dict[str, torch.Tensor]:
    """Rename a Hugging Face `CLIPModel` state dict to OpenAI's layout through `RENAMES`.

    Args:
        hf_state_dict: `CLIPModel.state_dict()` or the tensors of its saved weights.
        config: our config for it (see `config_from_hf`); every converted tensor is checked against the
            shape a `CLIP(config)` expects.

    Raises:
        CheckpointError: naming unknown, missing and wrongly-shaped keys.
    """
    out: dict[str, torch.Tensor] = {}
    fused: dict[str, dict[str, torch.Tensor]] = {}  # OpenAI in_proj key -> {"q"|"k"|"v": tensor}
    unknown = []
    for key, tensor in hf_state_dict.items():
        if _IGNORED.fullmatch(key):
            continue
        match = next(((m, ours, how) for pattern, ours, how in _PATTERNS if (m := pattern.match(key))), None)
        if match is None:
            unknown.append(key)
            continue
        m, ours, how = match
        target = ours.replace("{i}", m.group(1)) if m.groups() else ours
        if how in (Q, K, V):
            fused.setdefault(target, {})[how] = tensor
        else:
            out[target] = tensor.t() if how == TRANSPOSE else tensor
    out.update(fuse_qkv(fused))
    return checked_conversion(out, lambda: CLIP(config), unknown, "CLIP")


def fuse_qkv(fused: Mapping[str, Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """One [3 * width, ...] tensor per target from the separate q, k and v projections Hugging Face keeps
    (`fused[target]["q" | "k" | "v"]`), in that order, as OpenAI's and open_clip's `in_proj` hold them.

    Raises:
        CheckpointError: a projection is missing, or the three differ in shape.
    """
    out = {}
    for target, parts in fused.items():
        if set(parts) != {Q, K, V}:
            raise CheckpointError(f"HF checkpoint has only the {sorted(parts)} projections of {target}")
        if len({tuple(p.shape) for p in parts.values()}) != 1:
            shapes = {how: tuple(p.shape) for how, p in parts.items()}
            raise CheckpointError(f"HF q/k/v projections of {target} differ in shape: {shapes}")
        out[target] = torch.cat([parts[Q], parts[K], parts[V]], dim=0)
    return out


def checked_conversion(
    out: Mapping[str, torch.Tensor], build: Callable[[], torch.nn.Module], unknown: list[str], family: str
) -> dict[str, torch.Tensor]:
    """The converted tensors, contiguous, once every key a model built by `build` (on the meta device: no memory)
    expects is there with its shape, and no Hugging Face key was left unconverted (`unknown`).

    Raises:
        CheckpointError: naming the wrongly-shaped, unknown and missing keys (five of each at most).
    """
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in build().state_dict().items()}
    missing = sorted(set(expected) - set(out))
    problems = [
        f"{k}: shape {tuple(v.shape)}, expected {expected[k]}"
        for k, v in out.items()
        if k in expected and tuple(v.shape) != expected[k]
    ]
    if unknown:
        problems.append(f"unknown HF keys {unknown[:5]}")
    if missing:
        problems.append(f"missing {missing[:5]}")
    if problems:
        raise CheckpointError(f"cannot convert the Hugging Face {family} checkpoint: {'; '.join(problems)}")
    return {k: v.contiguous() for k, v in out.items()}


def read_hf_folder(folder: str | Path) -> tuple[dict[str, torch.Tensor], CLIPConfig]:
    """Read a `CLIPModel.save_pretrained` folder (config.json plus safetensors or .bin weights, sharded or not).

    Returns:
        (OpenAI-layout state dict, CLIPConfig), ready for `CLIP(config).load_state_dict(sd, strict=True)`.

    Raises:
        CheckpointError: if the folder lacks config.json or weights, or the checkpoint does not convert.
    """
    folder = Path(folder)
    try:
        hf_config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{folder} is not a Hugging Face CLIP folder: cannot read config.json ({e})") from e
    config = config_from_hf(hf_config)
    hf_state_dict = _read_hf_weights(folder)
    logger.info("converting %d Hugging Face tensors from %s", len(hf_state_dict), folder)
    return convert_hf_state_dict(hf_state_dict, config), config


def _read_hf_weights(folder: Path) -> dict[str, torch.Tensor]:
    """Load every weight file named by the folder's shard index, or its single weights file."""
    from safetensors.torch import load_file

    for index_name, loader in (
        ("model.safetensors.index.json", load_file),
        ("pytorch_model.bin.index.json", _load_bin),
    ):
        index = folder / index_name
        if index.is_file():
            try:
                shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
                raise CheckpointError(
                    f"cannot read the shard list {index} ({type(e).__name__}: {e}): the file is damaged; "
                    "download or copy it again"
                ) from e
            return {k: v for shard in shards for k, v in _load_weights(folder / shard, loader).items()}
    if (folder / "model.safetensors").is_file():
        return _load_weights(folder / "model.safetensors", load_file)
    if (folder / "pytorch_model.bin").is_file():
        return _load_weights(folder / "pytorch_model.bin", _load_bin)
    raise CheckpointError(f"{folder} has no model.safetensors or pytorch_model.bin next to its config.json")


def _load_weights(path: Path, loader: Callable[[Path], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """One weights file, or a one-line error naming it (truncated, damaged, missing) instead of the loader's own."""
    try:
        return loader(path)
    except Exception as e:  # safetensors and torch raise SafetensorError, RuntimeError, EOFError, ... for bad files
        raise unreadable_weights_error(path, e) from e


def _load_bin(path: Path) -> dict[str, torch.Tensor]:
    """Load a pickled state dict safely (tensors only)."""
    return torch.load(path, map_location="cpu", weights_only=True)


def _hf_sub_config(hf_config: Mapping[str, Any], tower: str) -> dict[str, Any]:
    """The tower's sub-config; old HF configs also carry `<tower>_config_dict`, which takes precedence."""
    return {**(hf_config.get(f"{tower}_config") or {}), **(hf_config.get(f"{tower}_config_dict") or {})}


def _square(size: int | list[int]) -> int:
    """A side length from an int or a square [h, w] pair."""
    if isinstance(size, int):
        return size
    if len(size) == 2 and size[0] == size[1]:
        return size[0]
    raise CheckpointError(f"unsupported HF CLIP: non-square size {size}")

"""Hugging Face `SiglipModel` checkpoints (SigLIP and fixed-resolution SigLIP2) -> open_clip's SigLIP layout.

Every key goes through the one rename table `RENAMES`; the result is then checked key by key against the
shapes of a `SigLIP` built (for free, on the meta device) from the converted config.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from retrieval.errors import CheckpointError
from retrieval.model.config import CLIPConfig, TextConfig, VisionConfig
from retrieval.model.convert_hf import _hf_sub_config, _read_hf_weights, _square, checked_conversion, fuse_qkv
from retrieval.model.siglip import SigLIP

logger = logging.getLogger(__name__)

# How a Hugging Face tensor becomes ours: copied; a q / k / v third of a fused projection (timm's `qkv`,
# open_clip's `in_proj`); the first third (`q`) or the last two thirds (`kv`) of the MAP head's
# nn.MultiheadAttention projection; a [1] scalar made 0-d; a position table given timm's batch axis.
COPY, Q, K, V, HEAD_Q, HEAD_KV, SCALAR, BATCHED = "copy", "q", "k", "v", "head_q", "head_kv", "scalar", "batched"

_VISION_BLOCK: tuple[tuple[str, str, str], ...] = (
    ("layer_norm1.weight", "norm1.weight", COPY),
    ("layer_norm1.bias", "norm1.bias", COPY),
    ("self_attn.q_proj.weight", "attn.qkv.weight", Q),
    ("self_attn.k_proj.weight", "attn.qkv.weight", K),
    ("self_attn.v_proj.weight", "attn.qkv.weight", V),
    ("self_attn.q_proj.bias", "attn.qkv.bias", Q),
    ("self_attn.k_proj.bias", "attn.qkv.bias", K),
    ("self_attn.v_proj.bias", "attn.qkv.bias", V),
    ("self_attn.out_proj.weight", "attn.proj.weight", COPY),
    ("self_attn.out_proj.bias", "attn.proj.bias", COPY),
    ("layer_norm2.weight", "norm2.weight", COPY),
    ("layer_norm2.bias", "norm2.bias", COPY),
    ("mlp.fc1.weight", "mlp.fc1.weight", COPY),
    ("mlp.fc1.bias", "mlp.fc1.bias", COPY),
    ("mlp.fc2.weight", "mlp.fc2.weight", COPY),
    ("mlp.fc2.bias", "mlp.fc2.bias", COPY),
)

_TEXT_BLOCK: tuple[tuple[str, str, str], ...] = (
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

_V, _H = "vision_model.", "visual.trunk."
# The rename table: (Hugging Face key, open_clip key, how). "{i}" stands for a block index.
RENAMES: tuple[tuple[str, str, str], ...] = (
    ("logit_scale", "logit_scale", SCALAR),
    ("logit_bias", "logit_bias", SCALAR),
    (f"{_V}embeddings.patch_embedding.weight", f"{_H}patch_embed.proj.weight", COPY),
    (f"{_V}embeddings.patch_embedding.bias", f"{_H}patch_embed.proj.bias", COPY),
    (f"{_V}embeddings.position_embedding.weight", f"{_H}pos_embed", BATCHED),
    *((f"{_V}encoder.layers.{{i}}.{hf}", f"{_H}blocks.{{i}}.{ours}", how) for hf, ours, how in _VISION_BLOCK),
    (f"{_V}post_layernorm.weight", f"{_H}norm.weight", COPY),
    (f"{_V}post_layernorm.bias", f"{_H}norm.bias", COPY),
    (f"{_V}head.probe", f"{_H}attn_pool.latent", COPY),
    (f"{_V}head.attention.in_proj_weight", f"{_H}attn_pool.q.weight", HEAD_Q),
    (f"{_V}head.attention.in_proj_weight", f"{_H}attn_pool.kv.weight", HEAD_KV),
    (f"{_V}head.attention.in_proj_bias", f"{_H}attn_pool.q.bias", HEAD_Q),
    (f"{_V}head.attention.in_proj_bias", f"{_H}attn_pool.kv.bias", HEAD_KV),
    (f"{_V}head.attention.out_proj.weight", f"{_H}attn_pool.proj.weight", COPY),
    (f"{_V}head.attention.out_proj.bias", f"{_H}attn_pool.proj.bias", COPY),
    (f"{_V}head.layernorm.weight", f"{_H}attn_pool.norm.weight", COPY),
    (f"{_V}head.layernorm.bias", f"{_H}attn_pool.norm.bias", COPY),
    (f"{_V}head.mlp.fc1.weight", f"{_H}attn_pool.mlp.fc1.weight", COPY),
    (f"{_V}head.mlp.fc1.bias", f"{_H}attn_pool.mlp.fc1.bias", COPY),
    (f"{_V}head.mlp.fc2.weight", f"{_H}attn_pool.mlp.fc2.weight", COPY),
    (f"{_V}head.mlp.fc2.bias", f"{_H}attn_pool.mlp.fc2.bias", COPY),
    ("text_model.embeddings.token_embedding.weight", "text.token_embedding.weight", COPY),
    ("text_model.embeddings.position_embedding.weight", "text.positional_embedding", COPY),
    *(
        (f"text_model.encoder.layers.{{i}}.{hf}", f"text.transformer.resblocks.{{i}}.{ours}", how)
        for hf, ours, how in _TEXT_BLOCK
    ),
    ("text_model.final_layer_norm.weight", "text.ln_final.weight", COPY),
    ("text_model.final_layer_norm.bias", "text.ln_final.bias", COPY),
    ("text_model.head.weight", "text.text_projection.weight", COPY),
    ("text_model.head.bias", "text.text_projection.bias", COPY),
)

# Buffers some transformers versions save; they are recomputed, never learned.
_IGNORED = re.compile(r"(vision_model|text_model)\.embeddings\.position_ids")

_PATTERNS = [(re.compile(re.escape(hf).replace(r"\{i\}", r"(\d+)") + "$"), ours, how) for hf, ours, how in RENAMES]

# transformers' SiglipConfig defaults for fields its config.json may leave out.
_HF_VISION_DEFAULTS = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "image_size": 224,
    "patch_size": 16,
    "num_channels": 3,
}
_HF_TEXT_DEFAULTS = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 64,
    "vocab_size": 32000,
}
_HF_COMMON_DEFAULTS = {"hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-6}
_GELU_TANH = {"gelu_pytorch_tanh": True, "gelu_new": True, "gelu": False}


def config_from_hf(hf_config: Mapping[str, Any]) -> CLIPConfig:
    """Translate a Hugging Face `SiglipConfig` (its config.json as a dict) into ours.

    Raises:
        CheckpointError: for architectures our SigLIP cannot express.
    """
    vision = {**_HF_VISION_DEFAULTS, **_HF_COMMON_DEFAULTS, **_hf_sub_config(hf_config, "vision")}
    text = {**_HF_TEXT_DEFAULTS, **_HF_COMMON_DEFAULTS, **_hf_sub_config(hf_config, "text")}
    embed_dim = text.get("projection_size") or text["hidden_size"]
    for name, sub in (("vision", vision), ("text", text)):
        if sub["intermediate_size"] != 4 * sub["hidden_size"]:
            raise CheckpointError(f"unsupported HF SigLIP: {name} MLP is not 4x its width ({sub['intermediate_size']})")
        if sub["layer_norm_eps"] != 1e-6:
            raise CheckpointError(f"unsupported HF SigLIP: {name} layer_norm_eps {sub['layer_norm_eps']} is not 1e-6")
    if vision["hidden_act"] not in _GELU_TANH or not _GELU_TANH.get(text["hidden_act"], False):
        raise CheckpointError(
            f"unsupported HF SigLIP activations (vision {vision['hidden_act']}, text {text['hidden_act']}): the "
            "text tower needs gelu_pytorch_tanh, the image tower gelu or gelu_pytorch_tanh"
        )
    if vision["num_channels"] != 3 or vision["hidden_size"] != embed_dim:
        raise CheckpointError(
            f"unsupported HF SigLIP: {vision['num_channels']} input channels, image width {vision['hidden_size']} "
            f"and embedding width {embed_dim} (need RGB and equal widths)"
        )
    return CLIPConfig(
        embed_dim=embed_dim,
        vision=VisionConfig(
            image_size=_square(vision["image_size"]),
            width=vision["hidden_size"],
            layers=vision["num_hidden_layers"],
            heads=vision["num_attention_heads"],
            patch_size=_square(vision["patch_size"]),
            gelu_tanh=_GELU_TANH[vision["hidden_act"]],
        ),
        text=TextConfig(
            context_length=text["max_position_embeddings"],
            vocab_size=text["vocab_size"],
            width=text["hidden_size"],
            heads=text["num_attention_heads"],
            layers=text["num_hidden_layers"],
        ),
        quick_gelu=False,
        family="siglip",
    )


def convert_hf_state_dict(hf_state_dict: Mapping[str, torch.Tensor], config: CLIPConfig) -> dict[str, torch.Tensor]:
    """Rename a Hugging Face `SiglipModel` state dict to open_clip's SigLIP layout through `RENAMES`.

    Raises:
        CheckpointError: naming unknown, missing and wrongly-shaped keys.
    """
    out: dict[str, torch.Tensor] = {}
    fused: dict[str, dict[str, torch.Tensor]] = {}  # our fused key -> {"q"|"k"|"v": tensor}
    unknown = []
    for key, tensor in hf_state_dict.items():
        if _IGNORED.fullmatch(key):
            continue
        matches = [(m, ours, how) for pattern, ours, how in _PATTERNS if (m := pattern.match(key))]
        if not matches:
            unknown.append(key)
        for m, ours, how in matches:  # the MAP head's in_proj feeds two of our keys
            target = ours.replace("{i}", m.group(1)) if m.groups() else ours
            if how in (Q, K, V):
                fused.setdefault(target, {})[how] = tensor
            elif how == HEAD_Q:
                out[target] = tensor[: tensor.shape[0] // 3]
            elif how == HEAD_KV:
                out[target] = tensor[tensor.shape[0] // 3 :]
            elif how == SCALAR:
                out[target] = tensor.reshape(())
            elif how == BATCHED:
                out[target] = tensor.unsqueeze(0)  # [1, grid*grid, width]
            else:
                out[target] = tensor
    out.update(fuse_qkv(fused))
    return checked_conversion(out, lambda: SigLIP(config), unknown, "SigLIP")


def read_hf_folder(folder: str | Path) -> tuple[dict[str, torch.Tensor], CLIPConfig]:
    """Read a `SiglipModel.save_pretrained` folder (config.json plus safetensors or .bin weights).

    Returns:
        (open_clip-layout state dict, CLIPConfig with family "siglip").

    Raises:
        CheckpointError: if the folder lacks config.json or weights, or the checkpoint does not convert.
    """
    folder = Path(folder)
    try:
        hf_config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{folder} is not a Hugging Face SigLIP folder: cannot read config.json ({e})") from e
    config = config_from_hf(hf_config)
    hf_state_dict = _read_hf_weights(folder)
    logger.info("converting %d Hugging Face SigLIP tensors from %s", len(hf_state_dict), folder)
    return convert_hf_state_dict(hf_state_dict, config), config

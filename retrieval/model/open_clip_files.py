"""open_clip's hub layout: `open_clip_model.safetensors` beside an `open_clip_config.json`.

The weights' shapes give the architecture; the config adds what shapes cannot say (the activation: QuickGELU
or GELU for CLIP, exact or tanh GELU in timm's SigLIP image towers) and how images are preprocessed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, NamedTuple

from retrieval.errors import CheckpointError

OPEN_CLIP_CONFIG = "open_clip_config.json"
# The names open_clip's hub loader looks for, safetensors only: we never unpickle a download.
OPEN_CLIP_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.safetensors")
# timm's SigLIP image towers built with act_layer="gelu_tanh" (timm 1.0 `vision_transformer.py`); the others
# use exact GELU.
TIMM_GELU_TANH = frozenset(
    {
        "vit_base_patch32_siglip_256",
        "vit_base_patch32_siglip_gap_256",
        "vit_large_patch16_siglip_512",
        "vit_large_patch16_siglip_gap_512",
        "vit_so400m_patch16_siglip_256",
        "vit_so400m_patch16_siglip_384",
        "vit_so400m_patch16_siglip_512",
        "vit_so400m_patch16_siglip_gap_384",
        "vit_so400m_patch16_siglip_gap_512",
        "vit_giantopt_patch16_siglip_256",
        "vit_giantopt_patch16_siglip_384",
        "vit_giantopt_patch16_siglip_gap_256",
        "vit_giantopt_patch16_siglip_gap_384",
    }
)


class OpenClipHints(NamedTuple):
    """What an open_clip_config.json says beyond the tensors' shapes."""

    quick_gelu: bool  # CLIP towers: QuickGELU (OpenAI, DFN) rather than exact GELU (LAION, DataComp)
    gelu_tanh: bool  # SigLIP image towers: tanh-approximated GELU
    preprocess: dict[str, Any]  # open_clip's preprocess_cfg: mean, std, interpolation, resize_mode
    image_size: int | None  # the image tower's input size (what a convolutional tower's weights cannot say)


def find_open_clip_config(path: Path) -> Path | None:
    """The open_clip_config.json of a hub folder, or beside a weights file; None when there is none."""
    candidate = (path if path.is_dir() else path.parent) / OPEN_CLIP_CONFIG
    return candidate if candidate.is_file() else None


def find_open_clip_weights(folder: Path) -> Path | None:
    """The safetensors weights of an open_clip hub folder, if it has them."""
    return next((folder / n for n in OPEN_CLIP_WEIGHTS if (folder / n).is_file()), None)


def read_hints(config_file: Path) -> OpenClipHints:
    """Read an open_clip_config.json.

    Raises:
        CheckpointError: the file is not JSON or has no `model_cfg`.
    """
    try:
        data = json.loads(config_file.read_text())
        model_cfg = data["model_cfg"]
        vision_cfg = model_cfg.get("vision_cfg") or {}
    except (OSError, ValueError, KeyError, AttributeError) as e:
        raise CheckpointError(
            f"cannot read {config_file} as an open_clip config ({e!r}); fetch it from the model's hub repository again"
        ) from e
    return OpenClipHints(
        quick_gelu=bool(model_cfg.get("quick_gelu", False)),
        gelu_tanh=vision_cfg.get("timm_model_name") in TIMM_GELU_TANH,
        preprocess=dict(data.get("preprocess_cfg") or {}),
        image_size=vision_cfg.get("image_size") if isinstance(vision_cfg.get("image_size"), int) else None,
    )

"""Contrastive (CLIP) training on captioned images: data loading, the loss and optimiser, resumable runs.

Example: `train(TrainConfig(data="shapes:2000:1", out_dir="runs/demo", model="tiny-vit", epochs=2))`.
"""

from __future__ import annotations

from retrieval.training.data import CaptionedImage, PairSet, ShapesSource, load_pair_set, parse_source, read_pairs
from retrieval.training.optim import WarmupCosine, build_optimizer, clip_loss, param_groups
from retrieval.training.trainer import SCRATCH_CONFIGS, TrainConfig, TrainResult, evaluate, scratch_config, train

__all__ = [
    "SCRATCH_CONFIGS",
    "CaptionedImage",
    "PairSet",
    "ShapesSource",
    "TrainConfig",
    "TrainResult",
    "WarmupCosine",
    "build_optimizer",
    "clip_loss",
    "evaluate",
    "load_pair_set",
    "param_groups",
    "parse_source",
    "read_pairs",
    "scratch_config",
    "train",
]

"""The model families behind one interface: a config's `family` picks the module that builds the towers.

Everything outside `retrieval/model/` sees only what both modules offer: `encode_image`, `encode_text`,
`tokenize`, `config`, `towers` and the `info` the loader sets.
"""

from __future__ import annotations

from typing import Union

from retrieval.model.clip import CLIP, Towers
from retrieval.model.config import CLIPConfig
from retrieval.model.mobileclip import MobileCLIP
from retrieval.model.siglip import SigLIP

EmbeddingModel = Union[CLIP, SigLIP, MobileCLIP]  # noqa: UP007  # a runtime alias, used in isinstance checks too
MODEL_CLASSES: tuple[type, ...] = (CLIP, SigLIP, MobileCLIP)
_BY_FAMILY: dict[str, type] = {"clip": CLIP, "siglip": SigLIP, "mobileclip": MobileCLIP}


def build_towers(config: CLIPConfig, towers: Towers = "both") -> EmbeddingModel:
    """The module for the config's family, with the towers asked for (randomly initialised)."""
    return _BY_FAMILY[config.family](config, towers=towers)

"""What identifies a model's embedding space: a store records it and refuses vectors from any other.

Imports no torch at module level: the ONNX Runtime path reads identities in processes that never load torch.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from torch import nn


@dataclass(frozen=True)
class ModelInfo:
    """The identity of a loaded model, as far as the vectors it produces are concerned."""

    name: str  # registry name ("ViT-B/32") or the checkpoint's file/folder name
    weights_sha256: str  # hex digest identifying the exact weights
    embed_dim: int  # length of the embeddings
    image_size: int  # side of the square input the image tower sees
    mean: tuple[float, float, float]  # per-channel normalisation the preprocessing applies
    std: tuple[float, float, float]
    # Added with SigLIP; the defaults are what every model recorded before, so old stores keep their identity.
    resize_mode: str = "shortest"  # how images become squares ("shortest" + centre crop, or "squash")
    tokenizer: str = "clip-bpe"  # the text tokenizer: CLIP's BPE, or "hf:<sha256[:16] of tokenizer.json>"
    # Added with ONNX Runtime encoders: "int8" (dynamically quantised weights) gives vectors of another space.
    precision: str = "float32"
    # Added with MobileCLIP2; the default is what every model used before.
    interpolation: str = "bicubic"  # the resize's resampling filter ("bicubic" or "bilinear")

    @property
    def table_name(self) -> str:
        """A LanceDB table name unique to this model's weights: `images_<name>_<sha[:12]>`, plus `_<precision>`
        for encoders that are not float32 (a float32 table keeps the name it had before precisions existed)."""
        slug = re.sub(r"[^A-Za-z0-9]+", "_", self.name).strip("_").lower() or "model"
        suffix = "" if self.precision == "float32" else f"_{self.precision}"
        return f"images_{slug}_{self.weights_sha256[:12]}{suffix}"

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelInfo:
        """The inverse of `to_dict`."""
        return cls(
            name=str(d["name"]),
            weights_sha256=str(d["weights_sha256"]),
            embed_dim=int(d["embed_dim"]),
            image_size=int(d["image_size"]),
            mean=tuple(float(x) for x in d["mean"]),
            std=tuple(float(x) for x in d["std"]),
            resize_mode=str(d.get("resize_mode", "shortest")),
            tokenizer=str(d.get("tokenizer", "clip-bpe")),
            precision=str(d.get("precision", "float32")),
            interpolation=str(d.get("interpolation", "bicubic")),
        )

    @classmethod
    def for_model(cls, model: nn.Module, name: str) -> ModelInfo:
        """Identity of a model built in memory (tests, training): hashes its tensors, so equal weights match.

        Args:
            model: a `CLIP` or `SigLIP` module.
            name: the name to record.
        """
        from retrieval.model.preprocess import Preprocess

        config = model.config
        preprocess = Preprocess.from_config(config)
        return cls(
            name=name,
            weights_sha256=state_dict_sha256(model.state_dict()),
            embed_dim=config.embed_dim,
            image_size=config.vision.image_size,
            mean=preprocess.mean,
            std=preprocess.std,
            resize_mode=preprocess.resize_mode,
            tokenizer=tokenizer_identity(model),
            interpolation=preprocess.interpolation,
        )


def tokenizer_identity(model: nn.Module) -> str:
    """What `ModelInfo.tokenizer` records: "clip-bpe", "hf:" + the tokenizer.json's SHA-256[:16], or "none"."""
    from retrieval.model.download import file_sha256

    if model.config.family != "siglip":  # CLIP and MobileCLIP2 share CLIP's BPE
        return "clip-bpe"
    tokenizer_file = getattr(model, "tokenizer_file", None)
    return "none" if tokenizer_file is None else f"hf:{file_sha256(tokenizer_file)[:16]}"


def state_dict_sha256(state_dict: dict[str, torch.Tensor]) -> str:
    """SHA-256 over names, dtypes, shapes and bytes of a state dict's tensors, in key order."""
    import torch

    digest = hashlib.sha256()
    for key in sorted(state_dict):
        tensor = state_dict[key].detach().cpu().contiguous()
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}\n".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()

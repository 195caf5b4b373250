"""Model architecture configs: frozen dataclasses, named presets, and inference from a state dict's shapes.

One config type serves every family: `family` picks the module that builds the towers ("clip": OpenAI's
layout in `clip.py`; "siglip": open_clip's SigLIP layout in `siglip.py`; "mobileclip": open_clip's MobileCLIP2
layout in `mobileclip.py`), and the tower sizes mean the same in each.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from retrieval.errors import CheckpointError

FAMILIES = ("clip", "siglip", "mobileclip")

# openai/CLIP fixes every attention head at 64 channels; a state dict only stores widths, so the head
# count is derived from them (as openai/CLIP's build_model does).
HEAD_WIDTH = 64
MOBILECLIP_IMAGE_SIZE = 256  # MobileCLIP2-S0/S2's input size; the weights of a convolutional tower do not say it


@dataclass(frozen=True)
class VisionConfig:
    """The image tower: a ViT when `layers` is an int, OpenAI's ModifiedResNet when it is a 4-tuple.

    In the "mobileclip" family the 4-tuple is FastViT-MCi's blocks per stage instead, and `width` its stem width.
    """

    image_size: int = 224  # input resolution in pixels (square)
    width: int = 768  # ViT: token width; ResNet: stem width (the final feature width is 32x this); FastViT: stem width
    layers: int | tuple[int, int, int, int] = 12  # ViT: transformer blocks; ResNet/FastViT: blocks per stage
    heads: int = 12  # attention heads (ViT blocks, or the ResNet's attention pool)
    patch_size: int | None = 32  # ViT patch side in pixels; None for ResNets
    # SigLIP only: timm builds some SigLIP towers (e.g. B/32) with tanh-approximated GELU, others (B/16) with
    # exact GELU; shapes cannot tell them apart, so it comes from the preset or open_clip_config.json.
    gelu_tanh: bool = False

    @property
    def is_resnet(self) -> bool:
        """True for OpenAI's ModifiedResNet (and the stages of a FastViT), False for a VisionTransformer."""
        return isinstance(self.layers, tuple)


@dataclass(frozen=True)
class TextConfig:
    """The causal text transformer."""

    context_length: int = 77  # maximum tokens per text, <|startoftext|> and <|endoftext|> included
    vocab_size: int = 49408  # BPE vocabulary size (the tokenizer's ids are below this)
    width: int = 512  # token width
    heads: int = 8  # attention heads
    layers: int = 12  # transformer blocks


@dataclass(frozen=True)
class CLIPConfig:
    """A whole CLIP model: both towers and the shared embedding space."""

    embed_dim: int = 512  # width of the joint image/text embedding space
    vision: VisionConfig = field(default_factory=VisionConfig)  # the image tower
    text: TextConfig = field(default_factory=TextConfig)  # the text tower
    quick_gelu: bool = True  # OpenAI's x*sigmoid(1.702x) activation; False means exact GELU (open_clip LAION)
    family: str = "clip"  # which tower module builds it: "clip" (OpenAI), "siglip" or "mobileclip" (open_clip's)

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise CheckpointError(f"unknown model family {self.family!r}; known: {', '.join(FAMILIES)}")

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-able dict (ResNet stage counts become a list)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> CLIPConfig:
        """Rebuild a config written by `to_dict` (e.g. read back from JSON).

        Raises:
            CheckpointError: if the dict has unknown or missing fields.
        """
        try:
            vision = dict(d["vision"])
            if isinstance(vision.get("layers"), list):
                vision["layers"] = tuple(vision["layers"])
            return cls(
                embed_dim=d["embed_dim"],
                vision=VisionConfig(**vision),
                text=TextConfig(**d["text"]),
                quick_gelu=d["quick_gelu"],
                family=d.get("family", "clip"),  # configs written before SigLIP have no family
            )
        except (KeyError, TypeError) as e:
            raise CheckpointError(f"invalid CLIP config {dict(d)!r}: {e}; write it with CLIPConfig.to_dict()") from e

    @classmethod
    def from_state_dict(
        cls,
        state_dict: Mapping[str, torch.Tensor],
        quick_gelu: bool = True,
        gelu_tanh: bool = False,
        image_size: int | None = None,
    ) -> CLIPConfig:
        """Infer the architecture from a state dict's tensor shapes, as openai/CLIP's build_model does.

        Works on tensors of any device, including "meta". Head counts follow OpenAI's rule of 64 channels
        per head. open_clip's SigLIP layout (`visual.trunk.*`, `text.*`) gives a "siglip" config, its MobileCLIP2
        layout (`visual.trunk.stem.*`, train-time or re-parameterised) a "mobileclip" one.

        Args:
            state_dict: OpenAI key names (`visual.*`, `token_embedding.weight`, ...) or open_clip's SigLIP
                ones, both towers present.
            quick_gelu: CLIP only; the activation cannot be read from shapes: True for OpenAI's checkpoints,
                False for open_clip's LAION ones.
            gelu_tanh: SigLIP only: the image tower's GELU is tanh-approximated (see `VisionConfig`).
            image_size: MobileCLIP only: a convolutional tower's input size cannot be read from its weights; None
                means MobileCLIP2's 256.

        Raises:
            CheckpointError: if a key the inference needs is missing.
        """
        sd = state_dict
        if "visual.trunk.pos_embed" in sd:
            return _siglip_from_state_dict(sd, gelu_tanh)
        if any(k.startswith("visual.trunk.stem.") for k in sd):
            return _mobileclip_from_state_dict(sd, image_size)
        try:
            if "visual.proj" in sd:
                width = sd["visual.conv1.weight"].shape[0]
                patch_size = sd["visual.conv1.weight"].shape[-1]
                grid = round((sd["visual.positional_embedding"].shape[0] - 1) ** 0.5)
                vision = VisionConfig(
                    image_size=patch_size * grid,
                    width=width,
                    layers=_count_blocks(sd, "visual.transformer.resblocks."),
                    heads=width // HEAD_WIDTH,
                    patch_size=patch_size,
                )
            else:
                width = sd["visual.layer1.0.conv1.weight"].shape[0]
                grid = round((sd["visual.attnpool.positional_embedding"].shape[0] - 1) ** 0.5)
                stages = tuple(_count_blocks(sd, f"visual.layer{i}.") for i in range(1, 5))
                vision = VisionConfig(
                    image_size=grid * 32,  # the ResNet downsamples by 32 before the attention pool
                    width=width,
                    layers=stages,  # type: ignore[arg-type]  # always four stages
                    heads=width * 32 // HEAD_WIDTH,
                    patch_size=None,
                )
            text_width = sd["ln_final.weight"].shape[0]
            text = TextConfig(
                context_length=sd["positional_embedding"].shape[0],
                vocab_size=sd["token_embedding.weight"].shape[0],
                width=text_width,
                heads=text_width // HEAD_WIDTH,
                layers=_count_blocks(sd, "transformer.resblocks."),
            )
            return cls(embed_dim=sd["text_projection"].shape[1], vision=vision, text=text, quick_gelu=quick_gelu)
        except KeyError as e:
            raise CheckpointError(
                f"cannot infer a CLIP architecture: state dict has no {e}; expected OpenAI CLIP key names "
                "with both the image and the text tower"
            ) from e


def _siglip_from_state_dict(sd: Mapping[str, torch.Tensor], gelu_tanh: bool) -> CLIPConfig:
    """Infer a SigLIP config from open_clip's SigLIP layout (`visual.trunk.*` timm ViT, `text.*` text tower)."""
    try:
        width = sd["visual.trunk.patch_embed.proj.weight"].shape[0]
        patch_size = sd["visual.trunk.patch_embed.proj.weight"].shape[-1]
        grid = round(sd["visual.trunk.pos_embed"].shape[1] ** 0.5)
        vision = _vit(patch_size * grid, width, _count_blocks(sd, "visual.trunk.blocks."), patch_size, gelu_tanh)
        text_width = sd["text.ln_final.weight"].shape[0]
        text = TextConfig(
            context_length=sd["text.positional_embedding"].shape[0],
            vocab_size=sd["text.token_embedding.weight"].shape[0],
            width=text_width,
            heads=text_width // HEAD_WIDTH,
            layers=_count_blocks(sd, "text.transformer.resblocks."),
        )
        embed_dim = sd["text.text_projection.weight"].shape[0]
    except KeyError as e:
        raise CheckpointError(
            f"cannot infer a SigLIP architecture: state dict has no {e}; expected open_clip's SigLIP key names "
            "(visual.trunk.*, text.*) with both towers"
        ) from e
    if embed_dim != width:
        raise CheckpointError(
            f"unsupported SigLIP checkpoint: image width {width} differs from the embedding width {embed_dim} "
            "(open_clip's SigLIP models have no image projection)"
        )
    return CLIPConfig(embed_dim=embed_dim, vision=vision, text=text, quick_gelu=False, family="siglip")


def _mobileclip_from_state_dict(sd: Mapping[str, torch.Tensor], image_size: int | None) -> CLIPConfig:
    """Infer a MobileCLIP2 config from open_clip's layout (`visual.trunk.*` FastViT-MCi, `text.*` text tower).

    The keys used are the same in the train-time and the re-parameterised form.
    """
    try:
        width = sd["visual.trunk.stages.0.blocks.0.mlp.fc1.weight"].shape[1]
        vision = VisionConfig(
            image_size=image_size or MOBILECLIP_IMAGE_SIZE,
            width=width,
            layers=tuple(_count_blocks(sd, f"visual.trunk.stages.{i}.blocks.") for i in range(4)),  # type: ignore[arg-type]
            heads=8 * width // 32,  # the attention stage's heads of 32 channels
            patch_size=None,
        )
        text_width = sd["text.ln_final.weight"].shape[0]
        text = TextConfig(
            context_length=sd["text.positional_embedding"].shape[0],
            vocab_size=sd["text.token_embedding.weight"].shape[0],
            width=text_width,
            heads=text_width // HEAD_WIDTH,
            layers=_count_blocks(sd, "text.transformer.resblocks."),
        )
        embed_dim = sd["text.text_projection"].shape[1]
    except KeyError as e:
        raise CheckpointError(
            f"cannot infer a MobileCLIP architecture: state dict has no {e}; expected open_clip's MobileCLIP2 key "
            "names (visual.trunk.*, text.*) with both towers"
        ) from e
    return CLIPConfig(embed_dim=embed_dim, vision=vision, text=text, quick_gelu=False, family="mobileclip")


def _count_blocks(state_dict: Mapping[str, Any], prefix: str) -> int:
    """Count the distinct block indices N among keys `<prefix>N.*`."""
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    return len({m.group(1) for k in state_dict if (m := pattern.match(k))})


def _openai_text(width: int) -> TextConfig:
    """OpenAI's 12-layer text tower of the given width."""
    return TextConfig(width=width, heads=width // HEAD_WIDTH, layers=12)


def _siglip2_text() -> TextConfig:
    """SigLIP2's base text tower: 12 layers of width 768 over Gemma's 256k vocabulary, 64 tokens."""
    return TextConfig(context_length=64, vocab_size=256000, width=768, heads=12, layers=12)


def _mobileclip(width: int, layers: tuple[int, int, int, int]) -> CLIPConfig:
    """A MobileCLIP2 model: FastViT-MCi at 256 px, CLIP's 12-layer 512-wide text tower, 512-d embeddings."""
    vision = VisionConfig(MOBILECLIP_IMAGE_SIZE, width, layers, 8 * width // 32, None)
    return CLIPConfig(512, vision, _openai_text(512), quick_gelu=False, family="mobileclip")


def _resnet(image_size: int, width: int, layers: tuple[int, int, int, int]) -> VisionConfig:
    """A ModifiedResNet tower; its attention pool works on width*32 channels."""
    return VisionConfig(
        image_size=image_size, width=width, layers=layers, heads=width * 32 // HEAD_WIDTH, patch_size=None
    )


def _vit(image_size: int, width: int, layers: int, patch_size: int, gelu_tanh: bool = False) -> VisionConfig:
    """A VisionTransformer tower with 64-channel heads."""
    return VisionConfig(image_size, width, layers, width // HEAD_WIDTH, patch_size, gelu_tanh)


PRESETS: dict[str, CLIPConfig] = {
    # OpenAI's nine released models (QuickGELU).
    "RN50": CLIPConfig(1024, _resnet(224, 64, (3, 4, 6, 3)), _openai_text(512)),
    "RN101": CLIPConfig(512, _resnet(224, 64, (3, 4, 23, 3)), _openai_text(512)),
    "RN50x4": CLIPConfig(640, _resnet(288, 80, (4, 6, 10, 6)), _openai_text(640)),
    "RN50x16": CLIPConfig(768, _resnet(384, 96, (6, 8, 18, 8)), _openai_text(768)),
    "RN50x64": CLIPConfig(1024, _resnet(448, 128, (3, 15, 36, 10)), _openai_text(1024)),
    "ViT-B/32": CLIPConfig(512, _vit(224, 768, 12, 32), _openai_text(512)),
    "ViT-B/16": CLIPConfig(512, _vit(224, 768, 12, 16), _openai_text(512)),
    "ViT-L/14": CLIPConfig(768, _vit(224, 1024, 24, 14), _openai_text(768)),
    "ViT-L/14@336px": CLIPConfig(768, _vit(336, 1024, 24, 14), _openai_text(768)),
    # open_clip's LAION models: the same shapes as OpenAI's, with exact GELU.
    "ViT-B-32": CLIPConfig(512, _vit(224, 768, 12, 32), _openai_text(512), quick_gelu=False),
    "ViT-B-16": CLIPConfig(512, _vit(224, 768, 12, 16), _openai_text(512), quick_gelu=False),
    "ViT-L-14": CLIPConfig(768, _vit(224, 1024, 24, 14), _openai_text(768), quick_gelu=False),
    "ViT-B-32-256": CLIPConfig(512, _vit(256, 768, 12, 32), _openai_text(512), quick_gelu=False),
    # open_clip's SigLIP2 models: timm ViT with a MAP head, Gemma-vocabulary text tower of 64 tokens.
    "ViT-B-32-SigLIP2-256": CLIPConfig(768, _vit(256, 768, 12, 32, gelu_tanh=True), _siglip2_text(), False, "siglip"),
    "ViT-B-16-SigLIP2-256": CLIPConfig(768, _vit(256, 768, 12, 16), _siglip2_text(), False, "siglip"),
    # Apple's MobileCLIP2 (open_clip's layout): FastViT-MCi0 / MCi2 image towers, non-causal CLIP text tower.
    "MobileCLIP2-S0": _mobileclip(64, (2, 6, 10, 2)),
    "MobileCLIP2-S2": _mobileclip(80, (4, 12, 24, 4)),
    # Tiny random-init models for tests and toy training; they keep the real tokenizer's vocabulary.
    "tiny-vit": CLIPConfig(64, _vit(32, 128, 2, 8), TextConfig(width=128, heads=2, layers=2)),
    "tiny-rn": CLIPConfig(64, _resnet(64, 8, (1, 1, 1, 1)), TextConfig(width=128, heads=2, layers=2)),
}

"""The MobileCLIP2 module: the FastViT-MCi image tower and a CLIP text tower without causal mask.

Parameter names are open_clip's for its MobileCLIP2 models (`custom_text`): `visual.trunk.*` (timm's FastVit,
re-parameterised, see `fastvit.py`), `text.token_embedding`, `text.positional_embedding`,
`text.transformer.resblocks.N.*`, `text.ln_final`, `text.text_projection` and `logit_scale`. The text tower is
CLIP's (BPE tokens, 77 positions, exact GELU, read at the end-of-text token) except that every position attends to
every other, padding included, as open_clip's `no_causal_mask` does; so texts always run at the full context length.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from retrieval.model.clip import TOWERS, Towers
from retrieval.model.config import CLIPConfig
from retrieval.model.fastvit import MobileCLIPVision
from retrieval.model.layers import LayerNorm, Transformer


class MobileCLIPText(nn.Module):
    """open_clip's TextTransformer with `no_causal_mask`: argmax (end-of-text) pooling, projection without bias."""

    def __init__(self, config: CLIPConfig) -> None:
        super().__init__()
        text = config.text
        self.token_embedding = nn.Embedding(text.vocab_size, text.width)
        self.positional_embedding = nn.Parameter(torch.randn(text.context_length, text.width) * 0.01)
        self.transformer = Transformer(text.width, text.layers, text.heads, quick_gelu=config.quick_gelu)
        self.ln_final = LayerNorm(text.width)
        self.text_projection = nn.Parameter(torch.randn(text.width, config.embed_dim) * text.width**-0.5)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Embed tokens [B, context_length] into [B, embed_dim], read at each row's end-of-text (largest) id."""
        x = self.token_embedding(tokens) + self.positional_embedding.to(self.token_embedding.weight.dtype)
        x = self.ln_final(self.transformer(x))  # [B, context_length, width]
        x = x[torch.arange(x.shape[0], device=x.device), tokens.argmax(dim=-1)]  # [B, width]
        return x @ self.text_projection  # [B, embed_dim]


class MobileCLIP(nn.Module):
    """MobileCLIP2 with open_clip's parameter names; the same interface as `CLIP` (`encode_image`, `encode_text`).

    Args:
        config: the architecture (`config.family == "mobileclip"`).
        towers: which towers to build, as for `CLIP`.
    """

    def __init__(self, config: CLIPConfig, towers: Towers = "both") -> None:
        super().__init__()
        if towers not in TOWERS:
            raise ValueError(f"towers must be one of {TOWERS}, got {towers!r}")
        self.config = config
        self.towers = towers
        self.visual = MobileCLIPVision(config.vision, config.embed_dim) if towers != "text" else None
        self.text = MobileCLIPText(config) if towers != "image" else None
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        """Token ids [N, context_length] from CLIP's BPE tokenizer, padded with zeros; over-long texts are cut."""
        from retrieval.model.tokenizer import tokenize  # ftfy costs ~0.3 s: only when tokenizing

        return torch.from_numpy(tokenize(list(texts), context_length=self.config.text.context_length, truncate=True))

    def encode_image(self, pixels: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Embed preprocessed images [B, 3, S, S] into [B, embed_dim] float32 (L2-normalised by default)."""
        if self.visual is None:
            raise RuntimeError("this model has no image tower (towers='text'); load it with towers='image' or 'both'")
        weight = self.visual.trunk.stem[0].reparam_conv.weight
        features = self.visual(pixels.to(weight.dtype)).float()
        return F.normalize(features, dim=-1) if normalize else features

    def encode_text(self, tokens: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Embed token ids [B, context_length] into [B, embed_dim] float32 (L2-normalised by default).

        The tower is not causal, so the zero padding after each text changes its result: rows must be padded to
        exactly the context length, as `tokenize` does.
        """
        if self.text is None:
            raise RuntimeError("this model has no text tower (towers='image'); load it with towers='text' or 'both'")
        context_length = self.config.text.context_length
        if tokens.shape[-1] != context_length:
            raise ValueError(
                f"MobileCLIP needs tokens padded to its context length {context_length}, got {tokens.shape[-1]}"
            )
        features = self.text(tokens).float()
        return F.normalize(features, dim=-1) if normalize else features

    def forward(self, pixels: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """CLIP logits (cosine * exp(logit_scale)): ([B_img, B_txt], [B_txt, B_img])."""
        image = self.encode_image(pixels)
        text = self.encode_text(tokens)
        logits_per_image = self.logit_scale.exp().float() * image @ text.t()
        return logits_per_image, logits_per_image.t()

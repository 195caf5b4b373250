"""The SigLIP module: timm's MAP-pooled ViT and a non-causal text tower pooled at the last token.

Parameter names are open_clip's for its SigLIP models (`visual.trunk.*`, `text.token_embedding`,
`text.positional_embedding`, `text.transformer.resblocks.N.*`, `text.ln_final`, `text.text_projection`,
`logit_scale`, `logit_bias`), so their state dicts load with `strict=True`. Embeddings are used like CLIP's:
cosine similarity; `logit_bias` is kept for turning scores into SigLIP's sigmoid probabilities.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from retrieval.errors import TokenizerError
from retrieval.model.clip import TOWERS, Towers
from retrieval.model.config import CLIPConfig
from retrieval.model.layers import LayerNorm, Transformer
from retrieval.model.timm_vit import EPS, SigLIPVision

if TYPE_CHECKING:
    from retrieval.model.hub_tokenizer import HubTokenizer


class SigLIPText(nn.Module):
    """open_clip's TextTransformer as SigLIP configures it: no causal mask, tanh GELU, biased projection."""

    def __init__(self, config: CLIPConfig) -> None:
        super().__init__()
        text = config.text
        self.token_embedding = nn.Embedding(text.vocab_size, text.width)
        self.positional_embedding = nn.Parameter(torch.randn(text.context_length, text.width) * 0.01)
        self.transformer = Transformer(
            text.width, text.layers, text.heads, quick_gelu=False, eps=EPS, gelu_approximate="tanh"
        )
        self.ln_final = LayerNorm(text.width, eps=EPS)
        self.text_projection = nn.Linear(text.width, config.embed_dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Embed tokens [B, context_length] into [B, embed_dim], read at the last position."""
        x = self.token_embedding(tokens) + self.positional_embedding.to(self.token_embedding.weight.dtype)
        x = self.ln_final(self.transformer(x))  # [B, context_length, width]
        return self.text_projection(x[:, -1])  # [B, embed_dim]


class SigLIP(nn.Module):
    """SigLIP with open_clip's parameter names; the same interface as `CLIP` (`encode_image`, `encode_text`).

    Args:
        config: the architecture (`config.family == "siglip"`).
        towers: which towers to build, as for `CLIP`.
    """

    def __init__(self, config: CLIPConfig, towers: Towers = "both") -> None:
        super().__init__()
        if towers not in TOWERS:
            raise ValueError(f"towers must be one of {TOWERS}, got {towers!r}")
        if config.vision.is_resnet or config.vision.width != config.embed_dim:
            raise ValueError(f"a SigLIP needs a ViT image tower as wide as embed_dim, got {config}")
        self.config = config
        self.towers = towers
        self.visual = SigLIPVision(config.vision) if towers != "text" else None
        self.text = SigLIPText(config) if towers != "image" else None
        # Tokenizing needs the model's tokenizer.json; the loader sets its path, and it is read on first use
        # (Gemma's is 33 MB), so indexing, which never tokenizes, does not pay for it.
        self.tokenizer_file: Path | None = None
        self._tokenizer: HubTokenizer | None = None
        # open_clip's initial values (log 10 and -10) for training from scratch.
        self.logit_scale = nn.Parameter(torch.tensor(math.log(10.0)))
        self.logit_bias = nn.Parameter(torch.tensor(-10.0))

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        """Token ids [N, context_length] as open_clip's SigLIP tokenizer gives them (padded, truncated).

        Raises:
            TokenizerError: no tokenizer was attached (the checkpoint came without its tokenizer.json).
        """
        if self.tokenizer_file is None:
            raise TokenizerError(
                "this SigLIP model has no tokenizer: put the model's tokenizer.json (from its hub repository) "
                "next to the checkpoint file, or load it by registry name"
            )
        if self._tokenizer is None or self._tokenizer.path != self.tokenizer_file:
            from retrieval.model.hub_tokenizer import HubTokenizer  # ftfy and tokenizers: only when tokenizing

            self._tokenizer = HubTokenizer(self.tokenizer_file, self.config.text.context_length)
        return torch.from_numpy(self._tokenizer(list(texts)))

    def encode_image(self, pixels: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Embed preprocessed images [B, 3, S, S] into [B, embed_dim] float32 (L2-normalised by default)."""
        if self.visual is None:
            raise RuntimeError("this SigLIP has no image tower (towers='text'); load it with towers='image' or 'both'")
        weight = self.visual.trunk.patch_embed.proj.weight
        features = self.visual(pixels.to(weight.dtype)).float()
        return F.normalize(features, dim=-1) if normalize else features

    def encode_text(self, tokens: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Embed token ids [B, context_length] into [B, embed_dim] float32 (L2-normalised by default).

        The tower is not causal and reads the last position, so every row must be padded to exactly the
        context length, as `tokenize` does.
        """
        if self.text is None:
            raise RuntimeError("this SigLIP has no text tower (towers='image'); load it with towers='text' or 'both'")
        context_length = self.config.text.context_length
        if tokens.shape[-1] != context_length:
            raise ValueError(
                f"SigLIP needs tokens padded to its context length {context_length}, got {tokens.shape[-1]}"
            )
        features = self.text(tokens).float()
        return F.normalize(features, dim=-1) if normalize else features

    def forward(self, pixels: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """SigLIP logits (cosine * exp(logit_scale) + logit_bias): ([B_img, B_txt], [B_txt, B_img])."""
        image = self.encode_image(pixels)
        text = self.encode_text(tokens)
        logits_per_image = self.logit_scale.exp().float() * image @ text.t() + self.logit_bias.float()
        return logits_per_image, logits_per_image.t()

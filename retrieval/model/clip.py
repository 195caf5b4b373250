"""The CLIP module: an image tower and a causal text tower projected into one embedding space.

Parameter names are exactly OpenAI's (`visual.*`, `token_embedding`, `positional_embedding`,
`transformer.resblocks.N.*`, `ln_final`, `text_projection`, `logit_scale`), so their state dicts load with
`strict=True` once the TorchScript-only keys are removed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Literal, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from retrieval.model.config import CLIPConfig
from retrieval.model.layers import LayerNorm, Transformer
from retrieval.model.vision import ModifiedResNet, VisionTransformer

Towers = Literal["both", "image", "text"]
TOWERS: tuple[str, ...] = ("both", "image", "text")
# Top-level keys of the text tower; `visual.*` is the image tower and `logit_scale` is shared. SigLIP keeps its
# whole text tower under `text.`.
TEXT_KEY_PREFIXES = (
    "token_embedding.",
    "positional_embedding",
    "transformer.",
    "ln_final.",
    "text_projection",
    "text.",
)

V = TypeVar("V")


class CLIP(nn.Module):
    """CLIP with OpenAI's parameter names, batch-first, attention through `F.scaled_dot_product_attention`.

    Args:
        config: the architecture.
        towers: which towers to build; a tower not asked for is not built (`visual` is None for "text",
            the text modules are None for "image"), which saves its memory when only one side is needed.
    """

    def __init__(self, config: CLIPConfig, towers: Towers = "both") -> None:
        super().__init__()
        if towers not in TOWERS:
            raise ValueError(f"towers must be one of {TOWERS}, got {towers!r}")
        self.config = config
        self.towers = towers
        self.visual: VisionTransformer | ModifiedResNet | None = None
        self.transformer: Transformer | None = None
        self.token_embedding: nn.Embedding | None = None
        self.positional_embedding: nn.Parameter | None = None
        self.ln_final: LayerNorm | None = None
        self.text_projection: nn.Parameter | None = None

        if towers in ("both", "image"):
            vision = config.vision
            if vision.is_resnet:
                self.visual = ModifiedResNet(vision, config.embed_dim)
            else:
                self.visual = VisionTransformer(vision, config.embed_dim, config.quick_gelu)
        if towers in ("both", "text"):
            text = config.text
            self.transformer = Transformer(text.width, text.layers, text.heads, config.quick_gelu, causal=True)
            self.token_embedding = nn.Embedding(text.vocab_size, text.width)
            self.positional_embedding = nn.Parameter(torch.empty(text.context_length, text.width))
            self.ln_final = LayerNorm(text.width)
            self.text_projection = nn.Parameter(torch.empty(text.width, config.embed_dim))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.initialize_parameters()

    def initialize_parameters(self) -> None:
        """Initialise as openai/CLIP's `initialize_parameters` does (for training from scratch)."""
        if isinstance(self.visual, ModifiedResNet):
            pool = self.visual.attnpool
            std = pool.c_proj.in_features**-0.5
            for linear in (pool.q_proj, pool.k_proj, pool.v_proj, pool.c_proj):
                nn.init.normal_(linear.weight, std=std)
            # Zeroing each block's last BN scale starts every residual branch as the identity.
            for stage in (self.visual.layer1, self.visual.layer2, self.visual.layer3, self.visual.layer4):
                for block in stage:
                    nn.init.zeros_(block.bn3.weight)
        if self.transformer is not None:
            nn.init.normal_(self.token_embedding.weight, std=0.02)
            nn.init.normal_(self.positional_embedding, std=0.01)
            width, layers = self.transformer.width, self.transformer.layers
            proj_std = width**-0.5 * (2 * layers) ** -0.5
            for block in self.transformer.resblocks:
                nn.init.normal_(block.attn.in_proj_weight, std=width**-0.5)
                nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
                nn.init.normal_(block.mlp.c_fc.weight, std=(2 * width) ** -0.5)
                nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
            nn.init.normal_(self.text_projection, std=width**-0.5)

    @staticmethod
    def state_dict_for_towers(state_dict: Mapping[str, V], towers: Towers) -> dict[str, V]:
        """Drop the keys of towers a `CLIP(config, towers)` does not build.

        Every other key is kept, so `load_state_dict(strict=True)` still reports strays.
        """
        if towers not in TOWERS:
            raise ValueError(f"towers must be one of {TOWERS}, got {towers!r}")

        def built(key: str) -> bool:
            if key.startswith("visual."):
                return towers != "text"
            if key.startswith(TEXT_KEY_PREFIXES):
                return towers != "image"
            return True

        return {k: v for k, v in state_dict.items() if built(k)}

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        """Token ids [N, context_length] from CLIP's BPE tokenizer; over-long texts are truncated."""
        # Imported here: ftfy costs ~0.3 s, which decoder workers (they unpickle this module) must not pay.
        from retrieval.model.tokenizer import tokenize

        return torch.from_numpy(tokenize(list(texts), context_length=self.config.text.context_length, truncate=True))

    def encode_image(self, pixels: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Embed preprocessed images.

        Args:
            pixels: [B, 3, S, S] float, normalised with CLIP's mean/std, S = `config.vision.image_size`.
            normalize: L2-normalise each row (the default); False returns the raw projected features.

        Returns:
            [B, embed_dim] float32, whatever dtype the model computes in.
        """
        if self.visual is None:
            raise RuntimeError("this CLIP has no image tower (towers='text'); load it with towers='image' or 'both'")
        features = self.visual(pixels.to(self.visual.conv1.weight.dtype)).float()
        return F.normalize(features, dim=-1) if normalize else features

    def encode_text(self, tokens: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Embed tokenized texts, reading the features at each text's end-of-text token.

        Only the first max(eot)+1 positions of the batch are run: the causal mask means no position sees
        anything after it, so the padding beyond the longest text cannot change the result.

        Args:
            tokens: [B, L] int64 from the tokenizer, L <= `config.text.context_length`; the end-of-text
                token has the largest id in each row (as in CLIP's vocabulary).
            normalize: L2-normalise each row (the default); False returns the raw projected features.

        Returns:
            [B, embed_dim] float32, whatever dtype the model computes in.
        """
        if self.transformer is None:
            raise RuntimeError("this CLIP has no text tower (towers='image'); load it with towers='text' or 'both'")
        context_length = self.config.text.context_length
        if tokens.shape[-1] > context_length:
            raise ValueError(f"tokens have {tokens.shape[-1]} positions, more than the context length {context_length}")
        eot = tokens.argmax(dim=-1)  # [B]
        length = int(eot.max()) + 1
        return self.encode_token_embeddings(self.token_embedding(tokens[:, :length]), eot, normalize)

    def encode_token_embeddings(self, x: torch.Tensor, eot: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Run the text tower from token embeddings instead of token ids (`encode_text` is this after the lookup).

        Prompt learning (CoOp) puts learnable vectors where some tokens' embeddings would be; gradients then
        flow through the frozen tower to them.

        Args:
            x: [B, L, width] token embeddings (`token_embedding(tokens)`, some rows replaced), L <= the context
                length; positions after a row's end-of-text token cannot change its result (causal mask).
            eot: [B] int64, the position of each row's end-of-text token, whose features are read.
            normalize: L2-normalise each row (the default); False returns the raw projected features.

        Returns:
            [B, embed_dim] float32.
        """
        if self.transformer is None:
            raise RuntimeError("this CLIP has no text tower (towers='image'); load it with towers='text' or 'both'")
        length = x.shape[1]
        if length > self.config.text.context_length:
            raise ValueError(
                f"{length} token positions, more than the context length {self.config.text.context_length}"
            )
        x = x + self.positional_embedding[:length].to(x.dtype)
        x = self.transformer(x)  # [B, length, width]
        x = x[torch.arange(x.shape[0], device=x.device), eot]  # [B, width]
        features = (self.ln_final(x) @ self.text_projection).float()
        return F.normalize(features, dim=-1) if normalize else features

    def forward(self, pixels: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Score every image against every text.

        Args:
            pixels: [B_img, 3, S, S] preprocessed images.
            tokens: [B_txt, L] tokenized texts.

        Returns:
            (logits_per_image [B_img, B_txt], logits_per_text [B_txt, B_img]): cosine similarities times
            `logit_scale.exp()`.
        """
        image = self.encode_image(pixels)
        text = self.encode_text(tokens)
        logits_per_image = self.logit_scale.exp().float() * image @ text.t()
        return logits_per_image, logits_per_image.t()

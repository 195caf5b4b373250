"""SigLIP's image tower: timm's VisionTransformer without a class token, pooled by an attention (MAP) head.

Parameter names are timm's (`patch_embed.proj`, `pos_embed`, `blocks.N.attn.qkv`, `norm`, `attn_pool.*`), as
open_clip stores them under `visual.trunk.`, so its SigLIP checkpoints load with `strict=True`. timm builds
these blocks with LayerNorm eps 1e-6 and, depending on the model, exact or tanh-approximated GELU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from retrieval.model.config import VisionConfig
from retrieval.model.layers import LayerNorm

EPS = 1e-6


class PatchEmbed(nn.Module):
    """Cut the image into patches and project each to the token width (a strided convolution with bias)."""

    def __init__(self, patch_size: int, width: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Embed x [B, 3, S, S] into [B, grid*grid, width]."""
        x = self.proj(x)  # [B, width, grid, grid]
        return x.flatten(2).transpose(1, 2)  # [B, grid*grid, width]


class Mlp(nn.Module):
    """fc1 -> GELU (exact, or tanh-approximated) -> fc2, at 4x the width."""

    def __init__(self, width: int, gelu_tanh: bool) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, 4 * width)
        self.fc2 = nn.Linear(4 * width, width)
        self.approximate = "tanh" if gelu_tanh else "none"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Run the MLP on the last dimension."""
        return self.fc2(F.gelu(self.fc1(x), approximate=self.approximate))


class Attention(nn.Module):
    """Self-attention with one fused `qkv` projection, as timm names it."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Attend over x [B, N, width]."""
        batch, length, width = x.shape
        qkv = self.qkv(x).view(batch, length, 3, self.heads, width // self.heads)  # [B, N, 3, H, width/H]
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x [B, H, N, width/H]
        out = F.scaled_dot_product_attention(q, k, v)  # [B, H, N, width/H]
        return self.proj(out.transpose(1, 2).reshape(batch, length, width))  # [B, N, width]


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(self, width: int, heads: int, gelu_tanh: bool) -> None:
        super().__init__()
        self.norm1 = LayerNorm(width, eps=EPS)
        self.attn = Attention(width, heads)
        self.norm2 = LayerNorm(width, eps=EPS)
        self.mlp = Mlp(width, gelu_tanh)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Run the block on x [B, N, width]."""
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class AttentionPoolLatent(nn.Module):
    """MAP head: one learned query (`latent`) attends over every token, then a residual MLP."""

    def __init__(self, width: int, heads: int, gelu_tanh: bool) -> None:
        super().__init__()
        self.heads = heads
        self.latent = nn.Parameter(torch.zeros(1, 1, width))
        self.q = nn.Linear(width, width)
        self.kv = nn.Linear(width, 2 * width)
        self.proj = nn.Linear(width, width)
        self.norm = LayerNorm(width, eps=EPS)
        self.mlp = Mlp(width, gelu_tanh)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pool x [B, N, width] into [B, width]."""
        batch, length, width = x.shape
        head_width = width // self.heads
        q = self.q(self.latent.expand(batch, -1, -1))  # [B, 1, width]
        q = q.view(batch, 1, self.heads, head_width).transpose(1, 2)  # [B, H, 1, width/H]
        kv = self.kv(x).view(batch, length, 2, self.heads, head_width)  # [B, N, 2, H, width/H]
        k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)  # 2 x [B, H, N, width/H]
        out = F.scaled_dot_product_attention(q, k, v)  # [B, H, 1, width/H]
        out = self.proj(out.transpose(1, 2).reshape(batch, 1, width))  # [B, 1, width]
        out = out + self.mlp(self.norm(out))
        return out[:, 0]  # [B, width]


class SigLIPVisionTrunk(nn.Module):
    """timm's `vit_*_siglip_*`: patch embedding plus positions, blocks, final norm, MAP pooling."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        if config.patch_size is None or config.image_size % config.patch_size:
            raise ValueError(f"image_size {config.image_size} must be a multiple of patch_size {config.patch_size}")
        width = config.width
        grid = config.image_size // config.patch_size
        self.patch_embed = PatchEmbed(config.patch_size, width)
        self.pos_embed = nn.Parameter(torch.randn(1, grid * grid, width) * 0.02)
        depth: int = config.layers  # type: ignore[assignment]  # always an int for a ViT
        self.blocks = nn.ModuleList(Block(width, config.heads, config.gelu_tanh) for _ in range(depth))
        self.norm = LayerNorm(width, eps=EPS)
        self.attn_pool = AttentionPoolLatent(width, config.heads, config.gelu_tanh)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Embed images x [B, 3, S, S] into [B, width]."""
        x = self.patch_embed(x) + self.pos_embed.to(x.dtype)  # [B, grid*grid, width]
        for block in self.blocks:
            x = block(x)
        return self.attn_pool(self.norm(x))


class SigLIPVision(nn.Module):
    """open_clip's `TimmModel` wrapper around the trunk; SigLIP needs no projection head, so `trunk` is all."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.trunk = SigLIPVisionTrunk(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Embed images x [B, 3, S, S] into [B, width]."""
        return self.trunk(x)

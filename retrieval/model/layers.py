"""Transformer building blocks shared by the vision and text towers, with OpenAI's parameter names."""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn


class LayerNorm(nn.LayerNorm):
    """LayerNorm that always computes in float32 and returns the input's dtype (fp16 would lose precision)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise the last dimension."""
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps).to(x.dtype)


class QuickGELU(nn.Module):
    """OpenAI's sigmoid approximation of GELU, which their checkpoints were trained with."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply x * sigmoid(1.702 x)."""
        if torch.is_grad_enabled() and x.requires_grad:
            return x * torch.sigmoid(1.702 * x)
        # Nothing is saved for backward, so one [tokens, 4*width] buffer does for all three steps (~2x faster).
        return x.mul(1.702).sigmoid_().mul_(x)


class MultiheadSelfAttention(nn.Module):
    """Batch-first self-attention through `F.scaled_dot_product_attention`.

    Parameters are named like `nn.MultiheadAttention`'s (`in_proj_weight`, `in_proj_bias`, `out_proj`), so
    OpenAI's checkpoint keys load unchanged.
    """

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by heads {heads}")
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * width))
        self.out_proj = nn.Linear(width, width)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initialise like `nn.MultiheadAttention` (which OpenAI's model uses)."""
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.in_proj_bias)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, x: torch.Tensor, causal: bool = False) -> torch.Tensor:
        """Attend over x [B, L, width]; `causal` lets position i see only positions <= i."""
        batch, length, width = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)  # [B, L, 3*width]
        qkv = qkv.view(batch, length, 3, self.heads, width // self.heads)  # [B, L, 3, H, width/H]
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x [B, H, L, width/H]
        out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)  # [B, H, L, width/H]
        out = out.transpose(1, 2).reshape(batch, length, width)  # [B, L, width]
        return self.out_proj(out)


class ResidualAttentionBlock(nn.Module):
    """Pre-norm transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(
        self, width: int, heads: int, quick_gelu: bool, eps: float = 1e-5, gelu_approximate: str = "none"
    ) -> None:
        super().__init__()
        self.ln_1 = LayerNorm(width, eps=eps)
        self.attn = MultiheadSelfAttention(width, heads)
        self.ln_2 = LayerNorm(width, eps=eps)
        self.mlp = nn.Sequential(
            OrderedDict(
                [
                    ("c_fc", nn.Linear(width, 4 * width)),
                    ("gelu", QuickGELU() if quick_gelu else nn.GELU(approximate=gelu_approximate)),
                    ("c_proj", nn.Linear(4 * width, width)),
                ]
            )
        )

    def forward(self, x: torch.Tensor, causal: bool = False) -> torch.Tensor:
        """Run the block on x [B, L, width]."""
        x = x + self.attn(self.ln_1(x), causal=causal)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    """A stack of residual attention blocks (`resblocks.N.*`), causal for CLIP's text tower.

    `eps` and `gelu_approximate` default to CLIP's; SigLIP's text tower uses 1e-6 and tanh-approximated GELU.
    """

    def __init__(
        self,
        width: int,
        layers: int,
        heads: int,
        quick_gelu: bool,
        causal: bool = False,
        eps: float = 1e-5,
        gelu_approximate: str = "none",
    ) -> None:
        super().__init__()
        self.width = width
        self.layers = layers
        self.causal = causal
        self.resblocks = nn.ModuleList(
            ResidualAttentionBlock(width, heads, quick_gelu, eps, gelu_approximate) for _ in range(layers)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Run every block on x [B, L, width]."""
        for block in self.resblocks:
            x = block(x, causal=self.causal)
        return x

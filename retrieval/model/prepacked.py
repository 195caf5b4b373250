"""A bfloat16 text tower whose linear layers keep their weights in oneDNN's own blocked layout, for a long-lived
process that encodes one short query text at a time (`clipsearch serve`).

A bfloat16 `nn.Linear` on the CPU hands its [out, in] weight to oneDNN, which reorders it into the blocked
layout its AMX/AVX512-BF16 kernels read, on every call. For a query of ~10 tokens that reorder is a large part
of the work: each of the text transformer's 48 matrices is read and rewritten once per query only to be
multiplied by a handful of rows. Reordering once, when the server warms up, leaves only the product: the
ViT-B/32 text tower took 13.3-14.8 instead of 19.2-20.8 CPU ms a query (medians of 40 queries, four rounds
interleaved, two runs at load ~19-22), with the same vectors bit for bit. This is what PyTorch's own inductor does
when it freezes a bfloat16 model (`torch.ops.mkldnn._reorder_linear_weight`, `torch.ops.mkldnn._linear_pointwise`).
Packed tensors are opaque: the copy cannot be deep-copied or saved, only run.
"""

from __future__ import annotations

import copy
import logging
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from retrieval.model.layers import MultiheadSelfAttention

if TYPE_CHECKING:
    from retrieval.model.clip import CLIP

logger = logging.getLogger(__name__)

ROWS_HINT = 16  # the rows one product is expected to have (a short query's tokens): oneDNN picks its layout by it


class PackedLinear(nn.Module):
    """`F.linear` on a weight reordered once into oneDNN's layout (bfloat16, CPU, inference only)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.out_features = weight.shape[0]
        self.register_buffer("weight", torch.ops.mkldnn._reorder_linear_weight(weight.detach(), ROWS_HINT))
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in] -> [..., out]."""
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")


class PackedSelfAttention(nn.Module):
    """`MultiheadSelfAttention` with both projections packed; the same arithmetic."""

    def __init__(self, attention: MultiheadSelfAttention) -> None:
        super().__init__()
        self.heads = attention.heads
        self.in_proj = PackedLinear(attention.in_proj_weight, attention.in_proj_bias)
        self.out_proj = PackedLinear(attention.out_proj.weight, attention.out_proj.bias)

    def forward(self, x: torch.Tensor, causal: bool = False) -> torch.Tensor:
        """Attend over x [B, L, width], as `MultiheadSelfAttention.forward`."""
        batch, length, width = x.shape
        qkv = self.in_proj(x).view(batch, length, 3, self.heads, width // self.heads)  # [B, L, 3, H, width/H]
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x [B, H, L, width/H]
        out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)  # [B, H, L, width/H]
        return self.out_proj(out.transpose(1, 2).reshape(batch, length, width))  # [B, L, width]


def prepacked_text_model(model: CLIP) -> CLIP:
    """A copy of a bfloat16 CPU text tower (`retrieval.model.query_text.query_text_model`'s) whose transformer
    runs on prepacked weights; any other model, or a PyTorch build without these oneDNN ops, is returned as it is
    (logged).

    Args:
        model: the query text model; its weights are not changed.
    """
    transformer = getattr(model, "transformer", None)
    first = next(model.parameters(), None)
    if transformer is None or first is None or first.dtype != torch.bfloat16 or first.device.type != "cpu":
        return model
    packed = copy.deepcopy(model)
    try:
        with torch.no_grad():
            _pack(packed.transformer)
            probe = torch.zeros(1, 2, transformer.width, dtype=torch.bfloat16)
            packed.transformer.resblocks[0](probe, causal=True)  # the ops exist and accept this layout
    except (RuntimeError, AttributeError) as e:  # a build without mkldnn, or ops renamed in another version
        logger.info("query texts keep unpacked weights: %s", e)
        return model
    return packed.eval()


def _pack(module: nn.Module) -> None:
    """Replace, in place, every `nn.Linear` and `MultiheadSelfAttention` under `module` with a packed one."""
    for name, child in module.named_children():
        if isinstance(child, MultiheadSelfAttention):
            setattr(module, name, PackedSelfAttention(child))
        elif isinstance(child, nn.Linear):
            setattr(module, name, PackedLinear(child.weight, child.bias))
        else:
            _pack(child)

"""MobileCLIP2's image tower: FastViT-MCi (timm's `fastvit_mci0` / `fastvit_mci2`) in its re-parameterised form.

FastViT is trained with parallel branches (k x k and 1 x 1 convolutions, BatchNorm "identity" branches, a
residual around the mixer) that add up to one convolution once training is over. This module is only that
inference form: every re-parameterisable block is a single `reparam_conv`, as timm's `reparameterize_model`
leaves it, so the parameter names are timm's (`stem.0.reparam_conv`, `stages.N.blocks.M.token_mixer.reparam_conv`,
`final_conv.se.fc1`, `head.fc`, ...) under open_clip's `visual.trunk.` prefix. Published checkpoints hold the
train-time branches; `convert_mobileclip` fuses them on load.

Layout (MCi0/MCi2): a stem of three convolutions (stride 4 in all), four stages at widths w, 2w, 4w, 8w, each after
the first opened by a stride-2 large-kernel patch embedding; stages 1-3 mix tokens with a 3x3 depthwise convolution
(RepMixer), stage 4 with self-attention after a 7x7 conditional positional encoding; then a 3x3 depthwise
convolution to 16w channels with squeeze-excite, average pooling and a linear projection to the embedding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from retrieval.model.config import VisionConfig

MLP_RATIO = 3  # hidden width of every ConvMlp in MCi0-2, as a multiple of the stage width
HEAD_WIDTH = 32  # channels per attention head in the attention stage
POS_KERNEL = 7  # conditional positional encoding kernel
MIXER_KERNEL = 3  # RepMixer's depthwise kernel
DOWN_KERNEL = 7  # the patch embeddings' large kernel
BN_EPS = 1e-5


def stage_widths(config: VisionConfig) -> tuple[int, ...]:
    """The four stage widths: the stem width doubled at every stage (64..512 for MCi0, 80..640 for MCi2)."""
    return tuple(config.width * 2**i for i in range(4))


def _conv(in_chs: int, out_chs: int, kernel: int, stride: int = 1, groups: int = 1, bias: bool = True) -> nn.Conv2d:
    """A convolution padded as timm pads it: ((stride - 1) + (kernel - 1)) // 2 on every side."""
    return nn.Conv2d(in_chs, out_chs, kernel, stride, ((stride - 1) + (kernel - 1)) // 2, groups=groups, bias=bias)


class BatchNorm(nn.Module):
    """BatchNorm2d that always normalises with its running statistics (there is no training here).

    Parameter and buffer names are nn.BatchNorm2d's, without `num_batches_tracked`, which only training reads.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise x [B, C, H, W] per channel."""
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, BN_EPS)


class SqueezeExcite(nn.Module):
    """Scale each channel by a gate computed from the mean of all channels (1x1 convs `fc1`, `fc2`)."""

    def __init__(self, channels: int, reduced: int) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(channels, reduced, 1)
        self.fc2 = nn.Conv2d(reduced, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Gate x [B, C, H, W]."""
        gate = self.fc2(F.relu(self.fc1(x.mean((2, 3), keepdim=True))))  # [B, C, 1, 1]
        return x * gate.sigmoid()


class RepConv(nn.Module):
    """A re-parameterised MobileOne block or large-kernel conv: one convolution, optional squeeze-excite, GELU."""

    def __init__(
        self,
        in_chs: int,
        out_chs: int,
        kernel: int,
        stride: int = 1,
        groups: int = 1,
        se_reduced: int | None = None,
        act: bool = True,
    ) -> None:
        super().__init__()
        self.reparam_conv = _conv(in_chs, out_chs, kernel, stride, groups)
        self.se = SqueezeExcite(out_chs, se_reduced) if se_reduced else nn.Identity()
        self.act = nn.GELU() if act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Convolve x [B, in, H, W] into [B, out, H/stride, W/stride]."""
        return self.act(self.se(self.reparam_conv(x)))


class PatchEmbed(nn.Module):
    """Halve the size: a 7x7 depthwise conv (with squeeze-excite in stages 3-4) and a 1x1 conv (`proj.0`, `proj.1`)."""

    def __init__(self, in_chs: int, out_chs: int, se: bool) -> None:
        super().__init__()
        self.proj = nn.Sequential(
            RepConv(in_chs, out_chs, DOWN_KERNEL, stride=2, groups=in_chs, se_reduced=out_chs // 4 if se else None),
            RepConv(out_chs, out_chs, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Embed x [B, in, H, W] into [B, out, H/2, W/2]."""
        return self.proj(x)


class LayerScale(nn.Module):
    """A learned per-channel scale (`gamma` [C, 1, 1])."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((channels, 1, 1), 1e-5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Scale x [B, C, H, W]."""
        return x * self.gamma


class DepthwiseConv(nn.Module):
    """A depthwise convolution with bias under the name `reparam_conv` (RepMixer, positional encoding)."""

    def __init__(self, channels: int, kernel: int) -> None:
        super().__init__()
        self.reparam_conv = _conv(channels, channels, kernel, groups=channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Convolve x [B, C, H, W] (same size out); the fused kernel already holds the residual."""
        return self.reparam_conv(x)


class ConvNorm(nn.Module):
    """A convolution without bias followed by BatchNorm (`conv`, `bn`), as timm's ConvNormAct without activation."""

    def __init__(self, channels: int, kernel: int) -> None:
        super().__init__()
        self.conv = _conv(channels, channels, kernel, groups=channels, bias=False)
        self.bn = BatchNorm(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Convolve and normalise x [B, C, H, W]."""
        return self.bn(self.conv(x))


class ConvMlp(nn.Module):
    """7x7 depthwise conv + BatchNorm, then 1x1 convs to 3x the width and back with GELU between."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = ConvNorm(channels, 7)
        self.fc1 = nn.Conv2d(channels, channels * MLP_RATIO, 1)
        self.fc2 = nn.Conv2d(channels * MLP_RATIO, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Run the MLP on x [B, C, H, W]."""
        return self.fc2(F.gelu(self.fc1(self.conv(x))))


class RepMixerBlock(nn.Module):
    """x = mixer(x) (a fused depthwise conv holding its own residual), then x + scale * mlp(x)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.token_mixer = DepthwiseConv(channels, MIXER_KERNEL)
        self.mlp = ConvMlp(channels)
        self.layer_scale = LayerScale(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Run the block on x [B, C, H, W]."""
        x = self.token_mixer(x)
        return x + self.layer_scale(self.mlp(x))


class Attention(nn.Module):
    """Self-attention over the H*W positions of a feature map; `qkv` has no bias, as in timm's FastViT."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.heads = channels // HEAD_WIDTH
        self.qkv = nn.Linear(channels, 3 * channels, bias=False)
        self.proj = nn.Linear(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Attend over x [B, C, H, W]."""
        batch, channels, height, width = x.shape
        tokens = x.flatten(2).transpose(1, 2)  # [B, H*W, C]
        qkv = self.qkv(tokens).view(batch, height * width, 3, self.heads, HEAD_WIDTH)  # [B, N, 3, heads, 32]
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x [B, heads, N, 32]
        out = F.scaled_dot_product_attention(q, k, v)  # [B, heads, N, 32]
        out = self.proj(out.transpose(1, 2).reshape(batch, height * width, channels))  # [B, N, C]
        return out.transpose(1, 2).reshape(batch, channels, height, width)  # [B, C, H, W]


class AttentionBlock(nn.Module):
    """x + scale1 * attention(BatchNorm(x)), then x + scale2 * mlp(x)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = BatchNorm(channels)
        self.token_mixer = Attention(channels)
        self.layer_scale_1 = LayerScale(channels)
        self.mlp = ConvMlp(channels)
        self.layer_scale_2 = LayerScale(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Run the block on x [B, C, H, W]."""
        x = x + self.layer_scale_1(self.token_mixer(self.norm(x)))
        return x + self.layer_scale_2(self.mlp(x))


class Stage(nn.Module):
    """Optional downsampling, optional positional encoding, then blocks (`downsample`, `pos_emb`, `blocks.N`)."""

    def __init__(self, in_chs: int, out_chs: int, depth: int, index: int) -> None:
        super().__init__()
        attention = index == 3
        self.downsample = PatchEmbed(in_chs, out_chs, se=index >= 2) if index > 0 else nn.Identity()
        self.pos_emb = DepthwiseConv(out_chs, POS_KERNEL) if attention else nn.Identity()
        block = AttentionBlock if attention else RepMixerBlock
        self.blocks = nn.Sequential(*(block(out_chs) for _ in range(depth)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Run the stage on x [B, in, H, W]."""
        return self.blocks(self.pos_emb(self.downsample(x)))


class Head(nn.Module):
    """Global average pooling and the linear projection into the embedding space (`fc`)."""

    def __init__(self, channels: int, embed_dim: int) -> None:
        super().__init__()
        self.fc = nn.Linear(channels, embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pool x [B, C, H, W] into [B, embed_dim]."""
        return self.fc(x.mean((2, 3)))


class FastViT(nn.Module):
    """timm's FastVit as MobileCLIP2 configures it (`fastvit_mci0`, `fastvit_mci2`), re-parameterised."""

    def __init__(self, config: VisionConfig, embed_dim: int) -> None:
        super().__init__()
        if not isinstance(config.layers, tuple) or len(config.layers) != 4:
            raise ValueError(f"FastViT-MCi needs four stage depths, got layers={config.layers!r}")
        widths = stage_widths(config)
        if widths[-1] % HEAD_WIDTH:
            raise ValueError(f"the attention stage width {widths[-1]} must be a multiple of {HEAD_WIDTH}")
        stem = widths[0]
        self.stem = nn.Sequential(
            RepConv(3, stem, 3, stride=2),
            RepConv(stem, stem, 3, stride=2, groups=stem),
            RepConv(stem, stem, 1),
        )
        ins = (stem, *widths[:-1])
        self.stages = nn.Sequential(*(Stage(ins[i], widths[i], config.layers[i], i) for i in range(4)))
        final = 2 * widths[-1]
        self.final_conv = RepConv(widths[-1], final, 3, groups=widths[-1], se_reduced=final // 16)
        self.head = Head(final, embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Embed images x [B, 3, S, S] into [B, embed_dim]."""
        # Channels-last input makes oneDNN run every convolution after it channels-last too: its depthwise kernels
        # are ~1.6x faster so on CPU (measured on this project's 2-core EPYC), for the same result.
        x = x.contiguous(memory_format=torch.channels_last)
        return self.head(self.final_conv(self.stages(self.stem(x))))


class MobileCLIPVision(nn.Module):
    """open_clip's `TimmModel` wrapper: the trunk projects to the embedding itself, so `trunk` is all."""

    def __init__(self, config: VisionConfig, embed_dim: int) -> None:
        super().__init__()
        self.trunk = FastViT(config, embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Embed images x [B, 3, S, S] into [B, embed_dim]."""
        return self.trunk(x)

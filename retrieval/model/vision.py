"""Image towers: the VisionTransformer and OpenAI's ModifiedResNet, with OpenAI's parameter names."""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from retrieval.model.config import VisionConfig
from retrieval.model.layers import LayerNorm, Transformer


class VisionTransformer(nn.Module):
    """ViT: patchify, prepend a class token, transformer, project the class token's features."""

    def __init__(self, config: VisionConfig, output_dim: int, quick_gelu: bool) -> None:
        super().__init__()
        if config.patch_size is None or config.image_size % config.patch_size:
            raise ValueError(f"image_size {config.image_size} must be a multiple of patch_size {config.patch_size}")
        width = config.width
        grid = config.image_size // config.patch_size
        scale = width**-0.5
        self.conv1 = nn.Conv2d(3, width, kernel_size=config.patch_size, stride=config.patch_size, bias=False)
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(grid * grid + 1, width))
        self.ln_pre = LayerNorm(width)
        self.transformer = Transformer(width, config.layers, config.heads, quick_gelu)  # type: ignore[arg-type]
        self.ln_post = LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, output_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Embed images x [B, 3, S, S] into [B, output_dim]."""
        x = self.conv1(x)  # [B, width, grid, grid]
        x = x.flatten(2).transpose(1, 2)  # [B, grid*grid, width]
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)  # [B, 1, width]
        x = torch.cat([cls, x], dim=1)  # [B, grid*grid + 1, width]
        x = self.ln_pre(x + self.positional_embedding.to(x.dtype))
        x = self.transformer(x)
        return self.ln_post(x[:, 0]) @ self.proj


class Bottleneck(nn.Module):
    """ResNet bottleneck whose strided convolutions are replaced by an average pool (anti-aliasing)."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        out = planes * self.expansion
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.avgpool = nn.AvgPool2d(stride) if stride > 1 else nn.Identity()
        self.conv3 = nn.Conv2d(planes, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.downsample: nn.Sequential | None = None
        if stride > 1 or inplanes != out:
            # OpenAI's keys are downsample.0 (conv) and downsample.1 (bn); the parameterless pool goes first.
            self.downsample = nn.Sequential(
                OrderedDict(
                    [
                        ("pool", nn.AvgPool2d(stride)),
                        ("0", nn.Conv2d(inplanes, out, 1, bias=False)),
                        ("1", nn.BatchNorm2d(out)),
                    ]
                )
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Run the block on x [B, inplanes, H, W]."""
        identity = x if self.downsample is None else self.downsample(x)
        # In-place ReLUs reuse the fresh BatchNorm outputs (BatchNorm's backward does not need them).
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = F.relu(self.bn2(self.conv2(out)), inplace=True)
        out = self.bn3(self.conv3(self.avgpool(out)))
        return F.relu(out + identity, inplace=True)


class AttentionPool2d(nn.Module):
    """Pools a feature map with one attention query: the mean feature attending to every position."""

    def __init__(self, spatial_dim: int, width: int, heads: int, output_dim: int) -> None:
        super().__init__()
        self.heads = heads
        self.positional_embedding = nn.Parameter(torch.randn(spatial_dim**2 + 1, width) / width**0.5)
        self.k_proj = nn.Linear(width, width)
        self.q_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.c_proj = nn.Linear(width, output_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pool x [B, width, H, W] into [B, output_dim]."""
        batch, width = x.shape[:2]
        x = x.flatten(2).transpose(1, 2)  # [B, H*W, width]
        x = torch.cat([x.mean(dim=1, keepdim=True), x], dim=1)  # [B, H*W + 1, width]
        x = x + self.positional_embedding.to(x.dtype)
        head_width = width // self.heads
        q = self.q_proj(x[:, :1]).view(batch, 1, self.heads, head_width).transpose(1, 2)  # [B, heads, 1, hw]
        k = self.k_proj(x).view(batch, -1, self.heads, head_width).transpose(1, 2)  # [B, heads, H*W + 1, hw]
        v = self.v_proj(x).view(batch, -1, self.heads, head_width).transpose(1, 2)  # [B, heads, H*W + 1, hw]
        out = F.scaled_dot_product_attention(q, k, v)  # [B, heads, 1, hw]
        out = out.reshape(batch, width)  # [B, width]
        return self.c_proj(out)


class ModifiedResNet(nn.Module):
    """OpenAI's ResNet: a 3-convolution stem with an average pool, anti-aliased strides, attention pooling."""

    def __init__(self, config: VisionConfig, output_dim: int) -> None:
        super().__init__()
        if not config.is_resnet or config.image_size % 32:
            raise ValueError(f"a ModifiedResNet needs 4 stage counts and an image_size divisible by 32, got {config}")
        width = config.width
        self.conv1 = nn.Conv2d(3, width // 2, kernel_size=3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width // 2)
        self.conv2 = nn.Conv2d(width // 2, width // 2, kernel_size=3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width // 2)
        self.conv3 = nn.Conv2d(width // 2, width, kernel_size=3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(width)
        self.avgpool = nn.AvgPool2d(2)
        stages = config.layers
        self.layer1 = self._make_layer(width, width, stages[0], stride=1)  # type: ignore[index]
        self.layer2 = self._make_layer(width * 4, width * 2, stages[1], stride=2)  # type: ignore[index]
        self.layer3 = self._make_layer(width * 8, width * 4, stages[2], stride=2)  # type: ignore[index]
        self.layer4 = self._make_layer(width * 16, width * 8, stages[3], stride=2)  # type: ignore[index]
        self.attnpool = AttentionPool2d(config.image_size // 32, width * 32, config.heads, output_dim)

    @staticmethod
    def _make_layer(inplanes: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
        """One stage: a (possibly strided) first bottleneck, then `blocks - 1` more."""
        layers = [Bottleneck(inplanes, planes, stride)]
        layers += [Bottleneck(planes * Bottleneck.expansion, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Embed images x [B, 3, S, S] into [B, output_dim]."""
        x = F.relu(self.bn1(self.conv1(x)), inplace=True)  # [B, width/2, S/2, S/2]
        x = F.relu(self.bn2(self.conv2(x)), inplace=True)
        x = F.relu(self.bn3(self.conv3(x)), inplace=True)  # [B, width, S/2, S/2]
        x = self.avgpool(x)  # [B, width, S/4, S/4]
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))  # [B, 32*width, S/32, S/32]
        return self.attnpool(x)

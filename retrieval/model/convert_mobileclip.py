"""open_clip's MobileCLIP2 checkpoints (FastViT-MCi in its train-time form) -> our re-parameterised layout.

A published MobileCLIP2 checkpoint holds the branches FastViT trains with. Each re-parameterisable module is
found by the keys its branches leave (the `RULES` table) and fused into the one convolution our tower runs, with
the same algebra timm's `reparameterize_model` uses:

- a BatchNorm after a convolution folds into it: w * gamma / sigma, beta - mean * gamma / sigma;
- a BatchNorm on its own (an "identity" branch) is a convolution whose kernel is 1 at its centre tap;
- parallel branches add; a smaller kernel is zero-padded to the largest before adding;
- RepMixer's x + gamma * (mixer(x) - norm(x)) and the positional encoding's x + conv(x) become one kernel each,
  the residual as an identity kernel.

Every other key is copied under its own name; BatchNorm's `num_batches_tracked` (read only in training) is dropped.
A checkpoint already in the re-parameterised form passes through unchanged. The result is checked key by key
against the shapes of a `MobileCLIP` built on the meta device.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F

from retrieval.errors import CheckpointError
from retrieval.model.clip import Towers
from retrieval.model.config import CLIPConfig
from retrieval.model.fastvit import BN_EPS, MIXER_KERNEL
from retrieval.model.mobileclip import MobileCLIP

Tensors = dict[str, torch.Tensor]


def _fold_bn(kernel: torch.Tensor, bn: Tensors) -> tuple[torch.Tensor, torch.Tensor]:
    """A convolution kernel followed by BatchNorm (`weight`, `bias`, `running_mean`, `running_var`) as one conv."""
    scale = bn["weight"] / (bn["running_var"] + BN_EPS).sqrt()  # [out]
    return kernel * scale.reshape(-1, 1, 1, 1), bn["bias"] - bn["running_mean"] * scale


def _identity_kernel(channels: int, in_per_group: int, kernel: int, like: torch.Tensor) -> torch.Tensor:
    """The kernel [C, in/groups, k, k] of a convolution that returns its input: 1 at each channel's centre tap."""
    weight = torch.zeros(channels, in_per_group, kernel, kernel, dtype=like.dtype, device=like.device)
    index = torch.arange(channels, device=like.device)
    weight[index, index % in_per_group, kernel // 2, kernel // 2] = 1
    return weight


def _pad_to(kernel: torch.Tensor, size: int) -> torch.Tensor:
    """Zero-pad a square kernel [out, in, k, k] to size x size around its centre."""
    pad = (size - kernel.shape[-1]) // 2
    return F.pad(kernel, [pad] * 4)


def _sub(tensors: Tensors, prefix: str) -> Tensors:
    """The tensors under `prefix.` with the prefix removed."""
    return {k.removeprefix(prefix + "."): v for k, v in tensors.items() if k.startswith(prefix + ".")}


def _mobileone(m: Tensors, kernel: int | None = None, in_per_group: int | None = None) -> tuple[torch.Tensor, ...]:
    """Fuse a MobileOne block's branches (`conv_kxk.N`, `conv_scale`, `identity`) into (kernel, bias)."""
    branches = sorted({k.split(".")[1] for k in m if k.startswith("conv_kxk.")})
    convs = [_fold_bn(m[f"conv_kxk.{i}.conv.weight"], _sub(m, f"conv_kxk.{i}.bn")) for i in branches]
    if convs:
        kernel, in_per_group = convs[0][0].shape[-1], convs[0][0].shape[1]
    if "conv_scale.conv.weight" in m:
        weight, bias = _fold_bn(m["conv_scale.conv.weight"], _sub(m, "conv_scale.bn"))
        convs.append((_pad_to(weight, kernel), bias))
    if "identity.weight" in m:
        bn = _sub(m, "identity")
        convs.append(_fold_bn(_identity_kernel(bn["weight"].shape[0], in_per_group, kernel, bn["weight"]), bn))
    return sum(w for w, _ in convs), sum(b for _, b in convs)


def _large_kernel(m: Tensors) -> tuple[torch.Tensor, ...]:
    """Fuse a large-kernel conv (`large_conv`) and its small-kernel partner (`small_conv`) into (kernel, bias)."""
    weight, bias = _fold_bn(m["large_conv.conv.weight"], _sub(m, "large_conv.bn"))
    if "small_conv.conv.weight" in m:
        small, small_bias = _fold_bn(m["small_conv.conv.weight"], _sub(m, "small_conv.bn"))
        weight, bias = weight + _pad_to(small, weight.shape[-1]), bias + small_bias
    return weight, bias


def _repmixer(m: Tensors) -> tuple[torch.Tensor, ...]:
    """Fuse RepMixer's x + gamma * (mixer(x) - norm(x)) into one depthwise (kernel, bias)."""
    mixer, mixer_bias = _mobileone(_sub(m, "mixer"))
    norm, norm_bias = _mobileone(_sub(m, "norm"), kernel=MIXER_KERNEL, in_per_group=1)
    gamma = m.get("layer_scale.gamma", torch.ones(mixer.shape[0], 1, 1, dtype=mixer.dtype, device=mixer.device))
    residual = _identity_kernel(mixer.shape[0], 1, mixer.shape[-1], mixer)
    return residual + gamma.unsqueeze(-1) * (mixer - norm), gamma.reshape(-1) * (mixer_bias - norm_bias)


def _pos_enc(m: Tensors) -> tuple[torch.Tensor, ...]:
    """Fuse the conditional positional encoding's x + conv(x) into one depthwise (kernel, bias)."""
    weight = m["pos_enc.weight"]
    return _identity_kernel(weight.shape[0], 1, weight.shape[-1], weight) + weight, m["pos_enc.bias"]


# The conversion table: (what the module is, a pattern matching the keys of its train-time branches with the
# module's path as group 1 and the branch's own key as group 2, the fusion). A fused module becomes
# `<path>.reparam_conv.{weight,bias}`; the squeeze-excite of a MobileOne block or large-kernel conv (`se.*`)
# keeps its names. RepMixer comes first: its `mixer` and `norm` are MobileOne blocks fused with it.
_TRUNK = r"(visual\.trunk\..+?)\."
RULES: tuple[tuple[str, re.Pattern[str], Callable[[Tensors], tuple[torch.Tensor, ...]]], ...] = (
    ("RepMixer", re.compile(_TRUNK + r"((?:mixer|norm)\..+|layer_scale\.gamma)"), _repmixer),
    (
        "MobileOne block",
        re.compile(_TRUNK + r"((?:conv_kxk\.\d+|conv_scale)\.(?:conv|bn)\..+|identity\..+)"),
        _mobileone,
    ),
    ("large-kernel conv", re.compile(_TRUNK + r"((?:large_conv|small_conv)\.(?:conv|bn)\..+)"), _large_kernel),
    ("positional encoding", re.compile(_TRUNK + r"(pos_enc\.(?:weight|bias))"), _pos_enc),
)
_REPMIXER_PATH = re.compile(r".+\.token_mixer$")  # a RepMixer's path; an attention block's norm is a plain BatchNorm
_DROPPED = re.compile(r".+\.num_batches_tracked$")


def reparameterize_state_dict(state_dict: Mapping[str, torch.Tensor], config: CLIPConfig, towers: Towers) -> Tensors:
    """Turn a MobileCLIP2 state dict in open_clip's layout (either form) into our re-parameterised one.

    Works on any device, "meta" included (shapes only).

    Args:
        state_dict: open_clip key names (`visual.trunk.*`, `text.*`, `logit_scale`), float tensors.
        config: the architecture, e.g. from `CLIPConfig.from_state_dict`.
        towers: the towers the state dict holds (and the result is checked against).

    Raises:
        CheckpointError: naming keys that are missing, unexpected or of the wrong shape after conversion.
    """
    modules: dict[tuple[str, str], Tensors] = {}
    out: Tensors = {}
    for key, tensor in state_dict.items():
        if _DROPPED.fullmatch(key):
            continue
        for name, pattern, _ in RULES:
            match = pattern.fullmatch(key)
            if match and (name != "RepMixer" or _REPMIXER_PATH.fullmatch(match.group(1))):
                modules.setdefault((name, match.group(1)), {})[match.group(2)] = tensor
                break
        else:
            out[key] = tensor
    fusions = {name: fuse for name, _, fuse in RULES}
    problems = []
    for (name, path), branches in modules.items():
        try:
            weight, bias = fusions[name](branches)
        except KeyError as e:
            problems.append(f"{name} {path} lacks its branch {e}")
            continue
        out[f"{path}.reparam_conv.weight"], out[f"{path}.reparam_conv.bias"] = weight, bias

    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in MobileCLIP(config, towers=towers).state_dict().items()}
    problems += [
        f"{k}: shape {tuple(v.shape)}, expected {expected[k]}"
        for k, v in out.items()
        if k in expected and tuple(v.shape) != expected[k]
    ]
    unknown, missing = sorted(set(out) - set(expected)), sorted(set(expected) - set(out))
    if unknown:
        problems.append(f"unknown keys {unknown[:5]}")
    if missing:
        problems.append(f"missing {missing[:5]}")
    if problems:
        raise CheckpointError(f"cannot convert the MobileCLIP checkpoint: {'; '.join(problems)}")
    return {k: v.contiguous() for k, v in out.items()}

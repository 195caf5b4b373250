"""CLIP's training objective and optimisation recipe: symmetric contrastive loss, AdamW groups, warm-up + cosine."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

# CLIP clips the learned temperature so logits are scaled by at most 100 (keeps training stable).
MAX_LOGIT_SCALE = math.log(100.0)


def clip_loss(logits_per_image: torch.Tensor, logits_per_text: torch.Tensor) -> torch.Tensor:
    """CLIP's symmetric cross-entropy: image i's caption is text i, and text i's image is image i.

    Args:
        logits_per_image: [B, B] scaled image-text similarities.
        logits_per_text: [B, B], its transpose.

    Returns:
        The mean of the image->text and text->image cross-entropies (a float32 scalar).
    """
    labels = torch.arange(logits_per_image.shape[0], device=logits_per_image.device)
    return (F.cross_entropy(logits_per_image.float(), labels) + F.cross_entropy(logits_per_text.float(), labels)) / 2


def clamp_logit_scale(model: nn.Module) -> None:
    """Keep exp(logit_scale) within [1, 100], as CLIP does after every step."""
    with torch.no_grad():
        model.logit_scale.clamp_(0.0, MAX_LOGIT_SCALE)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups as CLIP's: no decay on gains, biases, embeddings and the logit scale.

    Weight matrices and convolution kernels (2+ dims, except embeddings) are decayed.
    """
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if param.ndim < 2 or "embedding" in name or name == "logit_scale":
            no_decay.append(param)
        else:
            decay.append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class WarmupCosine:
    """Learning-rate factor: linear warm-up over `warmup` steps, then cosine decay to 0 at `total` steps.

    A plain object (not a lambda) so `LambdaLR.state_dict()` saves it with the checkpoint.
    """

    def __init__(self, warmup: int, total: int) -> None:
        self.warmup = max(0, warmup)
        self.total = max(1, total)

    def __call__(self, step: int) -> float:
        """The factor for the update after `step` completed updates."""
        if step < self.warmup:
            return (step + 1) / self.warmup
        progress = (step - self.warmup) / max(1, self.total - self.warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def build_optimizer(
    model: nn.Module, lr: float, weight_decay: float, warmup: int, total_steps: int
) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW with CLIP's betas and eps and the warm-up + cosine schedule.

    Args:
        model: the CLIP being trained.
        lr: peak learning rate.
        weight_decay: decoupled weight decay of the weight matrices.
        warmup: linear warm-up steps.
        total_steps: steps of the whole run (the cosine reaches 0 there).
    """
    optimizer = torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=(0.9, 0.98), eps=1e-6)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupCosine(warmup, total_steps))
    return optimizer, scheduler

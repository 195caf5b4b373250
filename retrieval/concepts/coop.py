"""CoOp (Zhou et al. 2022, "Learning to Prompt for Vision-Language Models"): learnable context vectors in front of
class names, trained through the frozen text tower on image vectors, starting from and kept near the zero-shot
classifier.

Plain CoOp forgets what the prompt-ensembled zero-shot classifier knows when it learns from one or two images a
class: with shapes-mini it stayed 2-7 points below zero-shot on the 8 shape classes at every shot count. Given
the zero-shot class vectors (the `anchor`, the mean over prompt templates), two changes keep that knowledge:

- the class vector is `unit(anchor + prompt(context) - prompt(initial context))`: the prompts' change as the
  context learns is a residual on the zero-shot vector, so training starts exactly at the zero-shot classifier
  (a 4-word context cannot itself reproduce an ensemble of templates);
- KgCoOp's penalty (Yao et al. 2023, "Visual-Language Prompt Tuning with Knowledge-guided Context
  Optimization"): a weight x the mean squared distance of the class vectors to the anchor, the weight
  `ANCHOR_WEIGHT / shots` (`anchor_weight_for`). The cross-entropy is a mean over the examples while the anchor
  is a prior whose strength should not grow with them (a MAP estimate sums the likelihood against a fixed
  prior), so its weight on the mean falls as 1/shots: one or two images barely move a class, 16 can.

Chosen on design sets only (`benchmarks/few_shot.py`: generated sets of seeds 777, 778 and 779, draws 10-12, 50
test images a class), CoOp's top-1 on the 8 shape classes minus zero-shot's, in points, mean of the 9 runs at
1/2/4/8/16 shots: a fixed weight of 16 (the previous default) -0.08/-0.39/-0.17/-0.03/+0.22; fixed 64
-0.03/-0.08/0.00/+0.08/+0.28; `1024 / shots` +0.11/+0.14/+0.19/+0.06/+0.28 (1024/K: at or above on each seed
but 779 at 8 shots, -0.08); `512 / shots` fell below at 1 and 2 shots. Shrinking the learned residual by half
after training (CoOp's logits averaged with zero-shot's) helped shapes on 777 but not on 778 (-0.25 at 2 and 4
shots) and cut the corner marker's gain at 16 shots from +46 to +29 points (777); stopping after 25-100 steps was
no better than 200 on shapes. The cost: with one or two images the marker no caption names stays at zero-shot
(+0 and +0.7 points on 777, against +34 and +22 with the weight 16); from 4 shots it learns (+27, +39 and +45 at
4, 8 and 16).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from retrieval.concepts.probe import one_thread
from retrieval.errors import QueryError
from retrieval.query import IMAGENET_TEMPLATES
from retrieval.types import Embeddings

if TYPE_CHECKING:
    import torch

    from retrieval.model.clip import CLIP

CONTEXT_INIT = "a photo of a"  # CoOp's best initialisation, used when n_ctx equals its 4 tokens
DEFAULT_N_CTX = 4
DEFAULT_STEPS = 200
DEFAULT_LR = 0.01
ANCHOR_WEIGHT = 1024.0  # KgCoOp's weight on |learned - zero-shot|^2 at one shot a class, divided by the shots
ANCHOR_TEMPLATES = IMAGENET_TEMPLATES  # prompts averaged into a zero-shot anchor, as `query --ensemble` does


@dataclass(frozen=True)
class CoopFit:
    """Learned prompts: one unit text vector per class, and the context they were made with."""

    text: npt.NDArray[np.float32]  # [K, D] unit class vectors
    context: npt.NDArray[np.float32]  # [K or 1, n_ctx, width] the learned context vectors
    logit_scale: float

    def predict(self, features: Embeddings) -> npt.NDArray[np.int64]:
        """[N] class with the highest cosine."""
        return np.argmax(np.asarray(features) @ self.text.T, axis=1)


def _prompt_parts(model: CLIP, class_names: Sequence[str], n_ctx: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token embeddings of "X .. X {name}." per class ([K, L, width], the X rows to be replaced) and the
    end-of-text positions [K]."""
    import torch

    from retrieval.model.tokenizer import tokenize

    prompts = [" ".join(["X"] * n_ctx) + f" {name}." for name in class_names]
    tokens = torch.as_tensor(
        tokenize(prompts, context_length=model.config.text.context_length, truncate=True)
    )  # [K, 77]
    eot = tokens.argmax(dim=-1)  # [K]
    device = model.token_embedding.weight.device
    with torch.no_grad():
        embedded = model.token_embedding(tokens[:, : int(eot.max()) + 1].to(device)).float()  # [K, L, width]
    return embedded, eot.to(device)


def _initial_context(model: CLIP, n_ctx: int, rows: int, generator: torch.Generator) -> torch.Tensor:
    """[rows, n_ctx, width]: the embeddings of "a photo of a" when n_ctx is its token count, else N(0, 0.02)."""
    import torch

    from retrieval.model.tokenizer import tokenize

    width = model.config.text.width
    init = torch.as_tensor(tokenize(CONTEXT_INIT))[0]
    words = init[1 : int(init.argmax())]  # without start and end tokens
    if len(words) == n_ctx:
        with torch.no_grad():
            vectors = model.token_embedding(words.to(model.token_embedding.weight.device)).float().cpu()
        return vectors.expand(rows, n_ctx, width).clone()
    return torch.randn(rows, n_ctx, width, generator=generator, dtype=torch.float32) * 0.02


def prompt_vectors(model: CLIP, context: torch.Tensor, class_names: Sequence[str]) -> torch.Tensor:
    """[K, D] unit text vectors of the prompts "[context] {name}." (differentiable in `context`).

    Args:
        model: a CLIP with a text tower.
        context: [1 or K, n_ctx, width] context vectors (one shared, or one per class).
        class_names: the K class tokens.
    """
    import torch

    embedded, eot = _prompt_parts(model, class_names, context.shape[1])
    context = context.to(embedded.device).expand(len(class_names), -1, -1)  # [K, n_ctx, width]
    x = torch.cat([embedded[:, :1], context, embedded[:, 1 + context.shape[1] :]], dim=1)  # [K, L, width]
    return model.encode_token_embeddings(x.to(model.token_embedding.weight.dtype), eot)


def train_coop(
    model: CLIP,
    class_names: Sequence[str],
    features: Embeddings,
    labels: npt.ArrayLike,
    n_ctx: int = DEFAULT_N_CTX,
    class_specific: bool = False,
    steps: int = DEFAULT_STEPS,
    lr: float = DEFAULT_LR,
    seed: int = 0,
    anchor: Embeddings | None = None,
    anchor_weight: float | None = None,
) -> CoopFit:
    """Learn CoOp context vectors for the classes from image vectors, the model frozen.

    Every model weight stays as it was (bit for bit); gradients reach only the context. Full-batch Adam on
    the class-balanced cross-entropy of `logit_scale x cosine`. With an `anchor`, the class vectors are
    `unit(anchor + prompt(context) - prompt(initial context))` (the zero-shot classifier before any step) and
    the loss adds KgCoOp's `anchor_weight x mean over classes of |text - anchor|^2`.

    Args:
        model: a CLIP with a text tower (the image tower is not used: `features` are its output).
        class_names: the class tokens, one per class, in label order.
        features: [N, D] L2-normalised image vectors.
        labels: [N] class indices.
        n_ctx: context vectors per prompt.
        class_specific: one context per class (CoOp's CSC) rather than one shared by all.
        steps: optimisation steps.
        lr: Adam's learning rate.
        seed: for a random context initialisation (n_ctx other than 4).
        anchor: [K, D] unit zero-shot class vectors to start from and stay near (`zero_shot_anchor`); None:
            plain CoOp.
        anchor_weight: the weight of the distance to `anchor`; None: `anchor_weight_for` the shots (`ANCHOR_WEIGHT`
            over the mean number of examples a class).
    """
    import torch

    if n_ctx < 1:
        raise QueryError(f"n_ctx must be at least 1, got {n_ctx}")
    if anchor is not None and np.shape(anchor) != (len(class_names), model.config.embed_dim):
        raise QueryError(f"anchor must be [{len(class_names)}, {model.config.embed_dim}], got {np.shape(anchor)}")
    generator = torch.Generator().manual_seed(seed)
    device = model.token_embedding.weight.device
    context = _initial_context(model, n_ctx, len(class_names) if class_specific else 1, generator).to(device)
    context.requires_grad_(True)
    x = torch.as_tensor(np.asarray(features, dtype=np.float32), device=device)
    y = torch.as_tensor(np.asarray(labels, dtype=np.int64), device=device)
    known = None if anchor is None else torch.as_tensor(np.asarray(anchor, dtype=np.float32), device=device)
    counts = torch.bincount(y, minlength=len(class_names)).clamp(min=1).float()
    if anchor_weight is None:
        anchor_weight = anchor_weight_for(len(y) / len(class_names))
    class_weight = len(y) / (len(class_names) * counts)
    scale = float(model.logit_scale.detach().exp())
    was_training = model.training
    flags = [(p, p.requires_grad) for p in model.parameters()]
    model.eval()
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        with torch.no_grad():
            start = prompt_vectors(model, context, class_names)  # [K, D]

        def class_vectors() -> torch.Tensor:
            text = prompt_vectors(model, context, class_names)  # [K, D]
            if known is None:
                return text
            text = known + (text - start)
            return text / text.norm(dim=-1, keepdim=True)

        optimizer = torch.optim.Adam([context], lr=lr)
        with torch.enable_grad(), one_thread():
            for _ in range(steps):
                optimizer.zero_grad()
                text = class_vectors()
                loss = torch.nn.functional.cross_entropy(scale * x @ text.T, y, weight=class_weight)
                if known is not None:
                    loss = loss + anchor_weight * ((text - known) ** 2).sum(dim=1).mean()
                loss.backward()
                optimizer.step()
        with torch.no_grad():
            text = class_vectors()
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)
    return CoopFit(text.float().cpu().numpy(), context.detach().float().cpu().numpy(), scale)


def anchor_weight_for(shots: float) -> float:
    """The anchor penalty's weight with `shots` examples a class: `ANCHOR_WEIGHT / shots`.

    The cross-entropy is a mean over the examples while the pull to the zero-shot classifier is a prior whose
    strength should not grow with them (a MAP estimate: the summed likelihood against a fixed prior), so the
    prior's weight on the mean falls as 1/shots: one or two images barely move a class vector, sixteen can.
    """
    return ANCHOR_WEIGHT / max(shots, 1.0)


def zero_shot_anchor(
    model: CLIP, class_names: Sequence[str], templates: Sequence[str] = ANCHOR_TEMPLATES
) -> npt.NDArray[np.float32]:
    """[K, D] the prompt-ensembled zero-shot class vectors (`retrieval.zeroshot.build_classifier`): CoOp's anchor."""
    from retrieval.model.encode import encode_texts
    from retrieval.zeroshot import build_classifier

    return build_classifier(class_names, lambda texts: encode_texts(model, texts), templates).weights

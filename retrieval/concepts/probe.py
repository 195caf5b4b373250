"""The linear probe (Radford et al. 2021): L2-regularised logistic regression on L2-normalised image vectors, its
strength C chosen by stratified k-fold cross-validation when every class has at least `CV_MIN_PER_CLASS` examples."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from retrieval.types import Embeddings

logger = logging.getLogger(__name__)

C_GRID: tuple[float, ...] = (0.01, 0.1, 1.0, 10.0, 100.0, 1000.0)  # probe regularisation strengths tried
DEFAULT_C = 10.0  # used when there are too few examples to cross-validate
CV_MIN_PER_CLASS = 4
CV_FOLDS = 4


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run torch on one thread: these problems are small enough that on shared cores the intra-op threads'
    barriers cost more than they save (measured on 2 busy cores: a CoOp step of shapes-mini, 290 -> 20 ms)."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def fit_logistic(
    features: Embeddings, labels: npt.ArrayLike, c: float, n_classes: int | None = None
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
    """Multinomial logistic regression with an L2 penalty, classes weighted equally, by L-BFGS.

    Minimises `C x sum_i w_i CE(W x_i + b, y_i) + |W|^2 / 2` (scikit-learn's convention; the bias is not
    penalised), where w_i = N / (K x n_{y_i}) so a class with few examples counts as much as one with many.

    Args:
        features: [N, D] image vectors.
        labels: [N] class indices 0..K-1.
        c: inverse regularisation strength (larger: a closer fit).
        n_classes: K; default max(labels) + 1.

    Returns:
        (W [K, D], b [K]) float32.
    """
    import torch

    x = torch.as_tensor(np.asarray(features), dtype=torch.float64)
    y = torch.as_tensor(np.asarray(labels), dtype=torch.int64)
    k = int(n_classes if n_classes is not None else int(y.max()) + 1)
    counts = torch.bincount(y, minlength=k).clamp(min=1).double()
    sample_weight = (len(y) / (k * counts))[y]  # [N]
    weights = torch.zeros(k, x.shape[1], dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(k, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([weights, bias], lr=1, max_iter=200, tolerance_grad=1e-9,
                                  tolerance_change=1e-12, history_size=20, line_search_fn="strong_wolfe")  # fmt: skip

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        logits = x @ weights.T + bias  # [N, K]
        loss = c * (sample_weight * torch.nn.functional.cross_entropy(logits, y, reduction="none")).sum()
        loss = loss + 0.5 * (weights**2).sum()
        loss.backward()
        return loss

    with torch.enable_grad(), one_thread():
        optimizer.step(closure)
    return weights.detach().float().numpy(), bias.detach().float().numpy()


def balanced_accuracy(predicted: npt.ArrayLike, labels: npt.ArrayLike) -> float:
    """The mean over classes present in `labels` of the share of their examples predicted right."""
    predicted, labels = np.asarray(predicted), np.asarray(labels)
    return float(np.mean([np.mean(predicted[labels == c] == c) for c in np.unique(labels)]))


def _folds(labels: np.ndarray, n_folds: int, rng: np.random.Generator) -> np.ndarray:
    """[N] fold index of each example, each class spread evenly over the folds."""
    fold = np.empty(len(labels), dtype=np.int64)
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        fold[members] = np.arange(len(members)) % n_folds
    return fold


def choose_c(features: Embeddings, labels: npt.ArrayLike, seed: int = 0, grid: Sequence[float] = C_GRID) -> float:
    """The C of `grid` with the best stratified k-fold balanced accuracy (ties: the smaller C); `DEFAULT_C`
    when a class has fewer than `CV_MIN_PER_CLASS` examples."""
    labels = np.asarray(labels)
    smallest = int(np.bincount(labels).min())
    if smallest < CV_MIN_PER_CLASS:
        return DEFAULT_C
    folds = _folds(labels, min(CV_FOLDS, smallest), np.random.default_rng([seed, 1]))
    k = int(labels.max()) + 1
    scores = []
    for c in grid:
        predicted = np.empty_like(labels)
        for f in np.unique(folds):
            train, test = folds != f, folds == f
            w, b = fit_logistic(features[train], labels[train], c, k)
            predicted[test] = np.argmax(features[test] @ w.T + b, axis=1)
        scores.append(balanced_accuracy(predicted, labels))
    best = int(np.argmax(scores))  # the first maximum: the strongest regularisation among equals
    logger.info(
        "probe C by %d-fold CV: %s -> C=%g", int(folds.max()) + 1, dict(zip(grid, scores, strict=True)), grid[best]
    )
    return grid[best]


@dataclass(frozen=True)
class ProbeFit:
    """A fitted multi-class probe."""

    weights: npt.NDArray[np.float32]  # [K, D]
    bias: npt.NDArray[np.float32]  # [K]
    c: float

    def predict(self, features: Embeddings) -> npt.NDArray[np.int64]:
        """[N] most probable class."""
        return np.argmax(np.asarray(features) @ self.weights.T + self.bias, axis=1)


def train_probe(features: Embeddings, labels: npt.ArrayLike, seed: int = 0, c: float | None = None) -> ProbeFit:
    """A linear probe on image vectors, C chosen by cross-validation unless given.

    Args:
        features: [N, D] L2-normalised image vectors.
        labels: [N] class indices 0..K-1 (K >= 2, every class present).
        seed: for the cross-validation folds.
        c: a fixed C (skips the search).
    """
    features = np.asarray(features, dtype=np.float32)
    labels = np.asarray(labels, dtype=np.int64)
    c = choose_c(features, labels, seed) if c is None else c
    weights, bias = fit_logistic(features, labels, c)
    return ProbeFit(weights, bias, c)

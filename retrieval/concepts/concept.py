"""A learned concept as a record: its vector, how it was learned and from which examples, and its name rules."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from retrieval.errors import QueryError
from retrieval.model.identity import ModelInfo
from retrieval.types import Embeddings

Method = Literal["probe", "coop"]
METHODS: tuple[str, ...] = ("probe", "coop", "auto")
# A concept's name: usable after @ in a query and as the column `clipsearch tag --concept` writes.
NAME_PATTERN = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,63}")


@dataclass(frozen=True)
class Concept:
    """A learned concept: what scores an image vector, how it was learned, and from which examples."""

    name: str
    method: Method
    model: ModelInfo  # the embedding space its vector lives in
    vector: npt.NDArray[np.float32]  # w [D]: the probe's weights; CoOp's logit_scale x (prompt - background)
    bias: float  # b: the probe's bias; 0 for CoOp
    example_ids: tuple[int, ...]  # stored positives (unstored files are embedded, not recorded)
    negative_ids: tuple[int, ...]  # stored negatives, given or sampled
    seed: int
    accuracy: float | None  # held-out balanced accuracy, None when too few examples to hold any out
    params: dict[str, Any] = field(default_factory=dict)  # C, n_ctx, steps, lr, candidates' accuracies, ...
    created_at: datetime = field(default_factory=lambda: datetime.now(timezone.utc))

    @property
    def direction(self) -> npt.NDArray[np.float32]:
        """The unit vector a query adds for this concept: ranking by cosine with it ranks as `probability`."""
        return (self.vector / np.linalg.norm(self.vector)).astype(np.float32)

    def probability(self, vectors: Embeddings) -> npt.NDArray[np.float32]:
        """[N] probability that each image shows the concept, sigmoid(w . v + b), in one matrix product (for
        CoOp this is the two-way softmax over its prompt and the background's that it was trained with)."""
        vectors = np.asarray(vectors, dtype=np.float32).reshape(-1, len(self.vector))
        return sigmoid(vectors @ self.vector.astype(np.float64) + self.bias)

    def probability_from_cosine(self, cosine: npt.ArrayLike) -> npt.NDArray[np.float32]:
        """The probability from an image's cosine with `direction` (sigmoid(|w| cos + b))."""
        return sigmoid(float(np.linalg.norm(self.vector)) * np.asarray(cosine, dtype=np.float64) + self.bias)

    def cosine_for_probability(self, probability: float) -> float:
        """The cosine with `direction` at which the concept gives `probability` (for thresholds)."""
        p = min(max(probability, 1e-12), 1 - 1e-12)
        return (math.log(p / (1 - p)) - self.bias) / float(np.linalg.norm(self.vector))


def sigmoid(x: npt.ArrayLike) -> npt.NDArray[np.float32]:
    """The logistic function, without overflow warnings."""
    x = np.asarray(x, dtype=np.float64)
    return (0.5 * (1 + np.tanh(0.5 * x))).astype(np.float32)


def check_name(name: str) -> str:
    """The concept name, if it can follow @ in a query and name a column.

    Raises:
        QueryError: any other name.
    """
    if not NAME_PATTERN.fullmatch(name or ""):
        raise QueryError(
            f"concept name {name!r}: use a letter, then letters, digits or _ (at most 64), e.g. rex or grandmas_kitchen"
        )
    return name

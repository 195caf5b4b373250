"""Calibrated relevance: where a text query's matches end, and an honest "no good match".

A flat cosine cutoff fails twice: every model has its own scale (OpenAI's ViT-B/32 gives a good match ~0.3,
shapes-mini ~0.84), and within one model the level of a true match depends on the query. So `threshold="auto"`
computes a cutoff per query from three things the model and the store tell us:

1. The model's calibration, p(match | cosine s) = sigmoid(slope * s + bias): the logistic a model with a learned
   bias (SigLIP) carries itself, and that a CLIP model ships with here, fitted once on its own held-out
   captioned scenes (`CALIBRATIONS`; `fit_calibration` and `python -m benchmarks.relevance --calibrate`).
2. The query's best hit in the store: a query has a good match only if its best hit is a confident one
   (p >= `PRESENT_P`). Near misses (a red hexagon for "a red circle") score only a little lower than true
   matches, so "is anything here" needs a stricter bar than "is this one of the matches".
3. The model's learned temperature t (`logit_scale`): below the best hit, results stay while p >= `MATCH_P`
   and their softmax weight exp(t * s) is within a factor `SPREAD` of the best hit's, i.e.
   s >= best - ln(SPREAD) / t. That adapts to queries whose matches all score high (a tight cluster) as well
   as the model's sharpness.

Measured with shapes-mini (`benchmarks/relevance.py`, 64 "a {colour} {shape}" queries over 320-image galleries
with 16 absent combinations). Calibration fitted on seed 2; `PRESENT_P` and `SPREAD` chosen on design seeds 101
and 102: precision 0.966 / 0.959, recall 0.972 / 0.959, absent queries answered "no good match" 100 % / 94 %.
The best flat cutoff there, 0.80, gives 0.975 / 0.959, 0.972 / 0.950 and 94 % / 75 %: a near miss (a red hexagon
for "a red circle") scores only a little below a true match, and how little varies by query. Held out (seeds
201 / 202 / 203, run once with the constants fixed): precision 0.975 / 0.936 / 0.978, recall 0.972 / 0.966 /
0.978, "no good match" 94 % / 94 % / 88 % (flat 0.80: 88 % / 88 % / 69 %).

A model without a shipped calibration falls back to the query's own score distribution over the store (a
robust z-score: the cutoff is median + `FALLBACK_Z` * MAD, and the same spread rule). It is weaker and logged as
such: on the design seeds precision 0.95 / 0.94 and recall 0.87, but only 25 % / 12 % of absent queries get "no
good match" (the benchmark's `uncalibrated` row); a higher z says "no good match" more often (75 % at z = 3) at
the cost of half the recall, which a default must not pay.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from retrieval.query import SearchResult

logger = logging.getLogger(__name__)

PRESENT_P = 0.95  # the best hit must be at least this likely a match, else "no good match"
MATCH_P = 0.5  # every returned result at least this likely a match
SPREAD = 20.0  # and within this factor of the best hit's softmax weight under the model's temperature
FALLBACK_Z = 2.5  # without a calibration: robust z-score a result (and the best hit) must reach


@dataclass(frozen=True)
class Calibration:
    """A model's p(match | cosine) = sigmoid(slope * cosine + bias), for text queries against images."""

    slope: float
    bias: float
    source: str  # how it was fitted

    def probability(self, score: float) -> float:
        """p(match) at a cosine."""
        return 1.0 / (1.0 + math.exp(-(self.slope * score + self.bias)))

    def cosine_at(self, p: float) -> float:
        """The cosine at which p(match) = p."""
        return (math.log(p / (1.0 - p)) - self.bias) / self.slope


# Shipped calibrations, by the weights' sha256 (a renamed copy of the same weights keeps its calibration).
CALIBRATIONS: dict[str, Calibration] = {
    "580aaee913e4e8e7d1e05ee35696137df360c848100115c25b498b2352fdd41f": Calibration(
        slope=99.58,
        bias=-79.42,
        source="shapes-mini: logistic fit on the 48 present 'a {colour} {shape}' queries x 320 single-object "
        "scenes of seed 2 (its validation seed); `python -m benchmarks.relevance --calibrate`",
    ),
}


def calibration_for(weights_sha256: str) -> Calibration | None:
    """The shipped calibration of a model's weights, or None."""
    return CALIBRATIONS.get(weights_sha256)


def auto_cutoff(
    best: float,
    temperature: float,
    calibration: Calibration | None,
    store_scores: np.ndarray | None = None,
) -> float:
    """The cutoff of one text query (see the module docstring).

    Args:
        best: the query's best score in the (filtered) store.
        temperature: the model's learned logit scale, `logit_scale.exp()` (100 for OpenAI's CLIP).
        calibration: the model's calibration; None uses `store_scores`.
        store_scores: [N] the query's cosine with every stored image (needed only without a calibration).

    Returns:
        The lowest score that is a match; math.inf when the query has no good match.

    Raises:
        ValueError: neither a calibration nor the store's scores.
    """
    spread = math.log(SPREAD) / temperature
    if calibration is not None:
        present, floor = calibration.cosine_at(PRESENT_P), calibration.cosine_at(MATCH_P)
    elif store_scores is not None and len(store_scores):
        median = float(np.median(store_scores))
        mad = float(np.median(np.abs(store_scores - median))) or 1e-6
        present = floor = median + FALLBACK_Z * mad
    else:
        raise ValueError("auto_cutoff needs the model's calibration or the query's scores over the store")
    return max(floor, best - spread) if best >= present else math.inf


def apply_cutoff(results: Sequence[SearchResult], cutoff: float, show_weak: bool = False) -> list[SearchResult]:
    """The results at or above the cutoff; with `show_weak` all of them, those below marked `weak`."""
    kept = [r._replace(weak=r.score < cutoff) for r in results if show_weak or r.score >= cutoff]
    return [r._replace(rank=rank) for rank, r in enumerate(kept, start=1)]


def fit_calibration(scores: Sequence[float] | np.ndarray, matches: Sequence[bool] | np.ndarray) -> tuple[float, float]:
    """A logistic p(match | cosine) fitted by Newton's method on (score, is-a-match) pairs.

    Returns:
        (slope, bias).
    """
    x = np.asarray(scores, dtype=np.float64).ravel()
    y = np.asarray(matches, dtype=np.float64).ravel()
    design = np.stack([x, np.ones_like(x)], axis=1)  # [N, 2]
    weights = np.zeros(2)
    for _ in range(50):
        p = 1.0 / (1.0 + np.exp(-(design @ weights)))
        hessian = design.T @ (design * (p * (1 - p))[:, None]) + 1e-9 * np.eye(2)
        step = np.linalg.solve(hessian, design.T @ (y - p))
        weights += step
        if np.abs(step).max() < 1e-10:
            break
    return float(weights[0]), float(weights[1])


SORTS = ("score", "date")


def sort_by_date(results: Sequence[SearchResult]) -> list[SearchResult]:
    """The results by EXIF capture time, oldest first; those without one after them, by score; ranked anew."""
    dated = sorted((r for r in results if r.metadata.get("taken_at") is not None), key=lambda r: r.metadata["taken_at"])
    undated = [r for r in results if r.metadata.get("taken_at") is None]
    return [r._replace(rank=rank) for rank, r in enumerate([*dated, *undated], start=1)]

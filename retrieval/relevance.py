"""Calibrated relevance: where a text query's matches end, and an honest "no good match".

A flat cosine cutoff fails twice: every model has its own scale (OpenAI's ViT-B/32 gives a good match ~0.3,
shapes-mini ~0.84), and within one model the level of a true match depends on the query. So `threshold="auto"`
computes a cutoff per query from three things the model and the store tell us:

1. The model's calibration, p(match | cosine s) = sigmoid(slope * s + bias): the logistic a model with a learned
   bias (SigLIP) carries itself, and that a CLIP model ships with here, fitted once on its own held-out
   captioned scenes (`CALIBRATIONS`; `fit_calibration` and `python -m benchmarks.relevance --calibrate`).
2. The query's best hits in the store: a query has a good match only if the probability that at least one of
   its `PRESENT_HITS` best hits is a match, 1 - prod(1 - p_i), reaches `PRESENT_P`. Near misses (a white star for
   "a white triangle") score only a little lower than true matches, so "is anything here" needs stronger
   evidence than "is this one of the matches": one hit that is merely likely a match is not enough, one that is
   all but certain is, and so are several likely ones (a query's true matches rarely come alone, and a near miss
   that outscores them all rarely has company at that level).
3. The model's learned temperature t (`logit_scale`): below the best hit, results stay while p >= `MATCH_P`
   and their softmax weight exp(t * s) is within a factor `SPREAD` of the best hit's, i.e.
   s >= best - ln(SPREAD) / t. That adapts to queries whose matches all score high (a tight cluster) as well
   as the model's sharpness.

Measured with shapes-mini (`benchmarks/relevance.py`, 64 "a {colour} {shape}" queries over 320-image galleries
with 16 absent combinations). Calibration fitted on seed 2 (its validation seed); `MATCH_P` and `SPREAD` chosen on
design seeds 101 and 102; `PRESENT_HITS` and `PRESENT_P` on seeds 2, 101 and 102: with 3, 5 or 10 hits, every
`PRESENT_P` from 0.995 to 0.999 keeps every present query and answers "no good match" for 100 % / 100 % / 94 % of
the absent ones (the best hit alone at p >= 0.95, as before: 94 % / 100 % / 94 %); 0.998 is the middle of that
span. The remaining miss ("a white triangle", seed 102) has six white stars at 0.78-0.84: no score-based rule
tells them from matches for this model. Held-out figures per seed: README, "Calibrated relevance".

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

PRESENT_P = 0.998  # the best hits must hold a match at least this likely, else "no good match"
PRESENT_HITS = 5  # how many of the best hits count toward that
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


def presence(top: Sequence[float] | np.ndarray, calibration: Calibration) -> float:
    """The probability that at least one of a query's best hits is a match, 1 - prod(1 - p_i), over the
    `PRESENT_HITS` highest of `top` (the hits' cosines)."""
    scores = np.sort(np.asarray(top, np.float64).ravel())[::-1][:PRESENT_HITS]
    p = 1.0 / (1.0 + np.exp(-(calibration.slope * scores + calibration.bias)))
    return float(1.0 - np.prod(1.0 - p))


def auto_cutoff(
    top: float | Sequence[float] | np.ndarray,
    temperature: float,
    calibration: Calibration | None,
    store_scores: np.ndarray | None = None,
) -> float:
    """The cutoff of one text query (see the module docstring).

    Args:
        top: the query's best scores in the (filtered) store, at least its `PRESENT_HITS` best when it has that
            many (more are ignored); a single float is its best score alone.
        temperature: the model's learned logit scale, `logit_scale.exp()` (100 for OpenAI's CLIP).
        calibration: the model's calibration; None uses `store_scores`.
        store_scores: [N] the query's cosine with every stored image (needed only without a calibration).

    Returns:
        The lowest score that is a match; math.inf when the query has no good match.

    Raises:
        ValueError: neither a calibration nor the store's scores.
    """
    scores = np.atleast_1d(np.asarray(top, np.float64))
    best = float(scores.max())
    spread = math.log(SPREAD) / temperature
    if calibration is not None:
        present, floor = presence(scores, calibration) >= PRESENT_P, calibration.cosine_at(MATCH_P)
    elif store_scores is not None and len(store_scores):
        median = float(np.median(store_scores))
        mad = float(np.median(np.abs(store_scores - median))) or 1e-6
        floor = median + FALLBACK_Z * mad
        present = best >= floor
    else:
        raise ValueError("auto_cutoff needs the model's calibration or the query's scores over the store")
    return max(floor, best - spread) if present else math.inf


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

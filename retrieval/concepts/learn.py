"""Learning one concept from positive and negative image vectors: the held-out split, `auto`'s choice, sampled
negatives."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from retrieval.concepts.concept import METHODS, Concept, check_name
from retrieval.concepts.coop import CONTEXT_INIT, DEFAULT_LR, DEFAULT_N_CTX, DEFAULT_STEPS, train_coop
from retrieval.concepts.probe import balanced_accuracy, train_probe
from retrieval.errors import QueryError
from retrieval.model.identity import ModelInfo
from retrieval.types import Embeddings

if TYPE_CHECKING:
    from retrieval.model.clip import CLIP

HOLDOUT_SHARE = 0.25
NEGATIVES_PER_POSITIVE = 4
MIN_SAMPLED_NEGATIVES = 32
BACKGROUND_TOKEN = "thing"  # the class token of the background prompt of a single concept


def holdout_split(labels: npt.ArrayLike, seed: int) -> np.ndarray | None:
    """[N] bool, True for the held-out examples: `HOLDOUT_SHARE` of each class, at least one; None when a
    class has fewer than two examples."""
    labels = np.asarray(labels)
    if np.bincount(labels).min() < 2:
        return None
    rng = np.random.default_rng([seed, 2])
    held = np.zeros(len(labels), dtype=bool)
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        held[members[: max(1, int(len(members) * HOLDOUT_SHARE))]] = True
    return held


Fitter = Callable[[Embeddings, np.ndarray], tuple[Callable[[Embeddings], np.ndarray], Any]]


def held_out_accuracies(
    features: Embeddings, labels: npt.ArrayLike, fitters: Mapping[str, Fitter], seed: int
) -> dict[str, float | None]:
    """Each method's balanced accuracy on the `holdout_split` of the examples, fitted on the rest (None for all
    when a class has fewer than two examples).

    Args:
        features: [N, D] image vectors.
        labels: [N] class indices.
        fitters: method name -> fit(features, labels) returning (predict, anything).
        seed: seeds the split.
    """
    labels = np.asarray(labels)
    held = holdout_split(labels, seed)
    if held is None:
        return dict.fromkeys(fitters)
    accuracies: dict[str, float | None] = {}
    for kind, fit in fitters.items():
        predict, _ = fit(features[~held], labels[~held])
        accuracies[kind] = balanced_accuracy(predict(features[held]), labels[held])
    return accuracies


def pick_method(accuracies: Mapping[str, float | None]) -> str:
    """`auto`'s choice from the held-out accuracies of "probe" and "coop": CoOp unless the probe did better (CoOp
    on a tie and when nothing could be held out, as CoOp beats a probe with one or two shots)."""
    probe, coop = accuracies["probe"], accuracies["coop"]
    return "probe" if probe is not None and coop is not None and probe > coop else "coop"


def learn_concept(
    name: str,
    positives: Embeddings,
    negatives: Embeddings,
    model_info: ModelInfo,
    method: str = "auto",
    *,
    text_model: CLIP | Callable[[], CLIP] | None = None,
    example_ids: Sequence[int] = (),
    negative_ids: Sequence[int] = (),
    seed: int = 0,
    n_ctx: int = DEFAULT_N_CTX,
    steps: int = DEFAULT_STEPS,
    lr: float = DEFAULT_LR,
    extra: dict[str, Any] | None = None,
) -> Concept:
    """Learn one concept from positive and negative image vectors.

    Args:
        name: the concept's name (`check_name`); CoOp's class token.
        positives: [P, D] L2-normalised vectors of images showing the concept.
        negatives: [M, D] vectors of images that do not.
        model_info: the model the vectors come from.
        method: "probe", "coop" or "auto" (the better held-out accuracy).
        text_model: the model with its text tower (or a callable loading it), needed for CoOp.
        example_ids: the stored ids among the positives, recorded with the concept.
        negative_ids: the stored ids of the negatives.
        seed: seeds the split, the folds and CoOp.
        n_ctx: CoOp context vectors.
        steps: CoOp optimisation steps.
        lr: CoOp learning rate.
        extra: more parameters to record (e.g. how negatives were chosen).

    Returns:
        The concept, with its held-out accuracy and, for auto, both candidates' in `params["candidates"]`.

    Raises:
        QueryError: a bad name or method, or no positive or negative example.
    """
    check_name(name)
    if method not in METHODS:
        raise QueryError(f"unknown method {method!r}; use one of {', '.join(METHODS)}")
    positives = np.asarray(positives, dtype=np.float32).reshape(-1, model_info.embed_dim)
    negatives = np.asarray(negatives, dtype=np.float32).reshape(-1, model_info.embed_dim)
    if not len(positives):
        raise QueryError(f"concept {name!r}: no positive example; give --positive with an image or a folder of images")
    if not len(negatives):
        raise QueryError(f"concept {name!r}: no negative example; give --negative, or index more images to sample from")
    features = np.concatenate([negatives, positives])
    labels = np.concatenate([np.zeros(len(negatives), np.int64), np.ones(len(positives), np.int64)])
    wanted = ("probe", "coop") if method == "auto" else (method,)
    loaded: list[CLIP] = []

    def model() -> CLIP:
        if not loaded:
            if text_model is None:
                raise QueryError("CoOp needs the model's text tower; pass text_model")
            loaded.append(text_model() if callable(text_model) and not hasattr(text_model, "config") else text_model)
        return loaded[0]

    def fit(kind: str, x: Embeddings, y: np.ndarray) -> tuple[Callable[[Embeddings], np.ndarray], dict[str, Any]]:
        if kind == "probe":
            probe = train_probe(x, y, seed)
            return probe.predict, {"C": probe.c, "weights": probe.weights, "bias": probe.bias}
        coop = train_coop(model(), [BACKGROUND_TOKEN, name], x, y, n_ctx, True, steps, lr, seed)
        return coop.predict, {"text": coop.text, "logit_scale": coop.logit_scale}

    accuracies = held_out_accuracies(features, labels, {kind: partial(fit, kind) for kind in wanted}, seed)
    chosen = pick_method(accuracies) if method == "auto" else method
    _, fitted = fit(chosen, features, labels)
    params: dict[str, Any] = {"positives": len(positives), "negatives": len(negatives), **(extra or {})}
    if chosen == "probe":
        w, b = fitted["weights"], fitted["bias"]
        vector, bias = (w[1] - w[0]).astype(np.float32), float(b[1] - b[0])
        params["C"] = fitted["C"]
    else:
        background, prompt = fitted["text"]
        vector, bias = (fitted["logit_scale"] * (prompt - background)).astype(np.float32), 0.0
        params.update(n_ctx=n_ctx, steps=steps, lr=lr, class_token=name, background_token=BACKGROUND_TOKEN,
                      context_init=CONTEXT_INIT if n_ctx == len(CONTEXT_INIT.split()) else "random",
                      prompt=prompt.tolist(), background=background.tolist(),
                      logit_scale=fitted["logit_scale"])  # fmt: skip
    if method == "auto":
        params["candidates"] = accuracies
    return Concept(
        name=name,
        method=chosen,  # type: ignore[arg-type]
        model=model_info,
        vector=vector,
        bias=bias,
        example_ids=tuple(int(i) for i in example_ids),
        negative_ids=tuple(int(i) for i in negative_ids),
        seed=seed,
        accuracy=accuracies[chosen],
        params=params,
    )


def sample_negatives(ids: npt.ArrayLike, exclude: Sequence[int], n: int, seed: int) -> npt.NDArray[np.int64]:
    """`n` ids drawn at random (seeded) from `ids` without `exclude` (fewer when fewer remain), ascending."""
    pool = np.setdiff1d(np.asarray(ids, dtype=np.int64), np.asarray(exclude, dtype=np.int64))
    rng = np.random.default_rng([seed, 3])
    return np.sort(rng.choice(pool, size=min(n, len(pool)), replace=False)) if len(pool) else pool


def negatives_wanted(positives: int) -> int:
    """How many negatives to sample for a number of positives."""
    return max(NEGATIVES_PER_POSITIVE * positives, MIN_SAMPLED_NEGATIVES)

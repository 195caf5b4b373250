"""Personal concepts ("our dog Rex") learned from a few example images, over the vectors the store holds.

Two few-shot methods from the CLIP literature, both on frozen features, so learning takes seconds and no
stored image is encoded again:

- **linear probe** (Radford et al. 2021): L2-regularised logistic regression on the L2-normalised image
  vectors. The regularisation strength C is chosen by stratified k-fold cross-validation when every class
  has at least `CV_MIN_PER_CLASS` examples, else `DEFAULT_C` is used. A probe concept scores an image with
  `sigmoid(w . v + b)`, the probability that it shows the concept.
- **CoOp** (Zhou et al. 2022, "Learning to Prompt for Vision-Language Models"): `n_ctx` learnable context
  vectors stand where the first words of a prompt would be, in front of the class name ("[V1]..[V4] rex.",
  class token at the end), initialised from the embeddings of "a photo of a" (the paper's best variant).
  The text tower runs on those embeddings with every weight frozen; only the context is trained, with
  cross-entropy over the classes' `logit_scale x cosine`. The result is a text-side unit vector, stored with
  the concept, which a query combines like the vector of a text.

One concept from positives against negatives ("rex" against everything else) is a two-class problem. Its
background class is a second learned prompt, with its own context and the class token "thing" (CoOp's
class-specific context). Both prompts are trained; the two-way softmax over them is
`sigmoid(logit_scale x (prompt - background) . v)`, so the concept keeps `w = logit_scale x (prompt -
background)`, a difference of two text-side vectors, as its vector: a search ranking by its direction ranks by
the probability the concept was trained to give (ranking by the prompt's vector alone does not: it was
only ever compared with the background's). Both prompts' unit vectors are kept in its parameters.

Without given negatives, `NEGATIVES_PER_POSITIVE` times as many negatives (at least
`MIN_SAMPLED_NEGATIVES`) are drawn from the store at random with the concept's seed, never among the
positives.

Held-out accuracy: a seeded stratified split keeps `HOLDOUT_SHARE` of each class (at least one example)
out of training; a model fitted on the rest is scored on it (balanced accuracy: the mean of the classes'
recalls, since sampled negatives outnumber positives). The concept itself is then fitted on every example.
`auto` fits both methods and keeps the one with the better held-out accuracy (CoOp when no class has two
examples to split, as CoOp does better than a probe at one shot in the paper).

Concepts live in the store directory, in a LanceDB table of their own beside the model's image table
(`ConceptBook`), with the model identity recorded in each row: a concept is never applied to another
model's vectors.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import numpy.typing as npt

from retrieval.errors import ModelMismatchError, QueryError, StoreError
from retrieval.model.identity import ModelInfo
from retrieval.query import Term
from retrieval.types import Embeddings

if TYPE_CHECKING:
    import torch

    from retrieval.model.clip import CLIP
    from retrieval.store import Store

logger = logging.getLogger(__name__)

Method = Literal["probe", "coop"]
METHODS: tuple[str, ...] = ("probe", "coop", "auto")
# A concept's name: usable after @ in a query and as the column `clipsearch tag --concept` writes.
NAME_PATTERN = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,63}")

C_GRID: tuple[float, ...] = (0.01, 0.1, 1.0, 10.0, 100.0, 1000.0)  # probe regularisation strengths tried
DEFAULT_C = 10.0  # used when there are too few examples to cross-validate
CV_MIN_PER_CLASS = 4
CV_FOLDS = 4
HOLDOUT_SHARE = 0.25
NEGATIVES_PER_POSITIVE = 4
MIN_SAMPLED_NEGATIVES = 32

CONTEXT_INIT = "a photo of a"  # CoOp's best initialisation, used when n_ctx equals its 4 tokens
BACKGROUND_TOKEN = "thing"  # the class token of the background prompt of a single concept
DEFAULT_N_CTX = 4
DEFAULT_STEPS = 200
DEFAULT_LR = 0.01


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
        return _sigmoid(vectors @ self.vector.astype(np.float64) + self.bias)

    def probability_from_cosine(self, cosine: npt.ArrayLike) -> npt.NDArray[np.float32]:
        """The probability from an image's cosine with `direction` (sigmoid(|w| cos + b))."""
        return _sigmoid(float(np.linalg.norm(self.vector)) * np.asarray(cosine, dtype=np.float64) + self.bias)

    def cosine_for_probability(self, probability: float) -> float:
        """The cosine with `direction` at which the concept gives `probability` (for thresholds)."""
        p = min(max(probability, 1e-12), 1 - 1e-12)
        return (math.log(p / (1 - p)) - self.bias) / float(np.linalg.norm(self.vector))


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """Run torch on one thread: these problems are small enough that on shared cores the intra-op threads'
    barriers cost more than they save (measured on 2 busy cores: a CoOp step of shapes-mini, 290 -> 20 ms)."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _sigmoid(x: npt.ArrayLike) -> npt.NDArray[np.float32]:
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


# ---- the linear probe ---------------------------------------------------------------------------


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

    with torch.enable_grad(), _one_thread():
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


# ---- CoOp ---------------------------------------------------------------------------------------


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
    context_length = model.config.text.context_length
    tokens = torch.from_numpy(tokenize(prompts, context_length=context_length, truncate=True))  # [K, 77]
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
    init = torch.from_numpy(tokenize(CONTEXT_INIT)[0])
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
) -> CoopFit:
    """Learn CoOp context vectors for the classes from image vectors, the model frozen.

    Every model weight stays as it was (bit for bit); gradients reach only the context. Full-batch Adam on
    the class-balanced cross-entropy of `logit_scale x cosine`.

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
    """
    import torch

    if n_ctx < 1:
        raise QueryError(f"n_ctx must be at least 1, got {n_ctx}")
    generator = torch.Generator().manual_seed(seed)
    device = model.token_embedding.weight.device
    context = _initial_context(model, n_ctx, len(class_names) if class_specific else 1, generator).to(device)
    context.requires_grad_(True)
    x = torch.as_tensor(np.asarray(features, dtype=np.float32), device=device)
    y = torch.as_tensor(np.asarray(labels, dtype=np.int64), device=device)
    counts = torch.bincount(y, minlength=len(class_names)).clamp(min=1).float()
    class_weight = len(y) / (len(class_names) * counts)
    scale = float(model.logit_scale.detach().exp())
    was_training = model.training
    flags = [(p, p.requires_grad) for p in model.parameters()]
    model.eval()
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        optimizer = torch.optim.Adam([context], lr=lr)
        with torch.enable_grad(), _one_thread():
            for _ in range(steps):
                optimizer.zero_grad()
                text = prompt_vectors(model, context, class_names)  # [K, D]
                loss = torch.nn.functional.cross_entropy(scale * x @ text.T, y, weight=class_weight)
                loss.backward()
                optimizer.step()
        with torch.no_grad():
            text = prompt_vectors(model, context, class_names)
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)
    return CoopFit(text.float().cpu().numpy(), context.detach().float().cpu().numpy(), scale)


# ---- one concept ----------------------------------------------------------------------------------


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

    held = holdout_split(labels, seed)
    accuracies: dict[str, float | None] = {}
    for kind in wanted:
        if held is None:
            accuracies[kind] = None
            continue
        predict, _ = fit(kind, features[~held], labels[~held])
        accuracies[kind] = balanced_accuracy(predict(features[held]), labels[held])
    chosen = wanted[0]
    if method == "auto":
        probe_acc, coop_acc = accuracies["probe"], accuracies["coop"]
        chosen = "coop" if probe_acc is None or (coop_acc is not None and coop_acc >= probe_acc) else "probe"
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


# ---- queries ------------------------------------------------------------------------------------


def resolve_terms(terms: Sequence[Term], book: ConceptBook) -> tuple[list[Term], Concept | None]:
    """Replace `@name` terms by their concepts' vectors.

    A concept contributes its unit direction, which combines like the vector of a text (for CoOp it is made
    of text vectors; for a probe, ranking by cosine with it is ranking by its probability). A query that is a
    probe concept alone is returned as that concept too, so a search can show the probability as the score.

    Returns:
        (terms with only text, image and vector kinds; the probe concept of a lone-probe query, or None).

    Raises:
        QueryError: an unknown concept name (the message lists the known ones).
        ModelMismatchError: a concept learned with another model.
    """
    out, concepts = [], []
    for term in terms:
        if term.kind != "concept":
            out.append(term)
            continue
        concept = book.get(term.value)
        concepts.append((term, concept))
        out.append(Term(term.weight, "vector", concept.direction))
    alone = len(terms) == 1 and concepts and concepts[0][1].method == "probe" and concepts[0][0].weight > 0
    return out, concepts[0][1] if alone else None


# ---- storage --------------------------------------------------------------------------------------

_PREFIX = "concepts_"


def _schema() -> Any:
    """The Arrow schema of a concept table."""
    import pyarrow as pa

    return pa.schema(
        [
            pa.field("name", pa.string(), nullable=False),
            pa.field("method", pa.string(), nullable=False),
            pa.field("model", pa.string(), nullable=False),  # ModelInfo.to_dict() as JSON
            pa.field("vector", pa.list_(pa.float32()), nullable=False),
            pa.field("bias", pa.float64(), nullable=False),
            pa.field("example_ids", pa.list_(pa.int64()), nullable=False),
            pa.field("negative_ids", pa.list_(pa.int64()), nullable=False),
            pa.field("seed", pa.int64(), nullable=False),
            pa.field("accuracy", pa.float64()),
            pa.field("params", pa.string(), nullable=False),  # JSON
            pa.field("created_at", pa.timestamp("us", tz="UTC"), nullable=False),
        ]
    )


def _json_default(value: Any) -> Any:
    """numpy values as JSON."""
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"not JSON-able: {type(value).__name__}")


class ConceptBook:
    """The concepts learned over one model's image table, in the LanceDB table `concepts_<model table>` of the
    same store directory, one row per name.

    Args:
        store: the open image store whose model the concepts belong to.
    """

    def __init__(self, store: Store) -> None:
        self.store = store
        self.table_name = _PREFIX + store.table_name
        self._table: Any = None

    def _open(self, create: bool = False) -> Any:
        """The concept table, or None when there is none yet (and not `create`)."""
        if self._table is None:
            from retrieval.store import _connect, _table_names

            db = _connect(self.store.path)
            if self.table_name in _table_names(db):
                self._table = db.open_table(self.table_name)
            elif create:
                try:
                    self._table = db.create_table(self.table_name, schema=_schema())
                except (ValueError, OSError):  # created meanwhile by another process
                    self._table = db.open_table(self.table_name)
        return self._table

    def concepts(self) -> list[Concept]:
        """Every concept of this model, by name."""
        table = self._open()
        if table is None:
            return []
        rows = table.search().limit(None).to_arrow().to_pylist()
        return sorted((self._concept(row) for row in rows), key=lambda c: c.name)

    def names(self) -> list[str]:
        """The names of this model's concepts."""
        return [c.name for c in self.concepts()]

    def get(self, name: str) -> Concept:
        """The concept called `name`.

        Raises:
            QueryError: no such concept for this model (the message lists the known ones, and names the models
                of other tables that have one by that name).
            ModelMismatchError: the stored concept was learned with another model's vectors.
        """
        table = self._open()
        rows = [] if table is None else table.search().where(f"name = '{name}'").limit(None).to_arrow().to_pylist()
        if not rows or not NAME_PATTERN.fullmatch(name):
            known = ", ".join(f"@{n}" for n in self.names()) or "none yet"
            elsewhere = self._elsewhere(name)
            hint = f"; @{name} was learned with model {elsewhere}, pass --model {elsewhere}" if elsewhere else ""
            raise QueryError(
                f"unknown concept @{name} for model {self.store.model_info.name!r} (known: {known}){hint}; "
                f"learn it with `clipsearch learn {name} --positive PATH`"
            )
        return self._concept(rows[0])

    def save(self, concept: Concept) -> None:
        """Store a concept, replacing one of the same name (one commit).

        Raises:
            ModelMismatchError: the concept was learned with another model's vectors.
        """
        import pyarrow as pa

        check_name(concept.name)
        self._check_model(concept)
        row = {
            "name": concept.name,
            "method": concept.method,
            "model": json.dumps(concept.model.to_dict()),
            "vector": np.asarray(concept.vector, dtype=np.float32).tolist(),
            "bias": float(concept.bias),
            "example_ids": list(concept.example_ids),
            "negative_ids": list(concept.negative_ids),
            "seed": int(concept.seed),
            "accuracy": concept.accuracy,
            "params": json.dumps(concept.params, default=_json_default),
            "created_at": concept.created_at,
        }
        data = pa.Table.from_pylist([row], schema=_schema())
        self._open(create=True).merge_insert("name").when_matched_update_all().when_not_matched_insert_all().execute(
            data
        )
        logger.info("saved concept %s (%s) in %s", concept.name, concept.method, self.table_name)

    def remove(self, name: str) -> None:
        """Delete a concept.

        Raises:
            QueryError: no such concept.
        """
        self.get(name)
        self._open().delete(f"name = '{name}'")

    def _check_model(self, concept: Concept) -> None:
        """Refuse a concept whose vectors are another model's."""
        from retrieval.store import _same_space

        mine = self.store.model_info
        if not _same_space(concept.model, mine):
            raise ModelMismatchError(
                f"concept @{concept.name} was learned with model {concept.model.name!r} (weights "
                f"{concept.model.weights_sha256[:12]}), not {mine.name!r} (weights {mine.weights_sha256[:12]}); "
                f"use --model {concept.model.name!r}, or learn it again with this model"
            )

    def _concept(self, row: dict[str, Any]) -> Concept:
        """A row as a checked `Concept`."""
        try:
            concept = Concept(
                name=row["name"],
                method=row["method"],
                model=ModelInfo.from_dict(json.loads(row["model"])),
                vector=np.asarray(row["vector"], dtype=np.float32),
                bias=float(row["bias"]),
                example_ids=tuple(row["example_ids"]),
                negative_ids=tuple(row["negative_ids"]),
                seed=int(row["seed"]),
                accuracy=row["accuracy"],
                params=json.loads(row["params"]),
                created_at=row["created_at"],
            )
        except (KeyError, ValueError, TypeError) as e:
            raise StoreError(
                f"concept {row.get('name')!r} in {self.table_name} is unreadable ({e!r}); remove it with "
                f"`clipsearch concepts rm {row.get('name')}` and learn it again"
            ) from e
        self._check_model(concept)
        return concept

    def _elsewhere(self, name: str) -> str | None:
        """The model name of another table of this store directory that has a concept `name`."""
        if not NAME_PATTERN.fullmatch(name):
            return None
        from retrieval.store import _connect, _table_names

        db = _connect(self.store.path)
        for table_name in _table_names(db):
            if table_name.startswith(_PREFIX) and table_name != self.table_name:
                rows = db.open_table(table_name).search().where(f"name = '{name}'").limit(1).to_arrow().to_pylist()
                if rows:
                    return ModelInfo.from_dict(json.loads(rows[0]["model"])).name
        return None


def tag_concept(store: Store, concept: Concept, column: str | None = None) -> tuple[int, int]:
    """Write "yes" or "no" for every stored image into a text column: whether the concept's probability is at
    least 0.5 (from the stored vectors; no image is read). Filter with `--where "rex = 'yes'"`.

    Args:
        store: the open store of the concept's model (the caller holds the indexer's write lock).
        concept: the concept.
        column: the column to write; default the concept's name.

    Returns:
        (images tagged, of which "yes").

    Raises:
        QueryError: a bad column name, or one of the store's own columns.
        StoreError: the column exists with another type.
    """
    ids, vectors = store.all_vectors()
    shown = concept.probability(vectors) >= 0.5 if len(ids) else np.zeros(0, dtype=bool)
    store.set_column(column or concept.name, ids, ["yes" if s else "no" for s in shown])
    return len(ids), int(shown.sum())

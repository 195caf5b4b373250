"""Zero-shot classification as in the CLIP paper: class names become a linear classifier over image embeddings.

Each class name is placed in every prompt template ("a photo of a {}." -> "a photo of a dog."); the
normalised text embeddings of a class are averaged and renormalised (prompt ensembling), giving one unit
vector per class. An image's logits are 100 x its cosine similarity to each class vector, and the softmax of
those is the probability of each label. SigLIP models were trained to score each image-text pair on its own:
their logits are the learned scale x cosine + the learned bias, and each label's probability is the sigmoid of
its logit, independent of the other labels (so they need not sum to 1, and may all be small).

`tag_store` applies a classifier to the vectors already in a store (no image is decoded again) and writes
each image's top labels into a string column, e.g. `labels = "red,circle"`, that query filters can use:
`clipsearch query "a shape" --where "labels LIKE '%red%'"`.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import numpy.typing as npt
from tqdm import tqdm

from retrieval.errors import QueryError
from retrieval.metrics import recall_at_k
from retrieval.query import IMAGENET_TEMPLATES, ensemble_prompts
from retrieval.types import Embeddings

if TYPE_CHECKING:
    from retrieval.store import Store

logger = logging.getLogger(__name__)

# CLIP's trained temperature saturates at 100; the paper's zero-shot classifier scales cosines by it.
LOGIT_SCALE = 100.0
DEFAULT_TEMPLATES: tuple[str, ...] = IMAGENET_TEMPLATES
LABEL_COLUMN = "labels"
_CHUNK = 65_536  # images scored at once when tagging a store, bounding the [N, C] probability matrix


class Prediction(NamedTuple):
    """One label of an image with its probability."""

    label: str
    probability: float


@dataclass(frozen=True)
class ZeroShotClassifier:
    """A set of labels embedded as unit class vectors."""

    labels: tuple[str, ...]  # class names, in class-index order
    weights: Embeddings  # [C, D] one L2-normalised row per label
    templates: tuple[str, ...]  # the prompt templates the rows were averaged over
    logit_scale: float = LOGIT_SCALE  # cosines are multiplied by this
    logit_bias: float | None = None  # SigLIP's learned bias; when set, each label gets an independent sigmoid

    @property
    def scoring(self) -> str:
        """How probabilities are scored: "softmax" over the labels (summing to 1) or an independent "sigmoid" each."""
        return "softmax" if self.logit_bias is None else "sigmoid"

    def logits(self, images: Embeddings) -> npt.NDArray[np.float32]:
        """[N, C] = scale x cosine similarity of each image to each class (+ bias for SigLIP)."""
        images = np.asarray(images, dtype=np.float32).reshape(-1, self.weights.shape[1])
        logits = np.float32(self.logit_scale) * images @ self.weights.T
        return logits if self.logit_bias is None else logits + np.float32(self.logit_bias)

    def probabilities(self, images: Embeddings) -> npt.NDArray[np.float32]:
        """[N, C] softmax over the labels of each image (rows sum to 1), or for SigLIP each label's sigmoid."""
        logits = self.logits(images)
        if self.logit_bias is not None:
            return np.exp(-np.logaddexp(0.0, -logits)).astype(np.float32)  # sigmoid, without overflow for any logit
        logits -= logits.max(axis=1, keepdims=True)  # exp() of at most 0: no overflow
        exp = np.exp(logits)
        return exp / exp.sum(axis=1, keepdims=True)

    def predict(self, images: Embeddings, top: int = 3) -> list[list[Prediction]]:
        """The `top` most probable labels of each image, most probable first.

        Args:
            images: [N, D] unit image embeddings.
            top: labels per image (at most the number of labels).
        """
        probabilities = self.probabilities(images)
        order = np.argsort(-probabilities, axis=1, kind="stable")[:, :top]  # [N, top]
        return [
            [Prediction(self.labels[c], float(p[c])) for c in row] for p, row in zip(probabilities, order, strict=True)
        ]


def parse_labels(text: str) -> list[str]:
    """Split a comma-separated label list ("cat, dog,car" -> ["cat", "dog", "car"]).

    Raises:
        QueryError: no label, or a label given twice.
    """
    return _check_labels([label.strip() for label in text.split(",") if label.strip()], "--labels")


def read_labels_file(path: str | os.PathLike[str]) -> list[str]:
    """Labels from a text file, one per line (blank lines and `#` comments ignored).

    Raises:
        QueryError: no label, or a label given twice.
    """
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    return _check_labels([s.strip() for s in lines if s.strip() and not s.lstrip().startswith("#")], str(path))


def _check_labels(labels: list[str], source: str) -> list[str]:
    """The labels, if there is at least one and none repeats."""
    if not labels:
        raise QueryError(f'{source}: no labels; give comma-separated class names, e.g. --labels "cat,dog,car"')
    repeated = sorted({label for label in labels if labels.count(label) > 1})
    if repeated:
        raise QueryError(f"{source}: label(s) {repeated} given more than once; list each class once")
    return labels


def check_templates(templates: Sequence[str]) -> tuple[str, ...]:
    """Validated templates: each must hold exactly one `{}` where the label goes.

    Raises:
        QueryError: no template, or one without exactly one `{}`.
    """
    bad = [t for t in templates if t.count("{}") != 1 or not _formats(t)]
    if not templates or bad:
        raise QueryError(
            f"prompt template(s) {bad or list(templates)} must each contain one {{}} for the label, "
            'e.g. "a photo of a {}."'
        )
    return tuple(templates)


def _formats(template: str) -> bool:
    """Whether str.format fills the template's one placeholder without tripping on other braces."""
    try:
        template.format("x")
    except (IndexError, KeyError, ValueError):
        return False
    return True


def model_scoring(model: object) -> tuple[float, float | None]:
    """The (logit scale, logit bias) a model's classifier should use.

    SigLIP models carry a learned `logit_bias` and were trained with sigmoid scores: their own exp(logit_scale)
    and bias. Other models get CLIP's zero-shot recipe: 100 and no bias (a softmax over the labels).
    """
    bias = getattr(model, "logit_bias", None)
    if bias is None:
        return LOGIT_SCALE, None
    return float(model.logit_scale.detach().float().exp()), float(bias.detach().float())


def build_classifier(
    labels: Sequence[str],
    encode_texts: Callable[[list[str]], Embeddings],
    templates: Sequence[str] = DEFAULT_TEMPLATES,
    logit_scale: float = LOGIT_SCALE,
    logit_bias: float | None = None,
) -> ZeroShotClassifier:
    """Embed labels through the prompt templates into a zero-shot classifier.

    Args:
        labels: class names ("cat", "golden retriever", ...).
        encode_texts: texts -> [N, D] unit rows (e.g. `lambda t: encode_texts(model, t)`); called once.
        templates: prompt templates with one `{}`; `("{}",)` uses the bare labels. Default: CLIP's 80 ImageNet
            templates (`retrieval.query.IMAGENET_TEMPLATES`).
        logit_scale: what cosines are multiplied by (see `model_scoring`).
        logit_bias: SigLIP's bias; when given, probabilities are independent sigmoids instead of a softmax.

    Returns:
        The classifier; its class vector is the renormalised mean of a label's template embeddings.

    Raises:
        QueryError: repeated labels or a malformed template.
    """
    labels = _check_labels(list(labels), "labels")
    templates = check_templates(templates)
    prompts = [prompt for label in labels for prompt in ensemble_prompts(label, templates)]
    embedded = np.asarray(encode_texts(prompts), dtype=np.float32)
    per_label = embedded.reshape(len(labels), len(templates), -1).mean(axis=1)  # [C, D]
    weights = per_label / np.linalg.norm(per_label, axis=1, keepdims=True)
    return ZeroShotClassifier(tuple(labels), weights.astype(np.float32), templates, logit_scale, logit_bias)


def top_k_accuracy(
    classifier: ZeroShotClassifier, images: Embeddings, targets: npt.ArrayLike, ks: Sequence[int] = (1, 5)
) -> dict[int, float]:
    """Share of images whose true class is among the k most probable labels (ties count against).

    Args:
        classifier: the zero-shot classifier.
        images: [N, D] unit image embeddings.
        targets: [N] true class index of each image.
        ks: the cut-offs; those above the number of classes are left out.
    """
    ks = [k for k in ks if k <= len(classifier.labels)]
    return recall_at_k(classifier.logits(images), np.asarray(targets, dtype=np.int64), ks=ks)


def tag_store(
    store: Store,
    classifiers: Sequence[ZeroShotClassifier],
    top: int = 1,
    column: str = LABEL_COLUMN,
    progress: bool = False,
) -> int:
    """Write the top labels of every stored image into a string column, from the stored vectors.

    Each classifier is one group of mutually exclusive labels (e.g. colours, then shapes); an image gets the
    `top` most probable labels of every group, joined by commas: `"red,circle"`. The column is created when
    missing and rewritten for every image in one commit, so an interrupted run leaves the previous labels.

    Args:
        store: the open store (the caller holds the indexer's write lock).
        classifiers: one or more label groups, built with the store's model.
        top: labels kept per group.
        column: the column to write; a plain identifier that is not one of the store's own columns.
        progress: show a tqdm bar on stderr.

    Returns:
        The number of images labelled.

    Raises:
        QueryError: a bad column name, or no classifier.
        StoreError: the column exists with another type.
    """
    if not classifiers:
        raise QueryError('no labels to tag with; give --labels "red,green,blue"')
    ids, vectors = store.all_vectors()
    values: list[str] = []
    with tqdm(total=len(ids), unit="img", desc="tagging", disable=not progress, file=sys.stderr) as bar:
        for start in range(0, len(ids), _CHUNK):
            chunk = vectors[start : start + _CHUNK]
            groups = [classifier.predict(chunk, top) for classifier in classifiers]
            values.extend(
                ",".join(p.label for group in per_image for p in group) for per_image in zip(*groups, strict=True)
            )
            bar.update(len(chunk))
    store.set_column(column, ids, values)
    logger.info("wrote %s for %d images of %s", column, len(ids), store.table_name)
    return len(ids)

"""Zero-shot classification accuracy (top-1 / top-5) on labelled class folders, as in the CLIP paper.

Each class name goes through prompt templates; the averaged, renormalised text embeddings form the
classifier (`retrieval.zeroshot`), and an image's prediction is the softmax over 100 x cosine. Accuracy is
the share of images whose true class is the most probable (top-1) or among the five most probable (top-5).

Run it from the repository root:

    python -m benchmarks.zero_shot                         # the two generated 8-class sets, with shapes-mini
    python -m benchmarks.zero_shot FOLDER [--classnames FILE] [--model M] [--templates imagenet] [--plot PNG]

Generated sets (default): `retrieval.shapes.class_folders` writes an 8-class colour set (red/, green/, ...)
and an 8-class shape set (circle/, square/, ...) into a temporary folder, from a seed the bundled model
never saw in training (`--seed`; shapes-mini's training seeds are in its model card,
retrieval/model/assets/shapes-mini/README.md). Their prompt templates name the other attribute, so that the
label's word sits in the kind of phrase the model was trained on: a colour label ("red") goes through
"a photo of a {} circle", "a photo of a {} square", ... (one template per shape), a shape label through
"a photo of a red {}", "a photo of a green {}", ... (one per colour); `--templates` picks others.

Any labelled folder (one sub-folder of images per class):

- CIFAR-10 (10 classes, 10,000 test images) exported as `cifar10/test/<class>/*.png` (e.g. torchvision's
  CIFAR10 saved with PIL, or the Kaggle PNG release); the folder names are the class names:
      python -m benchmarks.zero_shot cifar10/test --model ViT-B/32 --templates imagenet
  Published anchor (OpenAI CLIP ViT-B/32, zero-shot top-1): 89.8 %.
- ImageNet validation (1,000 classes, 50,000 images) in the usual `val/n01440764/*.JPEG` layout; the
  folders are WordNet ids, so give the class names CLIP used as a file of `wnid<TAB>name` lines (or one name
  per line in sorted folder order):
      python -m benchmarks.zero_shot imagenet/val --classnames imagenet_classes.tsv --model ViT-B/32 \
          --templates imagenet
  Published anchor (OpenAI CLIP ViT-B/32, 80-template ensemble, top-1): 63.3 %. `--per-class 10` gives a
  quick 10,000-image estimate.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from retrieval.datasets import LabelledSet, read_class_folders
from retrieval.errors import ClipsearchError
from retrieval.model.clip import CLIP
from retrieval.model.encode import choose_encoder, encode_images, encode_texts
from retrieval.model.preprocess import Preprocess
from retrieval.query import IMAGENET_TEMPLATES, SHORT_TEMPLATES
from retrieval.shapes import COLOURS, SHAPES, class_folders
from retrieval.zeroshot import build_classifier, top_k_accuracy

logger = logging.getLogger(__name__)

KS = (1, 5)  # top-1 and top-5 accuracy
GENERATED = ("colour", "shape")  # the generated 8-class sets
N_PER_CLASS = 25  # generated images per class (200 per set)
SEED = 4242  # seed of the generated sets; never used to train shapes-mini
IMAGE_BATCH = 32  # images per encoder call
TEMPLATE_SETS: dict[str, tuple[str, ...]] = {
    "imagenet": IMAGENET_TEMPLATES,  # CLIP's 80 ImageNet templates
    "short": SHORT_TEMPLATES,  # the 7 of them CLIP's authors found to do as well
    "plain": ("{}",),  # the bare class name
    "photo": ("a photo of a {}.",),  # CLIP's default single prompt
    "shapes-colour": tuple(f"a photo of a {{}} {shape}" for shape in SHAPES),  # colour labels, every shape
    "shapes-shape": tuple(f"a photo of a {colour} {{}}" for colour in COLOURS),  # shape labels, every colour
}
DEFAULT_TEMPLATES = {"colour": "shapes-colour", "shape": "shapes-shape"}  # per generated set; folders: imagenet


@dataclass
class ZeroShotResult:
    """Accuracy of one model with one template set on one labelled set."""

    dataset: str  # the set's name
    model: str  # model name
    templates: str  # template set name
    classes: int  # number of classes
    images: int  # number of images
    top1: float  # share of images whose class is the most probable label
    top5: float | None  # ... among the five most probable (None with fewer than 5 classes)
    seconds: float  # wall time, image encoding included

    def to_dict(self) -> dict[str, Any]:
        """JSON-able."""
        return asdict(self)


def embed_folder_images(
    model: CLIP, preprocess: Preprocess, labelled: LabelledSet, progress: bool, precision: str = "float32"
) -> np.ndarray:
    """[N, D] unit embeddings of a labelled set's images; other precisions than float32 through ONNX Runtime."""
    from clipsearch.api import embed_images

    if precision == "float32":
        return embed_images(labelled.images, (model, preprocess), batch_size=IMAGE_BATCH, progress=progress)
    encoder = choose_encoder(model, "image", precision)
    batches = range(0, len(labelled.images), IMAGE_BATCH)
    return np.concatenate(
        [
            encode_images(encoder, np.stack([preprocess(p).numpy() for p in labelled.images[i : i + IMAGE_BATCH]]))
            for i in batches
        ]
    )


def evaluate(
    model: CLIP,
    labelled: LabelledSet,
    image_vectors: np.ndarray,
    templates: str,
    name: str,
    started: float,
    precision: str = "float32",
) -> ZeroShotResult:
    """Build the classifier for one template set and score the set's images."""
    encoder = choose_encoder(model, "text", precision) if precision != "float32" else None
    classifier = build_classifier(
        labelled.classes, lambda texts: encode_texts(model, texts, encoder=encoder), TEMPLATE_SETS[templates]
    )
    accuracy = top_k_accuracy(classifier, image_vectors, labelled.targets, KS)
    return ZeroShotResult(
        dataset=name,
        model=model.info.name if precision == "float32" else f"{model.info.name} ({precision})",
        templates=templates,
        classes=len(labelled.classes),
        images=len(labelled.images),
        top1=round(accuracy[1], 4),
        top5=round(accuracy[5], 4) if 5 in accuracy else None,
        seconds=round(time.perf_counter() - started, 2),
    )


def run_folder(
    model: CLIP,
    preprocess: Preprocess,
    folder: str | os.PathLike[str],
    templates: Sequence[str],
    class_names: str | None = None,
    per_class: int | None = None,
    name: str | None = None,
    progress: bool = True,
    precision: str = "float32",
) -> list[ZeroShotResult]:
    """Accuracy on a labelled folder, once per template set (the images are embedded once)."""
    started = time.perf_counter()
    labelled = read_class_folders(folder, class_names, per_class)
    vectors = embed_folder_images(model, preprocess, labelled, progress, precision)
    name = name or Path(folder).name
    return [evaluate(model, labelled, vectors, t, name, started, precision) for t in templates]


def run_generated(
    model: CLIP,
    preprocess: Preprocess,
    by: str,
    templates: Sequence[str] | None = None,
    n_per_class: int = N_PER_CLASS,
    seed: int = SEED,
    progress: bool = True,
    precision: str = "float32",
) -> list[ZeroShotResult]:
    """Accuracy on a freshly generated 8-class set ("colour" or "shape") in a temporary folder."""
    with tempfile.TemporaryDirectory(prefix=f"clipsearch-zeroshot-{by}-") as folder:
        class_folders(folder, by, n_per_class, seed, progress=progress)
        templates = templates or [DEFAULT_TEMPLATES[by]]
        return run_folder(
            model, preprocess, folder, templates, name=f"generated {by}s", progress=progress, precision=precision
        )


def format_table(results: Sequence[ZeroShotResult]) -> str:
    """The results as a text table, accuracies in percent."""
    lines = [f"{'set':<20}{'model':<16}{'templates':<15}{'classes':>8}{'images':>8}{'top-1':>8}{'top-5':>8}"]
    for r in results:
        top5 = f"{100 * r.top5:>8.1f}" if r.top5 is not None else f"{'-':>8}"
        lines.append(
            f"{r.dataset:<20}{r.model:<16}{r.templates:<15}{r.classes:>8}{r.images:>8}{100 * r.top1:>8.1f}{top5}"
        )
    return "\n".join(lines)


def plot(results: Sequence[ZeroShotResult], path: str | os.PathLike[str]) -> None:
    """Save a bar chart of top-1 and top-5 accuracy per set as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r.dataset}\n{r.templates}" for r in results]
    xs = np.arange(len(results))
    fig, ax = plt.subplots(figsize=(max(4, 1.6 * len(results)), 3.5))
    for offset, key in ((-0.2, "top1"), (0.2, "top5")):
        values = [100 * (getattr(r, key) or 0) for r in results]
        bars = ax.bar(xs + offset, values, 0.4, label=key.replace("top", "top-"))
        ax.bar_label(bars, fmt="%.1f", fontsize=7)
    ax.set_xticks(xs, labels, fontsize=7)
    ax.set_ylim(0, 105)
    ax.set_ylabel("accuracy (%)")
    ax.set_title(f"zero-shot accuracy, {results[0].model}", fontsize=9)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=3, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: evaluate, print a table and one JSON line."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.zero_shot", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("folder", nargs="?", help="labelled folder (one sub-folder per class); default: generated sets")
    parser.add_argument("--generated", choices=GENERATED, action="append",
                        help="generated set(s) to evaluate (default without FOLDER: both)")  # fmt: skip
    parser.add_argument("--model", default=os.environ.get("CLIPSEARCH_MODEL", "shapes-mini"),
                        help="model name or checkpoint path (default: $CLIPSEARCH_MODEL or shapes-mini)")  # fmt: skip
    parser.add_argument(
        "--templates",
        action="append",
        choices=sorted(TEMPLATE_SETS),
        help="template set(s) to compare (default: imagenet for a folder, shapes-* for generated sets)",
    )
    parser.add_argument("--classnames", default=None, help="class-names file: wnid<TAB>name lines or one per line")
    parser.add_argument("--per-class", type=int, default=None, help="at most N images per class (folders)")
    parser.add_argument("--n-per-class", type=int, default=N_PER_CLASS, help="generated images per class")
    parser.add_argument("--seed", type=int, default=SEED, help=f"seed of the generated sets (default {SEED})")
    parser.add_argument("--device", default="auto", help="torch device (default: auto)")
    parser.add_argument("--precision", default="float32", choices=("float32", "int8"),
                        help="encoder precision; int8: dynamically quantised, ONNX Runtime [float32]")  # fmt: skip
    parser.add_argument("--plot", default=None, metavar="PNG", help="save a bar chart")
    parser.add_argument("--json", action="store_true", help="print only the JSON line")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.folder and args.generated:
        parser.error("give either a FOLDER or --generated, not both")

    from benchmarks.recall_at_k import machine
    from retrieval.model.loading import load_model

    progress = not args.json
    try:
        model, preprocess = load_model(args.model, device=args.device)
        if args.folder:
            results = run_folder(model, preprocess, args.folder, args.templates or ["imagenet"], args.classnames,
                                 args.per_class, progress=progress, precision=args.precision)  # fmt: skip
        else:
            results = [
                result
                for by in args.generated or GENERATED
                for result in run_generated(
                    model, preprocess, by, args.templates, args.n_per_class, args.seed, progress, args.precision
                )
            ]
    except ClipsearchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if not args.json:
        print(format_table(results))
    if args.plot:
        plot(results, args.plot)
    print(json.dumps({"benchmark": "zero_shot", "results": [r.to_dict() for r in results], "machine": machine()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

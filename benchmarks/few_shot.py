"""Few-shot accuracy: zero-shot (prompt ensembling) against a linear probe, CoOp and `auto`, for 1-16 shots per class.

The protocol of the CoOp paper (Zhou et al. 2022, fig. 3) on frozen image vectors: for each number of shots K,
K training images per class are drawn with a seed, the probe (`retrieval.concepts.train_probe`, C by
cross-validation from 4 shots on) and CoOp (`retrieval.concepts.train_coop`, 4 context vectors shared by the
classes, initialised from "a photo of a", class token at the end, starting from and kept near the zero-shot
classifier's class vectors: see `retrieval.concepts.coop`; `--anchor-weight 0` is plain CoOp) learn from their
vectors, and every method is scored by top-1 accuracy on a fixed test split (never drawn for training). `auto`
is the method `learn --method auto`'s rule keeps (`retrieval.concepts.pick_method`: the better held-out accuracy
on a split of the K shots, CoOp on a tie or at one shot). Each K is repeated over several seeds; the table gives
the mean and the spread (min-max), and one line per set can be parsed:
`few_shot set=<name> zero_shot=<acc> probe@16=<acc> coop@16=<acc> auto@16=<acc>`.

Seeds (fixed before the method's design, for design and held-out runs alike: 3 draws, 50 test images a class):
CoOp's zero-shot anchor (its form, and the weight `ANCHOR_WEIGHT / shots`) was designed only on generated sets of
seeds 777, 778 and 779, draws 10-12 (`--data-seed 777 --first-seed 10`). Sets of seed 5151, draws 0-2, were the
held-out sets of the previous design and have been looked at since: reported, never designed on. The held-out
sets are seed 9393, draws 0-2 (the defaults), run once with every constant fixed and committed.

Run it from the repository root:

    python -m benchmarks.few_shot                              # generated sets, with shapes-mini
    python -m benchmarks.few_shot FOLDER --model ViT-B/32 --templates imagenet --plot few_shot.png

Generated sets (default, `retrieval.shapes`, from a seed shapes-mini never trained on):

- `colour` and `shape`: 8 classes each (`class_folders`); zero-shot prompts name the other attribute, as in
  `benchmarks.zero_shot`.
- `marker`: 2 classes, "plain" and "marked", scenes with a magenta square in the top-left corner of the
  central square, which the generator never writes in a caption: zero-shot text cannot express it.

Any labelled folder (one sub-folder per class) works with a real model, e.g. CIFAR-10's test set exported as
`cifar10/test/<class>/*.png`:

    python -m benchmarks.few_shot cifar10/test --model ViT-B/32 --templates imagenet --test-per-class 100

Published anchors (CoOp paper, ResNet-50 CLIP, mean over 11 datasets, top-1 %): zero-shot 58.2 (hand-made
prompts); linear probe 1/2/4/8/16 shots 36.7/47.6/57.2/65.0/67.3 (~ below zero-shot until 4 shots); CoOp
59.6/62.3/66.8/69.9/73.4 (above zero-shot from 1 shot, gaining ~15 points at 16). CLIP paper (ViT-B/32) on
CIFAR-10: zero-shot 91.3, linear probe on all training images 95.1.
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

import numpy as np

from benchmarks.zero_shot import DEFAULT_TEMPLATES, TEMPLATE_SETS, embed_folder_images
from retrieval.concepts import (
    ANCHOR_WEIGHT,
    DEFAULT_LR,
    DEFAULT_N_CTX,
    DEFAULT_STEPS,
    held_out_accuracies,
    pick_method,
    train_coop,
    train_probe,
)
from retrieval.datasets import read_class_folders
from retrieval.errors import ClipsearchError
from retrieval.model.clip import CLIP
from retrieval.model.encode import encode_texts
from retrieval.shapes import class_folders, random_attributes, render
from retrieval.zeroshot import build_classifier

logger = logging.getLogger(__name__)

SHOTS = (1, 2, 4, 8, 16)  # training images per class
SEEDS = (0, 1, 2)  # repeats per number of shots: the held-out draws (designed on 10, 11, 12)
TEST_PER_CLASS = 50  # test images per class, the same for every seed and K (400 on 8 classes: one image is 0.25 %)
GENERATED = ("colour", "shape", "marker")
SEED = 9393  # seed of the generated sets, held out (design: 777-779; 5151 was looked at before); never trained on
MARKER = (255, 0, 255)  # the uncaptioned marker's colour (no named colour of the generator)
MARKER_TEMPLATES = ("a photo of a {} shape",)
MARKER_CLASSES = ("plain", "marked")


@dataclass
class Curve:
    """Top-1 accuracy of the three methods on one set, per number of shots (mean and min/max over seeds)."""

    dataset: str
    classes: int
    zero_shot: float
    shots: list[int]
    probe: list[list[float]]  # per K, one accuracy per seed
    coop: list[list[float]]
    auto: list[list[float]]  # the method `auto` keeps by held-out accuracy on the K shots
    seconds: float


def marker_folders(out_dir: str | os.PathLike[str], n_per_class: int, seed: int, size: int = 96) -> None:
    """Write `plain/` and `marked/` scenes: the same kind of random scene, with a magenta square (a quarter of
    the side) in the top-left corner for `marked/`, which no caption ever names."""
    from PIL import ImageDraw

    for c, label in enumerate(MARKER_CLASSES):
        folder = Path(out_dir) / label
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            rng = np.random.default_rng([seed, c, i])
            image = render(random_attributes(rng, two_objects_p=0.0), size, seed=int(rng.integers(2**31)))
            if label == "marked":
                ImageDraw.Draw(image).rectangle((0, 0, size // 4, size // 4), fill=MARKER)
            image.save(folder / f"{i:05d}.png")


def _split(targets: np.ndarray, test_per_class: int) -> tuple[np.ndarray, np.ndarray]:
    """(pool, test) indices: the first `test_per_class` images of each class (in folder order) are the test."""
    test = np.concatenate([np.flatnonzero(targets == c)[:test_per_class] for c in np.unique(targets)])
    return np.setdiff1d(np.arange(len(targets)), test), test


def run_set(
    model: CLIP,
    vectors: np.ndarray,
    targets: np.ndarray,
    classes: Sequence[str],
    templates: Sequence[str],
    name: str,
    shots: Sequence[int] = SHOTS,
    seeds: Sequence[int] = SEEDS,
    test_per_class: int = TEST_PER_CLASS,
    steps: int = DEFAULT_STEPS,
    anchor_weight: float | None = None,
) -> Curve:
    """The methods on one embedded labelled set; CoOp is kept near the zero-shot classifier's class vectors."""
    started = time.perf_counter()
    pool, test = _split(targets, test_per_class)
    classifier = build_classifier(classes, lambda texts: encode_texts(model, texts), templates)
    zero = float(np.mean(classifier.logits(vectors[test]).argmax(1) == targets[test]))
    probe, coop, auto = [], [], []
    for k in shots:
        probe.append([])
        coop.append([])
        auto.append([])
        for seed in seeds:
            rng = np.random.default_rng([seed, k])
            train = np.concatenate(
                [rng.choice(pool[targets[pool] == c], k, replace=False) for c in range(len(classes))]
            )

            def fit_probe(x: np.ndarray, y: np.ndarray, seed: int = seed) -> tuple:
                fitted = train_probe(x, y, seed)
                return fitted.predict, fitted

            def fit_coop(x: np.ndarray, y: np.ndarray, seed: int = seed) -> tuple:
                fitted = train_coop(model, classes, x, y, DEFAULT_N_CTX, False, steps, DEFAULT_LR, seed,
                                    anchor=classifier.weights, anchor_weight=anchor_weight)  # fmt: skip
                return fitted.predict, fitted

            fitters = {"probe": fit_probe, "coop": fit_coop}
            x, y = vectors[train], targets[train]
            accuracy = {
                kind: float(np.mean(fit(x, y)[0](vectors[test]) == targets[test])) for kind, fit in fitters.items()
            }
            chosen = pick_method(held_out_accuracies(x, y, fitters, seed))
            probe[-1].append(accuracy["probe"])
            coop[-1].append(accuracy["coop"])
            auto[-1].append(accuracy[chosen])
            logger.info("%s K=%d seed=%d probe %.3f coop %.3f auto %s", name, k, seed, *accuracy.values(), chosen)
    return Curve(name, len(classes), zero, list(shots), probe, coop, auto, round(time.perf_counter() - started, 1))


def format_table(curves: Sequence[Curve]) -> str:
    """Mean top-1 % (min-max over seeds) per set, method and K."""
    lines = []
    for curve in curves:
        lines.append(f"{curve.dataset} ({curve.classes} classes): zero-shot {100 * curve.zero_shot:.1f}")
        lines.append(f"  {'shots':>5}  {'probe':>18}  {'coop':>18}  {'auto':>18}")
        for k, *runs in zip(curve.shots, curve.probe, curve.coop, curve.auto, strict=True):
            cells = [f"{100 * np.mean(a):5.1f} ({100 * min(a):.0f}-{100 * max(a):.0f})" for a in runs]
            lines.append(f"  {k:>5}  " + "  ".join(f"{cell:>18}" for cell in cells))
    return "\n".join(lines)


def summary_line(curve: Curve) -> str:
    """One machine-readable line per set."""
    last = curve.shots[-1]
    return (
        f"few_shot set={curve.dataset.replace(' ', '_')} zero_shot={curve.zero_shot:.4f} "
        f"probe@{last}={np.mean(curve.probe[-1]):.4f} coop@{last}={np.mean(curve.coop[-1]):.4f} "
        f"auto@{last}={np.mean(curve.auto[-1]):.4f}"
    )


def plot(curves: Sequence[Curve], path: str | os.PathLike[str]) -> None:
    """One panel per set: accuracy against shots (log 2), mean with a min-max band, zero-shot as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(curves), figsize=(4.5 * len(curves), 3.6), squeeze=False)
    for ax, curve in zip(axes[0], curves, strict=True):
        for label, runs in (("linear probe", curve.probe), ("CoOp (KgCoOp)", curve.coop), ("auto", curve.auto)):
            runs = 100 * np.asarray(runs)
            ax.plot(curve.shots, runs.mean(1), marker="o", label=label)
            ax.fill_between(curve.shots, runs.min(1), runs.max(1), alpha=0.2)
        ax.axhline(100 * curve.zero_shot, color="grey", linestyle="--", label="zero-shot")
        ax.set_xscale("log", base=2)
        ax.set_xticks(curve.shots, [str(k) for k in curve.shots])
        ax.set_title(f"{curve.dataset} ({curve.classes} classes)")
        ax.set_xlabel("shots per class")
        ax.set_ylabel("top-1 accuracy (%)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("folder", nargs="?", help="labelled folder (one sub-folder per class); default: generated sets")
    parser.add_argument("--model", default="shapes-mini", help="model name or checkpoint path (default shapes-mini)")
    parser.add_argument("--templates", choices=sorted(TEMPLATE_SETS), help="zero-shot prompts for a folder (imagenet)")
    parser.add_argument("--sets", nargs="+", choices=GENERATED, default=list(GENERATED), help="generated sets to run")
    parser.add_argument("--shots", type=int, nargs="+", default=list(SHOTS), help="shots per class")
    parser.add_argument("--seeds", type=int, default=len(SEEDS), help="repeats per number of shots (>= 3)")
    parser.add_argument("--first-seed", type=int, default=SEEDS[0], help="seed of the first repeat (design: 10)")
    parser.add_argument("--data-seed", type=int, default=SEED, help="seed of the generated sets (design: 777-779)")
    parser.add_argument(
        "--anchor-weight", type=float, help=f"CoOp pull to zero-shot, fixed (0: plain); default {ANCHOR_WEIGHT:g}/shots"
    )
    parser.add_argument("--test-per-class", type=int, default=TEST_PER_CLASS, help="test images per class")
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="CoOp optimisation steps")
    parser.add_argument("--plot", help="write a PNG of the curves here")
    parser.add_argument("--json", help="write the curves as JSON here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    from retrieval.model.loading import load_model

    try:
        model, preprocess = load_model(args.model, device="cpu")
        n = args.test_per_class + max(args.shots) * 2  # enough for the test split and a pool to draw shots from
        seeds = range(args.first_seed, args.first_seed + args.seeds)
        common = dict(shots=args.shots, seeds=seeds, test_per_class=args.test_per_class, steps=args.steps,
                      anchor_weight=args.anchor_weight)  # fmt: skip
        curves = []
        if args.folder:
            labelled = read_class_folders(args.folder)
            vectors = embed_folder_images(model, preprocess, labelled, progress=True)
            templates = TEMPLATE_SETS[args.templates or "imagenet"]
            curves.append(run_set(model, vectors, labelled.targets, labelled.classes, templates, Path(args.folder).name,
                                  **common))  # fmt: skip
        for by in [] if args.folder else args.sets:
            with tempfile.TemporaryDirectory(prefix=f"clipsearch-fewshot-{by}-") as folder:
                if by == "marker":
                    marker_folders(folder, n, args.data_seed)
                    templates = MARKER_TEMPLATES
                else:
                    class_folders(folder, by, n, args.data_seed, size_range=(96, 160))
                    templates = TEMPLATE_SETS[DEFAULT_TEMPLATES[by]]
                labelled = read_class_folders(folder)
                vectors = embed_folder_images(model, preprocess, labelled, progress=False)
            classes = list(MARKER_CLASSES) if by == "marker" else labelled.classes
            order = [labelled.classes.index(c) for c in classes]  # targets follow the sorted folder names
            targets = np.asarray([order.index(t) for t in labelled.targets])
            curves.append(run_set(model, vectors, targets, classes, templates, f"generated {by}s", **common))
    except (ClipsearchError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(format_table(curves))
    for curve in curves:
        print(summary_line(curve))
    if args.plot:
        plot(curves, args.plot)
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(c) for c in curves], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

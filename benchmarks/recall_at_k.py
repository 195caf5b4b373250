"""Recall@k of text->image and image->text retrieval, measured through clipsearch's own indexer and query path.

The images of a captioned set are indexed by the real indexer (`Library.index`: decode workers, the image
encoder, a LanceDB store in a temporary folder, then the FAISS index of the chosen type). Every caption is
embedded by the text encoder (in batches, with the same `encode_texts` a query uses) and searched with
`Library.search`, the path `clipsearch query` takes: FAISS over the store, metadata read back from LanceDB.

Protocol (as in the CLIP paper and the Karpathy-split literature):
- text->image R@k: share of captions whose own image is among the top k images;
- image->text R@k: share of images with at least one of their own captions among the top k captions. This
  direction ranks all captions of the set for each image by the cosine of the image's *stored* vector (as
  written by the indexer) with the caption embeddings; the store has no caption index to search.
Ties count against the model. An image the indexer could not read counts as a miss in both directions.

Run it from the repository root:

    python -m benchmarks.recall_at_k SET [--model M] [--index flat|hnsw|ivf|ivfpq] [--template "a photo of {}"]
                                         [--limit N] [--plot recall.png] [--json]

SET is any captioned set `retrieval.datasets.read_captioned` reads:

- a generated gallery (held out: its seed must not be one the model was trained on; shapes-mini's are listed
  in retrieval/model/assets/shapes-mini/README.md):
      python -m retrieval.shapes --out /tmp/heldout --n 500 --seed 777
      python -m benchmarks.recall_at_k /tmp/heldout/manifest.jsonl --model shapes-mini
  For such a manifest the table also shows the oracle: the recall of a perfect model that ranks the other
  images matching a caption's words at random (a caption like "a red circle" fits several images).
- Flickr30k, Karpathy split (1,000 test images, 5,000 captions): the images in `flickr30k-images/` and
  `dataset_flickr30k.json` from Karpathy's `caption_datasets.zip`:
      python -m benchmarks.recall_at_k dataset_flickr30k.json --images flickr30k-images --split test \
          --model ViT-B/32
  Published anchor (OpenAI CLIP ViT-B/32, zero-shot, Flickr30k 1K test, text->image R@1/5/10):
  58.8 / 83.6 / 90.0. Templates matter: the CLIP paper prefixes captions with "a photo of" for Flickr30k.
- MSCOCO, Karpathy split (5,000 test images, 25,000 captions): `dataset_coco.json` and the folder holding
  `val2014/`:
      python -m benchmarks.recall_at_k dataset_coco.json --images coco --split test --model ViT-B/32

"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from tqdm import tqdm

from clipsearch.library import Library
from retrieval.ann import KINDS
from retrieval.datasets import CaptionedSet, read_captioned
from retrieval.errors import ClipsearchError
from retrieval.metrics import recall_at_k
from retrieval.model.clip import CLIP
from retrieval.model.encode import choose_encoder, encode_texts
from retrieval.query import SearchResult
from retrieval.types import Embeddings
from retrieval.zeroshot import check_templates

logger = logging.getLogger(__name__)

KS = (1, 5, 10)  # the reported cut-offs
DEFAULT_TEMPLATE = "{}"  # captions as written; "a photo of {}" is the CLIP paper's Flickr30k prompt
TEXT_BATCH = 256  # captions per text-encoder call
IMAGE_TO_TEXT_CHUNK = 1024  # images scored against all captions at once (bounds the [chunk, M] matrix)


@dataclass
class RecallResult:
    """The figures of one benchmark run."""

    dataset: str  # what was read
    model: str  # model name
    index: str  # FAISS index type searched
    template: str  # the prompt template captions went through
    images: int  # images in the set
    captions: int  # captions in the set
    failed: int  # images the indexer could not read (misses)
    text_to_image: dict[int, float]  # k -> R@k
    image_to_text: dict[int, float]  # k -> R@k
    oracle_text_to_image: dict[int, float] | None = None  # a perfect model's R@k (generated sets only)
    seconds: dict[str, float] = field(default_factory=dict)  # wall time per stage
    query_ms_p50: float = 0.0  # median time of one `Library.search` call
    precision: str = "float32"  # the encoders' precision

    def to_dict(self) -> dict[str, Any]:
        """JSON-able, recalls keyed "R@k"."""
        out = asdict(self)
        for key in ("text_to_image", "image_to_text", "oracle_text_to_image"):
            if out[key] is not None:
                out[key] = {f"R@{k}": round(v, 4) for k, v in out[key].items()}
        return out


def ranked_search(
    search: Callable[[np.ndarray], list[SearchResult]], queries: Embeddings, k: int, progress: bool = False
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64], list[float]]:
    """Run every query vector through a search function and collect its ranked hits.

    Args:
        search: query vector -> ranked results with the store id in `metadata["id"]` (e.g. `Library.search`).
        queries: [Q, D] unit query vectors.
        k: results asked for per query.
        progress: show a tqdm bar on stderr.

    Returns:
        (scores [Q, k], store ids [Q, k], seconds per query); missing results have score -inf and id -1.
    """
    scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
    ids = np.full((len(queries), k), -1, dtype=np.int64)
    times = []
    for q, vector in enumerate(tqdm(queries, desc="searching", unit="query", disable=not progress, file=sys.stderr)):
        start = time.perf_counter()
        hits = search(vector)
        times.append(time.perf_counter() - start)
        for j, hit in enumerate(hits[:k]):
            scores[q, j] = hit.score
            ids[q, j] = int(hit.metadata["id"])
    return scores, ids, times


def text_to_image_recall(
    scores: npt.ArrayLike, ids: npt.ArrayLike, target_ids: npt.ArrayLike, ks: Sequence[int] = KS
) -> dict[int, float]:
    """R@k of captions from their ranked search hits: is the caption's own image among the first k?

    Args:
        scores: [Q, K] hit scores, best first (-inf where a query got fewer hits), K >= max(ks).
        ids: [Q, K] hit store ids (-1 for none).
        target_ids: [Q] store id of each caption's image (-1 when it was not indexed: a miss).
        ks: the cut-offs.
    """
    ids = np.asarray(ids, dtype=np.int64)
    target_ids = np.asarray(target_ids, dtype=np.int64)
    if ids.shape[1] < max(ks):
        raise ValueError(f"R@{max(ks)} needs at least {max(ks)} hits per query, got {ids.shape[1]}")
    relevant = (ids == target_ids[:, None]) & (target_ids[:, None] >= 0)  # [Q, K]
    return recall_at_k(np.asarray(scores, dtype=np.float32), relevant, ks=ks)


def image_to_text_recall(
    image_vectors: Embeddings,
    caption_vectors: Embeddings,
    caption_image: npt.ArrayLike,
    ks: Sequence[int] = KS,
    indexed: npt.ArrayLike | None = None,
) -> dict[int, float]:
    """R@k of images against all captions: is any of the image's own captions among its k nearest captions?

    Args:
        image_vectors: [N, D] unit image vectors.
        caption_vectors: [M, D] unit caption vectors.
        caption_image: [M] index of each caption's image.
        ks: the cut-offs.
        indexed: [N] bool, False for images that were never embedded (counted as misses); default all True.
    """
    caption_image = np.asarray(caption_image, dtype=np.int64)
    n = len(image_vectors)
    indexed = np.ones(n, dtype=bool) if indexed is None else np.asarray(indexed, dtype=bool)
    found = {k: 0.0 for k in ks}
    for start in range(0, n, IMAGE_TO_TEXT_CHUNK):
        rows = np.arange(start, min(start + IMAGE_TO_TEXT_CHUNK, n))
        similarity = image_vectors[rows] @ caption_vectors.T  # [chunk, M]
        relevant = (caption_image[None, :] == rows[:, None]) & indexed[rows, None]  # [chunk, M]
        for k, recall in recall_at_k(similarity, relevant, ks=ks).items():
            found[k] += recall * len(rows)
    return {k: v / n if n else 0.0 for k, v in found.items()}


def shapes_oracle(path: str | os.PathLike[str], n_images: int, ks: Sequence[int] = KS) -> dict[int, float] | None:
    """A perfect model's text->image R@k on a `retrieval.shapes` manifest's first images; None for other sets."""
    from retrieval.shapes import oracle_recall, read_manifest

    if Path(path).suffix.lower() != ".jsonl":
        return None
    try:
        samples = read_manifest(path)
    except ValueError:
        return None
    return oracle_recall(samples[:n_images], ks)


def run(
    dataset: CaptionedSet,
    model: CLIP,
    index_type: str = "flat",
    template: str = DEFAULT_TEMPLATE,
    ks: Sequence[int] = KS,
    workers: int | None = None,
    progress: bool = True,
    name: str = "",
    precision: str = "float32",
) -> RecallResult:
    """Index a captioned set into a temporary store and measure recall@k both ways.

    Args:
        dataset: the images and captions.
        model: a CLIP with both towers and `.info` (from `load_model`, or `ModelInfo.for_model` in tests).
        index_type: flat (exact), hnsw, ivf or ivfpq.
        template: each caption becomes `template.format(caption)` before it is embedded.
        ks: the cut-offs.
        workers: decoder processes for the indexer (None: its default, 0: in this process).
        progress: tqdm bars on stderr.
        name: the set's name for the report.
        precision: the encoders' precision ("int8": dynamically quantised, in ONNX Runtime), images and captions.

    Returns:
        The figures, with the time each stage took.

    Raises:
        QueryError: a template without exactly one `{}`.
    """
    check_templates([template])
    seconds: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="clipsearch-recall-") as db:
        library = Library(db=db, model=model, index_type=index_type, precision=precision)
        options: dict[str, Any] = {"progress": progress}
        if workers is not None:
            options["workers"] = workers
        start = time.perf_counter()
        summary = library.index([str(p) for p in dataset.images], **options)
        seconds["index"] = time.perf_counter() - start
        logger.info("indexed %d images (%d failed) in %.1f s", summary.indexed, summary.failed, seconds["index"])

        stored = library.embeddings()
        row_of = {os.path.abspath(p): i for i, p in enumerate(stored.paths)}
        positions = np.array([row_of.get(os.path.abspath(p), -1) for p in dataset.images], dtype=np.int64)
        indexed = positions >= 0
        image_ids = np.where(indexed, stored.ids[np.maximum(positions, 0)] if len(stored.ids) else -1, -1)
        image_vectors = np.zeros((len(dataset.images), model.config.embed_dim), dtype=np.float32)
        image_vectors[indexed] = stored.vectors[positions[indexed]]

        start = time.perf_counter()
        captions = [template.format(c) for c in dataset.captions]
        text_encoder = choose_encoder(model, "text", precision) if precision != "float32" else None
        caption_vectors = encode_texts(model, captions, batch_size=TEXT_BATCH, encoder=text_encoder)
        seconds["encode_captions"] = time.perf_counter() - start

        start = time.perf_counter()
        k = max(ks)
        scores, ids, times = ranked_search(lambda v: library.search(v, k=k), caption_vectors, k, progress)
        seconds["search"] = time.perf_counter() - start

    start = time.perf_counter()
    i2t = image_to_text_recall(image_vectors, caption_vectors, dataset.caption_image, ks, indexed)
    seconds["image_to_text"] = time.perf_counter() - start
    return RecallResult(
        dataset=name,
        model=model.info.name,
        index=index_type,
        template=template,
        images=len(dataset.images),
        captions=len(dataset.captions),
        failed=int((~indexed).sum()),
        text_to_image=text_to_image_recall(scores, ids, image_ids[dataset.caption_image], ks),
        image_to_text=i2t,
        seconds={key: round(value, 2) for key, value in seconds.items()},
        query_ms_p50=round(1000 * statistics.median(times), 2) if times else 0.0,
        precision=precision,
    )


def format_table(result: RecallResult) -> str:
    """The figures as a text table, in percent."""
    ks = list(result.text_to_image)
    head = f"{'':<22}" + "".join(f"{f'R@{k}':>8}" for k in ks)
    lines = [
        f"{result.dataset}: {result.images} images, {result.captions} captions, model {result.model}, "
        f"{result.index} index, template {result.template!r}"
        + (f", {result.failed} unreadable" if result.failed else ""),
        head,
    ]
    rows = [("text->image", result.text_to_image), ("image->text", result.image_to_text)]
    if result.oracle_text_to_image is not None:
        rows.append(("text->image (oracle)", result.oracle_text_to_image))
    lines += [f"{label:<22}" + "".join(f"{100 * r[k]:>8.1f}" for k in ks) for label, r in rows]
    s = result.seconds
    lines.append(
        f"time: index {s.get('index', 0):.1f} s, captions {s.get('encode_captions', 0):.1f} s, "
        f"search {s.get('search', 0):.1f} s ({result.query_ms_p50:.1f} ms per query, median)"
    )
    return "\n".join(lines)


def plot(result: RecallResult, path: str | os.PathLike[str]) -> None:
    """Save a bar chart of R@k, both directions (and the oracle when known), as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = [("text->image", result.text_to_image), ("image->text", result.image_to_text)]
    if result.oracle_text_to_image is not None:
        series.append(("text->image, perfect model", result.oracle_text_to_image))
    ks = list(result.text_to_image)
    width = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for i, (label, recalls) in enumerate(series):
        xs = np.arange(len(ks)) + (i - (len(series) - 1) / 2) * width
        bars = ax.bar(xs, [100 * recalls[k] for k in ks], width, label=label)
        ax.bar_label(bars, fmt="%.1f", fontsize=7)
    ax.set_xticks(np.arange(len(ks)), [f"R@{k}" for k in ks])
    ax.set_ylim(0, 105)
    ax.set_ylabel("recall (%)")
    ax.set_title(f"{result.dataset}: {result.model}, {result.index} index", fontsize=9)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=3, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):  # Linux names the CPU model only in /proc/cpuinfo
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        cpu = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), cpu)
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__}


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: read the set, load the model, run, print a table and one JSON line."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.recall_at_k",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "dataset", help="a .jsonl/.csv manifest, a Karpathy-split .json, or a folder with .txt captions"
    )
    parser.add_argument("--images", default=None, help="Karpathy JSON: the folder holding the images")
    parser.add_argument("--split", default="test", help="Karpathy JSON: the split (default: test)")
    parser.add_argument("--model", default=os.environ.get("CLIPSEARCH_MODEL", "shapes-mini"),
                        help="model name or checkpoint path (default: $CLIPSEARCH_MODEL or shapes-mini)")  # fmt: skip
    parser.add_argument("--index", default="flat", choices=KINDS, help="FAISS index type (default: flat)")
    parser.add_argument("--template", default=DEFAULT_TEMPLATE, help='caption template, e.g. "a photo of {}"')
    parser.add_argument("--limit", type=int, default=None, help="use only the first N images (and their captions)")
    parser.add_argument("--workers", type=int, default=None, help="indexer decoder processes (default: its own)")
    parser.add_argument("--device", default="auto", help="torch device (default: auto)")
    parser.add_argument("--precision", default="float32", choices=("float32", "int8"),
                        help="encoder precision; int8: dynamically quantised, ONNX Runtime [float32]")  # fmt: skip
    parser.add_argument("--plot", default=None, metavar="PNG", help="save a bar chart")
    parser.add_argument("--json", action="store_true", help="print only the JSON line")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    from retrieval.model.loading import load_model

    path = Path(args.dataset)
    name = f"{path.name} ({args.split})" if path.suffix == ".json" else f"{path.parent.name}/{path.name}"
    try:
        dataset = read_captioned(path, args.images, args.split).limit(args.limit)
        model, _ = load_model(args.model, device=args.device)
        result = run(dataset, model, args.index, args.template, workers=args.workers, progress=not args.json, name=name,
                     precision=args.precision)  # fmt: skip
    except ClipsearchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    result.oracle_text_to_image = shapes_oracle(args.dataset, len(dataset.images))
    if not args.json:
        print(format_table(result))
    if args.plot:
        plot(result, args.plot)
    print(json.dumps({"benchmark": "recall_at_k", **result.to_dict(), "machine": machine()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

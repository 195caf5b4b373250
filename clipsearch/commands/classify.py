"""`clipsearch classify` (zero-shot labels for image files) and `clipsearch tag` (the same over the store)."""

from __future__ import annotations

import json
import logging
import sys
from typing import TYPE_CHECKING

import click

if TYPE_CHECKING:
    from retrieval.zeroshot import Prediction

logger = logging.getLogger(__name__)

_DB_HELP = "Store directory [env CLIPSEARCH_HOME; default ~/.local/share/clipsearch]."
_MODEL_HELP = "Model name or checkpoint path [env CLIPSEARCH_MODEL; default: the store's model, else MobileCLIP2-S0]."
_TEMPLATE_HELP = "Prompt template with {} for the label; repeat to ensemble [default: CLIP's 80 ImageNet templates]."
_GROUPS_HELP = 'Comma-separated labels; repeat for independent groups: --labels "red,green" --labels "circle,star".'
_BATCH = 32


def _templates(given: tuple[str, ...]) -> tuple[str, ...]:
    """The templates asked for, or CLIP's 80 ImageNet ones."""
    from retrieval.zeroshot import DEFAULT_TEMPLATES, check_templates

    return check_templates(given) if given else DEFAULT_TEMPLATES


def _labels(labels: str | None, labels_file: str | None) -> list[str]:
    """The label list from exactly one of --labels and --labels-file."""
    from retrieval.zeroshot import parse_labels, read_labels_file

    if labels is not None and labels_file is not None:
        raise click.UsageError("give either --labels or --labels-file, not both")
    if labels is None and labels_file is None:
        raise click.UsageError('give the class names: --labels "cat,dog,car" or --labels-file FILE (one per line)')
    return parse_labels(labels) if labels is not None else read_labels_file(labels_file)


@click.command("classify")
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True, path_type=str))
@click.option("--labels", default=None, help='Comma-separated class names, e.g. "cat,dog,car".')
@click.option(
    "--labels-file", default=None, type=click.Path(exists=True, dir_okay=False), help="Class names, one a line."
)
@click.option("--template", "templates", multiple=True, help=_TEMPLATE_HELP)
@click.option("--top", default=3, show_default=True, type=click.IntRange(min=1), help="Labels shown per image.")
@click.option("--model", "model_name", envvar="CLIPSEARCH_MODEL", default=None, help=_MODEL_HELP)
@click.option("--device", default="auto", show_default=True, help='"auto", "cpu", "cuda", "mps".')
@click.option("--max-megapixels", default=100.0, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="Skip larger images (decompression bombs); JPEGs count after reduced decoding.")  # fmt: skip
@click.option("--json", "as_json", is_flag=True, help="One JSON object per image: path and labels with probabilities.")
def classify(
    paths: tuple[str, ...],
    labels: str | None,
    labels_file: str | None,
    templates: tuple[str, ...],
    top: int,
    model_name: str | None,
    device: str,
    max_megapixels: float,
    as_json: bool,
) -> None:
    """Zero-shot classify images (files, or folders searched recursively) into the given labels.

    Each label goes through the prompt templates ("a photo of a {}."), the text embeddings are averaged
    per label, and each image gets the softmax over 100 x its cosine to every label: the top labels are
    printed with their probabilities. SigLIP models score each label on its own instead, as they were
    trained to: sigmoid(scale x cosine + bias), a match probability per label that need not sum to 1 over
    the labels (said on stderr, and as "scoring" in --json). Files that cannot be read, or are larger than
    --max-megapixels, are reported and skipped. For a large collection, `clipsearch index` it and run
    `clipsearch tag`, which reuses the stored vectors.

    \b
    Examples:
      clipsearch classify photo.jpg --labels "cat,dog,car"
      clipsearch classify ./photos --labels-file labels.txt --top 1 --json
      clipsearch classify ./scans --labels "map,letter,photo" --max-megapixels 400
      clipsearch classify ./shapes --labels "red,green,blue" --template "a photo of a {} circle" --model shapes-mini
    """
    import torch
    from tqdm import tqdm

    from indexer.walk import walk
    from retrieval.errors import ImageLoadError
    from retrieval.model.encode import encode_images, encode_texts
    from retrieval.model.loading import load_model
    from retrieval.model.preprocess import open_image
    from retrieval.zeroshot import build_classifier, model_scoring

    label_list = _labels(labels, labels_file)
    template_list = _templates(templates)
    model, preprocess = load_model(model_name, device=device)
    scale, bias = model_scoring(model)
    classifier = build_classifier(label_list, lambda texts: encode_texts(model, texts), template_list, scale, bias)
    top = min(top, len(label_list))
    if classifier.scoring == "sigmoid" and not as_json:
        click.echo(
            f"probabilities are independent per label: sigmoid({scale:.2f} x cosine {bias:+.2f}), the model's "
            "learned SigLIP scale and bias; they need not sum to 1",
            err=True,
        )

    found = list(walk(paths))
    failed = 0
    width = max((len(click.format_filename(f.path)) for f in found), default=0)
    # tqdm.write prints each line above the bar (shown on a terminal only), so the two do not interleave.
    with tqdm(total=len(found), unit="img", desc="classifying", file=sys.stderr, disable=None, leave=False) as bar:
        for start in range(0, len(found), _BATCH):
            batch, pixels = [], []
            for item in found[start : start + _BATCH]:
                try:
                    if item.error is not None:
                        raise ImageLoadError(item.error)
                    with open_image(item.path) as image:
                        pixels.append(preprocess.transform(preprocess.decode(image, max_megapixels)))
                    batch.append(item.path)
                except ImageLoadError as e:
                    failed += 1
                    _report_failure(item.path, str(e), as_json)
            if batch:
                predictions = classifier.predict(encode_images(model, torch.stack(pixels)), top)  # [B] top labels
                for path, predicted in zip(batch, predictions, strict=True):
                    tqdm.write(_line(path, predicted, width, as_json, classifier.scoring), file=sys.stdout)
            bar.update(len(found[start : start + _BATCH]))
    if not found:
        click.echo("No image files found.", err=True)
    if failed and failed == len(found):
        raise SystemExit(1)  # nothing could be classified
    if failed:
        logger.warning("%d of %d files could not be classified", failed, len(found))


def _line(path: str, predicted: list[Prediction], width: int, as_json: bool, scoring: str) -> str:
    """One image's output: aligned `path  label p  label p ...`, or a JSON object (with how p was scored)."""
    if as_json:
        labels_out = [{"label": p.label, "probability": round(p.probability, 6)} for p in predicted]
        return json.dumps({"path": path, "labels": labels_out, "scoring": scoring}, ensure_ascii=False)
    shown = "  ".join(f"{p.label} {p.probability:.3f}" for p in predicted)
    return f"{click.format_filename(path):<{width}}  {shown}"


def _report_failure(path: str, reason: str, as_json: bool) -> None:
    """One line on stderr for a file that could not be read (a JSON object with --json)."""
    reason = reason.removeprefix(f"{path}: ")  # decoding errors start with the path, which is said already
    if as_json:
        click.echo(json.dumps({"path": path, "error": reason}, ensure_ascii=False), err=True)
    else:
        click.echo(f"{click.format_filename(path)}: skipped: {reason}", err=True)


@click.command("tag")
@click.option("--labels", "label_groups", multiple=True, help=_GROUPS_HELP)
@click.option("--labels-file", default=None, type=click.Path(exists=True, dir_okay=False), help="Labels, one a line.")
@click.option("--template", "templates", multiple=True, help=_TEMPLATE_HELP)
@click.option("--top", default=1, show_default=True, type=click.IntRange(min=1), help="Labels kept per group.")
@click.option("--concept", default=None, metavar="NAME",
              help="Tag with a learned concept instead: yes/no in a column named after it (or --column).")  # fmt: skip
@click.option(
    "--column", default=None, help="Column to write the labels into [default: labels, or the concept's name]."
)
@click.option("--db", "db_dir", envvar="CLIPSEARCH_HOME", default=None, type=click.Path(file_okay=False), help=_DB_HELP)
@click.option("--model", "model_name", envvar="CLIPSEARCH_MODEL", default=None,
              help="Model name or checkpoint path [env CLIPSEARCH_MODEL; default: the store's model].")  # fmt: skip
@click.option("--device", default="auto", show_default=True, help='"auto", "cpu", "cuda", "mps".')
@click.option("--lock-wait", default=10.0, show_default=True, type=click.FloatRange(min=0),
              help="Seconds to wait for a running `clipsearch index` on the same store.")  # fmt: skip
@click.option("--json", "as_json", is_flag=True, help="Print a summary as one JSON object.")
def tag(
    label_groups: tuple[str, ...],
    labels_file: str | None,
    templates: tuple[str, ...],
    top: int,
    concept: str | None,
    column: str | None,
    db_dir: str | None,
    model_name: str | None,
    device: str,
    lock_wait: float,
    as_json: bool,
) -> None:
    """Label every stored image by zero-shot classification and save the labels in a column.

    The stored vectors are used as they are (no image is read again). Each image gets the --top most
    probable labels of each --labels group, comma-separated ("red,circle"), in the column (default
    `labels`), which `clipsearch query --where` can filter on. Running it again replaces the labels; images
    indexed later have none until the next run.

    \b
    Examples:
      clipsearch tag --labels "cat,dog,car,beach,mountain"
      clipsearch tag --labels "red,green,blue,yellow" --labels "circle,square,star" --model shapes-mini
      clipsearch query "a shape" --where "labels LIKE '%red%'"
      clipsearch tag --concept rex && clipsearch query "on a beach" --where "rex = 'yes'"
    """
    from clipsearch.library import default_model_for
    from indexer.lock import IndexLock
    from retrieval.model.encode import encode_texts
    from retrieval.model.loading import load_model
    from retrieval.store import Store
    from retrieval.zeroshot import build_classifier, model_scoring, parse_labels, read_labels_file, tag_store

    if concept is not None:
        if label_groups or labels_file is not None:
            raise click.UsageError("give either --concept or --labels/--labels-file, not both")
        _tag_concept(concept, column, db_dir, model_name, device, lock_wait, as_json)
        return
    column = column or "labels"
    if label_groups and labels_file is not None:
        raise click.UsageError("give either --labels or --labels-file, not both")
    if not label_groups and labels_file is None:
        raise click.UsageError('give the labels: --labels "cat,dog,car" (repeatable) or --labels-file FILE')
    groups = [parse_labels(g) for g in label_groups] if label_groups else [read_labels_file(labels_file)]
    template_list = _templates(templates)
    model, _ = load_model(model_name or default_model_for(db_dir), device=device, towers="text")
    store = Store.open(db_dir, model.info)
    scale, bias = model_scoring(model)
    classifiers = [
        build_classifier(g, lambda texts: encode_texts(model, texts), template_list, scale, bias) for g in groups
    ]
    lock = IndexLock(store.path / f"{store.table_name}.lock")  # the indexer's: no `index` writes meanwhile
    lock.acquire(wait=lock_wait)
    try:
        count = tag_store(store, classifiers, top=top, column=column, progress=not as_json)
    finally:
        lock.release()
    if as_json:
        click.echo(json.dumps({"tagged": count, "column": column, "db": str(store.path), "model": model.info.name}))
    else:
        click.echo(f"Tagged {count} images: column {column!r} in {store.path} (model {model.info.name}).")
        click.echo(f"Filter with: clipsearch query TEXT --where \"{column} LIKE '%{groups[0][0]}%'\"")


def _tag_concept(
    name: str, column: str | None, db_dir: str | None, model_name: str | None, device: str, lock_wait: float,
    as_json: bool,
) -> None:  # fmt: skip
    """`tag --concept`: yes/no for every stored image in the concept's column."""
    from clipsearch.library import Library
    from indexer.lock import IndexLock
    from retrieval.concepts import ConceptBook, tag_concept

    store = Library(db=db_dir, model=model_name, device=device).store()
    concept = ConceptBook(store).get(name)
    column = column or concept.name
    lock = IndexLock(store.path / f"{store.table_name}.lock")  # the indexer's: no `index` writes meanwhile
    lock.acquire(wait=lock_wait)
    try:
        count, shown = tag_concept(store, concept, column)
    finally:
        lock.release()
    if as_json:
        click.echo(json.dumps({"tagged": count, "yes": shown, "column": column, "db": str(store.path)}))
    else:
        click.echo(f"Tagged {count} images: {shown} show @{name} (column {column!r} in {store.path}).")
        click.echo(f"Filter with: clipsearch query TEXT --where \"{column} = 'yes'\"")

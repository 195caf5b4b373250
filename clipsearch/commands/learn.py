"""`clipsearch learn` (a personal concept from example images) and `clipsearch concepts` (list, `rm`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

_DB_HELP = "Store directory [env CLIPSEARCH_HOME; default ~/.local/share/clipsearch]."
_MODEL_HELP = "Model name or checkpoint path [env CLIPSEARCH_MODEL; default: the store's model]."


def _library(db: Path | None, model: str | None) -> Any:
    """The `Library` for the options (imported here, so `clipsearch --help` stays fast)."""
    from clipsearch.library import Library

    return Library(db=db, model=model, text_precision="float32")


def _accuracy(value: float | None) -> str:
    """A held-out accuracy for people."""
    return "n/a (too few examples to hold any out)" if value is None else f"{value:.3f}"


def _record(concept: Any) -> dict[str, Any]:
    """A concept as one JSON object (without its vectors)."""
    params = {k: v for k, v in concept.params.items() if k not in ("prompt", "background")}
    return {
        "name": concept.name,
        "method": concept.method,
        "model": concept.model.name,
        "accuracy": concept.accuracy,
        "seed": concept.seed,
        "examples": len(concept.example_ids),
        "params": params,
        "created_at": concept.created_at.isoformat(),
    }


@click.command("learn")
@click.argument("name", required=False)
@click.option("-p", "--positive", "positives", multiple=True,
              help="An image (stored or not) or a folder showing the concept; repeat for more.")  # fmt: skip
@click.option("-x", "--negative", "negatives", multiple=True,
              help="An image or folder NOT showing it; repeat. Default: sampled from the store.")  # fmt: skip
@click.option("--method", type=click.Choice(["probe", "coop", "auto"]), default="auto", show_default=True,
              help="Linear probe, CoOp prompt context, or whichever has the better held-out accuracy.")  # fmt: skip
@click.option("--classes", type=click.Path(exists=True, file_okay=False), default=None,
              help="Instead of NAME: one concept per sub-folder, each against the other sub-folders.")  # fmt: skip
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the sampling, split and training.")
@click.option("--n-ctx", default=4, show_default=True, type=click.IntRange(min=1), help="CoOp context vectors.")
@click.option("--steps", default=200, show_default=True, type=click.IntRange(min=1), help="CoOp training steps.")
@click.option("--model", envvar="CLIPSEARCH_MODEL", default=None, help=_MODEL_HELP)
@click.option("--db", type=click.Path(file_okay=False, path_type=Path), envvar="CLIPSEARCH_HOME", help=_DB_HELP)
@click.option("--json", "as_json", is_flag=True, help="Print the concept as one JSON object.")
def learn(
    name: str | None,
    positives: tuple[str, ...],
    negatives: tuple[str, ...],
    method: str,
    classes: str | None,
    seed: int,
    n_ctx: int,
    steps: int,
    model: str | None,
    db: Path | None,
    as_json: bool,
) -> None:
    """Learn a personal concept NAME ("our dog Rex") from a few example images, then query it as @NAME.

    Examples may be images already indexed (their stored vectors are used), other image files (embedded
    now) or folders. Without --negative, 4 negatives per positive (at least 32) are drawn at random from the
    store with --seed, never among the positives. A linear probe (logistic regression on the image vectors)
    or CoOp (4 learned prompt vectors in front of NAME, through the frozen text encoder) is trained on the
    stored vectors in seconds; --method auto keeps the one with the better held-out accuracy, which is
    printed and stored with the concept. Learning NAME again replaces it.

    \b
    Examples:
      clipsearch learn rex -p ./photos/rex/ -p ./new/rex_beach.jpg
      clipsearch learn grandmas_kitchen -p ./kitchen/ -x ./other_kitchens/ --method probe
      clipsearch learn --classes ./family/        # ./family/rex/, ./family/bella/, ... -> @rex, @bella, ...
      clipsearch query @rex
      clipsearch query @rex + "on a beach" - indoors
    """
    if classes is not None:
        if name is not None or positives or negatives:
            raise click.UsageError(
                "--classes learns one concept per sub-folder: give no NAME, --positive or --negative"
            )
        for concept in _library(db, model).learn_classes(classes, method, seed=seed, n_ctx=n_ctx, steps=steps):
            _report(concept, seed, as_json)
        return
    if name is None or not positives:
        raise click.UsageError("give a NAME and at least one --positive image or folder (or --classes DIR)")
    concept = _library(db, model).learn(name, positives, negatives, method, seed=seed, n_ctx=n_ctx, steps=steps)
    _report(concept, seed, as_json)


def _report(concept: Any, seed: int, as_json: bool) -> None:
    """What was learned, with the held-out accuracy (and both methods' for auto)."""
    if as_json:
        click.echo(json.dumps(_record(concept), ensure_ascii=False))
        return
    candidates = concept.params.get("candidates")
    compared = ""
    if candidates:
        compared = " (" + ", ".join(f"{k} {_accuracy(v)}" for k, v in candidates.items()) + f"; kept {concept.method})"
    click.echo(
        f"Learned @{concept.name} by {concept.method} from {concept.params['positives']} positive and "
        f"{concept.params['negatives']} negative examples ({concept.params['negatives_from']}, seed {seed})."
    )
    click.echo(f"Held-out accuracy: {_accuracy(concept.accuracy)}{compared}")
    click.echo(f'Try: clipsearch query @{concept.name}   or   clipsearch query @{concept.name} + "on a beach"')


@click.group("concepts", invoke_without_command=True)
@click.option("--model", envvar="CLIPSEARCH_MODEL", default=None, help=_MODEL_HELP)
@click.option("--db", type=click.Path(file_okay=False, path_type=Path), envvar="CLIPSEARCH_HOME", help=_DB_HELP)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per concept.")
@click.pass_context
def concepts(ctx: click.Context, model: str | None, db: Path | None, as_json: bool) -> None:
    """List the concepts learned with the model, or remove one with `rm NAME`.

    \b
    Examples:
      clipsearch concepts
      clipsearch concepts rm rex
    """
    ctx.obj = {"model": model, "db": db}
    if ctx.invoked_subcommand is not None:
        return
    learned = _library(db, model).concepts()
    if as_json:
        for concept in learned:
            click.echo(json.dumps(_record(concept), ensure_ascii=False))
        return
    if not learned:
        click.echo("no concepts yet; learn one with: clipsearch learn NAME --positive PATH", err=True)
        return
    click.echo(f"{'name':<20}  {'method':<6}  {'accuracy':>8}  {'examples':>8}  created")
    for concept in learned:
        accuracy = "-" if concept.accuracy is None else f"{concept.accuracy:.3f}"
        created = concept.created_at.strftime("%Y-%m-%d %H:%M")
        examples = concept.params.get("positives", len(concept.example_ids))
        click.echo(f"{concept.name:<20}  {concept.method:<6}  {accuracy:>8}  {examples:>8}  {created}")


@concepts.command("rm")
@click.argument("name")
@click.option("--model", envvar="CLIPSEARCH_MODEL", default=None, help=_MODEL_HELP)
@click.option("--db", type=click.Path(file_okay=False, path_type=Path), envvar="CLIPSEARCH_HOME", help=_DB_HELP)
@click.pass_context
def rm(ctx: click.Context, name: str, model: str | None, db: Path | None) -> None:
    """Remove the concept NAME."""
    _library(db or ctx.obj["db"], model or ctx.obj["model"]).forget(name)
    click.echo(f"Removed @{name}.")

"""`clipsearch duplicates`: groups of near-identical images in the store."""

from __future__ import annotations

import json
from pathlib import Path

import click

from clipsearch.commands.query import _json_safe, _shown


@click.command("duplicates")
@click.option(
    "--threshold",
    type=click.FloatRange(0.0, 1.0, min_open=True),
    metavar="S",
    help="Cosine at or above which two images are duplicates [default: 0.96, chosen with shapes-mini].",
)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per group and line.")
@click.option("--model", envvar="CLIPSEARCH_MODEL", help="Model name or checkpoint path [env CLIPSEARCH_MODEL].")
@click.option(
    "--db",
    type=click.Path(file_okay=False, path_type=Path),
    envvar="CLIPSEARCH_HOME",
    help="Store directory [env CLIPSEARCH_HOME; default ~/.local/share/clipsearch].",
)
def duplicates(threshold: float | None, as_json: bool, model: str | None, db: Path | None) -> None:
    """Find groups of near-identical images: exact copies, re-encodes, resizes, light crops, burst frames.

    Each group starts with its best pick, the one to keep: the largest picture (pixel count), then the oldest
    capture time, then the shortest path. The others follow, with their cosine to it.

    \b
    Examples:
      clipsearch duplicates
      clipsearch duplicates --threshold 0.98 --json | jq -r '.members[1:][].path'
    """
    from clipsearch.library import Library

    groups = Library(db=db, model=model, text_precision="float32").duplicates(threshold)
    for number, group in enumerate(groups, start=1):
        if as_json:
            click.echo(
                json.dumps({key: _json_safe(value) for key, value in group.to_dict().items()}, ensure_ascii=False)
            )
            continue
        click.echo(f"group {number} ({len(group.members)} images)")
        for member in group.members:
            size = f"{member.width}x{member.height}" if member.width and member.height else "?"
            mark = "best" if member is group.best else f"{member.similarity:.3f}"
            click.echo(f"  {mark:>6}  {size:>11}  {_shown(member.path)}")
    if not groups:
        click.echo("no duplicates", err=True)

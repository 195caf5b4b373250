"""`clipsearch models`: the named models and whether their weights are on this machine."""

from __future__ import annotations

import json
from typing import Any

import click

from retrieval.model.download import cache_dir, cached_path
from retrieval.model.files import CONFIG_FILE
from retrieval.model.registry import available_models, default_model_name, get_spec


def _model_row(name: str, default: str) -> dict[str, Any]:
    """One registry entry's status: bundled (or missing), cached or not cached, with its size on disk."""
    spec = get_spec(name)
    if spec.bundled:
        present = (spec.path / CONFIG_FILE).is_file()
        status, path = ("bundled" if present else "missing"), spec.path
        size = sum(p.stat().st_size for p in spec.path.iterdir() if p.is_file()) if present else None
    else:
        path = cached_path(spec)
        present = path.is_file()
        status, size = ("cached" if present else "not cached"), (path.stat().st_size if present else None)
    return {
        "name": name,
        "status": status,
        "size_bytes": size,
        "path": str(path),
        "default": name == default,
        "description": spec.description,
    }


def _human_size(size: int | None) -> str:
    """Bytes as a short human string ("338 MB"); "-" when unknown."""
    if size is None:
        return "-"
    for unit in ("B", "KB", "MB"):
        if size < 1000:
            return f"{size:.0f} {unit}"
        size /= 1000
    return f"{size:.1f} GB"


@click.command("models")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per model and line, for scripts.")
def models(as_json: bool) -> None:
    """List the named models and whether their weights are on this machine.

    A model that is not cached is downloaded the first time it is used (into $CLIPSEARCH_CACHE, default
    ~/.cache/clipsearch); "bundled" models ship with clipsearch and work offline. The default model (*) is
    $CLIPSEARCH_MODEL, else ViT-B/32. Any checkpoint file or folder can be used in place of a name.

    \b
    Examples:
      clipsearch models
      clipsearch models --json | jq -r 'select(.status == "cached") | .name'
      CLIPSEARCH_MODEL=shapes-mini clipsearch query "a red circle"
    """
    default = default_model_name()
    rows = [_model_row(name, default) for name in available_models()]
    if as_json:
        for row in rows:
            click.echo(json.dumps(row))
        return
    name_width = max(len(row["name"]) for row in rows) + 2
    click.echo(f"{'NAME':<{name_width}} {'STATUS':<11} {'SIZE':>8}  DESCRIPTION")
    for row in rows:
        name = ("*" if row["default"] else " ") + row["name"]
        status = click.style(f"{row['status']:<11}", fg="green" if row["status"] in ("cached", "bundled") else None)
        click.echo(f"{name:<{name_width}} {status} {_human_size(row['size_bytes']):>8}  {row['description']}")
    if default not in available_models():
        click.echo(f"\ndefault model: {default} (from CLIPSEARCH_MODEL)")
    click.echo(f"\ndownloads go to {cache_dir()}")

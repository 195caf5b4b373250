"""`clipsearch models`: the named models to choose from, their published accuracy, speed and cache status."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click

from retrieval.model.download import cache_dir, cached_path
from retrieval.model.files import CONFIG_FILE
from retrieval.model.hub import hub_folder, is_cached
from retrieval.model.registry import ModelSpec, available_models, default_model_name, get_spec

# Where the registry's speed figures were measured (`benchmarks/encode_speed.py --families`, ONNX Runtime fp32).
SPEED_MACHINE = "a 2-core Intel Xeon (AVX-512, VNNI, AMX) in ONNX Runtime"


def _model_row(name: str, default: str) -> dict[str, Any]:
    """One registry entry: what it is, its published accuracy, and whether its weights are here."""
    spec = get_spec(name)
    if spec.bundled:
        present = (spec.path / CONFIG_FILE).is_file()
        status, path = ("bundled" if present else "missing"), spec.path
        size = _folder_size(spec.path) if present else None
    elif spec.on_hub:
        path = hub_folder(spec)
        present = is_cached(spec)
        status, size = ("cached" if present else "not cached"), (_folder_size(path) if present else None)
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
        "family": spec.family,
        "embed_dim": spec.embed_dim,
        "download_mb": spec.download_mb,
        "flickr_t2i_r1": spec.flickr_t2i_r1,
        "flickr_source": spec.flickr_source or None,
        "speed_vs_vit_b32": spec.speed_vs_vit_b32,
        "speed_measured_here": False,
    }


def _folder_size(folder: Path) -> int:
    """Bytes in a folder's files."""
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())


def _speeds(specs: list[ModelSpec]) -> dict[str, float]:
    """Image-encoding speed of each model's architecture relative to ViT-B/32, measured now in ONNX Runtime (random
    weights)."""
    from retrieval.model.config import PRESETS
    from retrieval.model.speed import REFERENCE, image_encode_rate

    measurable = [s for s in specs if s.arch in PRESETS]
    # The exports of random weights are of no use afterwards: they go to a folder deleted at the end.
    with (
        tempfile.TemporaryDirectory(prefix="clipsearch-bench-") as exports,
        _environ("CLIPSEARCH_EXPORTS", exports),
        click.progressbar(
            length=len(measurable) + 1, label="measuring image encoding", file=click.get_text_stream("stderr")
        ) as bar,
    ):
        reference = image_encode_rate(PRESETS[REFERENCE])
        bar.update(1)
        speeds = {}
        for spec in measurable:
            speeds[spec.name] = image_encode_rate(PRESETS[spec.arch]) / reference
            bar.update(1)
    return speeds


@contextlib.contextmanager
def _environ(name: str, value: str) -> Iterator[None]:
    """Set an environment variable for the duration of the block."""
    before = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if before is None:
            del os.environ[name]
        else:
            os.environ[name] = before


def _cell(value: Any, fmt: str) -> str:
    """A table cell; "-" for an unknown value."""
    return "-" if value is None else format(value, fmt)


@click.command("models")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per model and line, for scripts.")
@click.option(
    "--bench",
    is_flag=True,
    help="Measure each architecture's image-encoding speed on this machine in ONNX Runtime, relative to ViT-B/32 "
    "(random weights, nothing downloaded; takes several minutes).",
)
def models(as_json: bool, bench: bool) -> None:
    """List the named models to choose from: family, embedding size, download size, published zero-shot
    Flickr30k text-to-image recall@1, image-encoding speed and whether the weights are on this machine.

    A model that is not cached is downloaded the first time it is used (into $CLIPSEARCH_CACHE, default
    ~/.cache/clipsearch); "bundled" models ship with clipsearch and work offline. The default model (*) is
    $CLIPSEARCH_MODEL, else MobileCLIP2-S0; a store goes on with the model that filled it. Any checkpoint file or
    folder can be used in place of a name.

    \b
    Examples:
      clipsearch models
      clipsearch models --bench
      clipsearch models --json | jq -r 'select(.status == "cached") | .name'
      CLIPSEARCH_MODEL=shapes-mini clipsearch query "a red circle"
    """
    default = default_model_name()
    names = available_models()
    rows = [_model_row(name, default) for name in names]
    if bench:
        speeds = _speeds([get_spec(name) for name in names])
        for row in rows:
            row["speed_vs_vit_b32"] = speeds.get(row["name"])
            row["speed_measured_here"] = row["speed_vs_vit_b32"] is not None
    if as_json:
        for row in rows:
            click.echo(json.dumps(row))
        return
    name_width = max(len(row["name"]) for row in rows) + 2
    family_width = max(len("FAMILY"), *(len(row["family"]) for row in rows))
    click.echo(
        f"{'NAME':<{name_width}} {'FAMILY':<{family_width}} {'DIM':>5} {'DOWNLOAD':>9} {'FLICKR_T2I_R@1':>15} "
        f"{'SPEED':>6}  STATUS"
    )
    for row in rows:
        name = ("*" if row["default"] else " ") + row["name"]
        download = "-" if row["download_mb"] is None else f"{row['download_mb']:.0f} MB"
        status = click.style(row["status"], fg="green" if row["status"] in ("cached", "bundled") else None)
        click.echo(
            f"{name:<{name_width}} {row['family']:<{family_width}} {_cell(row['embed_dim'], 'd'):>5} {download:>9} "
            f"{_cell(row['flickr_t2i_r1'], '.1f'):>15} {_cell(row['speed_vs_vit_b32'], '.2f'):>6}  {status}"
        )
    sources = sorted({row["flickr_source"] for row in rows if row["flickr_source"]})
    click.echo(f"\nFLICKR_T2I_R@1: published zero-shot Flickr30k text->image recall@1 (%), from {'; '.join(sources)}")
    where = "this machine" if bench else f"{SPEED_MACHINE}; measure with --bench for this machine"
    click.echo(f"SPEED: image encoding, images/s relative to ViT-B/32 (2.00 = twice as fast), on {where}")
    why = (
        "from CLIPSEARCH_MODEL"
        if os.environ.get("CLIPSEARCH_MODEL")
        else "the highest FLICKR_T2I_R@1 among models no slower than ViT-B/32"
    )
    click.echo(
        f"default (*): {default} ({why}); a store goes on with the model that filled it; choose another with "
        "--model NAME or CLIPSEARCH_MODEL=NAME"
    )
    click.echo(f"downloads go to {cache_dir()}")

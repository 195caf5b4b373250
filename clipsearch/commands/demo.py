"""`clipsearch demo`: the whole loop offline — generate captioned images, index them, query them."""

from __future__ import annotations

from pathlib import Path

import click

DEMO_SEED = 2026  # any seed works; one that training never saw keeps the demo honest


@click.command()
@click.option(
    "--dir",
    "directory",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("clipsearch-demo"),
    show_default=True,
    help="Where the images and the store go.",
)
@click.option("--images", default=60, show_default=True, type=click.IntRange(min=1), help="Images to generate.")
@click.option("-n", "--top", default=3, show_default=True, type=click.IntRange(min=1), help="Results per query.")
@click.option(
    "--query", "queries", multiple=True, help="A query to run (repeatable); default: three scenes that are in the set."
)
@click.option("--serve", "serve_after", is_flag=True,
              help="Then browse the demo in a web browser: serve its store (needs the `serve` extra).")  # fmt: skip
@click.option("--open", "open_browser", is_flag=True, help="With --serve: open the page in the default web browser.")
@click.option("--port", default=8765, show_default=True, type=click.IntRange(1, 65535), help="With --serve: the port.")
@click.pass_context
def demo(
    ctx: click.Context,
    directory: Path,
    images: int,
    top: int,
    queries: tuple[str, ...],
    serve_after: bool,
    open_browser: bool,
    port: int,
) -> None:
    """Run clipsearch end to end with no network, on generated pictures of shapes.

    Writes captioned images of coloured shapes into DIR/images, indexes them with the bundled
    `shapes-mini` model into DIR/db, and runs text queries, printing each hit beside the caption
    its image was generated from. shapes-mini knows only such generated shapes: it is a demo and
    test model, not a photo model (use the default, MobileCLIP2-S0, for photos). With --serve it then serves the demo's
    store as `clipsearch serve` does, on 127.0.0.1 only, until Ctrl-C.

    \b
    Examples:
      clipsearch demo
      clipsearch demo --query "a small red circle" --query "a blue star"
      clipsearch query --db clipsearch-demo/db --model shapes-mini "a purple heart"
      clipsearch demo --serve --open          # then search the demo in your web browser
    """
    if open_browser and not serve_after:
        raise click.UsageError("--open opens the served page: pass --serve too")
    from clipsearch.library import Library
    from retrieval.shapes import generate

    image_dir = directory / "images"
    click.echo(f"Generating {images} captioned images in {image_dir} ...", err=True)
    samples = generate(image_dir, images, DEMO_SEED, progress=True)
    captions = {str(Path(s.path).resolve()): s.caption for s in samples}

    library = Library(db=directory / "db", model="shapes-mini")
    summary = library.index([image_dir])
    click.echo(f"Indexed {summary.indexed} new, {summary.unchanged} unchanged, {summary.failed} failed.", err=True)

    examples = _example_queries(samples, count=4)
    queries = queries or tuple(examples[:3])
    for text in queries:
        click.echo(f'\nquery: "{text}"')
        for hit in library.search(text, k=top):
            caption = captions.get(str(Path(hit.path).resolve()), "")
            click.echo(f"  {hit.rank:>2}  {hit.score:.3f}  {Path(hit.path).name:<12}  {caption}")
    # a scene the set holds and the queries above did not show
    suggestion = next((q for q in reversed(examples) if q not in queries), examples[0] if examples else "a red circle")
    click.echo(f'\nTry: clipsearch query --db {directory / "db"} --model shapes-mini "{suggestion}"', err=True)
    if serve_after:
        from clipsearch.commands.serve import serve

        ctx.invoke(serve, db=directory / "db", model="shapes-mini", port=port, open_browser=open_browser)


def _example_queries(samples: list, count: int = 3) -> list[str]:
    """Queries describing single-object scenes of different colours that the generated set holds."""
    queries, colours = [], set()
    for sample in samples:
        scene = sample.attributes
        if scene.second is None and scene.colour not in colours:
            colours.add(scene.colour)
            queries.append(f"a {scene.size} {scene.colour} {scene.shape}")
        if len(queries) == count:
            break
    return queries

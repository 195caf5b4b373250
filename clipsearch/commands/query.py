"""`clipsearch query` (text, image or combined queries) and `clipsearch similar` (image to image).

Imports here stay light: the library, the model and FAISS load inside the commands, and a text query
builds only the model's text tower, so a query starts fast.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from datetime import date, datetime
from pathlib import Path
from typing import Any

import click

DATE_FORMATS = ["%Y-%m-%d", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%d %H:%M:%S"]
INDEX_TYPES = ("flat", "hnsw", "ivf", "ivfpq", "ivfpq-disk")
# A term with a negative weight, `-0.5:night` (see `retrieval.query.WEIGHT_PREFIX`), which click would read as
# short options (`-0`, ..., `-n ight`).
_NEGATIVE_WEIGHT = re.compile(r"-(?:\d+(?:\.\d*)?|\.\d+):")
_ESCAPE = "\x00"
# What a table or --plain line escapes in a path: C0 and C1 controls, and the Unicode line/paragraph separators.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


class TermsCommand(click.Command):
    """A command whose arguments may be terms with a negative weight (`-0.5:night`).

    Such tokens are marked before click parses them and unmarked by `terms_from`. A token that is the value
    of an option (`--threshold -0.5`, `-n -1`) is left alone, so click parses or refuses it as that option's
    value; after `--` nothing needs marking. `+` and a lone `-` need nothing: click passes them as arguments.
    """

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        takes = {
            name: param.nargs
            for param in self.get_params(ctx)
            if isinstance(param, click.Option) and not (param.is_flag or param.count)
            for name in param.opts
        }
        marked: list[str] = []
        values_due, options_ended = 0, False
        for arg in args:
            if values_due:
                values_due -= 1
            elif options_ended or arg == "--":
                options_ended = True
            elif _NEGATIVE_WEIGHT.match(arg):
                arg = _ESCAPE + arg
            else:
                values_due = _values_after(arg, takes)
            marked.append(arg)
        return super().parse_args(ctx, marked)


def _values_after(arg: str, takes: dict[str, int]) -> int:
    """How many of the next arguments click takes as option values after `arg` (`--top`, `-n`, `-fn`: 1)."""
    if arg.startswith("--"):
        return 0 if "=" in arg else takes.get(arg, 0)
    if not arg.startswith("-"):
        return 0
    for end, char in enumerate(arg[1:], start=2):  # a cluster of short options, read as click reads it
        nargs = takes.get("-" + char, 0)
        if nargs:
            return nargs - (end < len(arg))  # in `-n5` the value is attached
    return 0


def terms_from(arguments: Sequence[str]) -> list[str]:
    """The query terms as typed (undoing `TermsCommand`'s marks)."""
    return [arg.removeprefix(_ESCAPE) for arg in arguments]


class ThresholdType(click.ParamType):
    """A cosine (negative ones too) or "auto"."""

    name = "threshold"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float | str:
        if isinstance(value, float) or value == "auto":
            return value
        try:
            number = float(value)
        except (TypeError, ValueError):
            self.fail(
                f"{value!r} is neither a number nor 'auto'; e.g. --threshold 0.25 or --threshold auto", param, ctx
            )
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number; e.g. --threshold 0.25", param, ctx)
        return number


THRESHOLD = ThresholdType()


def _common_options(command: Any) -> Any:
    """The options `query` and `similar` share: result count, filters, output format, model and store."""
    options = [
        click.option("-n", "-t", "--top", default=10, show_default=True, type=click.IntRange(min=1), help="Results."),
        click.option(
            "--in", "in_dir", type=click.Path(file_okay=False, path_type=Path), help="Only images under this folder."
        ),
        click.option(
            "--after",
            type=click.DateTime(DATE_FORMATS),
            metavar="DATE",
            help="Only images taken at or after DATE (EXIF, YYYY-MM-DD).",
        ),
        click.option(
            "--before",
            type=click.DateTime(DATE_FORMATS),
            metavar="DATE",
            help="Only images taken before DATE (EXIF, YYYY-MM-DD).",
        ),
        click.option(
            "--where", metavar="SQL", help="SQL filter on any column (LanceDB syntax), e.g. \"format = 'PNG'\"."
        ),
        click.option(
            "--threshold",
            type=THRESHOLD,
            metavar="S|auto",
            help="Drop results with a cosine similarity below S; 'auto': a cutoff for this query from the model's "
            "calibration (text queries), printing 'no good match' when nothing fits.",
        ),
        click.option("--show-weak", is_flag=True, help="Also show the results below the threshold, marked weak."),
        click.option(
            "--sort",
            type=click.Choice(("score", "date")),
            default="score",
            show_default=True,
            help="Order of the results: best first, or by EXIF capture time (oldest first, undated last).",
        ),
        click.option(
            "--collapse-duplicates", is_flag=True, help="Show each group of near-duplicates as its best member only."
        ),
        click.option("--json", "as_json", is_flag=True, help="One JSON object per result and line."),
        click.option("--plain", is_flag=True, help="score<TAB>path per result, no header."),
        click.option(
            "-f", "--paths", "paths_only", is_flag=True, help="Only the paths, one per line (for xargs -d '\\n')."
        ),
        click.option(
            "-0", "--null", is_flag=True, help="Only the paths, each ended by a NUL byte (for xargs -0): any name."
        ),
        click.option(
            "--index",
            "index_type",
            type=click.Choice(INDEX_TYPES),
            help="Force the nearest-neighbour index type (default: by collection size).",
        ),
        click.option(
            "--model", envvar="CLIPSEARCH_MODEL", help="Model name or checkpoint path [env CLIPSEARCH_MODEL]."
        ),
        click.option(
            "--precision",
            type=click.Choice(["float32", "int8"]),
            default="float32",
            show_default=True,
            help="The encoders' precision the images were indexed with (`index --precision`).",
        ),
        click.option(
            "--db",
            type=click.Path(file_okay=False, path_type=Path),
            envvar="CLIPSEARCH_HOME",
            help="Store directory [env CLIPSEARCH_HOME; default ~/.local/share/clipsearch].",
        ),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _json_safe(value: Any) -> Any:
    """A metadata value as JSON: timestamps in ISO 8601, bytes as hex, NaN as null."""
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if hasattr(value, "tolist"):  # numpy scalars and arrays
        return value.tolist()
    return value


def _shown(path: str) -> str:
    """A path for a line of text: control characters (a newline in a file name) escaped as repr() does."""
    return _CONTROL.sub(lambda match: repr(match.group())[1:-1], path)


def _print_results(results: Sequence[Any], output: str, show_weak: bool = False, cut: bool = False) -> None:
    """Print as a table (rank, score, path), score<TAB>path lines, JSON lines, or bare paths.

    With `show_weak` the table gains a `weak` column and JSON records a "weak" key; with `cut` (a threshold was
    given) a search without a result above it says "no good match" on stderr.
    """
    if output in ("paths", "null"):
        end = "\0" if output == "null" else "\n"
        for result in results:
            click.echo(result.path + end, nl=False)
    elif output == "json":
        for result in results:
            record = {"rank": result.rank, "score": round(result.score, 6), "path": result.path}
            if show_weak:
                record["weak"] = result.weak
            record.update({key: _json_safe(value) for key, value in result.metadata.items()})
            click.echo(json.dumps(record, ensure_ascii=False))
    elif output == "plain":
        for result in results:
            click.echo(f"{result.score:.3f}\t{_shown(result.path)}")
    elif results:
        weak_column = f"  {'weak':<4}" if show_weak else ""
        click.echo(f"{'rank':>4}  {'score':>6}{weak_column}  path")
        for result in results:
            mark = f"  {'weak' if result.weak else '':<4}" if show_weak else ""
            click.echo(f"{result.rank:>4}  {result.score:>6.3f}{mark}  {_shown(result.path)}")
    if cut and not any(not result.weak for result in results):
        click.echo("no good match", err=True)
    elif not results and output == "table":
        click.echo("no results", err=True)


def _library(db: Path | None, model: str | None, index_type: str | None, precision: str = "float32") -> Any:
    """The `Library` for the options (imported here, so `clipsearch --help` stays fast).

    A command runs one query: converting the text tower to bfloat16 would cost more than it saves.
    """
    from clipsearch.library import Library

    return Library(db=db, model=model, index_type=index_type, text_precision="float32", precision=precision)


def _output(as_json: bool, plain: bool, paths_only: bool, null: bool) -> str:
    """The output format the flags ask for: "table", "json", "plain", "paths" or "null" (--paths may join -0)."""
    given = [name for name, on in (("--json", as_json), ("--plain", plain), ("--paths", paths_only)) if on]
    if null:
        given = [name for name in given if name != "--paths"] + ["--null"]
    if len(given) > 1:
        raise click.UsageError(f"{given[0]} and {given[1]} cannot be used together; choose one output format")
    return given[0].removeprefix("--") if given else "table"


@click.command("query", cls=TermsCommand)
@click.argument("terms", nargs=-1, required=True)
@click.option("--ensemble", is_flag=True, help="Average each text over CLIP's 80 prompt templates.")
@_common_options
def query(
    terms: tuple[str, ...],
    ensemble: bool,
    top: int,
    in_dir: Path | None,
    after: datetime | None,
    before: datetime | None,
    where: str | None,
    threshold: float | str | None,
    show_weak: bool,
    sort: str,
    collapse_duplicates: bool,
    as_json: bool,
    plain: bool,
    paths_only: bool,
    null: bool,
    index_type: str | None,
    model: str | None,
    precision: str,
    db: Path | None,
) -> None:
    """Find images by describing them, by example images, or by a weighted mix of both.

    TERMS are texts or image files (an existing file with an image extension is an image). Join terms
    with + and - (subtract); weight a term with W:term, where W is a number and the term starts with a
    letter or names an image ("2:golden retriever", "-0.5:night"); any other colon is text, so
    "16:9 screenshot" is searched as written. Words not separated by + or - form one text. Options may
    come anywhere, and take negative values ("--threshold -0.2"); after -- every argument is a term.

    Output: a table (control characters in paths, such as a newline, shown escaped as \\n), or --plain
    score<TAB>path lines, --json, -f/--paths one path a line, -0/--null NUL-ended paths for any file name.

    \b
    Examples:
      clipsearch query "a photo of a dog"
      clipsearch query "2:golden retriever" + ./pool.jpg - "night"
      clipsearch query sunset --in ~/Pictures/2023 --after 2023-06-01 -t 20
      clipsearch query "a red car" --where "width >= 1920" --threshold 0.25 --json
      clipsearch query "a red circle" --threshold auto --sort date --collapse-duplicates
      clipsearch query cat --plain
      clipsearch query cat -f | xargs -d '\\n' feh
      clipsearch query cat -0 | xargs -0 feh
      clipsearch query @rex + "on a beach" - indoors     # @rex: a concept from `clipsearch learn`
    """
    from retrieval.query import parse_terms

    output = _output(as_json, plain, paths_only, null)
    parsed = parse_terms(terms_from(terms))
    library = _library(db, model, index_type, precision)
    results = library.search(
        parsed,
        k=top,
        where=where,
        in_dir=in_dir,
        after=after,
        before=before,
        threshold=threshold,
        ensemble=ensemble,
        metadata=output == "json",  # the other formats need no metadata, so a query may skip opening the store
        show_weak=show_weak,
        sort=sort,
        collapse_duplicates=collapse_duplicates,
    )
    _print_results(results, output, show_weak, cut=threshold is not None)


@click.command("similar")
@click.argument("path", type=click.Path(dir_okay=False))  # a str: Path() would fold the // of a URL
@click.option("--concept", metavar="NAME", help="Add a learned concept to the image, as `query PATH + @NAME`.")
@click.option("--box", metavar="X0,Y0,X1,Y1",
              help="Search by this region of the image only: fractions of its width and height, e.g. 0.5,0,1,0.5 "
              "for the top right quarter.")  # fmt: skip
@_common_options
def similar(
    path: str,
    concept: str | None,
    box: str | None,
    top: int,
    in_dir: Path | None,
    after: datetime | None,
    before: datetime | None,
    where: str | None,
    threshold: float | str | None,
    show_weak: bool,
    sort: str,
    collapse_duplicates: bool,
    as_json: bool,
    plain: bool,
    paths_only: bool,
    null: bool,
    index_type: str | None,
    model: str | None,
    precision: str,
    db: Path | None,
) -> None:
    """Find the images most like the image at PATH, indexed or not (an indexed PATH is left out).

    Output formats as for `clipsearch query`: a table, --plain, --json, -f/--paths, -0/--null.

    \b
    Examples:
      clipsearch similar ./photos/beach.jpg
      clipsearch similar ~/Downloads/sofa.png -n 5 --json
      clipsearch similar ./photos/beach.jpg -t 3 -0 | xargs -0 cp -t ./picked/
      clipsearch similar ./photos/beach.jpg --concept rex
      clipsearch similar ./photos/street.jpg --box 0.6,0.1,0.8,0.3   # like the sign in its top right
    """
    output = _output(as_json, plain, paths_only, null)
    library = _library(db, model, index_type, precision)
    results = library.similar(
        path,
        k=top,
        where=where,
        in_dir=in_dir,
        after=after,
        before=before,
        threshold=threshold,
        show_weak=show_weak,
        sort=sort,
        collapse_duplicates=collapse_duplicates,
        concept=concept,
        box=box,
    )
    _print_results(results, output, show_weak, cut=threshold is not None)

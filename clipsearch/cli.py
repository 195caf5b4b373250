"""The `clipsearch` command line. Each command lives in `clipsearch/commands/` and is imported only when run."""

from __future__ import annotations

import importlib
import logging
import sys

import click

from clipsearch._version import __version__
from retrieval.errors import ClipsearchError

# command name -> "module:attribute"; importing lazily keeps `clipsearch query` from loading the indexer.
COMMANDS = {
    "demo": "clipsearch.commands.demo:demo",
    "models": "clipsearch.commands.models:models",
    "index": "clipsearch.commands.index:index",
    "status": "clipsearch.commands.index:status",
    "query": "clipsearch.commands.query:query",
    "similar": "clipsearch.commands.query:similar",
    "serve": "clipsearch.commands.serve:serve",
    "train": "clipsearch.commands.train:train",
    "classify": "clipsearch.commands.classify:classify",
    "tag": "clipsearch.commands.classify:tag",
    "duplicates": "clipsearch.commands.duplicates:duplicates",
    "learn": "clipsearch.commands.learn:learn",
    "concepts": "clipsearch.commands.learn:concepts",
}


class ProgressSafeHandler(logging.Handler):
    """Writes log lines to stderr through tqdm, which clears a progress bar first and redraws it after, so a
    line never lands at the end of the bar's."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:
            self.handleError(record)


class LazyGroup(click.Group):
    """A group that imports a command's module only when that command is asked for."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = COMMANDS.get(cmd_name)
        if target is None:
            return None
        module_name, attr = target.split(":")
        return getattr(importlib.import_module(module_name), attr)

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except ClipsearchError as e:
            raise click.ClickException(str(e)) from e


@click.group(cls=LazyGroup)
@click.version_option(__version__, prog_name="clipsearch")
@click.option("-v", "--verbose", count=True, help="Log more (-v info, -vv debug) to stderr.")
def cli(verbose: int) -> None:
    """Local semantic image search with CLIP.

    \b
    Examples:
      clipsearch demo                      # offline demo with the bundled shapes-mini model
      clipsearch index ./photos
      clipsearch query "a photo of a dog"
      clipsearch similar ./photos/beach.jpg
    """
    level = logging.WARNING - 10 * min(verbose, 2)
    handler = ProgressSafeHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level, handlers=[handler])


def main() -> None:
    cli(prog_name="clipsearch")

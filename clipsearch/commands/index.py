"""`clipsearch index` and `clipsearch status`: keep a store in sync with photo folders, and report on it."""

from __future__ import annotations

import functools
import json
import os
import signal
import threading
from collections.abc import Callable
from datetime import datetime
from typing import TYPE_CHECKING, Any, NoReturn

import click

from indexer.options import default_workers

if TYPE_CHECKING:
    from indexer.summary import IndexSummary
    from retrieval.store import Store

_DB_HELP = "Store directory [env CLIPSEARCH_HOME; default ~/.local/share/clipsearch]."
_SHOWN_FAILURES = 20


class _Terminated(KeyboardInterrupt):
    """SIGTERM (a plain `kill`), raised where Ctrl-C raises KeyboardInterrupt, so the run stops the same way."""


def _raise_terminated(signum: int, frame: Any) -> None:
    raise _Terminated


def _interrupted(error: KeyboardInterrupt, saved: int) -> NoReturn:
    """End the command with one line on what the interrupted run saved, and the shell's status for the signal."""
    images = "image" if saved == 1 else "images"
    click.echo(f"Interrupted: {saved} {images} saved; run the same command again to carry on.", err=True)
    raise SystemExit(128 + (signal.SIGTERM if isinstance(error, _Terminated) else signal.SIGINT))


def _saved_by_this_process(store: Store) -> int:
    """Rows committed by this process's latest run into `store`, as the run recorded them."""
    runs = [run for run in store.state.runs() if run.get("pid") == os.getpid()]
    return int(runs[-1].get("saved", 0)) if runs else 0


def _stops_like_ctrl_c(command: Callable[..., None]) -> Callable[..., None]:
    """Run `command` with SIGTERM handled as Ctrl-C: the run commits what it has encoded, then the command ends
    with one line saying so instead of click's bare "Aborted!"."""

    @functools.wraps(command)
    def run(*args: Any, **kwargs: Any) -> None:
        if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
            command(*args, **kwargs)
            return
        previous = signal.signal(signal.SIGTERM, _raise_terminated)
        try:
            command(*args, **kwargs)
        except KeyboardInterrupt as e:  # before the run began: nothing saved
            _interrupted(e, 0)
        finally:
            signal.signal(signal.SIGTERM, previous)

    return run


class _Source(click.ParamType):
    """A folder or file that must exist, or a URI (`s3://...`, `file://...`), passed on as text."""

    name = "source"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        from indexer.sources import is_uri

        text = os.fsdecode(value)
        if is_uri(text):
            return text
        return click.Path(exists=True, path_type=str).convert(text, param, ctx)


@click.command("index")
@click.argument("folders", nargs=-1, required=True, type=_Source(), metavar="SOURCE...")
@click.option("--db", "db_dir", envvar="CLIPSEARCH_HOME", default=None, type=click.Path(file_okay=False), help=_DB_HELP)
@click.option("--model", "model_name", envvar="CLIPSEARCH_MODEL", default=None,
              help="Model name or checkpoint path [env CLIPSEARCH_MODEL; default MobileCLIP2-S0].")  # fmt: skip
@click.option("--device", default="auto", show_default=True, help='"auto", "cpu", "cuda", "cuda:1", "mps".')
@click.option("--precision", type=click.Choice(["float32", "int8"]), default="float32", show_default=True,
              help="int8: dynamically quantised encoders (CPU, ~1.7x faster; vectors in a table of their own, so "
              "queries pass the same --precision).")  # fmt: skip
@click.option("--runtime", type=click.Choice(["auto", "onnx", "torch"]), default="auto", show_default=True,
              help="Where the encoder runs: auto is ONNX Runtime on a CPU (exported once, cached), "
              "torch on a GPU.")  # fmt: skip
@click.option("--workers", default=None, type=click.IntRange(min=0),
              help=f"Decoder processes; 0 decodes in this process [default: {default_workers()} here].")  # fmt: skip
@click.option(
    "--batch-size", default=32, show_default=True, type=click.IntRange(min=1), help="Images per encoder call."
)
@click.option("--exclude", multiple=True, metavar="GLOB", help="Skip files/folders whose name or relative path match.")
@click.option("--max-megapixels", default=100.0, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="Refuse larger images (decompression bombs); JPEGs count after reduced decoding.")  # fmt: skip
@click.option("--commit-every", default=256, show_default=True, type=click.IntRange(min=1),
              help="Images per store commit; an interruption loses at most this many.")  # fmt: skip
@click.option("--commit-seconds", default=10.0, show_default=True, type=click.FloatRange(min=0),
              help="Commit at least this often.")  # fmt: skip
@click.option("--lock-wait", default=10.0, show_default=True, type=click.FloatRange(min=0),
              help="Seconds to wait for another `index` on the same store to finish.")  # fmt: skip
@click.option("--views", default=None, type=click.IntRange(min=0), metavar="N",
              help="Also embed N overlapping crops per image (5: 2x2 grid + centre, 10: 3x3 + centre), so queries find "
              "small things in big photos; 0 for none. A store keeps the setting it was started with "
              "[default: the store's, else 0].")  # fmt: skip
@click.option("--retry-failed", is_flag=True,
              help="Read files that failed before again, even when they have not changed since.")  # fmt: skip
@click.option("--strict", is_flag=True,
              help="Exit with status 1 when any file failed (in this run, or before and unchanged since).")  # fmt: skip
@click.option(
    "--engine",
    type=click.Choice(["local", "ray"]),
    default="local",
    show_default=True,
    help="local: decoder processes and the model on this machine. ray: decode tasks and encoder actors on a Ray "
    "cluster (pip install 'clipsearch[distributed]'); SOURCE may then be a URI or a manifest (Parquet/CSV/JSONL).",
)
@click.option("--ray-address", default=None, metavar="ADDR",
              help="With --engine ray: the cluster to join (auto, ray://HEAD:10001) [default: start one].")  # fmt: skip
@click.option("--actors", default=None, type=click.IntRange(min=1),
              help="With --engine ray: encoder actors (one GPU each where there are GPUs) [default: 1].")  # fmt: skip
@click.option("--json", "as_json", is_flag=True, help="Print the summary as one JSON object.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@_stops_like_ctrl_c
def index(
    folders: tuple[str, ...],
    db_dir: str | None,
    model_name: str | None,
    device: str,
    precision: str,
    runtime: str,
    workers: int | None,
    batch_size: int,
    exclude: tuple[str, ...],
    max_megapixels: float,
    commit_every: int,
    commit_seconds: float,
    lock_wait: float,
    views: int | None,
    retry_failed: bool,
    strict: bool,
    engine: str,
    ray_address: str | None,
    actors: int | None,
    as_json: bool,
    quiet: bool,
) -> None:
    """Index the images under SOURCE (folders or files) into the store, or bring the store up to date with them.

    New and changed files are embedded; unchanged files are skipped without being read; moved or renamed
    files keep their vectors; files deleted from FOLDERS leave the store. A file that cannot be read is
    recorded (see `clipsearch status`) and skipped; later runs skip it too until it changes (or with
    --retry-failed). Interrupting (Ctrl-C, or `kill`) is safe: the images encoded so far are saved; run the
    same command again to carry on.

    Without --model, a store that holds one model's images goes on with that model; a new store uses
    $CLIPSEARCH_MODEL, else MobileCLIP2-S0.

    \b
    Examples:
      clipsearch index ./photos
      clipsearch index ~/Pictures /mnt/nas/photos --exclude '*/thumbnails/*' --workers 4
      clipsearch index ./photos --model shapes-mini --db ./demo-store --json
      clipsearch index ./photos --views 5     # small objects: also index 5 crops of each photo
      clipsearch index s3://bucket/photos manifest.parquet --engine ray --ray-address auto --actors 4
      clipsearch index ./photos --precision int8   # faster on a CPU; query with --precision int8
    """
    from retrieval.catalog import default_db_dir
    from retrieval.model.registry import check_model_name

    if model_name is not None:
        check_model_name(model_name)  # a typo fails now, not after seconds of imports
    else:
        from clipsearch.library import default_model_for

        model_name = default_model_for(db_dir or default_db_dir())  # the store's own model, as `query` does
    if views is not None:
        from retrieval.regions import view_boxes

        view_boxes(views)  # a count that is no grid fails now, not after loading the model
    _check_engine_options(folders, engine, ray_address, actors, workers, device)
    if engine == "ray" and (precision != "float32" or runtime == "onnx"):
        raise click.UsageError("--precision and --runtime onnx work with the local engine; the Ray engine runs torch")
    if engine == "ray":
        from indexer.ray_engine import import_ray

        import_ray()  # a missing extra fails now, not after loading the model
    workers = default_workers() if workers is None else workers
    from indexer.options import IndexOptions

    options = IndexOptions(
        workers=workers,
        batch_size=batch_size,
        max_megapixels=max_megapixels,
        exclude=exclude,
        commit_every=commit_every,
        commit_seconds=commit_seconds,
        lock_wait=lock_wait,
        retry_failed=retry_failed,
        views=views,
        progress=not (quiet or as_json),
    )
    if engine == "local":
        # Before the workers, the model and LanceDB: an unchanged folder then costs about its walk (the shortcut
        # knows float32 tables only).
        unchanged = None
        if precision == "float32":
            from indexer.unchanged import finish_if_unchanged

            unchanged = finish_if_unchanged(folders, db_dir or default_db_dir(), model_name, options)
        if unchanged is not None:
            store_line = (unchanged.db, unchanged.table, unchanged.model, unchanged.total)
            _report(unchanged.summary, folders, as_json, strict, *store_line)
            return
        if workers:
            from indexer.workers import start_worker_server

            start_worker_server()  # the decoder workers' server boots while this process loads the model
    from indexer.pipeline import index_folders
    from retrieval.model.encode import no_gpu_visible, open_export_of
    from retrieval.store import Store

    encoder = None
    on_cpu = device == "cpu" or (device == "auto" and no_gpu_visible())
    if engine == "local" and (runtime == "onnx" or (runtime == "auto" and on_cpu)):
        # A fresh export runs without torch or the weights: ~500 MB and seconds of start-up less (issue 14).
        encoder = open_export_of(model_name, "image", precision)
    if encoder is not None:
        from retrieval.model.preprocess import Preprocess

        model, preprocess = None, Preprocess.from_info(encoder.info)
    else:
        from retrieval.model.encode import choose_encoder
        from retrieval.model.loading import load_model

        # the Ray engine's actors take the model to their own GPUs
        model, preprocess = load_model(model_name, device="cpu" if engine == "ray" else device, towers="image")
        encoder = choose_encoder(model, "image", precision, runtime) if engine == "local" else model
        if encoder is not model:
            from retrieval.model.loading import forget

            # The ONNX Runtime session holds its own copy of the weights: torch's (~350 MB for ViT-B/32) go before
            # decoding starts, so a first run (the one that exports) peaks lower too.
            forget(model)
            model = None
    store = Store.open(db_dir, encoder.info, create=True)
    try:
        if engine == "ray":
            from indexer.ray_engine import RayOptions, index_with_ray

            ray_options = RayOptions(address=ray_address, actors=actors or 1, model_source=model_name)
            summary = index_with_ray(folders, model, preprocess, store, options, ray_options)
        else:
            summary = index_folders(folders, encoder, preprocess, store, options)
    except KeyboardInterrupt as e:  # the run has committed what it had encoded
        _interrupted(e, _saved_by_this_process(store))
    _report(summary, folders, as_json, strict, store.path, store.table_name, encoder.info.name, store.count())


def _report(
    summary: IndexSummary, folders: tuple[str, ...], as_json: bool, strict: bool, db: Any, table: str, model: str,
    total: int,
) -> None:  # fmt: skip
    """Print a run's summary and the store's size (or the JSON object of both); exit 1 under --strict on failures."""
    if as_json:
        out = summary.to_dict()
        out.update(db=str(db), table=table, model=model, total=total)
        click.echo(json.dumps(out, ensure_ascii=False, default=str))
    else:
        _echo_summary(summary, folders)
        click.echo(f"Store: {db} ({_count(total, 'image')}, model {model})")
    if strict and (summary.failed or summary.failed_unchanged):
        raise SystemExit(1)


def _check_engine_options(
    sources: tuple[str, ...], engine: str, address: str | None, actors: int | None, workers: int | None, device: str
) -> None:
    """Refuse options of the other engine, and sources only the Ray engine reads."""
    if engine == "ray":
        if workers is not None:
            raise click.UsageError("--workers is for --engine local; with --engine ray, decoding runs as Ray tasks")
        if device != "auto":
            raise click.UsageError("--device is for --engine local; Ray's encoder actors use a GPU where they have one")
        return
    if address is not None or actors is not None:
        raise click.UsageError("--ray-address and --actors need --engine ray")
    from indexer.sources import is_manifest, is_uri

    special = [s for s in sources if is_uri(s) or is_manifest(s)]
    if special:
        raise click.UsageError(f"{special[0]} is a URI or a manifest: index it with --engine ray")


@click.command("status")
@click.option("--db", "db_dir", envvar="CLIPSEARCH_HOME", default=None, type=click.Path(file_okay=False), help=_DB_HELP)
@click.option("--model", "model_name", default=None, help="Only the table of this model name.")
@click.option("--json", "as_json", is_flag=True, help="Print the status as one JSON object.")
def status(db_dir: str | None, model_name: str | None, as_json: bool) -> None:
    """Show what the store holds: per model, the image count, whether indexing finished, the state of the
    search (FAISS) index, the sub-views (`index --views N`) and their index, the last run, and the files that
    failed with the reason.

    \b
    Examples:
      clipsearch status
      clipsearch status --json | jq '.models[].failures[] | .path'
    """
    from indexer.status import store_status

    report = store_status(db_dir, model_name)
    if as_json:
        click.echo(json.dumps(report, ensure_ascii=False, default=str))
        return
    click.echo(f"Store: {report['db']}")
    for entry in report["models"]:
        model = entry["model"]
        click.echo(
            f"\nModel: {model['name']} (weights {model['weights_sha256'][:12]}, {model['embed_dim']}-d, "
            f"{model['image_size']} px), table {entry['table']}"
        )
        click.echo(f"Images: {entry['count']}")
        click.echo(f"State: {_state_text(entry)}")
        click.echo(f"Search index: {_ann_text(entry['ann'])}")
        if entry["views"] is not None:
            views = entry["views"]
            click.echo(
                f"Views: {views['count']} ({views['layout']} per image, --views {views['layout']}); "
                f"their search index: {_ann_text(views['index'])}"
            )
        run = entry["last_run"]
        if run is not None:
            click.echo(
                f"Last run: {_when(run.get('updated_at'))}, {run['state']}: {run.get('indexed', 0)} indexed, "
                f"{run.get('unchanged', 0)} unchanged, {run.get('moved', 0)} moved, {run.get('removed', 0)} removed, "
                f"{run.get('failed', 0)} failed; folders: {', '.join(run.get('roots', []))}"
            )
        _echo_failures(entry["failures"])


def _count(n: int, noun: str) -> str:
    """ "1 image", "2 images"."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _echo_summary(s: IndexSummary, folders: tuple[str, ...]) -> None:
    """What an index run did, its new failures, and a hint where the run found nothing or skipped failures."""
    failed = f"{s.failed} failed" + (f", {s.failed_unchanged} failed before (skipped)" if s.failed_unchanged else "")
    click.echo(
        f"Indexed {_count(s.indexed, 'image')} ({s.new} new, {s.changed} changed, {s.duplicates} duplicates; "
        f"{s.encoded} encoded), {s.unchanged} unchanged, {s.moved} moved, {s.removed} removed, "
        f"{failed} in {s.seconds:.1f} s."
    )
    if s.unsupported:
        from indexer.formats import describe_unsupported

        click.echo(describe_unsupported(s.unsupported))
    if s.found == 0:
        click.echo(
            f"No image files found in {', '.join(folders)}: clipsearch indexes JPEG, PNG, WebP, GIF, BMP and TIFF "
            "files (and others Pillow reads) in these folders and their sub-folders, except hidden folders."
        )
    _echo_failures([f.to_dict() for f in s.failures])
    if s.failed_unchanged:
        click.echo(
            f"Skipped {_count(s.failed_unchanged, 'file')} that failed before and did not change since "
            "(`clipsearch status` lists the failures; --retry-failed reads them again)."
        )


def _state_text(entry: dict[str, Any]) -> str:
    """The index state in words, with what to do about it."""
    state = entry["state"]
    if state == "indexing":
        return f"indexing now (pid {entry['indexing_pid']})"
    if state == "interrupted":
        return "interrupted; run `clipsearch index` on the same folders again to finish"
    return state


def _ann_text(ann: dict[str, Any]) -> str:
    """The FAISS index state in words."""
    if not ann["built"]:
        return "not built yet (the next `clipsearch index` or query builds it)"
    freshness = "up to date" if ann["up_to_date"] else "behind the store (the next query updates it)"
    return f"{ann['type']}, {ann['vectors']} vectors, {freshness}"


def _when(iso: str | None) -> str:
    """An ISO timestamp as local time, to the second."""
    if not iso:
        return "?"
    return datetime.fromisoformat(iso).astimezone().strftime("%Y-%m-%d %H:%M:%S")


def _echo_failures(failures: list[dict[str, Any]]) -> None:
    """The failed files with their reasons (the first few, and how many more)."""
    if not failures:
        return
    click.echo(f"Failed files ({len(failures)}):")
    for f in failures[:_SHOWN_FAILURES]:
        click.echo(f"  {f['path']!r}: {f['stage']}: {f['reason']}" if "\n" in f["path"] else
                   f"  {f['path']}: {f['stage']}: {f['reason']}")  # fmt: skip
    if len(failures) > _SHOWN_FAILURES:
        click.echo(f"  ... and {len(failures) - _SHOWN_FAILURES} more (clipsearch status --json lists all)")

"""An index run that finds nothing to do, finished before the model, the decoder workers, torch or LanceDB load.

`clipsearch index` calls `finish_if_unchanged` first. It takes the table's lock, and when the table's catalogue
copy (`retrieval.catalog`) still matches the table, walks the folders and compares them with it exactly as a full
run does (`indexer.sync.compare`, the first step of `plan_sync`). If no file is new, changed or gone, it records the
run in the state file as a full run would and returns the summary: an unchanged folder costs about the walk. In
every other case (no current copy, something to do, a model whose identity is not known before it loads, sub-views)
it returns None and the full run (`indexer.pipeline.index_folders`) does the work, reading the store itself.
Nothing on this path imports numpy, Pillow, pyarrow, LanceDB, torch or ONNX Runtime.
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from indexer.lock import IndexLock
from indexer.options import IndexOptions
from indexer.summary import STAGES, IndexSummary, record_run
from indexer.sync import compare
from indexer.walk import walk
from retrieval.catalog import catalog_model, load_catalog, table_fingerprint
from retrieval.errors import StoreWriteError
from retrieval.model.registry import known_identity
from retrieval.store_state import StoreState

if TYPE_CHECKING:
    from retrieval.model.identity import ModelInfo

logger = logging.getLogger(__name__)
# `retrieval.store.TABLE_PREFIX` (the store module imports pyarrow): image tables are `images_*`.
TABLE_PREFIX = "images_"


class Unchanged(NamedTuple):
    """A run that had nothing to do, with what the CLI prints about the store."""

    summary: IndexSummary
    db: Path  # the store directory, absolute
    table: str  # the model's table
    model: str  # the model's name as the table records it
    total: int  # images in the table


def finish_if_unchanged(
    roots: Sequence[str | os.PathLike[str]],
    db_dir: str | os.PathLike[str],
    model_name: str,
    options: IndexOptions,
) -> Unchanged | None:
    """Finish an index run without loading anything heavy, if the folders have not changed since the last run.

    Args:
        roots: folders (or image files) to index.
        db_dir: the store directory.
        model_name: the model to index with: a registry name or a checkpoint path (one whose identity is not known
            before it loads, `known_identity`, always takes the full run).
        options: the run's settings (exclude, retry_failed, views, lock_wait are used here).

    Returns:
        The run, recorded in the table's state file; None when the full run has to do it.

    Raises:
        StoreLockedError: another indexer holds the table's lock for longer than `options.lock_wait`.
    """
    start = time.perf_counter()
    identity = known_identity(model_name)
    if identity is None or options.views:
        return None
    db = Path(db_dir).expanduser().absolute()
    table = catalogued_table(db, identity)
    if table is None or (db / f"views_{table.removeprefix('images_')}.lance").exists():
        return None  # sub-views: the full run also clears views left by an interrupted run
    lock = IndexLock(db / f"{table}.lock")
    try:
        lock.acquire(wait=options.lock_wait)
    except StoreWriteError:  # a read-only store: the full run says what to do about it
        return None
    try:
        return _unchanged_run(roots, db, table, identity, options, start)
    finally:
        lock.release()


def _unchanged_run(
    roots: Sequence[str | os.PathLike[str]],
    db: Path,
    table: str,
    identity: tuple[str, str],
    options: IndexOptions,
    start: float,
) -> Unchanged | None:
    """The run under the table's lock: the plan against the catalogue copy, and its record when it is empty."""
    started = datetime.now(timezone.utc)
    loaded = load_catalog(db, table)
    if loaded is None:
        return None
    model, catalog = loaded
    if not _matches(model, identity) or not _index_is_current(db, table):
        return None
    absolute = [os.path.abspath(os.fsdecode(r)) for r in roots]
    unsupported: Counter[str] = Counter()
    found = list(walk(absolute, options.exclude, unsupported))
    state = StoreState(db / f"{table}.state.json")
    plan = compare(found, catalog, absolute, state.failures(), options.retry_failed)
    if plan.work or plan.vanished:
        logger.info("%d files to read, %d gone: a full run", len(plan.work), len(plan.vanished))
        return None
    summary = IndexSummary(
        found=len(found),
        unchanged=plan.unchanged,
        failed=len(plan.walk_failures),
        failed_unchanged=len(plan.failed_unchanged),
        failures=list(plan.walk_failures),
        unsupported=dict(sorted(unsupported.items())),
    )
    summary.seconds = time.perf_counter() - start
    summary.stage_seconds = {stage: round(summary.seconds if stage == "scan" else 0.0, 3) for stage in STAGES}
    record_run(
        state,
        summary,
        run_id=uuid.uuid4().hex,
        state="complete",
        roots=absolute,
        started=started,
        failures=list(plan.walk_failures),
        failed_unchanged=plan.failed_unchanged,
        saved=0,
    )
    logger.info("%d files found, all unchanged: done without loading the model", len(found))
    return Unchanged(summary, db, table, model.name, len(catalog.ids))


def catalogued_table(db: Path, identity: tuple[str, str]) -> str | None:
    """The table whose catalogue copy records the model (name, weights SHA-256) with float32 encoders, if any."""
    try:
        tables = sorted(p.name.removesuffix(".lance") for p in db.glob(f"{TABLE_PREFIX}*.lance") if p.is_dir())
    except OSError:
        return None
    for table in tables:
        model = catalog_model(db, table)
        if model is not None and _matches(model, identity):
            return table
    return None


def _matches(model: ModelInfo, identity: tuple[str, str]) -> bool:
    """Whether a recorded identity is the registry model's, at float32 (an int8 table is another model's)."""
    return (model.name, model.weights_sha256) == identity and getattr(model, "precision", "float32") == "float32"


def _index_is_current(db: Path, table: str) -> bool:
    """Whether the saved FAISS index (`retrieval.ann`) reflects the table as it is now, as a full run leaves it."""
    try:
        meta = json.loads((db / f"{table}.faiss.json").read_text())
    except (OSError, ValueError):
        return False
    fingerprint = table_fingerprint(db / f"{table}.lance")
    return isinstance(meta, dict) and fingerprint is not None and meta.get("fingerprint") == fingerprint

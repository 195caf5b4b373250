"""`index_folders`: walk, sync, decode in workers, encode in batches, commit to the store in chunks.

One image's path through it: `walk` finds the file; `plan_sync` sees it is new; a `DecoderPool` worker reads,
hashes, decodes and preprocesses it (`Decoder`); the main thread stacks it into a batch for
`encode_images`; the resulting row waits in the pending chunk until `Store.apply` commits the chunk; at the end
the FAISS index beside the store (`retrieval.ann.open_index`) takes in the new rows.

Crash safety: each chunk is one atomic LanceDB commit (new rows, updated rows, and the deletions that go
with them), preceded by a durable reservation of its new ids. A run killed at any point leaves the table as
of the last commit; the next run finds the already-committed files unchanged and carries on.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, NamedTuple

import numpy as np

from indexer.decode import Decoded, Decoder, DecodeResult, DecodeTask, Failed, Known
from indexer.lock import IndexLock
from indexer.options import IndexOptions
from indexer.pool import DecoderPool
from indexer.progress import Progress
from indexer.summary import STAGES, IndexSummary, record_run
from indexer.sync import Plan, WorkItem, plan_sync
from indexer.walk import Found, walk
from indexer.workers import start_worker_server
from retrieval.ann import open_index
from retrieval.catalog import remove_catalog, save_catalog, table_fingerprint
from retrieval.errors import StoreError, StoreWriteError
from retrieval.model.encode import Encoder, encode_images, runs_on_cpu
from retrieval.model.onnx_runtime import OnnxEncoder
from retrieval.model.preprocess import Preprocess
from retrieval.regions import view_boxes
from retrieval.store import ImageRow, Store, utc_now
from retrieval.store_state import Failure
from retrieval.types import ImageMetadata
from retrieval.views import ViewStore, check_views_setting, open_view_index

logger = logging.getLogger(__name__)


class _Pending(NamedTuple):
    """A row waiting for the next commit; `vector` None means "copy it from row `source_id`"."""

    id: int | None  # None: a new row, its id allocated at commit
    item: WorkItem
    metadata: ImageMetadata
    vector: np.ndarray | None
    source_id: int | None
    views: np.ndarray | None = None  # [V, D] its sub-views' vectors with `vector`; None: copied with the vector


class _BatchEntry(NamedTuple):
    """A decoded image waiting for the encoder, plus other files with the same content (same metadata)."""

    item: WorkItem
    metadata: ImageMetadata
    pixels: np.ndarray  # [S, S, 3] uint8 (`Decoded.pixels`)
    followers: list[WorkItem]
    views: np.ndarray | None = None  # [V, S, S, 3] uint8, its sub-views, when the run indexes them


def index_folders(
    roots: Sequence[str | os.PathLike[str]],
    model: Encoder,
    preprocess: Preprocess,
    store: Store,
    options: IndexOptions | None = None,
    decoder: Decoder | None = None,
) -> IndexSummary:
    """Bring `store` in line with the images under `roots`.

    Args:
        roots: folders (or image files) to index.
        model: what encodes the images (`choose_encoder`: the model's ONNX Runtime export on a CPU, or the
            torch model), with `.info` (its vectors must be the store's).
        preprocess: the model's preprocessing.
        store: the open store (`Store.open(..., create=True)`).
        options: run settings.
        decoder: what the workers run on each file; default `Decoder(preprocess, options.max_megapixels)`.
            Tests pass a subclass to inject faults.

    Returns:
        The run's counts, timings and failures.

    Raises:
        StoreLockedError: another indexer holds the table's lock for longer than `options.lock_wait`.
        StoreError: `options.views` differs from the setting the table was indexed with.
    """
    options = options or IndexOptions()
    if options.workers:
        start_worker_server()  # boots while the lock, the walk and the store's catalog are dealt with
    lock = IndexLock(store.path / f"{store.table_name}.lock")
    lock.acquire(wait=options.lock_wait)
    try:
        return _Run(roots, model, preprocess, store, options, decoder).run()
    finally:
        lock.release()


class _Run:
    """The state of one index run."""

    def __init__(
        self,
        roots: Sequence[str | os.PathLike[str]],
        model: Encoder,
        preprocess: Preprocess,
        store: Store,
        options: IndexOptions,
        decoder: Decoder | None,
    ) -> None:
        self.roots = [os.path.abspath(os.fsdecode(r)) for r in roots]
        self.exists: Callable[[str | bytes], bool] = os.path.exists  # whether a root or a stored file still exists
        self.model = model
        self.store = store
        self.options = options
        self.decoder = decoder or Decoder(preprocess, options.max_megapixels)
        self.summary = IndexSummary()
        self.stages = dict.fromkeys(STAGES, 0.0)
        self.pending: list[_Pending] = []
        self.pending_deletes: dict[int, str] = {}  # row id -> its content hash
        self.pending_by_hash: dict[str, _Pending] = {}
        self.batch: list[_BatchEntry] = []
        self.batch_by_hash: dict[str, _BatchEntry] = {}
        self.claimed: set[int] = set()
        self.saved = 0  # rows this run has committed (what an interrupted run leaves done)
        self.redo: list[WorkItem] = []
        self.failures: list[Failure] = []
        self.pool: DecoderPool | None = None  # the decoder workers while they run
        # A torch encoder on the CPU stalls when anything runs beside it, so the workers wait while it runs. ONNX
        # Runtime's (idle threads sleeping, `session_options`) does not, and the gaps between its ops and batches are
        # where the workers decode: holding them there cost 0.72x against 1.07x the single-process ORT reference
        # (64 photos, load 22); a GPU leaves them the CPU.
        self.pause_decoding = runs_on_cpu(model) and not isinstance(model, OnnxEncoder)
        self.run_id = uuid.uuid4().hex
        self.started = utc_now()
        self.last_commit = time.monotonic()
        self.bar: Progress | None = None
        self.views: ViewStore | None = None  # the sub-views table, when the table is indexed with views
        self.view_count = 0

    # ---- driving -------------------------------------------------------------------------------

    def run(self) -> IndexSummary:
        """Scan, process every work item, remove what vanished, record the run."""
        start = time.perf_counter()
        self.view_count = check_views_setting(self.store, self.options.views)
        if self.view_count:
            self.views = ViewStore.open(self.store, self.view_count)
            self.views.delete_orphans(self.store.ids())  # left by a run interrupted between its two writes
        unsupported: Counter[str] = Counter()
        found = self._list(unsupported)
        self.summary.unsupported = dict(sorted(unsupported.items()))
        self.store.add_missing_columns()  # a table from an older version: its rows get the new columns filled
        refresh = frozenset(self.store.missing_fingerprints().tolist())
        self.plan: Plan = plan_sync(
            found,
            self.store.catalog(),
            self.roots,
            self.store.state.failures(),
            self.options.retry_failed,
            refresh=refresh,
            exists=self.exists,
        )
        self.stages["scan"] = time.perf_counter() - start
        self.hash_to_ids = self.plan.hash_to_ids
        self.vanished_by_hash: dict[str, list[int]] = {}
        for row_id, content_hash in self.plan.vanished.items():
            self.vanished_by_hash.setdefault(content_hash, []).append(row_id)
        self.summary.found = len(found)
        self.summary.unchanged = self.plan.unchanged
        self.summary.failed_unchanged = len(self.plan.failed_unchanged)
        self.failures.extend(self.plan.walk_failures)
        logger.info(
            "%d files found: %d unchanged, %d to read, %d gone, %d failed before and unchanged",
            len(found),
            self.plan.unchanged,
            len(self.plan.work),
            len(self.plan.vanished),
            len(self.plan.failed_unchanged),
        )
        self._record("running")
        state = "interrupted"
        try:
            with Progress(
                total=len(self.plan.work),
                settle=2 * self.options.batch_size,  # two encoder batches: past the workers' start and a cold encoder
                unit="file",
                file=sys.stderr,
                disable=not (self.options.progress and self.plan.work),
                dynamic_ncols=True,
                desc="indexing",
            ) as self.bar:
                self._process(self.plan.work, check_known=True)
                if self.redo:  # content matched a row that has since been replaced: decode it after all
                    redo, self.redo = self.redo, []
                    self._process(redo, check_known=False)
                self._encode_batch()
                gone = {i: h for i, h in self.plan.vanished.items() if i not in self.claimed}
                self.summary.removed = len(gone)
                self.pending_deletes.update(gone)
                self._commit()
                self._show_counts(refresh=True)  # the last batch's files count too
            state = "complete"
        except BaseException as error:
            self._salvage(error)
            raise
        finally:
            self.summary.seconds = time.perf_counter() - start
            self.summary.failed = len(self.failures)
            self.summary.failures = list(self.failures)
            self.summary.stage_seconds = {k: round(v, 3) for k, v in self.stages.items()}
            try:
                self._record(state)
            except StoreError as e:
                if state == "complete":
                    raise
                logger.debug("could not record the run as %s: %s", state, e)  # the error under way says more
        write_start = time.perf_counter()
        if self.summary.commits > 1:
            self.store.optimize()
            if self.views is not None:
                self.views.optimize()
        self._save_catalog()
        self.stages["write"] += time.perf_counter() - write_start
        ann_start = time.perf_counter()
        open_index(self.store)  # brought up to date here, so the first query after indexing does not build it
        if self.views is not None:
            open_view_index(self.store)  # and the views' index likewise
        self.stages["ann"] = time.perf_counter() - ann_start
        self.summary.stage_seconds = {k: round(v, 3) for k, v in self.stages.items()}
        self.summary.seconds = time.perf_counter() - start
        return self.summary

    def _list(self, unsupported: Counter[str]) -> list[Found]:
        """The image files under the roots."""
        return list(walk(self.roots, self.options.exclude, unsupported))

    def _save_catalog(self) -> None:
        """Keep the copy of the table's catalogue that lets the next run with nothing to do skip LanceDB and the
        model (`retrieval.catalog`). A run killed before this leaves the old copy, which then no longer matches the
        table's fingerprint and is not used."""
        # Taken before the rows are read: a commit in between makes the copy stale, never wrong.
        fingerprint = table_fingerprint(self.store.path / f"{self.store.table_name}.lance")
        if fingerprint is None:
            return
        if len(self.store.missing_fingerprints()):  # rows the next run must read again (`plan_sync`'s refresh)
            remove_catalog(self.store.path, self.store.table_name)
            return
        try:
            save_catalog(
                self.store.path, self.store.table_name, fingerprint, self.store.model_info, self.store.catalog()
            )
        except OSError as e:  # only costs the next run its shortcut
            logger.warning("could not save the catalogue copy in %s (%s)", self.store.path, e.strerror or e)

    def _salvage(self, error: BaseException) -> None:
        """On Ctrl-C or an error, commit the rows already encoded so the work is not lost."""
        try:
            self._commit()
        except Exception as e:  # `error` matters more; the rerun redoes this chunk
            if isinstance(e, StoreWriteError) and isinstance(error, StoreWriteError):
                logger.debug("could not commit the last chunk either: %s", e)  # the same disk, which `error` names
            elif isinstance(e, StoreError):
                logger.warning("could not commit the last chunk (%s); the next run will redo it", e)
            else:
                logger.exception("could not commit the last chunk; the next run will redo it")

    def _process(self, items: list[WorkItem], check_known: bool) -> None:
        """Decode `items` (in workers or here) and feed the results to the batcher."""
        by_path = {item.path: item for item in items}
        tasks = (DecodeTask(i.path, check_known and not i.refresh and i.size in self.plan.stored_sizes) for i in items)
        decoder = dataclasses.replace(self.decoder, known=self.plan.known, views=self.view_count)
        with contextlib.closing(self._results(decoder, tasks, len(items))) as results:
            for task, result in results:
                self._step(by_path[task.path], result)

    def _step(self, item: WorkItem, result: DecodeResult) -> None:
        """Handle one result, then encode and commit when due."""
        self._handle(item, result)
        self.bar.update(1)
        self._show_counts(refresh=False)
        if len(self.batch) >= self.options.batch_size:
            self._encode_batch()
        self._commit_when_due()

    def _commit_when_due(self) -> None:
        """Commit once the chunk is full or the last commit is `commit_seconds` old."""
        waiting = self._waiting()
        if waiting >= self.options.commit_every or (
            waiting and time.monotonic() - self.last_commit >= self.options.commit_seconds
        ):
            self._commit()

    def _waiting(self) -> int:
        """Rows waiting for the next commit."""
        return len(self.pending)

    def _show_counts(self, refresh: bool) -> None:
        """The new / changed / unchanged / failed counts beside the progress bar."""
        self.bar.set_postfix(
            new=self.summary.new,
            changed=self.summary.changed,
            unchanged=self.summary.unchanged,
            failed=len(self.failures),
            refresh=refresh,
        )

    def _results(
        self, decoder: Decoder, tasks: Iterable[DecodeTask], n: int
    ) -> Iterator[tuple[DecodeTask, DecodeResult]]:
        """(task, result) pairs from worker processes, or from this process with `workers=0`."""
        waited = time.perf_counter()
        if self.options.workers == 0 or n == 0:
            for task in tasks:
                result = decoder(task)
                yield task, result
        else:
            workers = min(self.options.workers, n)
            with DecoderPool(
                decoder, workers, buffer=2 * self.options.batch_size + 8, timeout=self.options.decode_timeout
            ) as pool:
                self.pool = pool
                try:
                    for task, result in pool.imap_unordered(tasks):
                        self.stages["wait"] += time.perf_counter() - waited
                        yield task, result
                        waited = time.perf_counter()
                finally:
                    self.pool = None
                self.summary.worker_restarts += pool.restarts

    # ---- one file ------------------------------------------------------------------------------

    def _handle(self, item: WorkItem, result: DecodeResult) -> None:
        """Route one decode result: a failure, known content (no encoding), or pixels for the batch."""
        for note in getattr(result, "notes", ()):  # what the image libraries said about the file
            logger.debug("%s: %s", item.path, note)
        if isinstance(result, Failed):
            # info, not a warning: the summary lists every failure once, at the end
            logger.info("skipping %s: %s (%s)", item.path, result.reason, result.stage)
            self.failures.append(Failure(item.path, result.stage, result.reason, item.size, item.mtime_ns))
            return
        for stage, seconds in zip(("read", "decode", "transform"), result.seconds, strict=True):
            self.stages[stage] += seconds
        if isinstance(result, Known):
            # the worker stopped after hashing: metadata other than the hash is taken from the source row
            if not self._reuse(item, _partial_metadata(result.content_hash)):
                self.redo.append(item)
            return
        assert isinstance(result, Decoded)
        if self._reuse(item, result.metadata):
            return
        entry = _BatchEntry(item, result.metadata, result.pixels, [], result.views)
        self.batch.append(entry)
        self.batch_by_hash[result.metadata.content_hash] = entry

    def _reuse(self, item: WorkItem, metadata: ImageMetadata) -> bool:
        """Give `item` a vector already computed for the same content, if there is one: a touched file keeps
        its row, a moved file takes over its old row (same id), a copy gets a new row; nothing is encoded."""
        content_hash = metadata.content_hash
        if item.old_id is not None and content_hash == item.old_hash:
            self._stage(item.old_id, item, metadata, None, item.old_id)  # only size/mtime changed
            self.summary.unchanged += 1
            return True
        entry = self.batch_by_hash.get(content_hash)
        if entry is not None:
            entry.followers.append(item)
            return True
        moved = next((i for i in self.vanished_by_hash.get(content_hash, ()) if i not in self.claimed), None)
        if moved is not None:
            self.claimed.add(moved)
            self._stage(moved, item, metadata, None, moved)
            if item.old_id is not None:  # moved over a changed file: that file's old content is gone
                self.pending_deletes[item.old_id] = item.old_hash
            self.summary.moved += 1
            return True
        pending = self.pending_by_hash.get(content_hash)
        source = self.hash_to_ids.get(content_hash)
        if pending is None and not source:
            return False
        if pending is not None:  # same bytes, same metadata
            self._stage(None, item, pending.metadata, pending.vector, pending.source_id, pending.views)
        else:
            self._stage(None, item, metadata, None, min(source))
        self._replaces(item)
        self.summary.duplicates += 1
        self.summary.indexed += 1
        return True

    def _replaces(self, item: WorkItem) -> None:
        """Count a new or changed file, scheduling the deletion of a changed file's old row."""
        if item.old_id is None:
            self.summary.new += 1
        else:
            self.summary.changed += 1
            self.pending_deletes[item.old_id] = item.old_hash

    def _stage(
        self,
        row_id: int | None,
        item: WorkItem,
        metadata: ImageMetadata,
        vector: np.ndarray | None,
        source: int | None,
        views: np.ndarray | None = None,
    ) -> None:
        """Queue a row for the next commit."""
        pending = _Pending(row_id, item, metadata, vector, source, views)
        self.pending.append(pending)
        self.pending_by_hash.setdefault(metadata.content_hash, pending)

    # ---- encoding and committing ---------------------------------------------------------------

    def _encode_batch(self) -> None:
        """Run the batch through the image encoder and queue its rows (and their same-content followers)."""
        if not self.batch:
            return
        start = time.perf_counter()
        pixels = self.decoder.preprocess.normalize(np.stack([e.pixels for e in self.batch]))  # [B, 3, S, S]
        paused = self.pool.paused() if self.pool is not None and self.pause_decoding else contextlib.nullcontext()
        with paused:
            vectors = encode_images(self.model, pixels)  # [B, D]
            per_image: list[np.ndarray | None] = [None] * len(self.batch)
            if self.view_count:
                per_image = list(self._encode_views())
        self.stages["encode"] += time.perf_counter() - start
        self.summary.encoded += len(self.batch)
        for entry, vector, views in zip(self.batch, vectors, per_image, strict=True):
            self._stage(None, entry.item, entry.metadata, vector, None, views)
            self._replaces(entry.item)
            self.summary.indexed += 1
            for item in entry.followers:
                self._stage(None, item, entry.metadata, vector, None, views)
                self._replaces(item)
                self.summary.duplicates += 1
                self.summary.indexed += 1
        self.batch.clear()
        self.batch_by_hash.clear()

    def _encode_views(self) -> np.ndarray:
        """The batch's sub-views through the encoder, in batches of the usual size: [B, V, D]."""
        crops = np.concatenate([e.views for e in self.batch])  # [B * V, S, S, 3]
        step, normalize = self.options.batch_size, self.decoder.preprocess.normalize
        parts = [encode_images(self.model, normalize(crops[i : i + step])) for i in range(0, len(crops), step)]
        return np.concatenate(parts).reshape(len(self.batch), self.view_count, -1)

    def _commit(self) -> None:
        """Write the pending rows and deletions as one atomic commit, then record progress."""
        if not self._waiting() and not self.pending_deletes:
            return
        start = time.perf_counter()
        rows = self._pending_rows()
        written = self._write(rows)
        self.saved += len(written)
        if self.views is not None and self.pending_deletes:
            self.views.delete_for(sorted(self.pending_deletes))
        deleted = dict(self.pending_deletes)
        self.pending.clear()
        self.pending_deletes.clear()
        self.pending_by_hash.clear()
        for row_id, content_hash in deleted.items():
            self.hash_to_ids.get(content_hash, set()).discard(row_id)
        for row_id, content_hash in written:
            self.hash_to_ids.setdefault(content_hash, set()).add(row_id)
        self.summary.commits += 1
        self.stages["write"] += time.perf_counter() - start
        self.last_commit = time.monotonic()
        self._record("running")

    def _pending_rows(self) -> list[ImageRow]:
        """The pending rows as `ImageRow`s: new ones given ids, copies given their source row's vector and metadata."""
        # Ids are fixed before the write, so retrying a commit that was interrupted after LanceDB had applied it
        # (Ctrl-C inside `apply`) upserts the same rows again instead of adding them twice.
        new_ids = iter(self.store.allocate_ids(sum(p.id is None for p in self.pending)).tolist())
        self.pending = [p if p.id is not None else p._replace(id=next(new_ids)) for p in self.pending]
        sources = [p.source_id for p in self.pending if p.vector is None]
        source_rows = self.store.rows(sources, columns=["id", "vector", *_KEPT]) if sources else []
        by_source = {r["id"]: r for r in source_rows}
        now = utc_now()
        rows = []
        for p in self.pending:
            source = by_source.get(p.source_id) if p.vector is None else None
            metadata = _complete(p.metadata, source)
            vector = p.vector if p.vector is not None else source["vector"]
            rows.append(_row(p.id, p.item, metadata, vector, now))
        return rows

    def _write(self, rows: list[ImageRow]) -> list[tuple[int, str]]:
        """Upsert `rows` and delete the pending deletions in one commit; returns the (id, content hash) written."""
        if self.views is not None:
            self._write_views()  # first: a crash before the image rows land leaves views the next run deletes
        self.store.apply(rows, sorted(self.pending_deletes))
        return [(row.id, row.metadata.content_hash) for row in rows]

    def _write_views(self) -> None:
        """Store the sub-views of the chunk's new rows: encoded ones, or the views of the row a copy takes its
        vector from. Rows keeping their id (touched or moved files) keep their views."""
        assert self.views is not None
        new = [p for p in self.pending if p.source_id != p.id]
        sources = sorted({p.source_id for p in new if p.vector is None})
        stored = self.views.for_images(sources) if sources else {}
        ids, vectors = [], []
        for p in new:
            views = p.views if p.vector is not None else stored.get(p.source_id, (None, None))[1]
            if views is None:
                logger.warning("%s: the image it copies has no sub-views; it gets none", p.item.path)
                continue
            ids.append(p.id)
            vectors.append(views)
        boxes = np.asarray(view_boxes(self.view_count), np.float32)  # [V, 4]
        self.views.replace(ids, boxes, vectors)

    def _record(self, state: str) -> None:
        """Save the run's progress and the failure list in the store's state file."""
        record_run(
            self.store.state,
            self.summary,
            run_id=self.run_id,
            state=state,
            roots=self.roots,
            started=self.started,
            failures=self.failures,
            failed_unchanged=self.plan.failed_unchanged,
            saved=self.saved,
        )


# Metadata a moved or copied file takes from the row it reuses (its worker stopped after hashing).
_KEPT = ImageMetadata._fields[1:]


def _partial_metadata(content_hash: str) -> ImageMetadata:
    """Metadata known from the hash alone; the rest is filled from the source row at commit."""
    return ImageMetadata(content_hash, *(None for _ in _KEPT))


def _complete(metadata: ImageMetadata, source: dict[str, Any] | None) -> ImageMetadata:
    """Fill metadata the worker did not read from the row with the same content."""
    if source is None or metadata.format is not None:
        return metadata
    return metadata._replace(**{k: source[k] for k in _KEPT})


def _row(row_id: int, item: WorkItem, metadata: ImageMetadata, vector: np.ndarray, now: Any) -> ImageRow:
    """An `ImageRow` for the store."""
    return ImageRow(row_id, item.path, item.size, item.mtime_ns, metadata, now, np.asarray(vector, dtype=np.float32))

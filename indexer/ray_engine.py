"""`index_with_ray`: the local engine's run on a Ray cluster (`clipsearch index SOURCE... --engine ray`).

The steps are the local engine's (`indexer.pipeline`), and so is most of the code: the driver lists the sources and
plans the sync (`plan_sync`: new / changed / unchanged / moved / removed); every file to read goes through the same
`Decoder`; known content, moves, copies and failures are handled by the same `_Run` methods and recorded in the same
state file; rows land through the store's commit protocol, one atomic commit per chunk. What differs is where the
work runs:

- decoding runs as Ray tasks (`map_batches` over the plan's work units);
- encoding runs in a pool of Ray actors (`_EncodeAndWrite`), each loading the model once (one GPU each, fp16 autocast,
  when the cluster has GPUs), which also write the encoded rows as Lance fragments (`lance_ray`'s writer); with
  sub-views (`--views`) the decode tasks cut the crops and the actors encode them too, returning their vectors;
- the driver commits those fragments in chunks (`Store.apply_fragments`), together with the rows it stages itself
  (moved, touched and copied files) and the deletions that go with them; the chunk's sub-views are written to the
  views table just before, as the local engine writes them (an interrupted run's orphans are deleted by the next).

Crash safety: ids are allocated (and persisted) by the driver before any work unit is dispatched, so a Ray retry of a
decode task or of an encoder batch writes the same ids again; a fragment is part of the table only once the driver
commits it, and a commit replaces rows whose id comes in again (an upsert), so a retried batch never adds a row twice.
A killed worker or actor is retried by Ray; a killed driver loses the uncommitted chunk, and the next run finds the
committed files unchanged and carries on.

Ray is imported only here: `pip install 'clipsearch[distributed]'`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import pickle
import time
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch

from indexer.decode import Decoded, Decoder, DecodeResult, DecodeTask
from indexer.lock import IndexLock
from indexer.options import IndexOptions
from indexer.pipeline import IndexSummary, _Run
from indexer.sources import exists, list_sources
from indexer.sync import WorkItem
from indexer.walk import Found
from retrieval.errors import ClipsearchError, StoreError
from retrieval.model.encode import encode_images
from retrieval.model.preprocess import Preprocess
from retrieval.regions import view_boxes
from retrieval.store import FragmentTarget, ImageRow, Store, WrittenFragment, rows_to_arrow, utc_now

logger = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'clipsearch[distributed]'"
# Bytes reserved per decode task: its worker process holds torch and Pillow (~240 MB measured by Ray Data), plus a
# full-size photo while decoding it (a 24-megapixel PNG: ~70 MB) and the batch's pixels.
DECODE_MEMORY = 512 * 2**20


class DistributedError(ClipsearchError):
    """The Ray engine cannot run: the extra is not installed, the cluster cannot be reached, or a setting it lacks."""


@dataclass(frozen=True)
class RayOptions:
    """Where and how the Ray engine runs."""

    address: str | None = None  # a running cluster ("auto", "ray://head:10001"); None starts one on this machine
    actors: int = 1  # encoder actors; each takes one GPU when the cluster has GPUs, else `actor_cpus` CPUs
    actor_cpus: float = 1.0  # CPUs (torch threads) per CPU encoder actor
    decode_batch: int = 16  # files per decode task
    # A registry name or checkpoint path each encoder actor loads the model from (on a cluster: a path every node
    # sees, or a name each node can download); None ships the given model's weights through Ray's object store.
    model_source: str | None = None


class _Unit(NamedTuple):
    """One file of the plan as a Ray row: what to read, and the id its row gets if it is encoded."""

    item: WorkItem
    row_id: int
    check_known: bool


def index_with_ray(
    sources: Sequence[str | os.PathLike[str]],
    model: torch.nn.Module,
    preprocess: Preprocess,
    store: Store,
    options: IndexOptions | None = None,
    ray_options: RayOptions | None = None,
    decoder: Decoder | None = None,
) -> IndexSummary:
    """Bring `store` in line with the images of `sources`, decoding and encoding on a Ray cluster.

    Args:
        sources: local folders or files, `file://` or object-store URIs, manifests (`indexer.sources`).
        model: a CLIP with an image tower and `.info`; shipped to every encoder actor.
        preprocess: the model's preprocessing.
        store: the open store (`Store.open(..., create=True)`).
        options: run settings, as for the local engine (`workers` aside).
        ray_options: the cluster and the actor pool.
        decoder: what the decode tasks run on each file; tests pass a subclass to inject faults.

    Returns:
        The run's counts, timings and failures, as the local engine reports them.

    Raises:
        DistributedError: Ray is not installed, or the cluster cannot be reached.
        StoreError: `options.views` differs from the setting the table was indexed with.
        StoreLockedError: another indexer holds the table's lock for longer than `options.lock_wait`.
    """
    options = options or IndexOptions()
    ray_options = ray_options or RayOptions()
    ray = import_ray()
    lock = IndexLock(store.path / f"{store.table_name}.lock")
    lock.acquire(wait=options.lock_wait)
    started = False
    try:
        if not ray.is_initialized():
            _connect(ray, ray_options.address)
            started = True
        _quiet_ray_data(ray)
        return _RayRun(sources, model, preprocess, store, options, decoder, ray_options).run()
    finally:
        if started:
            ray.shutdown()
        lock.release()


def import_ray() -> Any:
    """The `ray` module, or a `DistributedError` naming the extra to install."""
    try:
        import lance  # noqa: F401  (the store's fragment commits need it)
        import lance_ray  # noqa: F401
        import ray
        import ray.data  # noqa: F401
    except ImportError as e:
        missing = (e.name or "ray").split(".")[0]
        raise DistributedError(
            f"--engine ray needs Ray Data and lance-ray ({missing} is missing): {INSTALL_HINT}"
        ) from e
    return ray


def _connect(ray: Any, address: str | None) -> None:
    """Join the cluster at `address`, or start one on this machine."""
    try:
        with warnings.catch_warnings():
            # Starting a cluster forks and at once execs Ray's processes, which run no lance code: lance's and
            # LanceDB's warnings about forking a process that uses them do not apply.
            warnings.filterwarnings("ignore", message="lance is not fork-safe")
            warnings.filterwarnings("ignore", message="lancedb fork support is experimental")
            ray.init(address=address, include_dashboard=False, logging_level=logging.ERROR, log_to_driver=False)
    except (ConnectionError, RuntimeError, ValueError) as e:
        where = f"at {address}" if address else "on this machine"
        raise DistributedError(
            f"cannot start or reach a Ray cluster {where} ({e}); check --ray-address (e.g. ray://HEAD:10001, or "
            "`ray start --head` first and pass auto)"
        ) from e


def _quiet_ray_data(ray: Any) -> None:
    """Our own progress bar only: no Ray Data bars or execution banners on the terminal."""
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.ERROR)  # its warnings are about its bars and execution plans


class _RayRun(_Run):
    """A `_Run` whose files are decoded by Ray tasks and encoded by Ray actors that write Lance fragments."""

    def __init__(
        self,
        sources: Sequence[str | os.PathLike[str]],
        model: torch.nn.Module,
        preprocess: Preprocess,
        store: Store,
        options: IndexOptions,
        decoder: Decoder | None,
        ray_options: RayOptions,
    ) -> None:
        super().__init__([], model, preprocess, store, options, decoder)
        self.sources = [os.fsdecode(s) for s in sources]
        self.exists = exists
        self.ray_options = ray_options
        self.pause_decoding = False  # decoding runs elsewhere
        self.fragments: list[WrittenFragment] = []  # written by the actors, waiting for the next commit
        self.written: list[tuple[int, str]] = []  # (id, content hash) of the rows in `fragments`
        self.written_views: dict[int, np.ndarray] = {}  # id -> [V, D] sub-view vectors of the rows in `fragments`
        self.handled: set[int] = set()  # ids of the units whose result has come back (a retried batch may repeat)

    def _list(self, unsupported: Counter[str]) -> list[Found]:
        listing = list_sources(self.sources, self.options.exclude, unsupported)
        self.roots = listing.roots
        return listing.found

    def _waiting(self) -> int:
        return len(self.pending) + len(self.written)

    def _process(self, items: list[WorkItem], check_known: bool) -> None:
        """Run `items` through the Ray pipeline, feeding its results to the same handlers as the local engine."""
        if not items:
            return
        import ray

        ids = self.store.allocate_ids(len(items)).tolist()  # persisted first: a retried unit writes the same ids
        units = [
            {"unit": pickle.dumps(_Unit(item, row_id, check_known and item.size in self.plan.stored_sizes))}
            for item, row_id in zip(items, ids, strict=True)
        ]
        decoder = dataclasses.replace(self.decoder, known=self.plan.known, views=self.view_count)
        ro = self.ray_options
        gpus = ray.cluster_resources().get("GPU", 0) >= 1
        dataset = (
            ray.data.from_items(units, override_num_blocks=max(1, math.ceil(len(units) / ro.decode_batch)))
            # The memory a decode task reserves is also what keeps Ray from fusing the decode tasks into the encoder
            # actors (operators with different resources stay apart), where decoding would get only their CPUs.
            .map_batches(
                _decode, fn_kwargs={"decoder": decoder}, batch_size=ro.decode_batch, num_cpus=1, memory=DECODE_MEMORY
            )
            .map_batches(
                _EncodeAndWrite,
                fn_constructor_kwargs={
                    "model": ro.model_source or ray.put(self.model.cpu() if gpus else self.model),
                    "target": self.store.fragment_target(),
                    "threads": max(1, int(ro.actor_cpus)),
                    "preprocess": decoder.preprocess,
                },
                batch_size=self.options.batch_size,
                compute=ray.data.ActorPoolStrategy(size=ro.actors),
                num_gpus=1 if gpus else 0,
                num_cpus=1 if gpus else ro.actor_cpus,
            )
        )
        waited = time.perf_counter()
        for out in dataset.iter_rows():
            self.stages["wait"] += time.perf_counter() - waited
            self._take(pickle.loads(out["records"]), pickle.loads(out["fragments"]), pickle.loads(out["views"]))
            self.stages["encode"] += float(out["encode_seconds"])
            self.stages["write"] += float(out["write_seconds"])
            self._commit_when_due()
            waited = time.perf_counter()

    def _take(
        self,
        records: list[tuple[_Unit, DecodeResult]],
        fragments: list[WrittenFragment],
        views: dict[int, np.ndarray],
    ) -> None:
        """Stage one encoder batch's results: its fragment, its rows' sub-view vectors, and each file's result."""
        fresh = [(unit, result) for unit, result in records if unit.row_id not in self.handled]
        if len(fresh) < len(records):
            logger.debug("%d results came back twice (a retried batch)", len(records) - len(fresh))
        if any(set(f.ids) & {i for i, _ in self.written} for f in fragments):
            self._commit()  # a retried batch's fragment: committed on its own, it replaces its rows (an upsert)
        self.fragments.extend(fragments)
        self.written_views.update(views)
        self.handled.update(unit.row_id for unit, _ in records)
        for unit, result in fresh:
            if isinstance(result, Decoded):
                self._stage_written(unit, result)
            else:
                self._handle(unit.item, result)
            self.bar.update(1)
        self._show_counts(refresh=False)

    def _stage_written(self, unit: _Unit, result: Decoded) -> None:
        """Count a file an actor encoded and wrote (its row is in a fragment waiting for the commit)."""
        for stage, seconds in zip(("read", "decode", "transform"), result.seconds, strict=True):
            self.stages[stage] += seconds
        content_hash = result.metadata.content_hash
        if any(h == content_hash for _, h in self.written) or self.hash_to_ids.get(content_hash):
            self.summary.duplicates += 1  # encoded again rather than copied: the batches run apart
        self.written.append((unit.row_id, content_hash))
        self._replaces(unit.item)
        self.summary.indexed += 1
        self.summary.encoded += 1

    def _write(self, rows: list[ImageRow]) -> list[tuple[int, str]]:
        if self.views is not None:  # first, as the local engine: a crash before the rows land leaves orphans only
            self._write_views()  # the driver's rows: copies take their source's views, moved rows keep theirs
            ids = [row_id for row_id, _ in self.written]
            boxes = np.asarray(view_boxes(self.view_count), np.float32)  # [V, 4]
            self.views.replace(ids, boxes, [self.written_views[i] for i in ids])
        self.store.apply_fragments(self.fragments, rows, sorted(self.pending_deletes))
        written = [(row.id, row.metadata.content_hash) for row in rows] + self.written
        self.fragments = []
        self.written = []
        self.written_views = {}
        return written


def _decode(batch: dict[str, np.ndarray], decoder: Decoder) -> dict[str, np.ndarray]:
    """A Ray task: decode a batch of units with the local engine's `Decoder`.

    Returns the units, each result without its pixels (pickled), the pixels as one [B, S, S, 3] uint8 array and,
    with sub-views, the views as one [B, V, S, S, 3] uint8 array (zeros for files that were not decoded: known
    content, failures); the encoder actors normalise them (`Preprocess.normalize`).
    """
    size = decoder.preprocess.image_size
    pixels = np.zeros((len(batch["unit"]), size, size, 3), np.uint8)
    views = np.zeros((len(batch["unit"]), decoder.views, size, size, 3), np.uint8) if decoder.views else None
    results = []
    for i, raw in enumerate(batch["unit"]):
        unit: _Unit = pickle.loads(raw)
        result = decoder(DecodeTask(unit.item.path, unit.check_known))
        if isinstance(result, Decoded):
            pixels[i] = result.pixels
            if decoder.views:
                views[i] = result.views
            result = result._replace(pixels=None, views=None)
        results.append(pickle.dumps(result))
    out = {"unit": batch["unit"], "result": np.array(results, dtype=object), "pixels": pixels}
    return out if views is None else {**out, "views": views}


class _EncodeAndWrite:
    """A Ray actor: encodes the decoded images of a batch and writes their rows as one Lance fragment.

    Returns one row per batch: every unit's result (for the driver's bookkeeping), the fragment (for its commit) and
    the sub-view vectors of its rows (the driver writes them to the views table with the commit).
    """

    def __init__(self, model: str | Any, target: FragmentTarget, threads: int, preprocess: Preprocess) -> None:
        import ray

        torch.set_num_threads(threads)
        device = torch.device("cuda" if ray.get_gpu_ids() and torch.cuda.is_available() else "cpu")
        if isinstance(model, str):
            from retrieval.model.loading import load_model

            model = load_model(model, device=device, towers="image")[0]
        else:
            model = ray.get(model)  # the driver's `ray.put`: one copy in the object store for every actor
        self.model = model.to(device).eval()  # on CUDA `encode_images` runs under fp16 autocast from pinned memory
        self.target = target
        self.embed_dim = int(model.info.embed_dim)
        self.normalize = preprocess.normalize  # the decoders' uint8 crops to the model's input

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from lance_ray.fragment import write_fragment

        units: list[_Unit] = [pickle.loads(u) for u in batch["unit"]]
        results: list[DecodeResult] = [pickle.loads(r) for r in batch["result"]]
        chosen = [i for i, r in enumerate(results) if isinstance(r, Decoded)]
        start = time.perf_counter()
        fragments: list[WrittenFragment] = []
        views: dict[int, np.ndarray] = {}
        if chosen:
            vectors = encode_images(self.model, torch.from_numpy(self.normalize(batch["pixels"][chosen])))  # [B, D]
            if "views" in batch:
                crops = batch["views"][chosen]  # [B, V, S, S, 3]
                flat = self.normalize(crops.reshape(-1, *crops.shape[2:]))  # [B * V, 3, S, S]
                step = len(units)  # the crops in batches of the usual size, as the local engine encodes them
                parts = [
                    encode_images(self.model, torch.from_numpy(flat[i : i + step])) for i in range(0, len(flat), step)
                ]
                per_image = np.concatenate(parts).reshape(*crops.shape[:2], -1)  # [B, V, D]
                views = {units[i].row_id: v for i, v in zip(chosen, per_image, strict=True)}
        encoded = time.perf_counter()
        if chosen:
            now = utc_now()
            rows = [
                ImageRow(units[i].row_id, units[i].item.path, units[i].item.size, units[i].item.mtime_ns,
                         results[i].metadata, now, vector)
                for i, vector in zip(chosen, vectors, strict=True)
            ]  # fmt: skip
            table = rows_to_arrow(rows, self.target.schema, self.embed_dim)
            written = write_fragment(
                iter([table]), self.target.uri, schema=self.target.schema,
                data_storage_version=self.target.storage_version,
            )  # fmt: skip
            fragments = [WrittenFragment(metadata, [r.id for r in rows]) for metadata, _ in written]
            if len(fragments) != 1:
                raise StoreError(f"expected one fragment for {len(rows)} rows, lance-ray wrote {len(fragments)}")
        return {
            "records": np.array([pickle.dumps(list(zip(units, results, strict=True)))], dtype=object),
            "fragments": np.array([pickle.dumps(fragments)], dtype=object),
            "views": np.array([pickle.dumps(views)], dtype=object),
            "encode_seconds": np.array([encoded - start]),
            "write_seconds": np.array([time.perf_counter() - encoded]),
        }

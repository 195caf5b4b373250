"""Search at 100M+ vectors: IVF-PQ with on-disk inverted lists, filled in parallel shards, re-ranked exactly.

The way large deployments build it (autofaiss, clip-retrieval): the coarse centroids and the product quantizer
are trained on a sample; each shard of the collection is added to a copy of that trained, empty index in its own
process (or Ray task: `build` takes a `map` callable); the shards' inverted lists are merged into one
`.ivfdata` file (`faiss.OnDiskInvertedLists`) that queries memory-map. A query takes `rerank * k` candidates
(calibrated, at least 10 k) from the compressed codes and re-ranks them with their exact vectors, taken from the
store by row (`VectorReader`), so no process that searches ever holds the vector matrix.

Incremental updates never touch the merged files (they are mapped by readers and never rewritten in place): new
ids go to a small in-memory delta, an IVF-PQ sharing the trained centroids, searched beside the main lists;
removed ids become tombstones excluded from every search. `retrieval.ann` rebuilds once the delta and the
tombstones pass `MAX_DELTA_FRACTION` of the main index.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

import faiss
import numpy as np

from retrieval.cores import available_cores
from retrieval.faiss_index import (
    EXACT_SUBSET_MAX,
    LARGE_KIND,
    TARGET_RECALL,
    AnnIndex,
    IndexParams,
    _as_rows,
    _exact_top_k,
    _omp_threads,
    _search_threads,
    as_ids,
)
from retrieval.types import Embeddings, RowIds

logger = logging.getLogger(__name__)

# Candidates taken from the PQ codes per result wanted, at least; the exact re-ranking restores the order PQ
# blurs. Calibration doubles it up to `_RERANK_STEPS - 1` times where more probes alone stop raising recall.
RERANK_FACTOR = 10
_RERANK_STEPS = 4
# The delta index and the tombstones may grow to this share of the merged lists before a rebuild.
MAX_DELTA_FRACTION = 0.1
# PQ bytes per vector: dim / 8 (64 B for 512-d); the re-ranking makes finer codes unnecessary.
_PQ_DIVISOR = 8
# Past this many lists the coarse quantizer is an HNSW graph over the centroids (as autofaiss does): a flat scan
# of 65,536 centroids costs more per vector added than the rest of the work.
_HNSW_QUANTIZER_MIN = 16_384
_CALIBRATION_QUERIES = 200
_CHUNK = 16_384  # rows per read while adding a shard
# PQ compares a query with codes, not vectors: a range search looks this much below the threshold, then keeps the
# candidates whose exact score reaches it.
_RANGE_MARGIN = 0.1

VectorReader = Callable[[RowIds], Embeddings]
MapFn = Callable[[Callable[[Any], Any], Iterable[Any]], Iterable[Any]]


class ShardSource(Protocol):
    """A part of the collection a shard worker reads itself (picklable: it travels to a process or Ray task)."""

    def chunks(self) -> Iterator[tuple[RowIds, Embeddings]]:
        """(ids [n], vectors [n, D] float32, L2-normalised) blocks of the shard."""
        ...


@dataclass(frozen=True)
class LanceShard:
    """Rows [start, stop) of a Lance dataset at one version (row offsets as `LanceDataset.take` counts them)."""

    uri: str
    version: int
    start: int
    stop: int

    def chunks(self) -> Iterator[tuple[RowIds, Embeddings]]:
        """The shard's ids and vectors, `_CHUNK` rows at a time."""
        import lance

        dataset = lance.dataset(self.uri, version=self.version)
        for begin in range(self.start, self.stop, _CHUNK):
            table = dataset.to_table(columns=["id", "vector"], offset=begin, limit=min(_CHUNK, self.stop - begin))
            yield as_ids(table.column("id").to_numpy()), _matrix(table.column("vector"))


class LanceRows:
    """Exact vectors by row id from a Lance table at one version: `LanceDataset.take` by row offset, through an
    id -> offset map, so a query reads only its candidates' rows."""

    def __init__(self, uri: str, version: int, row_map: np.ndarray) -> None:
        import lance

        self.uri = uri
        self.version = version
        self.row_map = row_map  # [2, N] int64: sorted ids, their row offsets (a memory-mapped .npy for queries)
        self._dataset = lance.dataset(uri, version=version)

    @classmethod
    def scan(cls, uri: str, version: int) -> LanceRows:
        """Map the table's ids to their row offsets at `version` (one read of the id column)."""
        import lance

        ids = as_ids(lance.dataset(uri, version=version).to_table(columns=["id"]).column("id").to_numpy())
        order = np.argsort(ids, kind="stable")
        return cls(uri, version, np.stack([ids[order], order.astype(np.int64)]))

    def __len__(self) -> int:
        """Rows in the table at this version."""
        return int(self.row_map.shape[1])

    def __call__(self, ids: RowIds) -> Embeddings:
        """The vectors of `ids`, in the order given (KeyError for an id the table does not hold)."""
        ids = as_ids(ids)
        sorted_ids = self.row_map[0]
        pos = np.minimum(np.searchsorted(sorted_ids, ids), max(len(sorted_ids) - 1, 0))
        if len(ids) and (not len(sorted_ids) or (sorted_ids[pos] != ids).any()):
            missing = ids if not len(sorted_ids) else ids[sorted_ids[pos] != ids]
            raise KeyError(f"ids not in the table at version {self.version}: {missing[:10].tolist()}")
        offsets = np.asarray(self.row_map[1][pos])
        order = np.argsort(offsets, kind="stable")  # ascending offsets read each fragment once, in file order
        vectors = _matrix(self._dataset.take(offsets[order], columns=["vector"]).column("vector"))
        out = np.empty_like(vectors)
        out[order] = vectors
        return out


def build_from_lance(
    uri: str,
    version: int,
    directory: Path,
    name: str,
    map: MapFn | None = None,
    workers: int | None = None,
    params: IndexParams | None = None,
) -> DiskIndex:
    """Build an on-disk IVF-PQ over a Lance table's `id` and `vector` columns at `version` (see `build`)."""
    import lance

    reader = LanceRows.scan(uri, version)
    n = len(reader)
    dataset = lance.dataset(uri, version=version)
    dim = dataset.schema.field("vector").type.list_size
    params = params or large_params(n, dim)
    rng = np.random.default_rng(0)
    offsets = np.sort(rng.choice(n, size=min(n, _sample_size(params)), replace=False))
    table = dataset.take(offsets, columns=["id", "vector"])
    workers = workers or available_cores()
    bounds = np.linspace(0, n, max(1, min(workers if map is None else 4 * workers, n // _CHUNK + 1)) + 1).astype(int)
    sources = [LanceShard(uri, version, int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    sample_ids = as_ids(table.column("id").to_numpy())
    return build(sources, _matrix(table.column("vector")), sample_ids, reader, directory, name, n, params, map, workers)


def _sample_size(params: IndexParams) -> int:
    """Training vectors: k-means wants ~64 a centroid (FAISS uses at most 256), PQ 256 codes x ~40."""
    return max(64 * params.nlist, 256 * 40)


def _matrix(column: Any) -> Embeddings:
    """A fixed-size-list vector column as [N, D] float32."""
    column = column.combine_chunks()
    dim = column.type.list_size
    return column.values.to_numpy(zero_copy_only=False).astype(np.float32, copy=False).reshape(-1, dim)


def process_map(workers: int) -> MapFn:
    """A `map` running each task in its own spawned process (spawn, not fork: LanceDB's runtime threads)."""

    def run(fn: Callable[[Any], Any], tasks: Iterable[Any]) -> list[Any]:
        import multiprocessing  # here: a query that only opens the index never starts processes (~0.02 s to import)
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            return list(pool.map(fn, tasks))

    return run


@dataclass(frozen=True)
class _ShardTask:
    trained: str  # the trained, empty index file
    source: Any  # a ShardSource
    out: str  # where the filled shard goes
    queries: np.ndarray  # [Q, D] calibration queries: the shard also returns their exact top k over its rows
    k: int
    threads: int


def _fill_shard(task: _ShardTask) -> tuple[int, np.ndarray, RowIds]:
    """Add a shard's vectors to a copy of the trained index and write it; returns (count, exact top-k scores, ids)."""
    faiss.omp_set_num_threads(task.threads)
    index = faiss.read_index(task.trained)
    nq = len(task.queries)
    best = (np.full((nq, task.k), -np.inf, np.float32), np.full((nq, task.k), -1, np.int64))
    for ids, vectors in task.source.chunks():
        index.add_with_ids(np.ascontiguousarray(vectors, np.float32), as_ids(ids))
        best = _merge_top_k(best, _exact_top_k(task.queries, vectors, as_ids(ids), task.k), task.k)
    tmp = f"{task.out}.tmp"  # a retried task (Ray) overwrites a half-written file, never leaves one in place
    faiss.write_index(index, tmp)
    os.replace(tmp, task.out)
    return int(index.ntotal), best[0], best[1]


def _merge_top_k(a: tuple[np.ndarray, RowIds], b: tuple[np.ndarray, RowIds], k: int) -> tuple[np.ndarray, RowIds]:
    """The best k of two (scores, ids) result sets per query."""
    scores = np.concatenate([a[0], b[0]], axis=1)
    ids = np.concatenate([a[1], b[1]], axis=1)
    top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, top, axis=1), np.take_along_axis(ids, top, axis=1)


@dataclass(frozen=True)
class _MergeTask:
    trained: str
    shards: tuple[str, ...]
    index_out: str  # final path of the merged index
    ivfdata_out: str  # final path of its inverted lists


def _merge_shards(task: _MergeTask) -> int:
    """Merge shard files into on-disk inverted lists; runs in a child process because FAISS prints to stdout."""
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # this child's stdout only: keep a parent's --json clean
    from faiss.contrib.ondisk import merge_ondisk

    index = faiss.read_index(task.trained)
    merge_ondisk(index, list(task.shards), task.ivfdata_out)
    tmp = f"{task.index_out}.tmp"
    faiss.write_index(index, tmp)
    os.replace(tmp, task.index_out)
    return int(index.ntotal)


def large_params(n: int, dim: int, nlist: int = 0, pq_m: int = 0) -> IndexParams:
    """The parameters of an on-disk IVF-PQ over `n` vectors (0 = chosen by size)."""
    # ~sqrt(N) lists, a power of two: 512 at 200k, 1,024 at 1M, 8,192 at 100M, 32,768 at 1B
    nlist = nlist or int(min(2 ** round(math.log2(max(math.sqrt(n), 1))), max(n // 39, 1), 65_536))
    pq_m = pq_m or next(m for m in (dim // _PQ_DIVISOR, dim // 16, 1) if m >= 1 and dim % m == 0)
    return IndexParams(kind=LARGE_KIND, nlist=nlist, pq_m=pq_m, trained_on=n)


def _empty_index(params: IndexParams, dim: int) -> faiss.Index:
    """An untrained IVF-PQ, inner product, the quantizer flat or (for many lists) HNSW."""
    quantizer = "_HNSW32" if params.nlist >= _HNSW_QUANTIZER_MIN else ""
    index = faiss.index_factory(dim, f"IVF{params.nlist}{quantizer},PQ{params.pq_m}", faiss.METRIC_INNER_PRODUCT)
    ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
    ivf.cp.niter = 10  # as `faiss_index._new_index`: 10 k-means rounds are enough for search, 25 are slow
    ivf.pq.cp.niter = 10
    # The factory turns on polysemous training (reordering codes for Hamming-distance filtering, which these
    # searches never use); for 64 sub-quantizers it took minutes, longer than all the rest of a 200k build.
    ivf.do_polysemous_training = False
    return index


def build(
    sources: Sequence[ShardSource],
    sample: Embeddings,
    sample_ids: RowIds,
    reader: VectorReader,
    directory: Path,
    name: str,
    n: int,
    params: IndexParams | None = None,
    map: MapFn | None = None,
    workers: int | None = None,
) -> DiskIndex:
    """Build an on-disk IVF-PQ in shards and calibrate its nprobe.

    Args:
        sources: the collection split into shards, each added by one task.
        sample: [S, D] vectors to train on (a uniform sample of the collection); also the calibration queries.
        sample_ids: their ids (a calibration query's own id is left out of its results).
        reader: exact vectors by id, for the re-ranking.
        directory: where the index (`<name>.faiss`) and its lists (`<name>.ivfdata`) are written.
        name: the files' stem; they must not exist (files are never rewritten in place).
        n: the collection's size.
        params: explicit parameters; zero fields are chosen by size.
        map: runs the shard tasks, `map(fn, tasks) -> results` (a Ray engine passes one running Ray tasks);
            default: `workers` spawned processes.
        workers: processes for the default map (default: the CPUs).

    Returns:
        The index, searchable, with `reader` attached.
    """
    started = time.perf_counter()
    directory = directory.absolute()
    dim = sample.shape[1]
    params = params or large_params(n, dim)
    workers = workers or available_cores()
    run = map or process_map(workers)
    index = _empty_index(params, dim)
    with _omp_threads(available_cores()):
        index.train(np.ascontiguousarray(sample, np.float32))
    trained_at = time.perf_counter()
    logger.info("trained %s on %d vectors in %.1f s; adding %d shards", params, len(sample), trained_at - started,
                len(sources))  # fmt: skip
    rng = np.random.default_rng(0)
    picked = rng.choice(len(sample), size=min(_CALIBRATION_QUERIES, len(sample)), replace=False)
    queries = np.ascontiguousarray(sample[picked], np.float32)
    index_path, ivfdata_path = directory / f"{name}.faiss", directory / f"{name}.ivfdata"
    with tempfile.TemporaryDirectory(prefix=f".{name}.", dir=directory) as scratch:
        trained = os.path.join(scratch, "trained.faiss")
        faiss.write_index(index, trained)
        threads = max(1, available_cores() // max(1, min(workers, len(sources))))
        tasks = [
            _ShardTask(trained, source, os.path.join(scratch, f"shard{i:05d}.faiss"), queries, 11, threads)
            for i, source in enumerate(sources)
        ]
        results = list(run(_fill_shard, tasks))
        added_at = time.perf_counter()
        logger.info("added %d vectors in %.1f s; merging", sum(r[0] for r in results), added_at - trained_at)
        truth = (np.full((len(queries), 11), -np.inf, np.float32), np.full((len(queries), 11), -1, np.int64))
        for _, scores, ids in results:
            truth = _merge_top_k(truth, (scores, ids), 11)
        merge = _MergeTask(trained, tuple(t.out for t in tasks), str(index_path), str(ivfdata_path))
        try:
            total = list(run(_merge_shards, [merge]))[0]
            if total != sum(r[0] for r in results):
                raise RuntimeError(f"merged {total} vectors from shards holding {sum(r[0] for r in results)}")
        except BaseException:
            index_path.unlink(missing_ok=True)
            ivfdata_path.unlink(missing_ok=True)
            raise
        delta = faiss.read_index(trained)  # empty: the trained centroids and codebooks
    disk = DiskIndex.open(index_path, ivfdata_path, params, delta, None, reader, written_as=str(ivfdata_path))
    merged_at = time.perf_counter()
    disk._calibrate(queries, as_ids(sample_ids)[picked], truth[1])
    disk.stage_seconds = {
        "train": trained_at - started,
        "add": added_at - trained_at,
        "merge": merged_at - added_at,
        "calibrate": time.perf_counter() - merged_at,
    }
    logger.info(
        "built %s over %d vectors in %d shards: %s s (%s; calibration recall@10 %.3f)",
        LARGE_KIND,
        total,
        len(sources),
        {stage: round(seconds, 1) for stage, seconds in disk.stage_seconds.items()},
        disk.params,
        disk.calibrated_recall,
    )
    return disk


class DiskIndex(AnnIndex):
    """IVF-PQ over on-disk inverted lists (memory-mapped, read-only) plus an in-memory delta, searched together
    and re-ranked with exact vectors from a `VectorReader`."""

    def __init__(
        self,
        index: faiss.Index,
        delta: faiss.Index,
        params: IndexParams,
        files: tuple[str, str],
        written_as: str,
        tombstones: RowIds | None = None,
        reader: VectorReader | None = None,
    ) -> None:
        self._delta = delta
        self.files = files  # (index, ivfdata) file names of the merged lists, in the index's directory
        self.written_as = written_as  # the lists' path recorded inside the index file
        self.reader = reader
        self.stage_seconds: dict[str, float] = {}  # a build's wall time per stage (train, add, merge, calibrate)
        self.calibrated_recall: float | None = None  # a build's recall@10 on its calibration queries, as set
        super().__init__(index, params, tombstones)

    @classmethod
    def open(
        cls,
        index_path: Path,
        ivfdata_path: Path,
        params: IndexParams,
        delta: Path | faiss.Index,
        tombstones: RowIds | None,
        reader: VectorReader | None,
        written_as: str | None = None,
    ) -> DiskIndex:
        """Map a merged index and its lists (read-only), with its delta.

        Args:
            index_path: the merged index file.
            ivfdata_path: its lists.
            params: the parameters it was built with.
            delta: the delta's file (written by `write`) or index.
            tombstones: removed ids.
            reader: exact vectors by id.
            written_as: the lists' absolute path when the index was written (the index file records it); when
                the files have moved since, FAISS is told to look beside the index instead.

        Raises:
            RuntimeError: FAISS cannot read a file.
        """
        flags = faiss.IO_FLAG_READ_ONLY
        moved = written_as != str(ivfdata_path.absolute())
        if moved:
            flags |= faiss.IO_FLAG_ONDISK_SAME_DIR
        with _stdout_to_stderr(moved):  # FAISS reports the path it rewrites on stdout
            index = faiss.read_index(str(index_path), flags)
        delta_index = delta if isinstance(delta, faiss.Index) else faiss.read_index(str(delta))
        files = (index_path.name, ivfdata_path.name)
        return cls(index, delta_index, params, files, written_as or str(ivfdata_path.absolute()), tombstones, reader)

    @property
    def ntotal(self) -> int:
        """Vectors held in the lists and the delta, tombstoned ones included."""
        return int(self._index.ntotal + self._delta.ntotal)

    @property
    def delta_size(self) -> int:
        """Vectors added since the lists were merged."""
        return int(self._delta.ntotal)

    def ids(self) -> RowIds:
        """The live row ids held, sorted."""
        held = np.sort(np.concatenate([self._ivf_ids(), _list_ids(self._delta)]))
        if len(self._tombstones):
            held = held[~np.isin(held, self._tombstones, assume_unique=True)]
        return held

    def add(self, ids: RowIds, vectors: Embeddings) -> None:
        """Add vectors under new row ids, to the delta (the merged lists are never modified)."""
        ids = as_ids(ids)
        if len(ids):
            with _omp_threads(available_cores()):
                self._delta.add_with_ids(_as_rows(vectors, self.dim), ids)

    def remove(self, ids: RowIds) -> None:
        """Tombstone row ids (the merged lists are read-only)."""
        self._tombstones = np.union1d(self._tombstones, as_ids(ids))

    def search(self, queries: Embeddings, k: int, allowed: RowIds | None = None) -> tuple[np.ndarray, RowIds]:
        """The k nearest rows of each query: `params.rerank * k` PQ candidates re-ranked by exact inner product.

        Args and returns as `AnnIndex.search`.
        """
        queries = _as_rows(queries, self.dim)
        nq = len(queries)
        k = max(k, 0)
        empty = (np.full((nq, k), -np.inf, np.float32), np.full((nq, k), -1, np.int64))
        if k == 0 or self.ntotal == 0:
            return empty
        if allowed is not None:
            allowed = np.setdiff1d(np.unique(as_ids(allowed)), self._tombstones, assume_unique=True)
            if not len(allowed):
                return empty
            if len(allowed) <= EXACT_SUBSET_MAX:  # cheaper to score every allowed row exactly
                return _exact_top_k(queries, self._vectors(allowed), allowed, k)
        want = min(k, len(self) if allowed is None else len(allowed))
        share = 1.0 if allowed is None else max(len(allowed) / max(len(self), 1), 1e-9)
        with _omp_threads(_search_threads(nq)):
            depth = (self.params.rerank or RERANK_FACTOR) * k
            candidates = self._candidates(queries, depth, allowed, widen=share**-2)
            if (candidates[:, :want] < 0).any():
                candidates = self._candidates(queries, depth, allowed, widen=math.inf)
        return self._rerank(queries, candidates, k)

    def range_search(self, queries: Embeddings, threshold: float) -> tuple[np.ndarray, RowIds]:
        """Every live row whose exact inner product with a query reaches `threshold`, among those whose PQ score
        comes within `_RANGE_MARGIN` of it in the calibrated nprobe cells. Args and returns as
        `AnnIndex.range_search`."""
        queries = _as_rows(queries, self.dim)
        params = self._ivf_params(None, 1.0)
        found: list[list[int]] = [[] for _ in queries]
        with _omp_threads(_search_threads(len(queries))):
            for index in (self._index, self._delta):
                if index.ntotal:
                    limits, _, ids = index.range_search(queries, float(threshold) - _RANGE_MARGIN, params=params)
                    for q in range(len(queries)):
                        found[q].extend(ids[limits[q] : limits[q + 1]].tolist())
        unique = np.unique(np.fromiter((i for row in found for i in row), np.int64))
        vectors = self._vectors(unique)
        limits = np.zeros(len(queries) + 1, np.int64)
        kept = []
        for q, row in enumerate(found):
            ids = as_ids(row)
            scores = vectors[np.searchsorted(unique, ids)] @ queries[q] if len(ids) else np.zeros(0, np.float32)
            kept.append(ids[scores >= threshold])
            limits[q + 1] = limits[q] + len(kept[-1])
        return limits, np.concatenate(kept) if kept else np.zeros(0, np.int64)

    def write(self, path: Path) -> None:
        """Write the delta (the merged lists are already on disk, under `files`).

        Raises:
            OSError: the file cannot be written.
        """
        with path.open("wb") as f:
            faiss.write_index(self._delta, faiss.PyCallbackIOWriter(f.write))

    def _vectors(self, ids: RowIds) -> Embeddings:
        """Exact vectors of ids through the reader."""
        if self.reader is None:
            raise RuntimeError("an on-disk index searches only with a reader of exact vectors attached")
        if not len(ids):
            return np.zeros((0, self.dim), np.float32)
        return self.reader(ids)

    def _ivf_params(self, allowed: RowIds | None, widen: float) -> faiss.SearchParametersIVF:
        """Probe count and id selector of one IVF search."""
        selector = None
        if allowed is not None:
            selector = faiss.IDSelectorBatch(allowed)
        elif len(self._tombstones):
            selector = faiss.IDSelectorNot(faiss.IDSelectorBatch(self._tombstones))
        nprobe = self.params.nlist if math.isinf(widen) else math.ceil(max(self.params.nprobe, 1) * widen)
        return faiss.SearchParametersIVF(sel=selector, nprobe=min(nprobe, self.params.nlist))

    def _candidates(self, queries: np.ndarray, count: int, allowed: RowIds | None, widen: float) -> RowIds:
        """Candidate ids [Q, <= 2 * count] from the merged lists and the delta (-1 where fewer were found)."""
        params = self._ivf_params(allowed, widen)
        parts = [index.search(queries, count, params=params)[1] for index in (self._index, self._delta) if index.ntotal]
        return np.concatenate(parts, axis=1)

    def _rerank(self, queries: np.ndarray, candidates: RowIds, k: int) -> tuple[np.ndarray, RowIds]:
        """Top k of each query's candidates by exact inner product with their stored vectors."""
        unique = np.unique(candidates[candidates >= 0])
        vectors = self._vectors(unique)  # [U, D]: one read for all queries
        pos = np.searchsorted(unique, np.maximum(candidates, 0))
        scores = np.einsum("qd,qcd->qc", queries, vectors[pos]) if len(unique) else np.zeros(candidates.shape)
        scores = np.where(candidates >= 0, scores, -np.inf).astype(np.float32)
        take = min(k, candidates.shape[1])
        top = np.argsort(-scores, axis=1, kind="stable")[:, :take]
        out_scores = np.full((len(queries), k), -np.inf, np.float32)
        out_ids = np.full((len(queries), k), -1, np.int64)
        out_scores[:, :take] = np.take_along_axis(scores, top, axis=1)
        out_ids[:, :take] = np.where(np.isfinite(out_scores[:, :take]), np.take_along_axis(candidates, top, axis=1), -1)
        return out_scores, out_ids

    def _calibrate(self, queries: np.ndarray, query_ids: RowIds, truth: RowIds) -> None:
        """Raise nprobe, and the re-ranking depth once more probes stop helping (the PQ order is then the limit),
        until recall@10 after re-ranking, against the shards' exact top 10 (each query's own id left out), reaches
        `TARGET_RECALL`; else keep the best setting seen."""
        own = query_ids.tolist()
        exact = [set([i for i in row.tolist() if i >= 0 and i != q][:10]) for row, q in zip(truth, own, strict=True)]
        nprobes = [min(2**i, self.params.nlist) for i in range(int(math.log2(self.params.nlist)) + 1)]
        reranks = [RERANK_FACTOR * 2**i for i in range(_RERANK_STEPS)]
        p = r = 0
        previous, best = -1.0, (-1.0, nprobes[-1], reranks[-1])
        while True:
            self.params = replace(self.params, nprobe=nprobes[p], rerank=reranks[r])
            _, found = self.search(queries, 11)
            hits = [
                len(t & (set(f.tolist()) - {q})) / max(len(t), 1) for t, f, q in zip(exact, found, own, strict=True)
            ]
            recall = float(np.mean(hits))
            logger.debug("calibrating: nprobe=%d rerank=%d recall@10=%.3f", nprobes[p], reranks[r], recall)
            if recall > best[0]:
                best = (recall, nprobes[p], reranks[r])
            if recall >= TARGET_RECALL:
                self.calibrated_recall = recall
                return
            stalled = recall - previous < 0.005 or p == len(nprobes) - 1
            previous = recall
            if not stalled:
                p += 1
            elif r < len(reranks) - 1:
                r += 1
            else:
                logger.warning("%s reaches recall@10 %.3f at most (target %.2f)", LARGE_KIND, best[0], TARGET_RECALL)
                self.params = replace(self.params, nprobe=best[1], rerank=best[2])
                self.calibrated_recall = best[0]
                return

    def _move_to_gpu(self) -> None:
        """On-disk lists stay on the CPU (faiss-gpu cannot map them)."""


def _list_ids(index: faiss.Index) -> RowIds:
    """Every id in an IVF's inverted lists."""
    invlists = faiss.extract_index_ivf(index).invlists
    parts = [np.empty(0, np.int64)]
    for cell in range(invlists.nlist):
        size = invlists.list_size(cell)
        if size:
            parts.append(faiss.rev_swig_ptr(invlists.get_ids(cell), size).copy())
    return np.concatenate(parts)


@contextlib.contextmanager
def _stdout_to_stderr(active: bool) -> Iterator[None]:
    """Send file descriptor 1 to stderr for the block (FAISS's C++ printf), keeping a --json stdout clean."""
    if not active:
        yield
        return
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)

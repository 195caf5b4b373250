"""The nearest-neighbour index structure: FAISS, inner product on L2-normalised rows (= cosine).

Its type follows the collection's size: exact (`flat`) while a full scan is fast, then IVF with its probe
count calibrated at build time so recall@10 against exact search stays above `TARGET_RECALL`, then, past
`LARGE_MIN`, IVF-PQ over on-disk lists re-ranked with exact vectors (`retrieval.ondisk`). `hnsw`, `ivf`,
`ivfpq` and `ivfpq-disk` can be forced. FAISS ids are the store's stable int64 row ids.

Keeping an index beside a store, in step with it, is `retrieval.ann`'s job.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import faiss
import numpy as np

from retrieval.cores import available_cores
from retrieval.types import Embeddings, RowIds

logger = logging.getLogger(__name__)

IndexKind = Literal["flat", "hnsw", "ivf", "ivfpq", "ivfpq-disk"]
LARGE_KIND = "ivfpq-disk"
KINDS: tuple[str, ...] = ("flat", "hnsw", "ivf", "ivfpq", LARGE_KIND)
# Exact search stays the default up to this size: one query scans N x 512 float32, ~16 ms at 100k on
# this project's reference 2-core CPU (memory-bound), ~8 ms at 50k, while the text encoder takes ~10 ms.
FLAT_MAX = 50_000
# An IVF holds its vectors in RAM (2 GB per million 512-d): past this size the index keeps 64-byte codes in a
# memory-mapped file instead and re-ranks candidates with exact vectors read from the store.
LARGE_MIN = 2_000_000
# Approximate indexes are tuned at build time to this recall@10 against exact search (margin over 0.95).
TARGET_RECALL = 0.97
# A filtered HNSW search over at most this many allowed ids scans them exactly (a few ms) instead of walking
# a graph mostly made of excluded nodes.
EXACT_SUBSET_MAX = 20_000
MAX_EF_SEARCH = 4096
# k-means needs data: IVF at least one vector, PQ's 256 codes per sub-space at least 256.
_MIN_VECTORS = {"ivf": 1, "ivfpq": 256}
_CALIBRATION_QUERIES = 200


@dataclass(frozen=True)
class IndexParams:
    """The FAISS index type and its parameters (0 = chosen from the data at build time)."""

    kind: str  # one of KINDS
    nlist: int = 0  # ivf/ivfpq: number of inverted lists (k-means cells)
    nprobe: int = 0  # ivf/ivfpq: cells scanned per query (calibrated)
    hnsw_m: int = 32  # hnsw: links per node
    ef_construction: int = 64  # hnsw: candidate list size while building
    ef_search: int = 0  # hnsw: candidate list size while searching (calibrated)
    pq_m: int = 0  # ivfpq: sub-quantizers (bytes per vector at 8 bits)
    trained_on: int = 0  # ivf/ivfpq: vectors held when the centroids were trained
    rerank: int = 0  # ivfpq-disk: PQ candidates re-ranked exactly per result wanted (calibrated)


def choose_kind(n: int) -> str:
    """The index type for a collection of `n` vectors: exact while a scan is fast, IVF beyond, on disk past
    `LARGE_MIN`."""
    return "flat" if n < FLAT_MAX else "ivf" if n < LARGE_MIN else LARGE_KIND


@contextlib.contextmanager
def _omp_threads(n: int) -> Iterator[None]:
    """Run FAISS with `n` OpenMP threads, then restore the previous setting."""
    previous = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(max(1, n))
    try:
        yield
    finally:
        faiss.omp_set_num_threads(previous)


def _search_threads(n_queries: int) -> int:
    """One thread for a handful of queries: OpenMP start-up and spinning cost more than they save there."""
    return 1 if n_queries < 16 else available_cores()


def _as_rows(vectors: np.ndarray, dim: int) -> np.ndarray:
    """C-contiguous float32 [N, dim]."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if vectors.ndim == 1:
        vectors = vectors[None, :]
    if vectors.shape[1] != dim:
        raise ValueError(f"vectors have dimension {vectors.shape[1]}, the index {dim}")
    return vectors


def as_ids(ids: np.ndarray | Sequence[int]) -> RowIds:
    """Row ids as C-contiguous int64 [N]."""
    return np.ascontiguousarray(np.asarray(ids, dtype=np.int64).reshape(-1))


class AnnIndex:
    """A FAISS index keyed by the store's row ids.

    Build one with `AnnIndex.build`, or get the store's up-to-date one with `open_index`.
    """

    def __init__(self, index: faiss.Index, params: IndexParams, tombstones: RowIds | None = None) -> None:
        self._index = index
        self.params = params
        self.dim = int(index.d)
        # ids still inside an HNSW graph but gone from the store; excluded from every search
        tombstones = as_ids(tombstones if tombstones is not None else np.empty(0, np.int64))
        # np.unique imports numpy.ma (~10 ms), which a cold query otherwise never needs: none is the common case
        self._tombstones = np.unique(tombstones) if len(tombstones) else tombstones
        self._gpu_index: faiss.Index | None = None
        self._gpu_resources: Any = None
        self._move_to_gpu()

    @property
    def kind(self) -> str:
        """flat, hnsw, ivf or ivfpq."""
        return self.params.kind

    def __len__(self) -> int:
        """Live vectors (tombstoned ones not counted)."""
        return self.ntotal - len(self._tombstones)

    @property
    def ntotal(self) -> int:
        """Vectors held, tombstoned ones included."""
        return int(self._index.ntotal)

    @classmethod
    def build(
        cls,
        ids: RowIds,
        vectors: Embeddings,
        kind: str | None = None,
        params: IndexParams | None = None,
    ) -> AnnIndex:
        """Build an index over `vectors` keyed by `ids`.

        Args:
            ids: [N] int64 row ids.
            vectors: [N, D] float32, rows L2-normalised.
            kind: flat, hnsw, ivf or ivfpq; None chooses by size (`choose_kind`).
            params: explicit parameters (their `kind` wins); zero fields are chosen and calibrated here.

        Returns:
            The index, calibrated so recall@10 against exact search reaches `TARGET_RECALL` where the type
            can reach it.
        """
        ids = as_ids(ids)
        if vectors.ndim != 2 or len(vectors) != len(ids):
            raise ValueError(f"{len(ids)} ids for vectors of shape {vectors.shape}")
        vectors = _as_rows(vectors, vectors.shape[1])
        n, dim = vectors.shape
        if params is None:
            params = IndexParams(kind=kind or choose_kind(n))
        if params.kind not in KINDS:
            raise ValueError(f"unknown index type {params.kind!r}; choose one of {', '.join(KINDS)}")
        if params.kind == LARGE_KIND:
            raise ValueError(f"{LARGE_KIND} is built in shards from the store: use retrieval.ann.open_index")
        if n < _MIN_VECTORS.get(params.kind, 0):
            logger.info("%d vectors are too few to train %s; using an exact index", n, params.kind)
            params = IndexParams("flat")
        params = _fill_defaults(params, n, dim)
        started = time.perf_counter()
        with _omp_threads(available_cores()):
            index = _new_index(params, dim)
            if params.kind in ("ivf", "ivfpq"):
                ivf = faiss.extract_index_ivf(index)
                ivf.train(_training_sample(vectors, params.nlist, params.kind))
            index.add_with_ids(vectors, ids)
        self = cls(index, params)
        if (params.kind == "hnsw" and params.ef_search == 0) or (
            params.kind in ("ivf", "ivfpq") and params.nprobe == 0
        ):
            self._calibrate(ids, vectors)
        logger.info(
            "built %s index over %d vectors in %.1f s (%s)", self.kind, n, time.perf_counter() - started, self.params
        )
        return self

    def _calibrate(self, ids: RowIds, vectors: Embeddings) -> None:
        """Raise nprobe / efSearch until recall@10 against exact search reaches the target (or stops rising).

        The calibration queries are stored vectors with each one's own id left out of both result lists, so
        finding itself does not flatter the recall.
        """
        n = len(vectors)
        rng = np.random.default_rng(0)
        picked = rng.choice(n, size=min(_CALIBRATION_QUERIES, n), replace=False)
        sample = vectors[picked]
        k = min(10, n - 1)
        if k <= 0:
            return
        with _omp_threads(available_cores()):
            exact = np.argpartition(-(sample @ vectors.T), k, axis=1)[:, : k + 1]  # positions, [Q, k + 1]
        truth = [set(ids[row]) - {ids[q]} for q, row in zip(picked, exact, strict=True)]
        if self.kind == "hnsw":
            field, choices = "ef_search", [16, 32, 64, 128, 256, 512, 1024]
        else:
            field = "nprobe"
            choices = sorted({min(2**i, self.params.nlist) for i in range(int(math.log2(self.params.nlist)) + 2)})
        chosen, previous = choices[-1], -1.0
        for i, value in enumerate(choices):
            self.params = replace(self.params, **{field: value})
            _, found = self.search(sample, k + 1)
            recall = float(np.mean([len(truth[j] & (set(found[j]) - {ids[q]})) / k for j, q in enumerate(picked)]))
            logger.debug("calibrating %s: %s=%d recall@10=%.3f", self.kind, field, value, recall)
            if recall >= TARGET_RECALL:
                chosen = value
                break
            if recall - previous < 0.002:  # a plateau (PQ's quantisation error): scanning more buys nothing
                chosen = choices[i - 1]
                logger.warning(
                    "%s index reaches recall@10 %.3f at most (target %.2f)", self.kind, recall, TARGET_RECALL
                )
                break
            previous = recall
        self.params = replace(self.params, **{field: chosen})

    def _ivf_ids(self) -> RowIds:
        """Every id held in an IVF's inverted lists."""
        invlists = faiss.extract_index_ivf(self._index).invlists
        parts = [np.empty(0, np.int64)]
        for cell in range(invlists.nlist):
            size = invlists.list_size(cell)
            if size:
                parts.append(faiss.rev_swig_ptr(invlists.get_ids(cell), size).copy())
        return np.concatenate(parts)

    def ids(self) -> RowIds:
        """The live row ids the index holds, sorted."""
        if isinstance(self._index, faiss.IndexIDMap):
            held = faiss.vector_to_array(self._index.id_map)
        else:
            held = self._ivf_ids()
        held = np.sort(held)
        if len(self._tombstones):
            held = held[~np.isin(held, self._tombstones, assume_unique=True)]
        return held

    def add(self, ids: RowIds, vectors: Embeddings) -> None:
        """Add vectors under new row ids (ids already held must be removed first)."""
        ids = as_ids(ids)
        if not len(ids):
            return
        vectors = _as_rows(vectors, self.dim)
        if len(self._tombstones):
            revived = np.isin(ids, self._tombstones)
            if revived.any():
                raise ValueError("re-adding a removed id to an HNSW index needs a rebuild")
        with _omp_threads(available_cores()):
            self._index.add_with_ids(vectors, ids)
        self._move_to_gpu()

    def remove(self, ids: RowIds) -> None:
        """Remove row ids; HNSW, which cannot delete, tombstones them instead."""
        ids = np.unique(as_ids(ids))
        if not len(ids):
            return
        if self.kind == "hnsw":
            self._tombstones = np.union1d(self._tombstones, ids)
        else:
            self._index.remove_ids(faiss.IDSelectorBatch(ids))
            self._move_to_gpu()

    @property
    def tombstones(self) -> RowIds:
        """Ids removed from an HNSW index but still in its graph (never returned by a search)."""
        return self._tombstones

    def search(self, queries: Embeddings, k: int, allowed: RowIds | None = None) -> tuple[np.ndarray, RowIds]:
        """The k nearest rows of each query by inner product.

        Args:
            queries: [Q, D] float32 (L2-normalised for cosine scores).
            k: results per query.
            allowed: when given, only these row ids may be returned; if at least k of them are in the index,
                k results come back (a restrictive filter falls back to a wider or exact scan).

        Returns:
            (scores [Q, k] float32, ids [Q, k] int64), best first; missing results have id -1, score -inf.
        """
        queries = _as_rows(queries, self.dim)
        nq = len(queries)
        empty = (np.full((nq, k), -np.inf, np.float32), np.full((nq, k), -1, np.int64))
        if k <= 0 or self._index.ntotal == 0:
            return empty[0][:, : max(k, 0)], empty[1][:, : max(k, 0)]
        if allowed is not None:
            allowed = np.unique(as_ids(allowed))
            if len(self._tombstones):
                allowed = np.setdiff1d(allowed, self._tombstones, assume_unique=True)
            if not len(allowed):
                return empty
        want = min(k, len(self) if allowed is None else len(allowed))
        # A filter keeping a share s of the vectors makes the k nearest allowed ones about the k/s nearest
        # overall, reached only by a much wider scan: widening by 1/s^2 keeps recall near the unfiltered one
        # (measured on clustered data). A small allowed set is cheaper to scan exactly.
        share = 1.0 if allowed is None else max(len(allowed) / max(len(self), 1), 1e-9)
        with _omp_threads(_search_threads(nq)):
            if self.kind == "hnsw" and allowed is not None and len(allowed) <= EXACT_SUBSET_MAX:
                return self._exact_hnsw(queries, k, allowed)
            scores, ids = self._search(queries, k, allowed, widen=share**-2)
            if (ids[:, :want] < 0).any() and self.kind != "flat":
                # the approximate scan still found too few allowed ids: scan exhaustively
                scores, ids = self._search(queries, k, allowed, widen=math.inf)
        return scores, ids

    def range_search(self, queries: Embeddings, threshold: float) -> tuple[np.ndarray, RowIds]:
        """Every live row whose inner product with a query is at least `threshold` (exact for a flat index; IVF
        scans its calibrated nprobe cells, HNSW its graph).

        Args:
            queries: [Q, D] float32.
            threshold: the smallest inner product returned.

        Returns:
            (limits [Q + 1] int64, ids [M] int64): query q's rows are ids[limits[q]:limits[q + 1]].
        """
        queries = _as_rows(queries, self.dim)
        selector = faiss.IDSelectorNot(faiss.IDSelectorBatch(self._tombstones)) if len(self._tombstones) else None
        params: faiss.SearchParameters | None = None
        if self.kind in ("ivf", "ivfpq"):
            params = faiss.SearchParametersIVF(sel=selector, nprobe=min(self.params.nprobe or 1, self.params.nlist))
        elif selector is not None:
            params = faiss.SearchParametersHNSW(sel=selector, efSearch=max(self.params.ef_search, 16))
        with _omp_threads(_search_threads(len(queries))):
            limits, _, ids = self._index.range_search(queries, float(threshold), params=params)
        return limits.astype(np.int64), ids.astype(np.int64)

    def _search(self, queries: np.ndarray, k: int, allowed: RowIds | None, widen: float) -> tuple[np.ndarray, RowIds]:
        """One FAISS search with the scan breadth (nprobe, efSearch) multiplied by `widen`; inf is exhaustive."""
        selector = None
        if allowed is not None:
            selector = faiss.IDSelectorBatch(allowed)
        elif len(self._tombstones):
            selector = faiss.IDSelectorNot(faiss.IDSelectorBatch(self._tombstones))
        if self.kind == "hnsw" and math.isinf(widen):
            return self._exact_hnsw(queries, k, allowed)
        params: faiss.SearchParameters | None
        if self.kind == "flat":
            params = faiss.SearchParameters(sel=selector) if selector is not None else None
        elif self.kind == "hnsw":
            ef = min(math.ceil(max(self.params.ef_search, k) * widen), MAX_EF_SEARCH)
            params = faiss.SearchParametersHNSW(sel=selector, efSearch=ef)
        else:
            nprobe = self.params.nlist if math.isinf(widen) else math.ceil(self.params.nprobe * widen)
            params = faiss.SearchParametersIVF(sel=selector, nprobe=min(nprobe, self.params.nlist))
        index = self._gpu_index if (self._gpu_index is not None and selector is None) else self._index
        scores, ids = index.search(queries, k, params=params)
        scores[ids < 0] = -np.inf
        return scores, ids

    def _exact_hnsw(self, queries: np.ndarray, k: int, allowed: RowIds | None) -> tuple[np.ndarray, RowIds]:
        """Exact search over the HNSW's stored vectors, restricted to the allowed (and live) ids."""
        candidates = self.ids() if allowed is None else allowed
        vectors = self._index.reconstruct_batch(candidates)  # [C, D]
        return _exact_top_k(queries, vectors, candidates, k)

    def write(self, path: Path) -> None:
        """Write the FAISS index (not its GPU mirror) to `path`.

        Raises:
            OSError: the file cannot be written (a read-only directory, a full disk).
        """
        # Through a Python file, not FAISS's own: FAISS turns a failed write into a RuntimeError without the
        # errno, and ignores an error from closing its file (where a full disk may only show up).
        with path.open("wb") as f:
            faiss.write_index(self._index, faiss.PyCallbackIOWriter(f.write))

    @classmethod
    def read(cls, path: Path, params: IndexParams, tombstones: RowIds | None = None, mmap: bool = False) -> AnnIndex:
        """Read a FAISS index written by `write`.

        Args:
            path: the file.
            params: the parameters it was built with.
            tombstones: removed HNSW ids to keep excluding.
            mmap: map the file instead of reading it (a 100k x 512 IVF loads in ~1 ms instead of ~0.1-0.2 s);
                the index is then read-only, so only for searching. The file must not be rewritten in place,
                which `retrieval.ann` never does (it writes new files and unlinks old ones).

        Raises:
            RuntimeError: FAISS cannot read the file.
        """
        flags = faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY if mmap else 0
        return cls(faiss.read_index(str(path), flags), params, tombstones)

    def _move_to_gpu(self) -> None:
        """Mirror flat and IVF indexes on the GPU when faiss-gpu sees one (HNSW has no GPU version)."""
        if self.kind == "hnsw" or not hasattr(faiss, "StandardGpuResources") or faiss.get_num_gpus() == 0:
            return
        if self._gpu_resources is None:
            self._gpu_resources = faiss.StandardGpuResources()
        self._gpu_index = faiss.index_cpu_to_gpu(self._gpu_resources, 0, self._index)
        if self.kind in ("ivf", "ivfpq"):
            faiss.GpuParameterSpace().set_index_parameter(self._gpu_index, "nprobe", self.params.nprobe)


def _exact_top_k(queries: np.ndarray, vectors: np.ndarray, ids: RowIds, k: int) -> tuple[np.ndarray, RowIds]:
    """Brute-force top k of each query over explicit vectors; pads with -1 / -inf."""
    scores = queries @ vectors.T  # [Q, C]
    nq, count = scores.shape
    out_scores = np.full((nq, k), -np.inf, np.float32)
    out_ids = np.full((nq, k), -1, np.int64)
    take = min(k, count)
    if take:
        top = np.argpartition(-scores, take - 1, axis=1)[:, :take]
        top_scores = np.take_along_axis(scores, top, axis=1)
        order = np.argsort(-top_scores, axis=1, kind="stable")
        out_scores[:, :take] = np.take_along_axis(top_scores, order, axis=1)
        out_ids[:, :take] = ids[np.take_along_axis(top, order, axis=1)]
    return out_scores, out_ids


def _fill_defaults(params: IndexParams, n: int, dim: int) -> IndexParams:
    """Choose the size-dependent parameters left at 0."""
    if params.kind in ("ivf", "ivfpq"):
        # ~sqrt(N) cells keeps both the coarse scan and each cell small; k-means needs >= ~39 points a cell
        nlist = params.nlist or int(min(max(round(math.sqrt(n)), 1), max(n // 39, 1), 65536))
        pq_m = params.pq_m
        if params.kind == "ivfpq" and not pq_m:
            pq_m = next(m for m in (dim // 4, dim // 8, dim // 16, 1) if m >= 1 and dim % m == 0)
        return replace(params, nlist=nlist, pq_m=pq_m, trained_on=n)
    return params


def _new_index(params: IndexParams, dim: int) -> faiss.Index:
    """An empty FAISS index of the given type, inner-product metric, taking explicit ids."""
    metric = faiss.METRIC_INNER_PRODUCT
    if params.kind == "flat":
        return faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
    if params.kind == "hnsw":
        hnsw = faiss.IndexHNSWFlat(dim, params.hnsw_m, metric)
        hnsw.hnsw.efConstruction = params.ef_construction
        return faiss.IndexIDMap2(hnsw)
    quantizer = faiss.IndexFlatIP(dim)
    if params.kind == "ivf":
        index = faiss.IndexIVFFlat(quantizer, dim, params.nlist, metric)
    else:
        index = faiss.IndexIVFPQ(quantizer, dim, params.nlist, params.pq_m, 8, metric)
    index.cp.niter = 10  # k-means converges well enough for search in 10 rounds; the default 25 is slow
    if params.kind == "ivfpq":
        index.pq.cp.niter = 10
    index.own_fields = True
    quantizer.this.disown()  # the IVF now frees its quantizer
    return index


def _training_sample(vectors: np.ndarray, nlist: int, kind: str) -> np.ndarray:
    """A random sample big enough for k-means over nlist cells (and PQ's 256 codes a sub-space)."""
    size = min(len(vectors), max(64 * nlist, 256 * 40 if kind == "ivfpq" else 0))
    if size == len(vectors):
        return vectors
    rng = np.random.default_rng(0)
    return vectors[np.sort(rng.choice(len(vectors), size=size, replace=False))]

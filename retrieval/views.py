"""Sub-views: embeddings of overlapping crops of each image, so a small object in a big photo can be found.

With `clipsearch index --views N` the indexer embeds, besides the whole image, a grid of g x g crops with 50 %
overlap plus a centre crop (N = g*g + 1: 5 for 2x2 + centre, 10 for 3x3 + centre), each seen by the model at
its full resolution. They live in a table of their own beside the image table, `views_<model>_<sha12>.lance`
(`id`, `image_id`, `box`, `vector`), so the image table's row contract is untouched; the table's schema
metadata records N. A query scores an image by the best of its whole-image vector and its views' vectors, and
reports the box of the view that won (`metadata["view"]`, fractions of the upright image, as `regions.Box`).

Consistency with the image table: the indexer writes a chunk's views before its image rows (their ids are
reserved beforehand), and deletes the views of deleted images after them; every run starts by deleting views
whose image is not in the image table. Readers only ever use views of images the image index holds, so a crash
at any point leaves nothing wrong that a reader sees, and nothing the next run does not tidy.

Search: the views have a FAISS index of their own beside the image index (`open_view_index`), saved and kept in
step with the views table by `retrieval.ann`'s protocol (an atomic JSON commit, incremental updates by key
differences, a rebuild when in doubt). A view's key there is `image id * KEY_STRIDE + its place in the layout`:
an image id is never reused and its content never changes, so neither do its views, and a key never names
another vector (the contract `retrieval.ann` relies on). The key alone gives the image and the box, so a query
with views can run on the two saved indexes without opening the store (`open_saved_view_index`), as one without
views does. `ViewMatrix` (one matrix product over every view) is the exact reference it is tested against.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from retrieval.errors import StoreError
from retrieval.regions import Box, view_boxes
from retrieval.types import Embeddings, RowIds

# pyarrow (~0.1 s to import) is imported by the functions that use it: a text query served from the saved index
# imports this module for `views_table_name` alone.
if TYPE_CHECKING:
    import pyarrow as pa

    from retrieval.faiss_index import AnnIndex
    from retrieval.model.identity import ModelInfo
    from retrieval.store import Catalog, Store

logger = logging.getLogger(__name__)

_META_VIEWS = b"clipsearch.views"
_IN_CHUNK = 4096  # image ids per `image_id IN (...)` clause
KEY_STRIDE = 128  # a view's key in the views index is image id * KEY_STRIDE + its place in the layout (< 128 views)


def views_table_name(image_table: str) -> str:
    """The views table of an image table: `images_x` -> `views_x` (not `images_*`, which names model tables)."""
    return "views_" + image_table.removeprefix("images_")


def has_views(store: Store) -> bool:
    """Whether the store's table has a views table (without opening it)."""
    return (store.path / f"{views_table_name(store.table_name)}.lance").is_dir()


def layout_path(db_dir: Path, image_table: str) -> Path:
    """`<db>/views_<model>_<sha12>.layout.json`: the views per image, readable without LanceDB."""
    return Path(db_dir) / f"{views_table_name(image_table)}.layout.json"


def _write_layout(db_dir: Path, image_table: str, views: int) -> None:
    """Record the layout beside the views table, atomically; a read-only store only loses the fast start."""
    path = layout_path(db_dir, image_table)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps({"views": int(views)}))
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        logger.debug("could not record the views layout in %s: %s", path, e)


def _read_layout(db_dir: Path, image_table: str) -> int | None:
    """The layout recorded beside the views table, or None."""
    try:
        return int(json.loads(layout_path(db_dir, image_table).read_text())["views"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


class ViewMatrix(NamedTuple):
    """Every stored view, for a query: parallel arrays, searched by one matrix product (the exact reference)."""

    image_ids: RowIds  # [M] the image each view belongs to
    boxes: np.ndarray  # [M, 4] float32 x0, y0, x1, y1
    vectors: Embeddings  # [M, D] float32, rows L2-normalised

    def top_images(self, vector: np.ndarray, want: int, keep: Keep) -> tuple[RowIds, np.ndarray, np.ndarray]:
        """The best `want` images `keep` lets through by their best view (more when tied at the cut): (image ids,
        scores, boxes [n, 4]), best first."""
        ids, scores, boxes = best_views(self, vector, keep)
        if len(ids) > want:
            cut = scores >= scores[want - 1]
            ids, scores, boxes = ids[cut], scores[cut], boxes[cut]
        return ids, scores, boxes

    def best_of(self, image_ids: Sequence[int], vector: np.ndarray) -> dict[int, tuple[float, np.ndarray]]:
        """image id -> (its best view's score, that view's box), for the given images that have views."""
        wanted = np.unique(np.asarray(image_ids, np.int64))
        ids, scores, boxes = best_views(self, vector, lambda image: np.isin(image, wanted))
        return {int(i): (float(s), b) for i, s, b in zip(ids, scores, boxes, strict=True)}


Keep = Callable[[np.ndarray], np.ndarray]  # image ids [n] -> [n] bool: which images a ranking may hold


class ViewIndex(NamedTuple):
    """The views' FAISS index (keys `image id * KEY_STRIDE + place`) and their layout: the same answers as
    `ViewMatrix` (exactly, for a flat index), without holding every view in memory."""

    index: AnnIndex
    views: int  # views per image (the layout N)

    def top_images(self, vector: np.ndarray, want: int, keep: Keep) -> tuple[RowIds, np.ndarray, np.ndarray]:
        """As `ViewMatrix.top_images`: the nearest views, widened until `want` images `keep` allows are among them
        (an image's first view in the ranking is its best)."""
        boxes = np.asarray(view_boxes(self.views), np.float32)
        fetch = max(want, 1) * self.views
        while True:
            scores, keys = self.index.search(vector.reshape(1, -1), min(fetch, len(self.index)))
            scores, keys = scores[0], keys[0]
            found = keys >= 0
            scores, keys = scores[found], keys[found]
            images = keys // KEY_STRIDE
            allowed = keep(images) if len(images) else np.zeros(0, bool)
            first = np.zeros(len(keys), bool)
            _, at = np.unique(images[allowed], return_index=True)
            first[np.flatnonzero(allowed)[at]] = True
            if first.sum() >= want or fetch >= len(self.index):
                order = np.flatnonzero(first)[: max(want, 0)]  # `keys` is best first, so are these
                return images[order], scores[order], boxes[keys[order] % KEY_STRIDE]
            fetch *= 4

    def best_of(self, image_ids: Sequence[int], vector: np.ndarray) -> dict[int, tuple[float, np.ndarray]]:
        """As `ViewMatrix.best_of`, by a search restricted to these images' views."""
        wanted = np.unique(np.asarray(image_ids, np.int64))
        keys = (wanted[:, None] * KEY_STRIDE + np.arange(self.views)[None, :]).ravel()  # [n * V]
        if not len(keys):
            return {}
        scores, found = self.index.search(vector.reshape(1, -1), len(keys), allowed=keys)
        boxes = np.asarray(view_boxes(self.views), np.float32)
        best: dict[int, tuple[float, np.ndarray]] = {}
        for key, score in zip(found[0].tolist(), scores[0].tolist(), strict=True):
            if key >= 0 and key // KEY_STRIDE not in best:  # best first: an image's first key is its best view
                best[key // KEY_STRIDE] = (float(score), boxes[key % KEY_STRIDE])
        return best


class ViewStore:
    """The views table of one image table. Open with `ViewStore.open`; writes happen under the indexer's lock."""

    def __init__(self, store: Store, table: Any) -> None:
        self.store = store
        self._table = table

    @classmethod
    def open(cls, store: Store, views: int | None = None) -> ViewStore | None:
        """The views table of `store`; with `views` > 0, created (recording `views`) when missing.

        Returns:
            None when there is no views table and none is to be created.
        """
        import pyarrow as pa

        from retrieval.store import _connect

        exists = has_views(store)
        if not exists and not views:
            return None  # no connection at all: a store without views pays nothing for them
        name = views_table_name(store.table_name)
        db = _connect(store.path)
        if exists:
            return cls(store, db.open_table(name))
        schema = pa.schema(
            [
                pa.field("id", pa.int64(), nullable=False),
                pa.field("image_id", pa.int64(), nullable=False),
                pa.field("box", pa.list_(pa.float32(), 4), nullable=False),
                pa.field("vector", pa.list_(pa.float32(), store.embed_dim), nullable=False),
            ],
            metadata={_META_VIEWS: json.dumps(int(views)).encode()},
        )
        logger.info("created views table %s (%d views per image)", name, views)
        table = cls(store, db.create_table(name, schema=schema))
        _write_layout(store.path, store.table_name, views)
        return table

    @property
    def views(self) -> int:
        """The number of views per image this table was created for."""
        try:
            return int(json.loads((self._table.schema.metadata or {})[_META_VIEWS]))
        except (KeyError, ValueError) as e:
            raise StoreError(f"views table {self._table.name} has no readable view count; delete it and index") from e

    def count(self) -> int:
        """The number of views stored."""
        return int(self._table.count_rows())

    def matrix(self) -> ViewMatrix:
        """Every view, in one read."""
        table = self._table.search().select(["image_id", "box", "vector"]).limit(None).to_arrow()
        boxes = _fixed(table.column("box"), 4)
        return ViewMatrix(
            table.column("image_id").to_numpy().astype(np.int64, copy=False),
            boxes,
            _fixed(table.column("vector"), self.store.embed_dim),
        )

    @property
    def version(self) -> int:
        """The views table's version; it changes with every committed write."""
        return int(self._table.version)

    def keyed(self) -> tuple[RowIds, Embeddings]:
        """Every view as (keys [M] ascending, vectors [M, D]): key = image id * KEY_STRIDE + its place in the
        layout (the views of an image are written in layout order, so their ids rank them)."""
        table = self._table.search().select(["id", "image_id", "vector"]).limit(None).to_arrow()
        ids = table.column("id").to_numpy()
        images = table.column("image_id").to_numpy().astype(np.int64, copy=False)
        order = np.lexsort((ids, images))  # by image, then by view id
        images = images[order]
        starts = np.flatnonzero(np.r_[True, images[1:] != images[:-1]])  # each image's first view
        place = np.arange(len(images)) - np.repeat(starts, np.diff(np.r_[starts, len(images)]))
        return images * KEY_STRIDE + place, _fixed(table.column("vector"), self.store.embed_dim)[order]

    def for_images(self, image_ids: Sequence[int]) -> dict[int, tuple[np.ndarray, np.ndarray]]:
        """image id -> (boxes [V, 4], vectors [V, D]) of the given images, views in id order."""
        import pyarrow as pa

        parts = [
            self._table.search().where(clause).select(["id", "image_id", "box", "vector"]).limit(None).to_arrow()
            for clause in _clauses(image_ids)
        ]
        if not parts:
            return {}
        table = pa.concat_tables(parts)
        order = np.argsort(table.column("id").to_numpy(), kind="stable")
        image = table.column("image_id").to_numpy()[order]
        boxes = _fixed(table.column("box"), 4)[order]
        vectors = _fixed(table.column("vector"), self.store.embed_dim)[order]
        return {int(i): (boxes[image == i], vectors[image == i]) for i in np.unique(image)}

    # ---- writing -------------------------------------------------------------------------------

    def replace(self, image_ids: Sequence[int], boxes: np.ndarray, vectors: Sequence[np.ndarray]) -> None:
        """Store the views of `image_ids` (vectors[i]: [V, D] of image i, boxes [V, 4] shared), dropping any
        stored for them before (a retried commit writes the same images again)."""
        import pyarrow as pa

        self.delete_for(image_ids)
        rows = [(i, v) for i, v in zip(image_ids, vectors, strict=True) if len(v)]
        if not rows:
            return
        total = sum(len(v) for _, v in rows)
        first = self._next_id()
        ids = np.arange(first, first + total, dtype=np.int64)
        image_column = np.concatenate([np.full(len(v), i, np.int64) for i, v in rows])
        box_column = np.concatenate([boxes[: len(v)] for _, v in rows]).astype(np.float32)
        matrix = np.concatenate([np.asarray(v, np.float32) for _, v in rows])  # [total, D]
        dim = self.store.embed_dim
        self._table.add(
            pa.table(
                {
                    "id": pa.array(ids),
                    "image_id": pa.array(image_column),
                    "box": pa.FixedSizeListArray.from_arrays(pa.array(box_column.reshape(-1), pa.float32()), 4),
                    "vector": pa.FixedSizeListArray.from_arrays(pa.array(matrix.reshape(-1), pa.float32()), dim),
                },
                schema=self._table.schema,
            )
        )

    def delete_for(self, image_ids: Sequence[int]) -> None:
        """Delete the views of these images."""
        for clause in _clauses(image_ids):
            self._table.delete(clause)

    def delete_orphans(self, image_ids: RowIds) -> int:
        """Delete views whose image is not among `image_ids` (left by an interrupted run); returns how many."""
        held = np.unique(self._table.search().select(["image_id"]).limit(None).to_arrow().column("image_id"))
        orphans = np.setdiff1d(np.asarray(held, np.int64), image_ids)
        if len(orphans):
            logger.info("deleting the views of %d images no longer stored", len(orphans))
            self.delete_for(orphans.tolist())
        return len(orphans)

    def optimize(self) -> None:
        """Compact the fragments the chunked commits leave (as `Store.optimize`)."""
        from datetime import timedelta

        self._table.optimize(cleanup_older_than=timedelta(hours=1))

    def _next_id(self) -> int:
        """One above the largest view id (views are only written under the indexer's lock)."""
        if not self.count():
            return 1
        column = self._table.search().select(["id"]).limit(None).to_arrow().column("id")
        return int(column.to_numpy().max()) + 1


class _KeyedViews:
    """The views table as `retrieval.ann` sees a store: ids are view keys, and the saved snapshot holds no paths
    (a view's image and box come from its key)."""

    def __init__(self, views: ViewStore) -> None:
        self._views = views
        self.path = views.store.path
        self.table_name = views_table_name(views.store.table_name)
        self.model_info: ModelInfo = views.store.model_info
        self.version = views.version
        self._keys: tuple[RowIds, Embeddings] | None = None

    def all_vectors(self) -> tuple[RowIds, Embeddings]:
        """Every key with its vector (read once per adapter)."""
        if self._keys is None:
            self._keys = self._views.keyed()
        return self._keys

    def ids(self) -> RowIds:
        """Every key, ascending."""
        return self.all_vectors()[0]

    def vectors_for(self, keys: RowIds) -> Embeddings:
        """The vectors of `keys`, in the order given."""
        held, vectors = self.all_vectors()
        return vectors[np.searchsorted(held, np.asarray(keys, np.int64))]

    def catalog(self) -> Catalog:
        """No paths: `open_saved_view_index` needs the index alone."""
        from retrieval.store import Catalog

        empty = np.zeros(0, np.int64)
        return Catalog(empty, [], empty, empty, [])


def open_view_index(store: Store, save: bool = True) -> ViewIndex | None:
    """The views' FAISS index, brought up to date with the views table (`retrieval.ann.open_index`); None when
    the store has no views.

    Raises:
        StoreError: the views table holds more than `KEY_STRIDE - 1` views per image.
    """
    from retrieval.ann import open_index

    views = ViewStore.open(store)
    if views is None:
        return None
    n = views.views
    if n >= KEY_STRIDE:
        raise StoreError(f"views table with {n} views per image: at most {KEY_STRIDE - 1} can be searched")
    if save and _read_layout(store.path, store.table_name) != n:  # a table from before the layout file
        _write_layout(store.path, store.table_name, n)
    return ViewIndex(open_index(_KeyedViews(views), save=save), n)


def open_saved_view_index(db_dir: str | os.PathLike[str], model_info: ModelInfo) -> ViewIndex | None:
    """The saved views index of a model's table, if it reflects the views table as it is now, read without
    opening the store (as `retrieval.ann.open_saved_index`); None otherwise."""
    from retrieval.ann import open_saved_index

    n = _read_layout(Path(db_dir), model_info.table_name)
    if n is None:
        return None
    saved = open_saved_index(db_dir, model_info, table=views_table_name(model_info.table_name))
    return ViewIndex(saved.index, n) if saved is not None else None


def views_state(store: Store) -> dict[str, Any] | None:
    """What `clipsearch status` shows about the views: count, layout N and their index's state; None without."""
    from retrieval.ann import index_state

    views = ViewStore.open(store)
    if views is None:
        return None
    return {"count": views.count(), "layout": views.views, "index": index_state(_KeyedViews(views))}


def stored_views_setting(store: Store) -> int | None:
    """The views setting a store's table was indexed with: its views table's N, 0 for a table holding images
    but no views table, None for an empty table (any setting may start it)."""
    views = ViewStore.open(store)
    if views is not None:
        return views.views
    return 0 if store.count() else None


def check_views_setting(store: Store, views: int | None) -> int:
    """The views setting to index with: `views`, or the table's own when None.

    Raises:
        StoreError: `views` differs from the setting the table was indexed with; the message says how to
            re-index.
    """
    stored = stored_views_setting(store)
    if views is None:
        return stored or 0
    view_boxes(views)  # refuses an N that is no grid
    if stored is not None and stored != views:
        raise StoreError(
            f"this store's table was indexed with --views {stored}, not {views}; run with --views {stored}, or "
            f"index into a new store (--db NEW_DIR) with --views {views} to re-embed every image"
        )
    return views


def best_views(
    matrix: ViewMatrix, vector: np.ndarray, keep: Keep | None = None
) -> tuple[RowIds, np.ndarray, np.ndarray]:
    """Each image's best view for a query: (image ids, their best view's score, its box), best first.

    Args:
        matrix: the stored views.
        vector: [D] unit query vector.
        keep: which images may be ranked; None: all.
    """
    kept = np.ones(len(matrix.image_ids), bool) if keep is None else keep(matrix.image_ids)
    image_ids, boxes = matrix.image_ids[kept], matrix.boxes[kept]
    scores = matrix.vectors[kept] @ vector.astype(np.float32)  # [M]
    order = np.lexsort((-scores, image_ids))  # by image, best view first
    first = np.ones(len(order), bool)
    first[1:] = image_ids[order][1:] != image_ids[order][:-1]
    best = order[first]
    ranking = best[np.argsort(-scores[best], kind="stable")]
    return image_ids[ranking], scores[ranking], boxes[ranking]


def _fixed(column: pa.ChunkedArray, width: int) -> np.ndarray:
    """A fixed-size-list column as a [N, width] float32 array."""
    import pyarrow as pa

    column = column.combine_chunks()
    values = column.values if len(column) else pa.array([], pa.float32())
    return values.to_numpy(zero_copy_only=False).astype(np.float32, copy=False).reshape(-1, width)


def _clauses(image_ids: Sequence[int] | RowIds) -> list[str]:
    """`image_id IN (...)` clauses covering `image_ids`, of bounded size."""
    values = [str(int(i)) for i in image_ids]
    return [f"image_id IN ({', '.join(values[i : i + _IN_CHUNK])})" for i in range(0, len(values), _IN_CHUNK)]


def merge_views(
    hits: list[tuple[int, float]],
    views: ViewIndex | ViewMatrix,
    vector: np.ndarray,
    want: int,
    keep: Keep,
    image_scores: Callable[[list[int]], np.ndarray],
) -> tuple[list[tuple[int, float]], dict[int, Box]]:
    """Rescore a ranking by each image's best of its whole-image score and its views' scores.

    The best `want` images by that score are among the best `want` by whole-image score (`hits`) and the best
    `want` by view score, so those are the only candidates; an image reached through its views alone gets its
    whole-image score from `image_scores`.

    Args:
        hits: (image id, whole-image score) of at least the best `want` allowed images (all, when fewer).
        views: the stored views, as their index or as one matrix.
        vector: [D] unit query vector.
        want: how many of the merged ranking the caller needs.
        keep: which images the ranking may hold (filtered, not excluded, in the image index).
        image_scores: ids -> their whole-image scores for this query.

    Returns:
        The candidates (id, score) by score then id, and the box of the view that gave an image its score.
    """
    top, _, _ = views.top_images(vector, want, keep)
    merged = dict(hits)
    missing = [int(i) for i in top if int(i) not in merged]
    if missing:
        for i, score in zip(missing, image_scores(missing), strict=True):
            merged[i] = float(score)
    won: dict[int, Box] = {}
    for i, (score, box) in views.best_of(list(merged), vector).items():
        if score > merged[i]:
            merged[i] = score
            won[i] = Box(*(round(float(c), 6) for c in box))
    return sorted(merged.items(), key=lambda hit: (-hit[1], hit[0])), won

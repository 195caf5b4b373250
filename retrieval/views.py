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
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import pyarrow as pa

from retrieval.errors import StoreError
from retrieval.regions import Box, view_boxes
from retrieval.types import Embeddings, RowIds

if TYPE_CHECKING:
    from retrieval.store import Store

logger = logging.getLogger(__name__)

_META_VIEWS = b"clipsearch.views"
_IN_CHUNK = 4096  # image ids per `image_id IN (...)` clause


def views_table_name(image_table: str) -> str:
    """The views table of an image table: `images_x` -> `views_x` (not `images_*`, which names model tables)."""
    return "views_" + image_table.removeprefix("images_")


def has_views(store: Store) -> bool:
    """Whether the store's table has a views table (without opening it)."""
    return (store.path / f"{views_table_name(store.table_name)}.lance").is_dir()


class ViewMatrix(NamedTuple):
    """Every stored view, for a query: parallel arrays."""

    image_ids: RowIds  # [M] the image each view belongs to
    boxes: np.ndarray  # [M, 4] float32 x0, y0, x1, y1
    vectors: Embeddings  # [M, D] float32, rows L2-normalised


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
        return cls(store, db.create_table(name, schema=schema))

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

    def for_images(self, image_ids: Sequence[int]) -> dict[int, tuple[np.ndarray, np.ndarray]]:
        """image id -> (boxes [V, 4], vectors [V, D]) of the given images, views in id order."""
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
    matrix: ViewMatrix, vector: np.ndarray, allowed: RowIds | None = None
) -> tuple[RowIds, np.ndarray, np.ndarray]:
    """Each image's best view for a query: (image ids, their best view's score, its box), best first.

    Args:
        matrix: the stored views.
        vector: [D] unit query vector.
        allowed: only images with these ids (sorted); None: all.
    """
    keep = np.ones(len(matrix.image_ids), bool) if allowed is None else np.isin(matrix.image_ids, allowed)
    image_ids, boxes = matrix.image_ids[keep], matrix.boxes[keep]
    scores = matrix.vectors[keep] @ vector.astype(np.float32)  # [M]
    order = np.lexsort((-scores, image_ids))  # by image, best view first
    first = np.ones(len(order), bool)
    first[1:] = image_ids[order][1:] != image_ids[order][:-1]
    best = order[first]
    ranking = best[np.argsort(-scores[best], kind="stable")]
    return image_ids[ranking], scores[ranking], boxes[ranking]


def _fixed(column: pa.ChunkedArray, width: int) -> np.ndarray:
    """A fixed-size-list column as a [N, width] float32 array."""
    column = column.combine_chunks()
    values = column.values if len(column) else pa.array([], pa.float32())
    return values.to_numpy(zero_copy_only=False).astype(np.float32, copy=False).reshape(-1, width)


def _clauses(image_ids: Sequence[int] | RowIds) -> list[str]:
    """`image_id IN (...)` clauses covering `image_ids`, of bounded size."""
    values = [str(int(i)) for i in image_ids]
    return [f"image_id IN ({', '.join(values[i : i + _IN_CHUNK])})" for i in range(0, len(values), _IN_CHUNK)]


def merge_views(
    hits: list[tuple[int, float]],
    matrix: ViewMatrix,
    vector: np.ndarray,
    want: int,
    allowed: RowIds,
    image_vectors: Callable[[list[int]], Embeddings],
) -> tuple[list[tuple[int, float]], dict[int, Box]]:
    """Rescore a ranking by each image's best of its whole-image score and its views' scores.

    The best `want` images by that score are among the best `want` by whole-image score (`hits`) and the best
    `want` by view score, so those are the only candidates; an image reached through its views alone gets its
    whole-image score from its stored vector.

    Args:
        hits: (image id, whole-image score) of at least the best `want` allowed images (all, when fewer).
        matrix: the stored views.
        vector: [D] unit query vector.
        want: how many of the merged ranking the caller needs.
        allowed: sorted ids of the images the ranking may hold (filtered, not excluded, in the image index).
        image_vectors: ids -> their stored whole-image vectors.

    Returns:
        The candidates (id, score) by score then id, and the box of the view that gave an image its score.
    """
    ids, scores, boxes = best_views(matrix, vector, allowed)
    best = {int(i): (float(s), b) for i, s, b in zip(ids, scores, boxes, strict=True)}
    merged = dict(hits)
    top = ids if len(ids) <= want else ids[scores >= scores[want - 1]]  # ties at the cut all come in
    missing = [int(i) for i in top if int(i) not in merged]
    if missing:
        for i, score in zip(missing, image_vectors(missing) @ vector, strict=True):
            merged[i] = float(score)
    won: dict[int, Box] = {}
    for i, score in merged.items():
        view = best.get(i)
        if view is not None and view[0] > score:
            merged[i] = view[0]
            won[i] = Box(*(round(float(c), 6) for c in view[1]))
    return sorted(merged.items(), key=lambda hit: (-hit[1], hit[0])), won

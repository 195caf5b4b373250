"""Near-duplicate groups: the same picture re-encoded, resized, lightly cropped or brightened, and burst frames.

Two stored images are duplicates when their files have the same content hash (exact copies), or when their
vectors' cosine reaches the threshold: every stored vector is range-searched in the store's FAISS index (exact
for a flat index, as accurate as the index otherwise). Pairs are joined into groups with union-find, so a
burst whose first and last frames differ a little more still forms one group through the frames between.

Each group is ordered by its best pick first: the largest picture (pixel count), then the oldest capture
time (the original rather than a later copy; missing times last), then the shortest path, then the lowest id.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any, NamedTuple

from retrieval.errors import QueryError

if TYPE_CHECKING:
    from retrieval.faiss_index import AnnIndex
    from retrieval.store import Store

logger = logging.getLogger(__name__)

# Cosine at or above which two stored images are near-duplicates. From benchmarks/duplicates.py with shapes-mini:
# on design seed 101 pairwise precision is flat at 0.970 (recall 1.000) from 0.92 to 0.98, and 0.96 sits in the
# middle of that plateau; held out (seeds 201 / 202 / 203) it gives precision 0.936 / 0.989 / 0.977, recall 1.000.
# The false pairs are distinct scenes that shapes-mini embeds alike (same object, colour, size, position and
# background colour; only the background's texture differs), at cosines 0.986-0.994, as high as real copies: no
# threshold separates them for this model. clip-retrieval uses 0.94 with ViT-B/32-class models.
DEFAULT_THRESHOLD = 0.96
_CHUNK = 4096  # query vectors per range search (bounds the result lists held at once)


class DuplicateMember(NamedTuple):
    """One image of a duplicate group."""

    id: int  # the store's row id
    path: str
    width: int | None
    height: int | None
    taken_at: datetime | None  # EXIF capture time
    similarity: float  # cosine with the group's best member (1.0 for itself and exact copies)


class DuplicateGroup(NamedTuple):
    """Near-identical images, the best pick first."""

    members: list[DuplicateMember]

    @property
    def best(self) -> DuplicateMember:
        """The member to keep: largest, then oldest, then shortest path."""
        return self.members[0]

    def to_dict(self) -> dict[str, Any]:
        """JSON-able: {"best": path, "size": n, "members": [{id, path, width, height, taken_at, similarity}]}."""
        members = [
            member._asdict() | {"taken_at": member.taken_at.isoformat() if member.taken_at else None}
            for member in self.members
        ]
        return {"best": self.best.path, "size": len(self.members), "members": members}


def _find(parent: dict[int, int], i: int) -> int:
    """The root of i's set, halving the path on the way."""
    while parent.setdefault(i, i) != i:
        parent[i] = parent[parent[i]]
        i = parent[i]
    return i


def _union(parent: dict[int, int], a: int, b: int) -> None:
    """Join a's and b's sets."""
    ra, rb = _find(parent, a), _find(parent, b)
    if ra != rb:
        parent[max(ra, rb)] = min(ra, rb)


def _best_first(row: dict[str, Any]) -> tuple[Any, ...]:
    """Sort key of the best-pick rule."""
    pixels = (row["width"] or 0) * (row["height"] or 0)
    taken = row["taken_at"]
    return (-pixels, taken is None, taken or datetime.min, len(row["path"]), row["id"])


def find_duplicates(store: Store, index: AnnIndex, threshold: float = DEFAULT_THRESHOLD) -> list[DuplicateGroup]:
    """Groups of near-duplicate images in a store.

    Args:
        store: the open store.
        index: its FAISS index, up to date (`retrieval.ann.open_index`).
        threshold: the cosine at or above which two images are duplicates, in (0, 1].

    Returns:
        Groups of two or more images, each best pick first; groups ordered by their best member's path.

    Raises:
        QueryError: a threshold outside (0, 1].
    """
    if not 0.0 < threshold <= 1.0:
        raise QueryError(f"duplicate threshold {threshold}: give a cosine in (0, 1], e.g. {DEFAULT_THRESHOLD}")
    parent: dict[int, int] = {}
    hashes = store.rows(store.ids(), columns=["id", "content_hash"])
    by_hash: dict[str, int] = {}
    for row in hashes:
        first = by_hash.setdefault(row["content_hash"], row["id"])
        if first != row["id"]:
            _union(parent, first, row["id"])
    ids, vectors = store.all_vectors()
    for start in range(0, len(ids), _CHUNK):
        limits, found = index.range_search(vectors[start : start + _CHUNK], threshold)
        for q, row_id in enumerate(ids[start : start + _CHUNK].tolist()):
            for other in found[limits[q] : limits[q + 1]].tolist():
                if other != row_id:
                    _union(parent, row_id, other)
    members: dict[int, list[int]] = {}
    for row_id in list(parent):
        members.setdefault(_find(parent, row_id), []).append(row_id)
    groups = [sorted(group) for group in members.values() if len(group) > 1]
    if not groups:
        return []
    flat = [i for group in groups for i in group]
    rows = {row["id"]: row for row in store.rows(flat, columns=["id", "path", "width", "height", "taken_at"])}
    vector_of = dict(zip(flat, store.vectors_for(flat), strict=True))
    result = []
    for group in groups:
        ordered = sorted((rows[i] for i in group), key=_best_first)
        best = vector_of[ordered[0]["id"]]
        result.append(
            DuplicateGroup(
                [
                    DuplicateMember(
                        id=row["id"],
                        path=row["path"],
                        width=row["width"],
                        height=row["height"],
                        taken_at=row["taken_at"],
                        similarity=round(min(1.0, float(vector_of[row["id"]] @ best)), 6),
                    )
                    for row in ordered
                ]
            )
        )
    logger.info("%d duplicate groups holding %d images", len(result), len(flat))
    return sorted(result, key=lambda group: group.best.path)


def pairs(groups: Sequence[DuplicateGroup]) -> set[frozenset[str]]:
    """Every pair of paths the groups join (for measuring pairwise precision and recall)."""
    out = set()
    for group in groups:
        paths = [m.path for m in group.members]
        out |= {frozenset((a, b)) for i, a in enumerate(paths) for b in paths[i + 1 :]}
    return out

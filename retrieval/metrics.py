"""Retrieval quality: recall@k of a similarity matrix against known relevant items."""

from __future__ import annotations

from collections.abc import Sequence

import numpy.typing as npt
import torch

# Rows of the similarity matrix ranked per chunk, so a large gallery never needs a [Q, N] sort at once.
_CHUNK_ROWS = 1024


def recall_at_k(
    similarity: npt.ArrayLike | torch.Tensor,
    relevant: npt.ArrayLike | torch.Tensor,
    ks: Sequence[int] = (1, 5, 10),
) -> dict[int, float]:
    """Fraction of queries with at least one relevant item among their k highest-scoring items.

    A relevant item is ranked by the number of irrelevant items that score at least as high as the best
    relevant one, so ties count against the model: one that gives every item the same score finds nothing
    before k = N, instead of everything.

    Args:
        similarity: [Q, N] scores of Q queries against N gallery items, higher is more similar.
        relevant: either [Q] ints, the index of the one relevant gallery item of each query, or a
            [Q, N] boolean mask (several relevant items per query, e.g. images with an identical caption).
            A query with no relevant item counts as a miss.
        ks: the cut-offs to report.

    Returns:
        {k: recall in [0, 1]} for each k in `ks`.

    Raises:
        ValueError: if the shapes do not fit or a k is not positive.
    """
    scores = torch.as_tensor(similarity).detach().cpu().to(torch.float64)
    if scores.ndim != 2:
        raise ValueError(f"similarity must be [queries, items], got shape {tuple(scores.shape)}")
    queries, items = scores.shape
    mask = _relevance_mask(relevant, queries, items)
    if any(int(k) < 1 for k in ks):
        raise ValueError(f"every k must be >= 1, got {list(ks)}")
    if queries == 0:
        return {int(k): 0.0 for k in ks}

    ranks = torch.empty(queries, dtype=torch.int64)
    for start in range(0, queries, _CHUNK_ROWS):
        chunk = scores[start : start + _CHUNK_ROWS]  # [q, N]
        chunk_mask = mask[start : start + _CHUNK_ROWS]  # [q, N]
        best = chunk.masked_fill(~chunk_mask, float("-inf")).amax(dim=1, keepdim=True)  # [q, 1]
        beaten_by = (chunk >= best) & ~chunk_mask  # irrelevant items scoring at least the best relevant one
        rank = beaten_by.sum(dim=1)
        rank[~chunk_mask.any(dim=1)] = items  # no relevant item: never found
        ranks[start : start + _CHUNK_ROWS] = rank
    return {int(k): float((ranks < int(k)).double().mean()) for k in ks}


def _relevance_mask(relevant: npt.ArrayLike | torch.Tensor, queries: int, items: int) -> torch.Tensor:
    """A [Q, N] boolean mask from either a [Q] index vector or a [Q, N] mask."""
    rel = torch.as_tensor(relevant).cpu()
    if rel.ndim == 1:
        if rel.shape[0] != queries:
            raise ValueError(f"relevant has {rel.shape[0]} indices for {queries} queries")
        if rel.dtype.is_floating_point or rel.dtype == torch.bool:
            raise ValueError(f"relevant indices must be integers, got {rel.dtype}")
        if queries and (int(rel.min()) < 0 or int(rel.max()) >= items):
            raise ValueError(f"relevant indices must lie in [0, {items}), got {int(rel.min())}..{int(rel.max())}")
        mask = torch.zeros(queries, items, dtype=torch.bool)
        mask[torch.arange(queries), rel.long()] = True
        return mask
    if rel.ndim == 2 and tuple(rel.shape) == (queries, items):
        return rel.to(torch.bool)
    raise ValueError(f"relevant must be [{queries}] indices or a [{queries}, {items}] mask, got {tuple(rel.shape)}")

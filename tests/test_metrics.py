"""recall_at_k against hand-worked cases and an independent argsort implementation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from retrieval.metrics import recall_at_k


def test_recall_with_one_relevant_item_per_query():
    similarity = np.array(
        [
            [0.9, 0.1, 0.2, 0.3],  # relevant 0 ranks 1st
            [0.8, 0.7, 0.1, 0.0],  # relevant 1 ranks 2nd
            [0.9, 0.8, 0.1, 0.7],  # relevant 2 ranks 4th
        ],
        dtype=np.float32,
    )
    assert recall_at_k(similarity, [0, 1, 2], ks=(1, 2, 3, 4)) == {1: 1 / 3, 2: 2 / 3, 3: 2 / 3, 4: 1.0}


def test_recall_with_a_mask_counts_the_best_relevant_item():
    similarity = torch.tensor([[0.1, 0.9, 0.5, 0.8], [0.4, 0.3, 0.2, 0.1]])
    relevant = torch.tensor([[True, False, True, False], [False, False, False, False]])
    # Query 0: its best relevant item (0.5) is beaten by 0.9 and 0.8 -> rank 3; query 1 has none -> miss.
    assert recall_at_k(similarity, relevant, ks=(1, 2, 3)) == {1: 0.0, 2: 0.0, 3: 0.5}


def test_ties_count_against_the_model():
    similarity = np.zeros((5, 5), dtype=np.float32)  # a collapsed model: every score equal
    recall = recall_at_k(similarity, np.arange(5), ks=(1, 4, 5))
    assert recall == {1: 0.0, 4: 0.0, 5: 1.0}


def test_matches_an_argsort_reference_on_random_scores():
    rng = np.random.default_rng(0)
    similarity = rng.normal(size=(300, 200)).astype(np.float32)
    relevant = rng.integers(0, 200, size=300)
    order = np.argsort(-similarity, axis=1)
    ranks = np.argmax(order == relevant[:, None], axis=1)
    expected = {k: float(np.mean(ranks < k)) for k in (1, 5, 10, 50)}
    got = recall_at_k(similarity, relevant, ks=(1, 5, 10, 50))
    assert got == pytest.approx(expected, abs=1e-12)
    # The same with a one-hot mask.
    mask = np.zeros_like(similarity, dtype=bool)
    mask[np.arange(300), relevant] = True
    assert recall_at_k(similarity, mask, ks=(1, 5, 10, 50)) == got


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="queries"):
        recall_at_k(np.zeros((3, 4)), [0, 1])
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        recall_at_k(np.zeros((2, 4)), [0, 4])
    with pytest.raises(ValueError, match="k must be >= 1"):
        recall_at_k(np.zeros((2, 4)), [0, 1], ks=(0,))
    with pytest.raises(ValueError, match="mask"):
        recall_at_k(np.zeros((2, 4)), np.zeros((2, 3), dtype=bool))
    with pytest.raises(ValueError, match="similarity must be"):
        recall_at_k(np.zeros(4), [0])

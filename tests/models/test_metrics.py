"""Metrics against hand computations, and the full-ranking rank rule (ties count against the target)."""

import math

import numpy as np
import pytest
import torch

from recsys.evaluation import metrics_from_ranks
from recsys.ranking import ExactSearch


def test_metrics_from_ranks_hand_computed():
    ranks = np.array([1, 3, 12, math.inf])
    m = metrics_from_ranks(ranks, ks=(1, 5, 10))
    assert m["hr@1"] == pytest.approx(0.25)
    assert m["hr@5"] == pytest.approx(0.5)
    assert m["hr@10"] == pytest.approx(0.5)
    # NDCG@5: (1/log2(2) + 1/log2(4)) / 4 = (1 + 0.5) / 4
    assert m["ndcg@5"] == pytest.approx(0.375)
    assert m["ndcg@1"] == pytest.approx(0.25)
    # MRR over the full ranking: (1 + 1/3 + 1/12 + 0) / 4
    assert m["mrr"] == pytest.approx((1 + 1 / 3 + 1 / 12) / 4)
    assert m["mrr@5"] == pytest.approx((1 + 1 / 3) / 4)


def rank_and_top(queries, table, targets, exclude, k, item_chunk):
    search = ExactSearch(table, item_chunk)
    return search.target_ranks(queries, targets, exclude), search.top(queries, k, exclude)[0]


def test_rank_counts_every_item_and_ties_against_target():
    # 1-d "embeddings": score = query * item value. Items 1..5 (row 0 is padding).
    table = torch.tensor([[0.0], [5.0], [3.0], [3.0], [1.0], [4.0]])
    queries = torch.tensor([[1.0], [1.0], [1.0]])
    targets = torch.tensor([2, 1, 4])
    ranks, top = rank_and_top(queries, table, targets, None, k=3, item_chunk=2)
    # target 2 (score 3): items 1 (5), 5 (4) and its tie 3 (3) rank at or above it -> rank 4
    assert ranks.tolist() == [4.0, 1.0, 5.0]
    assert top[0, :2].tolist() == [1, 5]
    assert 0 not in top.flatten().tolist()


def test_excluded_items_leave_the_ranking_and_an_excluded_target_is_a_miss():
    table = torch.tensor([[0.0], [5.0], [3.0], [1.0], [4.0]])
    queries = torch.ones(2, 1)
    targets = torch.tensor([3, 1])
    exclude = (torch.tensor([0, 2, 3]), torch.tensor([1, 4, 1]))  # row 0 excludes 1 and 4; row 1 excludes 1
    ranks, top = rank_and_top(queries, table, targets, exclude, k=2, item_chunk=3)
    assert ranks[0].item() == 2.0  # only item 2 is left above item 3
    assert math.isinf(ranks[1].item())
    assert top[0].tolist() == [2, 3]


def test_a_list_longer_than_what_is_left_is_zero_filled_with_minus_infinity():
    table = torch.tensor([[0.0], [5.0], [3.0], [1.0]])
    exclude = (torch.tensor([0, 1]), torch.tensor([2]))
    items, scores = ExactSearch(table).top(torch.ones(1, 1), 4, exclude)
    assert items.tolist() == [[1, 3, 0, 0]]
    assert scores[0, :2].tolist() == [5.0, 1.0] and torch.isneginf(scores[0, 2:]).all()

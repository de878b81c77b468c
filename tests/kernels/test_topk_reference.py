"""``topk_scores`` and ``target_ranks`` against an independent reference written as plain Python loops over the
catalogue. Scores are small integers, so float32 products are exact and ties are real ties, decided by definition:
a rank counts every non-excluded item scoring at least the target's (ties against the target)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from kernels.topk import target_ranks, topk_scores


def integer_case(seed: int, queries: int = 7, items: int = 53, dim: int = 4):
    rng = np.random.default_rng(seed)
    q = rng.integers(-2, 3, size=(queries, dim))
    table = rng.integers(-2, 3, size=(items, dim))
    excluded = [sorted(set(rng.integers(0, items, size=rng.integers(0, 6)).tolist())) for _ in range(queries)]
    offsets = np.cumsum([0] + [len(e) for e in excluded])
    flat = np.array([i for e in excluded for i in e], dtype=np.int64)
    return q, table, excluded, (torch.from_numpy(offsets), torch.from_numpy(flat))


def reference_scores(q_row, table) -> list[int]:
    return [sum(int(a) * int(b) for a, b in zip(q_row, item)) for item in table]


@pytest.mark.parametrize("seed,chunk", [(0, 65536), (1, 5), (2, 17)])
def test_topk_matches_the_reference(seed, chunk):
    q, table, excluded, exclude = integer_case(seed)
    scores, idx = topk_scores(torch.tensor(q, dtype=torch.float32), torch.tensor(table, dtype=torch.float32), 10,
                              exclude=exclude, chunk_size=chunk)
    for row in range(len(q)):
        ref = reference_scores(q[row], table)
        allowed = sorted((ref[j] for j in range(len(table)) if j not in excluded[row]), reverse=True)
        assert scores[row].tolist() == allowed[:10]  # the k best scores, best first
        assert len(set(idx[row].tolist())) == 10 and not set(idx[row].tolist()) & set(excluded[row])
        assert [ref[j] for j in idx[row].tolist()] == scores[row].tolist()  # each index carries its own score


@pytest.mark.parametrize("seed,chunk", [(0, 65536), (3, 5), (4, 17)])
def test_target_ranks_match_the_reference(seed, chunk):
    q, table, excluded, exclude = integer_case(seed)
    targets = np.random.default_rng(seed + 100).integers(0, len(table), size=len(q))
    targets[0] = excluded[0][0] if excluded[0] else targets[0]  # an excluded target, when there is one to pick
    ranks = target_ranks(torch.tensor(q, dtype=torch.float32), torch.tensor(table, dtype=torch.float32),
                         torch.from_numpy(targets), exclude=exclude, chunk_size=chunk)
    for row in range(len(q)):
        ref = reference_scores(q[row], table)
        t = int(targets[row])
        if t in excluded[row]:
            expected = math.inf
        else:
            expected = sum(1 for j in range(len(table)) if j not in excluded[row] and ref[j] >= ref[t])
        assert float(ranks[row]) == expected

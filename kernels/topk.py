"""Exact top-k of ``queries @ item_table.T`` over the catalogue, walking it in item chunks.

Per-query exclusion lists come in CSR form ``(offsets, indices)``: query q excludes
``indices[offsets[q]:offsets[q+1]]``. Excluded items never appear in the result (unless fewer than k items are
left, in which case their score is −inf). Memory is O(Q·(chunk + k)).
"""

from __future__ import annotations

import math

import torch

from kernels._backend import fp32_under_autocast, resolve_backend

DEFAULT_CHUNK = 65536


def exclusion_pairs(exclude: tuple[torch.Tensor, torch.Tensor], num_queries: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Expand CSR exclusion lists into parallel (query row, item index) tensors."""
    offsets, indices = exclude
    offsets = torch.as_tensor(offsets, dtype=torch.long)
    if offsets.numel() != num_queries + 1:
        raise ValueError(f"exclusion offsets must have {num_queries + 1} entries, got {offsets.numel()}")
    counts = offsets[1:] - offsets[:-1]
    rows = torch.repeat_interleave(torch.arange(num_queries), counts)
    return rows, torch.as_tensor(indices, dtype=torch.long)


def _chunks(num_items: int, chunk_size: int) -> list[tuple[int, int]]:
    return [(start, min(start + chunk_size, num_items)) for start in range(0, num_items, chunk_size)]


def _exclusions(exclude, num_queries: int, device) -> tuple[torch.Tensor, torch.Tensor] | tuple[None, None]:
    if exclude is None:
        return None, None
    rows, cols = exclusion_pairs(exclude, num_queries)
    return rows.to(device), cols.to(device)


def _mask(scores: torch.Tensor, rows, cols, start: int, stop: int) -> torch.Tensor:
    if rows is not None:
        inside = (cols >= start) & (cols < stop)
        scores[rows[inside], cols[inside] - start] = float("-inf")
    return scores


@torch.no_grad()
@fp32_under_autocast
def topk_scores(
    queries: torch.Tensor,
    item_table: torch.Tensor,
    k: int,
    exclude: tuple[torch.Tensor, torch.Tensor] | None = None,
    chunk_size: int = DEFAULT_CHUNK,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (scores, indices), each (Q, k), best first."""
    backend = resolve_backend(backend, queries, item_table)
    num_items = item_table.shape[0]
    if not 1 <= k <= num_items:
        raise ValueError(f"k must be between 1 and the catalogue size {num_items}, got {k}")
    rows, cols = _exclusions(exclude, queries.shape[0], queries.device)
    if backend == "reference":
        chunk_size = num_items
    best_scores = best_idx = None
    for start, stop in _chunks(num_items, chunk_size):
        scores = _mask((queries @ item_table[start:stop].T).float(), rows, cols, start, stop)
        chunk_scores, chunk_idx = torch.topk(scores, min(k, stop - start), dim=1)
        chunk_idx += start
        if best_scores is None:
            best_scores, best_idx = chunk_scores, chunk_idx
        else:
            merged_scores = torch.cat([best_scores, chunk_scores], dim=1)
            merged_idx = torch.cat([best_idx, chunk_idx], dim=1)
            best_scores, order = torch.topk(merged_scores, k, dim=1)
            best_idx = torch.gather(merged_idx, 1, order)
    return best_scores, best_idx


@torch.no_grad()
def target_ranks(
    queries: torch.Tensor,
    item_table: torch.Tensor,
    targets: torch.Tensor,
    exclude: tuple[torch.Tensor, torch.Tensor] | None = None,
    chunk_size: int = DEFAULT_CHUNK,
) -> torch.Tensor:
    """1-based rank of each query's target among all non-excluded items, ties counted against the target
    (rank = #{j : s_j ≥ s_target}); ``inf`` when the target itself is excluded.

    The target's score is read from the same matmul that scores the other items (a separately computed dot
    product can differ in the last bit and break ties the wrong way); with several chunks that takes a second
    pass over the catalogue, with one chunk the scores are reused.
    """
    n_queries = queries.shape[0]
    rows, cols = _exclusions(exclude, n_queries, queries.device)
    chunks = _chunks(item_table.shape[0], chunk_size)
    target_scores = torch.empty(n_queries, device=queries.device)
    cached = None
    for start, stop in chunks:
        scores = (queries @ item_table[start:stop].T).float()
        here = (targets >= start) & (targets < stop)
        target_scores[here] = scores[here, targets[here] - start]
        if len(chunks) == 1:
            cached = scores
    better = torch.zeros(n_queries, dtype=torch.long, device=queries.device)
    for start, stop in chunks:
        scores = cached if cached is not None else (queries @ item_table[start:stop].T).float()
        better += (_mask(scores, rows, cols, start, stop) >= target_scores[:, None]).sum(dim=1)
    ranks = better.double()  # counted the target itself (s ≥ s): that makes it 1-based
    excluded = torch.zeros(n_queries, dtype=torch.bool, device=queries.device)
    if rows is not None:
        excluded[rows[cols == targets[rows]]] = True
    ranks[excluded | ~torch.isfinite(target_scores)] = math.inf
    return ranks

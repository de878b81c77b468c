"""Exact top-k of ``queries @ item_table.T`` over the catalogue, walking it in item chunks.

Per-query exclusion lists come in CSR form ``(offsets, indices)``: query q excludes
``indices[offsets[q]:offsets[q+1]]``. Excluded items never appear in the result (unless fewer than k items are
left, in which case their score is −inf). Memory is O(Q·(chunk + k)).
"""

from __future__ import annotations

import torch

from kernels._backend import resolve_backend

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


def topk_scores(
    queries: torch.Tensor,
    item_table: torch.Tensor,
    k: int,
    exclude: tuple[torch.Tensor, torch.Tensor] | None = None,
    chunk_size: int = DEFAULT_CHUNK,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (scores, indices), each (Q, k), best first."""
    backend = resolve_backend(backend)
    num_items = item_table.shape[0]
    if not 1 <= k <= num_items:
        raise ValueError(f"k must be between 1 and the catalogue size {num_items}, got {k}")
    rows, cols = exclusion_pairs(exclude, queries.shape[0]) if exclude is not None else (None, None)
    if rows is not None:
        rows, cols = rows.to(queries.device), cols.to(queries.device)
    if backend == "reference":
        chunk_size = num_items
    best_scores = best_idx = None
    for start in range(0, num_items, chunk_size):
        stop = min(start + chunk_size, num_items)
        scores = (queries @ item_table[start:stop].T).float()
        if rows is not None:
            inside = (cols >= start) & (cols < stop)
            scores[rows[inside], cols[inside] - start] = float("-inf")
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

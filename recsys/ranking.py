"""What ``SequentialModel.recommend`` returns, and the two ways it finds the top of the catalogue.

``recommend(batch, k, exclude, targets, searcher)`` is the one entry point that evaluation and the service call,
for score-based and generative models alike. Score-based models search their scoring table, exactly through
``kernels.topk`` (``ExactSearch``) or through any ``searcher`` with the same ``top`` method (the service passes its
faiss index); the target's rank is always the exact full-catalogue rank (ties count against it). Generative models
search by beam and rank the target by its place in the list (``ranks_in_lists``).

Exclusions are per-row lists of 1-based item ids in CSR form ``(offsets, items)``: row q excludes
``items[offsets[q]:offsets[q+1]]``; an excluded item is never returned and an excluded target is not ranked (inf).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from kernels.topk import target_ranks, topk_scores

Exclusions = tuple[torch.Tensor, torch.Tensor]
ITEM_CHUNK = 16384


@dataclass
class Ranking:
    """Top-k lists of a batch of B queries, best first."""

    items: torch.Tensor  # (B, k) int64 item ids in 1..V; 0 where the list ran short
    scores: torch.Tensor  # (B, k), −inf where the list ran short
    target_ranks: torch.Tensor | None = None  # (B,) float 1-based rank of each target, inf = not ranked


class Searcher(Protocol):
    def top(self, queries: torch.Tensor, k: int, exclude: Exclusions | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(item ids (Q, k) in 1..V, 0 where short; scores (Q, k)) of the largest inner products, best first."""


def exclusions(rows: Sequence[np.ndarray]) -> Exclusions:
    """CSR exclusions from one array of item ids per row."""
    offsets = np.zeros(len(rows) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(r) for r in rows])
    flat = np.concatenate([np.asarray(r, dtype=np.int64) for r in rows]) if offsets[-1] else np.zeros(0, np.int64)
    return torch.from_numpy(offsets), torch.from_numpy(flat)


def excluded_rows(exclude: Exclusions) -> list[np.ndarray]:
    """The distinct excluded item ids of each row (the inverse of ``exclusions``)."""
    offsets, flat = np.asarray(exclude[0]), np.asarray(exclude[1])
    return [np.unique(flat[offsets[i]:offsets[i + 1]]) for i in range(len(offsets) - 1)]


class ExactSearch:
    """Exact maximum inner product over a scoring table (V + 1, d) whose row 0 is padding and never ranked, in
    item chunks (memory O(Q × chunk)). The kernels see items 1..V as rows 0..V-1."""

    def __init__(self, table: torch.Tensor, item_chunk: int = ITEM_CHUNK):
        self.items = table[1:]
        self.item_chunk = item_chunk

    def _rows(self, exclude: Exclusions | None) -> Exclusions | None:
        return None if exclude is None else (exclude[0], torch.as_tensor(exclude[1]) - 1)

    def top(self, queries: torch.Tensor, k: int, exclude: Exclusions | None) -> tuple[torch.Tensor, torch.Tensor]:
        scores, rows = topk_scores(queries, self.items, min(k, self.items.shape[0]), exclude=self._rows(exclude),
                                   chunk_size=self.item_chunk)
        short = k - scores.shape[1]  # k beyond the catalogue: the list runs short
        scores = torch.nn.functional.pad(scores, (0, short), value=float("-inf"))
        items = torch.where(torch.isneginf(scores), 0, torch.nn.functional.pad(rows, (0, short)) + 1)
        return items, scores  # −inf marks an excluded item (or none) filling a short list

    def target_ranks(self, queries: torch.Tensor, targets: torch.Tensor, exclude: Exclusions | None) -> torch.Tensor:
        return target_ranks(queries, self.items, targets - 1, self._rows(exclude), chunk_size=self.item_chunk)


def ranks_in_lists(items: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """1-based position of each row's target in its list (B, n), inf when absent."""
    hit = items == targets[:, None]
    position = hit.float().argmax(dim=1) + 1.0
    return torch.where(hit.any(dim=1), position, torch.full_like(position, float("inf")))


def drop_excluded(items: torch.Tensor, scores: torch.Tensor, excluded: list[np.ndarray] | None, k: int
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """The first k items of each list that are real (> 0) and not excluded, moved to the front, 0-filled."""
    rows = items.cpu().numpy()
    out_items = torch.zeros((len(rows), k), dtype=items.dtype)
    out_scores = torch.full((len(rows), k), float("-inf"), dtype=scores.dtype)
    for i, row in enumerate(rows):
        keep = row > 0
        if excluded is not None:
            keep &= ~np.isin(row, excluded[i])
        kept = torch.from_numpy(np.flatnonzero(keep)[:k])
        out_items[i, :len(kept)] = items[i, kept].cpu()
        out_scores[i, :len(kept)] = scores[i, kept].cpu()
    return out_items.to(items.device), out_scores.to(scores.device)


def row_chunks(extra: np.ndarray, k: int, budget: int):
    """Consecutive row ranges whose rows × (k + the range's largest ``extra``) stays within ``budget`` (at least one
    row each): beam searches asked for k + |excluded| items grow with the longest exclusion list."""
    start, n = 0, len(extra)
    while start < n:
        stop, longest = start, 0
        while stop < n:
            longest = max(longest, k + int(extra[stop]))
            if stop > start and (stop - start + 1) * longest > budget:
                break
            stop += 1
        yield start, stop
        start = stop

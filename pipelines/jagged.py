"""Jagged (variable-length) per-user sequences and the split containers built from them.

Sequences are stored Arrow-style as one ``offsets`` array plus flat ``items``/``times`` arrays, so
a dataset of millions of events never becomes millions of small Python objects or a padded matrix
(the out-of-memory trap of prefix-copying data layers). Rows are sliced lazily by batchers.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Jagged:
    """Row ``i`` is ``items[offsets[i]:offsets[i+1]]`` with matching ``times``."""

    offsets: np.ndarray  # int64 (n + 1,), offsets[0] == 0
    items: np.ndarray  # int32 item_idx values, 1..V (0 is padding and never stored)
    times: np.ndarray  # int64, same length as items

    def __post_init__(self):
        offsets = np.ascontiguousarray(self.offsets, dtype=np.int64)
        items = np.ascontiguousarray(self.items, dtype=np.int32)
        times = np.ascontiguousarray(self.times, dtype=np.int64)
        if offsets.ndim != 1 or len(offsets) < 1 or offsets[0] != 0:
            raise ValueError("Jagged offsets must be 1-D, non-empty and start at 0")
        if offsets[-1] != len(items) or len(items) != len(times):
            raise ValueError("Jagged offsets[-1], len(items) and len(times) must agree")
        # frozen dataclass: normalise dtypes once, through object.__setattr__.
        object.__setattr__(self, "offsets", offsets)
        object.__setattr__(self, "items", items)
        object.__setattr__(self, "times", times)

    @classmethod
    def from_lengths(cls, lengths: np.ndarray, items: np.ndarray, times: np.ndarray) -> "Jagged":
        offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        return cls(offsets, items, times)

    @classmethod
    def empty(cls) -> "Jagged":
        return cls(np.zeros(1, np.int64), np.zeros(0, np.int32), np.zeros(0, np.int64))

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def row(self, i) -> tuple[np.ndarray, np.ndarray]:
        lo, hi = self.offsets[i], self.offsets[i + 1]
        return self.items[lo:hi], self.times[lo:hi]

    def row_ids(self) -> np.ndarray:
        """The row number of every stored event (int64, len == total events)."""
        return np.repeat(np.arange(len(self), dtype=np.int64), self.lengths())

    def positions(self) -> np.ndarray:
        """The 0-based position of every stored event inside its row."""
        return np.arange(len(self.items), dtype=np.int64) - np.repeat(self.offsets[:-1], self.lengths())

    def take(self, rows: np.ndarray) -> "Jagged":
        """The rows at ``rows`` (indices or a boolean mask), in that order; ``self`` itself when that is every row
        in order."""
        rows = np.asarray(rows)
        if rows.dtype == bool:
            rows = np.flatnonzero(rows)
        rows = rows.astype(np.int64, copy=False)
        if len(rows) == len(self) and np.array_equal(rows, np.arange(len(self))):
            return self  # every row in order: share the arrays (they may be a read-only memory map)
        starts, lengths = self.offsets[:-1][rows], self.lengths()[rows]
        # Gather every selected event at once: start of its row + its position inside the row.
        out_offsets = np.zeros(len(rows) + 1, dtype=np.int64)
        np.cumsum(lengths, out=out_offsets[1:])
        within = np.arange(out_offsets[-1], dtype=np.int64) - np.repeat(out_offsets[:-1], lengths)
        index = np.repeat(starts, lengths) + within
        return Jagged(out_offsets, self.items[index], self.times[index])

    def prefix(self, lengths: np.ndarray) -> "Jagged":
        """Keep the first ``lengths[i]`` events of each row (``0 <= lengths[i] <= row length``); ``self`` itself
        when that keeps everything."""
        lengths = np.asarray(lengths, dtype=np.int64)
        row_lengths = self.lengths()
        if len(lengths) != len(self) or np.any(lengths < 0) or np.any(lengths > row_lengths):
            raise ValueError("prefix lengths must be within each row's length")
        if np.array_equal(lengths, row_lengths):
            return self
        # The kept events as runs: per row, lengths[i] kept then the rest dropped (one byte per event, where
        # comparing positions would hold three int64 temporaries per event).
        runs = np.stack([lengths, row_lengths - lengths], axis=1).ravel()
        keep = np.repeat(np.tile(np.array([True, False]), len(self)), runs)
        return Jagged.from_lengths(lengths, self.items[keep], self.times[keep])

    def element(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(item, time) at ``positions[i]`` inside row ``i``."""
        index = self.offsets[:-1] + np.asarray(positions, dtype=np.int64)
        return self.items[index], self.times[index]


def content_hash(sequences: Jagged, num_items: int) -> str:
    """sha256 of exactly what models see: the jagged sequences and the catalogue size (the manifest's
    ``content_hash``). Hashes the arrays' memory in place, so a memory-mapped dataset is not copied."""
    digest = hashlib.sha256()
    digest.update(np.int64(num_items).tobytes())
    for array in (sequences.offsets, sequences.items, sequences.times):
        digest.update(memoryview(array))  # Jagged arrays are C-contiguous (see __post_init__)
    return digest.hexdigest()


@dataclass(frozen=True)
class EvalSet:
    """One evaluation example per user: the model input (history) and the next item to predict."""

    user_idx: np.ndarray  # int32 (n,)
    history: Jagged  # every event before the target, time-ordered
    target: np.ndarray  # int32 (n,)
    target_time: np.ndarray  # int64 (n,)

    def __len__(self) -> int:
        return len(self.user_idx)

    def take(self, rows: np.ndarray) -> "EvalSet":
        """The examples at ``rows`` (indices into this set), in that order."""
        rows = np.asarray(rows, dtype=np.int64)
        return EvalSet(self.user_idx[rows], self.history.take(rows), self.target[rows], self.target_time[rows])

    def sample(self, n: int | None, seed: int) -> "EvalSet":
        """A fixed random sample of n examples in their original order (the whole set when n is None or ≥ its
        size); the same seed always gives the same users."""
        if n is None or n >= len(self):
            return self
        rows = np.sort(np.random.default_rng(seed).choice(len(self), n, replace=False))
        return self.take(rows)


@dataclass(frozen=True)
class Split:
    kind: str  # "loo" or "temporal"
    train_users: np.ndarray  # int32
    train: Jagged  # never contains a validation/test target nor anything after it
    valid: EvalSet
    test: EvalSet

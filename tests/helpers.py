"""Small in-memory data for model and trainer tests (no pipeline build needed)."""

from __future__ import annotations

import numpy as np

from pipelines.jagged import Jagged
from pipelines.splits import leave_one_out_split


def toy_split(num_users: int = 60, num_items: int = 30, seed: int = 0, min_len: int = 4, max_len: int = 15):
    """Users walk items in strides (item i is followed by i+1 mod V most of the time): learnable structure."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(min_len, max_len + 1, num_users)
    rows = []
    for n in lengths:
        start = rng.integers(1, num_items + 1)
        seq = [(start + j - 1) % num_items + 1 for j in range(n)]
        rows.append(np.array(seq, dtype=np.int32))
    items = np.concatenate(rows)
    times = np.concatenate([np.arange(len(r), dtype=np.int64) * 10 for r in rows])
    sequences = Jagged.from_lengths(lengths, items, times)
    return leave_one_out_split(np.arange(num_users, dtype=np.int32), sequences), num_items

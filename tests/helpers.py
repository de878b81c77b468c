"""Small in-memory data for model and trainer tests (no pipeline build needed)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipelines.jagged import Jagged
from pipelines.splits import leave_one_out_split
from recsys.batching import SequenceBatch


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


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """max|x − ref| / max|ref| in fp32: the error measure of every parity test."""
    return ((x.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-12)).item()


def left_padded_batch(rows, width: int, times=None) -> SequenceBatch:
    """Rows of item ids left-padded to ``width``; timestamps default to one event a minute."""
    items = torch.zeros(len(rows), width, dtype=torch.long)
    stamps = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        items[i, width - len(row):] = torch.tensor(row)
        stamps[i, width - len(row):] = torch.tensor(times[i] if times else [60 * (j + 1) for j in range(len(row))])
    return SequenceBatch(items=items, times=stamps)


TINY_TIGER = {"codebook_size": 4, "text_dim": 8, "d_model": 32, "num_heads": 2, "head_dim": 16, "d_ff": 64,
              "num_encoder_layers": 1, "num_decoder_layers": 1, "dropout": 0.0, "max_len": 12}


def random_embeddings(n: int, dim: int = 8, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)


def fitted_tiny_tiger(num_items: int, seed: int = 0, **extra):
    """A random-weight TIGER whose semantic ids come from random 'text' embeddings (no encoder needed)."""
    from recsys.models import build_model

    torch.manual_seed(seed)
    model = build_model("tiger", num_items, {**TINY_TIGER, **extra})
    model.fit_semantic_ids(random_embeddings(num_items, TINY_TIGER["text_dim"]))
    return model


def cpu_kernel_missing() -> str | None:
    """Why the fused C kernels (backend ``cpu``) cannot be built here, or None when they can."""
    from kernels import _cpu

    return None if _cpu.cpu_kernels() is not None else _cpu.cpu_unavailable_reason


# Kernel backends that run on CPU tensors besides the reference; ``cpu`` skips (with the reason) without a compiler.
_CPU_MISSING = cpu_kernel_missing()
CPU = pytest.param("cpu", marks=pytest.mark.skipif(_CPU_MISSING is not None, reason=str(_CPU_MISSING)))
FAST = ["torch", CPU]

"""Small in-memory data for model and trainer tests (no pipeline build needed)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

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


TINY_SID_DECODER = {"codebook_size": 4, "text_dim": 8, "d_model": 32, "num_heads": 2, "d_ff": 64, "num_layers": 2,
                    "dropout": 0.0, "max_len": 12}
TINY_GENERATIVE = {"tiger": TINY_TIGER, "sid_decoder": TINY_SID_DECODER}


def fitted_tiny_generative(name: str, num_items: int, seed: int = 0, **extra):
    """A random-weight semantic-id model (tiger, sid_decoder) whose semantic ids come from random 'text'
    embeddings (no encoder needed)."""
    from recsys.models import build_model

    torch.manual_seed(seed)
    model = build_model(name, num_items, {**TINY_GENERATIVE[name], **extra})
    model.fit_semantic_ids(random_embeddings(num_items, TINY_GENERATIVE[name]["text_dim"]))
    return model


def successor_rows(num_items: int, n_rows: int = 200, seed: int = 0) -> Jagged:
    """Rows of 8 items in which item i is always followed by i+1 (cyclically)."""
    rng = np.random.default_rng(seed)
    rows = [(np.arange(s, s + 8) % num_items) + 1 for s in rng.integers(0, num_items, n_rows)]
    return Jagged.from_lengths(np.full(len(rows), 8), np.concatenate(rows), np.tile(np.arange(8) * 60, len(rows)))


def trained_on(model, train: Jagged, epochs: int, lr: float = 3e-3, batch_size: int = 64):
    """``model`` after ``epochs`` passes of Adam over its own training batches of ``train``, in eval mode."""
    torch.set_num_threads(1)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    batches = model.train_batches(np.arange(len(train.lengths())), train, batch_size)
    for epoch in range(epochs):
        model.train()
        for batch in batches.epoch(np.random.default_rng(epoch)):
            optimizer.zero_grad()
            model.loss(batch).backward()
            optimizer.step()
    return model.eval()


def fitted_tiny_tiger(num_items: int, seed: int = 0, **extra):
    return fitted_tiny_generative("tiger", num_items, seed, **extra)


def cpu_kernel_missing() -> str | None:
    """Why the fused C kernels (backend ``cpu``) cannot be built here, or None when they can."""
    from kernels import _cpu

    return None if _cpu.cpu_kernels() is not None else _cpu.cpu_unavailable_reason


# Kernel backends that run on CPU tensors besides the reference; ``cpu`` skips (with the reason) without a compiler.
_CPU_MISSING = cpu_kernel_missing()
CPU = pytest.param("cpu", marks=pytest.mark.skipif(_CPU_MISSING is not None, reason=str(_CPU_MISSING)))
FAST = ["torch", CPU]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_up(base: str, proc: subprocess.Popen, timeout: float, what: str, log: Path | None = None) -> None:
    """Poll ``base``/health until it answers; fail (with the log's tail) if ``proc`` exits or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            urllib.request.urlopen(base + "/health", timeout=2)
            return
        except OSError:
            tail = f":\n{log.read_text()[-4000:]}" if log is not None else ""
            assert proc.poll() is None and time.monotonic() < deadline, f"{what} did not start{tail}"
            time.sleep(0.5)


@contextmanager
def serve_mlflow(*args: str, timeout: float, log: Path | None = None):
    """``mlflow server ARGS`` on a free port of 127.0.0.1; yields its http:// address once /health answers. Its
    worker processes outlive a plain kill of the parent, so it runs in a session of its own and the whole group is
    stopped (SIGTERM, then SIGKILL)."""
    port = free_port()
    output = open(log, "w") if log is not None else subprocess.DEVNULL
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", *args, "--host", "127.0.0.1",
                               "--port", str(port)], start_new_session=True, stdout=output, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(base, server, timeout, "mlflow server", log)
        yield base
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        if log is not None:
            output.close()

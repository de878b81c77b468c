"""SASRec training-epoch benchmark on Amazon Beauty (not a test): the platform's epoch against a plain padded one.

(a) ours: ``build_model("sasrec")`` with its default configuration (hidden 64, 2 blocks, 1 head, dropout 0.5,
    max_len 50, full cross-entropy over the catalogue) trained for one epoch through ``Trainer._train_epoch`` with
    the default ``TrainConfig`` (batch 128, Adam, lr 2e-3, grad clip 5), training only, no validation;
(b) baseline: the SASRec a new user writes from the paper (Kang & McAuley, ICDM 2018, Eq. 2-7), kept in this file:
    each user's last ``max_len + 1`` training events, left-padded to ``max_len``; ``nn.Embedding`` items plus learned
    positions; blocks of LayerNorm, causal ``F.scaled_dot_product_attention``, residual, LayerNorm, point-wise FFN;
    full logits ``hidden @ item_table.T`` over the catalogue and ``F.cross_entropy`` ignoring the pads; batch 128,
    Adam with the same learning rate and betas.

Both run in this process with the same number of torch threads, interleaved step by step (one training step of
ours, one of the baseline, ...), each step timed alone, so that the load of the shared machine falls on both alike;
each figure is the median over ``--epochs`` epochs after a short untimed warm-up of each. ``--previous`` adds a
third contender interleaved the same way: ours with the kernels it had before (the chunked cross-entropy path of
``kernels.linear_cross_entropy`` and torch's per-parameter Adam loop), same initial weights, same batches.
``--max-batches K`` times only the first K steps of each epoch (our batch order is shuffled, so they are a fair
sample of its widths) and scales the time to a whole epoch, for a machine too loaded to time whole epochs; the
JSON says so (``extrapolated_from_batches``). Writes reports/benchmarks/sasrec_epoch.json with seconds per epoch
of each and the ratio baseline / ours (the target is at least 2.5). Skips with a message when the Beauty raw data
(../shared/data/amazon-beauty) is absent.
Usage: ``python tests/benchmarks/sasrec_epoch.py [--epochs 2] [--threads N] [--max-batches K] [--previous]``.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from kernels.atomic import atomic_write_bytes  # noqa: E402

BEAUTY = REPO.parent / "shared" / "data" / "amazon-beauty"
TARGET_RATIO = 2.5


# ----------------------------------------------------------------------------------------------------------------
# (b) the plain padded baseline


class PlainBlock(nn.Module):
    def __init__(self, d: int, heads: int, dropout: float):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.norm1 = nn.LayerNorm(d, eps=1e-8)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.norm2 = nn.LayerNorm(d, eps=1e-8)
        self.ffn = nn.Sequential(nn.Linear(d, d), nn.ReLU(), nn.Dropout(dropout), nn.Linear(d, d), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
        x = x + self.proj(att.transpose(1, 2).reshape(b, t, d))
        return x + self.ffn(self.norm2(x))


class PlainSASRec(nn.Module):
    def __init__(self, num_items: int, d: int = 64, blocks: int = 2, heads: int = 1, dropout: float = 0.5,
                 max_len: int = 50):
        super().__init__()
        self.d = d
        self.items = nn.Embedding(num_items + 1, d, padding_idx=0)
        self.positions = nn.Embedding(max_len, d)
        self.dropout = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(PlainBlock(d, heads, dropout) for _ in range(blocks))
        self.norm = nn.LayerNorm(d, eps=1e-8)

    def forward(self, seq: torch.Tensor) -> torch.Tensor:
        pad = (seq == 0).unsqueeze(-1)
        x = self.items(seq) * math.sqrt(self.d) + self.positions.weight[None, : seq.shape[1]]
        x = self.dropout(x).masked_fill(pad, 0.0)
        for block in self.blocks:
            x = block(x).masked_fill(pad, 0.0)
        return self.norm(x)

    def loss(self, seq: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = self.forward(seq) @ self.items.weight.T  # (B, T, V+1): every position, the whole catalogue
        return F.cross_entropy(logits.view(-1, logits.shape[-1]), target.view(-1), ignore_index=0)


def padded_training_data(train, max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every user's last ``max_len + 1`` events as (inputs, next-item targets), left-padded to ``max_len``."""
    lengths = train.lengths()
    rows = np.flatnonzero(lengths >= 2)
    seq = np.zeros((len(rows), max_len), dtype=np.int64)
    tgt = np.zeros((len(rows), max_len), dtype=np.int64)
    for i, r in enumerate(rows):
        events = train.items[train.offsets[r] : train.offsets[r + 1]][-(max_len + 1) :]
        seq[i, max_len - len(events) + 1 :] = events[:-1]
        tgt[i, max_len - len(events) + 1 :] = events[1:]
    return torch.from_numpy(seq), torch.from_numpy(tgt)


def baseline_steps(model: PlainSASRec, optimizer, seq, tgt, batch_size: int, generator):
    """One epoch of the baseline, yielding after each training step (so that the caller can interleave)."""
    model.train()
    order = torch.randperm(len(seq), generator=generator)
    for start in range(0, len(seq), batch_size):
        rows = order[start : start + batch_size]
        loss = model.loss(seq[rows], tgt[rows])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        yield


# ----------------------------------------------------------------------------------------------------------------
# (a) the platform's epoch


class OneBatch:
    """A batches object holding one batch, so that ``Trainer._train_epoch`` runs one step of it."""

    def __init__(self, batch):
        self.batch = batch

    def epoch(self, rng):
        yield self.batch

    def __len__(self) -> int:
        return 1


def platform_steps(trainer, model, optimizer, batches, epoch: int, previous_kernels: bool = False):
    """One epoch of ours through ``Trainer._train_epoch`` (one call per batch; building each batch is timed too),
    yielding after each step. ``previous_kernels``: the chunked cross-entropy path (what ran before the one-pass
    path existed), for the before/after comparison."""
    from recsys.trainer import LossForward

    step_module = LossForward(model)  # what the trainer steps (DistributedDataParallel wraps it under torchrun)
    rng = np.random.default_rng([trainer.config.seed, epoch])
    for batch in batches.epoch(rng):
        if previous_kernels:
            with chunked_cross_entropy():
                trainer._train_epoch(step_module, optimizer, OneBatch(batch), epoch)
        else:
            trainer._train_epoch(step_module, optimizer, OneBatch(batch), epoch)
        yield


@contextlib.contextmanager
def chunked_cross_entropy():
    import recsys.losses
    from kernels import linear_cross_entropy

    recsys.losses.linear_cross_entropy = functools.partial(linear_cross_entropy, max_logits_bytes=0)
    try:
        yield
    finally:
        recsys.losses.linear_cross_entropy = linear_cross_entropy


def interleaved_epoch(steppers: dict, limit: int | None) -> dict[str, float]:
    """Run the contenders' steps round-robin (one step of each in turn, so that the load of a shared machine
    falls on all alike), each timed alone; returns seconds per epoch of each, scaled up from ``limit`` steps."""
    seconds = {name: 0.0 for name in steppers}
    done = {name: 0 for name in steppers}
    totals = {name: total for name, (_, total) in steppers.items()}
    live = {name: gen for name, (gen, _) in steppers.items()}
    while live:
        for name in list(live):
            start = time.perf_counter()
            try:
                next(live[name])
            except StopIteration:
                del live[name]
                continue
            seconds[name] += time.perf_counter() - start
            done[name] += 1
            if limit is not None and done[name] >= limit:
                del live[name]
    return {name: seconds[name] * totals[name] / done[name] for name in steppers}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=2, help="timed epochs of each (interleaved)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    parser.add_argument("--max-batches", type=int, default=None,
                        help="time only the first K batches of each epoch and scale to a whole epoch")
    parser.add_argument("--previous", action="store_true",
                        help="also time ours with the previous kernels (chunked cross-entropy, unfused Adam)")
    parser.add_argument("--data-root", default=None, help="where Beauty is built (default: a temporary directory)")
    parser.add_argument("--out", default=str(REPO / "reports" / "benchmarks" / "sasrec_epoch.json"))
    args = parser.parse_args()
    if not BEAUTY.is_dir():
        print(f"skipped: Amazon Beauty raw data not present at {BEAUTY}")
        return
    if args.threads:
        torch.set_num_threads(args.threads)

    from pipelines.build import build_dataset
    from pipelines.dataset import load_dataset
    from recsys.models import build_model
    from recsys.trainer import Trainer, TrainConfig, _optimizer

    with tempfile.TemporaryDirectory() as tmp:
        ds = load_dataset(build_dataset("amazon-beauty", BEAUTY, data_root=args.data_root or tmp))
        split = ds.split()

    cfg = TrainConfig()
    torch.manual_seed(cfg.seed)
    ours = build_model("sasrec", ds.num_items, {})
    trainer = Trainer(cfg, progress=False)
    ours_opt = _optimizer(ours, cfg)
    batches = ours.train_batches(split.train_users, split.train, cfg.batch_size)

    torch.manual_seed(cfg.seed)
    mc = ours.config
    plain = PlainSASRec(ds.num_items, mc.hidden_size, mc.num_blocks, mc.num_heads, mc.dropout, mc.max_len)
    plain_opt = torch.optim.Adam(plain.parameters(), lr=cfg.lr, betas=cfg.betas)
    seq, tgt = padded_training_data(split.train, mc.max_len)
    generator = torch.Generator().manual_seed(cfg.seed)

    contenders = {
        "ours": lambda e: (platform_steps(trainer, ours, ours_opt, batches, e), len(batches)),
        "plain_padded": lambda e: (baseline_steps(plain, plain_opt, seq, tgt, cfg.batch_size, generator),
                                   -(-len(seq) // cfg.batch_size)),
    }
    if args.previous:
        torch.manual_seed(cfg.seed)
        prev = build_model("sasrec", ds.num_items, {})
        # the optimiser as it was before it was fused: torch's per-parameter loop on CPU tensors
        prev_opt = torch.optim.Adam(prev.parameters(), lr=cfg.lr, betas=cfg.betas, foreach=False)
        contenders["ours_previous_kernels"] = lambda e: (
            platform_steps(trainer, prev, prev_opt, batches, e, previous_kernels=True), len(batches))

    # warm-up: first calls of each kernel, first page faults of each buffer size
    interleaved_epoch({name: make(0) for name, make in contenders.items()}, limit=3)
    per_epoch = {name: [] for name in contenders}
    for epoch in range(1, args.epochs + 1):
        seconds = interleaved_epoch({name: make(epoch) for name, make in contenders.items()}, args.max_batches)
        for name, value in seconds.items():
            per_epoch[name].append(value)
        print(f"epoch {epoch}: " + ", ".join(f"{n} {v:.2f} s" for n, v in seconds.items())
              + f" (ratio {seconds['plain_padded'] / seconds['ours']:.2f})", file=sys.stderr)

    ours_s, base_s = per_epoch["ours"], per_epoch["plain_padded"]
    ours_med, base_med = statistics.median(ours_s), statistics.median(base_s)
    base_batches = -(-len(seq) // cfg.batch_size)
    k = args.max_batches
    result = {
        "dataset": "amazon-beauty",
        "num_items": ds.num_items,
        "threads": torch.get_num_threads(),
        "epochs_timed": args.epochs,
        "extrapolated_from_batches": k,
        "ours": {"seconds_per_epoch": ours_med, "epochs_seconds": ours_s, "batches": len(batches),
                 "targets": batches.num_targets()},
        "plain_padded": {"seconds_per_epoch": base_med, "epochs_seconds": base_s,
                         "batches": base_batches, "targets": int((tgt != 0).sum()),
                         "padded_positions": int(tgt.numel())},
        "ratio_plain_to_ours": base_med / ours_med,
        "per_epoch_ratios": [b / o for b, o in zip(base_s, ours_s)],
        "target_ratio": TARGET_RATIO,
        **({"ours_previous_kernels": {"seconds_per_epoch": statistics.median(per_epoch["ours_previous_kernels"]),
                                      "epochs_seconds": per_epoch["ours_previous_kernels"]},
            "ratio_plain_to_ours_previous_kernels": base_med / statistics.median(per_epoch["ours_previous_kernels"]),
            "ratio_previous_to_ours": statistics.median(per_epoch["ours_previous_kernels"]) / ours_med}
           if args.previous else {}),
        "meets_target": base_med / ours_med >= TARGET_RATIO,
        "machine": {"cpus": __import__("os").cpu_count(), "torch": torch.__version__},
    }
    out = Path(args.out)
    atomic_write_bytes(out, (json.dumps(result, indent=2) + "\n").encode())
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

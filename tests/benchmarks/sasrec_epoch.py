"""SASRec training-epoch benchmark on Amazon Beauty (not a test): the platform's epoch against a plain padded one.

(a) ours: ``build_model("sasrec")`` with its default configuration (hidden 64, 2 blocks, 1 head, dropout 0.5,
    max_len 50, full cross-entropy over the catalogue) trained for one epoch through ``Trainer._train_epoch`` with
    the default ``TrainConfig`` (batch 128, Adam, lr 2e-3, grad clip 5), training only, no validation;
(b) baseline: the SASRec a new user writes from the paper (Kang & McAuley, ICDM 2018, Eq. 2-7), kept in this file:
    each user's last ``max_len + 1`` training events, left-padded to ``max_len``; ``nn.Embedding`` items plus learned
    positions; blocks of LayerNorm, causal ``F.scaled_dot_product_attention``, residual, LayerNorm, point-wise FFN;
    full logits ``hidden @ item_table.T`` over the catalogue and ``F.cross_entropy`` ignoring the pads; batch 128,
    Adam with the same learning rate and betas.

Both run in this process with the same number of torch threads, epochs interleaved (ours, baseline, ours, ...)
so that the load of the shared machine falls on both alike; each figure is the median over ``--epochs`` epochs
after a short untimed warm-up of each. ``--max-batches K`` times only the first K batches of each epoch (both
sides; our batch order is shuffled, so they are a fair sample of its widths) and scales the time to a whole epoch,
for a machine too loaded to time whole epochs; the JSON says so (``extrapolated_from_batches``). Writes reports/benchmarks/sasrec_epoch.json with seconds per epoch of each
and the ratio baseline / ours (the target is at least 2.5). Skips with a message when the Beauty raw data
(../shared/data/amazon-beauty) is absent.
Usage: ``python tests/benchmarks/sasrec_epoch.py [--epochs 2] [--threads N] [--max-batches K]``.
"""

from __future__ import annotations

import argparse
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

from pipelines.atomic import atomic_write_bytes  # noqa: E402

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


def baseline_epoch(model: PlainSASRec, optimizer, seq, tgt, batch_size: int, generator, limit: int | None = None):
    model.train()
    order = torch.randperm(len(seq), generator=generator)
    for n, start in enumerate(range(0, len(seq), batch_size)):
        if limit is not None and n >= limit:
            break
        rows = order[start : start + batch_size]
        loss = model.loss(seq[rows], tgt[rows])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return float(loss.detach())


# ----------------------------------------------------------------------------------------------------------------
# (a) the platform's epoch


class FirstBatches:
    """The first ``limit`` batches of an epoch (for the warm-up)."""

    def __init__(self, batches, limit: int):
        self.batches, self.limit = batches, limit

    def epoch(self, rng):
        for n, batch in enumerate(self.batches.epoch(rng)):
            if n >= self.limit:
                return
            yield batch

    def __len__(self) -> int:
        return min(self.limit, len(self.batches))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=2, help="timed epochs of each (interleaved)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    parser.add_argument("--max-batches", type=int, default=None,
                        help="time only the first K batches of each epoch and scale to a whole epoch")
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

    # warm-up: first calls of each kernel, first page faults of each buffer size
    trainer._train_epoch(ours, ours_opt, FirstBatches(batches, 3), 0)
    baseline_epoch(plain, plain_opt, seq, tgt, cfg.batch_size, generator, limit=3)

    base_batches = -(-len(seq) // cfg.batch_size)
    k = args.max_batches
    timed = FirstBatches(batches, k) if k else batches
    ours_scale = len(batches) / len(timed)
    base_scale = base_batches / min(k, base_batches) if k else 1.0
    ours_s, base_s = [], []
    for epoch in range(1, args.epochs + 1):
        start = time.perf_counter()
        trainer._train_epoch(ours, ours_opt, timed, epoch)
        ours_s.append((time.perf_counter() - start) * ours_scale)
        start = time.perf_counter()
        baseline_epoch(plain, plain_opt, seq, tgt, cfg.batch_size, generator, limit=k)
        base_s.append((time.perf_counter() - start) * base_scale)
        print(f"epoch {epoch}: ours {ours_s[-1]:.2f} s, plain padded {base_s[-1]:.2f} s "
              f"(ratio {base_s[-1] / ours_s[-1]:.2f})", file=sys.stderr)

    ours_med, base_med = statistics.median(ours_s), statistics.median(base_s)
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
        "meets_target": base_med / ours_med >= TARGET_RATIO,
        "machine": {"cpus": __import__("os").cpu_count(), "torch": torch.__version__},
    }
    out = Path(args.out)
    atomic_write_bytes(out, (json.dumps(result, indent=2) + "\n").encode())
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

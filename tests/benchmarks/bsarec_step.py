"""BSARec training-step benchmark on Amazon Beauty (not a test; issue [4]): what makes its prefix training
affordable on a CPU.

Three variants of ``build_model("bsarec")`` (the paper's Beauty settings, batch 256, every training prefix at its
last position, full cross-entropy, Adam) from the same initial weights on the same batches:
(a) plain: every block computes all window positions and dropout is ``nn.Dropout`` (what a reader of the paper
    writes first: the reference code's cost);
(b) last row: the last block computes only the last position (the only one scored);
(c) ours: (b) plus ``recsys.nn.FastDropout`` masks.
The steps are interleaved (one of each in turn) and each is timed alone, so the load of a shared machine falls on
all alike; a figure is the median step time times the steps of an epoch. Writes reports/benchmarks/bsarec_step.json
with seconds per epoch and the ratios plain / ours and last-row / ours. Skips when ../shared/data/amazon-beauty is
absent.
Usage: ``python tests/benchmarks/bsarec_step.py [--steps 40] [--threads 2]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
RAW = REPO.parent / "shared" / "data" / "amazon-beauty"


def variant(model, last_row: bool, fast_dropout: bool):
    """``model`` switched to a variant in place: blocks computing every row, and/or torch's dropout."""
    from torch import nn

    from recsys.nn import FastDropout

    for block in model.blocks:
        block.forward_all = not last_row
    if not fast_dropout:
        for parent in model.modules():
            for name, child in parent.named_children():
                if isinstance(child, FastDropout):
                    setattr(parent, name, nn.Dropout(child.p))
    return model


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(REPO / "reports" / "benchmarks" / "bsarec_step.json"))
    args = parser.parse_args()
    if not RAW.is_dir():
        print(f"skipped: no Amazon Beauty raw data at {RAW}")
        return 0
    import numpy as np
    import torch

    from kernels.atomic import atomic_write_bytes
    from recsys.models import build_model
    from recsys.models.bsarec import BSARecBlock
    from recsys.run import resolve_dataset

    torch.set_num_threads(args.threads)
    ds = resolve_dataset("amazon-beauty", raw_dir=RAW)
    split = ds.split()
    original = BSARecBlock.forward

    def forward(self, x, padding, last_only=False):  # the plain variant computes every row, then keeps the last
        if getattr(self, "forward_all", False) and last_only:
            return original(self, x, padding, False)[:, -1:]
        return original(self, x, padding, last_only)

    BSARecBlock.forward = forward
    names = {"plain": (False, False), "last_row": (True, False), "ours": (True, True)}
    models, optimizers = {}, {}
    for name, (last_row, fast) in names.items():
        torch.manual_seed(0)
        models[name] = variant(build_model("bsarec", ds.num_items), last_row, fast)
        optimizers[name] = torch.optim.Adam(models[name].parameters(), lr=5e-4)
    batches = models["ours"].train_batches(split.train_users, split.train, 256)
    times = {name: [] for name in names}
    for i, batch in enumerate(batches.epoch(np.random.default_rng(0))):
        if i >= args.steps + 3:
            break
        for name, model in models.items():
            start = time.perf_counter()
            loss = model.loss(batch)
            optimizers[name].zero_grad()
            loss.backward()
            optimizers[name].step()
            if i >= 3:  # warm-up steps untimed
                times[name].append(time.perf_counter() - start)
    per_epoch = {name: statistics.median(t) * len(batches) for name, t in times.items()}
    result = {"seconds_per_epoch": per_epoch, "steps_per_epoch": len(batches), "timed_steps": args.steps,
              "threads": args.threads, "ratio_plain_to_ours": per_epoch["plain"] / per_epoch["ours"],
              "ratio_last_row_to_ours": per_epoch["last_row"] / per_epoch["ours"]}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(Path(args.out), json.dumps(result, indent=2).encode())
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

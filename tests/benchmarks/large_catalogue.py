"""Large-catalogue benchmark (not a test): SASRec training steps over 1,000,000 items with each loss.

Losses: full softmax cross-entropy through ``kernels.linear_cross_entropy`` (``loss=ce``) and the sampled softmax
with logQ correction of Yi et al., RecSys 2019 (``loss=sampled_softmax``, recsys.losses.SampledSoftmax: in-batch
positives + shared negatives drawn uniformly or by popularity). SASRec: hidden 64, 2 blocks, max_len 50, the
model's other defaults; Adam (lr 1e-3) with the trainer's gradient clipping at 5.0, batch 128 sequences.

Synthetic batches: item popularity is Zipf-like (p(rank r) ∝ 1/r^1.0 over the 1M items, ranks shuffled over ids);
sequence lengths (events) uniform in 2..51 (so 1..50 targets, mean 25.5), and, as the trainer's length-bucketed
batches do, every row of one batch has the same length (drawn per batch). The same seeded batches are used for every
loss. The training-split counts handed to ``prepare`` are one multinomial draw of ``--epoch-targets`` targets
(default 20M) from that popularity.

Measured per loss: seconds per step (warm-up step excluded) and per training target, the projected epoch time for
``--epoch-targets`` targets (seconds per target × targets: time per step is linear in the targets for full CE and
nearly so for sampled softmax at these batch sizes), peak RSS (VmHWM of a process that runs only that loss) and
the RSS once the model and optimiser exist, and the bytes a DDP gradient all-reduce moves per step: DDP
all-reduces every parameter's gradient (dense, in 25 MB buckets), so the 1M×64 fp32 item table (256 MB) dominates
with either loss; the rows a step actually touches (inputs ∪ targets ∪ shared negatives for the sampled loss,
every row for full CE) give what a sparse-gradient all-reduce would move instead.

Single process: each loss runs in its own child process (clean peak RSS). ``--ddp`` (under torchrun): plain
``torch.nn.parallel.DistributedDataParallel`` over gloo on the CPU wraps a module whose forward is
``model.loss(batch)``; each rank trains on its half of the global batch (its own sampled negatives and in-batch
candidates), with torch's RNG seeded per rank. Under torchrun, rank 0 merges its figures into the report's "ddp"
section; ``--with-ddp`` makes the plain run launch one torchrun per loss itself.

Writes reports/benchmarks/large_catalogue.json. Usage:
    python tests/benchmarks/large_catalogue.py [--steps 200] [--steps-ce 3] [--with-ddp --ddp-steps 20]
    torchrun --nproc-per-node 2 tests/benchmarks/large_catalogue.py --ddp [--losses ce sampled_uniform]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from kernels.atomic import atomic_write_bytes  # noqa: E402

LOSSES = {
    "ce": {"loss": "ce"},
    "sampled_uniform": {"loss": "sampled_softmax", "negative_sampling": "uniform"},
    "sampled_popularity": {"loss": "sampled_softmax", "negative_sampling": "popularity"},
}
DEFAULT_OUT = REPO / "reports" / "benchmarks" / "large_catalogue.json"


def rss_bytes(field: str = "VmRSS") -> int:
    """VmRSS (now) or VmHWM (peak) of this process, from /proc."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


class ZipfBatches:
    """Seeded synthetic causal training batches over a Zipf-like catalogue (see the module docstring)."""

    def __init__(self, num_items: int, exponent: float = 1.0, seed: int = 0):
        rng = np.random.default_rng(seed)
        weights = 1.0 / np.arange(1, num_items + 1) ** exponent
        self.probs = weights / weights.sum()
        self.cdf = np.cumsum(self.probs)
        self.ids = rng.permutation(num_items) + 1  # rank r -> item id
        self.num_items = num_items

    def item_probs(self) -> np.ndarray:
        """(V+1,) probability of each item id (index 0 = padding)."""
        out = np.zeros(self.num_items + 1)
        out[self.ids] = self.probs
        return out

    def training_counts(self, targets: int, seed: int = 1) -> np.ndarray:
        return np.random.default_rng(seed).multinomial(targets, self.item_probs()).astype(np.int64)

    def draw(self, rng: np.random.Generator, n: int) -> np.ndarray:
        ranks = np.minimum(np.searchsorted(self.cdf, rng.random(n) * self.cdf[-1]), self.num_items - 1)
        return self.ids[ranks]

    def batch(self, rng: np.random.Generator, batch_size: int, max_len: int):
        from recsys.batching import SequenceBatch

        events = int(rng.integers(2, max_len + 2))  # 1..max_len targets
        seq = torch.from_numpy(self.draw(rng, batch_size * events).reshape(batch_size, events).astype(np.int64))
        items, targets = seq[:, :-1], seq[:, 1:]
        return SequenceBatch(items=items, times=torch.zeros_like(items), targets=targets)


def build(loss_name: str, num_items: int, max_len: int, num_negatives: int):
    from recsys.models import build_model

    settings = {"hidden_size": 64, "num_blocks": 2, "max_len": max_len, **LOSSES[loss_name]}
    if settings["loss"] == "sampled_softmax":
        settings["num_negatives"] = num_negatives
    return build_model("sasrec", num_items, settings)


def gradient_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)


def touched_rows(batch, loss_fn, negatives: torch.Tensor | None, num_items: int) -> int:
    """Rows of the item table whose gradient a step makes non-zero."""
    if loss_fn.name == "ce":
        return num_items  # full softmax: every item's row gets a gradient
    parts = [batch.items.flatten(), batch.targets.flatten()] + ([negatives] if negatives is not None else [])
    rows = torch.unique(torch.cat(parts))
    return int((rows != 0).sum())


def train_steps(args, loss_name: str, rank: int = 0, world: int = 1) -> dict:
    """Run the steps of one loss in this process (DDP-wrapped when world > 1) and return its figures."""
    torch.manual_seed(args.seed + rank)  # per-rank RNG, as the trainer seeds it
    data = ZipfBatches(args.items, seed=args.seed)
    model = build(loss_name, args.items, args.max_len, args.num_negatives)
    model.loss_fn.prepare(data.training_counts(args.epoch_targets))
    model.train()
    module = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        class LossModule(torch.nn.Module):
            def __init__(self, inner):
                super().__init__()
                self.inner = inner

            def forward(self, items, targets):
                from recsys.batching import SequenceBatch

                return self.inner.loss(SequenceBatch(items=items, times=torch.zeros_like(items), targets=targets))

        module = DistributedDataParallel(LossModule(model))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, betas=(0.9, 0.98))
    rss_ready = rss_bytes()
    steps = args.steps_ce if (loss_name == "ce" and args.steps_ce) else args.steps
    rng = np.random.default_rng([args.seed, 7])  # same batches for every loss; ranks split each global batch
    per_rank = args.batch_size // world
    times, targets, rows_touched, losses = [], [], [], []
    drawn = {}
    if loss_name != "ce":  # record the shared negatives each step draws (for the touched-rows count)
        sample = model.loss_fn.sample_negatives

        def recording(num_items, device):
            drawn["last"] = sample(num_items, device)
            return drawn["last"]

        model.loss_fn.sample_negatives = recording
    for step in range(args.warmup + steps):
        full = data.batch(rng, args.batch_size, args.max_len)
        sl = slice(rank * per_rank, (rank + 1) * per_rank)
        items, tgt = full.items[sl], full.targets[sl]
        start = time.perf_counter()
        if world > 1:
            loss = module(items, tgt)
        else:
            from recsys.batching import SequenceBatch

            loss = model.loss(SequenceBatch(items=items, times=torch.zeros_like(items), targets=tgt))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        optimizer.step()
        elapsed = time.perf_counter() - start
        if step >= args.warmup:
            times.append(elapsed)
            targets.append(int((tgt != 0).sum()))
            losses.append(loss.item())
            from recsys.batching import SequenceBatch

            rows_touched.append(touched_rows(SequenceBatch(items=items, times=items, targets=tgt), model.loss_fn,
                                             drawn.get("last"), args.items))
        if rank == 0 and args.verbose:
            print(f"[{loss_name} w{world}] step {step} {elapsed:.3f}s loss {loss.item():.3f}", file=sys.stderr,
                  flush=True)
    seconds_per_target = sum(times) / sum(targets)
    # every rank processes its own targets at the same time: the job's targets per second is world × a rank's
    epoch_seconds = args.epoch_targets * seconds_per_target / world
    grad = gradient_bytes(model)
    table = model.item_embedding.weight
    mean_rows = float(np.mean(rows_touched))
    return {
        "loss": loss_name,
        "settings": LOSSES[loss_name] | ({"num_negatives": args.num_negatives} if loss_name != "ce" else {}),
        "world_size": world,
        "threads_per_process": torch.get_num_threads(),
        "steps_measured": len(times),
        "steps_requested_default": 200,
        "warmup_steps": args.warmup,
        "sequences_per_step_per_rank": per_rank,
        "mean_targets_per_step_per_rank": float(np.mean(targets)),
        "seconds_per_step_mean": float(np.mean(times)),
        "seconds_per_step_median": float(np.median(times)),
        "seconds_per_step_min": float(np.min(times)),
        "seconds_per_target": seconds_per_target,
        "projected_epoch_seconds": epoch_seconds,
        "projected_epoch_hours": epoch_seconds / 3600,
        "first_loss": losses[0],
        "last_loss": losses[-1],
        "rss_after_model_and_optimizer_bytes": rss_ready,
        "peak_rss_bytes": rss_bytes("VmHWM"),
        "parameters": model.num_parameters(),
        "ddp_dense_allreduce_bytes_per_step": grad,
        "item_table_gradient_bytes": table.numel() * table.element_size(),
        "item_table_share_of_allreduce": table.numel() * table.element_size() / grad,
        "mean_item_rows_touched_per_step": mean_rows,
        # a sparse (COO) gradient: the touched rows' values plus one int64 index each, per rank
        "sparse_item_gradient_bytes_per_step": mean_rows * (table.shape[1] * table.element_size() + 8),
    }


def merge_into_report(path: Path, section: str, results: dict, meta: dict) -> None:
    report = json.loads(path.read_text()) if path.exists() else {}
    report.setdefault("meta", {}).update(meta)
    report.setdefault(section, {}).update(results)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, json.dumps(report, indent=2).encode())


def meta(args) -> dict:
    return {
        "items": args.items, "hidden_size": 64, "num_blocks": 2, "max_len": args.max_len,
        "global_batch_size": args.batch_size, "num_negatives": args.num_negatives,
        "epoch_targets_assumed": args.epoch_targets,
        "batches": "Zipf(1.0) item popularity; per-batch sequence length uniform in 2..51 events",
        "optimizer": "Adam lr 1e-3, grad clip 5.0 (dense: every item row updated each step)",
        "torch": torch.__version__, "cpu_count": os.cpu_count(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=1_000_000)
    parser.add_argument("--max-len", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=128, help="global batch (sequences); split over ranks")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--steps-ce", type=int, default=None, help="steps for full CE (default: --steps)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--num-negatives", type=int, default=256)
    parser.add_argument("--epoch-targets", type=int, default=20_000_000)
    parser.add_argument("--losses", nargs="+", default=list(LOSSES), choices=list(LOSSES))
    parser.add_argument("--threads", type=int, default=None, help="torch threads per process (default cores/ranks)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ddp", action="store_true", help="run under torchrun: DDP over gloo")
    parser.add_argument("--with-ddp", action="store_true", help="also launch torchrun --nproc-per-node 2 per loss")
    parser.add_argument("--ddp-steps", type=int, default=None, help="steps under DDP (default: --steps)")
    parser.add_argument("--ddp-steps-ce", type=int, default=None)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--no-write", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args()

    if args.ddp:
        import torch.distributed as dist

        dist.init_process_group("gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 1) // world))
        results = {}
        for name in args.losses:
            figures = train_steps(args, name, rank, world)
            gathered = [None] * world
            dist.all_gather_object(gathered, figures)
            if rank == 0:
                figures["per_rank_peak_rss_bytes"] = [g["peak_rss_bytes"] for g in gathered]
                figures["per_rank_seconds_per_step_mean"] = [g["seconds_per_step_mean"] for g in gathered]
                if len(args.losses) > 1:
                    figures["note"] = "peak RSS covers every loss this process ran before, in order " + \
                                      " ".join(args.losses)
                results[name] = figures
                print("RESULT " + json.dumps(figures), flush=True)
        if rank == 0 and not args.no_write:
            merge_into_report(args.out, f"ddp_{world}_ranks", results, meta(args))
        dist.destroy_process_group()
        return

    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    if args.child:
        [name] = args.losses
        print("RESULT " + json.dumps(train_steps(args, name)), flush=True)
        return

    common = ["--items", str(args.items), "--max-len", str(args.max_len), "--batch-size", str(args.batch_size),
              "--warmup", str(args.warmup), "--num-negatives", str(args.num_negatives),
              "--epoch-targets", str(args.epoch_targets), "--seed", str(args.seed)] + \
             (["--threads", str(args.threads)] if args.threads else []) + (["--verbose"] if args.verbose else [])

    def run(cmd: list[str]) -> dict:
        out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True, cwd=REPO).stdout
        return json.loads([line for line in out.splitlines() if line.startswith("RESULT ")][-1][len("RESULT "):])

    script = str(Path(__file__).resolve())
    single = {}
    for name in args.losses:
        steps = args.steps_ce if (name == "ce" and args.steps_ce) else args.steps
        single[name] = run([sys.executable, script, "--child", "--losses", name, "--steps", str(steps), *common])
        print(json.dumps({k: single[name][k] for k in ("loss", "seconds_per_step_mean", "projected_epoch_hours",
                                                          "peak_rss_bytes")}), file=sys.stderr, flush=True)
        merge_into_report(args.out, "single_process", {name: single[name]}, meta(args))
    if args.with_ddp:
        for name in args.losses:
            steps = args.ddp_steps or args.steps
            if name == "ce" and (args.ddp_steps_ce or args.steps_ce):
                steps = args.ddp_steps_ce or args.steps_ce
            result = run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", script, "--ddp",
                          "--no-write", "--losses", name, "--steps", str(steps), *common])
            print(json.dumps({k: result[k] for k in ("loss", "seconds_per_step_mean", "projected_epoch_hours",
                                                      "per_rank_peak_rss_bytes")}), file=sys.stderr, flush=True)
            merge_into_report(args.out, "ddp_2_ranks", {name: result}, meta(args))
    print(args.out)


if __name__ == "__main__":
    main()

"""Kernel benchmark (not a test): each fast path against its baseline, measured in the same run.

Cases (issue [2]); every case runs in its own child process so its peak memory is its own:
- ``selective_scan``: the fused C kernel (``cpu``, what ``auto`` runs on CPU tensors) and torch (compiled chunks) vs
  reference (sequential loop), B=256, L=200, d_inner=128, N=16, fwd+bwd;
- ``ssd``: the fused C kernel (``cpu``) and torch (chunked SSD) vs the reference recurrence, same sizes (heads 8 ×
  head_dim 16), fwd+bwd;
- ``linear_ce``: chunked linear cross-entropy vs ``F.cross_entropy(hidden @ table.T)``, V=1,000,000, d=64,
  fwd+bwd. The plain baseline needs N·V·4 bytes for the logits and as much again for their gradient (64 GB at
  N=8,192), more than this machine has, so both are measured at N=1,024 (the like-for-like ratio) and the
  chunked path also at N=8,192; the baseline at 8,192 is extrapolated linearly in N and marked as such;
- ``topk``: chunked top-k (k=10) of 1,024 queries over 1,000,000 items vs one full matmul + ``torch.topk``.

Peak memory is how far the process's peak RSS rises above the RSS it held before the operation (its inputs).
Times are the best of ``--repeats`` runs after one untimed warm-up call (compilation, first page faults), for the
baselines too. Writes reports/benchmarks/kernels.json.
Usage: ``python tests/benchmarks/kernels.py [--only selective_scan ssd ...]`` (--only keeps the other cases'
figures from the existing JSON).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from kernels.atomic import atomic_write_bytes  # noqa: E402


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def current_rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure(fn, repeats: int) -> dict:
    """Best time of ``repeats`` calls after one untimed call (torch.compile's compilation, the allocator's first
    page faults), and how far the peak RSS rose above the RSS held before them (the inputs)."""
    base = current_rss_bytes()
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return {"seconds": min(times), "peak_extra_gb": (peak_rss_bytes() - base) / 2**30}


def build_cpu_kernels(backend: str) -> None:
    """Build (or load) the fused C kernels outside the timed runs."""
    if backend == "cpu":
        from kernels._cpu import cpu_kernels

        assert cpu_kernels() is not None


def case_selective_scan(backend: str, repeats: int) -> dict:
    import torch

    from kernels.selective_scan import selective_scan

    torch.manual_seed(0)
    b, length, d, n = 256, 200, 128, 16
    u = torch.randn(b, length, d, requires_grad=True)
    delta = (torch.randn(b, length, d) * 0.5).requires_grad_()
    a = (-torch.rand(d, n) - 0.1).requires_grad_()
    bb = torch.randn(b, length, n, requires_grad=True)
    c = torch.randn(b, length, n, requires_grad=True)

    def run():
        selective_scan(u, delta, a, bb, c, backend=backend).sum().backward()

    build_cpu_kernels(backend)

    return measure(run, repeats)


def case_ssd(backend: str, repeats: int) -> dict:
    import torch

    from kernels.ssd import ssd

    torch.manual_seed(0)
    b, length, heads, head_dim, n = 256, 200, 8, 16, 16
    x = torch.randn(b, length, heads, head_dim, requires_grad=True)
    dt = (torch.randn(b, length, heads) * 0.5).requires_grad_()
    a = (-torch.rand(heads) - 0.1).requires_grad_()
    bb = torch.randn(b, length, 1, n, requires_grad=True)
    c = torch.randn(b, length, 1, n, requires_grad=True)

    def run():
        ssd(x, dt, a, bb, c, backend=backend).sum().backward()

    build_cpu_kernels(backend)
    return measure(run, repeats)


def case_linear_ce(backend: str, repeats: int, rows: int) -> dict:
    import torch
    import torch.nn.functional as F

    from kernels import linear_cross_entropy

    torch.manual_seed(0)
    v, d = 1_000_000, 64
    table = torch.randn(v, d).mul_(0.1).requires_grad_()
    hidden = torch.randn(rows, d, requires_grad=True)
    targets = torch.randint(1, v, (rows,))

    def run():
        if backend == "plain":
            loss = F.cross_entropy(hidden @ table.T, targets)
        else:
            loss = linear_cross_entropy(hidden, table, targets, backend=backend)
        loss.backward()
        hidden.grad = table.grad = None

    return measure(run, repeats)


def case_topk(backend: str, repeats: int) -> dict:
    import torch

    from kernels import topk_scores

    torch.manual_seed(0)
    queries, table = torch.randn(1024, 64), torch.randn(1_000_000, 64)

    def run():
        if backend == "plain":
            torch.topk(queries @ table.T, 10, dim=1)
        else:
            topk_scores(queries, table, 10, backend=backend)

    return measure(run, repeats)


CASES = {
    "selective_scan": case_selective_scan,
    "ssd": case_ssd,
    "linear_ce": case_linear_ce,
    "topk": case_topk,
}


def child(case: str, backend: str, repeats: int, rows: int | None = None) -> dict:
    args = [sys.executable, __file__, "--child", case, backend, str(repeats)] + ([str(rows)] if rows else [])
    out = subprocess.run(args, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(REPO / "reports" / "benchmarks" / "kernels.json"))
    parser.add_argument("--only", nargs="+", choices=list(CASES), help="run these cases only")
    args = parser.parse_args()
    if args.child:
        case, backend, repeats, *rest = args.child
        extra = {"rows": int(rest[0])} if rest else {}
        print(json.dumps(CASES[case](backend, int(repeats), **extra)))
        return

    r = args.repeats
    out = Path(args.out)
    run = set(args.only or CASES)
    result: dict = json.loads(out.read_text()) if args.only and out.exists() else {}
    for case, shape, target in (("selective_scan", "B=256 L=200 d_inner=128 N=16, fwd+bwd", 10),
                                ("ssd", "B=256 L=200 heads=8 head_dim=16 N=16 groups=1, fwd+bwd", 5)):
        if case in run:
            timed = {b: child(case, b, r) for b in ("cpu", "torch", "reference")}
            result[case] = {"shape": shape, **timed, "target_speedup": target,
                            **{f"speedup_{b}": timed["reference"]["seconds"] / timed[b]["seconds"]
                               for b in ("cpu", "torch")}}
    if "linear_ce" in run:
        small_fast, small_plain = child("linear_ce", "torch", r, 1024), child("linear_ce", "plain", r, 1024)
        big_fast = child("linear_ce", "torch", 1, 8192)
        extrapolated = {k: v * 8 for k, v in small_plain.items()}
        result["linear_ce"] = {
            "shape": "V=1,000,000 d=64, fwd+bwd",
            "n1024": {"chunked": small_fast, "plain": small_plain,
                      "memory_ratio": small_plain["peak_extra_gb"] / small_fast["peak_extra_gb"],
                      "time_ratio": small_fast["seconds"] / small_plain["seconds"]},
            "n8192": {"chunked": big_fast, "plain_extrapolated_linear_in_n": extrapolated,
                      "memory_ratio": extrapolated["peak_extra_gb"] / big_fast["peak_extra_gb"],
                      "time_ratio": big_fast["seconds"] / extrapolated["seconds"]},
            "targets": {"memory_ratio_at_least": 10, "time_ratio_at_most": 1.5},
        }
    if "topk" in run:
        fast, plain = child("topk", "torch", r), child("topk", "plain", r)
        result["topk"] = {"shape": "1,024 queries x 1,000,000 items, d=64, k=10", "chunked": fast, "plain": plain,
                          "time_ratio": fast["seconds"] / plain["seconds"],
                          "memory_ratio": plain["peak_extra_gb"] / max(fast["peak_extra_gb"], 1e-3)}
    result["machine"] = {"cpus": os.cpu_count(), "python": sys.version.split()[0]}
    atomic_write_bytes(out, (json.dumps(result, indent=2) + "\n").encode())
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

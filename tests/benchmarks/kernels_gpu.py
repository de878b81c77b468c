"""GPU kernel benchmark (not a test): each Triton kernel against the torch path on the same CUDA tensors, and
against the memory-bandwidth bound of the bytes the operator must move, measured in the same run (issue [2]).

The bound is measured, not taken from a data sheet: the best device-to-device copy of a 1 GiB tensor, counting the
bytes read and written. An operator that must read R and write W bytes can take no less than (R + W) / that rate;
"fraction of bound" is that time over the measured one (1.0 = as fast as a copy of the same bytes). For the
linear cross-entropy, which is compute-bound (2·N·V·d multiply-adds per pass), the compute bound from a measured
fp32 matmul is reported beside it.

Cases (fp32; the shapes of the CPU benchmark, tests/benchmarks/kernels.py, plus a wider one that fills the GPU):
- ``selective_scan`` forward kernel alone (Triton ``scan_forward`` vs the torch chunked forward), and the public
  function forward + backward (the Triton forward, the backward is the torch path's for both);
- ``ssd`` forward kernel alone (Triton vs the torch chunked algorithm), and forward + backward;
- ``linear_cross_entropy`` forward + backward, Triton vs the torch chunked path vs ``F.cross_entropy(h @ E.T)``
  where its logits fit.

Times are the median of ``--repeats`` runs after warm-up, synchronised with CUDA events; peak memory is
``torch.cuda.max_memory_allocated`` above what the inputs hold. Writes reports/benchmarks/kernels_gpu.json.
Imports only torch, triton and kernels/, so the device machine's own python3 runs it from the repository root:
``python3 tests/benchmarks/kernels_gpu.py``. ``--smoke`` runs tiny shapes on the CPU through Triton's interpreter
(``TRITON_INTERPRET=1``) to check the wiring here; its timings mean nothing.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from kernels.atomic import atomic_write_bytes  # noqa: E402

FP32 = 4


class Timer:
    """Median wall time of ``fn`` over ``repeats`` runs after ``warmup``, synchronised on CUDA."""

    def __init__(self, device: torch.device, repeats: int, warmup: int = 3):
        self.device, self.repeats, self.warmup = device, repeats, warmup

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def __call__(self, fn) -> dict:
        for _ in range(self.warmup):
            fn()
        self.sync()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() if self.device.type == "cuda" else 0
        times = []
        for _ in range(self.repeats):
            if self.device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end) / 1e3)
            else:
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
        peak = torch.cuda.max_memory_allocated() - base if self.device.type == "cuda" else 0
        return {"seconds": statistics.median(times), "peak_extra_gb": peak / 2**30}


def copy_bandwidth(timer: Timer, nbytes: int) -> float:
    """Bytes per second of the best device-to-device copy, counting read and write."""
    src = torch.empty(nbytes // FP32, device=timer.device)
    dst = torch.empty_like(src)
    best = min(timer(lambda: dst.copy_(src))["seconds"] for _ in range(3))
    return 2 * nbytes / best


def matmul_flops(timer: Timer, size: int) -> float:
    """Multiply-adds ×2 per second of an fp32 (size × size) @ (size × size) product, TF32 as the process allows."""
    a, b = torch.randn(size, size, device=timer.device), torch.randn(size, size, device=timer.device)
    return 2 * size**3 / timer(lambda: a @ b)["seconds"]


def against_bound(entry: dict, nbytes: int, bandwidth: float, flops: float | None = None, rate: float | None = None):
    """Add the bytes, the achieved rate and the fraction of the bandwidth (and compute) bound to a timing."""
    entry["bytes"] = nbytes
    entry["achieved_gb_per_s"] = nbytes / entry["seconds"] / 1e9
    entry["fraction_of_bandwidth_bound"] = nbytes / bandwidth / entry["seconds"]
    if flops is not None and rate is not None:
        entry["flops"] = flops
        entry["fraction_of_compute_bound"] = flops / rate / entry["seconds"]
    return entry


def case_selective_scan(timer: Timer, bandwidth: float, b: int, length: int, d: int, n: int) -> dict:
    from kernels._triton_selective_scan import scan_forward
    from kernels.selective_scan import DEFAULT_CHUNK, STEP_ELEMENTS, _SelectiveScan, selective_scan

    dev = timer.device
    dt = torch.rand(b, length, d, device=dev) * 0.1
    x = torch.randn(b, length, d, device=dev) * dt
    A = -torch.rand(d, n, device=dev) - 0.1
    B, C = torch.randn(b, length, n, device=dev), torch.randn(b, length, n, device=dev)
    # read Δ, x = Δ·u, B, C, A; write y
    nbytes = FP32 * (3 * b * length * d + 2 * b * length * n + d * n)
    out = {"shape": f"B={b} L={length} d_inner={d} N={n}"}
    with torch.no_grad():
        out["forward_triton"] = against_bound(timer(lambda: scan_forward(dt, x, A, B, C)), nbytes, bandwidth)
        # the torch path takes u and forms Δ·u itself; rows: its row slices, as selective_scan picks them
        rows = max(1, STEP_ELEMENTS // (d * n))
        torch_forward = timer(lambda: _SelectiveScan.apply(dt, x, A, B, C, DEFAULT_CHUNK, rows, False))
        out["forward_torch"] = against_bound(torch_forward, nbytes, bandwidth)
    leaves = [t.clone().requires_grad_() for t in (x, dt, A, B, C)]

    def train_step(backend):
        return lambda: selective_scan(*leaves, backend=backend).sum().backward()

    for backend in ("triton", "torch"):
        out[f"forward_backward_{backend}"] = timer(train_step(backend))
    out["forward_speedup_triton_over_torch"] = out["forward_torch"]["seconds"] / out["forward_triton"]["seconds"]
    return out


def case_ssd(timer: Timer, bandwidth: float, b: int, length: int, heads: int, p: int, n: int, chunk: int) -> dict:
    from kernels._triton_ssd import triton_forward
    from kernels.ssd import _chunked_core, ssd

    dev = timer.device
    x = torch.randn(b, length, heads, p, device=dev)
    delta = torch.rand(b, length, heads, device=dev) * 0.1
    A = -torch.rand(heads, device=dev) - 0.1
    B, C = torch.randn(b, length, 1, n, device=dev), torch.randn(b, length, 1, n, device=dev)
    # read x, Δ, B, C, A; write y and the final state
    nbytes = FP32 * (2 * b * length * heads * p + b * length * heads + 2 * b * length * n + heads + b * heads * p * n)
    out = {"shape": f"B={b} L={length} heads={heads} head_dim={p} N={n} groups=1 chunk={chunk}"}
    with torch.no_grad():
        out["forward_triton"] = against_bound(timer(lambda: triton_forward(x, delta, A, B, C, None, chunk)), nbytes,
                                              bandwidth)
        out["forward_torch"] = against_bound(timer(lambda: _chunked_core(x, delta, A, B, C, None, chunk)), nbytes,
                                             bandwidth)
    leaves = [t.clone().requires_grad_() for t in (x, delta, A, B, C)]

    def train_step(backend):
        return lambda: ssd(*leaves, chunk_size=chunk, backend=backend).sum().backward()

    for backend in ("triton", "torch"):
        out[f"forward_backward_{backend}"] = timer(train_step(backend))
    out["forward_speedup_triton_over_torch"] = out["forward_torch"]["seconds"] / out["forward_triton"]["seconds"]
    return out


def case_linear_ce(timer: Timer, bandwidth: float, rate: float, rows: int, items: int, dim: int) -> dict:
    from kernels.cross_entropy import linear_cross_entropy

    dev = timer.device
    hidden = torch.randn(rows, dim, device=dev, requires_grad=True)
    table = (torch.randn(items, dim, device=dev) * 0.05).requires_grad_()
    targets = torch.randint(1, items, (rows,), device=dev)
    # forward reads h and E, the backward reads them again and writes ∂h and ∂E; three (N × V × d) products
    nbytes = FP32 * 3 * (rows * dim + items * dim)
    flops = 3 * 2 * rows * items * dim
    out = {"shape": f"N={rows} V={items} d={dim}"}

    def step(backend):
        if backend == "plain":
            return lambda: F.cross_entropy(hidden @ table.T, targets).backward()
        return lambda: linear_cross_entropy(hidden, table, targets, backend=backend).backward()

    for backend in ("triton", "torch", "plain"):
        try:
            out[backend] = against_bound(timer(step(backend)), nbytes, bandwidth, flops, rate)
        except torch.OutOfMemoryError:
            out[backend] = {"error": "out of memory"}
        hidden.grad = table.grad = None
    return out


def attempt(case, *args) -> dict:
    """Run one case; a failure (a kernel that does not compile for a shape, memory) is recorded, not fatal."""
    try:
        return case(*args)
    except Exception as err:  # noqa: BLE001 - the benchmark reports every case it can
        return {"case": case.__name__, "args": [a for a in args if isinstance(a, int)], "error": repr(err)[:2000]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU under TRITON_INTERPRET=1")
    parser.add_argument("--out", default=str(REPO / "reports" / "benchmarks" / "kernels_gpu.json"))
    args = parser.parse_args()
    if args.smoke:
        device, repeats = torch.device("cpu"), 1
        scan_shapes, ssd_shapes, ce_shape = [(2, 9, 8, 4)], [(2, 9, 2, 4, 4, 16)], (8, 50, 16)
        copy_bytes, mm = 1 << 20, 64
    else:
        if not torch.cuda.is_available():
            sys.exit("kernels_gpu.py needs a CUDA device (or --smoke with TRITON_INTERPRET=1)")
        device, repeats = torch.device("cuda"), args.repeats
        scan_shapes = [(256, 200, 128, 16), (256, 200, 1024, 16)]
        ssd_shapes = [(256, 200, 8, 16, 16, 32), (256, 200, 32, 64, 64, 64)]
        ce_shape = (8192, 1_000_000, 64)
        copy_bytes, mm = 1 << 30, 8192
    torch.manual_seed(0)
    timer = Timer(device, repeats, warmup=1 if args.smoke else 3)
    bandwidth = copy_bandwidth(timer, copy_bytes)
    rate = matmul_flops(timer, mm)
    result = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu (smoke run: timings mean nothing)",
        "torch": torch.__version__,
        "copy_bandwidth_gb_per_s": bandwidth / 1e9,
        "fp32_matmul_tflop_per_s": rate / 1e12,
        "tf32_allowed": torch.backends.cuda.matmul.allow_tf32,
        "selective_scan": [attempt(case_selective_scan, timer, bandwidth, *s) for s in scan_shapes],
        "ssd": [attempt(case_ssd, timer, bandwidth, *s) for s in ssd_shapes],
        "linear_cross_entropy": attempt(case_linear_ce, timer, bandwidth, rate, *ce_shape),
    }
    out = Path(args.out)
    atomic_write_bytes(out, (json.dumps(result, indent=2) + "\n").encode())
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

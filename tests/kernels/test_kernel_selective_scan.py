"""Selective scan (Mamba-1, Gu & Dao 2023, eq. 2a-2b): the chunked torch path, the fused C kernel (``cpu``) and the
Triton kernel against the time-step loop of the reference.

Error metric throughout: rel_err(x, ref) = max|x − ref| / max|ref| (max-abs error over the max-abs value of the
reference), ≤ 1e-4 in fp32. Triton tests run with `TRITON_INTERPRET=1 .venv/bin/python -m pytest -m triton ...`.
"""

import importlib
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from kernels.selective_scan import selective_scan
from tests.helpers import CPU, FAST, cpu_kernel_missing, rel_err

NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


def make_inputs(batch, length, d_inner, n, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    inputs = {
        "u": torch.randn(batch, length, d_inner, generator=g),
        "delta": torch.randn(batch, length, d_inner, generator=g) - 1.0,
        "A": -torch.exp(torch.randn(d_inner, n, generator=g)),  # A = −exp(A_log) < 0
        "B": torch.randn(batch, length, n, generator=g),
        "C": torch.randn(batch, length, n, generator=g),
        "D": torch.randn(d_inner, generator=g),
        "z": torch.randn(batch, length, d_inner, generator=g),
        "delta_bias": torch.randn(d_inner, generator=g) * 0.5,
    }
    return {k: v.to(dtype) for k, v in inputs.items()}


def left_pad_mask(lengths, total):
    pos = torch.arange(total)[None, :]
    return pos >= (total - torch.tensor(lengths))[:, None]


def run(inputs, backend, use=NAMES, pad_mask=None, chunk_size=None, grad_seed=1):
    """Output and the gradients of a random linear functional of it, for the inputs in ``use``."""
    leaves = {k: v.clone().requires_grad_() for k, v in inputs.items() if k in use}
    y = selective_scan(leaves["u"], leaves["delta"], leaves["A"], leaves["B"], leaves["C"], D=leaves.get("D"),
                       z=leaves.get("z"), delta_bias=leaves.get("delta_bias"), pad_mask=pad_mask, backend=backend,
                       chunk_size=chunk_size)
    weights = torch.randn(y.shape, generator=torch.Generator().manual_seed(grad_seed)).to(y.device, y.dtype)
    (y * weights).sum().backward()
    return y.detach(), {k: v.grad for k, v in leaves.items()}


def assert_parity(got, ref, tol=1e-4):
    (y, grads), (y_ref, grads_ref) = got, ref
    assert y.dtype == y_ref.dtype and y.shape == y_ref.shape
    assert rel_err(y, y_ref) <= tol, f"y: {rel_err(y, y_ref)}"
    for k in grads_ref:
        assert grads[k] is not None, k
        assert rel_err(grads[k], grads_ref[k]) <= tol, f"grad {k}: {rel_err(grads[k], grads_ref[k])}"


CASES = [  # (batch, length, d_inner, N, chunk_size); None: the default chunk of 8
    (3, 1, 6, 4, None),
    (3, 7, 6, 4, 3),
    (2, 50, 8, 4, None),
    (2, 200, 4, 3, None),
    (2, 201, 4, 3, None),
    (2, 201, 4, 3, 5),
    (2, 201, 4, 3, 16),
    (2, 12, 4, 3, 16),  # one chunk, end-padded: no state carried between chunks
]


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("batch,length,d_inner,n,chunk", CASES)
@pytest.mark.parametrize("padded", [False, True])
def test_fast_backends_match_reference(backend, batch, length, d_inner, n, chunk, padded):
    inputs = make_inputs(batch, length, d_inner, n, seed=length)
    pad_mask = left_pad_mask([length, max(1, length // 2), max(0, length - 3)][:batch], length) if padded else None
    ref = run(inputs, "reference", pad_mask=pad_mask)
    assert_parity(run(inputs, backend, pad_mask=pad_mask, chunk_size=chunk), ref)


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("use", [
    ("u", "delta", "A", "B", "C"),
    ("u", "delta", "A", "B", "C", "D"),
    ("u", "delta", "A", "B", "C", "z"),
    ("u", "delta", "A", "B", "C", "delta_bias"),
])
def test_fast_backends_match_reference_optional_arguments(backend, use):
    inputs = make_inputs(2, 37, 5, 4, seed=3)
    pad_mask = left_pad_mask([37, 20], 37)
    assert_parity(run(inputs, backend, use, pad_mask, chunk_size=8), run(inputs, "reference", use, pad_mask))


def test_no_softplus_and_default_chunk():
    inputs = make_inputs(2, 40, 5, 4, seed=4)
    inputs["delta"] = inputs["delta"].abs() * 0.1
    args = [inputs[k] for k in ("u", "delta", "A", "B", "C")]
    ref = selective_scan(*args, delta_softplus=False, backend="reference")
    assert rel_err(selective_scan(*args, delta_softplus=False), ref) <= 1e-4


def test_the_torch_path_compiles_its_chunks():
    """The torch path's speed comes from torch.compile fusing a chunk's steps (forward, and backward with its
    recompute) into single loop nests: both compile, without graph breaks."""
    from torch._dynamo.utils import counters

    module = importlib.import_module("kernels.selective_scan")
    torch._dynamo.reset()
    counters.clear()
    inputs = make_inputs(2, 19, 6, 4, seed=12)
    assert_parity(run(inputs, "torch"), run(inputs, "reference"))
    assert module.compile_unavailable_reason is None
    assert counters["stats"]["unique_graphs"] >= 2 and not counters["graph_break"]


def test_without_a_cxx_compiler_the_same_code_runs_eagerly(tmp_path):
    """A machine where torch.compile cannot build (here: no C++ compiler) gets one warning that says why, and the
    same results from the same code run eagerly."""
    script = (
        "import importlib, torch\n"
        "module = importlib.import_module('kernels.selective_scan')\n"
        "g = torch.Generator().manual_seed(0)\n"
        "u, delta, B, C = (torch.randn(2, 11, s, generator=g) for s in (4, 4, 3, 3))\n"
        "A = -torch.rand(4, 3, generator=g)\n"
        "got = module.selective_scan(u, delta, A, B, C, backend='torch', chunk_size=4)\n"
        "ref = module.selective_scan(u, delta, A, B, C, backend='reference')\n"
        "print(module.compile_unavailable_reason)\n"
        "print(((got - ref).abs().max() / ref.abs().max()).item())\n"
    )
    env = {**os.environ, "CXX": str(tmp_path / "no-such-c++"), "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    reason, err = done.stdout.split("\n")[:2]
    assert "compiler" in reason
    assert float(err) <= 1e-4
    assert done.stderr.count("torch.compile is unavailable") == 1


def test_a_batch_too_large_for_the_cache_runs_in_row_slices(monkeypatch):
    """Rows beyond STEP_ELEMENTS / (d_inner·N) go through the scan in slices; the result is the same, gradients of
    the shared A included."""
    module = importlib.import_module("kernels.selective_scan")  # the package re-exports the function by this name
    monkeypatch.setattr(module, "STEP_ELEMENTS", 2 * 6 * 4)  # 2 rows per slice: slices of 2, 2 and 1
    inputs = make_inputs(5, 23, 6, 4, seed=13)
    pad_mask = left_pad_mask([23, 10, 1, 23, 5], 23)
    assert_parity(run(inputs, "torch", pad_mask=pad_mask, chunk_size=None), run(inputs, "reference", pad_mask=pad_mask))


@pytest.mark.parametrize("backend", FAST)
def test_large_steps_do_not_overflow(backend):
    """Δ·A of −1000 per step: the chunked scan uses only products of Ā ≤ 1, so nothing overflows; the C kernel's
    exp2 clamps such decays to 2^-126 ≈ 1e-38, which no result can see."""
    inputs = make_inputs(2, 50, 4, 3, seed=5)
    inputs["delta"] = inputs["delta"] + 60.0
    ref = run(inputs, "reference")
    got = run(inputs, backend)
    assert torch.isfinite(got[0]).all()
    assert_parity(got, ref)


@pytest.mark.parametrize("backend,chunk,extra_pad", [
    ("reference", 16, 5), ("torch", 8, 16), ("torch", 5, 10), ("torch", 8, 7), ("torch", 16, 0),
    pytest.param("cpu", 16, 9, marks=CPU.marks),
])
def test_left_padding_is_a_no_op(backend, chunk, extra_pad):
    """A user's outputs at real positions do not change with extra left padding: bit-identical for the reference
    (and the Triton kernel, below); for the torch path and the C kernel within rel_err 1e-6, because the state is
    exactly untouched by pads (Ā = 1, no input) but vectorised exp() (and softplus, before the C kernel) may round
    the last bit differently when the tensor sizes and offsets change. Pads output 0, and garbage at pads (even
    inf/nan) changes nothing and gets no gradient."""
    real, base_pad = 23, 4
    full = make_inputs(1, real, 6, 4, seed=6)
    outs = []
    for pad in (base_pad, base_pad + extra_pad):
        length = real + pad
        garbage = make_inputs(1, pad, 6, 4, seed=7)
        inputs = {k: torch.cat([garbage[k] * 1e3, v], 1) if v.ndim == 3 else v for k, v in full.items()}
        inputs["B"][:, 0] = float("inf")
        inputs["u"][:, 0] = float("nan")
        mask = left_pad_mask([real], length)
        y, grads = run(inputs, backend, pad_mask=mask, chunk_size=chunk)
        assert (y[:, :pad] == 0).all()
        for k in ("u", "delta", "B", "C", "z"):
            assert (grads[k][:, :pad] == 0).all(), k
        assert all(torch.isfinite(g).all() for g in grads.values())
        outs.append(y[:, pad:])
    if backend == "reference":
        assert torch.equal(outs[0], outs[1])
    else:
        assert rel_err(outs[1], outs[0]) <= 1e-6


def test_bf16_inputs_close_to_fp32():
    """bf16 inputs (fp32 scan inside) give a bf16 output within 3e-2 (rel_err) of the fp32 run, gradients too."""
    inputs = make_inputs(2, 60, 8, 4, seed=9)
    ref = run(inputs, "reference")
    got = run({k: v.bfloat16() for k, v in inputs.items()}, "torch")
    assert got[0].dtype == torch.bfloat16
    assert all(g.dtype == torch.bfloat16 for g in got[1].values())
    assert_parity((got[0].float(), {k: g.float() for k, g in got[1].items()}), ref, tol=3e-2)


def test_empty_and_validation():
    inputs = make_inputs(2, 0, 4, 3)
    args = [inputs[k] for k in ("u", "delta", "A", "B", "C")]
    for backend in ("reference", "torch"):
        assert selective_scan(*args, backend=backend).shape == (2, 0, 4)
    inputs = make_inputs(2, 5, 4, 3)
    with pytest.raises(ValueError):
        selective_scan(inputs["u"], inputs["delta"], inputs["A"].T, inputs["B"], inputs["C"])
    with pytest.raises(ValueError):
        selective_scan(*[inputs[k] for k in ("u", "delta", "A", "B", "C")], backend="nope")


def test_auto_picks_torch_on_cpu():
    from kernels._backend import resolve_backend, triton_interpreted

    assert resolve_backend("auto", torch.zeros(1), has_triton=True) == "torch"  # no fused CPU kernel: torch
    if not triton_interpreted():
        inputs = make_inputs(1, 3, 2, 2)
        with pytest.raises(ValueError):
            selective_scan(*[inputs[k] for k in ("u", "delta", "A", "B", "C")], backend="triton")


@CPU.marks[0]
@pytest.mark.parametrize("n", [16, 32, 5])
def test_cpu_kernel_specialised_state_sizes_and_thread_ranges(n):
    """N = 16 and 32 run the kernel's compile-time specialisations, 5 the generic loop; d_inner 40 leaves a partial
    channel block (blocks of 16); 5 rows over 2 threads give unequal row ranges and two ∂A accumulators."""
    inputs = make_inputs(5, 61, 40, n, seed=14)
    pad_mask = left_pad_mask([61, 30, 1, 61, 7], 61)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        got = run(inputs, "cpu", pad_mask=pad_mask)
    finally:
        torch.set_num_threads(threads)
    assert_parity(got, run(inputs, "reference", pad_mask=pad_mask))


@CPU.marks[0]
def test_auto_picks_the_cpu_kernel_and_falls_back_to_torch(monkeypatch):
    from kernels import _cpu
    from kernels._backend import resolve_backend

    assert resolve_backend("auto", torch.zeros(1), has_triton=True, has_cpu=True) == "cpu"
    monkeypatch.setattr(_cpu, "cpu_kernels", lambda: None)
    monkeypatch.setattr(_cpu, "cpu_unavailable_reason", "no compiler here")
    assert resolve_backend("auto", torch.zeros(1), has_triton=True, has_cpu=True) == "torch"
    inputs = make_inputs(2, 9, 3, 2)
    args = [inputs[k] for k in ("u", "delta", "A", "B", "C")]
    assert rel_err(selective_scan(*args), selective_scan(*args, backend="reference")) <= 1e-4
    with pytest.raises(ValueError, match="no compiler here"):
        selective_scan(*args, backend="cpu")
    with pytest.raises(ValueError, match="no fused CPU kernel"):
        resolve_backend("cpu", torch.zeros(1))


@CPU.marks[0]
def test_loading_the_cpu_kernel_leaves_subnormal_floats_alone():
    """A library built with -ffast-math would switch the process to flush-to-zero when loaded."""
    import sys

    from kernels import _cpu

    assert _cpu.cpu_kernels() is not None
    tiny = sys.float_info.min
    assert tiny / 2 > 0
    assert torch.tensor(1e-40) > 0


def test_cpu_kernel_build_is_cached_and_a_failed_build_leaves_nothing(tmp_path, monkeypatch):
    """The library lands under a name that hashes source, flags, compiler and CPU, via a temporary file: a second
    build reuses it, and a compiler error raises with the compiler's message and leaves no file behind."""
    from kernels import _cpu

    monkeypatch.setenv("RECSYS_KERNEL_CACHE", str(tmp_path / "cache"))
    failing = tmp_path / "failing-cc"
    failing.write_text("#!/bin/sh\nif [ \"$1\" = --version ]; then echo fake 1.0; exit 0; fi\n"
                       "echo 'error: no such luck' >&2; exit 1\n")
    failing.chmod(0o755)
    with pytest.raises(RuntimeError, match="no such luck"):
        _cpu._build(str(failing))
    assert list((tmp_path / "cache").iterdir()) == []
    if cpu_kernel_missing() is None:
        lib = _cpu._build(os.environ.get("CC", "cc"))
        assert lib.parent == tmp_path / "cache" and lib.suffix == ".so"
        mtime = lib.stat().st_mtime_ns
        assert _cpu._build(os.environ.get("CC", "cc")) == lib and lib.stat().st_mtime_ns == mtime
        assert [p.name for p in lib.parent.iterdir()] == [lib.name]


def triton_device():
    """CUDA when there is a GPU (and no interpreter), CPU under TRITON_INTERPRET=1, else skip."""
    pytest.importorskip("triton")
    from kernels._backend import triton_interpreted

    if triton_interpreted():
        return "cpu"
    if torch.cuda.is_available():
        return "cuda"
    pytest.skip("needs a CUDA device or TRITON_INTERPRET=1")


@pytest.mark.triton
@pytest.mark.parametrize("batch,length,d_inner,n", [(2, 1, 3, 2), (2, 9, 5, 3), (1, 20, 40, 5)])
@pytest.mark.parametrize("padded", [False, True])
def test_triton_matches_reference(batch, length, d_inner, n, padded):
    device = triton_device()
    inputs = {k: v.to(device) for k, v in make_inputs(batch, length, d_inner, n, seed=10 + length).items()}
    pad_mask = left_pad_mask([length, max(1, length // 2)][:batch], length).to(device) if padded else None
    ref = run(inputs, "reference", pad_mask=pad_mask)
    assert_parity(run(inputs, "triton", pad_mask=pad_mask, chunk_size=4), ref)


@pytest.mark.triton
def test_triton_left_padding_is_an_exact_no_op():
    device = triton_device()
    real = 6
    full = make_inputs(1, real, 3, 2, seed=11)
    outs = []
    for pad in (0, 3):
        inputs = {k: (F.pad(v, (0, 0, pad, 0), value=5.0) if v.ndim == 3 else v).to(device) for k, v in full.items()}
        y, _ = run(inputs, "triton", pad_mask=left_pad_mask([real], real + pad).to(device))
        assert (y[:, :pad] == 0).all()
        outs.append(y[:, pad:])
    assert torch.equal(outs[0], outs[1])

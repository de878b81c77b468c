"""Mamba-2 SSD (Dao & Gu 2024, §6 / Listing 1; model-specs §3b) with TiM4Rec's time-scaled Δ (model-specs §5):
the chunked torch path, the fused C kernel (``cpu``) and the Triton kernel against the time-step loop of the
reference.

Error metric throughout: rel_err(x, ref) = max|x − ref| / max|ref| (max-abs error over the max-abs value of the
reference), ≤ 1e-4 in fp32 for values and for the gradients of every input. bf16 inputs: ≤ 2e-2 against the fp32
reference on the same (bf16-rounded) inputs (the output itself is rounded to bf16, relative step 2^-8).
Triton tests run with `TRITON_INTERPRET=1 .venv/bin/python -m pytest -m triton tests/kernels/test_kernel_ssd.py`.
"""

import importlib

import pytest
import torch

from kernels.ssd import segsum, ssd
from tests.helpers import CPU, FAST, rel_err

NAMES = ("x", "dt", "A", "B", "C", "D", "dt_bias", "dt_scale", "initial_state")


def make_inputs(batch=2, length=7, heads=4, head_dim=8, groups=1, n=5, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    inputs = {
        "x": torch.randn(batch, length, heads, head_dim, generator=g),
        "dt": torch.randn(batch, length, heads, generator=g) - 1.0,
        "A": -torch.exp(torch.rand(heads, generator=g) * 2.0),  # A = −exp(A_log) < 0
        "B": torch.randn(batch, length, groups, n, generator=g),
        "C": torch.randn(batch, length, groups, n, generator=g),
        "D": torch.randn(heads, generator=g),
        "dt_bias": torch.randn(heads, generator=g) * 0.5,
        "dt_scale": torch.rand(batch, length, heads, generator=g) * 1.5 + 0.25,
        "initial_state": torch.randn(batch, heads, head_dim, n, generator=g),
    }
    return {k: v.to(dtype) for k, v in inputs.items()}


def left_pad_mask(lengths, total):
    pos = torch.arange(total)[None, :]
    return pos >= (total - torch.tensor(lengths))[:, None]


def run(inputs, backend, use=NAMES, chunk_size=16, pad_mask=None, dt_softplus=True, grad_seed=1):
    """Output, final state, and the gradients of a random linear functional of both, for the inputs in ``use``."""
    leaves = {k: v.clone().requires_grad_() for k, v in inputs.items() if k in use}
    y, final = ssd(leaves["x"], leaves["dt"], leaves["A"], leaves["B"], leaves["C"], chunk_size=chunk_size,
                   D=leaves.get("D"), dt_bias=leaves.get("dt_bias"), dt_scale=leaves.get("dt_scale"),
                   dt_softplus=dt_softplus, initial_state=leaves.get("initial_state"), return_final_state=True,
                   pad_mask=pad_mask, backend=backend)
    g = torch.Generator().manual_seed(grad_seed)
    wy = torch.randn(y.shape, generator=g).to(y.dtype)
    wf = torch.randn(final.shape, generator=g)
    ((y * wy).float().sum() + (final * wf).sum()).backward()
    return y.detach(), final.detach(), {k: v.grad for k, v in leaves.items()}


def assert_parity(got, ref, tol=1e-4):
    (y, f, grads), (y_ref, f_ref, grads_ref) = got, ref
    assert y.dtype == y_ref.dtype and y.shape == y_ref.shape
    assert rel_err(y, y_ref) <= tol, f"y: {rel_err(y, y_ref)}"
    assert rel_err(f, f_ref) <= tol, f"final state: {rel_err(f, f_ref)}"
    for k in grads_ref:
        assert grads[k] is not None, k
        assert rel_err(grads[k], grads_ref[k]) <= tol, f"grad {k}: {rel_err(grads[k], grads_ref[k])}"


def test_segsum_is_stable_and_matches_definition():
    a = -torch.rand(2, 9) * 3
    s = segsum(a)
    for i in range(9):
        for j in range(9):
            if i >= j:
                torch.testing.assert_close(s[:, i, j], a[:, j + 1 : i + 1].sum(-1))
            else:
                assert torch.isinf(s[:, i, j]).all() and (s[:, i, j] < 0).all()
    # large running sums: the difference-of-cumsums form would lose these small segments entirely
    big = torch.full((1, 64), -1e6)
    big[0, 40] = -1e-3
    assert segsum(big)[0, 40, 39].item() == pytest.approx(-1e-3, rel=1e-6)


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("length", [1, 7, 50, 200, 201])
def test_fast_backends_match_reference_lengths(backend, length):
    # chunk 16 divides none of 1, 7, 50, 201 (and 200 = 12.5 chunks)
    inputs = make_inputs(length=length, groups=2, seed=length)
    assert_parity(run(inputs, backend, chunk_size=16), run(inputs, "reference"))


@pytest.mark.parametrize("chunk_size", [1, 3, 7, 32, 64])
@pytest.mark.parametrize("groups", [1, 2, 4])
def test_torch_matches_reference_chunks_groups(chunk_size, groups):
    inputs = make_inputs(length=37, groups=groups, seed=chunk_size * 10 + groups)
    assert_parity(run(inputs, "torch", chunk_size=chunk_size), run(inputs, "reference"))


@pytest.mark.parametrize("use", [
    ("x", "dt", "A", "B", "C"),  # plain Mamba-2: no D, no bias, no time scale, zero initial state
    ("x", "dt", "A", "B", "C", "D", "dt_bias"),  # dt_scale off
    ("x", "dt", "A", "B", "C", "dt_scale"),  # dt_scale on, no bias
    ("x", "dt", "A", "B", "C", "initial_state"),
], ids=["plain", "no_time_scale", "time_scale_no_bias", "initial_state_only"])
@pytest.mark.parametrize("backend", FAST)
def test_fast_backends_match_reference_optional_inputs(backend, use):
    inputs = make_inputs(length=45, groups=2, seed=3)
    assert_parity(run(inputs, backend, use=use, chunk_size=8), run(inputs, "reference", use=use))


@pytest.mark.parametrize("backend", FAST)
def test_dt_without_softplus(backend):
    inputs = make_inputs(length=30, seed=4)
    inputs["dt"] = inputs["dt"].abs() * 0.1  # Δ used as given (must be ≥ 0 for a decaying state)
    use = ("x", "dt", "A", "B", "C", "D", "dt_scale", "initial_state")
    assert_parity(run(inputs, backend, use=use, dt_softplus=False, chunk_size=8),
                  run(inputs, "reference", use=use, dt_softplus=False))


def test_reference_matches_explicit_recurrence_and_time_scale_formula():
    """Δ = softplus(dt·dt_scale + dt_bias) (model-specs §5), h_t = exp(Δ_t A)h_{t−1} + Δ_t x_t⊗B_t, y = hC + Dx."""
    p = make_inputs(batch=1, length=5, heads=2, head_dim=3, groups=1, n=2, seed=5)
    y, final = ssd(p["x"], p["dt"], p["A"], p["B"], p["C"], D=p["D"], dt_bias=p["dt_bias"], dt_scale=p["dt_scale"],
                   initial_state=p["initial_state"], return_final_state=True, backend="reference")
    for h in range(2):
        state = p["initial_state"][0, h].double()
        for t in range(5):
            delta = torch.nn.functional.softplus(p["dt"][0, t, h] * p["dt_scale"][0, t, h] + p["dt_bias"][h]).double()
            state = torch.exp(delta * p["A"][h]) * state + delta * torch.outer(p["x"][0, t, h], p["B"][0, t, 0])
            expect = state @ p["C"][0, t, 0].double() + p["D"][h] * p["x"][0, t, h]
            torch.testing.assert_close(y[0, t, h].double(), expect, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(final[0, h].double(), state, rtol=1e-5, atol=1e-6)


def test_group_to_head_mapping():
    """Head h reads group h // (heads / groups): equal to running each group's heads separately."""
    p = make_inputs(batch=1, length=9, heads=4, groups=2, seed=6)
    y = ssd(p["x"], p["dt"], p["A"], p["B"], p["C"], backend="torch", chunk_size=4)
    for gi in range(2):
        hs = slice(2 * gi, 2 * gi + 2)
        part = ssd(p["x"][:, :, hs], p["dt"][:, :, hs], p["A"][hs], p["B"][:, :, gi : gi + 1],
                   p["C"][:, :, gi : gi + 1], backend="reference")
        assert rel_err(y[:, :, hs], part) <= 1e-5


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("length,chunk_size", [(50, 16), (201, 32)])
def test_left_padded_batch_with_pad_mask(backend, length, chunk_size):
    inputs = make_inputs(batch=3, length=length, groups=2, seed=7)
    mask = left_pad_mask([length, length - 13, 4], length)
    got = run(inputs, backend, chunk_size=chunk_size, pad_mask=mask)
    ref = run(inputs, "reference", pad_mask=mask)
    assert_parity(got, ref)
    for y, _, grads in (got, ref):
        assert (y[~mask] == 0).all()  # output 0 at pads
        for k in ("x", "dt", "dt_scale"):
            assert (grads[k][~mask] == 0).all(), k  # nothing at a pad influences anything


def test_a_batch_too_large_for_the_cache_runs_in_row_slices(monkeypatch):
    """The torch path takes rows in slices of SLICE_ELEMENTS / (padded length·heads·max(head_dim, Q)); the result is
    the same, gradients of the shared A, D and dt_bias and of the per-row initial state included."""
    module = importlib.import_module("kernels.ssd")
    monkeypatch.setattr(module, "SLICE_ELEMENTS", 2 * 32 * 4 * 16)  # length 23 → 2 chunks of 16: 2 rows a slice
    slices = []
    core = module._chunked_core
    monkeypatch.setattr(module, "_chunked_core", lambda x, *args: slices.append(len(x)) or core(x, *args))
    inputs = make_inputs(batch=5, length=23, groups=2, seed=17)
    mask = left_pad_mask([23, 10, 1, 23, 5], 23)
    assert_parity(run(inputs, "torch", pad_mask=mask), run(inputs, "reference", pad_mask=mask))
    assert slices == [2, 2, 1]


@pytest.mark.parametrize("backend,softplus,tol", [("reference", False, 0.0), ("reference", True, 1e-6),
                                                  ("torch", True, 1e-5),
                                                  pytest.param("cpu", False, 0.0, marks=CPU.marks),
                                                  pytest.param("cpu", True, 1e-6, marks=CPU.marks)])
def test_padding_is_exact_noop(backend, softplus, tol):
    """A user's outputs at the real positions do not depend on how much left padding precedes them (pad values are
    garbage on purpose). The reference recurrence is bit-identical (tol 0) when Δ is given directly; with the
    softplus, torch's vectorised softplus rounds a few ulps differently in the SIMD body and the scalar tail, so the
    same dt at a shifted position can differ by 1 ulp (≤ 1e-6). The chunked path also moves chunk boundaries, so
    only rounding differs there (≤ 1e-5 relative). The C kernel runs the recurrence in time order like the
    reference, so it is bit-identical too."""
    length, extra = 23, 18
    base = make_inputs(batch=1, length=length, groups=2, seed=8)
    if not softplus:
        base["dt"] = base["dt"].abs() * 0.2
    noise = make_inputs(batch=1, length=extra, groups=2, seed=9)
    padded = {}
    for k, v in base.items():
        if k in ("x", "dt", "B", "C", "dt_scale"):
            padded[k] = torch.cat([noise[k] * 100, v], dim=1)
        else:
            padded[k] = v
    mask_short = torch.ones(1, length, dtype=torch.bool)
    mask_long = left_pad_mask([length], length + extra)
    for use_h0 in (False, True):
        kw = dict(D=base["D"], dt_bias=base["dt_bias"], return_final_state=True, backend=backend, chunk_size=8,
                  dt_softplus=softplus, initial_state=base["initial_state"] if use_h0 else None)
        y1, f1 = ssd(base["x"], base["dt"], base["A"], base["B"], base["C"], dt_scale=base["dt_scale"],
                     pad_mask=mask_short, **kw)
        y2, f2 = ssd(padded["x"], padded["dt"], padded["A"], padded["B"], padded["C"], dt_scale=padded["dt_scale"],
                     pad_mask=mask_long, **kw)
        assert (y2[:, :extra] == 0).all()
        assert rel_err(y2[:, extra:], y1) <= tol and rel_err(f2, f1) <= tol
        if tol == 0.0:
            assert torch.equal(y2[:, extra:], y1) and torch.equal(f2, f1)


def test_right_padding_final_state_is_state_at_last_real_token():
    inputs = make_inputs(batch=1, length=20, seed=10)
    mask = torch.arange(20)[None] < 12
    _, f_pad, _ = run(inputs, "torch", chunk_size=8, pad_mask=mask)
    short = {k: (v[:, :12] if k in ("x", "dt", "B", "C", "dt_scale") else v) for k, v in inputs.items()}
    _, f_short, _ = run(short, "reference")
    assert rel_err(f_pad, f_short) <= 1e-5


@pytest.mark.parametrize("backend", ["reference", *FAST])
def test_bf16_inputs(backend):
    inputs = make_inputs(length=50, groups=2, seed=11, dtype=torch.bfloat16)
    got = run(inputs, backend, chunk_size=16)
    ref = run({k: v.float() for k, v in inputs.items()}, "reference")
    y, f, grads = got
    assert y.dtype == torch.bfloat16 and f.dtype == torch.float32
    assert rel_err(y, ref[0]) <= 2e-2 and rel_err(f, ref[1]) <= 2e-2
    for k in NAMES:
        assert grads[k].dtype == torch.bfloat16
        assert rel_err(grads[k], ref[2][k]) <= 2e-2, (k, rel_err(grads[k], ref[2][k]))


@pytest.mark.parametrize("backend", FAST)
def test_non_contiguous_inputs(backend):
    """Mamba-2 splits x, B, C, dt out of one projection, so they arrive as strided views."""
    p = make_inputs(length=19, heads=4, head_dim=8, groups=2, n=5, seed=12)
    b, length = 2, 19
    packed = torch.randn(b, length, 4 * 8 + 2 * 2 * 5 + 4)
    x = packed[..., :32].unflatten(-1, (4, 8))
    B = packed[..., 32:42].unflatten(-1, (2, 5))
    C = packed[..., 42:52].unflatten(-1, (2, 5))
    dt = packed[..., 52:]
    kw = dict(D=p["D"], dt_bias=p["dt_bias"], initial_state=p["initial_state"], chunk_size=8)
    got = ssd(x, dt, p["A"], B, C, backend=backend, **kw)
    ref = ssd(x.contiguous(), dt.contiguous(), p["A"], B.contiguous(), C.contiguous(), backend="reference", **kw)
    assert rel_err(got, ref) <= 1e-4


@CPU.marks[0]
@pytest.mark.parametrize("n", [16, 32, 64, 5])
def test_cpu_kernel_specialised_state_sizes_thread_ranges_and_y_only(n):
    """N = 16, 32, 64 run the kernel's compile-time specialisations, 5 the generic loop; 5 rows over 2 threads give
    unequal row ranges (two ∂A accumulators); only y is used (no final-state gradient) and there is no initial
    state, the paths ``run`` does not take."""
    inputs = make_inputs(batch=5, length=41, heads=4, head_dim=6, groups=2, n=n, seed=15)
    mask = left_pad_mask([41, 20, 1, 41, 9], 41)
    use = ("x", "dt", "A", "B", "C", "D", "dt_bias", "dt_scale")
    results = []
    threads = torch.get_num_threads()
    for backend in ("reference", "cpu"):
        leaves = {k: inputs[k].clone().requires_grad_() for k in use}
        try:
            torch.set_num_threads(2)
            y = ssd(*(leaves[k] for k in ("x", "dt", "A", "B", "C")), D=leaves["D"], dt_bias=leaves["dt_bias"],
                    dt_scale=leaves["dt_scale"], pad_mask=mask, backend=backend)
        finally:
            torch.set_num_threads(threads)
        (y * torch.randn(y.shape, generator=torch.Generator().manual_seed(2))).sum().backward()
        results.append((y.detach(), {k: v.grad for k, v in leaves.items()}))
    (y_ref, g_ref), (y, g) = results
    assert rel_err(y, y_ref) <= 1e-4
    for k in use:
        assert rel_err(g[k], g_ref[k]) <= 1e-4, (k, rel_err(g[k], g_ref[k]))


@pytest.mark.parametrize("backend", ["reference", *FAST])
def test_empty_sequence_passes_the_initial_state_through(backend):
    p = make_inputs(length=0, seed=16)
    h0 = p["initial_state"].clone().requires_grad_()
    y, final = ssd(p["x"], p["dt"], p["A"], p["B"], p["C"], initial_state=h0, return_final_state=True,
                   backend=backend)
    assert y.shape == p["x"].shape and torch.equal(final, p["initial_state"])
    grad = torch.randn(final.shape)
    final.backward(grad)
    assert torch.equal(h0.grad, grad)


def test_default_call_returns_only_y_in_input_dtype():
    p = make_inputs(length=10)
    y = ssd(p["x"], p["dt"], p["A"], p["B"], p["C"])
    assert isinstance(y, torch.Tensor) and y.shape == p["x"].shape and y.dtype == torch.float32


def test_rejects_bad_arguments():
    p = make_inputs(length=6, heads=4, groups=1)
    with pytest.raises(ValueError, match="backend"):
        ssd(p["x"], p["dt"], p["A"], p["B"], p["C"], backend="cuda")
    with pytest.raises(ValueError, match="divisible"):
        ssd(p["x"], p["dt"], p["A"], torch.randn(2, 6, 3, 5), torch.randn(2, 6, 3, 5))
    with pytest.raises(ValueError, match="dt must be"):
        ssd(p["x"], p["dt"][:, :5], p["A"], p["B"], p["C"])
    with pytest.raises(ValueError, match="initial_state"):
        ssd(p["x"], p["dt"], p["A"], p["B"], p["C"], initial_state=torch.zeros(2, 4, 8, 4))
    with pytest.raises(ValueError, match="chunk_size"):
        ssd(p["x"], p["dt"], p["A"], p["B"], p["C"], chunk_size=0)


# --- Triton kernel (CPU through TRITON_INTERPRET=1) -----------------------------------------------------------------


def _need_triton():
    pytest.importorskip("triton")
    from kernels._backend import triton_interpreted

    if not torch.cuda.is_available() and not triton_interpreted():
        pytest.skip("needs CUDA or TRITON_INTERPRET=1")


def _device():
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.triton
@pytest.mark.parametrize("length,chunk_size,groups", [(1, 16, 1), (7, 16, 2), (37, 16, 2), (40, 32, 4), (33, 5, 1)])
def test_triton_matches_reference(length, chunk_size, groups):
    _need_triton()
    inputs = make_inputs(length=length, groups=groups, seed=20 + length)
    dev = {k: v.to(_device()) for k, v in inputs.items()}
    got = run(dev, "triton", chunk_size=chunk_size)
    got = tuple(t.cpu() for t in got[:2]) + ({k: v.cpu() for k, v in got[2].items()},)
    assert_parity(got, run(inputs, "reference"))


@pytest.mark.triton
@pytest.mark.parametrize("use", [("x", "dt", "A", "B", "C"), ("x", "dt", "A", "B", "C", "D", "dt_bias")],
                         ids=["plain", "no_time_scale"])
def test_triton_optional_inputs(use):
    _need_triton()
    inputs = make_inputs(length=20, heads=2, head_dim=4, n=3, seed=21)
    dev = {k: v.to(_device()) for k, v in inputs.items()}
    got = run(dev, "triton", use=use)
    got = tuple(t.cpu() for t in got[:2]) + ({k: v.cpu() for k, v in got[2].items()},)
    assert_parity(got, run(inputs, "reference", use=use))


@pytest.mark.triton
def test_triton_left_padding():
    _need_triton()
    inputs = make_inputs(batch=3, length=30, groups=2, seed=22)
    mask = left_pad_mask([30, 17, 3], 30)
    dev = {k: v.to(_device()) for k, v in inputs.items()}
    y, f, grads = run(dev, "triton", pad_mask=mask.to(_device()))
    y, f, grads = y.cpu(), f.cpu(), {k: v.cpu() for k, v in grads.items()}
    assert_parity((y, f, grads), run(inputs, "reference", pad_mask=mask))
    assert (y[~mask] == 0).all() and (grads["x"][~mask] == 0).all()

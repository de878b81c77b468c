"""Mamba-1 selective scan (model-specs §3a), after Gu & Dao, "Mamba: Linear-Time Sequence Modeling with Selective
State Spaces" (2023), Algorithm 2 and eq. (2a)-(2b) with the discretisation of eq. (4): A by zero-order hold,
Ā_t = exp(Δ_t A), and B by Euler, B̄_t x_t = Δ_t B_t x_t. Per channel d and state index n:

    h_t = exp(Δ_t A) ⊙ h_{t−1} + Δ_t B_t u_t        (eq. 2a, h_0 = 0)
    y_t = C_t · h_t + D ⊙ u_t                       (eq. 2b, plus the skip term D)
    y  ← y ⊙ SiLU(z)                                (the Mamba block's output gate)

with Δ = softplus(delta + delta_bias). Everything is computed in fp32 (§3a pitfall: scan and exp in fp32) and the
result is cast back to u's dtype. Padded positions (``pad_mask`` False, typically left padding) are an exact no-op
on the state: Δ is forced to 0 there, so Ā = exp(0) = 1 and the input term Δ·B·u = 0, and their output is 0.

Backends:
- ``reference``: the plain loop over time under autograd, the readable specification.
- ``torch``: a chunked scan with a hand-written backward (custom autograd). Time is cut into chunks of T positions
  (``chunk_size``, default 8); one chunk is a single compiled step (``torch.compile``: Inductor unrolls its T
  positions into one loop nest that keeps each channel's (N,) state in registers), and a Python loop over the
  chunks carries the (batch, d_inner, N) state across their boundaries, so the state goes through memory once per
  chunk rather than several times per position. It uses only products of Ā ≤ 1, so it cannot overflow however
  large Δ gets. The backward pass runs chunk by chunk from the last: it recomputes the chunk's states from the
  state that entered it (kept by the forward pass: O(L/T) states, never the (batch, length, d_inner, N) tensor
  that autograd through the loop would keep) and runs the reverse scan ∂L/∂h_t = C_t gy_t + Ā_{t+1} ⊙ ∂L/∂h_{t+1}
  inside the same compiled step. Where torch.compile is unavailable (no C++ compiler) the same code runs eagerly.
- ``triton``: a Triton forward kernel (kernels/_triton_selective_scan.py) with the ``torch`` backward.
- ``cpu``: fused C loops (kernels/_cpu_selective_scan.c) for forward and backward, with one batch row's
  (d_inner, N) state in cache for the whole sequence and the rows split over the torch threads. What ``auto`` runs
  on CPU tensors when the machine's C compiler can build it (kernels/_cpu.py); the torch path otherwise.
"""

from __future__ import annotations

import functools
import math
import warnings

import torch
import torch.nn.functional as F

from kernels._backend import fp32_under_autocast, resolve_backend
from kernels._cpu import cpu_kernels, row_ranges, run_ranges

LOG2E = math.log2(math.e)
DEFAULT_CHUNK = 8  # positions per compiled step; B=256, L=200, d_inner=128, N=16, fwd+bwd, 2 threads: 0.09 s, against
# 0.11 s for 4 and 0.125 s for 16 (whose unrolled backward also takes twice as long to compile)
# Rows per slice: one slice's (rows, d_inner, N) state near 2^17 fp32 = 512 KB, so that the states a compiled step
# writes and reads back stay in cache. At the sizes above: 64 rows 0.09 s; 16 rows 0.14 s, 32 rows 0.11 s (per-call
# overhead); 128 rows 0.094 s, 256 rows 0.10 s.
STEP_ELEMENTS = 1 << 17


def _prepare(u, delta, delta_bias, delta_softplus, pad_mask):
    """fp32 input and step size Δ, with Δ = 0 and u = 0 at padded positions (an exact no-op on the state)."""
    u32 = u.float()
    dt = delta.float()
    if delta_bias is not None:
        dt = dt + delta_bias.float()
    if delta_softplus:
        dt = F.softplus(dt)
    if pad_mask is not None:
        keep = pad_mask[..., None]
        dt = torch.where(keep, dt, 0.0)
        u32 = torch.where(keep, u32, 0.0)
    return u32, dt


def _finish(y, u32, D, z, pad_mask, dtype):
    """Skip term D ⊙ u, SiLU(z) gate, zero output at pads, cast to the input dtype."""
    if D is not None:
        y = y + D.float() * u32
    if z is not None:
        y = y * F.silu(z.float())
    if pad_mask is not None:
        y = torch.where(pad_mask[..., None], y, 0.0)
    return y.to(dtype)


def _scan_reference(u, dt, A, B, C):
    """Eq. (2a)-(2b) one time step at a time: h (batch, d_inner, N)."""
    batch, length, d_inner = u.shape
    h = u.new_zeros(batch, d_inner, A.shape[1])
    ys = []
    for t in range(length):
        decay = torch.exp(dt[:, t, :, None] * A)  # Ā_t = exp(Δ_t A), ZOH
        inp = (dt[:, t] * u[:, t])[:, :, None] * B[:, t, None, :]  # B̄_t u_t = Δ_t B_t u_t, Euler
        h = decay * h + inp
        ys.append((h * C[:, t, None, :]).sum(-1))
    if not ys:
        return u.new_zeros(batch, 0, d_inner)
    return torch.stack(ys, dim=1)


def _segment_forward(h, dt, u, B, C, A2, y):
    """One chunk of T positions from its entering state h (rows, d_inner, N), every other tensor a (rows, T, ·) view:
    eq. (2a)-(2b) step by step, with A2 = A·log₂e (exp2 is 4× faster than exp on this CPU). Writes y
    into ``y`` (a (rows, T, d_inner) view of the output: Inductor stores straight into it, no copy afterwards) and
    returns the state leaving the chunk. Compiled (``_fused``), the T steps become one loop nest that
    keeps each channel's N states in registers, so the state makes one trip through memory per chunk instead of
    several per position."""
    ys = []
    for k in range(dt.shape[1]):
        x = (dt[:, k] * u[:, k]).unsqueeze(-1)  # Δ_t u_t
        h = torch.exp2(dt[:, k].unsqueeze(-1) * A2) * h + x * B[:, k].unsqueeze(-2)  # Ā_t ⊙ h + Δ_t B_t u_t
        ys.append((h * C[:, k].unsqueeze(-2)).sum(-1))
    y.copy_(torch.stack(ys, 1))
    return h


def _segment_backward(h0, dt, u, B, C, gy, carry, A2, A, dA_rows, out):
    """Gradients for one chunk (laid out as in ``_segment_forward``), given its entering state h0 and
    carry = Ā_{t+1} ⊙ ∂L/∂h_{t+1} from the position after it. Recompute the chunk's states, then run the reverse scan
    g_t = ∂L/∂h_t = gy_t ⊗ C_t + Ā_{t+1} ⊙ g_{t+1}. With x_t = Δ_t u_t and q_t = g_t ⊙ Ā_t ⊙ h_{t−1} (the gradient
    of Δ_t A through Ā_t = exp(Δ_t A)): ∂x_t = Σ_n g_t B_t, so ∂u_t = ∂x_t Δ_t and ∂Δ_t = Σ_n q_t A + ∂x_t u_t;
    ∂A = Σ q_t Δ_t, ∂B_t = Σ_d g_t x_t, ∂C_t = Σ_d gy_t h_t. ∂A is accumulated per row into dA_rows
    (rows, d_inner, N): a sum over rows here would be a strided reduction per step. Writes (∂Δ, ∂u, ∂B, ∂C) into the
    views in ``out`` and returns the updated dA_rows and the carry into the previous chunk."""
    steps = dt.shape[1]
    dt, u, B, C, gy = (t.unbind(1) for t in (dt, u, B, C, gy))
    h, decays, states = h0, [], []
    for k in range(steps):
        decays.append(torch.exp2(dt[k].unsqueeze(-1) * A2))
        h = decays[k] * h + (dt[k] * u[k]).unsqueeze(-1) * B[k].unsqueeze(-2)
        states.append(h)
    ddt, du, dB, dC = ([None] * steps for _ in range(4))
    for k in range(steps - 1, -1, -1):
        g = carry + gy[k].unsqueeze(-1) * C[k].unsqueeze(-2)
        dC[k] = (gy[k].unsqueeze(-1) * states[k]).sum(-2)
        dx = (g * B[k].unsqueeze(-2)).sum(-1)
        dB[k] = (g * (dt[k] * u[k]).unsqueeze(-1)).sum(-2)
        carry = g * decays[k]
        q = carry * (states[k - 1] if k else h0)
        ddt[k] = (q * A).sum(-1) + dx * u[k]
        du[k] = dx * dt[k]
        dA_rows = dA_rows + q * dt[k].unsqueeze(-1)
    for o, g in zip(out, (ddt, du, dB, dC)):
        o.copy_(torch.stack(g, 1))
    return dA_rows, carry


compile_unavailable_reason: str | None = None  # set when torch.compile failed once; the chunks then run eagerly


@functools.cache
def _compiled(fn):
    # Not fullgraph=True: past dynamo's recompile limit (8 shapes or chunk lengths per function, which only a test
    # suite reaches) a new shape then runs eagerly instead of raising.
    return torch.compile(fn)


def _fused(fn, *args):
    """fn(*args) through torch.compile (Inductor fuses the chunk's unrolled steps into one loop nest; the first call
    for a new shape compiles, in seconds), or eagerly, with one warning, where compilation fails (no C++ compiler,
    an unsupported platform). The eager run is the same code, so the results agree to fp32 rounding."""
    global compile_unavailable_reason
    if compile_unavailable_reason is None:
        try:
            return _compiled(fn)(*args)
        except Exception as exc:  # noqa: BLE001 - any compiler failure
            result = fn(*args)  # an error of fn itself raises here, and leaves compilation on
            compile_unavailable_reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            warnings.warn(f"selective_scan: torch.compile is unavailable ({compile_unavailable_reason}); the torch "
                          "path runs its chunks eagerly, several times slower", stacklevel=3)
            return result
    return fn(*args)


def _end_padded(t, padded_len):
    """t (batch, length, k) with zeros appended up to ``padded_len`` positions (a copy only when it must grow): Δ = 0
    and u = 0 there, so the padded positions leave the state untouched and get no gradient."""
    return F.pad(t, (0, 0, 0, padded_len - t.shape[1])) if padded_len > t.shape[1] else t


def _scan_chunks(dt, u, B, C, A2, chunk, y=None):
    """Forward over end-padded (rows, padded length, ·) inputs, chunk by chunk: each chunk's entering state, and y
    written into ``y`` (rows, padded length, d_inner; a scratch buffer when not given)."""
    h = dt.new_zeros(dt.shape[0], dt.shape[2], A2.shape[1])
    y = y if y is not None else u.new_empty(u.shape)
    entering = []
    for lo in range(0, dt.shape[1], chunk):
        entering.append(h)
        h = _fused(_segment_forward, h, *(t[:, lo : lo + chunk] for t in (dt, u, B, C)), A2, y[:, lo : lo + chunk])
    return entering


class _SelectiveScan(torch.autograd.Function):
    """y = scan(Δ, u, A, B, C) over (batch, length, ·) inputs, in slices of ``rows`` batch rows. Forward: the
    chunk-by-chunk torch scan, or the Triton kernel (which keeps no states, so the backward first reruns the torch
    forward for them). Backward: the reverse scan chunk by chunk from the last, from the states that entered each
    chunk. Outputs and gradients are written chunk by chunk into full tensors."""

    @staticmethod
    def forward(ctx, dt, u, A, B, C, chunk, rows, use_triton):
        batch, length, _ = u.shape
        padded = [_end_padded(t, -(-length // chunk) * chunk) for t in (dt, u, B, C)]
        A2 = A * LOG2E
        if use_triton:
            from kernels._triton_selective_scan import scan_forward

            y, entering = scan_forward(dt, dt * u, A, B, C), None
        else:
            y = u.new_empty(padded[1].shape)
            entering = [_scan_chunks(*(t[r : r + rows] for t in padded), A2, chunk, y[r : r + rows])
                        for r in range(0, batch, rows)]
            if y.shape[1] != length:  # a copy, not a view of the end-padded buffer: the caller owns its output
                y = y[:, :length].contiguous()
        ctx.save_for_backward(A, *padded)
        ctx.entering, ctx.chunk, ctx.rows, ctx.length = entering, chunk, rows, length
        return y

    @staticmethod
    def backward(ctx, gy):
        A, *padded = ctx.saved_tensors
        chunk, rows, length = ctx.chunk, ctx.rows, ctx.length
        A2 = A * LOG2E
        gy = _end_padded(gy.float(), padded[0].shape[1])
        batch = gy.shape[0]
        ddt, du = (gy.new_empty(gy.shape) for _ in range(2))
        dB, dC = (gy.new_empty(batch, gy.shape[1], A.shape[1]) for _ in range(2))
        dA = torch.zeros_like(A)
        for s, r in enumerate(range(0, batch, rows)):
            dt, u, B, C, gy_r = (t[r : r + rows] for t in (*padded, gy))
            entering = ctx.entering[s] if ctx.entering is not None else _scan_chunks(dt, u, B, C, A2, chunk)
            carry = torch.zeros_like(entering[0])
            dA_rows = torch.zeros_like(carry)
            for i in range(len(entering) - 1, -1, -1):
                lo = i * chunk
                dA_rows, carry = _fused(_segment_backward, entering[i],
                                        *(t[:, lo : lo + chunk] for t in (dt, u, B, C, gy_r)), carry, A2, A, dA_rows,
                                        [g[r : r + rows, lo : lo + chunk] for g in (ddt, du, dB, dC)])
            dA += dA_rows.sum(0)
        return ddt[:, :length], du[:, :length], dA, dB[:, :length], dC[:, :length], None, None, None


class _FusedCpuScan(torch.autograd.Function):
    """y = scan(Δ, u, A, B, C) by the fused C kernels (kernels/_cpu_selective_scan.c), which also fold in x = Δ·u
    and its gradient; the backward recomputes the states itself. Every input fp32 and contiguous."""

    @staticmethod
    def forward(ctx, dt, u, A, B, C):
        batch, length, d_inner = u.shape
        y = torch.empty_like(u)
        ptrs = [t.data_ptr() for t in (dt, u, A, B, C, y)]
        run_ranges("scan_forward", row_ranges(batch),
                   lambda i, b0, b1: cpu_kernels().scan_forward(*ptrs, b0, b1, length, d_inner, A.shape[1]))
        ctx.save_for_backward(dt, u, A, B, C)
        return y

    @staticmethod
    def backward(ctx, gy):
        dt, u, A, B, C = ctx.saved_tensors
        batch, length, d_inner = u.shape
        ranges = row_ranges(batch)
        ddt, du = torch.empty_like(u), torch.empty_like(u)
        dA_parts = A.new_zeros(len(ranges), *A.shape)  # one ∂A accumulator per thread, summed below
        dB, dC = torch.zeros_like(B), torch.zeros_like(C)
        gy = gy.float().contiguous()
        ptrs = [t.data_ptr() for t in (dt, u, A, B, C, gy, ddt, du)]
        run_ranges("scan_backward", ranges, lambda i, b0, b1: cpu_kernels().scan_backward(
            *ptrs, dA_parts[i].data_ptr(), dB.data_ptr(), dC.data_ptr(), b0, b1, length, d_inner, A.shape[1]))
        return ddt, du, dA_parts.sum(0), dB, dC


@fp32_under_autocast
def selective_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = True,
    pad_mask: torch.Tensor | None = None,
    backend: str = "auto",
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Mamba-1 selective scan; returns y (batch, length, d_inner) in u's dtype.

    u, delta, z: (batch, length, d_inner); A: (d_inner, N), real and normally negative (A = −exp(A_log));
    B, C: (batch, length, N); D, delta_bias: (d_inner,); pad_mask: (batch, length) bool, True at real tokens.
    ``chunk_size`` (the ``torch`` backend's chunk length, default 8: the positions fused into one compiled step)
    never changes the result beyond fp32 rounding.
    """
    backend = resolve_backend(backend, u, delta, A, B, C, has_triton=True, has_cpu=True)
    if u.ndim != 3 or delta.shape != u.shape:
        raise ValueError(f"expected u and delta (batch, length, d_inner), got {tuple(u.shape)}, {tuple(delta.shape)}")
    batch, length, d_inner = u.shape
    if A.ndim != 2 or A.shape[0] != d_inner:
        raise ValueError(f"expected A (d_inner={d_inner}, N), got {tuple(A.shape)}")
    n = A.shape[1]
    for name, t in (("B", B), ("C", C)):
        if t.shape != (batch, length, n):
            raise ValueError(f"expected {name} {(batch, length, n)}, got {tuple(t.shape)}")
    if z is not None and z.shape != u.shape:
        raise ValueError(f"expected z {tuple(u.shape)}, got {tuple(z.shape)}")
    if pad_mask is not None:
        if pad_mask.shape != (batch, length):
            raise ValueError(f"expected pad_mask {(batch, length)}, got {tuple(pad_mask.shape)}")
        pad_mask = pad_mask.to(device=u.device, dtype=torch.bool)
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be ≥ 1, got {chunk_size}")
    u32, dt = _prepare(u, delta, delta_bias, delta_softplus, pad_mask)
    A32, B32, C32 = A.float(), B.float(), C.float()
    if pad_mask is not None:  # so that even non-finite garbage at pads cannot leak through 0·inf
        B32 = torch.where(pad_mask[..., None], B32, 0.0)
        C32 = torch.where(pad_mask[..., None], C32, 0.0)
    if backend == "reference":
        y = _scan_reference(u32, dt, A32, B32, C32)
    elif length == 0:
        y = u32.new_zeros(batch, 0, d_inner)
    elif backend == "cpu":
        y = _FusedCpuScan.apply(*(t.contiguous() for t in (dt, u32, A32, B32, C32)))
    else:
        # The torch path takes rows in slices whose state stays near STEP_ELEMENTS (cache-sized; figures there).
        # Rows are independent, so this is exact. The Triton kernel's forward takes the whole batch at once.
        rows = max(1, STEP_ELEMENTS // (d_inner * n))
        y = _SelectiveScan.apply(dt, u32, A32, B32, C32, chunk_size or DEFAULT_CHUNK, rows, backend == "triton")
    return _finish(y, u32, D, z, pad_mask, u.dtype)

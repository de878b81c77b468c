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
- ``torch``: a chunked scan with a hand-written backward (custom autograd). Time is cut into chunks of T steps
  that are processed side by side: one loop over the T positions runs every chunk from a zero state, a loop over
  the chunks carries the state across their boundaries (H_{c+1} = Π Ā over chunk c ⊙ H_c + local end state of c),
  and a second loop over the positions reruns every chunk from its true entering state and emits y. It uses only
  products of Ā ≤ 1, so it cannot overflow however large Δ gets. The backward pass is the same scan run in reverse
  for ∂L/∂h_t = C_t gy_t + Ā_{t+1} ⊙ ∂L/∂h_{t+1}; the states it needs are recomputed segment by segment from
  checkpoints the forward pass kept every ``SEGMENT`` positions, so memory stays O(L/SEGMENT) states, never the
  (batch, length, d_inner, N) tensor that autograd through the loop would keep.
  ``chunk_size=None`` picks the number of chunks so that one step's (batch, chunks, d_inner, N) tensor stays near
  ``STEP_ELEMENTS`` (cache-sized): many chunks for a single user's request, one chunk for a training batch whose
  per-step tensor already fills both cores. Measured on this 2-core CPU at B=256, L=200, d_inner=128, N=16:
  16-step chunks were 2× slower than one chunk, because every extra chunk adds memory traffic, not parallelism.
- ``triton``: a Triton forward kernel (kernels/_triton_selective_scan.py) with the ``torch`` backward.
- ``cpu``: fused C loops (kernels/_cpu_selective_scan.c) for forward and backward, with one batch row's
  (d_inner, N) state in cache for the whole sequence and the rows split over the torch threads. What ``auto`` runs
  on CPU tensors when the machine's C compiler can build it (kernels/_cpu.py); the torch path otherwise.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from kernels._backend import fp32_under_autocast, resolve_backend
from kernels._cpu import cpu_kernels, row_ranges, run_ranges

LOG2E = math.log2(math.e)
SEGMENT = 8  # positions between the backward pass's state checkpoints
# Target size of one step's state tensor (rows per slice, and the chunk length when chosen automatically): 2^17 fp32
# = 512 KB, so a segment's decays, states and gradients stay in cache. One thread, fwd+bwd, against 2^19: 0.37 s
# against 0.48 s at B=256, L=200, d_inner=128, N=16; 0.044 against 0.097 s at B=128, L=50; 0.15 against 0.21 s for
# SIGMA's 1,024 rows × L 10 × N 32.
STEP_ELEMENTS = 1 << 17


def auto_chunk_size(batch: int, length: int, d_inner: int, n: int) -> int:
    """Chunk length T: as many chunks (at most √L) as keep one step's state tensor near STEP_ELEMENTS."""
    n_chunks = max(1, min(STEP_ELEMENTS // max(1, batch * d_inner * n), math.isqrt(max(1, length))))
    return max(1, -(-length // n_chunks))


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


def _to_chunks(t, chunk, n_chunks):
    """(batch, length, k) → a (chunk, batch, n_chunks, k) view, end-padded with zeros, so that ``[j]`` is position j
    of every chunk. A view, not a copy: fresh large buffers cost page faults that take longer than the scan."""
    batch, length, k = t.shape
    if n_chunks * chunk != length:
        t = F.pad(t, (0, 0, 0, n_chunks * chunk - length))
    return t.reshape(batch, n_chunks, chunk, k).permute(2, 0, 1, 3)


def _chunked_empty(like, chunk, n_chunks, k):
    """An output buffer in the (batch, padded length, k) layout and its (chunk, batch, n_chunks, k) view."""
    out = like.new_empty(like.shape[0], n_chunks * chunk, k)
    return out, _to_chunks(out, chunk, n_chunks)


def _outer(x, b):
    """(…, d_inner) ⊗ (…, N) → (…, d_inner, N)."""
    return x.unsqueeze(-1) * b.unsqueeze(-2)


def _decay(dt, A2):
    """Ā = exp(Δ ⊗ A) = 2^(Δ ⊗ A·log₂e), (…, d_inner, N); A2 = A·log₂e. exp2 is 4× faster than exp on this CPU
    (vectorised), and the rescaled exponent costs at most ~4e-6 relative error at exponent −80."""
    return torch.mul(dt.unsqueeze(-1), A2).exp2_()


def _entering_states(dtc, xc, Bc, A2):
    """The state entering each chunk, (batch, n_chunks, d_inner, N): local end states from zero, then carried."""
    chunk, batch, n_chunks, d_inner = dtc.shape
    entering = dtc.new_zeros(batch, n_chunks, d_inner, A2.shape[1])
    if n_chunks == 1:
        return entering
    h = _outer(xc[0], Bc[0])
    for j in range(1, chunk):
        h = torch.mul(_decay(dtc[j], A2), h).addcmul_(xc[j].unsqueeze(-1), Bc[j].unsqueeze(-2))
    chunk_decay = _decay(dtc.sum(0), A2)  # Π_j Ā_j over each chunk
    for c in range(1, n_chunks):
        entering[:, c] = torch.addcmul(h[:, c - 1], chunk_decay[:, c - 1], entering[:, c - 1])
    return entering


def _exit_grads(dtc, gyc, Cc, A2):
    """∂L/∂h at each chunk's last position coming from the later chunks (through the next chunk's first Ā)."""
    chunk, batch, n_chunks, d_inner = dtc.shape
    if n_chunks == 1:
        return None
    g = _outer(gyc[chunk - 1], Cc[chunk - 1])
    for j in range(chunk - 2, -1, -1):
        g = torch.addcmul(_outer(gyc[j], Cc[j]), _decay(dtc[j + 1], A2), g)
    first_decay = _decay(dtc[0], A2)
    rest_decay = _decay(dtc[1:].sum(0), A2)  # Π Ā over positions 1..T−1 of each chunk
    exit_grads = torch.zeros_like(g)
    for c in range(n_chunks - 2, -1, -1):
        later = torch.addcmul(g[:, c + 1], rest_decay[:, c + 1], exit_grads[:, c + 1])  # ∂L/∂h at chunk c+1's start
        exit_grads[:, c] = first_decay[:, c + 1] * later
    return exit_grads


def _segment_states(states, decays, h, xc, Bc):
    """Run one segment from state h: states[k] = Ā_k ⊙ states[k−1] + x_k ⊗ B_k, written into the given buffer."""
    for k in range(decays.shape[0]):
        h = torch.mul(decays[k], h, out=states[k]).addcmul_(xc[k].unsqueeze(-1), Bc[k].unsqueeze(-2))
    return h


def _chunked_forward(dt, x, A, B, C, chunk):
    """y (batch, length, d_inner) and the state checkpoints at the start of every SEGMENT positions
    (n_segments, batch, chunks, d_inner, N). x = Δ·u. One segment's decays and states live in buffers reused from
    segment to segment, and everything but the recurrence itself runs once per segment."""
    batch, length, d_inner = x.shape
    n_chunks = -(-length // chunk)
    dtc, xc, Bc, Cc = (_to_chunks(t, chunk, n_chunks) for t in (dt, x, B, C))
    A2 = A * LOG2E
    h = _entering_states(dtc, xc, Bc, A2)
    y, yc = _chunked_empty(x, chunk, n_chunks, d_inner)
    n_segments = -(-chunk // SEGMENT)
    checkpoints = h.new_empty(n_segments, *h.shape)
    decays, states = (h.new_empty(min(SEGMENT, chunk), *h.shape) for _ in range(2))
    for seg in range(n_segments):
        lo, hi = seg * SEGMENT, min(chunk, (seg + 1) * SEGMENT)
        checkpoints[seg] = h
        dec = torch.mul(dtc[lo:hi].unsqueeze(-1), A2, out=decays[: hi - lo]).exp2_()
        h = _segment_states(states[: hi - lo], dec, h, xc[lo:hi], Bc[lo:hi])
        # y_t = C_t · h_t as (1, N) @ (N, d), the fast BLAS layout
        yc[lo:hi] = (Cc[lo:hi].unsqueeze(-2) @ states[: hi - lo].transpose(-1, -2)).squeeze(-2)
    return y[:, :length], checkpoints


def _chunked_backward(dt, x, A, B, C, checkpoints, chunk, gy):
    """Gradients of (dt, x, A, B, C) by the reverse scan g_t = ∂L/∂h_t = gy_t C_t + Ā_{t+1} ⊙ g_{t+1}; with
    q_t = g_t ⊙ Ā_t ⊙ h_{t−1} (the gradient of Δ_t A through Ā_t = exp(Δ_t A)): ∂Δ_t = Σ_n q_t A, ∂A = Σ q_t Δ_t,
    ∂x_t = Σ_n g_t B_t, ∂B_t = Σ_d g_t x_t, ∂C_t = Σ_d gy_t h_t. Segment by segment from the last: recompute the
    segment's states from its checkpoint, run g backwards through it, then take every reduction for the segment at
    once."""
    batch, length, d_inner = x.shape
    n_chunks = -(-length // chunk)
    dtc, xc, Bc, Cc, gyc = (_to_chunks(t, chunk, n_chunks) for t in (dt, x, B, C, gy))
    A2 = A * LOG2E
    exit_grads = _exit_grads(dtc, gyc, Cc, A2)
    (ddt_out, ddt), (dx_out, dx) = (_chunked_empty(x, chunk, n_chunks, d_inner) for _ in range(2))
    (dB_out, dB), (dC_out, dC) = (_chunked_empty(B, chunk, n_chunks, B.shape[-1]) for _ in range(2))
    size = min(SEGMENT, chunk)
    decays, grads, q, q_dt = (checkpoints.new_empty(size, *checkpoints.shape[1:]) for _ in range(4))
    states = checkpoints.new_empty(size + 1, *checkpoints.shape[1:])
    q_dt.zero_()  # Σ_t q_t Δ_t, summed over segment slots, batch and chunks at the end
    carry = exit_grads  # Ā_{t+1} ⊙ g_{t+1} flowing into the segment's last position (None: nothing)
    for seg in range(checkpoints.shape[0] - 1, -1, -1):
        lo, hi = seg * SEGMENT, min(chunk, (seg + 1) * SEGMENT)
        n = hi - lo
        dec = torch.mul(dtc[lo:hi].unsqueeze(-1), A2, out=decays[:n]).exp2_()
        states[0] = checkpoints[seg]
        _segment_states(states[1 : n + 1], dec, checkpoints[seg], xc[lo:hi], Bc[lo:hi])
        for k in range(n - 1, -1, -1):
            from_y = (gyc[lo + k].unsqueeze(-1), Cc[lo + k].unsqueeze(-2))  # gy_t ⊗ C_t, fused into one pass
            if carry is None:
                torch.mul(*from_y, out=grads[k])
            else:
                torch.addcmul(carry, *from_y, out=grads[k])
            carry = torch.mul(grads[k], dec[k], out=q[k])  # Ā_t ⊙ g_t: also the first factor of q_t
        carry = carry.clone()  # q is overwritten by the next segment
        g, hs = grads[:n], states[: n + 1]
        dC[lo:hi] = (gyc[lo:hi].unsqueeze(-2) @ hs[1:]).squeeze(-2)
        dx[lo:hi] = (Bc[lo:hi].unsqueeze(-2) @ g.transpose(-1, -2)).squeeze(-2)
        dB[lo:hi] = (xc[lo:hi].unsqueeze(-2) @ g).squeeze(-2)
        qs = q[:n].mul_(hs[:-1])  # q_t = g_t ⊙ Ā_t ⊙ h_{t−1}
        q_dt[:n].addcmul_(qs, dtc[lo:hi].unsqueeze(-1))
        ddt[lo:hi] = qs.mul_(A).sum(-1)  # in place: q is not needed after this
    return ddt_out[:, :length], dx_out[:, :length], q_dt.sum((0, 1, 2)), dB_out[:, :length], dC_out[:, :length]


class _SelectiveScan(torch.autograd.Function):
    """y = scan(Δ, x = Δ·u, A, B, C). Forward: the chunked torch scan, or the Triton kernel (which keeps no states,
    so its backward first recomputes the checkpoints). Backward: the reverse chunked scan."""

    @staticmethod
    def forward(ctx, dt, x, A, B, C, chunk, use_triton):
        if use_triton:
            from kernels._triton_selective_scan import scan_forward

            y, checkpoints = scan_forward(dt, x, A, B, C), None
        else:
            y, checkpoints = _chunked_forward(dt, x, A, B, C, chunk)
        ctx.save_for_backward(dt, x, A, B, C, checkpoints)
        ctx.chunk = chunk
        return y

    @staticmethod
    def backward(ctx, gy):
        dt, x, A, B, C, checkpoints = ctx.saved_tensors
        if checkpoints is None:
            checkpoints = _chunked_forward(dt, x, A, B, C, ctx.chunk)[1]
        return (*_chunked_backward(dt, x, A, B, C, checkpoints, ctx.chunk, gy.float().contiguous()), None, None)


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
    ``chunk_size`` (the ``torch`` backend's chunk length; None picks it from the shapes) never changes the result
    beyond fp32 rounding.
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
        # The torch path takes rows in slices whose per-step state stays near STEP_ELEMENTS (cache-sized): one scan
        # over a batch whose state does not fit the cache streams every step through memory (figures at
        # STEP_ELEMENTS). Rows are independent, so this is exact. The Triton kernel takes the whole batch at once.
        rows = batch if backend == "triton" else max(1, STEP_ELEMENTS // (d_inner * n))
        chunk = min(length, chunk_size or auto_chunk_size(min(batch, rows), length, d_inner, n))
        x = dt * u32
        parts = [_SelectiveScan.apply(dt_r, x_r, A32, B_r, C_r, chunk, backend == "triton")
                 for dt_r, x_r, B_r, C_r in zip(dt.split(rows), x.split(rows), B32.split(rows), C32.split(rows))]
        y = parts[0] if len(parts) == 1 else torch.cat(parts)
    return _finish(y, u32, D, z, pad_mask, u.dtype)

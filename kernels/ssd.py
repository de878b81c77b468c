"""Mamba-2 state-space duality (SSD) scan, with TiM4Rec's time-aware step.

Dao & Gu, "Transformers are SSMs: Generalized Models and Efficient Algorithms Through Structured State Space
Duality" (ICML 2024), §6 and Listing 1 (``ssd_minimal``); model-specs §3b. Per head h (scalar A_h < 0):

    h_t = exp(Δ_t·A_h)·h_{t−1} + Δ_t·x_t ⊗ B_t          (Dao & Gu eq. 1 with the ZOH/Euler discretisation, §3b)
    y_t = h_t·C_t + D_h·x_t

which equals the matrix form y = (L ∘ C·Bᵀ)(Δ⊙x) + D⊙x with the 1-semiseparable mask
L_ij = exp(A_h·Σ_{k=j+1..i} Δ_k) for i ≥ j (Dao & Gu eq. 16 / §3b "Matrix form").

Step size (model-specs §5, TiM4Rec "time-aware Δ"): Δ_{t,h} = softplus(dt_{t,h}·ρ_{t,h} + dt_bias_h), where ρ is
``dt_scale``. Reading of the spec: the per-position time factor multiplies the *raw* step dt only, then the
per-head bias is added, then the softplus (``dt_softplus=False`` skips the softplus). Without ``dt_scale`` this is
Mamba-2's Δ = softplus(dt + dt_bias) (§3b).

Backends:

- ``reference``: the recurrence above as a Python loop over time (the readable specification).
- ``torch``: the chunked algorithm of §3b (Listing 1): end-pad to a multiple of Q, intra-chunk masked matmul with
  the stable segsum, chunk-end states, state passing with a segsum over chunks (the initial state is the chunk "−1"
  state), state → output. Pure torch ops; autograd gives the backward. A large batch runs in cache-sized slices of
  rows (``_chunked_by_rows``).
- ``triton``: one Triton program per (batch, head) walks the chunks in order, keeping the (head_dim, N) state in
  registers; inside a chunk it does the same intra-chunk / state→output / chunk-state matmuls. Backward recomputes
  through the torch chunked path inside a custom ``autograd.Function`` (no Triton backward kernel).
- ``cpu``: fused C loops (kernels/_cpu_ssd.c) that run the recurrence itself in time order, forward and backward,
  with each (row, head)'s (head_dim, N) state in cache and the rows split over the torch threads. What ``auto``
  runs on CPU tensors when the machine's C compiler can build it (kernels/_cpu.py); the torch path otherwise.

All internal math is fp32; ``y`` is returned in ``x``'s dtype, the final state in fp32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels._backend import fp32_under_autocast, resolve_backend
from kernels._cpu import cpu_kernels, row_ranges, run_ranges

DEFAULT_CHUNK = 32  # TiM4Rec's chunk; on the CPU at B=256, L=200 (torch path, row slices) Q=16 is ~1.35x faster
SLICE_ELEMENTS = 1 << 20  # the torch path's largest per-slice intermediate (fp32 elements), cache-sized


def segsum(a: torch.Tensor) -> torch.Tensor:
    """segsum(a)[..., i, j] = Σ_{k=j+1..i} a_k for i ≥ j, −∞ for i < j (model-specs §3b, stable construction).

    Built by repeating ``a`` to T×T, keeping the strict lower triangle, and a cumsum down the rows; never as a
    difference of two cumsums (which cancels catastrophically once the running sums are large).
    """
    t = a.shape[-1]
    x = a[..., :, None].expand(*a.shape, t)  # x[..., i, j] = a_i
    strict = torch.tril(torch.ones(t, t, dtype=torch.bool, device=a.device), diagonal=-1)
    x = x.masked_fill(~strict, 0.0)
    out = torch.cumsum(x, dim=-2)
    lower = torch.tril(torch.ones(t, t, dtype=torch.bool, device=a.device), diagonal=0)
    return out.masked_fill(~lower, float("-inf"))


def _reference_core(x, delta, A, B, C, h0):
    """The naive recurrence, one time step at a time. x (b, l, h, p), delta (b, l, h), B/C (b, l, h, n), fp32."""
    b, length, heads, p = x.shape
    n = B.shape[-1]
    state = h0 if h0 is not None else x.new_zeros(b, heads, p, n)
    ys = []
    for t in range(length):
        decay = torch.exp(delta[:, t] * A)  # (b, h)
        inp = (delta[:, t, :, None] * x[:, t])[..., None] * B[:, t, :, None, :]  # Δ_t·x_t ⊗ B_t, (b, h, p, n)
        state = decay[..., None, None] * state + inp
        ys.append(torch.einsum("bhpn,bhn->bhp", state, C[:, t]))
    return (torch.stack(ys, dim=1) if ys else x.new_zeros(b, 0, heads, p)), state


def _chunked_core(x, delta, A, B, C, h0, chunk_size):
    """Model-specs §3b steps 1–7 (without the D term). x (b, l, h, p), delta (b, l, h), A (h), B/C (b, l, g, n),
    h0 (b, h, p, n) or None; all fp32. Returns y (b, l, h, p) and the final state (b, h, p, n).

    Layout: heads are split as (g, r) with r = heads/groups, so B and C are broadcast over r without copies.
    X̃ = x⊙Δ is never formed: Δ_j (and the decays) multiply the smaller factor of each matmul instead, i.e.
    Y_diag = (C·Bᵀ ∘ Lm ∘ Δ_j)·x, S = xᵀ·(w⊙Δ⊙B), Y_off = (exp(Acs)⊙C)·S_inᵀ, which is the same sum; the big
    (…, p) tensors are touched only by the matmuls (on the CPU the elementwise passes over them dominated).
    """
    b, length, heads, p = x.shape
    g, n = B.shape[2], B.shape[3]
    r = heads // g
    q = max(1, min(chunk_size, length))  # a chunk longer than the sequence would only add padding to every matmul
    c = -(-length // q)
    pad = c * q - length
    # 1. chunks; end-pad only: zero Δ (decay 1, no input) after the last token. One copy each into chunk layout.
    X = F.pad(x.reshape(b, length, g, r, p).permute(0, 2, 3, 1, 4), (0, 0, 0, pad)).view(b, g, r, c, q, p)
    dl = F.pad(delta.reshape(b, length, g, r).permute(0, 2, 3, 1), (0, pad)).view(b, g, r, c, q)
    Bc = F.pad(B.permute(0, 2, 1, 3), (0, 0, 0, pad)).view(b, g, 1, c, q, n)
    Cc = F.pad(C.permute(0, 2, 1, 3), (0, 0, 0, pad)).view(b, g, 1, c, q, n)
    Ac = dl * A.reshape(g, r, 1, 1)  # Ã = A·Δ ≤ 0, (b, g, r, c, Q)
    # 2. within-chunk cumulative decay
    acs = torch.cumsum(Ac, dim=-1)
    # 3. intra-chunk (diagonal blocks): Σ_j (C_i·B_j)·exp(segsum(Ã))[i, j]·Δ_j·x_j
    Lm = torch.exp(segsum(Ac))  # (b, g, r, c, Q, Q)
    CB = Cc @ Bc.transpose(-1, -2)  # (b, g, 1, c, Q, Q), computed once per group
    y_diag = (CB * Lm * dl[..., None, :]) @ X  # (b, g, r, c, Q, p)
    # 4. state at the end of each chunk, starting from zero: S = Σ_j x_j ⊗ (w_j·Δ_j·B_j), w = exp(Acs_end − Acs)
    w = torch.exp(acs[..., -1:] - acs) * dl
    S = X.transpose(-1, -2) @ (Bc * w[..., None])  # (b, g, r, c, p, n)
    # 5. state passing: S_new[z] = Σ_{c'} exp(segsum(a))[z, c']·S'[c'], with S'[0] the initial state
    if h0 is None:
        first = S.new_zeros(b, g, r, 1, p, n)
    else:
        first = h0.reshape(b, g, r, 1, p, n)
    S_all = torch.cat([first, S], dim=3)  # (b, g, r, c+1, p, n)
    decay_chunk = torch.exp(segsum(F.pad(acs[..., -1], (1, 0))))  # (b, g, r, c+1, c+1)
    S_new = (decay_chunk @ S_all.flatten(-2)).view(b, g, r, c + 1, p, n)
    S_in, final = S_new[:, :, :, :-1], S_new[:, :, :, -1]
    # 6. state → output: (exp(Acs_i)·C_i)·S_in
    y_off = (Cc * torch.exp(acs)[..., None]) @ S_in.transpose(-1, -2)  # (b, g, r, c, Q, p)
    # 7. combine, back to (b, l, h, p), crop the end padding
    y = (y_diag + y_off).view(b, g, r, c * q, p)[:, :, :, :length].permute(0, 3, 1, 2, 4).reshape(b, length, heads, p)
    return y, final.reshape(b, heads, p, n)


def _chunked_by_rows(x, delta, A, B, C, h0, chunk_size):
    """``_chunked_core`` over slices of batch rows, each sized so that its largest intermediates (the chunked x and
    the (Q, Q) decay masks, ~length·heads·max(head_dim, Q) elements a row) stay near SLICE_ELEMENTS. Rows are
    independent, so this is exact; autograd then also runs the backward slice by slice. Why: over a whole training
    batch every elementwise and matmul pass (forward and backward) streams its operands from memory; a
    cache-sized slice keeps them in cache (measured on this CPU, one thread, B=256, L=200, 8 heads × 16,
    N=16, Q=32, fwd+bwd: 0.53 s in one piece, 0.27 s in the 18-row slices of SLICE_ELEMENTS, 0.29 s in 32-row ones)."""
    b, length, heads, p = x.shape
    q = max(1, min(chunk_size, length))
    per_row = max(1, -(-length // q) * q * heads * max(p, q))
    rows = max(1, SLICE_ELEMENTS // per_row)
    if rows >= b:
        return _chunked_core(x, delta, A, B, C, h0, chunk_size)
    h0_parts = h0.split(rows) if h0 is not None else [None] * -(-b // rows)
    parts = [_chunked_core(x_r, delta_r, A, B_r, C_r, h0_r, chunk_size) for x_r, delta_r, B_r, C_r, h0_r
             in zip(x.split(rows), delta.split(rows), B.split(rows), C.split(rows), h0_parts)]
    return torch.cat([y for y, _ in parts]), torch.cat([final for _, final in parts])


class _TritonSSD(torch.autograd.Function):
    """Forward: the fused Triton kernel. Backward: recomputation through ``_chunked_core`` with autograd."""

    @staticmethod
    def forward(ctx, x, delta, A, B, C, h0, chunk_size):
        from kernels._triton_ssd import triton_forward

        y, final = triton_forward(x, delta, A, B, C, h0, chunk_size)
        ctx.save_for_backward(x, delta, A, B, C, h0)
        ctx.chunk_size = chunk_size
        return y, final

    @staticmethod
    def backward(ctx, grad_y, grad_final):
        saved = ctx.saved_tensors
        inputs = [t.detach().requires_grad_(need) if t is not None else None
                  for t, need in zip(saved, ctx.needs_input_grad[:6])]
        with torch.enable_grad():
            y, final = _chunked_core(*inputs, ctx.chunk_size)
        outs, gouts = [y], [grad_y]
        if grad_final is not None:
            outs.append(final)
            gouts.append(grad_final)
        wanted = [t for t in inputs if t is not None and t.requires_grad]
        grads = iter(torch.autograd.grad(outs, wanted, gouts, allow_unused=True)) if wanted else iter(())
        result = [next(grads) if t is not None and t.requires_grad else None for t in inputs]
        return (*result, None)


class _FusedCpuSSD(torch.autograd.Function):
    """(y, final state) = the SSD recurrence by the fused C kernels; every input fp32 and contiguous, h0 optional.
    The backward recomputes the states itself."""

    @staticmethod
    def forward(ctx, x, delta, A, B, C, h0):
        b, length, heads, p = x.shape
        g, n = B.shape[2], B.shape[3]
        y, final = torch.empty_like(x), x.new_empty(b, heads, p, n)
        ptrs = [t.data_ptr() if t is not None else None for t in (x, delta, A, B, C, h0, y, final)]
        run_ranges("ssd_forward", row_ranges(b),
                   lambda i, b0, b1: cpu_kernels().ssd_forward(*ptrs, b0, b1, length, heads, p, g, n))
        ctx.save_for_backward(x, delta, A, B, C, h0)
        return y, final

    @staticmethod
    def backward(ctx, gy, gfinal):
        x, delta, A, B, C, h0 = ctx.saved_tensors
        b, length, heads, p = x.shape
        g, n = B.shape[2], B.shape[3]
        ranges = row_ranges(b)
        dx, ddelta = torch.empty_like(x), torch.empty_like(delta)
        dA_parts = A.new_zeros(len(ranges), heads)  # one ∂A accumulator per thread, summed below
        dB, dC = torch.zeros_like(B), torch.zeros_like(C)
        dh0 = torch.empty_like(h0) if h0 is not None and ctx.needs_input_grad[5] else None
        gy, gfinal = gy.float().contiguous(), gfinal.float().contiguous()  # zeros for an unused output
        ptrs = [t.data_ptr() if t is not None else None for t in (x, delta, A, B, C, h0, gy, gfinal, dx, ddelta)]
        run_ranges("ssd_backward", ranges, lambda i, b0, b1: cpu_kernels().ssd_backward(
            *ptrs, dA_parts[i].data_ptr(), dB.data_ptr(), dC.data_ptr(), dh0.data_ptr() if dh0 is not None else None,
            b0, b1, length, heads, p, g, n))
        return dx, ddelta, dA_parts.sum(0), dB, dC, dh0


def _check_shapes(x, dt, A, B, C, D, dt_bias, dt_scale, initial_state, pad_mask):
    if x.ndim != 4:
        raise ValueError(f"x must be (batch, length, heads, head_dim), got {tuple(x.shape)}")
    b, length, heads, p = x.shape
    if dt.shape != (b, length, heads):
        raise ValueError(f"dt must be {(b, length, heads)}, got {tuple(dt.shape)}")
    if A.shape != (heads,):
        raise ValueError(f"A must be ({heads},), got {tuple(A.shape)}")
    if B.ndim != 4 or B.shape[:2] != (b, length) or C.shape != B.shape:
        raise ValueError(f"B and C must be (batch, length, groups, N) alike, got {tuple(B.shape)}, {tuple(C.shape)}")
    if heads % B.shape[2] != 0:
        raise ValueError(f"heads ({heads}) must be divisible by groups ({B.shape[2]})")
    for name, t, shape in (("D", D, (heads,)), ("dt_bias", dt_bias, (heads,)),
                           ("dt_scale", dt_scale, (b, length, heads)),
                           ("initial_state", initial_state, (b, heads, p, B.shape[3])),
                           ("pad_mask", pad_mask, (b, length))):
        if t is not None and tuple(t.shape) != shape:
            raise ValueError(f"{name} must be {shape}, got {tuple(t.shape)}")


@fp32_under_autocast
def ssd(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int = DEFAULT_CHUNK,
    D: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    dt_scale: torch.Tensor | None = None,
    dt_softplus: bool = True,
    initial_state: torch.Tensor | None = None,
    return_final_state: bool = False,
    pad_mask: torch.Tensor | None = None,
    backend: str = "auto",
):
    """Mamba-2 SSD scan (Dao & Gu 2024, §6 / Listing 1), with TiM4Rec's time-scaled step (model-specs §5).

    Shapes: x (batch, length, heads, head_dim); dt, dt_scale (batch, length, heads); A (heads), negative
    (A_h = −exp(A_log)); B, C (batch, length, groups, N), head h reads group h // (heads/groups); D, dt_bias
    (heads); initial_state (batch, heads, head_dim, N); pad_mask (batch, length) bool, True = real token.

    Δ = softplus(dt·dt_scale + dt_bias) (each factor optional; no softplus with ``dt_softplus=False``).
    Padded positions are exact no-ops: Δ = 0 (decay 1), no input, output 0, zero gradient.

    Returns y shaped and typed like x; with ``return_final_state`` also the state after the last position,
    (batch, heads, head_dim, N) in fp32.
    """
    backend = resolve_backend(backend, x, dt, A, B, C, has_triton=True, has_cpu=True)
    _check_shapes(x, dt, A, B, C, D, dt_bias, dt_scale, initial_state, pad_mask)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    pre = dt.float()
    if dt_scale is not None:
        pre = pre * dt_scale.float()
    if dt_bias is not None:
        pre = pre + dt_bias.float()
    delta = F.softplus(pre) if dt_softplus else pre
    xf = x.float()
    if pad_mask is not None:
        keep = pad_mask.to(torch.bool)
        delta = torch.where(keep[..., None], delta, 0.0)
        xf = torch.where(keep[..., None, None], xf, 0.0)
    Af, Bf, Cf = A.float(), B.float(), C.float()
    h0 = initial_state.float() if initial_state is not None else None
    if backend == "reference":
        r = x.shape[2] // B.shape[2]
        y, final = _reference_core(xf, delta, Af, Bf.repeat_interleave(r, dim=2), Cf.repeat_interleave(r, dim=2), h0)
    elif backend == "cpu":
        y, final = _FusedCpuSSD.apply(*(t.contiguous() if t is not None else None
                                        for t in (xf, delta, Af, Bf, Cf, h0)))
    elif backend == "triton":
        y, final = _TritonSSD.apply(xf.contiguous(), delta.contiguous(), Af.contiguous(), Bf.contiguous(),
                                    Cf.contiguous(), h0.contiguous() if h0 is not None else None, int(chunk_size))
    else:
        y, final = _chunked_by_rows(xf, delta, Af, Bf, Cf, h0, int(chunk_size))
    if D is not None:
        y = y + D.float()[:, None] * xf
    if pad_mask is not None:
        y = torch.where(keep[..., None, None], y, 0.0)
    y = y.to(x.dtype)
    return (y, final) if return_final_state else y

"""Triton forward kernel for ``ssd`` (Dao & Gu, "Transformers are SSMs", ICML 2024, §6 / Listing 1; model-specs §3b).

One program per (batch, head) walks the chunks in order (the loop form of §3b step 5, S_in[k+1] = exp(a_k)·S_in[k]
+ S[k]) with the (head_dim, N) state in registers; inside a chunk it does the intra-chunk, state → output and
chunk-state matmuls with tl.dot. Imported lazily: only ``backend="triton"`` needs the triton package.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl


def _next_pow2(v: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(v, 1))))


@triton.jit
def _ssd_fwd_kernel(
    x_ptr, dt_ptr, a_ptr, b_ptr, c_ptr, h0_ptr, y_ptr, hT_ptr,
    L, H, G, P, N, R,
    HAS_H0: tl.constexpr, Q: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr, PRECISION: tl.constexpr,
):
    # All tensors contiguous: x/y (b, l, h, p), dt (b, l, h), B/C (b, l, g, n), h0/hT (b, h, p, n).
    pid = tl.program_id(0)
    bi = (pid // H).to(tl.int64)
    hi = pid % H
    gi = hi // R
    A = tl.load(a_ptr + hi)
    offs_q = tl.arange(0, Q)
    offs_p = tl.arange(0, BP)
    offs_n = tl.arange(0, BN)
    pm = offs_p < P
    nm = offs_n < N
    state_off = ((bi * H + hi) * P + offs_p[:, None]) * N + offs_n[None, :]
    state_m = pm[:, None] & nm[None, :]
    if HAS_H0:
        state = tl.load(h0_ptr + state_off, mask=state_m, other=0.0)
    else:
        state = tl.zeros((BP, BN), dtype=tl.float32)
    causal = offs_q[:, None] >= offs_q[None, :]
    strict = offs_q[:, None] > offs_q[None, :]
    for c0 in range(0, L, Q):
        t = c0 + offs_q
        tm = t < L
        row = bi * L + t  # (Q,) flat (batch, time) index
        delta = tl.load(dt_ptr + row * H + hi, mask=tm, other=0.0)
        a = delta * A  # Ã ≤ 0; 0 past the end (decay 1)
        acs = tl.cumsum(a, 0)
        x = tl.load(x_ptr + (row[:, None] * H + hi) * P + offs_p[None, :], mask=tm[:, None] & pm[None, :],
                    other=0.0)
        xd = x * delta[:, None]  # X̃, zero past the end (no input)
        bc_off = (row[:, None] * G + gi) * N + offs_n[None, :]
        bc_m = tm[:, None] & nm[None, :]
        Bt = tl.load(b_ptr + bc_off, mask=bc_m, other=0.0)
        Ct = tl.load(c_ptr + bc_off, mask=bc_m, other=0.0)
        # stable segsum: tile[k, j] = a_k for k > j, cumsum down the rows -> Σ_{k=j+1..i} a_k
        seg = tl.cumsum(tl.where(strict, a[:, None] + tl.zeros((Q, Q), dtype=tl.float32), 0.0), 0)
        Lm = tl.where(causal, tl.exp(seg), 0.0)
        cb = tl.dot(Ct, tl.trans(Bt), input_precision=PRECISION)
        y = tl.dot(cb * Lm, xd, input_precision=PRECISION)
        y += tl.exp(acs)[:, None] * tl.dot(Ct, tl.trans(state), input_precision=PRECISION)
        tl.store(y_ptr + (row[:, None] * H + hi) * P + offs_p[None, :], y, mask=tm[:, None] & pm[None, :])
        a_last = tl.sum(tl.where(offs_q == Q - 1, acs, 0.0), 0)
        w = tl.exp(a_last - acs)
        state = state * tl.exp(a_last) + tl.dot(tl.trans(xd * w[:, None]), Bt, input_precision=PRECISION)
    tl.store(hT_ptr + state_off, state, mask=state_m)


def triton_forward(x, delta, A, B, C, h0, chunk_size):
    """Launch the kernel on contiguous fp32 tensors. Q is the chunk size rounded up to a power of two >= 16
    (tl.arange and tl.dot need it); the chunk size does not change the result, only the work split."""
    b, length, heads, p = x.shape
    g, n = B.shape[2], B.shape[3]
    y = torch.empty_like(x)
    final = torch.empty(b, heads, p, n, device=x.device, dtype=torch.float32)
    _ssd_fwd_kernel[(b * heads,)](
        x, delta, A, B, C, h0 if h0 is not None else final, y, final,
        length, heads, g, p, n, heads // g,
        HAS_H0=h0 is not None, Q=max(16, _next_pow2(chunk_size)), BP=max(16, _next_pow2(p)),
        BN=max(16, _next_pow2(n)), PRECISION="ieee",
    )
    return y, final

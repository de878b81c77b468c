"""Triton forward kernel for ``selective_scan`` (model-specs §3a; Gu & Dao, "Mamba", 2023, eq. 2a-2b).

One program per (batch row, block of channels) walks the sequence with the (channels, N) state in registers, the
way the paper's hardware-aware scan keeps it in SRAM: only y (batch, length, d_inner) is written out. The inputs
are already discretised by the caller: Δ (with padding forced to 0) and x = Δ·u. Imported lazily: only
``backend="triton"`` needs the triton package.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _scan_forward(dt_ptr, x_ptr, a_ptr, b_ptr, c_ptr, y_ptr, length, d_inner, n_state,
                  BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_b = tl.program_id(0)
    pid_d = tl.program_id(1)
    ch = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    ns = tl.arange(0, BLOCK_N)
    ch_ok = ch < d_inner
    n_ok = ns < n_state
    a = tl.load(a_ptr + ch[:, None] * n_state + ns[None, :], mask=ch_ok[:, None] & n_ok[None, :], other=0.0)
    h = tl.zeros((BLOCK_D, BLOCK_N), tl.float32)
    row = pid_b * length
    for t in range(0, length):
        dt = tl.load(dt_ptr + (row + t) * d_inner + ch, mask=ch_ok, other=0.0)
        x = tl.load(x_ptr + (row + t) * d_inner + ch, mask=ch_ok, other=0.0)
        bt = tl.load(b_ptr + (row + t) * n_state + ns, mask=n_ok, other=0.0)
        ct = tl.load(c_ptr + (row + t) * n_state + ns, mask=n_ok, other=0.0)
        h = tl.exp(dt[:, None] * a) * h + x[:, None] * bt[None, :]  # Ā_t ⊙ h + Δ_t B_t u_t
        tl.store(y_ptr + (row + t) * d_inner + ch, tl.sum(h * ct[None, :], axis=1), mask=ch_ok)


def scan_forward(dt: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    """y_t = C_t · h_t for fp32 dt, x (batch, length, d_inner), A (d_inner, N), B, C (batch, length, N)."""
    batch, length, d_inner = x.shape
    n_state = A.shape[1]
    y = torch.empty_like(x)
    if y.numel() == 0:
        return y
    block_d = min(32, triton.next_power_of_2(d_inner))
    grid = (batch, triton.cdiv(d_inner, block_d))
    _scan_forward[grid](dt.contiguous(), x.contiguous(), A.contiguous(), B.contiguous(), C.contiguous(), y,
                        length, d_inner, n_state, BLOCK_D=block_d, BLOCK_N=triton.next_power_of_2(n_state))
    return y

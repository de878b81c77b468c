"""The Mamba-2 mixer (Dao & Gu, "Transformers are SSMs", ICML 2024, §7 "Mamba-2 architecture", the SSD algorithm of
§6; model-specs §3b), for left-padded input, with an optional per-position, per-head scale of the step
(TiM4Rec's time-aware Δ, model-specs §5):

    [z, x, B, C, dt] = in_proj(u)                  d → d_in + d_in + G·N + G·N + H, no bias (H = d_in / head_dim)
    [x, B, C] = SiLU(causal depthwise Conv1d_K([x, B, C]))                     kernels.causal_conv1d
    A_h = −exp(A_log_h),  Δ_{t,h} = softplus(dt_{t,h}·ρ_{t,h} + dt_bias_h)
    y = SSD(x, Δ, A, B, C) + D_h·x                 kernels.ssd: L_ij = exp(A_h·Σ_{k=j+1..i} Δ_{k,h}), chunked
    out = out_proj(RMSNorm(y ⊙ SiLU(z)))           norm after the gate
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from kernels import causal_conv1d, ssd
from recsys.nn.mamba import conv_backend


class RMSNormGated(nn.Module):
    """Mamba-2's gated RMSNorm with the norm after the gate (§7): RMSNorm(y ⊙ SiLU(z)) per group of d_in / G
    channels, with a learned scale."""

    def __init__(self, d_inner: int, groups: int, eps: float):
        super().__init__()
        self.groups, self.eps = groups, eps
        self.weight = nn.Parameter(torch.ones(d_inner))

    def forward(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        g = y * F.silu(z)
        shape = g.shape
        g = g.reshape(*shape[:-1], self.groups, shape[-1] // self.groups)
        g = g * torch.rsqrt(g.square().mean(-1, keepdim=True) + self.eps)
        return g.reshape(shape) * self.weight


class SSDBlock(nn.Module):
    """``forward(u, pad_mask, rho)``: u (B, L, d); pad_mask (B, L) bool, True at real tokens; rho (B, L, H), the
    step scale, or None (plain Mamba-2). Pads are exact no-ops: x, B, C are zeroed there before the causal conv (a
    real position then sees exactly the conv's own zero padding) and ``kernels.ssd`` forces Δ = 0 there.

    Init (Mamba-2's ``Mamba2.__init__``): A = U(1, 16), A_log = log A; dt_bias = softplus⁻¹(dt), dt log-uniform in
    [dt_min, dt_max] floored at 1e-4; D = 1. A_log, dt_bias and D carry ``_no_weight_decay = True``.
    """

    def __init__(self, d_model: int, d_state: int, d_conv: int, expand: int, head_dim: int, groups: int,
                 chunk_size: int, eps: float, dt_min: float, dt_max: float, backend: str):
        super().__init__()
        d, n, g = d_model, d_state, groups
        self.d_inner = expand * d
        self.heads, self.head_dim, self.d_state, self.groups = self.d_inner // head_dim, head_dim, n, g
        self.chunk_size, self.backend = chunk_size, backend
        conv_dim = self.d_inner + 2 * g * n
        self.in_proj = nn.Linear(d, self.d_inner + conv_dim + self.heads, bias=False)
        self.conv1d = nn.Conv1d(conv_dim, conv_dim, d_conv, groups=conv_dim, bias=True)
        self.A_log = nn.Parameter(torch.log(torch.empty(self.heads).uniform_(1.0, 16.0)))
        self.dt_bias = nn.Parameter(torch.empty(self.heads))
        self.D = nn.Parameter(torch.ones(self.heads))
        self.norm = RMSNormGated(self.d_inner, g, eps)
        self.out_proj = nn.Linear(self.d_inner, d, bias=False)
        with torch.no_grad():
            lo, hi = math.log(dt_min), math.log(dt_max)
            dt = torch.exp(torch.rand(self.heads) * (hi - lo) + lo).clamp(min=1e-4)
            self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # softplus⁻¹(dt)
        for p in (self.A_log, self.dt_bias, self.D):
            p._no_weight_decay = True

    def forward(self, u: torch.Tensor, pad_mask: torch.Tensor, rho: torch.Tensor | None = None) -> torch.Tensor:
        b, length, _ = u.shape
        gn = self.groups * self.d_state
        z, xbc, dt = self.in_proj(u).split([self.d_inner, self.d_inner + 2 * gn, self.heads], dim=-1)
        xbc = xbc.masked_fill(~pad_mask[..., None], 0.0)
        xbc = causal_conv1d(xbc, self.conv1d.weight[:, 0], self.conv1d.bias, activation="silu",
                            backend=conv_backend(self.backend))
        x, B, C = xbc.split([self.d_inner, gn, gn], dim=-1)
        y = ssd(
            x.reshape(b, length, self.heads, self.head_dim), dt, -torch.exp(self.A_log.float()),
            B.reshape(b, length, self.groups, self.d_state), C.reshape(b, length, self.groups, self.d_state),
            chunk_size=self.chunk_size, D=self.D, dt_bias=self.dt_bias, dt_scale=rho, pad_mask=pad_mask,
            backend=self.backend,
        )
        return self.out_proj(self.norm(y.reshape(b, length, self.d_inner), z))

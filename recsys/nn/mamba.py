"""The Mamba-1 mixer (Gu & Dao, "Mamba: Linear-Time Sequence Modeling with Selective State Spaces", 2023, §3.4 Fig. 3
and Algorithm 2; model-specs §3a), for left-padded input, on ``kernels.causal_conv1d`` and
``kernels.selective_scan``:

    [x, z] = in_proj(u)                                  d → 2·d_inner, no bias
    x      = SiLU(causal depthwise Conv1d_K(x))
    [δ, B, C] = x_proj(x)                                d_inner → R + 2N, no bias
    Δ      = softplus(dt_proj(δ))                        R → d_inner, with bias (Mamba §3.6, eq. 4's Δ)
    y      = SSM(A = −exp(A_log), Δ, B, C)(x) + D ⊙ x    eq. 2a-2b, ZOH Ā, Euler B̄
    out    = out_proj(y ⊙ SiLU(z))                       d_inner → d, no bias

With no attention mask a scan would read left pads into its state, so x is zeroed at pads before the causal
convolution (a real position then sees exactly the convolution's own zero padding) and ``pad_mask`` makes the scan
force Δ = 0 there (Ā = 1, no input: an exact no-op on the state, output 0).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from kernels import causal_conv1d, selective_scan

Backend = Literal["auto", "reference", "torch", "triton", "cpu"]


def conv_backend(backend: str) -> str:
    """The causal convolution has no Triton or fused CPU kernel: ``triton``, ``cpu`` and ``auto`` run its torch
    path."""
    return backend if backend in ("reference", "torch") else "auto"


class MambaBlock(nn.Module):
    """The Mamba-1 mixer (Gu & Dao 2023, §3.4 Fig. 3 and Algorithm 2; model-specs §3a), for left-padded input.

    ``forward(u, pad_mask)``: u (batch, length, d_model); pad_mask (batch, length) bool, True at real tokens (None:
    no padding). Pads are an exact no-op: their output is 0 and they never change a real position's output.

    Init (Mamba's ``Mamba.__init__``): A_log = log(1…N) in every row (S4D-real, A = −exp(A_log)), D = 1,
    dt_proj.weight ~ U(±R^−½), dt_proj.bias = softplus⁻¹(dt) with dt log-uniform in [dt_min, dt_max] floored at
    ``dt_init_floor``. A_log, D and dt_proj.bias carry ``_no_weight_decay = True`` (Mamba's marker: §3a says no
    weight decay on them). The other projections keep PyTorch's default init here; models re-initialise them
    (``recsys.nn.normal_init`` with this block's ``dt_proj`` skipped) without touching these Mamba-specific parameters.
    """

    def __init__(
        self,
        d_model: int,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        dt_rank: int | None = None,
        dt_min: float = 1e-3,
        dt_max: float = 1e-1,
        dt_init_floor: float = 1e-4,
        backend: Backend = "auto",
    ):
        super().__init__()
        self.d_model = d_model
        self.d_state = d_state
        self.d_inner = expand * d_model
        self.dt_rank = dt_rank or math.ceil(d_model / 16)
        self.backend = backend
        d_inner, rank = self.d_inner, self.dt_rank
        self.in_proj = nn.Linear(d_model, 2 * d_inner, bias=False)
        # depthwise: one K-tap filter per channel; weight (d_inner, 1, K) as in Mamba's state dict
        self.conv1d = nn.Conv1d(d_inner, d_inner, d_conv, groups=d_inner, padding=d_conv - 1, bias=True)
        self.x_proj = nn.Linear(d_inner, rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(rank, d_inner, bias=True)
        self.A_log = nn.Parameter(torch.log(torch.arange(1, d_state + 1, dtype=torch.float32)).repeat(d_inner, 1))
        self.D = nn.Parameter(torch.ones(d_inner))
        self.out_proj = nn.Linear(d_inner, d_model, bias=False)
        self.dt_min, self.dt_max, self.dt_init_floor = dt_min, dt_max, dt_init_floor
        self.reset_dt_parameters()
        for p in (self.A_log, self.D, self.dt_proj.bias):
            p._no_weight_decay = True

    @torch.no_grad()
    def reset_dt_parameters(self) -> None:
        """Mamba's Δ init (model-specs §3a Init): weight U(±R^−½); bias = softplus⁻¹(dt), dt log-uniform."""
        nn.init.uniform_(self.dt_proj.weight, -self.dt_rank ** -0.5, self.dt_rank ** -0.5)
        log_lo, log_hi = math.log(self.dt_min), math.log(self.dt_max)
        dt = torch.exp(torch.rand(self.d_inner) * (log_hi - log_lo) + log_lo).clamp(min=self.dt_init_floor)
        self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # softplus⁻¹(dt) = dt + log(1 − e^−dt)

    def forward(self, u: torch.Tensor, pad_mask: torch.Tensor | None = None) -> torch.Tensor:
        x, z = self.in_proj(u).chunk(2, dim=-1)
        if pad_mask is not None:
            x = x.masked_fill(~pad_mask[..., None], 0.0)  # pads look like the convolution's own zero padding
        x = causal_conv1d(x, self.conv1d.weight[:, 0, :], self.conv1d.bias, activation="silu",
                          backend=conv_backend(self.backend))
        delta, B, C = self.x_proj(x).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        delta = F.linear(delta, self.dt_proj.weight)  # the bias goes to the scan as delta_bias
        A = -torch.exp(self.A_log.float())
        y = selective_scan(x, delta, A, B, C, D=self.D, z=z, delta_bias=self.dt_proj.bias, delta_softplus=True,
                           pad_mask=pad_mask, backend=self.backend)
        return self.out_proj(y)

"""TiM4Rec: Fan et al., "TiM4Rec: An Efficient Sequential Recommendation Model Based on Time-Aware Structured State
Space Duality Model" (2024, arXiv 2409.16182): the method section's Time-aware Structured Masked Matrix and the
TiM4Rec layer built on it; model-specs §5, whose items the formulas below follow one by one (the paper's own
section and equation numbers were not available to check, so they are not quoted). The SSD block is Mamba-2
(Dao & Gu, "Transformers are SSMs", ICML 2024, §7 "Mamba-2 architecture", the SSD algorithm of §6; model-specs §3b).

**Mamba-2 SSD block** (``SSDBlock``, model-specs §3b), u (B, L, d):

    [z, x, B, C, dt] = in_proj(u)                  d → d_in + d_in + G·N + G·N + H, no bias (H = d_in / head_dim)
    [x, B, C] = SiLU(causal depthwise Conv1d_K([x, B, C]))                     kernels.causal_conv1d
    A_h = −exp(A_log_h),  Δ_{t,h} = softplus(dt_{t,h}·ρ_{t,h} + dt_bias_h)     (§5 "time-aware Δ")
    y = SSD(x, Δ, A, B, C) + D_h·x                 kernels.ssd(dt_scale=ρ, pad_mask): the masked matrix
                                                   L^T_ij = exp(A_h·Σ_{k=j+1..i} Δ_{k,h}), chunked, linear cost
    out = out_proj(RMSNorm(y ⊙ SiLU(z)))           norm after the gate

**Time path** (``TimePath``, model-specs §5), scalar per position and head, no d-dimensional time embedding:

    δ_1 = 0, δ_t = τ_t − τ_{t−1}                   from the batch's own timestamps (seconds)
    δ̂ = LN_L(Drop_t(δ)), repeated over the H heads → (B, H, L)        LN_L: LayerNorm over the sequence axis
    s = W_b·SiLU(W_a·Drop_t(δ̂))                    W_a, W_b: Linear(L → L) on the sequence axis (per layer)
    ρ = act(CConv₂(act(CConv₁(δ̂ ⊙ s))))            per-head causal depthwise convs, kernel d_conv → (B, L, H)
    γ = σ(W_g·Drop_t(δ̂))                           W_g: Linear(L → L) with ``p2p_residual`` (a gate per position and
                                                   head), Linear(L → 1) without (one gate per head)
    δ̂′ = LN_L(γ·δ̂ + (1 − γ)·ρ)                     the next layer's time input

``act`` is Hardswish when H % 8 ≠ 0 (the reference's nn.Conv1d fallback, which the 64-d configs hit) and SiLU
otherwise (its fused causal-conv path); ``time_activation`` overrides the rule.

**Layer** (§5 "Layer", Mamba4Rec's structure): H = LN(Drop(SSD(X)) [+ X when layers are stacked]); then the FFN
LN(H + Drop(W₂·Drop(Hardswish(W₁·H)))), inner 4d. Embedding X = LN(Dropout(E[seq])), no positional embedding.
Output: the state at the prediction point scores all items through the tied table E; full cross-entropy.

**Fixed width and leakage** (§5 pitfalls). Linear(L → L) and LN_L mix every position, so (1) the model is
defined at width ``max_len``: every history has the same layout at training and at inference, left-padded to
``max_len`` with its last event in column L−1, the prediction point; and (2) the time path looks ahead, so TiM4Rec
trains at the last position only, over prefix cut points (``LastPositionTrainBatches``), and ``loss`` reads only the
last column. The target is never in the input.

**Narrow batches, exactly** (an implementation choice, not the reference's). A batch of width W < L is computed at
width W, not padded to L: its columns are the last W of the L-wide layout, and the L − W columns before them are pads
in every row. Everything but the time path's Linear(L → L) maps is per position, causal or masked, and never reads a
pad, so it can drop those columns as they are. W_a and W_g read only their last W inputs (δ̂ is 0 in the dropped
columns); W_b and W_g write only their last W outputs (the rest multiply δ̂ = 0 or are masked by LN_L), while W_a
keeps all L outputs, since W_b reads them all. LN_L uses the last W entries of its affine. The result equals the
L-wide computation (a test checks outputs and gradients) at a fraction of its cost on short prefixes
(docs/results.md).

**Deviations from the reference code** (AlwaysFHao/TiM4Rec as model-specs §5 describes it; its model files were
not available to read, so these are documented choices, not the paper's):

- *Padding* (the documented §5 fix): the reference pads timestamps with 0, which puts a huge negative δ at the
  boundary between pads and events and lets the pads into LN_L's mean and variance. Here δ = 0 at pads and at the
  first real event, and LN_L's statistics are a masked mean / biased variance over the real positions only; its
  output (and every time-path intermediate that a causal conv or the next LN_L reads) is zeroed at pads, so the
  time path never reads a padded timestamp. Garbage timestamps at pads therefore never change a score.
- *Layout*: RecBole right-pads and gathers at len−1; here rows are left-padded (the platform's layout), so the
  position-indexed weights of Linear(L → L) and LN_L see the prediction point always in column L−1.
- Negative gaps (unsorted timestamps) are clamped to 0.
- ``time_log1p`` (off by default, the reference's raw seconds): δ ← log1p(δ) before LN_L. LN_L already removes the
  unit and scale of each sequence, so log1p changes only the shape (raw gaps are heavy-tailed: one long break
  dominates the normalised sequence). A non-reference option for tuning.
- Init: Mamba4Rec's N(0, 0.02) on every Linear and Embedding (biases 0, LayerNorms (1, 0)), as the Mamba4Rec code
  that TiM4Rec builds on does, keeping Mamba-2's own A_log, dt_bias and D inits and PyTorch's default Conv1d init
  (Kaiming-normal convs with ``kaiming_init``). Consequence worth knowing when tuning: at init the time path moves
  the scores by less than float32 resolution (s ≈ 0 from two small Linears; ρ multiplies a small dt; softplus′ at
  dt_bias is ≈ Δ ∈ [1e-3, 1e-1]; the SSD term is small beside D·x), so the time signal is picked up only after a
  plateau (on the tests' time-only pattern: 60-150 Adam steps at lr 1e-2).
- The next-layer time update (γ, δ̂′) is not built after the last layer: its output would be unused.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from kernels import causal_conv1d
from recsys.batching import SequenceBatch
from recsys.losses import LossSettings, build_loss
from recsys.models.base import ModelConfig, SequentialModel, register
from recsys.nn import Backend, ItemEmbedding, MixerLayer, SSDBlock, conv_backend, normal_init
from recsys.supervision import LastPosition


class TiM4RecConfig(LossSettings, ModelConfig):
    """Defaults: the Amazon-Beauty 64-d config of the reference (``config/config4beauty_64d.yaml``; model-specs §5)."""

    max_len: int = 50
    hidden_size: int = 64
    num_layers: int = 2
    dropout: float = Field(0.4, ge=0.0, lt=1.0)
    time_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    d_state: int = 32
    d_conv: int = 4
    expand: int = 2
    head_dim: int = 32  # H = expand·hidden_size / head_dim heads (4 at the defaults)
    ngroups: int = 1  # G: B and C groups shared by H / G heads each
    chunk_size: int = 32
    norm_eps: float = 1e-5
    p2p_residual: bool = True  # γ per position (Linear(L → L)) instead of one gate per head (Linear(L → 1))
    use_time: bool = True  # False: plain Mamba-2 (SSD4Rec-like), the reference's ``is_time: False``
    time_log1p: bool = False  # log1p on the gaps before LN_L (non-reference option; see the module docstring)
    time_activation: Literal["auto", "hardswish", "silu"] = "auto"  # auto: Hardswish when H % 8 ≠ 0, else SiLU
    kaiming_init: bool = False  # the reference's ``is_kai_ming_init`` (on for ML-1M 64-d)
    dt_min: float = 1e-3
    dt_max: float = 1e-1
    prefix_fraction: float = Field(1.0, gt=0.0, le=1.0)  # share of the prefix cut points trained on per epoch
    backend: Backend = "auto"

    @model_validator(mode="after")
    def _check_heads(self) -> "TiM4RecConfig":
        d_inner = self.expand * self.hidden_size
        if d_inner % self.head_dim:
            raise ValueError(f"expand·hidden_size ({d_inner}) must be divisible by head_dim ({self.head_dim})")
        if (d_inner // self.head_dim) % self.ngroups:
            raise ValueError(f"heads ({d_inner // self.head_dim}) must be divisible by ngroups ({self.ngroups})")
        return self

    @property
    def num_heads(self) -> int:
        return self.expand * self.hidden_size // self.head_dim


class SequenceLayerNorm(nn.Module):
    """LN_L (model-specs §5): LayerNorm over the sequence axis with a per-position affine (normalized_shape = L),
    its mean and biased variance taken over the real positions only (the documented padding fix; the reference
    normalises over all L columns, pads included). x (B, H, W), mask (B, 1, W) float, W ≤ L: the last W columns of
    the L-wide layout (the earlier ones are pads, which take no part); the output is 0 at pads."""

    def __init__(self, length: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(length))
        self.bias = nn.Parameter(torch.zeros(length))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        count = mask.sum(-1, keepdim=True).clamp(min=1.0)
        mean = (x * mask).sum(-1, keepdim=True) / count
        centred = (x - mean) * mask
        var = centred.square().sum(-1, keepdim=True) / count
        width = x.shape[-1]
        return (centred * torch.rsqrt(var + self.eps) * self.weight[-width:] + self.bias[-width:]) * mask


def time_gaps(items: torch.Tensor, times: torch.Tensor, log1p: bool) -> torch.Tensor:
    """δ (B, L) float from left-padded ``items`` / ``times`` (model-specs §5 "time input"): δ_t = τ_t − τ_{t−1}
    between consecutive real events, 0 at the first event and at pads (timestamps at pads are never read);
    negative gaps clamped to 0; optionally log1p."""
    real = items != 0
    both = real[:, 1:] & real[:, :-1]
    gaps = torch.where(both, times[:, 1:] - times[:, :-1], torch.zeros_like(times[:, 1:])).clamp(min=0)
    delta = F.pad(gaps, (1, 0)).to(torch.float32)
    return torch.log1p(delta) if log1p else delta


class TimePath(nn.Module):
    """One layer's time path (model-specs §5 "per-layer time scale" and "time for the next layer").

    ``forward(t_hat, mask)``: t_hat δ̂ (B, H, W), zero at pads; mask (B, 1, W) float; W ≤ L, the last W columns of
    the L-wide layout (see the module docstring, "Narrow batches"). Returns ρ (B, W, H), the ``dt_scale`` of this
    layer's SSD, and δ̂′ (B, H, W) for the next layer (None when ``last``).
    """

    def __init__(self, config: TiM4RecConfig, last: bool):
        super().__init__()
        length, heads, k = config.max_len, config.num_heads, config.d_conv
        self.backend = conv_backend(config.backend)
        self.dropout = nn.Dropout(config.time_dropout)
        self.w_a = nn.Linear(length, length)
        self.w_b = nn.Linear(length, length)
        # per-head depthwise causal convs; weights (H, 1, K) as nn.Conv1d stores them, run by kernels.causal_conv1d
        self.conv1 = nn.Conv1d(heads, heads, k, groups=heads)
        self.conv2 = nn.Conv1d(heads, heads, k, groups=heads)
        act = config.time_activation
        if act == "auto":
            act = "hardswish" if heads % 8 else "silu"
        self.act = nn.Hardswish() if act == "hardswish" else nn.SiLU()
        self.last = last
        if not last:
            self.gate = nn.Linear(length, length if config.p2p_residual else 1)  # W_g
            self.norm = SequenceLayerNorm(length, config.norm_eps)

    def forward(self, t_hat: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        keep = mask.transpose(1, 2)  # (B, W, 1)
        width = t_hat.shape[-1]
        off = self.w_a.in_features - width  # leading pad columns dropped from the L-wide layout
        # δ̂ is 0 in the dropped columns, so W_a reads only the last W; but all L of its outputs feed W_b, of which
        # only the last W outputs are needed (s multiplies δ̂)
        a = F.linear(self.dropout(t_hat), self.w_a.weight[:, off:], self.w_a.bias)  # (B, H, L)
        s = F.linear(F.silu(a), self.w_b.weight[off:], self.w_b.bias[off:])  # (B, H, W)
        u = (t_hat * s).transpose(1, 2)  # (B, W, H), zero at pads since δ̂ is
        u = self.act(causal_conv1d(u, self.conv1.weight[:, 0], self.conv1.bias, backend=self.backend)) * keep
        rho = self.act(causal_conv1d(u, self.conv2.weight[:, 0], self.conv2.bias, backend=self.backend)) * keep
        if self.last:
            return rho, None
        rows = slice(off, None) if self.gate.out_features > 1 else slice(None)  # Linear(L → L) or Linear(L → 1)
        gamma = torch.sigmoid(F.linear(self.dropout(t_hat), self.gate.weight[rows, off:], self.gate.bias[rows]))
        return rho, self.norm(gamma * t_hat + (1 - gamma) * rho.transpose(1, 2), mask)


@register
class TiM4Rec(SequentialModel):
    """TiM4Rec (Fan et al. 2024; model-specs §5): time-aware Mamba-2, trained at the last position of prefix cut
    points only (its time path looks ahead), always at width ``max_len``."""

    name = "tim4rec"
    Config = TiM4RecConfig
    # Reference (Beauty): Adam lr 1e-3, batch 2048 prefixes, 300 epochs, patience 20. One target per row here, so a
    # batch larger than the platform's 128 keeps the step count per epoch reasonable (as for SIGMA); to be tuned.
    train_defaults = {"lr": 1e-3, "batch_size": 512}

    def __init__(self, config: TiM4RecConfig, num_items: int):
        super().__init__(config, num_items)
        c, d = config, config.hidden_size
        self.item_embedding = ItemEmbedding(num_items, d)
        self.embedding_dropout = nn.Dropout(c.dropout)
        self.embedding_norm = nn.LayerNorm(d, eps=c.norm_eps)
        ssd_block = lambda: SSDBlock(d, c.d_state, c.d_conv, c.expand, c.head_dim, c.ngroups, c.chunk_size,  # noqa: E731
                                     c.norm_eps, c.dt_min, c.dt_max, c.backend)
        self.layers = nn.ModuleList(MixerLayer(ssd_block(), d, c.dropout, c.num_layers > 1, nn.Hardswish(), c.norm_eps)
                                    for _ in range(c.num_layers))
        if c.use_time:
            self.time_dropout = nn.Dropout(c.time_dropout)
            self.time_norm = SequenceLayerNorm(c.max_len, c.norm_eps)  # the first LN_L
            self.time_paths = nn.ModuleList(TimePath(c, last=i == c.num_layers - 1) for i in range(c.num_layers))
        self.loss_fn = build_loss(c)
        self.supervision = LastPosition(c.prefix_fraction)
        # Mamba4Rec's init; Mamba-2's A_log, dt_bias and D keep theirs; Conv1d PyTorch's default or Kaiming-normal
        normal_init(self, std=0.02, kaiming_conv=c.kaiming_init)

    def sequence_states(self, batch: SequenceBatch) -> torch.Tensor:
        """H (B, W, d) for a left-padded batch of width W ≤ max_len, zero at pads; column −1 is the prediction point.
        The same as padding the batch to max_len first (module docstring, "Narrow batches")."""
        items, times = batch.items, batch.times
        if items.shape[1] > self.config.max_len:
            raise ValueError(f"sequence of width {items.shape[1]} exceeds max_len {self.config.max_len}")
        pad_mask = items != 0
        x = self.embedding_norm(self.embedding_dropout(self.item_embedding(items)))
        t_hat = None
        if self.config.use_time:
            mask = pad_mask[:, None, :].to(x.dtype)  # (B, 1, L)
            delta = time_gaps(items, times, self.config.time_log1p).to(x.dtype)[:, None, :]
            t_hat = self.time_norm(self.time_dropout(delta), mask).expand(-1, self.config.num_heads, -1)
        for i, layer in enumerate(self.layers):
            rho = None
            if t_hat is not None:
                rho, t_hat = self.time_paths[i](t_hat, mask)
            x = layer(x, pad_mask, rho)
        return x.masked_fill(~pad_mask[..., None], 0.0)

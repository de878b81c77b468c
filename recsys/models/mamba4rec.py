"""Mamba4Rec: Liu et al., "Mamba4Rec: Towards Efficient Sequential Recommendation with Selective State Space
Models" (2024), §3 (model-specs §4), on the Mamba-1 mixer of Gu & Dao, "Mamba: Linear-Time Sequence Modeling with
Selective State Spaces" (2023), §3 / Algorithm 2 (model-specs §3a).

``MambaBlock`` is the Mamba-1 mixer shared with SIGMA (recsys/models/sigma.py):

    [x, z] = in_proj(u)                                  d → 2·d_inner, no bias
    x      = SiLU(causal depthwise Conv1d_K(x))          kernels.causal_conv1d
    [δ, B, C] = x_proj(x)                                d_inner → R + 2N, no bias
    Δ      = softplus(dt_proj(δ))                        R → d_inner, with bias (Mamba §3.6, eq. 4's Δ)
    y      = SSM(A = −exp(A_log), Δ, B, C)(x) + D ⊙ x    kernels.selective_scan (eq. 2a-2b, ZOH Ā, Euler B̄)
    out    = out_proj(y ⊙ SiLU(z))                       d_inner → d, no bias

Batches here are LEFT-padded (the prediction point is the last column). With no attention mask, a scan would read
the pads into its state (model-specs §3a pitfall), so x is zeroed at pads before the causal convolution (a real
position then sees exactly the zeros the convolution's own left padding would give it) and ``pad_mask`` makes
the scan force Δ = 0 there (Ā = 1, no input: an exact no-op on the state, output 0). Extra leading pads therefore
never change a real position's output. Mamba4Rec's reference code right-pads and gathers at len−1 instead; on
left-padded batches the last column is the same point.

Mamba4Rec (model-specs §4): X = LN(Dropout(E[seq])), no positional embedding; each layer is
H = LN(Dropout(Mamba(X))) (one layer) or LN(Dropout(Mamba(X)) + X) (stacked layers), then the point-wise FFN
LN(H + Dropout(W₂·Dropout(GELU(W₁H)))) with inner size 4d. The head is tied to E; full cross-entropy. The model is
causal, so it trains on every position at once (``CausalTrainBatches``), the equivalent of the reference's prefix
augmentation without the per-prefix copies.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from kernels import causal_conv1d, selective_scan
from recsys.losses import LossSettings, build_loss, supervised_loss
from recsys.models.base import ModelConfig, SequentialModel, register

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
    (``init_mamba4rec_weights``) without touching these Mamba-specific parameters.
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


class PointWiseFeedForward(nn.Module):
    """Mamba4Rec's FFN (§3.3, "position-wise feed-forward network"): LN(H + Drop(W₂·Drop(GELU(W₁H))))."""

    def __init__(self, d_model: int, inner: int, dropout: float):
        super().__init__()
        self.w_1 = nn.Linear(d_model, inner)
        self.w_2 = nn.Linear(inner, d_model)
        self.dropout = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(d_model, eps=1e-12)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.norm(h + self.dropout(self.w_2(self.dropout(F.gelu(self.w_1(h))))))


class MambaLayer(nn.Module):
    """One Mamba4Rec layer (§3.2-3.3): mixer → Dropout → LN (with the residual only when layers are stacked) →
    FFN. ``mixer`` is any module called as ``mixer(x, pad_mask)``: a MambaBlock here, SIGMA's G-Mamba block there."""

    def __init__(self, mixer: nn.Module, d_model: int, dropout: float, residual: bool):
        super().__init__()
        self.mixer = mixer
        self.dropout = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(d_model, eps=1e-12)
        self.residual = residual
        self.ffn = PointWiseFeedForward(d_model, 4 * d_model, dropout)

    def forward(self, x: torch.Tensor, pad_mask: torch.Tensor) -> torch.Tensor:
        h = self.dropout(self.mixer(x, pad_mask))
        h = self.norm(h + x if self.residual else h)
        return self.ffn(h)


def init_mamba4rec_weights(model: nn.Module) -> None:
    """Mamba4Rec's ``_init_weights``: Linear and Embedding weights N(0, 0.02), Linear biases 0, LayerNorm (1, 0);
    the padding row of every Embedding stays 0. Unlike the reference code (whose ``self.apply`` also overwrites
    the Mamba Δ projection, zeroing its bias so that every channel starts at Δ = softplus(0) ≈ 0.69), the
    Mamba-specific inits of every MambaBlock (dt_proj, A_log, D, conv1d) are kept."""
    mamba_specific = {id(m.dt_proj) for m in model.modules() if isinstance(m, MambaBlock)}
    for module in model.modules():
        if id(module) in mamba_specific:
            continue
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
            if isinstance(module, nn.Embedding) and module.padding_idx is not None:
                with torch.no_grad():
                    module.weight[module.padding_idx].zero_()
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


class Mamba4RecConfig(LossSettings, ModelConfig):
    # defaults: model-specs §4 (chengkai-liu/Mamba4Rec config.yaml); max_len 50 as on Amazon
    hidden_size: int = 64
    num_layers: int = 1
    d_state: int = 32
    d_conv: int = 4
    expand: int = 2
    dt_rank: int | None = None  # None: ⌈hidden_size / 16⌉
    dropout: float = 0.2
    backend: Backend = "auto"


class MambaSequenceModel(SequentialModel):
    """The embedding, layer stack and tied head that Mamba4Rec and SIGMA share; subclasses build ``mixer()``."""

    def __init__(self, config: Mamba4RecConfig, num_items: int):
        super().__init__(config, num_items)
        d = config.hidden_size
        self.item_embedding = nn.Embedding(num_items + 1, d, padding_idx=0)
        self.embedding_dropout = nn.Dropout(config.dropout)
        self.embedding_norm = nn.LayerNorm(d, eps=1e-12)
        self.layers = nn.ModuleList(
            MambaLayer(self.mixer(), d, config.dropout, residual=config.num_layers > 1)
            for _ in range(config.num_layers)
        )
        self.loss_fn = build_loss(config)
        init_mamba4rec_weights(self)

    def mamba_block(self) -> MambaBlock:
        c = self.config
        return MambaBlock(c.hidden_size, d_state=c.d_state, d_conv=c.d_conv, expand=c.expand, dt_rank=c.dt_rank,
                          backend=c.backend)

    def mixer(self) -> nn.Module:
        raise NotImplementedError

    def sequence_states(self, items: torch.Tensor) -> torch.Tensor:
        """H (B, T, d) for left-padded ``items`` (B, T), zero at pads."""
        pad_mask = items != 0
        x = self.embedding_norm(self.embedding_dropout(self.item_embedding(items)))
        for layer in self.layers:
            x = layer(x, pad_mask)
        return x.masked_fill(~pad_mask[..., None], 0.0)

    def encode(self, batch):
        return self.sequence_states(batch.items)[:, -1, :]

    def item_embeddings(self):
        return self.item_embedding.weight


@register
class Mamba4Rec(MambaSequenceModel):
    """Mamba4Rec (Liu et al. 2024, §3; model-specs §4): causal, trained at every position (CausalTrainBatches)."""

    name = "mamba4rec"
    Config = Mamba4RecConfig
    # The reference trains with a constant Adam lr 1e-3 on 2048 prefixes per step (300 epochs, early stopping).
    # One causal batch of 128 sequences carries about as many targets on Amazon-sized histories, and the platform's
    # cosine schedule (2e-3 → 1e-4 over 40 epochs) averages near 1e-3, so the platform defaults stay: on
    # MovieLens-100K, 3 epochs at 2e-3 reached validation NDCG@10 0.058 against 0.039 at 1e-3 (not yet tuned).
    train_defaults = {}

    def mixer(self) -> nn.Module:
        return self.mamba_block()

    def loss(self, batch):
        return supervised_loss(self.loss_fn, self.sequence_states(batch.items), batch, self.item_embedding.weight)

"""SIGMA: Liu et al., "SIGMA: Selective Gated Mamba for Sequential Recommendation" (2024; model-specs §4), §3.2-3.4:
Mamba4Rec's embedding, dropout, LN and FFN around a G-Mamba block (Fig. 2):

- **Partially Flipped Mamba** (§3.2): x_f is x with its first len−r items reversed and its last r kept; ONE
  shared-weight MambaBlock reads both, m = Mamba(x), m_f = Mamba(x_f) (run as one batch of 2B rows).
- **Dense Selective Gate** (§3.2): h₁ = x + W₁x, h₂ = x_f + W₂x_f (W_a, W_b shared by both directions)
      g₁ = Drop(W_a·SiLU(h₁) + W_b·σ(h₁)),   g₂ = Drop(W_a·SiLU(h₂) + W_b·σ(h_s))
  then m ← m⊙g₁ + m and m_f ← m_f⊙g₂ + m_f. The reference code (``model/gated_mamba.py``) uses h_s = h₁ in the
  second gate's sigmoid term; the symmetric reading of the paper uses h_s = h₂. ``gate_variant`` picks one:
  "code" (h₁, the default, the variant behind the published numbers) or "symmetric" (h₂).
- **Feature Extract GRU** (§3.3): c = Conv1d(d, d, 3, padding 1)(x), non-causal; g = GRU(d → d, no bias)(c).
- **Mix** (§3.4): o = W_proj·(w₃·m + w₂·m_f + w₁·g), with raw learnable scalars (w₁, w₂, w₃) starting at
  (0.1, 0.1, 0.8) (the code's softmax of them is computed but unused, so it is left out).

Left padding (our batches; the reference right-pads): the flip is per sample and leaves the leading pads where
they are (model-specs §4 pitfall: a whole-tensor flip of a short row puts pads between items); ``flip_keep`` = r
replaces the reference's hard-coded ``[:45]`` (r = 5 at L = 50). Pads never reach a real position: x is zeroed at
pads, the MambaBlock masks them (an exact no-op on its state), the convolution sees zeros there exactly as its own
zero padding, and its output is zeroed at pads before the bias-free GRU, whose state stays exactly 0 on zero input
from a zero state (r = z = ½, n = tanh(0) = 0), so the leading pads leave it untouched.

The flip and the non-causal convolution look ahead, so an all-position loss would leak each target into its own
input (model-specs §4 pitfall): SIGMA trains at the last position only, over prefix cut points
(``recsys.supervision.LastPosition``, the reference's prefix augmentation), and its loss reads only the last column.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from recsys.models.base import register
from recsys.models.mamba4rec import MambaConfig, MambaSequenceModel
from recsys.nn import MambaBlock
from recsys.supervision import LastPosition


def partial_flip_index(pad_mask: torch.Tensor, keep: int) -> torch.Tensor:
    """Gather index (B, T) of the Partially Flipped input for LEFT-padded rows (SIGMA §3.2).

    A row with p leading pads and len = T − p items keeps its pads (columns < p) and its last ``keep`` items in
    place, and reverses the items in columns [p, T − keep): column j reads column p + (T − keep − 1) − j. Rows
    with len ≤ keep are unchanged.
    """
    width = pad_mask.shape[1]
    cols = torch.arange(width, device=pad_mask.device)
    start = width - pad_mask.sum(1, keepdim=True)  # first real column of each row
    end = width - keep  # first kept column (the same for every row)
    flip = (cols >= start) & (cols < end)
    return torch.where(flip, start + end - 1 - cols, cols)


def partial_flip(x: torch.Tensor, pad_mask: torch.Tensor, keep: int) -> torch.Tensor:
    """x (B, T, d) with each row's first len − keep items reversed (see ``partial_flip_index``)."""
    index = partial_flip_index(pad_mask, keep)
    return x.gather(1, index[..., None].expand_as(x))


class SIGMAConfig(MambaConfig):
    flip_keep: int = Field(5, ge=0)  # r: the last r items stay in order in the flipped stream
    gate_variant: Literal["code", "symmetric"] = "code"
    prefix_fraction: float = Field(1.0, gt=0.0, le=1.0)  # share of the prefix cut points trained on per epoch


class GMambaBlock(nn.Module):
    """SIGMA's G-Mamba block (§3.2-3.4, Fig. 2), called as ``block(x, pad_mask)`` on left-padded x (B, T, d)."""

    def __init__(self, mamba: MambaBlock, d_model: int, flip_keep: int, gate_variant: str, dropout: float):
        super().__init__()
        self.mamba = mamba
        self.flip_keep = flip_keep
        self.gate_variant = gate_variant
        self.dense1 = nn.Linear(d_model, d_model)  # W₁
        self.dense2 = nn.Linear(d_model, d_model)  # W₂
        self.gate_silu = nn.Linear(d_model, d_model)  # W_a, shared by both directions
        self.gate_sigmoid = nn.Linear(d_model, d_model)  # W_b, shared by both directions
        self.gate_dropout = nn.Dropout(dropout)
        self.conv1d = nn.Conv1d(d_model, d_model, kernel_size=3, padding=1)  # non-causal
        self.gru = nn.GRU(d_model, d_model, num_layers=1, bias=False, batch_first=True)
        self.combining_weights = nn.Parameter(torch.tensor([0.1, 0.1, 0.8]))  # (w₁ GRU, w₂ flipped, w₃ forward)
        self.projection = nn.Linear(d_model, d_model)  # W_proj

    def forward(self, x: torch.Tensor, pad_mask: torch.Tensor) -> torch.Tensor:
        real = pad_mask[..., None]
        x = x.masked_fill(~real, 0.0)
        x_f = partial_flip(x, pad_mask, self.flip_keep)
        # Dense Selective Gate
        h1 = x + self.dense1(x)
        h2 = x_f + self.dense2(x_f)
        sig_term = h1 if self.gate_variant == "code" else h2
        g1 = self.gate_dropout(self.gate_silu(F.silu(h1)) + self.gate_sigmoid(torch.sigmoid(h1)))
        g2 = self.gate_dropout(self.gate_silu(F.silu(h2)) + self.gate_sigmoid(torch.sigmoid(sig_term)))
        # Partially Flipped Mamba: one shared-weight block over both streams in a single pass
        m, m_f = self.mamba(torch.cat([x, x_f]), torch.cat([pad_mask, pad_mask])).chunk(2)
        m = m * g1 + m
        m_f = m_f * g2 + m_f
        # Feature Extract GRU: zeros at pads in and out of the convolution, so the bias-free GRU stays at 0 there
        c = self.conv1d(x.transpose(1, 2)).transpose(1, 2).masked_fill(~real, 0.0)
        g, _ = self.gru(c)
        w = self.combining_weights
        return self.projection(w[2] * m + w[1] * m_f + w[0] * g)


@register
class SIGMA(MambaSequenceModel):
    """SIGMA (Liu et al. 2024; model-specs §4): trained at the last position of prefix cut points only."""

    name = "sigma"
    Config = SIGMAConfig
    # One target per row (not a whole sequence's), so a larger batch than the platform's 128 (the reference: 2048).
    train_defaults = {"batch_size": 512}

    def __init__(self, config: SIGMAConfig, num_items: int):
        super().__init__(config, num_items)
        self.supervision = LastPosition(config.prefix_fraction)

    def mixer(self) -> nn.Module:
        c = self.config
        return GMambaBlock(self.mamba_block(), c.hidden_size, c.flip_keep, c.gate_variant, c.dropout)

"""LiGR's transformer layer (Borisyuk et al., "From Features to Transformers: Redefining Ranking for Scalable
Impact", 2025, §3.1; model-specs §13), the layer of eSASRec (Tikhonovich et al., RecSys 2025): pre-norm
sublayers whose residual branch is scaled by a sigmoid gate of the layer input,

    X = X + σ(G₁X) ⊙ Drop(MHA(LN(X)))        X = X + σ(G₂X) ⊙ Drop(FFN(LN(X))),

with a SwiGLU feed-forward FFN(H) = W₂·Drop(SiLU(W₁H) ⊙ W₃H) (Shazeer 2020, Eq. 6; inner 4d, no biases)."""

from __future__ import annotations

import torch
from torch import nn

from recsys.nn.attention import MultiHeadSelfAttention


class SwiGLU(nn.Module):
    def __init__(self, dim: int, inner: int, dropout: float):
        super().__init__()
        self.w_1 = nn.Linear(dim, inner, bias=False)
        self.w_3 = nn.Linear(dim, inner, bias=False)
        self.w_2 = nn.Linear(inner, dim, bias=False)
        self.dropout = nn.Dropout(dropout)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.w_2(self.dropout(nn.functional.silu(self.w_1(h)) * self.w_3(h)))


class GatedTransformerLayer(nn.Module):
    """``forward(x, padding)`` (B, T, d) → (B, T, d), causal; pads come out zero."""

    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.attn_norm = nn.LayerNorm(dim)
        self.attn = MultiHeadSelfAttention(dim, heads, dropout, causal=True)
        self.attn_gate = nn.Linear(dim, dim)
        self.ffn_norm = nn.LayerNorm(dim)
        self.ffn = SwiGLU(dim, 4 * dim, dropout)
        self.ffn_gate = nn.Linear(dim, dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
        h = self.attn_norm(x)
        x = x + torch.sigmoid(self.attn_gate(x)) * self.dropout(self.attn(h, h, padding))
        x = x + torch.sigmoid(self.ffn_gate(x)) * self.dropout(self.ffn(self.ffn_norm(x)))
        return x.masked_fill(padding[..., None], 0.0)

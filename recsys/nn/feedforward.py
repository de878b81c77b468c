"""Position-wise feed-forward networks (Vaswani et al. 2017, Eq. 2) in the variants the models use."""

from __future__ import annotations

import torch
from torch import nn


class FeedForward(nn.Module):
    """Drop(W₂·[Drop](act(W₁x))): SASRec's (Eq. 6, ReLU, dropout inside and out), BERT4Rec's (§3.3 PFFN, GELU,
    dropout after W₂ only: ``inner_dropout=False``)."""

    def __init__(self, dim: int, inner: int, activation: nn.Module, dropout: float | nn.Module,
                 inner_dropout: bool = True):
        super().__init__()
        self.w_1 = nn.Linear(dim, inner)
        self.activation = activation
        self.w_2 = nn.Linear(inner, dim)
        self.dropout = dropout if isinstance(dropout, nn.Module) else nn.Dropout(dropout)  # a module: e.g. FastDropout
        self.inner_dropout = inner_dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.activation(self.w_1(x))
        if self.inner_dropout:
            h = self.dropout(h)
        return self.dropout(self.w_2(h))


class ResidualFeedForward(FeedForward):
    """LN(H + Drop(W₂·Drop(act(W₁H)))), inner 4d: Mamba4Rec's (§3.3, GELU) and TiM4Rec's (Hardswish) FFN."""

    def __init__(self, dim: int, activation: nn.Module, dropout: float, eps: float):
        super().__init__(dim, 4 * dim, activation, dropout)
        self.norm = nn.LayerNorm(dim, eps=eps)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.norm(h + super().forward(h))

"""The layer of Mamba4Rec (Liu et al. 2024, §3.2-3.3), also SIGMA's and TiM4Rec's: a sequence mixer, then
dropout, LayerNorm (with the residual only when layers are stacked) and the residual feed-forward network."""

from __future__ import annotations

import torch
from torch import nn

from recsys.nn.feedforward import ResidualFeedForward


class MixerLayer(nn.Module):
    """H = LN(Drop(mixer(X, pad_mask, …)) [+ X]); out = FFN(H). ``mixer`` is any module called as
    ``mixer(x, pad_mask, *extra)``: a MambaBlock, SIGMA's G-Mamba block, TiM4Rec's time-scaled SSD block."""

    def __init__(self, mixer: nn.Module, dim: int, dropout: float, residual: bool, activation: nn.Module,
                 eps: float):
        super().__init__()
        self.mixer = mixer
        self.dropout = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.residual = residual
        self.ffn = ResidualFeedForward(dim, activation, dropout, eps)

    def forward(self, x: torch.Tensor, pad_mask: torch.Tensor, *extra) -> torch.Tensor:
        h = self.dropout(self.mixer(x, pad_mask, *extra))
        return self.ffn(self.norm(h + x if self.residual else h))

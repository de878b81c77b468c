"""Item and position tables for left-padded batches (row 0 is padding and stays zero)."""

from __future__ import annotations

import torch
from torch import nn


class ItemEmbedding(nn.Embedding):
    """E (V + 1 + extra, d): row 0 is padding, rows 1..V the items, then ``extra`` special tokens (BERT4Rec's
    [MASK]). Its weight is the tied output table of every score-based model."""

    def __init__(self, num_items: int, dim: int, extra_tokens: int = 0):
        super().__init__(num_items + 1 + extra_tokens, dim, padding_idx=0)


def left_pad_positions(items: torch.Tensor, max_len: int) -> torch.Tensor:
    """Position ids for left-padded ``items`` (B, T): the last column is ``max_len`` whatever T is, so a history
    gets the same position embeddings at any batch width (padding never changes a score); pads get 0."""
    width = items.shape[1]
    if width > max_len:
        raise ValueError(f"sequence of width {width} exceeds max_len {max_len}")
    positions = torch.arange(max_len - width + 1, max_len + 1, device=items.device)
    return positions.expand_as(items).masked_fill(items == 0, 0)


class PositionEmbedding(nn.Embedding):
    """Learned absolute positions counted back from the prediction point (SASRec Eq. 2's P, BERT4Rec §3.4):
    ``forward(items)`` embeds ``left_pad_positions(items, max_len)``; row 0 (pads) is zero."""

    def __init__(self, max_len: int, dim: int):
        super().__init__(max_len + 1, dim, padding_idx=0)
        self.max_len = max_len

    def forward(self, items: torch.Tensor) -> torch.Tensor:
        return super().forward(left_pad_positions(items, self.max_len))

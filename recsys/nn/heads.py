"""A tied output head with a per-item bias (BERT4Rec §3.5: logits = o·Eᵀ + b_O) in the platform's dot-product
contract (scores = queries @ item table ᵀ): queries become [o, 1] and the table [E, b_O]."""

from __future__ import annotations

import torch


def biased_queries(o: torch.Tensor) -> torch.Tensor:
    """[o, 1] (N, d + 1)."""
    return torch.cat([o, torch.ones_like(o[:, :1])], dim=1)


def biased_table(item_weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """[E, b_O] (V + 1, d + 1) from rows 0..V of the item table and the bias (V + 1,): its product with
    ``biased_queries(o)`` is o·Eᵀ + b_O."""
    return torch.cat([item_weight[: bias.shape[0]], bias[:, None]], dim=1)

"""Multi-head scaled dot-product attention that is safe for fully padded rows.

Vaswani et al. 2017, Eq. 1: softmax(QKᵀ/√d)V. With left padding and a key-padding mask, the query rows at pad
positions would have every key masked and softmax would return NaN (model-specs §1, pitfalls). We let every
position attend to itself, so no row is ever empty; outputs at pad positions are garbage by construction and
callers mask them out.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from kernels._backend import resolve_backend


def _allowed_mask(q_len: int, k_len: int, causal: bool, key_padding_mask: torch.Tensor | None, device
                  ) -> torch.Tensor | None:
    """Boolean (B|1, 1, Lq, Lk) mask, True where query i may attend to key j; the queries are the last Lq of the
    Lk positions (all of them unless a caller needs only the final rows)."""
    if not causal and key_padding_mask is None:
        return None
    position = torch.arange(q_len, device=device)[:, None] + (k_len - q_len)  # each query's own key
    keys = torch.arange(k_len, device=device)[None, :]
    allowed = keys <= position if causal else torch.ones(q_len, k_len, dtype=torch.bool, device=device)
    allowed = allowed[None, None]
    if key_padding_mask is not None:
        allowed = allowed & ~key_padding_mask[:, None, None, :]
    return allowed | (keys == position)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool,
    key_padding_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    backend: str = "auto",
) -> torch.Tensor:
    """Attention over (B, H, L, Dh) tensors; ``key_padding_mask`` is (B, L) with True at pad positions. ``q`` may
    hold only the last Lq ≤ L query positions (B, H, Lq, Dh)."""
    backend = resolve_backend(backend)
    mask = _allowed_mask(q.shape[-2], k.shape[-2], causal, key_padding_mask, q.device)
    if backend == "torch":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    weights = torch.softmax(scores, dim=-1)
    if dropout_p > 0:
        weights = F.dropout(weights, p=dropout_p)
    return weights @ v

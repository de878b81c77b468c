"""Multi-head scaled dot-product self-attention over left-padded batches (Vaswani et al. 2017, Eq. 1 and §3.2.2),
causal (SASRec Eq. 3-5) or bidirectional (BERT4Rec §3.3), on ``kernels.attention``."""

from __future__ import annotations

import torch
from torch import nn

from kernels import attention


class MultiHeadSelfAttention(nn.Module):
    """``forward(queries, keys, padding)``: queries and keys (B, T, d) (SASRec queries with LN(X) and attends over
    X), ``padding`` (B, T) True at pads, which are never attended to. Dropout ``dropout`` on the attention
    probabilities while training. ``fused_qkv``: one (d → 3d) projection of a single input (BERT's layout, whose
    init draws it as one matrix), called with ``keys`` None."""

    def __init__(self, hidden: int, heads: int, dropout: float, causal: bool, fused_qkv: bool = False):
        super().__init__()
        if hidden % heads:
            raise ValueError(f"hidden_size {hidden} is not divisible by num_heads {heads}")
        self.heads = heads
        self.dropout = dropout
        self.causal = causal
        self.fused_qkv = fused_qkv
        if fused_qkv:
            self.qkv = nn.Linear(hidden, 3 * hidden)
        else:
            self.query = nn.Linear(hidden, hidden)
            self.key_value = nn.Linear(hidden, 2 * hidden)
        self.out = nn.Linear(hidden, hidden)

    def forward(self, queries: torch.Tensor, keys: torch.Tensor | None, padding: torch.Tensor,
                last: int | None = None) -> torch.Tensor:
        """``last``: compute only the final ``last`` query positions (B, last, d), attending over all keys."""
        b, _, d = queries.shape
        split = lambda x: x.view(b, x.shape[1], self.heads, d // self.heads).transpose(1, 2)  # noqa: E731
        if self.fused_qkv:
            if keys is not None or last is not None:
                raise ValueError("a fused Q/K/V projection attends over all its queries only: pass keys=None")
            q, k, v = self.qkv(queries).chunk(3, dim=-1)
        else:
            q = self.query(queries if last is None else queries[:, -last:])
            k, v = self.key_value(keys).chunk(2, dim=-1)
        out = attention(
            split(q), split(k), split(v), causal=self.causal, key_padding_mask=padding,
            dropout_p=self.dropout if self.training else 0.0,
        )
        return self.out(out.transpose(1, 2).reshape(b, q.shape[1], d))

"""SASRec: self-attentive sequential recommendation (Kang & McAuley, ICDM 2018; model-specs §1).

Embedding X = E[seq]·√d + P[p] (Eq. 2 with the reference code's √d scale), then b blocks of
Q = LN(X); X = Q + MHA(Q, X, X) (causal, Eq. 3–5); X = X + FFN(LN(X)) (Eq. 6), pads zeroed after every block,
and a final LN. The head is tied: scores are F_t · E (Eq. 7). Positions count back from the prediction point,
so the last item always has position ``max_len`` whether a batch is padded to 12 columns or to 50.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from kernels import attention
from recsys.losses import LossSettings, build_loss, supervised_loss
from recsys.models.base import left_pad_positions, ModelConfig, SequentialModel, register


class SASRecConfig(LossSettings, ModelConfig):
    hidden_size: int = 64
    num_blocks: int = 2
    num_heads: int = 1
    dropout: float = 0.5


class CausalSelfAttention(nn.Module):
    def __init__(self, hidden: int, heads: int, dropout: float):
        super().__init__()
        if hidden % heads:
            raise ValueError(f"hidden_size {hidden} is not divisible by num_heads {heads}")
        self.heads = heads
        self.dropout = dropout
        self.query = nn.Linear(hidden, hidden)
        self.key_value = nn.Linear(hidden, 2 * hidden)
        self.out = nn.Linear(hidden, hidden)

    def forward(self, queries: torch.Tensor, keys: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
        b, t, d = queries.shape
        split = lambda x: x.view(b, t, self.heads, d // self.heads).transpose(1, 2)  # noqa: E731
        k, v = self.key_value(keys).chunk(2, dim=-1)
        out = attention(
            split(self.query(queries)), split(k), split(v), causal=True, key_padding_mask=padding,
            dropout_p=self.dropout if self.training else 0.0,
        )
        return self.out(out.transpose(1, 2).reshape(b, t, d))


class SASRecBlock(nn.Module):
    def __init__(self, hidden: int, heads: int, dropout: float):
        super().__init__()
        self.attn_norm = nn.LayerNorm(hidden, eps=1e-8)
        self.attn = CausalSelfAttention(hidden, heads, dropout)
        self.ffn_norm = nn.LayerNorm(hidden, eps=1e-8)
        self.ffn = nn.Sequential(
            nn.Linear(hidden, hidden), nn.Dropout(dropout), nn.ReLU(), nn.Linear(hidden, hidden), nn.Dropout(dropout)
        )

    def forward(self, x: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
        q = self.attn_norm(x)
        x = q + self.attn(q, x, padding)
        x = self.ffn_norm(x)
        x = x + self.ffn(x)
        return x.masked_fill(padding[..., None], 0.0)


@register
class SASRec(SequentialModel):
    name = "sasrec"
    Config = SASRecConfig

    def __init__(self, config: SASRecConfig, num_items: int):
        super().__init__(config, num_items)
        d = config.hidden_size
        self.item_embedding = nn.Embedding(num_items + 1, d, padding_idx=0)
        self.position_embedding = nn.Embedding(config.max_len + 1, d, padding_idx=0)
        self.embedding_dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(SASRecBlock(d, config.num_heads, config.dropout) for _ in range(config.num_blocks))
        self.final_norm = nn.LayerNorm(d, eps=1e-8)
        self.loss_fn = build_loss(config)
        self._init_weights()

    def _init_weights(self) -> None:
        # Xavier-normal on every matrix, as the reference implementation does; the padding rows stay zero.
        for name, param in self.named_parameters():
            if param.dim() > 1:
                nn.init.xavier_normal_(param)
            elif "bias" in name:
                nn.init.zeros_(param)
        with torch.no_grad():
            self.item_embedding.weight[0].zero_()
            self.position_embedding.weight[0].zero_()

    def sequence_states(self, items: torch.Tensor) -> torch.Tensor:
        """F (B, T, d) for left-padded ``items`` (B, T), T ≤ max_len."""
        padding = items == 0
        positions = left_pad_positions(items, self.config.max_len)
        x = self.item_embedding(items) * math.sqrt(self.config.hidden_size) + self.position_embedding(positions)
        x = self.embedding_dropout(x).masked_fill(padding[..., None], 0.0)
        for block in self.blocks:
            x = block(x, padding)
        return self.final_norm(x)

    def encode(self, batch):
        return self.sequence_states(batch.items)[:, -1, :]

    def item_embeddings(self):
        return self.item_embedding.weight

    def loss(self, batch):
        return supervised_loss(self.loss_fn, self.sequence_states(batch.items), batch, self.item_embedding.weight)

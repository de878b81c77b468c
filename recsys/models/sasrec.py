"""SASRec: self-attentive sequential recommendation (Kang & McAuley, ICDM 2018; model-specs §1).

Embedding X = E[seq]·√d + P[p] (Eq. 2 with the reference code's √d scale), then b blocks of
Q = LN(X); X = Q + MHA(Q, X, X) (causal, Eq. 3–5); X = X + FFN(LN(X)) (Eq. 6), pads zeroed after every block,
and a final LN. The head is tied: scores are F_t · E (Eq. 7). Positions count back from the prediction point,
so the last item always has position ``max_len`` whether a batch is padded to 12 columns or to 50.

``layer="ligr"`` swaps the blocks for LiGR's gated pre-norm layers (``recsys.nn.GatedTransformerLayer``): with
``loss=sampled_softmax`` (logQ-corrected) that is eSASRec (Tikhonovich et al., RecSys 2025).
``reasoning_steps=K`` adds ReaRec's implicit reasoning steps (``recsys.reasoning``); ``intent_coarse_weight`` and
``intent_fine_weight`` add ICSRec's intent contrastive losses (``recsys.intents``).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import nn

from recsys.losses import LossSettings, build_loss
from recsys.models.base import ModelConfig, SequentialModel, register
from recsys.intents import IntentContrast, IntentSettings
from recsys.reasoning import Reasoning, ReasoningSettings
from recsys.item_init import ItemInitialised, ItemInitSettings
from recsys.nn import (FeedForward, GatedTransformerLayer, ItemEmbedding, MultiHeadSelfAttention, PositionEmbedding,
                       xavier_init)


class SASRecConfig(ItemInitSettings, ReasoningSettings, IntentSettings, LossSettings, ModelConfig):
    hidden_size: int = 64
    num_blocks: int = 2
    num_heads: int = 1
    dropout: float = 0.5
    layer: Literal["sasrec", "ligr"] = "sasrec"


class SASRecBlock(nn.Module):
    def __init__(self, hidden: int, heads: int, dropout: float):
        super().__init__()
        self.attn_norm = nn.LayerNorm(hidden, eps=1e-8)
        self.attn = MultiHeadSelfAttention(hidden, heads, dropout, causal=True)
        self.ffn_norm = nn.LayerNorm(hidden, eps=1e-8)
        self.ffn = FeedForward(hidden, hidden, nn.ReLU(), dropout)

    def forward(self, x: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
        q = self.attn_norm(x)
        x = q + self.attn(q, x, padding)
        x = self.ffn_norm(x)
        x = x + self.ffn(x)
        return x.masked_fill(padding[..., None], 0.0)


@register
class SASRec(ItemInitialised, Reasoning, IntentContrast, SequentialModel):
    name = "sasrec"
    Config = SASRecConfig

    def __init__(self, config: SASRecConfig, num_items: int):
        super().__init__(config, num_items)
        d = config.hidden_size
        self.item_embedding = ItemEmbedding(num_items, d)
        self.position_embedding = PositionEmbedding(config.max_len, d)
        self.embedding_dropout = nn.Dropout(config.dropout)
        block = SASRecBlock if config.layer == "sasrec" else GatedTransformerLayer
        self.blocks = nn.ModuleList(block(d, config.num_heads, config.dropout) for _ in range(config.num_blocks))
        self.final_norm = nn.LayerNorm(d, eps=1e-8)
        self.loss_fn = build_loss(config)
        self.setup_reasoning(d)
        self.setup_intents()
        xavier_init(self)  # the reference implementation's init

    def embed(self, batch):
        """E[s]·√d + P (B, T, d), dropped out, zero at pads; and the pad mask."""
        items = batch.items
        padding = items == 0
        x = self.item_embedding(items) * math.sqrt(self.config.hidden_size) + self.position_embedding(items)
        return self.embedding_dropout(x).masked_fill(padding[..., None], 0.0), padding

    def encode_embedded(self, x, padding):
        """F (B, T, d) for left-padded inputs (T ≤ max_len, plus any ReaRec reasoning tokens)."""
        for block in self.blocks:
            x = block(x, padding)
        return self.final_norm(x)

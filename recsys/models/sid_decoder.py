"""Decoder-only generative retrieval over semantic ids: one causal transformer over the flattened code tokens of a
user's items, trained like a language model on every next item of the sequence in one pass (model-specs §7).

The decoder-only variant of GRID (Ju et al., "Generative Recommendation with Semantic IDs: A Practitioner's
Handbook", 2025, §3 "architectures": the history's semantic-id tokens and the target's in one causal stream), over
the semantic ids, trie and ``add_items`` of TIGER (Rajput et al. 2023; ``recsys.models.semantic``).

- **Stream**: items s₀ … s_T become the tokens c(s₀)₁ … c(s₀)_L c(s₁)₁ … c(s_T)_L (L = levels + collision code),
  each embedded as token + level + item slot. Slots are right-aligned: the item being predicted is always slot
  ``max_len`` (training windows end with their last target; at inference the next item follows the history), so a
  history gets the same embeddings at any batch width.
- **Blocks**: pre-norm transformer (causal multi-head attention, GELU feed-forward), final LayerNorm; level d has its
  own head Linear(d_model → K_d) (GRID), the distribution constrained decoding searches.
- **Loss**: for every item s_{j+1} with history (j ≥ 0), the state at c(s_j)_L predicts c(s_{j+1})₁ and the state at
  c(s_{j+1})_{d} predicts c(s_{j+1})_{d+1}: teacher-forced cross-entropy over all L codes of every next item of the
  window (``SemanticIdCrossEntropy``), where TIGER re-encodes a copy of the history for each target.
- **Beam search**: the history is encoded once and each layer's keys and values kept; each of the L decoding steps
  runs only the beams' prefix tokens (at most L − 1), all of a query's beams side by side under a block-diagonal
  causal mask, attending to the cached history; constrained by the trie, score Σ log p.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from recsys.batching import SequenceBatch
from recsys.beam_search import beams_side_by_side_mask, constrained_beam_search
from recsys.losses import SemanticIdCrossEntropy
from recsys.models.base import register
from recsys.models.semantic import PAD, SemanticIdConfig, SemanticIdModel
from recsys.nn import FeedForward, normal_init


class SIDDecoderConfig(SemanticIdConfig):
    d_model: int = Field(128, ge=1)
    num_layers: int = Field(4, ge=1)
    num_heads: int = Field(4, ge=1)
    d_ff: int = Field(512, ge=1)
    dropout: float = Field(0.15, ge=0.0, lt=1.0)


class CachedDecoderBlock(nn.Module):
    """x + Drop(MHA(LN x)); x + FFN(LN x). ``past`` (keys, values) of earlier tokens are attended to before this
    call's tokens; the call returns this call's keys and values, for a cache."""

    def __init__(self, d: int, heads: int, d_ff: int, dropout: float):
        super().__init__()
        if d % heads:
            raise ValueError(f"d_model {d} is not divisible by num_heads {heads}")
        self.heads, self.p = heads, dropout
        self.attention_norm, self.qkv, self.out = nn.LayerNorm(d), nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.dropout = nn.Dropout(dropout)
        self.ffn_norm, self.ffn = nn.LayerNorm(d), FeedForward(d, d_ff, nn.GELU(), dropout, inner_dropout=False)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, past: tuple[torch.Tensor, torch.Tensor] | None = None
                ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        b, t, d = x.shape
        q, k, v = (z.reshape(b, t, self.heads, -1).transpose(1, 2)
                   for z in self.qkv(self.attention_norm(x)).chunk(3, dim=-1))
        keys, values = (k, v) if past is None else (torch.cat([past[0], k], 2), torch.cat([past[1], v], 2))
        h = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask,
                                           dropout_p=self.p if self.training else 0.0)
        x = x + self.dropout(self.out(h.transpose(1, 2).reshape(b, t, d)))
        return x + self.ffn(self.ffn_norm(x)), (k, v)


@register
class SIDDecoder(SemanticIdModel):
    """Decoder-only generative retrieval over semantic ids: ranks by ``beam_search``, has no item table."""

    name = "sid_decoder"
    Config = SIDDecoderConfig
    # GRID's recipe: Adam 1e-3 constant with weight decay 1e-4
    train_defaults = {"batch_size": 256, "lr": 1e-3, "lr_schedule": "constant", "optimizer": "adamw",
                      "weight_decay": 1e-4}

    def __init__(self, config: SIDDecoderConfig, num_items: int):
        super().__init__(config, num_items)
        d = config.d_model
        self.token_embedding = nn.Embedding(self.vocab_size, d, padding_idx=PAD)
        self.level_embedding = nn.Embedding(len(self.sizes), d)
        self.slot_embedding = nn.Embedding(config.max_len + 1, d)
        self.embedding_dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(CachedDecoderBlock(d, config.num_heads, config.d_ff, config.dropout)
                                    for _ in range(config.num_layers))
        self.final_norm = nn.LayerNorm(d)
        self.heads = nn.ModuleList(nn.Linear(d, size) for size in self.sizes)
        normal_init(self)  # GPT-2's N(0, 0.02)
        self.register_semantic_ids()
        self.loss_fn = SemanticIdCrossEntropy()

    def embed(self, items: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """Token + level + slot embeddings of items (B, n) at item slots (n,) → (B, n·L, d); pads give pad tokens."""
        tokens = self.code_tokens(self.codes[items]).masked_fill((items == 0)[..., None], PAD)
        levels = torch.arange(len(self.sizes), device=items.device)
        x = self.token_embedding(tokens) + self.level_embedding(levels) + self.slot_embedding(slots)[:, None]
        return self.embedding_dropout(x.flatten(1, 2))

    def run(self, x: torch.Tensor, mask: torch.Tensor, cache: list | None = None
            ) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
        """The blocks over x (B, t, d) under ``mask`` (B, 1, t, keys), after each layer's ``cache`` (keys, values)
        when given; returns the final-normed states and each layer's keys and values of x."""
        kv = []
        for i, block in enumerate(self.blocks):
            x, layer_kv = block(x, mask, None if cache is None else cache[i])
            kv.append(layer_kv)
        return self.final_norm(x), kv

    def stream_mask(self, real_tokens: torch.Tensor) -> torch.Tensor:
        """(B, 1, t, t) causal mask over real keys; a pad query sees itself (never an empty row)."""
        t = real_tokens.shape[1]
        causal = torch.ones(t, t, dtype=torch.bool, device=real_tokens.device).tril()
        return ((causal & real_tokens[:, None, :]) | torch.eye(t, dtype=torch.bool, device=causal.device))[:, None]

    def window(self, items: torch.Tensor, last_slot: int) -> tuple[torch.Tensor, list]:
        """States (B, n, L, d) of a left-padded window of items whose last column sits at ``last_slot``, and each
        layer's keys and values."""
        n, levels = items.shape[1], len(self.sizes)
        slots = torch.arange(last_slot + 1 - n, last_slot + 1, device=items.device)
        real = (items != 0).repeat_interleave(levels, dim=1)
        states, kv = self.run(self.embed(items, slots), self.stream_mask(real))
        return states.reshape(len(items), n, levels, -1), kv

    def loss(self, batch: SequenceBatch) -> torch.Tensor:
        """Cross-entropy over the codes of every next item of each window (``CausalTrainBatches``)."""
        self._require_fitted()
        items, targets = batch.items[:, -self.config.max_len:], batch.targets[:, -self.config.max_len:]
        states, _ = self.window(torch.cat([items, targets[:, -1:]], 1), self.config.max_len)
        # states predicting item j+1's codes: the last code state of item j, then item j+1's first L−1 code states
        predicting = torch.cat([states[:, :-1, -1:], states[:, 1:, :-1]], 2)
        keep = (items != 0) & (targets != 0)
        hidden = predicting[keep]
        return self.loss_fn([head(hidden[:, d]) for d, head in enumerate(self.heads)], self.codes[targets[keep]])

    @torch.no_grad()
    def beam_search(self, batch: SequenceBatch, k: int, beam_width: int | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k items (B, k) and their scores Σ_d log p (B, k) by trie-constrained beam search over a cached
        history."""
        self._require_fitted()
        trie = self.trie()
        if not 1 <= k <= len(trie):
            raise ValueError(f"k must be in 1..{len(trie)} (the catalogue size), got {k}")
        items = batch.items[:, -self.config.max_len:]
        # the history sits at slots max_len − n … max_len − 1; the item being decoded at slot max_len
        states, cache = self.window(items, self.config.max_len - 1)
        first = states[:, -1, -1]
        history_real = (items != 0).repeat_interleave(len(self.sizes), dim=1)
        batch_size, device = len(items), items.device
        slot = self.slot_embedding.weight[self.config.max_len]
        collision_level = len(self.sizes) - 1
        added = self.codes[int(self.trained_items) + 1:]

        def step_logits(prefix: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
            d = prefix.shape[1]
            if d == 0:
                return self.heads[0](first)
            width = len(prefix) // batch_size  # the search lays out each query's beams together, in query order
            tokens = (prefix + self.level_offsets[:d]).reshape(batch_size, width * d)
            levels = torch.arange(d, device=device).repeat(width)
            x = self.token_embedding(tokens) + self.level_embedding(levels) + slot
            own = beams_side_by_side_mask(width, d, device)
            mask = torch.cat([history_real[:, None, :].expand(-1, width * d, -1),
                              own.expand(batch_size, -1, -1)], 2)[:, None]
            hidden, _ = self.run(x, mask, cache)
            logits = self.heads[d](hidden.reshape(batch_size, width, d, -1)[:, :, -1].reshape(len(prefix), -1))
            if d == collision_level and len(added):
                logits = self._score_added_items(logits, prefix, added, trie)
            return logits

        width = max(k, beam_width or self.config.beam_width)
        found, scores = constrained_beam_search(step_logits, trie, batch_size, width, device=device)
        return found[:, :k], scores[:, :k]

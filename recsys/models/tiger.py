"""TIGER: Rajput et al., "Recommender Systems with Generative Retrieval" (NeurIPS 2023; model-specs §7), with
GRID's defaults (Ju et al. 2025, snap-research/GRID) where the spec names them.

- **Semantic ids and tokens** (§3.1): ``recsys.models.semantic`` (shared with ``sid_decoder``); the optional user
  token hash(user) mod 2000 comes after the code tokens.
- **Seq2seq** (§3.2): a T5 encoder–decoder (two ``transformers`` T5 stacks over our own vocabulary) reads the
  flattened codes of the last ``max_len`` items and is taught, with teacher forcing, to emit the target's L+1 codes
  after the start token. Level d has its own Linear(d_model → K_d) head (GRID), so its cross-entropy is over that
  level's codes only, the distribution constrained decoding searches.
- **Training examples**: every prefix of a training sequence (``recsys.supervision.LastPosition``, drawn afresh each
  epoch), the target being the prefix's next item.
- **Inference**: beam search constrained by the trie of valid code tuples (``recsys.beam_search``), beam width
  max(k, ``beam_width``), score Σ log p; every returned item is a real catalogue item.

``add_items`` places new items (text only) into the code table with the fitted quantiser, without retraining.
"""

from __future__ import annotations

import torch
from pydantic import Field

from recsys.batching import SequenceBatch
from recsys.beam_search import beams_side_by_side_mask, constrained_beam_search
from recsys.losses import SemanticIdCrossEntropy
from recsys.models.base import register
from recsys.models.semantic import BOS, PAD, SemanticIdConfig, SemanticIdModel
from recsys.supervision import LastPosition

USER_HASH_MULTIPLIER = 2654435761  # Knuth's multiplicative hash: spreads consecutive user ids over the buckets


class TIGERConfig(SemanticIdConfig):
    # seq2seq (T5)
    d_model: int = Field(128, ge=1)
    num_encoder_layers: int = Field(4, ge=1)
    num_decoder_layers: int = Field(4, ge=1)
    num_heads: int = Field(6, ge=1)
    head_dim: int = Field(64, ge=1)
    d_ff: int = Field(1024, ge=1)
    dropout: float = Field(0.1, ge=0.0, lt=1.0)
    user_tokens: int = Field(0, ge=0)  # TIGER's hash(user) mod 2000 token when 2000; 0 = off (GRID: no gain)
    prefix_fraction: float = Field(1.0, gt=0.0, le=1.0)  # share of the prefix cut points trained on per epoch


@register
class TIGER(SemanticIdModel):
    """Generative retrieval over semantic ids (Rajput et al. 2023): ranks by ``beam_search``, has no item table."""

    name = "tiger"
    Config = TIGERConfig
    # TIGER trains with batch 256; one target per row here as in the paper. lr follows the platform's Adam
    # cosine schedule (the paper: 0.01 with inverse-sqrt decay over 200k steps), not yet tuned.
    train_defaults = {"batch_size": 256, "lr": 1e-3}

    def __init__(self, config: TIGERConfig, num_items: int):
        super().__init__(config, num_items)
        self.supervision = LastPosition(config.prefix_fraction)  # every prefix, the target its next item
        from transformers import T5Config
        from transformers.models.t5.modeling_t5 import T5Stack

        self.user_offset = self.vocab_size
        vocab = self.user_offset + config.user_tokens
        common = dict(vocab_size=vocab, d_model=config.d_model, d_kv=config.head_dim, d_ff=config.d_ff,
                      num_heads=config.num_heads, dropout_rate=config.dropout, pad_token_id=PAD,
                      decoder_start_token_id=BOS, use_cache=False)
        # two T5 stacks with their own token tables and one head per level (GRID): nothing is shared, so the
        # state dict has no aliased tensors (safetensors refuses those)
        self.encoder = T5Stack(T5Config(**common, num_layers=config.num_encoder_layers, is_decoder=False))
        self.decoder = T5Stack(T5Config(**common, num_layers=config.num_decoder_layers, is_decoder=True))
        self.heads = torch.nn.ModuleList(torch.nn.Linear(config.d_model, size) for size in self.sizes)
        self.register_semantic_ids()
        self.loss_fn = SemanticIdCrossEntropy()

    # ---------------------------------------------------------------- seq2seq
    def encoder_inputs(self, batch: SequenceBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Flattened code tokens of the last ``max_len`` items (B, T·(L+1)) and their attention mask."""
        items = batch.items[:, -self.config.max_len:]
        real = items != 0
        tokens = self.code_tokens(self.codes[items]).masked_fill(~real[..., None], PAD).flatten(1)
        mask = real.repeat_interleave(len(self.sizes), dim=1)
        if self.config.user_tokens:
            if batch.user_idx is None:
                raise ValueError("user_tokens is on but the batch has no user_idx")
            user = self.user_offset + (batch.user_idx.long() * USER_HASH_MULTIPLIER) % self.config.user_tokens
            tokens = torch.cat([user[:, None], tokens], 1)
            mask = torch.cat([torch.ones_like(mask[:, :1]), mask], 1)
            # move the user token from column 0 to just before the first item, so left padding only ever
            # precedes the real tokens (T5's relative positions then see the same sequence at any width)
            order = torch.argsort(mask.long(), dim=1, stable=True)
            tokens, mask = tokens.gather(1, order), mask.gather(1, order)
        return tokens, mask.long()

    def loss(self, batch: SequenceBatch) -> torch.Tensor:
        """Teacher-forced cross-entropy over the L+1 codes of each row's last-position target (level-wise)."""
        self._require_fitted()
        target = batch.targets[:, -1]
        keep = target != 0
        if not keep.all():
            batch = SequenceBatch(batch.items[keep], batch.times[keep], batch.targets[keep],
                                  None if batch.user_idx is None else batch.user_idx[keep])
            target = target[keep]
        codes = self.codes[target]
        decoder_in = torch.cat([torch.full_like(codes[:, :1], BOS), self.code_tokens(codes)[:, :-1]], 1)
        tokens, mask = self.encoder_inputs(batch)
        encoded = self.encoder(input_ids=tokens, attention_mask=mask).last_hidden_state
        hidden = self.decode(decoder_in, encoded, mask)
        return self.loss_fn([head(hidden[:, d]) for d, head in enumerate(self.heads)], codes)

    def decode(self, decoder_in: torch.Tensor, encoded: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Decoder states (R, t, d_model) for the start token + code tokens ``decoder_in`` (causal self-attention,
        cross-attention to the encoded history)."""
        return self.decoder(input_ids=decoder_in, encoder_hidden_states=encoded,
                            encoder_attention_mask=mask).last_hidden_state

    def decode_beams(self, decoder_in: torch.Tensor, encoded: torch.Tensor, mask: torch.Tensor,
                     cache) -> torch.Tensor:
        """``decode`` for W beams per query, decoder_in (B, W, t) → (B, W, t, d_model), in one decoder pass of B
        rows: each query's beams are laid end to end (W·t tokens) under a block-diagonal causal mask, so they
        share one cross-attention to the query's history, whose keys and values ``cache`` (a ``transformers``
        ``EncoderDecoderCache``) holds from the first level on. T5's self-attention bias depends only on the
        distance between two tokens of the same beam, so the states equal ``decode`` beam by beam. Measured on
        Beauty-sized requests: projecting the encoder states again for every beam at every level was ~75% of a
        request's time."""
        batch, width, t = decoder_in.shape
        allowed = beams_side_by_side_mask(width, t, decoder_in.device)[None, None]  # (1, 1, W·t, W·t)
        out = self.decoder(input_ids=decoder_in.reshape(batch, width * t), attention_mask=allowed,
                           encoder_hidden_states=encoded, encoder_attention_mask=mask, past_key_values=cache)
        return out.last_hidden_state.reshape(batch, width, t, -1)

    @torch.no_grad()
    def beam_search(self, batch: SequenceBatch, k: int, beam_width: int | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k items (B, k) and their scores Σ_d log p (B, k) by trie-constrained beam search."""
        self._require_fitted()
        trie = self.trie()
        if not 1 <= k <= len(trie):
            raise ValueError(f"k must be in 1..{len(trie)} (the catalogue size), got {k}")
        tokens, mask = self.encoder_inputs(batch)
        encoded = self.encoder(input_ids=tokens, attention_mask=mask).last_hidden_state
        from transformers.cache_utils import DynamicCache, EncoderDecoderCache

        # the cross-attention keys and values are computed at the first level and reused; the self-attention half
        # is rebuilt at every level (the beams' prefixes are reordered, and at most L+1 tokens long)
        cross = DynamicCache()

        collision_level = len(self.sizes) - 1
        added = self.codes[int(self.trained_items) + 1:]

        def step_logits(prefix: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
            # the search lays out each query's beams together and in query order: rows = arange(B) repeated W times
            d = prefix.shape[1]
            start = torch.full((len(prefix), 1), BOS, dtype=torch.long, device=prefix.device)
            decoder_in = torch.cat([start, prefix + self.level_offsets[:d]], 1).reshape(len(tokens), -1, d + 1)
            cache = EncoderDecoderCache(DynamicCache(), cross)  # marks the layers already in ``cross`` as computed
            hidden = self.decode_beams(decoder_in, encoded, mask, cache)[:, :, -1]
            logits = self.heads[d](hidden.reshape(len(prefix), -1))
            if d == collision_level and len(added):
                logits = self._score_added_items(logits, prefix, added, trie)
            return logits

        width = max(k, beam_width or self.config.beam_width)
        items, scores = constrained_beam_search(step_logits, trie, len(tokens), width, device=tokens.device)
        return items[:, :k], scores[:, :k]

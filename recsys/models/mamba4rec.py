"""Mamba4Rec: Liu et al., "Mamba4Rec: Towards Efficient Sequential Recommendation with Selective State Space
Models" (2024), §3 (model-specs §4), on the Mamba-1 mixer (``recsys.nn.MambaBlock``).

X = LN(Dropout(E[seq])), no positional embedding; each layer is H = LN(Dropout(Mamba(X))) (one layer) or
LN(Dropout(Mamba(X)) + X) (stacked layers), then the point-wise FFN LN(H + Dropout(W₂·Dropout(GELU(W₁H)))) with
inner size 4d (``recsys.nn.MixerLayer``). The head is tied to E; full cross-entropy. The model is causal, so it
trains on every position at once, the equivalent of the reference's prefix augmentation without per-prefix copies.
Batches are left-padded (the reference right-pads and gathers at len−1: on left-padded batches the last column is
the same point); the mixer makes pads exact no-ops.
"""

from __future__ import annotations

import torch
from torch import nn

from recsys.losses import LossSettings, build_loss
from recsys.models.base import ModelConfig, SequentialModel, register
from recsys.intents import IntentContrast, IntentSettings
from recsys.reasoning import Reasoning, ReasoningSettings
from recsys.nn import Backend, ItemEmbedding, MambaBlock, MixerLayer, normal_init


class MambaConfig(LossSettings, ModelConfig):
    # defaults: model-specs §4 (chengkai-liu/Mamba4Rec config.yaml); max_len 50 as on Amazon
    hidden_size: int = 64
    num_layers: int = 1
    d_state: int = 32
    d_conv: int = 4
    expand: int = 2
    dt_rank: int | None = None  # None: ⌈hidden_size / 16⌉
    dropout: float = 0.2
    backend: Backend = "auto"


class MambaSequenceModel(SequentialModel):
    """The embedding, layer stack and tied head that Mamba4Rec and SIGMA share; subclasses build ``mixer()``."""

    def __init__(self, config: MambaConfig, num_items: int):
        super().__init__(config, num_items)
        d = config.hidden_size
        self.item_embedding = ItemEmbedding(num_items, d)
        self.embedding_dropout = nn.Dropout(config.dropout)
        self.embedding_norm = nn.LayerNorm(d, eps=1e-12)
        self.layers = nn.ModuleList(
            MixerLayer(self.mixer(), d, config.dropout, config.num_layers > 1, nn.GELU(), eps=1e-12)
            for _ in range(config.num_layers)
        )
        self.loss_fn = build_loss(config)
        if isinstance(self, Reasoning):
            self.setup_reasoning(d)
        if isinstance(self, IntentContrast):
            self.setup_intents()
        # Mamba4Rec's init, except that the Mamba-specific Δ projection keeps Mamba's own (the reference's
        # ``self.apply`` zeroes its bias, starting every channel at Δ = softplus(0) ≈ 0.69)
        normal_init(self, std=0.02, skip=tuple(m.dt_proj for m in self.modules() if isinstance(m, MambaBlock)))

    def mamba_block(self) -> MambaBlock:
        c = self.config
        return MambaBlock(c.hidden_size, d_state=c.d_state, d_conv=c.d_conv, expand=c.expand, dt_rank=c.dt_rank,
                          backend=c.backend)

    def mixer(self) -> nn.Module:
        raise NotImplementedError

    def embed(self, batch):
        """LN(Drop(E[s])) (B, T, d) and the pad mask."""
        return self.embedding_norm(self.embedding_dropout(self.item_embedding(batch.items))), batch.items == 0

    def encode_embedded(self, x, padding) -> torch.Tensor:
        """H (B, T, d) for left-padded inputs, zero at pads."""
        for layer in self.layers:
            x = layer(x, ~padding)
        return x.masked_fill(padding[..., None], 0.0)

    def sequence_states(self, batch) -> torch.Tensor:
        return self.encode_embedded(*self.embed(batch))


class Mamba4RecConfig(ReasoningSettings, IntentSettings, MambaConfig):
    pass


@register
class Mamba4Rec(Reasoning, IntentContrast, MambaSequenceModel):
    """Mamba4Rec (Liu et al. 2024, §3): causal, trained at every position; ``reasoning_steps=K`` adds ReaRec's
    implicit reasoning steps (``recsys.reasoning``), the intent weights ICSRec's losses (``recsys.intents``)."""

    name = "mamba4rec"
    Config = Mamba4RecConfig
    # The reference trains with a constant Adam lr 1e-3 on 2048 prefixes per step; the platform's cosine schedule
    # from 2e-3 averages near that, so the platform defaults stay (docs/results.md).
    train_defaults = {}

    def mixer(self) -> nn.Module:
        return self.mamba_block()

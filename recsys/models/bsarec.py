"""BSARec: self-attention beside a frequency-domain inductive bias (Shin et al., "An Attentive Inductive Bias for
Sequential Recommendation beyond the Self-Attention", AAAI 2024, §4; model-specs §10).

Embedding X⁰ = Drop(LN(E[s] + P)) over a window of exactly ``max_len`` positions: left pads carry their position
embedding, because the filter below sees the whole window and its cut-off is a fraction of the window. Each block:

- beyond-self-attention layer (§4.1): the inductive bias DSP = LN(X + Drop(LPF(X) + β² ⊙ (X − LPF(X)))), where
  LPF keeps the first ⌊c/2⌋+1 frequencies of the rFFT over positions and β is learned per channel (β² rescales
  the high frequencies); the attention GSP = LN(X + Drop(MHA(X))) (causal); mixed H = α·DSP + (1 − α)·GSP;
- feed-forward (§4.2): X = LN(H + Drop(W₂·GELU(W₁H))).

The filter mixes every position of the window, so a state looks ahead at later items: training uses every prefix
at its last position (``LastPosition``), scored against the tied item table with full cross-entropy (§4.3). The
last block only needs the last position's output, so it computes just that row (attention keys and values still
cover the window): the same numbers, a third less work per step; dropout masks come from ``FastDropout``
(a quarter of a step with ``nn.Dropout`` on this CPU). Differences from the reference code: a prefix
with no history (the first item of a sequence as a target) is not trained on, and pad query rows attend to
themselves (kernels.attention) rather than to earlier pads.
"""

from __future__ import annotations

import torch
from torch import nn

from recsys.losses import LossSettings, build_loss
from recsys.models.base import ModelConfig, SequentialModel, register
from recsys.nn import FastDropout, FeedForward, ItemEmbedding, MultiHeadSelfAttention, normal_init
from recsys.supervision import LastPosition
from recsys.item_init import ItemInitialised, ItemInitSettings


class BSARecConfig(ItemInitSettings, LossSettings, ModelConfig):
    """The paper's Beauty settings (its README and logged run): d 64, 2 layers, 1 head, dropout 0.5, α 0.7, c 5."""

    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 1
    dropout: float = 0.5
    alpha: float = 0.7
    c: int = 5
    prefix_fraction: float = 1.0


def low_pass(x: torch.Tensor, kept: int) -> torch.Tensor:
    """The first ``kept`` rFFT frequencies of ``x`` (B, T, d) over positions, back in the time domain (§4.1)."""
    spectrum = torch.fft.rfft(x, dim=1, norm="ortho")
    spectrum[:, kept:] = 0
    return torch.fft.irfft(spectrum, n=x.shape[1], dim=1, norm="ortho")


class BSARecBlock(nn.Module):
    def __init__(self, d: int, heads: int, dropout: float, alpha: float, c: int):
        super().__init__()
        self.alpha, self.kept = alpha, c // 2 + 1
        self.sqrt_beta = nn.Parameter(torch.randn(1, 1, d))
        self.filter_dropout, self.filter_norm = FastDropout(dropout), nn.LayerNorm(d, eps=1e-12)
        self.attention = MultiHeadSelfAttention(d, heads, dropout, causal=True)
        self.attention_dropout, self.attention_norm = FastDropout(dropout), nn.LayerNorm(d, eps=1e-12)
        self.ffn = FeedForward(d, 4 * d, nn.GELU(), FastDropout(dropout), inner_dropout=False)
        self.ffn_norm = nn.LayerNorm(d, eps=1e-12)

    def forward(self, x: torch.Tensor, padding: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        last = 1 if last_only else None
        low = low_pass(x, self.kept)
        rows = slice(-1, None) if last_only else slice(None)
        low, skip = low[:, rows], x[:, rows]
        dsp = self.filter_norm(skip + self.filter_dropout(low + self.sqrt_beta ** 2 * (skip - low)))
        gsp = self.attention_norm(skip + self.attention_dropout(self.attention(x, x, padding, last)))
        h = self.alpha * dsp + (1 - self.alpha) * gsp
        return self.ffn_norm(h + self.ffn(h))


@register
class BSARec(ItemInitialised, SequentialModel):
    name = "bsarec"
    Config = BSARecConfig
    # the reference's optimiser: Adam lr 5e-4 constant, default betas, no clipping or weight decay, batch 256,
    # early stopping with patience 10 (on validation NDCG@10 here, NDCG@20 there)
    train_defaults = {"lr": 5e-4, "lr_schedule": "constant", "betas": (0.9, 0.999), "grad_clip": None,
                      "batch_size": 256, "epochs": 200, "patience": 10}

    def __init__(self, config: BSARecConfig, num_items: int):
        super().__init__(config, num_items)
        d = config.hidden_size
        self.supervision = LastPosition(config.prefix_fraction)
        self.item_embedding = ItemEmbedding(num_items, d)
        self.position_embedding = nn.Embedding(config.max_len, d)
        self.embedding_norm, self.embedding_dropout = nn.LayerNorm(d, eps=1e-12), FastDropout(config.dropout)
        self.blocks = nn.ModuleList(BSARecBlock(d, config.num_heads, config.dropout, config.alpha, config.c)
                                    for _ in range(config.num_layers))
        self.loss_fn = build_loss(config)
        normal_init(self)  # the reference's init: N(0, 0.02) weights, zero biases, LayerNorm (1, 0)

    def sequence_states(self, batch):
        """The last position's state (B, 1, d): the only one a look-ahead model may be scored or trained at."""
        items = batch.items[:, -self.config.max_len:]
        items = nn.functional.pad(items, (self.config.max_len - items.shape[1], 0))  # the whole window, always
        padding = items == 0
        x = self.item_embedding(items) + self.position_embedding.weight
        x = self.embedding_dropout(self.embedding_norm(x))
        for i, block in enumerate(self.blocks):
            x = block(x, padding, last_only=i == len(self.blocks) - 1)
        return x

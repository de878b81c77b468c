"""BERT4Rec: Sun et al., "BERT4Rec: Sequential Recommendation with Bidirectional Encoder Representations from
Transformer" (CIKM 2019); model-specs §2, following the reference code (FeiSun/BERT4Rec ``modeling.py``,
``gen_data_fin.py``, ``bert_config_*.json``) where it differs from the paper.

**Vocabulary.** 0 = padding, 1..V = items, V+1 = [MASK]; the input table has V+2 rows, but only rows 1..V are ever
classes, and ``item_embeddings()`` returns rows 0..V so evaluation never ranks [MASK].

**Encoder** (paper §3.3–3.4). Embedding h⁰ = E[v] + P[p] (§3.4), then LayerNorm and dropout (the BERT code's
``embedding_postprocessor``). ``num_blocks`` post-LN transformer layers (§3.3, "Stacking Transformer Layer"):
H = LN(H + Drop(MH(H))) with bidirectional multi-head attention (only pad keys masked, attention-probability
dropout), then H = LN(H + Drop(PFFN(H))), PFFN(x) = GELU(x·W₁ + b₁)·W₂ + b₂ with inner size 4d (GELU is the tanh
approximation of the BERT code). Weights use a truncated normal, std 0.02 (cut at ±2σ as TensorFlow does).

**Positions and padding.** Batches are left-padded, and positions count back from the right edge as in SASRec: the
last column always has position ``max_len`` (pads get position 0 and are never attended to). A training window
of m items ends at position ``max_len``; at inference the input is the last ``max_len − 1`` items followed by
[MASK] (paper §3.6), so [MASK] also sits at position ``max_len``: training and inference agree whatever the
padding width of a batch.

**Output layer** (paper §3.5 plus the code's LayerNorm, model-specs §2 "Head"): o = LN(GELU(h·W_P + b_P)),
logits = o·Eᵀ + b_O with the item table E tied to the input embedding and one output bias per item. To fit the
platform's dot-product contract (scores = encode @ item_embeddings().T), ``encode`` returns [o, 1] (B, d+1) and
``item_embeddings`` returns [E, b_O] (V+1, d+1): the product is exactly o·Eᵀ + b_O.

**Cloze training** (paper §3.6, model-specs §2): every epoch, each training window gets a fresh random masking of
n = min(max_predictions, max(1, round(m·ρ))) of its m items, all replaced by [MASK] (the reference runs with
``mask_prob = 1.0``: no 80/10/10). The loss is the full softmax cross-entropy over items 1..V at the masked
positions only, averaged (§3.6, L = 1/|S_m| Σ −log P(v_m = v*_m | S′)), computed by ``kernels.linear_cross_entropy``
with the bias folded in as an extra column. Re-drawing the masks every epoch replaces the reference's
``dupe_factor`` static copies. The reference also adds one "mask-last" instance per window (``mask_last``: only the
last item masked, the inference pattern); here a fraction ``mask_last_prob`` of the windows, drawn afresh each
epoch, are added a second time as mask-last instances. ``mask_last_prob=0.1`` keeps the reference's proportion: one
mask-last instance per 10 random maskings (``dupe_factor = 10``), i.e. 1/11 of the instances.

**Prefix mask-last instances** (``mask_last_prefix``, our addition, on by default with ``mask_last_prob=1.0``). A
reference mask-last instance trains the inference pattern ([MASK] after left context only) at one point of each
window, its end; on short histories such as Amazon's (about 7 training items a user) that is one next-item example
per user and epoch, while SASRec learns from every prefix. With ``mask_last_prefix`` a mask-last instance is a
prefix of its window ending at a cut point drawn afresh each epoch (uniform over the prefixes of at least 2 items),
like the sampled prefix cut points of SIGMA's training; it still sits at the right edge, so its [MASK] has position
``max_len`` as at inference. The cloze instances are unchanged (docs/results.md has the measurements).

**Windows** (``gen_data_fin.py``): a history of at most ``max_len`` items is one window; a longer one is cut into
windows of ``max_len`` items ending at its last item and every ``step`` items earlier, plus the first ``max_len``
items, with step = int(``window_step``·max_len) (0.1 for Amazon data, 0.5 for ML-1M; model-specs §2).
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import nn

from recsys.batching import SequenceBatch
from recsys.losses import FullCrossEntropy
from recsys.models.base import ModelConfig, SequentialModel, register
from recsys.nn import (FeedForward, ItemEmbedding, MultiHeadSelfAttention, PositionEmbedding, biased_queries,
                       biased_table, truncated_normal_init)
from recsys.supervision import Cloze


class BERT4RecConfig(ModelConfig):
    """Defaults are the reference's Amazon Beauty settings (``bert_config_beauty_64.json``, ``run_beauty.sh``), except
    for the mask-last instances (``mask_last_prob``, ``mask_last_prefix``): the reference's are
    ``mask_last_prob=0.1, mask_last_prefix=False``."""

    max_len: int = Field(50, ge=2)
    hidden_size: int = 64
    num_blocks: int = 2
    num_heads: int = 2
    # hidden dropout (embeddings, attention output, feed-forward output)
    dropout: float = 0.2
    # dropout on the attention probabilities; None: the same as ``dropout``
    attention_dropout: float | None = None
    # ρ, the share of a window's items that are masked (0.6 for Amazon-like data, 0.2 for ML-1M)
    mask_prob: float = Field(0.6, gt=0, le=1)
    max_predictions: int = Field(30, ge=1)
    # share of windows that get an extra mask-last instance each epoch (reference: 0.1, one per 10 random maskings;
    # 1.0 with prefix instances measured better on Beauty, see the module docstring)
    mask_last_prob: float = Field(1.0, ge=0, le=1)
    # False (reference): a mask-last instance is the whole window with its last item masked. True: it is a prefix
    # of the window ending at a cut point drawn each epoch (≥ 2 items when the window has them), so the
    # inference pattern, [MASK] after left context only, is trained at every position of a history
    mask_last_prefix: bool = True
    # window step over long histories as a fraction of max_len (0.1 Amazon, 0.5 ML-1M)
    window_step: float = Field(0.1, gt=0, le=1)
    init_std: float = 0.02
    layer_norm_eps: float = 1e-12


class TransformerLayer(nn.Module):
    """Post-LN BERT layer (paper §3.3, Trm): A = LN(H + Drop(MH(H))); Trm(H) = LN(A + Drop(PFFN(A))), with
    bidirectional attention over the non-pad keys and PFFN(x) = GELU(x·W₁ + b₁)·W₂ + b₂, inner size 4d."""

    def __init__(self, hidden: int, heads: int, dropout: float, attention_dropout: float, eps: float):
        super().__init__()
        self.attn = MultiHeadSelfAttention(hidden, heads, attention_dropout, causal=False, fused_qkv=True)
        self.attn_dropout = nn.Dropout(dropout)
        self.attn_norm = nn.LayerNorm(hidden, eps=eps)
        self.ffn = FeedForward(hidden, 4 * hidden, nn.GELU(approximate="tanh"), dropout, inner_dropout=False)
        self.ffn_norm = nn.LayerNorm(hidden, eps=eps)

    def forward(self, x: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
        x = self.attn_norm(x + self.attn_dropout(self.attn(x, None, padding)))
        return self.ffn_norm(x + self.ffn(x))


@register
class BERT4Rec(SequentialModel):
    name = "bert4rec"
    Config = BERT4RecConfig
    # lr, schedule, weight decay and epochs measured on Amazon Beauty and Sports (docs/results.md); batch 256,
    # AdamW, BERT's betas and clipping at 5 are the reference's. The decay reaches every parameter.
    train_defaults = {
        "epochs": 80, "batch_size": 256, "lr": 1e-3, "lr_schedule": "cosine", "optimizer": "adamw",
        "weight_decay": 0.1, "betas": (0.9, 0.999), "grad_clip": 5.0, "patience": 20,
    }

    def __init__(self, config: BERT4RecConfig, num_items: int):
        super().__init__(config, num_items)
        d = config.hidden_size
        attention_dropout = config.dropout if config.attention_dropout is None else config.attention_dropout
        self.mask_token = num_items + 1
        self.item_embedding = ItemEmbedding(num_items, d, extra_tokens=1)  # the [MASK] row V+1
        self.position_embedding = PositionEmbedding(config.max_len, d)
        self.embedding_norm = nn.LayerNorm(d, eps=config.layer_norm_eps)
        self.embedding_dropout = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList(
            TransformerLayer(d, config.num_heads, config.dropout, attention_dropout, config.layer_norm_eps)
            for _ in range(config.num_blocks)
        )
        self.head = nn.Sequential(nn.Linear(d, d), nn.GELU(approximate="tanh"),
                                  nn.LayerNorm(d, eps=config.layer_norm_eps))
        # b_O, one per item; entry 0 (padding) is never a class and stays 0
        self.output_bias = nn.Parameter(torch.zeros(num_items + 1))
        self.loss_fn = FullCrossEntropy()  # over items 1..V, the bias an extra column (§3.6)
        self.supervision = Cloze(self.mask_token, config.mask_prob, config.max_predictions, config.mask_last_prob,
                                 config.window_step, config.mask_last_prefix)
        truncated_normal_init(self, config.init_std)

    def sequence_states(self, batch: SequenceBatch) -> torch.Tensor:
        """Encoder output H (B, T, d) for a left-padded batch, T ≤ max_len, [MASK] = V+1 allowed."""
        items = batch.items
        padding = items == 0
        x = self.embedding_norm(self.item_embedding(items) + self.position_embedding(items))
        x = self.embedding_dropout(x)
        for layer in self.layers:
            x = layer(x, padding)
        return x

    def queries(self, states: torch.Tensor) -> torch.Tensor:
        """[o, 1] with o = LN(GELU(h·W_P + b_P)) (§3.5): its product with ``item_embeddings()`` is o·Eᵀ + b_O."""
        return biased_queries(self.head(states))

    def encode(self, batch: SequenceBatch) -> torch.Tensor:
        """The query at a [MASK] appended after the last max_len − 1 items (paper §3.6)."""
        items = batch.items[:, -(self.config.max_len - 1):]
        mask = torch.full((items.shape[0], 1), self.mask_token, dtype=items.dtype, device=items.device)
        return super().encode(SequenceBatch(torch.cat([items, mask], dim=1), batch.times))

    def item_embeddings(self) -> torch.Tensor:
        """[E, b_O] for rows 0..V (V+1, d+1): the [MASK] row V+1 is left out, so it is never ranked."""
        return biased_table(self.item_embedding.weight, self.output_bias)

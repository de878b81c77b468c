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
``max_len`` as at inference. The cloze instances are unchanged. Measured on Amazon Beauty (README, exclusion on,
HR@10 / NDCG@10): the reference's mask-last instances reach 0.0579 / 0.0304 (100-epoch schedule, early stop at 58,
best 38) and 0.0574 / 0.0311 with ``mask_last_prob=0.5`` (40 epochs); one prefix instance per window reaches 0.0615
/ 0.0324 in 40 epochs and 0.0665 / 0.0362 in 80, still improving at the last epoch (all with the reference's weight
decay of 0.01; the default is now 0.1, see ``BERT4Rec.train_defaults``).

**Windows** (``gen_data_fin.py``): a history of at most ``max_len`` items is one window; a longer one is cut into
windows of ``max_len`` items ending at its last item and every ``step`` items earlier, plus the first ``max_len``
items, with step = int(``window_step``·max_len) (0.1 for Amazon data, 0.5 for ML-1M; model-specs §2).
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import torch
from pydantic import Field
from torch import nn

from kernels import attention, linear_cross_entropy
from pipelines.jagged import Jagged
from recsys.batching import SequenceBatch, _left_pad, length_bucketed_batches
from recsys.models.base import left_pad_positions, ModelConfig, SequentialModel, register


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


def cloze_mask(
    items: np.ndarray, lengths: np.ndarray, mask_last: np.ndarray, mask_prob: float, max_predictions: int,
    rng: np.random.Generator,
) -> np.ndarray:
    """Boolean (B, W) mask of the positions to hide in left-padded ``items`` (B, W) whose rows hold ``lengths``
    items. Rows flagged in ``mask_last`` hide only their last item; the others hide
    n = min(max_predictions, max(1, round(m·ρ))) positions drawn uniformly among their m items (half rounds up).
    Pads are never chosen: their random keys sort after every real position and n ≤ m."""
    b, w = items.shape
    keys = rng.random((b, w))
    keys[items == 0] = 2.0
    ranks = np.argsort(np.argsort(keys, axis=1, kind="stable"), axis=1, kind="stable")
    n = np.minimum(max_predictions, np.maximum(1, np.floor(lengths * mask_prob + 0.5).astype(np.int64)))
    n = np.minimum(n, lengths)
    masked = ranks < n[:, None]
    masked[mask_last] = False
    masked[mask_last, -1] = True
    return masked


class ClozeTrainBatches:
    """BERT4Rec's cloze training data (model-specs §2): windows over each training history, masked afresh every
    epoch, plus mask-last instances for a ``mask_last_prob`` share of the windows.

    ``items`` holds the masked input (masked positions replaced by ``mask_token``), ``targets`` the original item
    at masked positions and 0 elsewhere, so the trainer counts the masked positions as supervised targets.
    Only indices into ``train`` are stored, never copies of the windows.
    """

    def __init__(
        self, users: np.ndarray, train: Jagged, max_len: int, batch_size: int, mask_token: int,
        mask_prob: float, max_predictions: int, mask_last_prob: float = 0.1, window_step: float = 0.1,
        mask_last_prefix: bool = False,
    ):
        self.train = train
        self.batch_size = batch_size
        self.mask_token = mask_token
        self.mask_prob = mask_prob
        self.max_predictions = max_predictions
        self.mask_last_prob = mask_last_prob
        self.mask_last_prefix = mask_last_prefix
        step = max(1, int(window_step * max_len))
        lengths = train.lengths()
        rows = np.flatnonzero(lengths >= 1)
        extra = lengths[rows] - max_len
        # windows ending at the last item, then every ``step`` items earlier while they start after item 0, plus
        # the window holding the first max_len items (gen_data_fin.py: range(len − L, 0, −step) + [0])
        count = np.where(extra > 0, -(-extra // step) + 1, 1)
        row_of = np.repeat(rows, count)
        nth = np.arange(len(row_of)) - np.repeat(np.cumsum(count) - count, count)
        start = np.maximum(np.repeat(extra, count) - nth * step, 0)
        end = np.minimum(start + max_len, lengths[row_of])
        self.starts = train.offsets[row_of] + start
        self.ends = train.offsets[row_of] + end
        self.users = np.asarray(users)[row_of]
        self.lengths = self.ends - self.starts

    def num_instances(self) -> int:
        return len(self.lengths) + int(round(self.mask_last_prob * len(self.lengths)))

    def epoch(self, rng: np.random.Generator) -> Iterator[SequenceBatch]:
        n = len(self.lengths)
        extra = rng.choice(n, size=self.num_instances() - n, replace=False)
        windows = np.concatenate([np.arange(n), extra])
        mask_last = np.arange(len(windows)) >= n
        starts, ends = self.starts[windows], self.ends[windows]  # fancy indexing: fresh arrays, safe to edit
        if self.mask_last_prefix:
            # a cut point uniform over the window's prefixes of ≥ 2 items (the whole 1-item window otherwise)
            window = self.lengths[extra]
            shortest = np.minimum(window, 2)
            ends[n:] = starts[n:] + shortest + (rng.random(len(extra)) * (window - shortest + 1)).astype(np.int64)
        lengths = ends - starts
        for picked in length_bucketed_batches(lengths, self.batch_size, rng):
            width = int(lengths[picked].max())
            items = _left_pad([self.train.items[s:e] for s, e in zip(starts[picked], ends[picked])], width, np.int64)
            times = _left_pad([self.train.times[s:e] for s, e in zip(starts[picked], ends[picked])], width, np.int64)
            masked = cloze_mask(items, lengths[picked], mask_last[picked], self.mask_prob, self.max_predictions, rng)
            yield SequenceBatch(
                items=torch.from_numpy(np.where(masked, self.mask_token, items)),
                times=torch.from_numpy(times),
                targets=torch.from_numpy(np.where(masked, items, 0)),
                user_idx=torch.from_numpy(self.users[windows[picked]].astype(np.int64)),
            )

    def __len__(self) -> int:
        return -(-self.num_instances() // self.batch_size)


class BidirectionalSelfAttention(nn.Module):
    """Multi-head self-attention over all non-pad keys (paper §3.3, MH and Attention), attention-probability
    dropout."""

    def __init__(self, hidden: int, heads: int, dropout: float):
        super().__init__()
        if hidden % heads:
            raise ValueError(f"hidden_size {hidden} is not divisible by num_heads {heads}")
        self.heads = heads
        self.dropout = dropout
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.out = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in self.qkv(x).chunk(3, dim=-1))
        out = attention(q, k, v, causal=False, key_padding_mask=padding,
                        dropout_p=self.dropout if self.training else 0.0)
        return self.out(out.transpose(1, 2).reshape(b, t, d))


class TransformerLayer(nn.Module):
    """Post-LN BERT layer (paper §3.3, Trm): A = LN(H + Drop(MH(H))); Trm(H) = LN(A + Drop(PFFN(A)))."""

    def __init__(self, hidden: int, heads: int, dropout: float, attention_dropout: float, eps: float):
        super().__init__()
        self.attn = BidirectionalSelfAttention(hidden, heads, attention_dropout)
        self.attn_dropout = nn.Dropout(dropout)
        self.attn_norm = nn.LayerNorm(hidden, eps=eps)
        self.ffn = nn.Sequential(nn.Linear(hidden, 4 * hidden), nn.GELU(approximate="tanh"),
                                 nn.Linear(4 * hidden, hidden), nn.Dropout(dropout))
        self.ffn_norm = nn.LayerNorm(hidden, eps=eps)

    def forward(self, x: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
        x = self.attn_norm(x + self.attn_dropout(self.attn(x, padding)))
        return self.ffn_norm(x + self.ffn(x))


@register
class BERT4Rec(SequentialModel):
    name = "bert4rec"
    Config = BERT4RecConfig
    # Measured on Amazon Beauty (README): lr 1e-3 (10× the reference's 1e-4, as the platform's other models use)
    # with 80 epochs of cosine decay (~14k steps at batch 256) reaches the target with prefix mask-last instances
    # and was still improving at the last epoch; the reference's own schedule is 400k steps (thousands of passes
    # over Beauty's ~22k windows), and under-training is BERT4Rec's common failure (Petrov & Macdonald 2022).
    # Batch 256, AdamW, BERT's betas (0.9, 0.999) and clipping at 5 are the reference's. Weight decay is 0.1, not the
    # reference's 0.01: on Amazon Sports it lifted the best validation NDCG@10 from 0.0269 to 0.0280 (40 epochs) and
    # test from below the TIGER paper's SASRec row to above it; on Beauty test was unchanged (0.0361 vs 0.0362) while
    # validation rose 0.0465 → 0.0477; 0.3 trailed 0.1 on Sports (README). The decay reaches every parameter, LayerNorm
    # and biases included (the BERT code exempts those); that is how it was measured.
    train_defaults = {
        "epochs": 80, "batch_size": 256, "lr": 1e-3, "lr_schedule": "cosine", "optimizer": "adamw",
        "weight_decay": 0.1, "betas": (0.9, 0.999), "grad_clip": 5.0, "patience": 20,
    }

    def __init__(self, config: BERT4RecConfig, num_items: int):
        super().__init__(config, num_items)
        d = config.hidden_size
        attention_dropout = config.dropout if config.attention_dropout is None else config.attention_dropout
        self.mask_token = num_items + 1
        self.item_embedding = nn.Embedding(num_items + 2, d, padding_idx=0)
        self.position_embedding = nn.Embedding(config.max_len + 1, d, padding_idx=0)
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
        self._init_weights()

    def _init_weights(self) -> None:
        std = self.config.init_std
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.trunc_normal_(module.weight, std=std, a=-2 * std, b=2 * std)
                if isinstance(module, nn.Linear):
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        with torch.no_grad():
            self.item_embedding.weight[0].zero_()
            self.position_embedding.weight[0].zero_()

    def sequence_states(self, items: torch.Tensor) -> torch.Tensor:
        """Encoder output H (B, T, d) for left-padded ``items`` (B, T), T ≤ max_len, [MASK] = V+1 allowed."""
        padding = items == 0
        positions = left_pad_positions(items, self.config.max_len)
        x = self.embedding_norm(self.item_embedding(items) + self.position_embedding(positions))
        x = self.embedding_dropout(x)
        for layer in self.layers:
            x = layer(x, padding)
        return x

    def with_mask_appended(self, items: torch.Tensor) -> torch.Tensor:
        """Inference input (paper §3.6): the last max_len − 1 items of each left-padded row, then [MASK]."""
        items = items[:, -(self.config.max_len - 1):]
        mask = torch.full((items.shape[0], 1), self.mask_token, dtype=items.dtype, device=items.device)
        return torch.cat([items, mask], dim=1)

    def _with_ones(self, o: torch.Tensor) -> torch.Tensor:
        return torch.cat([o, torch.ones_like(o[:, :1])], dim=1)

    def encode(self, batch: SequenceBatch) -> torch.Tensor:
        """[o, 1] (B, d+1) at the appended [MASK]; its product with ``item_embeddings()`` is o·Eᵀ + b_O."""
        states = self.sequence_states(self.with_mask_appended(batch.items))
        return self._with_ones(self.head(states[:, -1]))

    def item_embeddings(self) -> torch.Tensor:
        """[E, b_O] for rows 0..V (V+1, d+1): the [MASK] row V+1 is left out, so it is never ranked."""
        return torch.cat([self.item_embedding.weight[: self.num_items + 1], self.output_bias[:, None]], dim=1)

    def loss(self, batch: SequenceBatch) -> torch.Tensor:
        """Mean cross-entropy over items 1..V at the masked positions (paper §3.6); item i is class i − 1."""
        supervised = batch.targets != 0
        o = self.head(self.sequence_states(batch.items)[supervised])
        table = self.item_embeddings()[1:]
        return linear_cross_entropy(self._with_ones(o), table, batch.targets[supervised] - 1, ignore_index=-1)

    def train_batches(self, users: np.ndarray, train: Jagged, batch_size: int) -> ClozeTrainBatches:
        c = self.config
        return ClozeTrainBatches(users, train, c.max_len, batch_size, self.mask_token, c.mask_prob,
                                 c.max_predictions, c.mask_last_prob, c.window_step, c.mask_last_prefix)

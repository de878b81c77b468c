"""GRU4Rec with full cross-entropy: Hidasi et al., "Session-based Recommendations with Recurrent Neural Networks"
(ICLR 2016), §3.1 (the GRU update, eq. 1-4), trained as in Hidasi & Karatzoglou, "Recurrent Neural Networks with
Top-k Gains for Session-based Recommendations" (CIKM 2018) but with the softmax over the whole catalogue ("full
cross-entropy", the loss every model here shares) instead of sampled negatives.

Input embedding → dropout → GRU (``num_layers``) → [Linear] → dropout; the state after each event is the query,
scored against the tied item table. ``output_projection`` adds the Linear map after the GRU (the "dense" layer of
RecBole's GRU4Rec): a GRU state lies in (−1, 1)^d, so without it the logits' scale and directions are bounded by
the tied table that also feeds the GRU (docs/results.md has the measurement).

Batches are left-padded and a GRU would read pads as inputs (its biases move the state even on a zero vector), so
each row is shifted to the right-padded layout and packed: the GRU sees only a row's real events, and pads never
change a score.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from recsys.intents import IntentContrast, IntentSettings
from recsys.losses import LossSettings, build_loss
from recsys.models.base import ModelConfig, SequentialModel, register
from recsys.nn import ItemEmbedding, zero_padding_rows


class GRU4RecConfig(IntentSettings, LossSettings, ModelConfig):
    hidden_size: int = 64
    num_layers: int = 1
    dropout: float = 0.2
    output_projection: bool = True


def left_to_right_index(padding: torch.Tensor) -> torch.Tensor:
    """For left-padded rows, the column holding each right-padded position (clamped for the pads at the end)."""
    width = padding.shape[1]
    shift = padding.sum(1, keepdim=True)  # number of leading pads
    return (torch.arange(width, device=padding.device) + shift).clamp(max=width - 1)


@register
class GRU4Rec(IntentContrast, SequentialModel):
    name = "gru4rec"
    Config = GRU4RecConfig

    def __init__(self, config: GRU4RecConfig, num_items: int):
        super().__init__(config, num_items)
        d = config.hidden_size
        self.item_embedding = ItemEmbedding(num_items, d)
        self.input_dropout = nn.Dropout(config.dropout)
        self.gru = nn.GRU(d, d, num_layers=config.num_layers, batch_first=True)
        self.output_dropout = nn.Dropout(config.dropout)
        self.projection = nn.Linear(d, d) if config.output_projection else nn.Identity()
        self.loss_fn = build_loss(config)
        self.setup_intents()
        nn.init.normal_(self.item_embedding.weight, std=0.02)
        zero_padding_rows(self)

    def sequence_states(self, batch):
        """The GRU state after every event, (B, T, d), left-padded like the batch (zeros at pads)."""
        items = batch.items
        padding = items == 0
        lengths = (~padding).sum(1)
        to_right = left_to_right_index(padding)
        x = self.input_dropout(self.item_embedding(items.gather(1, to_right)))
        packed = pack_padded_sequence(x, lengths.clamp(min=1).cpu(), batch_first=True, enforce_sorted=False)
        out, _ = self.gru(packed)
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=items.shape[1])
        # back to the left-padded layout: column j of a row with s leading pads is right-padded position j − s
        back = (torch.arange(items.shape[1], device=items.device) - padding.sum(1, keepdim=True)).clamp(min=0)
        states = out.gather(1, back[..., None].expand(-1, -1, out.shape[-1]))
        return self.output_dropout(self.projection(states).masked_fill(padding[..., None], 0.0))

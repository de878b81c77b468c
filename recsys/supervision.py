"""What a model learns from: which training batches it sees and which of their positions carry a loss.

A model holds one supervision object and never decides these itself:

- ``EveryPosition``: next-item targets at every position of a window at once (causal encoders: SASRec, GRU4Rec,
  Mamba4Rec, SLMRec); ``CausalTrainBatches``.
- ``LastPosition``: prefixes cut afresh every epoch, the loss on the last column only, for encoders that look
  ahead inside their input (SIGMA, TiM4Rec) and for TIGER; ``LastPositionTrainBatches``.
- ``Cloze``: BERT4Rec's masked-item training (Sun et al. 2019, §3.6); ``ClozeTrainBatches``, the loss at the
  masked positions.

``loss`` picks the supervised query states and hands them, their targets and the item table to the model's loss
object (``recsys.losses``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from pipelines.jagged import Jagged
from recsys.batching import CausalTrainBatches, ClozeTrainBatches, LastPositionTrainBatches, SequenceBatch


class Supervision:
    def batches(self, users: np.ndarray, train: Jagged, max_len: int, batch_size: int):
        """An object with ``epoch(rng)`` yielding SequenceBatches and ``__len__``."""
        raise NotImplementedError

    def positions(self, batch: SequenceBatch) -> torch.Tensor:
        """(B, T) bool: the positions whose state predicts ``batch.targets`` there."""
        return batch.targets != 0

    def loss(self, model, batch: SequenceBatch) -> torch.Tensor:
        """``model.loss_fn`` over the supervised positions of ``model.sequence_states(batch)``, each state passed
        through ``model.queries``, against ``model.item_embeddings()``."""
        return self.loss_at(model.loss_fn, model.sequence_states(batch), batch, model.item_embeddings(),
                            model.queries)

    def loss_at(self, loss_fn, states: torch.Tensor, batch: SequenceBatch, item_table: torch.Tensor,
                queries=None) -> torch.Tensor:
        """``loss_fn`` on per-position ``states`` (B, T, d) at the supervised positions (mapped by ``queries``
        when given). Losses that sample negatives also get the items of each supervised row's sequence, to keep
        negatives off it."""
        supervised = self.positions(batch)
        hidden = states[supervised[:, -states.shape[1]:]]  # a look-ahead model may return its last column only
        if queries is not None:
            hidden = queries(hidden)
        row_items = None
        if loss_fn.needs_row_items:
            rows = torch.nonzero(supervised)[:, 0]
            row_items = torch.cat([batch.items, batch.targets], dim=1)[rows]
        return loss_fn(hidden, batch.targets[supervised], item_table, row_items)


class EveryPosition(Supervision):
    def batches(self, users, train, max_len, batch_size):
        return CausalTrainBatches(users, train, max_len, batch_size)


@dataclass
class LastPosition(Supervision):
    """``fraction``: the share of all prefix cut points drawn each epoch."""

    fraction: float = 1.0

    def batches(self, users, train, max_len, batch_size):
        return LastPositionTrainBatches(users, train, max_len, batch_size, fraction=self.fraction)

    def positions(self, batch):
        # only the last column is ever supervised: earlier states have looked ahead at later items
        supervised = torch.zeros_like(batch.targets, dtype=torch.bool)
        supervised[:, -1] = batch.targets[:, -1] != 0
        return supervised


@dataclass
class Cloze(Supervision):
    """BERT4Rec's cloze task: ``ClozeTrainBatches``' windows with fresh masks every epoch (arguments as there)."""

    mask_token: int
    mask_prob: float
    max_predictions: int
    mask_last_prob: float
    window_step: float
    mask_last_prefix: bool

    def batches(self, users, train, max_len, batch_size):
        return ClozeTrainBatches(users, train, max_len, batch_size, self.mask_token, self.mask_prob,
                                 self.max_predictions, self.mask_last_prob, self.window_step, self.mask_last_prefix)

"""ICSRec: intent contrastive learning with cross subsequences, an auxiliary loss for causal encoders (Qin et al.,
"Intent Contrastive Learning with Cross Subsequences for Sequential Recommendation", WSDM 2024, §4; model-specs §12).

Every prefix of a training sequence is a subsequence whose intent shows in its next item (§4.1). For each training
row the state h₁ of its last prefix (already computed by the main loss) is paired with h₂, the state of another
training prefix, drawn at random, that is followed by the same item. Two contrastive terms are added to the
recommendation loss (§4.2-4.3, ``recsys.losses.IntentContrastiveLoss``):

- coarse grain (weight λ): InfoNCE between h₁ and h₂ against the batch's other states, where states whose prefixes
  share the target are masked rather than treated as negatives (false-negative mitigation, §4.4);
- fine grain (weight β): at the start of every epoch k-means (faiss, ``intents`` clusters, on rank 0) groups the
  states of all training prefixes; each state is pulled to its cluster centroid (InfoNCE against the batch's centroids,
  same-cluster pairs masked), for h₁ and h₂.

The authors' Beauty settings: λ 0.3, β 0.1, 256 intents, temperature 1, dot-product similarity.
"""

from __future__ import annotations

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from pipelines.jagged import Jagged
from recsys import distributed
from recsys.batching import CausalTrainBatches, SequenceBatch, pad_histories
from recsys.losses import IntentContrastiveLoss, training_target_counts


class IntentSettings(BaseModel):
    """ICSRec's fields of a causal encoder's config; both weights 0 (the default) is the plain encoder."""

    model_config = ConfigDict(extra="forbid")
    intent_coarse_weight: float = Field(0.0, ge=0)  # λ
    intent_fine_weight: float = Field(0.0, ge=0)  # β
    intents: int = Field(256, ge=2)
    intent_temperature: float = Field(1.0, gt=0)


class IntentContrast:
    """Mixed into a causal model (``class SASRec(..., IntentContrast, SequentialModel)``) whose config has
    ``IntentSettings``; it calls ``setup_intents()`` in its constructor."""

    def setup_intents(self) -> None:
        c = self.config
        on = c.intent_coarse_weight > 0 or c.intent_fine_weight > 0
        self.intent_loss = (IntentContrastiveLoss(c.intent_coarse_weight, c.intent_fine_weight,
                                                  c.intent_temperature) if on else None)
        self.intent_centroids: torch.Tensor | None = None  # recomputed every epoch, never saved
        if on and getattr(c, "reasoning_steps", 0):
            raise ValueError("ICSRec's intent losses and ReaRec's reasoning steps cannot be combined")

    def prepare_training(self, train: Jagged) -> None:
        super().prepare_training(train)
        if self.intent_loss is None:
            return
        self._train = train
        targets = np.flatnonzero(train.positions() > 0)  # every event but a row's first follows a prefix
        order = np.argsort(train.items[targets], kind="stable")
        self._occurrences = targets[order]  # those events' positions, grouped by item
        self._row_start = train.offsets[train.row_ids()]
        self._first = np.concatenate([[0], np.cumsum(training_target_counts(train, self.num_items))])

    def start_epoch(self, epoch: int) -> None:
        """The fine-grain intents: k-means over the states of every training prefix (rank 0's, broadcast)."""
        if self.intent_loss is None or not self.config.intent_fine_weight:
            return

        def fit() -> torch.Tensor:
            import faiss

            states = self._prefix_states()
            kmeans = faiss.Kmeans(states.shape[1], min(self.config.intents, len(states)), niter=20,
                                  seed=int(epoch), verbose=False)
            kmeans.train(states)
            return torch.from_numpy(kmeans.centroids.copy())

        self.intent_centroids = distributed.on_main(fit)  # rank 0 clusters; every rank gets its centroids

    @torch.no_grad()
    def _prefix_states(self) -> np.ndarray:
        was_training = self.training
        self.eval()
        users = np.arange(len(self._train.offsets) - 1)
        batches = CausalTrainBatches(users, self._train, self.config.max_len, 512)
        out = []
        for batch in batches.epoch(np.random.default_rng(0)):
            states = self.sequence_states(batch)
            out.append(self.queries(states[batch.targets != 0]).float().cpu().numpy())
        self.train(was_training)
        return np.ascontiguousarray(np.concatenate(out), dtype=np.float32)

    def partner_batch(self, targets: torch.Tensor) -> SequenceBatch:
        """For each target item, a random training prefix followed by it (its last ``max_len`` events)."""
        targets = targets.cpu().numpy()
        first, count = self._first[targets], self._first[targets + 1] - self._first[targets]
        pick = first + (torch.rand(len(targets)).numpy() * count).astype(np.int64)
        ends = self._occurrences[pick]
        starts = np.maximum(self._row_start[ends], ends - self.config.max_len)
        train = self._train
        return pad_histories([(train.items[s:e], train.times[s:e]) for s, e in zip(starts, ends)],
                             self.config.max_len)

    def loss(self, batch: SequenceBatch) -> torch.Tensor:
        if self.intent_loss is None:
            return super().loss(batch)
        states = self.sequence_states(batch)
        loss = self.supervision.loss_at(self.loss_fn, states, batch, self.item_embeddings(), self.queries)
        targets = batch.targets[:, -1]
        h1 = self.queries(states[:, -1])
        h2 = self.encode(self.partner_batch(targets).to(h1.device))
        return loss + self.intent_loss(h1, h2, targets, self.intent_centroids)

"""Most-popular baseline: every user gets the items ranked by their training-interaction count."""

from __future__ import annotations

import numpy as np
import torch

from recsys.models.base import SequentialModel, register


@register
class Popularity(SequentialModel):
    name = "pop"
    trainable = False

    def __init__(self, config, num_items: int):
        super().__init__(config, num_items)
        self.register_buffer("counts", torch.zeros(num_items + 1))

    def fit(self, users, train) -> None:
        counts = np.bincount(train.items, minlength=self.num_items + 1).astype(np.float32)
        counts[0] = 0.0
        self.counts.copy_(torch.from_numpy(counts))

    def encode(self, batch):
        return torch.ones(batch.items.shape[0], 1, device=self.counts.device)

    def item_embeddings(self):
        return self.counts[:, None]

"""ICSRec (recsys/intents.py, recsys.losses.IntentContrastiveLoss): partners with the same next item, the
per-epoch intents, the masked InfoNCE against a direct computation, and what it refuses."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipelines.jagged import Jagged
from recsys.losses import IntentContrastiveLoss, info_nce
from recsys.models import build_model

NUM_ITEMS = 20
TINY = {"hidden_size": 16, "max_len": 6, "intent_coarse_weight": 0.3, "intent_fine_weight": 0.1, "intents": 4}


def successor_rows(n=60, length=8):
    rng = np.random.default_rng(0)
    rows = [(np.arange(s, s + length) % NUM_ITEMS) + 1 for s in rng.integers(0, NUM_ITEMS, n)]
    return Jagged.from_lengths(np.full(n, length), np.concatenate(rows), np.tile(np.arange(length), n))


def test_info_nce_masks_same_label_negatives():
    torch.manual_seed(0)
    a, b, labels = torch.randn(4, 3), torch.randn(4, 3), torch.tensor([1, 2, 1, 3])
    z = torch.cat([a, b])
    losses = []
    for i in range(8):
        pair = (i + 4) % 8
        negatives = [j for j in range(8) if labels[j % 4] != labels[i % 4]]
        logits = torch.cat([(z[i] @ z[pair])[None], z[i] @ z[negatives].T]) / 0.5
        losses.append(-F.log_softmax(logits, 0)[0])
    torch.testing.assert_close(info_nce(a, b, labels, 0.5), torch.stack(losses).mean())


def test_partners_are_prefixes_followed_by_the_same_item():
    model = build_model("sasrec", NUM_ITEMS, TINY)
    train = successor_rows()
    model.prepare_training(train)
    targets = torch.tensor([5, 9, 9, 17])
    torch.manual_seed(0)
    partner = model.partner_batch(targets)
    assert partner.items.shape[1] <= TINY["max_len"]
    for row, target in zip(partner.items, targets):
        last = int(row[row > 0][-1])
        assert last % NUM_ITEMS + 1 == int(target)  # in this data item i is always followed by i + 1


@pytest.mark.parametrize("name", ["sasrec", "gru4rec", "mamba4rec"])
def test_intents_are_fitted_each_epoch_and_the_loss_adds_both_terms(name):
    torch.manual_seed(0)
    model = build_model(name, NUM_ITEMS, TINY)
    train = successor_rows()
    model.prepare_training(train)
    model.start_epoch(1)
    assert model.intent_centroids.shape == (4, 16)
    batch = next(iter(model.train_batches(np.arange(60), train, 16).epoch(np.random.default_rng(0))))
    torch.manual_seed(1)
    with_intents = model.loss(batch)
    plain = model.supervision.loss(model, batch)
    assert with_intents > plain  # the InfoNCE terms are positive
    with_intents.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_off_by_default_and_not_combined_with_reasoning():
    assert build_model("sasrec", NUM_ITEMS, {"hidden_size": 16}).intent_loss is None
    with pytest.raises(ValueError, match="cannot be combined"):
        build_model("sasrec", NUM_ITEMS, {**TINY, "reasoning_steps": 2})
    assert IntentContrastiveLoss(0.0, 0.0, 1.0)(torch.randn(3, 4), torch.randn(3, 4), torch.tensor([1, 2, 3])) == 0

"""Properties every trainable model of the registry must have: pads never change a score, the model-contract
shapes hold, and a few epochs on a trivially predictable pattern learn it (well above chance)."""

import numpy as np
import pytest
import torch

import recsys.models  # noqa: F401  (registers every built-in model)
from pipelines.jagged import Jagged
from recsys.batching import SequenceBatch
from recsys.models.base import MODELS, build_model

NUM_ITEMS = 20
TINY = {"hidden_size": 16, "max_len": 12}


def trainable_models():
    return sorted(name for name, cls in MODELS.items() if cls.trainable)


def batch_of(rows, width, times=None):
    items = torch.zeros(len(rows), width, dtype=torch.long)
    stamps = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        items[i, width - len(row):] = torch.tensor(row)
        stamps[i, width - len(row):] = torch.tensor(times[i] if times else [1000 * (j + 1) for j in range(len(row))])
    return SequenceBatch(items=items, times=stamps)


@pytest.mark.parametrize("name", trainable_models())
def test_padding_never_changes_a_score(name):
    torch.manual_seed(0)
    model = build_model(name, NUM_ITEMS, TINY).eval()
    rows = [[3, 4, 5, 6], [7, 8], [9]]
    with torch.no_grad():
        tight = model.encode(batch_of(rows, 4)) @ model.item_embeddings().T
        wide = model.encode(batch_of(rows, 12)) @ model.item_embeddings().T
        alone = model.encode(batch_of(rows[1:2], 2)) @ model.item_embeddings().T
    assert tight.shape == (3, NUM_ITEMS + 1)
    torch.testing.assert_close(wide, tight, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(alone[0], tight[1], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", trainable_models())
def test_learns_a_successor_pattern(name):
    """Item i is always followed by i+1 (cyclically): after a few epochs the next item is ranked first."""
    rng = np.random.default_rng(0)
    rows = [(np.arange(start, start + 8) % NUM_ITEMS) + 1 for start in rng.integers(0, NUM_ITEMS, 200)]
    train = Jagged.from_lengths(np.full(len(rows), 8), np.concatenate(rows), np.tile(np.arange(8) * 60, len(rows)))
    torch.manual_seed(0)
    model = build_model(name, NUM_ITEMS, {**TINY, "dropout": 0.0} if "dropout" in MODELS[name].Config.model_fields
                        else TINY)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    batches = model.train_batches(np.arange(len(rows)), train, 64)
    for epoch in range(12):
        model.train()
        for batch in batches.epoch(np.random.default_rng(epoch)):
            optimizer.zero_grad()
            model.loss(batch).backward()
            optimizer.step()
    model.eval()
    histories = [[(s + j) % NUM_ITEMS + 1 for j in range(5)] for s in range(NUM_ITEMS)]
    with torch.no_grad():
        scores = model.encode(batch_of(histories, 5)) @ model.item_embeddings().T
    scores[:, 0] = -torch.inf
    expected = torch.tensor([(s + 5) % NUM_ITEMS + 1 for s in range(NUM_ITEMS)])
    assert (scores.argmax(1) == expected).float().mean() >= 0.6  # chance: 0.05

"""BSARec (recsys/models/bsarec.py): the low-pass filter against an explicit real Fourier projection, the last-row
shortcut against the full block, the α mix, and prefix training that never sees its target."""

import numpy as np
import pytest
import torch

from recsys.batching import SequenceBatch
from recsys.models import build_model
from recsys.models.bsarec import BSARecBlock, low_pass
from tests.helpers import left_padded_batch

NUM_ITEMS = 30
TINY = {"hidden_size": 16, "max_len": 12, "num_layers": 2}


def fourier_projection(n: int, kept: int) -> np.ndarray:
    """Orthogonal projection onto span{1, cos(2πkt/n), sin(2πkt/n) : 1 ≤ k < kept} (kept < n/2), built directly."""
    t = np.arange(n)
    basis = [np.ones(n)] + [f(2 * np.pi * k * t / n) for k in range(1, kept) for f in (np.cos, np.sin)]
    q, _ = np.linalg.qr(np.stack(basis, axis=1))
    return q @ q.T


@pytest.mark.parametrize("n,c", [(12, 5), (50, 5), (50, 9)])
def test_low_pass_is_the_projection_on_the_first_frequencies(n, c):
    x = torch.randn(3, n, 4, dtype=torch.float64)
    expected = np.einsum("ts,bsd->btd", fourier_projection(n, c // 2 + 1), x.numpy())
    np.testing.assert_allclose(low_pass(x, c // 2 + 1).numpy(), expected, atol=1e-10)


def test_the_last_row_shortcut_gives_the_full_blocks_last_row():
    torch.manual_seed(0)
    block = BSARecBlock(16, 2, 0.5, 0.7, 5).eval()
    x = torch.randn(4, 12, 16)
    padding = torch.zeros(4, 12, dtype=torch.bool)
    padding[0, :7] = padding[1, :2] = True
    torch.testing.assert_close(block(x, padding, last_only=True), block(x, padding)[:, -1:], rtol=1e-5, atol=1e-6)


def test_alpha_weighs_the_filter_against_attention():
    torch.manual_seed(0)
    x = torch.randn(2, 12, 16)
    padding = torch.zeros(2, 12, dtype=torch.bool)
    outputs = {}
    for alpha in (0.0, 1.0):
        torch.manual_seed(1)
        block = BSARecBlock(16, 1, 0.0, alpha, 5).eval()
        outputs[alpha] = block(x, padding)
        with torch.no_grad():  # a different attention changes the output only when attention is mixed in
            block.attention.query.weight.mul_(3.0)
        changed = not torch.allclose(block(x, padding), outputs[alpha])
        assert changed == (alpha == 0.0)


def test_states_see_the_whole_window_so_training_is_on_prefixes_only():
    model = build_model("bsarec", NUM_ITEMS, TINY).eval()
    assert model.supervision.__class__.__name__ == "LastPosition"
    a, b = left_padded_batch([[3, 4, 5, 6]], 4), left_padded_batch([[3, 4, 5, 7]], 4)
    # the filter is not causal: the second position's state already depends on the last item
    x = {}
    for name, batch in (("a", a), ("b", b)):
        items = torch.nn.functional.pad(batch.items, (8, 0))
        h = model.embedding_dropout(model.embedding_norm(model.item_embedding(items)
                                                         + model.position_embedding.weight))
        x[name] = model.blocks[0](h, items == 0)
    assert not torch.allclose(x["a"][0, 9], x["b"][0, 9])
    batches = model.train_batches(np.arange(1), left_padded_jagged([[1, 2, 3, 4]]), 8)
    for batch in batches.epoch(np.random.default_rng(0)):
        assert (batch.targets[:, :-1] == 0).all()
        for row, target in zip(batch.items, batch.targets[:, -1]):
            assert target not in row.tolist()


def test_the_loss_is_cross_entropy_of_the_last_state_against_the_item_table():
    torch.manual_seed(0)
    model = build_model("bsarec", NUM_ITEMS, {**TINY, "dropout": 0.0})
    batch = left_padded_batch([[3, 4, 5], [7, 8]], 3)
    batch = SequenceBatch(batch.items, batch.times, torch.tensor([[0, 0, 6], [0, 0, 9]]))
    logits = model.encode(batch) @ model.item_embeddings()[1:].T
    expected = torch.nn.functional.cross_entropy(logits, torch.tensor([5, 8]))
    torch.testing.assert_close(model.loss(batch), expected, rtol=1e-5, atol=1e-6)


def left_padded_jagged(rows):
    from pipelines.jagged import Jagged

    return Jagged.from_lengths(np.array([len(r) for r in rows]), np.concatenate(rows),
                               np.zeros(sum(len(r) for r in rows), dtype=np.int64))

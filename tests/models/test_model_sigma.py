"""SIGMA (recsys/models/sigma.py): the per-sample Partially Flipped input on left-padded rows, the torch scan path
against the reference loop, left padding as an exact no-op, last-position-only training that never sees its
target, registration, and learning a trivially predictable pattern. rel_err = max|x − ref| / max|ref|."""

import numpy as np
import torch

import recsys.models.sigma  # noqa: F401  (registers "sigma")
from pipelines.jagged import Jagged
from recsys.batching import LastPositionTrainBatches
from recsys.losses import SequenceLoss
from recsys.models.base import MODELS, build_model
from recsys.models.sigma import SIGMA, GMambaBlock, partial_flip, partial_flip_index
from recsys.nn import MambaBlock
from tests.helpers import left_padded_batch

NUM_ITEMS = 20
TINY = {"hidden_size": 16, "max_len": 12, "d_state": 8, "flip_keep": 2}


def successor_data(num_rows=200, length=8):
    rng = np.random.default_rng(0)
    rows = [(np.arange(s, s + length) % NUM_ITEMS) + 1 for s in rng.integers(0, NUM_ITEMS, num_rows)]
    times = np.tile(np.arange(length) * 60, num_rows)
    return Jagged.from_lengths(np.full(num_rows, length), np.concatenate(rows), times)


def test_partial_flip_per_sample_on_left_padded_rows():
    # lengths 6, 3, 5, 1 in width 6 (left-padded); keep r = 2
    items = torch.tensor([[11, 12, 13, 14, 15, 16],
                          [0, 0, 0, 21, 22, 23],
                          [0, 31, 32, 33, 34, 35],
                          [0, 0, 0, 0, 0, 41]])
    pad_mask = items != 0
    flipped = partial_flip(items[..., None].float(), pad_mask, keep=2)[..., 0].long()
    assert flipped.tolist() == [[14, 13, 12, 11, 15, 16],  # first 4 reversed, last 2 kept
                                [0, 0, 0, 21, 22, 23],     # len 3: only 1 item to reverse
                                [0, 33, 32, 31, 34, 35],   # pads stay at the start
                                [0, 0, 0, 0, 0, 41]]       # len ≤ r: unchanged
    reversed_all = partial_flip(items[..., None].float(), pad_mask, keep=0)[..., 0].long()
    assert reversed_all[2].tolist() == [0, 35, 34, 33, 32, 31]
    # the reference code's whole-tensor [:L−r] flip agrees on a full row
    assert flipped[0].tolist() == items[0, :4].flip(0).tolist() + items[0, 4:].tolist()
    # more leading pads only shift the flipped row
    wide = torch.cat([torch.zeros(4, 3, dtype=torch.long), items], dim=1)
    assert partial_flip(wide[..., None], wide != 0, keep=2)[:, 3:, 0].tolist() == flipped.tolist()
    # a permutation of each row
    index = partial_flip_index(pad_mask, 2)
    assert torch.equal(index.sort(1).values, torch.arange(6).expand(4, 6))


def test_flip_keep_comes_from_the_config_and_the_mamba_is_shared():
    model = build_model("sigma", NUM_ITEMS, {"max_len": 50})
    block = model.layers[0].mixer
    assert isinstance(block, GMambaBlock) and block.flip_keep == 5
    assert sum(isinstance(m, MambaBlock) for m in model.modules()) == 1
    assert build_model("sigma", NUM_ITEMS, {"flip_keep": 7}).layers[0].mixer.flip_keep == 7
    assert torch.allclose(block.combining_weights, torch.tensor([0.1, 0.1, 0.8]))
def test_gate_variants_differ_only_in_the_sigmoid_term():
    torch.manual_seed(0)
    code = build_model("sigma", NUM_ITEMS, TINY).eval()
    symmetric = build_model("sigma", NUM_ITEMS, {**TINY, "gate_variant": "symmetric"}).eval()
    symmetric.load_state_dict(code.state_dict())
    batch = left_padded_batch([[3, 4, 5, 6, 7, 8]], 6)
    with torch.no_grad():
        assert not torch.allclose(code.encode(batch), symmetric.encode(batch))
        # with W₁ = W₂ the gates' inputs agree wherever the flipped stream equals the input (the last r items)
        for model in (code, symmetric):
            model.layers[0].mixer.dense2.load_state_dict(model.layers[0].mixer.dense1.state_dict())
        torch.testing.assert_close(code.encode(batch), symmetric.encode(batch))


def test_sigma_looks_ahead_so_it_trains_at_the_last_position_only():
    torch.manual_seed(0)
    model = build_model("sigma", NUM_ITEMS, TINY).eval()
    # an earlier column's state depends on later items (flip and non-causal conv): all-position training would leak
    with torch.no_grad():
        a = model.sequence_states(left_padded_batch([[3, 4, 5, 6, 7]], 5))
        b = model.sequence_states(left_padded_batch([[3, 4, 5, 6, 13]], 5))
    assert not torch.allclose(a[:, :4], b[:, :4])

    train = successor_data(num_rows=30)
    batches = model.train_batches(np.arange(30), train, 16)
    assert isinstance(batches, LastPositionTrainBatches) and batches.max_len == 12
    assert batches.num_targets() == 30 * 7
    seen = 0
    for batch in batches.epoch(np.random.default_rng(0)):
        assert torch.all(batch.targets[:, :-1] == 0) and torch.all(batch.targets[:, -1] != 0)
        assert torch.equal(batch.targets[:, -1], batch.items[:, -1] % NUM_ITEMS + 1)  # the next event, not an input
        seen += len(batch.targets)
    assert seen == 30 * 7

    # the loss reads one state per row, the last column's, and it does not depend on the target
    captured = []

    class Recorder(SequenceLoss):
        def __call__(self, hidden, targets, item_table, row_items=None):
            captured.append(hidden)
            return hidden.sum()

    model.loss_fn = Recorder()
    batch = next(iter(batches.epoch(np.random.default_rng(1))))
    model.loss(batch)
    batch.targets[:, -1] = batch.targets[:, -1] % NUM_ITEMS + 1
    model.loss(batch)
    assert captured[0].shape == (len(batch.items), TINY["hidden_size"])
    torch.testing.assert_close(captured[0], captured[1])
    torch.testing.assert_close(captured[0], model.encode(batch))


def test_registration_and_defaults():
    assert MODELS["sigma"] is SIGMA
    c = build_model("sigma", NUM_ITEMS).config
    assert (c.hidden_size, c.num_layers, c.d_state, c.d_conv, c.expand, c.dropout, c.max_len) == (
        64, 1, 32, 4, 2, 0.2, 50)
    assert (c.flip_keep, c.gate_variant, c.prefix_fraction, c.backend) == (5, "code", 1.0, "auto")
    batches = build_model("sigma", NUM_ITEMS, {"prefix_fraction": 0.5}).train_batches(
        np.arange(30), successor_data(num_rows=30), 16)
    assert batches.num_targets() == 105


"""SASRec behaviour that evaluation and serving rely on: padding never changes a score, and training learns."""

import numpy as np
import pytest
import torch

from recsys.batching import CausalTrainBatches, pad_histories
from recsys.models import build_model
from tests.helpers import toy_split


@pytest.mark.parametrize("loss", ["ce", "bce"])
def test_extra_left_padding_does_not_change_the_query_state(loss):
    torch.manual_seed(0)
    model = build_model("sasrec", 30, {"hidden_size": 16, "max_len": 12, "loss": loss}).eval()
    history = (np.array([3, 7, 9, 2], dtype=np.int32), np.arange(4, dtype=np.int64))
    short = pad_histories([history], max_len=12)
    # same user in a batch padded to width 10 by a longer neighbour
    longer = pad_histories([history, (np.arange(1, 11, dtype=np.int32), np.arange(10, dtype=np.int64))], max_len=12)
    with torch.no_grad():
        a = model.encode(short)[0]
        b = model.encode(longer)[0]
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_history_longer_than_max_len_keeps_the_most_recent_events():
    batch = pad_histories([(np.arange(1, 21, dtype=np.int32), np.arange(20, dtype=np.int64))], max_len=5)
    assert batch.items.tolist() == [[16, 17, 18, 19, 20]]


def test_causal_batches_train_every_position_without_future_leakage():
    split, _ = toy_split()
    batches = CausalTrainBatches(split.train_users, split.train, max_len=8, batch_size=16)
    rng = np.random.default_rng(0)
    total = 0
    for batch in batches.epoch(rng):
        valid = batch.targets != 0
        # each target is the item right after its input position
        assert torch.equal(batch.items[:, 1:][valid[:, :-1] & (batch.items[:, 1:] != 0)],
                           batch.targets[:, :-1][valid[:, :-1] & (batch.items[:, 1:] != 0)])
        assert torch.equal(batch.items == 0, batch.targets == 0)
        total += int(valid.sum())
    assert total == batches.num_targets()


def test_sasrec_learns_the_stride_pattern():
    from recsys.evaluation import evaluate
    from recsys.trainer import TrainConfig, Trainer

    split, num_items = toy_split(num_users=120)
    torch.manual_seed(0)
    model = build_model("sasrec", num_items, {"hidden_size": 16, "max_len": 10, "dropout": 0.1})
    before = evaluate(model, split.test, num_items, exclude_seen=False)
    config = TrainConfig(epochs=15, lr=5e-3, batch_size=32, lr_schedule="constant")
    Trainer(config, progress=False).fit(model, split, num_items, False)
    after = evaluate(model, split.test, num_items, exclude_seen=False)
    assert after["hr@1"] > 0.8 > before["hr@10"]


def test_long_sequences_are_cut_into_windows_so_every_event_is_a_target_once():
    from pipelines.jagged import Jagged

    seq = np.arange(1, 24, dtype=np.int32)  # 23 events -> 22 targets
    train = Jagged.from_lengths(np.array([23, 1, 3]), np.concatenate([seq, [5], [7, 8, 9]]).astype(np.int32),
                                np.arange(27, dtype=np.int64))
    batches = CausalTrainBatches(np.array([0, 1, 2], dtype=np.int32), train, max_len=5, batch_size=100)
    assert batches.num_targets() == 22 + 0 + 2
    [batch] = list(batches.epoch(np.random.default_rng(0)))
    targets = sorted(batch.targets[batch.targets != 0].tolist())
    assert targets == sorted(list(range(2, 24)) + [8, 9])
    assert batch.items.shape[1] == 5

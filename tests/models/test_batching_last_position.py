"""LastPositionTrainBatches: every prefix once per epoch at fraction 1, only the last column supervised."""

import numpy as np

from pipelines.jagged import Jagged
from recsys.batching import LastPositionTrainBatches


def make_train():
    lengths = np.array([1, 4, 7])
    items = np.arange(1, lengths.sum() + 1, dtype=np.int32)
    return Jagged.from_lengths(lengths, items, items.astype(np.int64) * 10)


def test_every_prefix_once_with_truncated_history():
    train = make_train()
    batches = LastPositionTrainBatches(np.array([5, 6, 7]), train, max_len=3, batch_size=4)
    assert batches.num_targets() == 3 + 6
    seen = []
    for b in batches.epoch(np.random.default_rng(0)):
        assert (b.targets[:, :-1] == 0).all() and (b.targets[:, -1] > 0).all()
        assert b.items.shape[1] <= 3
        for items, times, target, user in zip(b.items, b.times, b.targets[:, -1], b.user_idx):
            history = [int(x) for x in items if x]
            assert history == list(range(int(target) - len(history), int(target)))  # the events just before
            assert [int(t) for t in times if t] == [10 * x for x in history]
            assert int(user) == (6 if target <= 5 else 7)
            seen.append(int(target))
    assert sorted(seen) == [3, 4, 5, 7, 8, 9, 10, 11, 12]  # every event but each row's first, once
    assert len(batches) == 3


def test_fraction_samples_a_new_subset_each_epoch():
    batches = LastPositionTrainBatches(np.arange(3), make_train(), max_len=50, batch_size=2, fraction=0.5)
    draw = lambda seed: sorted(int(t) for b in batches.epoch(np.random.default_rng(seed)) for t in b.targets[:, -1])  # noqa: E731
    assert len(draw(0)) == 4 == batches.num_targets()
    assert draw(0) == draw(0) and any(draw(0) != draw(s) for s in range(1, 5))

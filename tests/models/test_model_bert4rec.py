"""BERT4Rec (model-specs §2): cloze batches mask only real items and supervise only masked positions, [MASK] is
never ranked nor a class, the dot-product contract reproduces the head's logits (bias included), pads never
change a score, and a short training learns a trivially predictable pattern."""


import numpy as np
import pytest
import torch
import torch.nn.functional as F

import recsys.models.bert4rec  # noqa: F401  (registers "bert4rec")
from pipelines.jagged import Jagged
from recsys.batching import ClozeTrainBatches, SequenceBatch, cloze_mask, pad_histories
from recsys.models.base import build_model, model_class
from recsys.models.bert4rec import BERT4Rec
from recsys.trainer import TrainConfig
from tests.helpers import left_padded_batch, toy_split

NUM_ITEMS = 20
TINY = {"hidden_size": 16, "max_len": 12}


def jagged(rows):
    lengths = np.array([len(r) for r in rows])
    items = np.concatenate([np.asarray(r, dtype=np.int32) for r in rows])
    return Jagged.from_lengths(lengths, items, np.arange(len(items), dtype=np.int64) * 60)


def test_registered_with_the_spec_defaults():
    assert model_class("bert4rec") is BERT4Rec
    c = BERT4Rec.Config()
    assert (c.max_len, c.hidden_size, c.num_blocks, c.num_heads, c.dropout) == (50, 64, 2, 2, 0.2)
    assert (c.mask_prob, c.max_predictions, c.window_step, c.init_std) == (0.6, 30, 0.1, 0.02)
    assert (c.mask_last_prob, c.mask_last_prefix) == (1.0, True)  # our measured change (reference: 0.1, False)
    with pytest.raises(ValueError):
        BERT4Rec.Config(mask_probability=0.2)  # extra=forbid: a typo is an error
    TrainConfig(**BERT4Rec.train_defaults)  # every default is a real TrainConfig field
    assert BERT4Rec.train_defaults["weight_decay"] == 0.1  # our measured change (reference: 0.01)


def test_long_histories_are_cut_into_reference_windows():
    # 30 items, max_len 10, step 0.2·10 = 2: windows start at 20, 18, ..., 2 and 0 (range(len − L, 0, −step) + [0])
    train = jagged([np.arange(1, 31), [5, 6, 7], [9]])
    batches = ClozeTrainBatches(np.array([7, 8, 9]), train, max_len=10, batch_size=4, mask_token=31,
                                mask_prob=0.5, max_predictions=5, mask_last_prob=0.0, window_step=0.2)
    starts = sorted(int(s) for s, e in zip(batches.starts, batches.ends) if e <= 30)
    assert starts == list(range(0, 21, 2))
    assert set((batches.ends - batches.starts)[:11].tolist()) == {10}
    assert batches.users.tolist() == [7] * 11 + [8, 9]
    assert batches.lengths[-2:].tolist() == [3, 1]


def test_cloze_batches_mask_only_items_and_supervise_only_masked_positions():
    rng = np.random.default_rng(0)
    rows = [rng.integers(1, NUM_ITEMS + 1, n) for n in rng.integers(3, 40, 60)]  # ≥ 3: mask-last is recognisable
    train = jagged(rows)
    mask = NUM_ITEMS + 1
    batches = ClozeTrainBatches(np.arange(60), train, max_len=12, batch_size=16, mask_token=mask, mask_prob=0.6,
                                max_predictions=5, mask_last_prob=0.2, window_step=0.25)
    windows = {(int(u), tuple(train.items[s:e].tolist()))
               for u, s, e in zip(batches.users, batches.starts, batches.ends)}
    seen, last_only = [], 0
    for batch in batches.epoch(np.random.default_rng(1)):
        assert batch.items.shape[1] <= 12
        masked = batch.items == mask
        assert torch.equal(masked, batch.targets != 0)  # supervised exactly where [MASK] was written
        assert not bool((batch.targets == mask).any()) and int(batch.targets.max()) <= NUM_ITEMS
        original = torch.where(masked, batch.targets, batch.items)
        pads = original == 0
        assert not bool((masked & pads).any())
        for user, row, hidden in zip(batch.user_idx, original, masked):
            real = row[row != 0]
            assert (int(user), tuple(real.tolist())) in windows  # unmasking restores a training window
            n = int(hidden.sum())
            if n == 1 and bool(hidden[-1]):
                last_only += 1
            else:
                assert n == min(5, max(1, int(np.floor(len(real) * 0.6 + 0.5))))
            seen.append(n)
    assert len(seen) == batches.num_instances() == len(batches.lengths) + round(0.2 * len(batches.lengths))
    assert last_only == round(0.2 * len(batches.lengths))
    assert len(batches) == -(-len(seen) // 16)


def test_mask_last_prefix_instances_end_at_every_cut_point_of_a_window():
    train = jagged([np.arange(1, 7), [9]])  # one 6-item window and one 1-item window
    mask = NUM_ITEMS + 1
    batches = ClozeTrainBatches(np.array([0, 1]), train, max_len=10, batch_size=4, mask_token=mask, mask_prob=0.5,
                                max_predictions=5, mask_last_prob=1.0, mask_last_prefix=True)
    cuts = set()
    for seed in range(40):
        for batch in batches.epoch(np.random.default_rng(seed)):
            for row, target, user in zip(batch.items, batch.targets, batch.user_idx):
                real = row[row != 0]
                if not (int(real[-1]) == mask and int((real == mask).sum()) == 1 and len(real) < 6):
                    continue  # a cloze instance (or a whole-window mask-last one, also a valid cut)
                original = torch.where(row == mask, target, row)
                original = original[original != 0].tolist()
                assert original == (list(range(1, len(original) + 1)) if int(user) == 0 else [9])
                cuts.add((int(user), len(original)))
    # prefixes of 2..5 items of the long window are all drawn; a 1-item window stays whole
    assert {c for u, c in cuts if u == 0} == {2, 3, 4, 5}
    assert (1, 1) in cuts


def test_masks_are_redrawn_each_epoch_and_reproducible_per_seed():
    items = np.zeros((50, 12), dtype=np.int64)
    lengths = np.random.default_rng(0).integers(1, 13, 50)
    for i, n in enumerate(lengths):
        items[i, 12 - n:] = np.arange(1, n + 1)
    last = np.zeros(50, dtype=bool)
    last[:5] = True
    a = cloze_mask(items, lengths, last, 0.6, 30, np.random.default_rng(3))
    b = cloze_mask(items, lengths, last, 0.6, 30, np.random.default_rng(3))
    c = cloze_mask(items, lengths, last, 0.6, 30, np.random.default_rng(4))
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert not (a & (items == 0)).any()
    assert (a[:5].sum(1) == 1).all() and a[:5, -1].all()


def test_item_table_leaves_out_mask_and_carries_the_output_bias():
    torch.manual_seed(0)
    model = build_model("bert4rec", NUM_ITEMS, TINY)
    table = model.item_embeddings()
    assert model.item_embedding.weight.shape == (NUM_ITEMS + 2, 16)  # pad, items, [MASK]
    assert table.shape == (NUM_ITEMS + 1, 17)
    torch.testing.assert_close(table[:, :16], model.item_embedding.weight[: NUM_ITEMS + 1])
    torch.testing.assert_close(table[:, 16], model.output_bias)
    query = model.eval().encode(left_padded_batch([[3, 4, 5]], 3))
    assert query.shape == (1, 17) and float(query[0, -1].detach()) == 1.0


def direct_logits(model, rows):
    """The head's logits over items 1..V at the [MASK] appended after each history, written out by hand."""
    width = min(max(len(r) for r in rows), model.config.max_len - 1) + 1
    items = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        row = list(row)[-(width - 1):] + [NUM_ITEMS + 1]
        items[i, width - len(row):] = torch.tensor(row)
    h = model.sequence_states(SequenceBatch(items, items))[:, -1]
    o = model.head[2](F.gelu(h @ model.head[0].weight.T + model.head[0].bias, approximate="tanh"))
    return o @ model.item_embedding.weight[1: NUM_ITEMS + 1].T + model.output_bias[1:]


def test_dot_product_contract_reproduces_the_logits_and_the_loss():
    torch.manual_seed(0)
    model = build_model("bert4rec", NUM_ITEMS, TINY).eval()
    with torch.no_grad():
        model.output_bias.normal_()  # a non-trivial per-item bias must reach the scores
    rows = [[3, 4, 5, 6], [7, 8], [9], list(range(1, 19))]  # the last is longer than max_len: truncated to 11
    with torch.no_grad():
        scores = model.encode(pad_histories([(np.array(r), np.array(r)) for r in rows], 12))
        scores = scores @ model.item_embeddings().T
        logits = direct_logits(model, rows)
    torch.testing.assert_close(scores[:, 1:], logits, rtol=1e-5, atol=1e-5)

    # the cloze loss is the mean CE over items 1..V ([MASK] is not a class) at the masked positions only
    items = torch.tensor([[0, 0, 3, 21, 5, 21], [7, 21, 9, 10, 11, 12]])
    targets = torch.tensor([[0, 0, 0, 4, 0, 6], [0, 8, 0, 0, 0, 0]])
    with torch.no_grad():
        loss = model.loss(SequenceBatch(items=items, times=items, targets=targets))
        h = model.sequence_states(SequenceBatch(items, items))[targets != 0]
        o = model.head(h)
        logits = o @ model.item_embedding.weight[1: NUM_ITEMS + 1].T + model.output_bias[1:]
        expected = F.cross_entropy(logits, targets[targets != 0] - 1)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)


def test_padding_never_changes_a_score():
    torch.manual_seed(0)
    model = build_model("bert4rec", NUM_ITEMS, TINY).eval()
    rows = [[3, 4, 5, 6], [7, 8], [9]]
    with torch.no_grad():
        tight = model.encode(left_padded_batch(rows, 4)) @ model.item_embeddings().T
        wide = model.encode(left_padded_batch(rows, 12)) @ model.item_embeddings().T
        alone = model.encode(left_padded_batch(rows[1:2], 2)) @ model.item_embeddings().T
    torch.testing.assert_close(wide, tight, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(alone[0], tight[1], rtol=1e-5, atol=1e-5)


def test_trains_through_the_platform_trainer():
    from recsys.evaluation import evaluate
    from recsys.trainer import Trainer

    split, num_items = toy_split(num_users=200)
    torch.manual_seed(0)
    model = build_model("bert4rec", num_items, {"hidden_size": 32, "max_len": 10, "dropout": 0.1})
    before = evaluate(model, split.test, num_items, exclude_seen=False)
    config = TrainConfig(**{**BERT4Rec.train_defaults, "epochs": 20, "lr": 5e-3, "batch_size": 32})
    result = Trainer(config, progress=False).fit(model, split, num_items, False)
    after = evaluate(model, split.test, num_items, exclude_seen=False)
    assert result.history[-1]["loss"] < result.history[0]["loss"]
    assert after["hr@10"] > 0.9 and after["hr@1"] > 0.4 > before["hr@10"]  # chance: hr@1 1/30, hr@10 1/3

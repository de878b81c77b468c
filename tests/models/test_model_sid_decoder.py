"""sid_decoder (decoder-only generative retrieval over semantic ids): beam search over a cached history against the
exact teacher-forced score, the trie's promise under random catalogues, causality of the one-pass loss, padding,
learning, new items without retraining, bundles, and the run path."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from recsys.batching import SequenceBatch
from recsys.bundle import load_bundle, save_bundle
from recsys.ranking import exclusions
from recsys.trainer import TrainConfig, Trainer
from tests.helpers import (fitted_tiny_generative, left_padded_batch, random_embeddings, successor_rows, toy_split,
                           trained_on)

NUM_ITEMS = 20
SUCCESSOR_HISTORIES = [[(s + j) % NUM_ITEMS + 1 for j in range(5)] for s in range(NUM_ITEMS)]
SUCCESSORS = torch.tensor([(s + 5) % NUM_ITEMS + 1 for s in range(NUM_ITEMS)])


def tiny(num_items=NUM_ITEMS, seed=0, **extra):
    return fitted_tiny_generative("sid_decoder", num_items, seed, **extra)


@pytest.fixture(scope="module")
def trained():
    """Item i is always followed by i+1 (cyclically)."""
    return trained_on(tiny(), successor_rows(NUM_ITEMS), epochs=60)


def teacher_forced_scores(model, history: list[int]) -> torch.Tensor:
    """Σ_d log p(c_d | history, c_<d) of every catalogue item, each item appended to the history and the whole
    stream run without any cache, each level's softmax over the trie's valid children."""
    trie = model.trie()
    out = torch.empty(model.num_items)
    with torch.no_grad():
        for item in range(1, model.num_items + 1):
            window = torch.tensor([history + [item]])
            states, _ = model.window(window, model.config.max_len)
            codes = model.codes[item]
            predicting = [states[0, -2, -1]] + [states[0, -1, d - 1] for d in range(1, len(model.sizes))]
            total = 0.0
            for d, state in enumerate(predicting):
                allowed = trie.allowed_next(codes[None, :d])[0]
                logits = model.heads[d](state).masked_fill(~allowed, -torch.inf)
                total += float(torch.log_softmax(logits, -1)[codes[d]])
            out[item - 1] = total
    return out


@pytest.mark.parametrize("history", [[3, 9, 1], [5], [2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 1, 3]])
def test_beam_search_over_the_cached_history_gives_the_exact_teacher_forced_scores(history):
    model = tiny(seed=3, num_layers=3).eval()
    items, scores = model.beam_search(left_padded_batch([history], 12), NUM_ITEMS, beam_width=NUM_ITEMS)
    exact = teacher_forced_scores(model, history)
    assert sorted(items[0].tolist()) == list(range(1, NUM_ITEMS + 1))  # a catalogue-wide beam finds every item
    torch.testing.assert_close(scores[0], exact[items[0] - 1], rtol=1e-4, atol=1e-4)
    assert (scores[0, 1:] <= scores[0, :-1] + 1e-6).all()


@settings(max_examples=25, deadline=None)
@given(num_items=st.integers(3, 40), seed=st.integers(0, 1000), k=st.integers(1, 40), beam=st.integers(1, 12),
       rows=st.lists(st.lists(st.integers(1, 40), min_size=1, max_size=14), min_size=1, max_size=3))
def test_every_returned_item_is_a_real_distinct_catalogue_item(num_items, seed, k, beam, rows):
    model = fitted_tiny_generative("sid_decoder", num_items, seed, codebook_size=3, collision_codes=40).eval()
    rows = [[(i - 1) % num_items + 1 for i in row] for row in rows]
    k = min(k, num_items)
    items, scores = model.beam_search(left_padded_batch(rows, 14), k, beam_width=beam)
    assert items.shape == (len(rows), k)
    assert ((items >= 1) & (items <= num_items)).all() and torch.isfinite(scores).all()
    assert all(len(set(row.tolist())) == k for row in items)
    listed = model.recommend(left_padded_batch(rows, 14), min(k, 3), exclude=exclusions([np.array(r) for r in rows]))
    real = listed.items[listed.items > 0]
    assert ((real >= 1) & (real <= num_items)).all()
    assert not any(set(row.tolist()) & set(r) for row, r in zip(listed.items, rows))


def test_the_one_pass_stream_is_causal():
    """A state never sees later items: two windows that share their first items share those items' states, so
    the loss on every next item of a window is the loss of each prefix."""
    model = tiny(seed=1).eval()
    a = torch.tensor([[0, 0, 4, 7, 1, 9, 2]])
    b = torch.tensor([[0, 0, 4, 7, 1, 15, 11]])
    with torch.no_grad():
        sa, _ = model.window(a, model.config.max_len)
        sb, _ = model.window(b, model.config.max_len)
    torch.testing.assert_close(sa[:, 2:5], sb[:, 2:5])
    assert not torch.allclose(sa[:, 5:], sb[:, 5:])


def test_the_loss_covers_the_codes_of_every_next_item_and_nothing_else():
    model = tiny(seed=2).eval()
    items = torch.tensor([[0, 0, 3, 4, 5], [6, 7, 8, 9, 10]])
    targets = torch.tensor([[0, 0, 4, 5, 6], [7, 8, 9, 10, 11]])
    seen = {}
    model.loss_fn = lambda logits, codes: seen.update(rows=len(codes), codes=codes) or logits[0].sum() * 0
    model.loss(SequenceBatch(items, torch.zeros_like(items), targets))
    assert seen["rows"] == 8 and torch.equal(seen["codes"], model.codes[torch.tensor([4, 5, 6, 7, 8, 9, 10, 11])])


def test_padding_never_changes_a_recommendation():
    model = tiny(seed=4).eval()
    rows = [[3, 4, 5, 6], [7, 8], [9]]
    tight = model.beam_search(left_padded_batch(rows, 4), 6, beam_width=NUM_ITEMS)
    wide = model.beam_search(left_padded_batch(rows, 12), 6, beam_width=NUM_ITEMS)
    assert torch.equal(tight[0], wide[0])
    torch.testing.assert_close(tight[1], wide[1], rtol=1e-4, atol=1e-4)


def test_learns_a_successor_pattern(trained):
    ranking = trained.recommend(left_padded_batch(SUCCESSOR_HISTORIES, 5), 10)
    assert ranking.items.shape == (NUM_ITEMS, 10)
    assert (ranking.items[:, 0] == SUCCESSORS).float().mean() >= 0.8  # chance: 0.05


def test_trainer_validates_every_epoch_and_it_beats_chance():
    split, num_items = toy_split(num_users=80, num_items=NUM_ITEMS, min_len=6)
    model = tiny(num_items)
    trainer = Trainer(TrainConfig(epochs=15, batch_size=8, lr=3e-3, eval_batch_size=32, patience=15), progress=False)
    result = trainer.fit(model, split, num_items, exclude_seen=False)
    assert result.history[-1]["loss"] < result.history[0]["loss"]
    assert result.history[result.best_epoch - 1]["valid"]["hr@10"] > 0.7  # chance: 0.5


def test_new_items_are_recommended_for_their_neighbours_histories_without_retraining(trained):
    model = tiny()
    model.load_state_dict(trained.state_dict())
    model.eval()
    twin = 7  # the new item's text embedding is item 7's, so it gets item 7's codes and a new collision code
    new_id = model.add_items_from_embeddings(random_embeddings(NUM_ITEMS)[twin - 1:twin])[0]
    assert new_id == NUM_ITEMS + 1 and torch.equal(model.codes[new_id, :3], model.codes[twin, :3])
    histories = [h for h, s in zip(SUCCESSOR_HISTORIES, SUCCESSORS) if s == twin]
    before = trained.recommend(left_padded_batch(histories, 5), 10).items
    after = model.recommend(left_padded_batch(histories, 5), 10).items
    assert not (before == new_id).any() and (after == new_id).any(1).all()


def test_bundle_round_trip_keeps_codes_and_recommendations(trained, tmp_path):
    items = pd.DataFrame({"item_idx": np.arange(1, NUM_ITEMS + 1), "item_id": [f"i{i}" for i in range(NUM_ITEMS)]})
    save_bundle(tmp_path / "b", trained, {}, items, {})
    loaded = load_bundle(tmp_path / "b").model
    assert torch.equal(loaded.codes, trained.codes) and bool(loaded.fitted)
    batch = left_padded_batch(SUCCESSOR_HISTORIES, 5)
    a, b = loaded.recommend(batch, 10), trained.recommend(batch, 10)
    assert torch.equal(a.items, b.items)
    torch.testing.assert_close(a.scores, b.scores)

"""TIGER (generative retrieval over semantic ids): constrained beam search, learning, evaluation through the one
``evaluate`` entry point, bundles, training through train_run, and placing new items without retraining."""

from __future__ import annotations

import os

import itertools
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from recsys.beam_search import PrefixTrie, constrained_beam_search
from recsys.bundle import load_bundle, save_bundle
from recsys.evaluation import evaluate, item_percentiles
from recsys.models import build_model
from recsys.models.base import GenerativeModel, ModelConfig
from recsys.ranking import exclusions
from recsys.trainer import TrainConfig, Trainer
from tests.helpers import (TINY_TIGER, fitted_tiny_tiger, left_padded_batch, random_embeddings, successor_rows,
                           toy_split, trained_on)

NUM_ITEMS = 20
TINY = TINY_TIGER


def tiny_tiger(num_items=NUM_ITEMS, **extra):
    return fitted_tiny_tiger(num_items, **extra)


@pytest.fixture(scope="module")
def trained_tiger():
    """Item i is always followed by i+1 (cyclically), as in test_models_common's successor test."""
    return trained_on(tiny_tiger(), successor_rows(NUM_ITEMS), epochs=12)


SUCCESSOR_HISTORIES = [[(s + j) % NUM_ITEMS + 1 for j in range(5)] for s in range(NUM_ITEMS)]
SUCCESSORS = torch.tensor([(s + 5) % NUM_ITEMS + 1 for s in range(NUM_ITEMS)])


# ------------------------------------------------------------------------------------------- beam search
@st.composite
def code_tables(draw):
    levels = draw(st.integers(1, 4))
    sizes = [draw(st.integers(1, 5)) for _ in range(levels)]
    space = list(itertools.product(*[range(s) for s in sizes]))
    chosen = draw(st.lists(st.sampled_from(space), min_size=1, max_size=min(len(space), 30), unique=True))
    return np.array(chosen, dtype=np.int64).reshape(len(chosen), levels), sizes


@settings(max_examples=60, deadline=None)
@given(table=code_tables(), batch=st.integers(1, 3), beam=st.integers(1, 12), seed=st.integers(0, 2**16))
def test_constrained_beam_search_yields_only_real_items_and_is_exact_with_a_wide_beam(table, batch, beam, seed):
    codes, sizes = table
    item_ids = torch.arange(1, len(codes) + 1) * 7  # any ids: the trie maps tuples to them
    trie = PrefixTrie(torch.from_numpy(codes), sizes, item_ids)
    gen = torch.Generator().manual_seed(seed)
    # logits depend on (row, level, prefix) through a fixed random table, so the search has something to rank
    tables = [torch.randn(batch, int(np.prod(sizes[:d])), sizes[d], generator=gen) * 3 for d in range(len(sizes))]

    def step_logits(prefix, rows):
        return tables[prefix.shape[1]][rows, trie.key(prefix)]

    items, scores = constrained_beam_search(step_logits, trie, batch, beam)
    assert items.shape == (batch, min(beam, len(codes)))
    assert torch.isin(items, item_ids).all() and torch.isfinite(scores).all()
    assert all(len(set(row.tolist())) == len(row) for row in items)
    assert (scores[:, 1:] <= scores[:, :-1] + 1e-6).all()
    # exhaustive reference: Σ_d log softmax over the valid children of each prefix
    exact = torch.zeros(batch, len(codes))
    for i, row in enumerate(codes):
        for d in range(len(sizes)):
            prefix = torch.from_numpy(row[None, :d])
            allowed = torch.zeros(sizes[d], dtype=torch.bool)
            allowed[np.unique(codes[(codes[:, :d] == row[:d]).all(1), d])] = True
            logits = tables[d][:, trie.key(prefix)[0]].masked_fill(~allowed, -torch.inf)
            exact[:, i] += torch.log_softmax(logits, -1)[:, row[d]]
    if beam >= len(codes):  # a beam as wide as the catalogue is an exhaustive search
        best = exact.sort(1, descending=True).values
        torch.testing.assert_close(scores, best, rtol=1e-5, atol=1e-5)
    else:  # every returned score is the item's true score
        lookup = {int(v): j for j, v in enumerate(item_ids)}
        for b in range(batch):
            true = exact[b, [lookup[int(v)] for v in items[b]]]
            torch.testing.assert_close(scores[b], true, rtol=1e-5, atol=1e-5)


def test_trie_refuses_duplicate_tuples_and_out_of_range_codes():
    with pytest.raises(ValueError, match="resolve collisions"):
        PrefixTrie(torch.tensor([[0, 1], [0, 1]]), [2, 2], torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="outside"):
        PrefixTrie(torch.tensor([[0, 2]]), [2, 2], torch.tensor([1]))


# ------------------------------------------------------------------------------------------- the model
def test_code_table_is_unique_and_offsets_separate_levels():
    model = tiny_tiger()
    codes = model.codes[1:]
    assert codes.shape == (NUM_ITEMS, 4) and len(torch.unique(codes, dim=0)) == NUM_ITEMS
    tokens = model.code_tokens(codes)
    for d in range(4):  # level d's tokens lie in its own block of the vocabulary
        lo = 2 + 4 * d
        assert ((tokens[:, d] >= lo) & (tokens[:, d] < lo + 4)).all()


def test_an_unfitted_model_and_a_too_large_k_are_clear_errors():
    model = build_model("tiger", NUM_ITEMS, TINY)
    with pytest.raises(RuntimeError, match="no semantic ids yet"):
        model.recommend(left_padded_batch([[1, 2]], 2), 5)
    model.fit_semantic_ids(random_embeddings(NUM_ITEMS))
    with pytest.raises(ValueError, match="k must be in"):
        model.beam_search(left_padded_batch([[1, 2]], 2), NUM_ITEMS + 1)
    with pytest.raises(ValueError, match="takes no searcher"):
        model.recommend(left_padded_batch([[1, 2]], 2), 5, searcher=object())
    with pytest.raises(ValueError, match="shape"):
        model.fit_semantic_ids(random_embeddings(NUM_ITEMS, dim=5))


def test_learns_a_successor_pattern(trained_tiger):
    ranking = trained_tiger.recommend(left_padded_batch(SUCCESSOR_HISTORIES, 5), 10)
    items, scores = ranking.items, ranking.scores
    assert items.shape == scores.shape == (NUM_ITEMS, 10)
    assert ((items >= 1) & (items <= NUM_ITEMS)).all()
    assert (items[:, 0] == SUCCESSORS).float().mean() >= 0.6  # chance: 0.05


@pytest.mark.parametrize("extra", [{}, {"user_tokens": 7}])
def test_padding_never_changes_a_recommendation(extra):
    model = tiny_tiger(**extra).eval()
    rows = [[3, 4, 5, 6], [7, 8], [9]]

    def run(rows, width):
        batch = left_padded_batch(rows, width)
        batch.user_idx = torch.arange(len(rows)) + 3
        return model.beam_search(batch, 6, beam_width=NUM_ITEMS)

    tight, wide = run(rows, 4), run(rows, 12)
    assert torch.equal(tight[0], wide[0])
    torch.testing.assert_close(tight[1], wide[1], rtol=1e-4, atol=1e-4)


class FixedListModel(GenerativeModel):
    """A generative stub: its search always finds items 1, 2, 3, … in that order (0 beyond ``shown``)."""

    name = "fixed-list"

    def __init__(self, num_items, shown=None):
        super().__init__(ModelConfig(), num_items)
        self.shown = shown or num_items
        self.asked: list[int] = []

    def beam_search(self, batch, n):
        self.asked.append(n)
        items = torch.arange(1, n + 1).expand(len(batch.items), n)
        return torch.where(items <= self.shown, items, 0), -items.float()


def test_a_generative_list_drops_excluded_items_and_ranks_the_target_by_its_place():
    model = FixedListModel(20, shown=5)
    batch = left_padded_batch([[7, 2], [4]], 2)
    ranking = model.recommend(batch, 4, exclude=exclusions([np.array([7, 2, 2]), np.array([4])]),
                              targets=torch.tensor([3, 4]))
    assert model.asked == [6]  # k + the longest distinct exclusion list
    # item 2 leaves the first list, so 3 moves up; a target that was excluded counts as a miss; 0 fills short lists
    assert ranking.items.tolist() == [[1, 3, 4, 5], [1, 2, 3, 5]]
    assert ranking.target_ranks.tolist() == [2, np.inf]
    short = model.recommend(batch, 7, targets=torch.tensor([6, 1]))
    assert short.items[0].tolist() == [1, 2, 3, 4, 5, 0, 0] and torch.isneginf(short.scores[0, 5:]).all()
    assert short.target_ranks.tolist() == [np.inf, 1]


def test_evaluate_accepts_a_generative_model_through_the_same_entry_point():
    split, num_items = toy_split(num_users=30, num_items=60)
    stub = FixedListModel(num_items)
    result = evaluate(stub, split.test, num_items, exclude_seen=False, ks=(1, 5, 10))
    targets = split.test.target
    ranks = np.where(targets <= 10, targets, np.inf)
    assert result["hr@10"] == pytest.approx(np.mean(ranks <= 10))
    assert result["ndcg@10"] == pytest.approx(np.mean(np.where(ranks <= 10, 1 / np.log2(ranks + 1), 0)))
    assert result["coverage@5"] == pytest.approx(5 / num_items) and result["num_users"] == 30
    seen = evaluate(stub, split.test, num_items, exclude_seen=True, ks=(1, 5, 10))
    assert seen["exclude_seen"] and max(stub.asked) > 10  # asked for k + history length
    assert seen["coverage@10"] >= result["coverage@10"]


def test_trainer_validates_tiger_every_epoch_and_it_beats_chance():
    split, num_items = toy_split(num_users=80, num_items=NUM_ITEMS, min_len=6)
    model = tiny_tiger(NUM_ITEMS)
    trainer = Trainer(TrainConfig(epochs=6, batch_size=64, lr=3e-3, eval_batch_size=32, patience=10),
                      progress=False)
    result = trainer.fit(model, split, num_items, exclude_seen=False)
    assert len(result.history) == 6
    assert result.history[-1]["loss"] < result.history[0]["loss"]
    assert result.history[result.best_epoch - 1]["valid"]["hr@10"] > 0.7  # chance: 0.5


def test_bundle_round_trip_keeps_codes_quantiser_and_recommendations(trained_tiger, tmp_path):
    items = pd.DataFrame({"item_idx": np.arange(1, NUM_ITEMS + 1), "item_id": [f"i{i}" for i in range(NUM_ITEMS)]})
    save_bundle(tmp_path / "b", trained_tiger, {}, items, {})
    loaded = load_bundle(tmp_path / "b").model
    assert torch.equal(loaded.codes, trained_tiger.codes) and bool(loaded.fitted)
    assert torch.equal(loaded.quantiser.centroids, trained_tiger.quantiser.centroids)
    batch = left_padded_batch(SUCCESSOR_HISTORIES, 5)
    a, b = loaded.recommend(batch, 10), trained_tiger.recommend(batch, 10)
    assert torch.equal(a.items, b.items)
    torch.testing.assert_close(a.scores, b.scores)


def test_rqvae_ids_round_trip_and_place_new_items():
    model = build_model("tiger", 40, {**TINY, "semantic_ids": "rqvae", "rqvae_hidden": (16,), "rqvae_latent": 4,
                                      "collision_codes": 16,
                                      "rqvae_epochs": 5, "rqvae_batch_size": 16, "rqvae_optimizer": "adam",
                                      "rqvae_lr": 1e-2})
    emb = random_embeddings(40)
    stats = model.fit_semantic_ids(emb)
    assert "rqvae_final_loss" in stats and stats["items"] == 40
    again = build_model("tiger", 40, model.config)
    again.load_state_dict(model.state_dict())
    np.testing.assert_array_equal(again.quantise(emb), model.codes[1:, :3].numpy())
    new = again.add_items_from_embeddings(emb[:2])  # same embeddings: same codes, next collision code
    assert new.tolist() == [41, 42]
    assert torch.equal(again.codes[41:, :3], again.codes[1:3, :3]) and (again.codes[41:, 3] >= 1).all()


def test_new_items_are_placed_beside_their_twins_and_recommended_without_retraining(trained_tiger):
    model = tiny_tiger()
    model.load_state_dict(trained_tiger.state_dict())
    model.eval()
    emb = random_embeddings(NUM_ITEMS)
    twin = 7  # the new item's text embedding equals item 7's, so it gets item 7's codes and a new collision code
    new_id = model.add_items_from_embeddings(emb[twin - 1:twin])[0]
    assert new_id == NUM_ITEMS + 1 and model.num_items == NUM_ITEMS + 1
    assert torch.equal(model.codes[new_id, :3], model.codes[twin, :3])
    assert int(model.codes[new_id, 3]) not in model.codes[1:NUM_ITEMS + 1][
        (model.codes[1:NUM_ITEMS + 1, :3] == model.codes[twin, :3]).all(1), 3].tolist()
    # histories whose learned successor is item 7 now also get the new item (it shares 7's first three codes)
    histories = [h for h, s in zip(SUCCESSOR_HISTORIES, SUCCESSORS) if s == twin]
    before = trained_tiger.recommend(left_padded_batch(histories, 5), 10).items
    after = model.recommend(left_padded_batch(histories, 5), 10).items
    assert not (before == new_id).any() and (after == new_id).any(1).all()
    assert len(model.trie()) == NUM_ITEMS + 1


def test_prepare_encodes_item_text_with_minilm_and_add_items_takes_text(tmp_path):
    titles = ["red lipstick", "pink lip gloss", "nail polish remover", "shampoo for dry hair", "hair conditioner",
              "sunscreen spf 50", "face moisturiser", "eye liner black", "mascara", "perfume"] * 2
    items = pd.DataFrame({"item_idx": np.arange(1, 21), "item_id": [f"i{i}" for i in range(20)],
                          "title": [f"{t} {i}" for i, t in enumerate(titles)], "brand": ["Acme"] * 20,
                          "categories": ["Beauty"] * 20, "price": [5.0] * 20})
    items.loc[3, ["title", "brand", "categories"]] = ""  # an item with hardly any text still gets an id
    dataset = SimpleNamespace(items=items, path=tmp_path, content_hash="abc")
    model = build_model("tiger", 20, {**TINY, "text_dim": 384})
    model.prepare(dataset)
    assert bool(model.fitted) and len(torch.unique(model.codes[1:], dim=0)) == 20
    assert list((tmp_path / ".cache").glob("text-emb-*.npy"))  # cached beside the dataset
    new = model.add_items(["red lipstick 0"])
    assert new.tolist() == [21] and torch.equal(model.codes[21, :3], model.codes[1, :3])
    with pytest.raises(ValueError, match="text_dim"):
        build_model("tiger", 20, {**TINY, "text_dim": 8}).prepare(dataset)


def test_train_run_prepares_trains_and_bundles_tiger(tmp_path, capsys):
    """The run path end to end: build_model → prepare (MiniLM over the synthetic catalogue's text) → trainer →
    evaluate → bundle, whose reloaded model gives the recorded test metrics."""
    from recsys.cli import main
    from recsys.run import train_run

    assert main(["data", "build", "--dataset", "synthetic", "--set", "num_users=150", "--set", "num_items=60"]) == 0
    path = capsys.readouterr().out.strip()
    tiny = {k: v for k, v in TINY.items() if k != "text_dim"}
    result = train_run("tiger", path, epochs=1, out_dir=tmp_path / "bundle", progress=False,
                       overrides={**tiny, "collision_codes": 60, "batch_size": 64})
    assert 0 <= result.metrics["test"]["hr@10"] <= 1 and result.metrics["epochs"] == 1
    # the semantic ids' statistics reach metrics.json and the MLflow run
    stats = result.metrics["semantic_ids"]
    assert 0 < stats["level0_perplexity"] <= TINY["codebook_size"] and 0 <= stats["collision_rate"] < 1
    from mlflow import MlflowClient

    logged = MlflowClient(os.environ["MLFLOW_TRACKING_URI"]).get_run(result.run_id).data.metrics
    assert logged["semantic_ids_level0_perplexity"] == pytest.approx(stats["level0_perplexity"])
    assert logged["semantic_ids_collision_rate"] == pytest.approx(stats["collision_rate"])
    bundle = load_bundle(result.bundle_dir)
    assert bool(bundle.model.fitted) and len(torch.unique(bundle.model.codes[1:], dim=0)) == 60
    from pipelines.dataset import load_dataset

    split = load_dataset(path).split()
    again = evaluate(bundle.model, split.test, bundle.model.num_items, result.metrics["exclude_seen"],
                     item_percentile=item_percentiles(split.train, bundle.model.num_items))
    assert again == result.metrics["test"]


def test_beams_decoded_side_by_side_equal_each_beam_decoded_alone():
    """Beam search packs a query's beams into one decoder row under a block-diagonal mask and reuses the
    cross-attention keys/values from level to level; the states must be those of decoding each beam alone."""
    from transformers.cache_utils import DynamicCache, EncoderDecoderCache

    model = fitted_tiny_tiger(40, num_decoder_layers=2).eval()
    rows = [[3, 9, 27], [1, 2, 3, 4, 5, 6, 7], [40], [12, 12, 5, 8], [30, 20, 10, 39, 2]]
    with torch.no_grad():
        tokens, mask = model.encoder_inputs(left_padded_batch(rows, 7))
        encoded = model.encoder(input_ids=tokens, attention_mask=mask).last_hidden_state
        cross = DynamicCache()
        for t in (1, 3, 4):  # levels: the cross-attention cache is filled at the first and reused after
            decoder_in = torch.randint(2, 10, (5, 3, t), generator=torch.Generator().manual_seed(t))
            alone = torch.stack([model.decode(decoder_in[:, w], encoded, mask) for w in range(3)], 1)
            packed = model.decode_beams(decoder_in, encoded, mask, EncoderDecoderCache(DynamicCache(), cross))
            torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-5)
        assert len(cross) == 2 and cross.get_seq_length(0) == tokens.shape[1]

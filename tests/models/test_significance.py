"""Paired bootstrap (recsys/significance.py), per-user ranks and popularity percentiles (recsys/evaluation.py)."""

import numpy as np
import pytest

from pipelines.jagged import Jagged
from recsys.evaluation import evaluate_users, item_percentiles, metrics_from_ranks
from recsys.models import build_model
from recsys.significance import paired_bootstrap, per_user_metric
from tests.helpers import toy_split


def test_per_user_metrics_from_ranks():
    ranks = np.array([1, 3, np.inf, 11])
    np.testing.assert_allclose(per_user_metric(ranks, "ndcg@10"), [1, 0.5, 0, 0])
    np.testing.assert_array_equal(per_user_metric(ranks, "hr@10"), [1, 1, 0, 0])
    with pytest.raises(ValueError, match="ndcg@K or hr@K"):
        per_user_metric(ranks, "mrr@10")


def test_no_difference_has_p_one_and_a_clear_difference_the_floor():
    rng = np.random.default_rng(0)
    a = rng.random(500)
    same = paired_bootstrap(a, a.copy(), resamples=2000)
    assert same.mean == 0 and same.p_value == 1.0
    better = paired_bootstrap(a + 0.2 + 0.01 * rng.standard_normal(500), a, resamples=2000)
    assert better.p_value == 1 / 2000 and better.low > 0.19 and better.high < 0.21


def test_interval_and_p_match_the_normal_approximation():
    rng = np.random.default_rng(1)
    b = rng.random(2000)
    a = b + rng.normal(0.05, 1.0, 2000)
    result = paired_bootstrap(a, b, resamples=10_000)
    d = a - b
    se = d.std(ddof=1) / np.sqrt(len(d))
    assert result.low == pytest.approx(d.mean() - 1.96 * se, abs=0.15 * se)
    assert result.high == pytest.approx(d.mean() + 1.96 * se, abs=0.15 * se)
    from math import erfc, sqrt

    assert result.p_value == pytest.approx(erfc(abs(d.mean()) / se / sqrt(2)), abs=0.02)


def test_unpaired_inputs_are_refused():
    with pytest.raises(ValueError, match="equal non-empty"):
        paired_bootstrap(np.zeros(3), np.zeros(4))


def test_item_percentiles_rank_items_by_training_popularity_ties_at_mid_rank():
    train = Jagged.from_lengths(np.array([4, 3]), np.array([1, 1, 2, 3, 1, 2, 4]), np.zeros(7, dtype=np.int64))
    pct = item_percentiles(train, 5)  # counts: 1→3, 2→2, 3→1, 4→1, 5→0
    np.testing.assert_allclose(pct, [0, 90, 70, 40, 40, 10])


def test_user_ranks_are_in_row_order_and_give_the_summary():
    split, num_items = toy_split(num_users=40, num_items=25)
    model = build_model("sasrec", num_items, {"hidden_size": 8, "max_len": 10}).eval()
    pct = item_percentiles(split.train, num_items)
    summary, users = evaluate_users(model, split.test, num_items, True, ks=(1, 5, 10), batch_size=7,
                                    item_percentile=pct)
    np.testing.assert_array_equal(users.user_idx, split.test.user_idx)
    for name, value in metrics_from_ranks(users.ranks, ks=(1, 5, 10)).items():
        assert summary[name] == pytest.approx(value)
    one = split.test.take(np.array([5]))  # user 5 alone gets the rank it got among all
    assert evaluate_users(model, one, num_items, True, ks=(1, 5, 10))[1].ranks[0] == users.ranks[5]
    assert 0 < summary["popularity_percentile@10"] < 100


def test_each_row_is_compared_with_the_best_row_sasrec_and_its_own_backbone():
    from recsys.report import references_by_row

    rows = ["pop", "sasrec", "esasrec", "bsarec", "bsarec-text"]
    refs = references_by_row(rows, "bsarec-text", {"esasrec": "sasrec", "bsarec-text": "bsarec"})
    assert refs == {"pop": ["bsarec-text", "sasrec"], "sasrec": ["bsarec-text"], "esasrec": ["bsarec-text", "sasrec"],
                    "bsarec": ["bsarec-text", "sasrec"], "bsarec-text": ["sasrec", "bsarec"]}
    # a backbone that is not listed is no reference; the best row has no reference to itself
    assert references_by_row(["sasrec", "icsrec"], "icsrec", {"icsrec": "gru4rec"}) == {"sasrec": ["icsrec"],
                                                                                          "icsrec": ["sasrec"]}

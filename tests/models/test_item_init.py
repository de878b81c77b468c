"""Item tables initialised from item text or training co-occurrences (recsys/item_init.py): the PCA projection
itself, the scale of the model's own initialisation, similar texts and items that follow each other starting as
neighbours, the co-occurrences seeing the training split only, and the default leaving a model untouched."""

from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

from pipelines.jagged import Jagged
from pipelines.splits import leave_one_out_split
from recsys.models import build_model
from recsys.item_init import principal_components

KINDS = ["red lipstick", "matte lipstick", "shampoo for dry hair", "anti-dandruff shampoo", "sunscreen spf 50"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    titles = [f"{KINDS[i % 5]} shade {i}" for i in range(20)]
    items = pd.DataFrame({"item_idx": np.arange(1, 21), "item_id": [f"i{i}" for i in range(20)], "title": titles,
                          "brand": ["Acme"] * 20, "categories": ["Beauty"] * 20, "price": [5.0] * 20})
    return SimpleNamespace(items=items, path=tmp_path_factory.mktemp("ds"), content_hash="abc")


def test_projections_are_the_principal_components():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 3)) @ rng.normal(size=(3, 8)) + 5.0  # rank 3 after centring
    z, kept = principal_components(x, 3)
    assert kept == pytest.approx(1.0)
    centred = x - x.mean(0)
    # a rank-d cloud keeps every inner product (so every distance), and the components are uncorrelated
    np.testing.assert_allclose((z @ z.T).numpy(), centred @ centred.T, atol=1e-8)
    cov = (z.T @ z).numpy()
    np.testing.assert_allclose(cov - np.diag(np.diag(cov)), 0, atol=1e-8)
    assert 0 < principal_components(x, 2)[1] < 1
    with pytest.raises(ValueError, match="hidden size"):
        principal_components(x, 9)


@pytest.mark.parametrize("name", ["bsarec", "sasrec"])
def test_text_init_replaces_the_item_rows_at_the_models_own_scale(name, dataset):
    torch.manual_seed(0)
    random = build_model(name, 20, {"hidden_size": 16, "max_len": 8}).item_embedding.weight.detach().clone()
    torch.manual_seed(0)
    model = build_model(name, 20, {"hidden_size": 16, "max_len": 8, "item_init": "text"})
    figures = model.prepare(dataset)
    table = model.item_embedding.weight.detach()
    assert 0 < figures["item_init"]["text_variance_kept"] <= 1
    assert torch.equal(table[0], random[0])  # padding row untouched
    assert float(table[1:].std()) == pytest.approx(float(random[1:].std()), rel=1e-4)
    unit = torch.nn.functional.normalize(table[1:], dim=1)
    similarity = unit @ unit.T
    same_kind = torch.tensor([[i % 5 == j % 5 for j in range(20)] for i in range(20)]) & ~torch.eye(20, dtype=bool)
    assert similarity[same_kind].mean() > similarity[~same_kind & ~torch.eye(20, dtype=bool)].mean() + 0.3


def test_random_init_is_the_model_unchanged(dataset):
    torch.manual_seed(0)
    model = build_model("bsarec", 20, {"hidden_size": 16, "max_len": 8})
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert model.prepare(dataset) == {}
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def sequences_dataset(tails: list[list[int]]):
    """40 users walking inside one of two item groups (1-10 or 11-20; item 21 never appears), each sequence
    ending with the two items of ``tails`` (the validation and test targets under leave-one-out)."""
    rng = np.random.default_rng(0)
    rows = []
    for u, tail in enumerate(tails):
        group = 1 + 10 * (u % 2)
        rows.append([*(group + rng.permutation(10)[:6]), *tail])
    lengths = np.array([len(r) for r in rows])
    seqs = Jagged.from_lengths(lengths, np.concatenate(rows), np.arange(lengths.sum()))
    return SimpleNamespace(split=lambda: leave_one_out_split(np.arange(len(rows), dtype=np.int32), seqs))


def cooccurrence_table(dataset) -> tuple[torch.Tensor, torch.Tensor, dict]:
    torch.manual_seed(0)
    random = build_model("sasrec", 21, {"hidden_size": 8, "max_len": 8}).item_embedding.weight.detach().clone()
    torch.manual_seed(0)
    model = build_model("sasrec", 21, {"hidden_size": 8, "max_len": 8, "item_init": "cooccurrence"})
    figures = model.prepare(dataset)
    return model.item_embedding.weight.detach(), random, figures


def test_cooccurrence_init_starts_items_that_follow_each_other_as_neighbours():
    table, random, figures = cooccurrence_table(sequences_dataset([[1, 2], [11, 12]] * 20))
    assert figures["item_init"]["items_with_cooccurrences"] == pytest.approx(20 / 21)
    assert torch.equal(table[0], random[0]) and torch.equal(table[21], random[21])  # padding; never-seen item
    assert float(table[1:21].std()) == pytest.approx(float(random[1:].std()), rel=1e-4)  # the drawn table's
    unit = torch.nn.functional.normalize(table[1:21], dim=1)
    group = torch.arange(20) // 10
    same = (group[:, None] == group[None, :]) & ~torch.eye(20, dtype=bool)
    assert (unit @ unit.T)[same].mean() > (unit @ unit.T)[group[:, None] != group[None, :]].mean() + 0.3


def test_cooccurrence_init_never_sees_validation_or_test_targets():
    """The held-out targets (each user's last two items) differ completely between the two datasets; the
    initial tables are identical because only the training split is counted."""
    a, _, _ = cooccurrence_table(sequences_dataset([[1, 2], [11, 12]] * 20))
    b, _, _ = cooccurrence_table(sequences_dataset([[12, 21], [3, 21]] * 20))
    assert torch.equal(a, b)

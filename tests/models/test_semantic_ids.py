"""Semantic-id quantisers, collision codes and their statistics (recsys.semantic_ids)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from recsys.semantic_ids import (RQVAE, code_statistics, fit_rqvae, resolve_collisions, residual_assign,
                                 residual_kmeans)


def clustered_points(n=400, dim=16, clusters=12, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, dim)) * 3
    return (centres[rng.integers(0, clusters, n)] + rng.normal(size=(n, dim))).astype(np.float32)


def test_residual_kmeans_codes_and_shrinking_residuals():
    x = clustered_points()
    codes, centroids = residual_kmeans(x, levels=3, codebook_size=8, niter=10)
    assert codes.shape == (400, 3) and codes.dtype == np.int64 and centroids.shape == (3, 8, 16)
    assert codes.min() >= 0 and codes.max() < 8
    # each level explains part of what the previous left: the residual's energy falls level by level
    residual, energies = x.copy(), [float((x ** 2).sum())]
    for d in range(3):
        residual = residual - centroids[d][codes[:, d]]
        energies.append(float((residual ** 2).sum()))
    assert energies[0] > energies[1] > energies[2] > energies[3]
    # assigning with the stored centroids (what new items use) reproduces the fitted codes
    again, _ = residual_assign(torch.from_numpy(x), torch.from_numpy(centroids))
    assert (again.numpy() == codes).mean() > 0.99  # float ties aside


def test_too_few_items_for_the_codebook_is_a_clear_error():
    with pytest.raises(ValueError, match="cannot fill a codebook"):
        residual_kmeans(np.zeros((5, 4), dtype=np.float32), codebook_size=8)
    with pytest.raises(ValueError, match="NaN"):
        residual_kmeans(np.full((10, 4), np.nan, dtype=np.float32), codebook_size=2)


def test_rqvae_learns_and_uses_its_codebooks():
    x = clustered_points()
    fit = fit_rqvae(x, levels=3, codebook_size=8, hidden=(32, 16), latent_dim=8, epochs=40, batch_size=128,
                    lr=3e-3, optimizer="adam", seed=0)
    assert fit.codes.shape == (400, 3) and fit.codes.min() >= 0 and fit.codes.max() < 8
    assert fit.losses[-1] < 0.5 * fit.losses[0]
    stats = code_statistics(fit.codes, 8)
    assert stats["level0_usage"] >= 0.75  # k-means init + re-seeding keep most codes alive
    np.testing.assert_array_equal(fit.model.codes(torch.from_numpy(x)).numpy(), fit.codes)


def test_rqvae_defaults_train_stably_on_unit_norm_text_embeddings():
    # the shape of the real case (384-d L2-normalised MiniLM vectors, the default 512/256/128 → 32 MLP, 3 × 256
    # codes); the paper's Adagrad at lr 0.4 diverges here (loss ~1e11, 1,906 of 2,048 items on one tuple)
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(64, 384))
    x = centres[rng.integers(0, 64, 2048)] + 0.5 * rng.normal(size=(2048, 384))
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    fit = fit_rqvae(x, epochs=3)
    assert max(fit.losses) < 2 and fit.losses[-1] < fit.losses[0]
    assert code_statistics(fit.codes, 256)["max_collision_group"] < 0.1 * len(x)


def test_rqvae_straight_through_reaches_the_encoder_and_dead_codes_are_reseeded():
    torch.manual_seed(0)
    model = RQVAE(6, hidden=(8,), latent_dim=4, levels=2, codebook_size=4)
    x = torch.randn(32, 6)
    loss, codes = model.loss(x)
    loss.backward()
    assert model.encoder[0].weight.grad.abs().sum() > 0 and model.codebooks.grad.abs().sum() > 0
    used = torch.ones(2, 4, dtype=torch.bool)
    used[1, 2] = False
    before = model.codebooks.detach().clone()
    assert model.reseed_dead_codes(used, x, torch.Generator().manual_seed(0)) == 1
    changed = (model.codebooks.detach() != before).any(-1)
    assert changed.tolist() == [[False] * 4, [False, False, True, False]]


def test_collision_codes_number_each_group_in_item_order():
    codes = np.array([[1, 2], [0, 0], [1, 2], [1, 2], [0, 1], [0, 0]])
    full = resolve_collisions(codes)
    assert full[:, -1].tolist() == [0, 0, 1, 2, 0, 1]
    assert len(np.unique(full, axis=0)) == len(full)


def test_code_statistics_on_a_hand_computed_table():
    codes = np.array([[0, 1], [0, 1], [1, 1], [2, 0]])
    stats = code_statistics(codes, codebook_size=4)
    assert stats["level0_usage"] == 0.75 and stats["level1_usage"] == 0.5
    p = np.array([0.5, 0.25, 0.25])
    assert stats["level0_perplexity"] == pytest.approx(math.exp(-(p * np.log(p)).sum()))
    assert stats["level1_perplexity"] == pytest.approx(math.exp(-(0.25 * math.log(0.25) + 0.75 * math.log(0.75))))
    assert stats["unique_tuples"] == 3 and stats["collision_rate"] == 0.25
    assert stats["items_in_collisions"] == 0.5 and stats["max_collision_group"] == 2

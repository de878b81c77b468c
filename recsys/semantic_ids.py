"""Semantic ids: quantise item text embeddings into a few discrete codes per item (model-specs §7).

Two quantisers, each giving an (N, L) code table with codes in [0, K):

- **Residual k-means** (GRID's default, "RQ-KMeans"): k-means with K centroids on x, subtract each point's
  centroid, repeat on the residual, L times. r₀ = x, c_d = argmin_k ‖r_d − μ^d_k‖, r_{d+1} = r_d − μ^d_{c_d}.
- **RQ-VAE** (Rajput et al. 2023, TIGER §3.1, Eq. 1-2 of Zeghidour et al.'s residual quantiser): an MLP encoder
  gives z, L codebooks quantise it residually (same recursion as above on z), ẑ = Σ_d e^d_{c_d} goes through a
  mirrored decoder. Loss = ‖x − x̂‖² + Σ_d ‖sg[r_d] − e^d_{c_d}‖² + β‖r_d − sg[e^d_{c_d}]‖² with β = 0.25 and a
  straight-through gradient from ẑ to z. Codebooks start from k-means on the first batch's residuals, and codes no
  item chose during an epoch are re-seeded from residuals of the epoch's last batch (the dead-code pitfall).

Items sharing all L codes get an extra code 0, 1, 2, … in item order (TIGER §3.1 "collisions"), so every item has
a unique (L+1)-tuple. ``code_statistics`` reports usage, perplexity and collisions for logging.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import faiss
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def _check_points(x: np.ndarray, codebook_size: int) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"expected an (N, D) embedding matrix, got shape {x.shape}")
    if len(x) < codebook_size:
        raise ValueError(f"{len(x)} items cannot fill a codebook of {codebook_size} codes; lower codebook_size")
    if not np.isfinite(x).all():
        raise ValueError("embeddings contain NaN or inf")
    return x


def kmeans_centroids(x: np.ndarray, k: int, seed: int = 0, niter: int = 20) -> np.ndarray:
    """(k, D) k-means centroids of x (faiss; every point used, no subsampling)."""
    x = _check_points(x, k)
    km = faiss.Kmeans(x.shape[1], k, niter=niter, seed=seed, max_points_per_centroid=max(256, -(-len(x) // k)),
                      verbose=False)
    km.train(x)
    return km.centroids.copy()


def nearest(x: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Index of the nearest codebook row (squared L2) for each row of x."""
    distances = (x * x).sum(1, keepdim=True) - 2 * x @ codebook.T + (codebook * codebook).sum(1)[None]
    return distances.argmin(1)


def residual_assign(x: torch.Tensor, codebooks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Residual quantisation of x (N, D) with codebooks (L, K, D): codes (N, L) and the quantised sum (N, D)."""
    residual, codes = x, []
    for book in codebooks:
        c = nearest(residual, book)
        codes.append(c)
        residual = residual - book[c]
    return torch.stack(codes, 1), x - residual


def residual_kmeans(x: np.ndarray, levels: int = 3, codebook_size: int = 256, seed: int = 0,
                    niter: int = 20) -> tuple[np.ndarray, np.ndarray]:
    """RQ-KMeans: codes (N, levels) int64 and centroids (levels, K, D) float32."""
    x = _check_points(x, codebook_size)
    residual = x.copy()
    codes, books = [], []
    for level in range(levels):
        centroids = kmeans_centroids(residual, codebook_size, seed=seed + level, niter=niter)
        c = nearest(torch.from_numpy(residual), torch.from_numpy(centroids)).numpy()
        codes.append(c)
        books.append(centroids)
        residual = residual - centroids[c]
    return np.stack(codes, 1).astype(np.int64), np.stack(books).astype(np.float32)


def mlp(dims: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(dims) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class RQVAE(nn.Module):
    """Residual-quantised VAE of TIGER §3.1: MLP encoder in→hidden…→latent, L codebooks of K, mirrored decoder."""

    def __init__(self, input_dim: int, hidden: tuple[int, ...] = (512, 256, 128), latent_dim: int = 32,
                 levels: int = 3, codebook_size: int = 256, beta: float = 0.25):
        super().__init__()
        dims = [input_dim, *hidden, latent_dim]
        self.encoder = mlp(dims)
        self.decoder = mlp(dims[::-1])
        self.codebooks = nn.Parameter(torch.randn(levels, codebook_size, latent_dim) * 0.01)
        self.beta = beta

    def quantise(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """Codes (N, L), ẑ (N, latent) and the residual r_d entering each level."""
        residual, codes, residuals, quantised = z, [], [], torch.zeros_like(z)
        for book in self.codebooks:
            residuals.append(residual)
            c = nearest(residual.detach(), book.detach())
            codes.append(c)
            quantised = quantised + book[c]
            residual = residual - book[c]
        return torch.stack(codes, 1), quantised, residuals

    def loss(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The RQ-VAE loss (reconstruction + codebook + β·commitment, summed over levels) and the codes."""
        z = self.encoder(x)
        codes, _, residuals = self.quantise(z)
        vq = z.new_zeros(())
        quantised = torch.zeros_like(z)
        for d, r in enumerate(residuals):
            e = self.codebooks[d][codes[:, d]]
            vq = vq + F.mse_loss(e, r.detach(), reduction="none").sum(1).mean()
            vq = vq + self.beta * F.mse_loss(r, e.detach(), reduction="none").sum(1).mean()
            quantised = quantised + e
        # straight-through: the decoder reads ẑ, the encoder receives the decoder's gradient as if ẑ were z
        z_q = z + (quantised - z).detach()
        reconstruction = F.mse_loss(self.decoder(z_q), x, reduction="none").sum(1).mean()
        return reconstruction + vq, codes

    @torch.no_grad()
    def codes(self, x: torch.Tensor) -> torch.Tensor:
        return self.quantise(self.encoder(x))[0]

    @torch.no_grad()
    def init_codebooks(self, x: torch.Tensor, seed: int = 0) -> None:
        """k-means on the residuals of one batch, level by level (avoids dead codes from a random init)."""
        residual = self.encoder(x)
        for d in range(self.codebooks.shape[0]):
            k = self.codebooks.shape[1]
            if len(residual) >= k:
                centroids = torch.from_numpy(kmeans_centroids(residual.numpy(), k, seed=seed + d))
            else:  # a batch smaller than the book: seed from the batch's points, repeated
                centroids = residual[torch.arange(k) % len(residual)]
            self.codebooks[d] = centroids
            residual = residual - centroids[nearest(residual, centroids)]

    @torch.no_grad()
    def reseed_dead_codes(self, used: torch.Tensor, x: torch.Tensor, generator: torch.Generator) -> int:
        """Replace codes unused (``used`` (L, K) False) with random residuals of batch x at their level."""
        z = self.encoder(x)
        _, _, residuals = self.quantise(z)
        reseeded = 0
        for d, r in enumerate(residuals):
            dead = torch.nonzero(~used[d]).flatten()
            if len(dead):
                pick = torch.randint(len(r), (len(dead),), generator=generator)
                self.codebooks[d, dead] = r[pick]
                reseeded += len(dead)
        return reseeded


@dataclass
class RQVAEFit:
    model: RQVAE
    codes: np.ndarray
    losses: list[float]
    reseeded: int


def fit_rqvae(x: np.ndarray, levels: int = 3, codebook_size: int = 256, hidden: tuple[int, ...] = (512, 256, 128),
              latent_dim: int = 32, beta: float = 0.25, epochs: int = 200, batch_size: int = 1024, lr: float = 1e-3,
              optimizer: str = "adam", seed: int = 0) -> RQVAEFit:
    """Train an RQ-VAE on the item embeddings x (N, D) and return it with the items' codes (N, levels).

    Batch 1024 and β 0.25 follow the spec; the epoch count does not (20k in the paper), nor does the optimiser: the
    paper's Adagrad at lr 0.4 diverges on Beauty's 12,101 MiniLM embeddings here (Adagrad's first step moves every
    weight by ±lr; loss ~1e12 in epoch 1, 6,044 items left on one code tuple), while Adam at 1e-3 trains smoothly
    (loss 0.78 → 0.42, perplexity 229 / 235 / 243 per level, 5.3% of items need the collision code)."""
    x = _check_points(x, codebook_size)
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = RQVAE(x.shape[1], hidden, latent_dim, levels, codebook_size, beta)
    data = torch.from_numpy(x)
    if optimizer == "adagrad":
        opt: torch.optim.Optimizer = torch.optim.Adagrad(model.parameters(), lr=lr)
    elif optimizer == "adam":
        opt = torch.optim.Adam(model.parameters(), lr=lr)
    else:
        raise ValueError(f"unknown optimizer {optimizer!r}; expected 'adagrad' or 'adam'")
    losses, reseeded = [], 0
    for epoch in range(epochs):
        order = torch.randperm(len(data), generator=generator)
        used = torch.zeros(levels, codebook_size, dtype=torch.bool)
        total, batch = 0.0, data[order[:batch_size]]
        for start in range(0, len(data), batch_size):
            batch = data[order[start:start + batch_size]]
            if epoch == 0 and start == 0:
                model.init_codebooks(batch, seed)
            loss, codes = model.loss(batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            for d in range(levels):
                used[d, codes[:, d]] = True
            total += loss.item() * len(batch)
        losses.append(total / len(data))
        if epoch < epochs - 1:  # the last epoch's codebook is the one the codes are read from
            reseeded += model.reseed_dead_codes(used, batch, generator)
    model.eval()
    return RQVAEFit(model, model.codes(data).numpy().astype(np.int64), losses, reseeded)


def resolve_collisions(codes: np.ndarray) -> np.ndarray:
    """Append a code that numbers the items sharing the same tuple: 0, 1, 2, … in row order (TIGER §3.1).

    The result (N, L+1) has unique rows."""
    codes = np.asarray(codes, dtype=np.int64)
    if codes.ndim != 2:
        raise ValueError(f"expected an (N, L) code table, got shape {codes.shape}")
    _, group = np.unique(codes, axis=0, return_inverse=True)
    group = group.reshape(-1)
    order = np.argsort(group, kind="stable")
    sorted_group = group[order]
    starts = np.flatnonzero(np.r_[True, sorted_group[1:] != sorted_group[:-1]])
    rank_sorted = np.arange(len(order)) - np.repeat(starts, np.diff(np.r_[starts, len(order)]))
    extra = np.empty(len(codes), dtype=np.int64)
    extra[order] = rank_sorted
    return np.concatenate([codes, extra[:, None]], 1)


def code_statistics(codes: np.ndarray, codebook_size: int) -> dict[str, float]:
    """Per level: share of the codebook used and perplexity exp(H) of the code distribution (K = uniform use);
    collisions: share of items whose tuple another item also has, the share of items with a non-zero extra code
    (1 − unique tuples / N) and the largest group sharing one tuple."""
    codes = np.asarray(codes)
    stats: dict[str, float] = {"items": int(len(codes))}
    for d in range(codes.shape[1]):
        counts = np.bincount(codes[:, d], minlength=codebook_size)
        p = counts[counts > 0] / len(codes)
        stats[f"level{d}_usage"] = float((counts > 0).sum() / codebook_size)
        stats[f"level{d}_perplexity"] = float(math.exp(-(p * np.log(p)).sum()))
    _, group_sizes = np.unique(codes, axis=0, return_counts=True)
    stats["unique_tuples"] = int(len(group_sizes))
    stats["collision_rate"] = float(1 - len(group_sizes) / len(codes))
    stats["items_in_collisions"] = float(group_sizes[group_sizes > 1].sum() / len(codes))
    stats["max_collision_group"] = int(group_sizes.max())
    return stats


class Quantiser(nn.Module):
    """Item embeddings (N, D) → L codes in [0, K) each: ``fit`` once on the catalogue (returns the codes and figures
    about the fit), then ``codes`` places any embedding, e.g. a new item's. What it learns lives in buffers or
    parameters whose shapes follow from its settings, so a bundle restores it."""

    def fit(self, x: np.ndarray) -> tuple[np.ndarray, dict[str, float]]:
        raise NotImplementedError

    def codes(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class ResidualKMeans(Quantiser):
    """RQ-KMeans (GRID's default): ``residual_kmeans``; its centroids (L, K, D) are a buffer."""

    def __init__(self, levels: int, codebook_size: int, dim: int, seed: int = 0, iters: int = 20):
        super().__init__()
        self.levels, self.codebook_size, self.seed, self.iters = levels, codebook_size, seed, iters
        self.register_buffer("centroids", torch.zeros(levels, codebook_size, dim))

    def fit(self, x):
        codes, centroids = residual_kmeans(x, self.levels, self.codebook_size, self.seed, self.iters)
        self.centroids.copy_(torch.from_numpy(centroids))
        return codes, {}

    def codes(self, x):
        return residual_assign(x.to(self.centroids.device), self.centroids)[0]


class RQVAEQuantiser(Quantiser):
    """The RQ-VAE of TIGER §3.1 (``fit_rqvae``), frozen after its fit (never trained with the recommender)."""

    def __init__(self, levels: int, codebook_size: int, dim: int, hidden: tuple[int, ...], latent: int, beta: float,
                 epochs: int, batch_size: int, lr: float, optimizer: str, seed: int = 0):
        super().__init__()
        self.levels, self.codebook_size, self.seed = levels, codebook_size, seed
        self.hidden, self.latent, self.beta = hidden, latent, beta
        self.epochs, self.batch_size, self.lr, self.optimizer = epochs, batch_size, lr, optimizer
        self.rqvae = RQVAE(dim, hidden, latent, levels, codebook_size, beta).requires_grad_(False)

    def fit(self, x):
        fit = fit_rqvae(x, self.levels, self.codebook_size, self.hidden, self.latent, self.beta, self.epochs,
                        self.batch_size, self.lr, self.optimizer, self.seed)
        self.rqvae.load_state_dict(fit.model.state_dict())
        return fit.codes, {"rqvae_final_loss": fit.losses[-1], "rqvae_reseeded_codes": fit.reseeded}

    def codes(self, x):
        return self.rqvae.to(x.device).codes(x)

"""Is a difference between two models real? A paired bootstrap over users (Efron & Tibshirani 1993, ch. 16; the
paired test of Sakai, SIGIR 2006, for IR metrics).

Both models are scored on the same users, so the test resamples users, not runs: d_u = m_A(u) − m_B(u) for a
per-user metric (NDCG@10 or HR@10 from the target rank, averaged over seeds when several were trained); B
resamples of the users with replacement give the distribution of the mean difference. The 95% interval is its
2.5th and 97.5th percentiles; the two-sided p-value is the share of resampled means at least as far from the
observed mean as the observed mean is from 0 (the bootstrap distribution shifted to the null hypothesis of no
difference), floored at 1/B.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def per_user_metric(ranks: np.ndarray, metric: str) -> np.ndarray:
    """``ndcg@K`` or ``hr@K`` of each user from 1-based target ranks (inf = not ranked)."""
    name, k = metric.split("@")
    hit = ranks <= int(k)
    if name == "hr":
        return hit.astype(np.float64)
    if name == "ndcg":
        return np.where(hit, 1.0 / np.log2(np.where(hit, ranks, 1.0) + 1.0), 0.0)
    raise ValueError(f"per-user metric must be ndcg@K or hr@K, got {metric!r}")


@dataclass(frozen=True)
class PairedDifference:
    mean: float  # mean over users of m_A − m_B
    low: float  # 95% bootstrap interval
    high: float
    p_value: float
    users: int
    resamples: int


def paired_bootstrap(a: np.ndarray, b: np.ndarray, resamples: int = 10_000, seed: int = 0,
                     chunk: int = 500) -> PairedDifference:
    """The mean of ``a − b`` (per-user values of the same users, same order) with its bootstrap interval and p."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1 or not len(a):
        raise ValueError(f"paired values must be two equal non-empty vectors, got shapes {a.shape} and {b.shape}")
    diff = a - b
    observed = float(diff.mean())
    rng = np.random.default_rng(seed)
    means = np.concatenate([diff[rng.integers(0, len(diff), size=(min(chunk, resamples - done), len(diff)))]
                            .mean(axis=1) for done in range(0, resamples, chunk)])
    extreme = np.abs(means - observed) >= abs(observed) - 1e-15
    low, high = np.percentile(means, [2.5, 97.5])
    return PairedDifference(observed, float(low), float(high), max(float(extreme.mean()), 1.0 / resamples),
                            len(diff), resamples)

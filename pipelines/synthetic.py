"""Deterministic synthetic interaction logs with learnable sequential structure (the ``synthetic`` dataset).

The generative story, chosen so that a sequence model clearly beats popularity:
- items belong to latent clusters; clusters follow a Markov chain that is sticky (stay with
  ``stay_prob``) and otherwise prefers a couple of "favoured next" clusters, so the next item's
  cluster is predictable from the current item;
- inside the chosen cluster the item is, with ``follow_prob``, a fixed successor of the previous
  item (item-to-item structure), otherwise a Zipf-skewed pick (popularity skew within clusters);
- time gaps mix short in-session gaps (exponential, minutes) and long between-session gaps
  (lognormal, days), giving bursty, irregular timestamps;
- optional repeat consumption (``repeat_prob``, default 0 = every user sees an item at most once);
- titles and categories come from per-cluster vocabularies, so text encoders see the clusters too.

Everything is vectorised over users (one numpy step per sequence position), in fixed-size user
chunks with their own spawned RNG streams: the same seed gives the same log at any size, and a
20M-row log takes seconds.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd

_CHUNK_USERS = 100_000
# Sampling goes through inverse-CDF lookup tables (a gather) instead of searchsorted per draw:
# several times faster on large logs, with a probability resolution of 1/_TABLE.
_TABLE = 1 << 14  # fixed, so results never depend on memory-driven chunking choices

_CATEGORIES = [
    "Kitchen", "Garden", "Camping", "Cycling", "Skincare", "Haircare", "Makeup", "Fragrance", "Board Games",
    "Puzzles", "Running", "Fishing", "Yoga", "Audio", "Photography", "Lighting", "Stationery", "Pet Care",
    "Baby", "Coffee", "Tea", "Baking", "Climbing", "Swimming", "Tools", "Knitting", "Painting", "Music",
    "Travel", "Fitness", "Gaming", "Reading", "Hiking", "Surfing", "Skiing", "Tennis", "Golf", "Bath",
    "Nails", "Storage",
]
_WORDS = [
    "classic", "deluxe", "compact", "organic", "premium", "travel", "pro", "mini", "ultra", "natural",
    "smart", "vintage", "soft", "bold", "fresh", "quick", "silent", "bright", "gentle", "rugged", "light",
    "heavy-duty", "eco", "family", "daily", "night", "summer", "winter", "urban", "wild", "crystal",
    "velvet", "steel", "bamboo", "cotton", "ceramic", "carbon", "matte", "glossy", "hydrating",
]
_NOUNS = ["set", "kit", "pack", "bottle", "case", "box", "bundle", "edition", "collection", "refill"]


@dataclass(frozen=True)
class SyntheticConfig:
    seed: int = 0
    num_users: int = 3000
    num_items: int = 1000
    num_clusters: int = 20
    min_len: int = 10
    max_len: int = 60
    mean_len: float = 25.0
    stay_prob: float = 0.5
    favoured_prob: float = 0.4  # mass on the favoured next clusters when leaving the current one
    num_favoured: int = 2
    follow_prob: float = 0.6
    zipf_exponent: float = 1.0
    repeat_prob: float = 0.0
    start_time: int = 1_500_000_000
    span_days: float = 730.0

    def __post_init__(self):
        if self.num_items < self.num_clusters or self.num_clusters < 1:
            raise ValueError("synthetic: need num_items >= num_clusters >= 1")
        if not 1 <= self.min_len <= self.max_len:
            raise ValueError("synthetic: need 1 <= min_len <= max_len")
        if self.stay_prob + self.favoured_prob > 1 or min(self.stay_prob, self.favoured_prob) < 0:
            raise ValueError("synthetic: stay_prob + favoured_prob must be within [0, 1]")

    @classmethod
    def field_names(cls) -> set[str]:
        return set(cls.__dataclass_fields__)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class _World:
    """The latent structure shared by all users: clusters, transitions, successors."""

    cluster_start: np.ndarray  # first item position of each cluster (items are contiguous per cluster)
    cluster_size: np.ndarray
    next_cluster_table: np.ndarray  # (C, _TABLE) inverse-CDF lookup of the transition rows
    successor_shift: np.ndarray  # (C, C) rank offset of the successor item when moving a -> b
    zipf_table: np.ndarray  # (_TABLE,) inverse-CDF lookup of the within-cluster rank
    item_external: np.ndarray  # item position -> external item id (a permutation hides the clusters)


def _build_world(cfg: SyntheticConfig, rng: np.random.Generator) -> _World:
    c, v = cfg.num_clusters, cfg.num_items
    bounds = (np.arange(c + 1) * v) // c
    start, size = bounds[:-1], np.diff(bounds)
    transition = np.full((c, c), 0.0)
    leave = 1.0 - cfg.stay_prob
    for a in range(c):
        others = np.delete(np.arange(c), a)
        favoured = rng.choice(others, size=min(cfg.num_favoured, len(others)), replace=False)
        transition[a, a] = cfg.stay_prob
        if len(others):
            spread = leave - cfg.favoured_prob
            transition[a, others] += spread / len(others)
            transition[a, favoured] += cfg.favoured_prob / len(favoured)
        else:
            transition[a, a] = 1.0
    transition /= transition.sum(axis=1, keepdims=True)
    cdf = np.cumsum(transition, axis=1)
    cdf[:, -1] = 1.0
    ranks = np.arange(1, size.max() + 1, dtype=np.float64)
    zipf = ranks ** -cfg.zipf_exponent
    grid = (np.arange(_TABLE) + 0.5) / _TABLE
    return _World(
        cluster_start=start,
        cluster_size=size,
        next_cluster_table=np.stack([np.searchsorted(row, grid, side="right") for row in cdf]).clip(0, c - 1),
        successor_shift=rng.integers(0, size.max(), size=(c, c)),
        zipf_table=np.searchsorted(np.cumsum(zipf) / zipf.sum(), grid, side="right").clip(0, size.max() - 1),
        item_external=rng.permutation(v).astype(np.int64) + 1,
    )


def _simulate_chunk(cfg: SyntheticConfig, world: _World, rng: np.random.Generator, n_users: int):
    """Item positions (n_users, steps) and timestamps, plus each user's target length."""
    c = cfg.num_clusters
    spread = max(cfg.mean_len - cfg.min_len, 1e-9)
    lengths = np.minimum(cfg.min_len + np.floor(rng.exponential(spread, n_users)).astype(np.int64), cfg.max_len)
    # Without repeats, draws that repeat an item are dropped afterwards; simulate extra steps so
    # nearly every user still reaches its target length.
    steps = cfg.max_len if cfg.repeat_prob > 0 else int(np.ceil(cfg.max_len * 1.5)) + 5
    items = np.empty((n_users, steps), dtype=np.int64)
    rows = np.arange(n_users)
    cluster = rng.integers(0, c, n_users)
    rank = world.zipf_table[rng.integers(0, _TABLE, n_users)] % world.cluster_size[cluster]
    items[:, 0] = world.cluster_start[cluster] + rank
    for t in range(1, steps):
        nxt = world.next_cluster_table[cluster, rng.integers(0, _TABLE, n_users)]
        size = world.cluster_size[nxt]
        successor = (rank + world.successor_shift[cluster, nxt]) % size
        popular = world.zipf_table[rng.integers(0, _TABLE, n_users)] % size
        rank = np.where(rng.random(n_users) < cfg.follow_prob, successor, popular)
        items[:, t] = world.cluster_start[nxt] + rank
        cluster = nxt
        if cfg.repeat_prob > 0:
            again = rng.random(n_users) < cfg.repeat_prob
            back = rng.integers(1, min(t, 5) + 1, n_users)
            items[again, t] = items[rows[again], t - back[again]]

    in_session = rng.random((n_users, steps)) < 0.7
    gaps = np.where(in_session, 30 + rng.exponential(600.0, (n_users, steps)),
                    rng.lognormal(np.log(2 * 86400.0), 1.0, (n_users, steps)))
    gaps[:, 0] = 0
    start = cfg.start_time + rng.random(n_users) * cfg.span_days * 0.7 * 86400
    times = (start[:, None] + np.cumsum(gaps, axis=1)).astype(np.int64)

    keep = np.ones_like(items, dtype=bool)
    if cfg.repeat_prob <= 0:
        # First occurrence per row: a stable per-row sort puts equal items side by side, the
        # earliest one first; every later copy is dropped.
        order = np.argsort(items, axis=1, kind="stable")
        ranked = np.take_along_axis(items, order, axis=1)
        later_copy = np.zeros_like(keep)
        later_copy[:, 1:] = ranked[:, 1:] == ranked[:, :-1]
        np.put_along_axis(keep, order, ~later_copy, axis=1)
    keep &= np.cumsum(keep, axis=1) <= lengths[:, None]
    return items, times, keep


def generate_interactions(cfg: SyntheticConfig) -> pd.DataFrame:
    """The log as a DataFrame (user_id int64, item_id int64, ts int64), user-major, time-ordered."""
    world = _build_world(cfg, np.random.default_rng(cfg.seed))
    chunk_seeds = np.random.SeedSequence(cfg.seed).spawn(-(-cfg.num_users // _CHUNK_USERS))
    parts = []
    for chunk, seed in enumerate(chunk_seeds):
        first = chunk * _CHUNK_USERS
        n = min(_CHUNK_USERS, cfg.num_users - first)
        items, times, keep = _simulate_chunk(cfg, world, np.random.default_rng(seed), n)
        user = np.broadcast_to(np.arange(first, first + n, dtype=np.int64)[:, None] + 1, items.shape)
        parts.append(pd.DataFrame({
            "user_id": user[keep],
            "item_id": world.item_external[items[keep]],
            "ts": times[keep],
        }))
    return pd.concat(parts, ignore_index=True)


def generate_item_text(cfg: SyntheticConfig) -> pd.DataFrame:
    """Titles and categories from per-cluster vocabularies (item_id as str, matching the log)."""
    rng = np.random.default_rng([cfg.seed, 1])
    world = _build_world(cfg, np.random.default_rng(cfg.seed))
    cluster_of = np.repeat(np.arange(cfg.num_clusters), world.cluster_size)
    vocab = [rng.choice(_WORDS, size=4, replace=False) for _ in range(cfg.num_clusters)]
    categories = [
        _CATEGORIES[k % len(_CATEGORIES)] + (f" {k // len(_CATEGORIES) + 1}" if k >= len(_CATEGORIES) else "")
        for k in range(cfg.num_clusters)
    ]
    word_pick = rng.integers(0, 4, cfg.num_items)
    noun_pick = rng.integers(0, len(_NOUNS), cfg.num_items)
    titles = [
        f"{vocab[k][w].capitalize()} {categories[k].lower()} {_NOUNS[n]} {pos + 1}"
        for pos, (k, w, n) in enumerate(zip(cluster_of, word_pick, noun_pick))
    ]
    return pd.DataFrame({
        "item_id": world.item_external.astype(str),
        "title": titles,
        "category": [categories[k] for k in cluster_of],
    })

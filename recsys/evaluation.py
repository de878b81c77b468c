"""Full-ranking evaluation over the whole catalogue (architecture page, "Evaluation").

For each evaluation user the target's rank is computed against every item (never a sampled subset), walking the
users in batches through the model's one ranking entry point, ``model.recommend`` (``recsys.ranking``: the
catalogue in item chunks, so memory stays O(batch × chunk)). Ties count against the
target (rank = 1 + #{j ≠ target : s_j ≥ s_target}), so a model that scores everything equally gets no credit.
With ``exclude_seen`` the user's history items are removed from the ranking (a target that is itself in the
history then counts as a miss) and the flag is recorded in the result.

Metrics with a single target per user (Krichene & Rendle 2020 for why full ranking):
HR@K = 1[rank ≤ K] (= Recall@K); NDCG@K = 1[rank ≤ K] / log2(rank + 1); MRR = 1/rank (full ranking) and
MRR@K = 1[rank ≤ K]/rank; coverage@K = |∪ top-K lists| / V; popularity_percentile@10 = the mean over users of the
mean training-popularity percentile of their top-10 items (when asked for).

Generative models (``recsys.models.base.GenerativeModel``: semantic-id decoders, which score no catalogue table)
answer the same call from their beam-searched lists: the target's rank is its position in the list and ∞ when
absent (so MRR is MRR over the list, not over the catalogue); with ``exclude_seen`` the history is dropped from it.

Under torchrun (``recsys.distributed``) the users are sharded over the ranks: each rank ranks its share, the
per-metric sums and user counts are all-reduced and coverage@K is the OR (max) of per-rank item bitmaps, so every
rank gets the one-process figures (counts exactly, means up to summation order).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from pipelines.jagged import EvalSet, Jagged
from recsys import distributed
from recsys.batching import eval_batches
from recsys.models.base import SequentialModel

KS = (1, 5, 10, 20, 50)


def cutoffs(max_k: int) -> tuple[int, ...]:
    """The reported cutoffs up to ``max_k`` (one of KS)."""
    if max_k not in KS:
        raise ValueError(f"max_k must be one of {KS}, got {max_k}")
    return tuple(k for k in KS if k <= max_k)


def metric_sums(ranks: np.ndarray, ks=KS) -> dict[str, float]:
    """Per-metric sums over users of 1-based target ranks (``inf`` = not ranked): HR@K, NDCG@K, MRR@K and MRR.
    Sums, not means, so shards of users add up (``metrics_from_ranks`` divides by the user count)."""
    ranks = np.asarray(ranks, dtype=np.float64)
    out: dict[str, float] = {}
    for k in ks:
        hit = ranks <= k
        out[f"hr@{k}"] = float(hit.sum(dtype=np.float64))
        out[f"ndcg@{k}"] = float(np.where(hit, 1.0 / np.log2(np.where(hit, ranks, 1.0) + 1.0), 0.0).sum())
        out[f"mrr@{k}"] = float(np.where(hit, 1.0 / np.where(hit, ranks, 1.0), 0.0).sum())
    out["mrr"] = float((1.0 / ranks).sum())
    return out


def metrics_from_ranks(ranks: np.ndarray, ks=KS) -> dict[str, float]:
    """Aggregate 1-based target ranks (``inf`` = not ranked) into HR@K, NDCG@K, MRR@K and MRR."""
    n = len(ranks)
    return {name: total / n if n else float("nan") for name, total in metric_sums(ranks, ks).items()}


@dataclass
class UserRanks:
    """Each user's 1-based target rank (inf = not ranked), in the evaluation set's row order: the per-user figures
    that significance tests pair across models (``recsys.significance``)."""

    user_idx: np.ndarray
    ranks: np.ndarray


def item_percentiles(train: Jagged, num_items: int) -> np.ndarray:
    """Each item's popularity percentile (V + 1,), 0..100: the share of items with fewer training interactions, ties
    at their mid-rank, so the mean over a list says how far into the head the recommendations sit."""
    counts = np.bincount(train.items, minlength=num_items + 1)[1:num_items + 1]
    order = np.argsort(counts, kind="stable")
    _, first, tied = np.unique(counts[order], return_index=True, return_counts=True)
    mid_rank = np.empty(num_items)
    mid_rank[order] = np.repeat(first + (tied - 1) / 2, tied)  # 0-based, ties share their mean rank
    out = np.zeros(num_items + 1)
    out[1:] = 100.0 * (mid_rank + 0.5) / num_items
    return out


def evaluate(model: SequentialModel, eval_set: EvalSet, num_items: int, exclude_seen: bool, **options
             ) -> dict[str, float]:
    """Full-ranking metrics of ``model`` on ``eval_set``; the result records ``exclude_seen`` and the user count,
    and with ``item_percentile`` (``item_percentiles``) the mean popularity percentile of the top-10 lists.
    ``options``: those of ``evaluate_users``."""
    return evaluate_users(model, eval_set, num_items, exclude_seen, **options)[0]


@torch.no_grad()
def evaluate_users(
    model: SequentialModel,
    eval_set: EvalSet,
    num_items: int,
    exclude_seen: bool,
    ks=KS,
    batch_size: int = 512,
    device: torch.device | str = "cpu",
    item_percentile: np.ndarray | None = None,
) -> tuple[dict[str, float], UserRanks]:
    """``evaluate``'s figures and every user's target rank. Under torchrun each rank evaluates its share of the
    users and every rank returns the figures and ranks of all of them."""
    rows = np.arange(len(eval_set))
    if distributed.world_size() > 1:
        by_length = np.argsort(eval_set.history.lengths(), kind="stable")  # so each rank gets a like share of work
        rows = by_length[distributed.shard(len(eval_set))]
    mine = eval_set.take(rows) if len(rows) < len(eval_set) else eval_set
    was_training = model.training
    model.eval()
    max_k = max(ks)
    all_ranks, recommended = [], []
    try:
        for eb in eval_batches(mine, model.config.max_len, batch_size):
            ranking = model.recommend(eb.batch.to(device), max_k, exclude=eb.exclude if exclude_seen else None,
                                      targets=eb.targets.to(device))
            all_ranks.append(ranking.target_ranks.cpu().numpy())
            recommended.append(ranking.items.cpu().numpy())
    finally:
        model.train(was_training)
    ranks = np.concatenate(all_ranks).astype(np.float64) if all_ranks else np.zeros(0)
    top = np.concatenate(recommended) if recommended else np.zeros((0, max_k), dtype=np.int64)
    summary = _summary(ranks, top, ks, num_items, exclude_seen, item_percentile)
    # eval_batches walks rows by history length: put each rank back at its row, then gather every rank's rows
    every = np.zeros(len(eval_set))
    every[rows[np.argsort(mine.history.lengths(), kind="stable")]] = ranks
    every = distributed.all_reduce_array(every)
    return summary, UserRanks(np.asarray(eval_set.user_idx), every)


def _summary(ranks: np.ndarray, top: np.ndarray, ks, num_items: int, exclude_seen: bool,
             item_percentile: np.ndarray | None = None) -> dict[str, float]:
    """The figures of every rank's users together: sums and counts all-reduced, item bitmaps OR-ed (max)."""
    sums = metric_sums(ranks, ks)
    if item_percentile is not None:
        listed = top[:, :10]
        per_user = np.where(listed > 0, item_percentile[listed], 0).sum(1) / np.maximum((listed > 0).sum(1), 1)
        sums["popularity_percentile@10"] = float(per_user.sum())
    totals = distributed.all_reduce_array(np.array([*sums.values(), len(ranks)], dtype=np.float64))
    n = int(totals[-1])
    result = {name: float(total / n) if n else float("nan") for name, total in zip(sums, totals[:-1])}
    for k in ks:
        listed = np.zeros(num_items + 1, dtype=np.uint8)
        listed[top[:, :k].ravel()] = 1
        listed = distributed.all_reduce_array(listed, op="max")
        # row 0 fills a list that ran short: it is no item
        result[f"coverage@{k}"] = float(listed[1:].sum() / num_items) if n else 0.0
    result["num_users"] = n
    result["exclude_seen"] = bool(exclude_seen)
    return result

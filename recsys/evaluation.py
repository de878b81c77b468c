"""Full-ranking evaluation over the whole catalogue (architecture page, "Evaluation").

For each evaluation user the target's rank is computed against every item (never a sampled subset), walking the
users in batches and the catalogue in item chunks so memory stays O(batch × chunk). Ties count against the
target (rank = 1 + #{j ≠ target : s_j ≥ s_target}), so a model that scores everything equally gets no credit.
With ``exclude_seen`` the user's history items are removed from the ranking (a target that is itself in the
history then counts as a miss) and the flag is recorded in the result.

Metrics with a single target per user (Krichene & Rendle 2020 for why full ranking):
HR@K = 1[rank ≤ K] (= Recall@K); NDCG@K = 1[rank ≤ K] / log2(rank + 1); MRR = 1/rank (full ranking) and
MRR@K = 1[rank ≤ K]/rank; coverage@K = |∪ top-K lists| / V.

Generative models (``model.generative``: semantic-id decoders, which score no catalogue table) are evaluated
through the same ``evaluate`` from their ``recommend(batch, k)`` lists: the target's rank is its position in the
list and ∞ when absent (so MRR is MRR over the list, not over the catalogue). With ``exclude_seen`` each list is
asked for k + |history| items and the history is dropped from it before ranking.

Under torchrun (``recsys.distributed``) the users are sharded over the ranks: each rank ranks its share, the
per-metric sums and user counts are all-reduced and coverage@K is the OR (max) of per-rank item bitmaps, so every
rank gets the one-process figures (counts exactly, means up to summation order).
"""

from __future__ import annotations

import numpy as np
import torch

from kernels.topk import target_ranks, topk_scores
from pipelines.jagged import EvalSet
from recsys import distributed
from recsys.batching import eval_batches
from recsys.models.base import SequentialModel

KS = (1, 5, 10, 20, 50)
ITEM_CHUNK = 16384


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


@torch.no_grad()
def rank_and_top(
    queries: torch.Tensor,
    table: torch.Tensor,
    targets: torch.Tensor,
    exclude: tuple[torch.Tensor, torch.Tensor] | None,
    k: int,
    item_chunk: int = ITEM_CHUNK,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Target ranks (float, inf when excluded) and top-k item ids per query, through ``kernels.topk``.

    ``table`` includes the padding row 0, which is never ranked: the kernels see items 1..V as rows 0..V-1.
    """
    items = table[1:]
    if exclude is not None:
        exclude = (exclude[0], torch.as_tensor(exclude[1]) - 1)
    ranks = target_ranks(queries, items, targets - 1, exclude, chunk_size=item_chunk)
    _, top = topk_scores(queries, items, min(k, items.shape[0]), exclude=exclude, chunk_size=item_chunk)
    return ranks, top + 1


@torch.no_grad()
def evaluate(
    model: SequentialModel,
    eval_set: EvalSet,
    num_items: int,
    exclude_seen: bool,
    ks=KS,
    batch_size: int = 512,
    device: torch.device | str = "cpu",
) -> dict[str, float]:
    """Full-ranking metrics of ``model`` on ``eval_set``; the result records ``exclude_seen`` and the user count.
    Under torchrun each rank evaluates its share of the users and every rank returns the figures of all of them."""
    if distributed.world_size() > 1:
        by_length = np.argsort(eval_set.history.lengths(), kind="stable")  # so each rank gets a like share of work
        eval_set = eval_set.take(by_length[distributed.shard(len(eval_set))])
    was_training = model.training
    model.eval()
    max_k = max(ks)
    if getattr(model, "generative", False):
        try:
            ranks, top = _generative_ranks(model, eval_set, num_items, exclude_seen, max_k, batch_size, device)
        finally:
            model.train(was_training)
        return _summary(ranks, top, ks, num_items, exclude_seen)
    table = model.item_embeddings().to(device)
    all_ranks, recommended = [], []
    for eb in eval_batches(eval_set, model.config.max_len, batch_size):
        queries = model.encode(eb.batch.to(device))
        ranks, top = rank_and_top(
            queries, table, eb.targets.to(device), eb.exclude if exclude_seen else None, max_k
        )
        all_ranks.append(ranks.cpu().numpy())
        recommended.append(top.cpu().numpy())
    model.train(was_training)
    ranks = np.concatenate(all_ranks) if all_ranks else np.zeros(0)
    top = np.concatenate(recommended) if recommended else np.zeros((0, max_k), dtype=np.int64)
    return _summary(ranks, top, ks, num_items, exclude_seen)


def _summary(ranks: np.ndarray, top: np.ndarray, ks, num_items: int, exclude_seen: bool) -> dict[str, float]:
    """The figures of every rank's users together: sums and counts all-reduced, item bitmaps OR-ed (max)."""
    sums = metric_sums(ranks, ks)
    totals = distributed.all_reduce_array(np.array([*sums.values(), len(ranks)], dtype=np.float64))
    n = int(totals[-1])
    result = {name: float(total / n) if n else float("nan") for name, total in zip(sums, totals[:-1])}
    for k in ks:
        listed = np.zeros(num_items + 1, dtype=np.uint8)
        listed[top[:, :k].ravel()] = 1
        listed = distributed.all_reduce_array(listed, op="max")
        # row 0 fills a generative list that ran short: it is no item
        result[f"coverage@{k}"] = float(listed[1:].sum() / num_items) if n else 0.0
    result["num_users"] = n
    result["exclude_seen"] = bool(exclude_seen)
    return result


# rows × list length per ``recommend`` call: long histories with exclude_seen ask for long lists (wide beams)
GENERATIVE_ROW_BUDGET = 16384


def ranks_from_lists(lists: np.ndarray, targets: np.ndarray, seen: list[np.ndarray] | None, k: int
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Target ranks (1-based, ``inf`` if absent) within recommendation lists (B, n), best first, after dropping
    each row's ``seen`` items (when given); also the first k surviving items per row (0-filled when short)."""
    ranks = np.full(len(lists), np.inf)
    top = np.zeros((len(lists), k), dtype=np.int64)
    for i, row in enumerate(lists):
        if seen is not None:
            row = row[~np.isin(row, seen[i])]
        row = row[:k]
        top[i, :len(row)] = row
        hit = np.flatnonzero(row == targets[i])
        if len(hit):
            ranks[i] = hit[0] + 1
    return ranks, top


@torch.no_grad()
def _generative_ranks(model, eval_set: EvalSet, num_items: int, exclude_seen: bool, max_k: int, batch_size: int,
                      device) -> tuple[np.ndarray, np.ndarray]:
    all_ranks, recommended = [], []
    for eb in eval_batches(eval_set, model.config.max_len, batch_size):
        offsets, flat = eb.exclude[0].numpy(), eb.exclude[1].numpy()
        seen = [np.unique(flat[offsets[i]:offsets[i + 1]]) for i in range(len(offsets) - 1)]
        targets = eb.targets.numpy()
        for start, stop in _row_chunks(seen if exclude_seen else None, len(targets), max_k):
            extra = max(len(s) for s in seen[start:stop]) if exclude_seen else 0
            ask = min(max_k + extra, model.num_items)
            rows = torch.arange(start, stop)
            batch = eb.batch
            sub = type(batch)(batch.items[rows], batch.times[rows], None,
                              None if batch.user_idx is None else batch.user_idx[rows]).to(device)
            lists, _ = model.recommend(sub, ask)
            ranks, top = ranks_from_lists(lists.cpu().numpy(), targets[start:stop],
                                          seen[start:stop] if exclude_seen else None, max_k)
            all_ranks.append(ranks)
            recommended.append(top)
    ranks = np.concatenate(all_ranks) if all_ranks else np.zeros(0)
    top = np.concatenate(recommended) if recommended else np.zeros((0, max_k), dtype=np.int64)
    return ranks, top


def _row_chunks(seen: list[np.ndarray] | None, n: int, k: int):
    """Consecutive row ranges whose rows × list length stays within GENERATIVE_ROW_BUDGET (at least one row)."""
    start = 0
    while start < n:
        stop, longest = start, 0
        while stop < n:
            longest = max(longest, k + (len(seen[stop]) if seen is not None else 0))
            if stop > start and (stop - start + 1) * longest > GENERATIVE_ROW_BUDGET:
                break
            stop += 1
        yield start, stop
        start = stop

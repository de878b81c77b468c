"""Full-ranking evaluation over the whole catalogue (architecture page, "Evaluation").

For each evaluation user the target's rank is computed against every item (never a sampled subset), walking the
users in batches and the catalogue in item chunks so memory stays O(batch × chunk). Ties count against the
target (rank = 1 + #{j ≠ target : s_j ≥ s_target}), so a model that scores everything equally gets no credit.
With ``exclude_seen`` the user's history items are removed from the ranking (a target that is itself in the
history then counts as a miss) and the flag is recorded in the result.

Metrics with a single target per user (Krichene & Rendle 2020 for why full ranking):
HR@K = 1[rank ≤ K] (= Recall@K); NDCG@K = 1[rank ≤ K] / log2(rank + 1); MRR = 1/rank (full ranking) and
MRR@K = 1[rank ≤ K]/rank; coverage@K = |∪ top-K lists| / V.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from kernels.topk import exclusion_pairs
from pipelines.jagged import EvalSet
from recsys.batching import eval_batches
from recsys.models.base import SequentialModel

KS = (1, 5, 10, 20, 50)
ITEM_CHUNK = 16384


def metrics_from_ranks(ranks: np.ndarray, ks=KS) -> dict[str, float]:
    """Aggregate 1-based target ranks (``inf`` = not ranked) into HR@K, NDCG@K, MRR@K and MRR."""
    ranks = np.asarray(ranks, dtype=np.float64)
    out: dict[str, float] = {}
    for k in ks:
        hit = ranks <= k
        out[f"hr@{k}"] = float(hit.mean())
        out[f"ndcg@{k}"] = float(np.where(hit, 1.0 / np.log2(np.where(hit, ranks, 1.0) + 1.0), 0.0).mean())
        out[f"mrr@{k}"] = float(np.where(hit, 1.0 / np.where(hit, ranks, 1.0), 0.0).mean())
    out["mrr"] = float((1.0 / ranks).mean())
    return out


@torch.no_grad()
def rank_and_top(
    queries: torch.Tensor,
    table: torch.Tensor,
    targets: torch.Tensor,
    exclude: tuple[torch.Tensor, torch.Tensor] | None,
    k: int,
    item_chunk: int = ITEM_CHUNK,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Target ranks (float, inf when excluded) and top-k item ids for each query, over item chunks.

    ``table`` includes the padding row 0, which is never ranked. The target's score is read from the same
    matmul that scores the other items (a separately computed dot product can differ in the last bit and
    break ties the wrong way); with several chunks that takes a second pass over the catalogue.
    """
    n_items, n_queries = table.shape[0], queries.shape[0]
    device = queries.device
    rows = cols = None
    target_excluded = torch.zeros(n_queries, dtype=torch.bool, device=device)
    if exclude is not None:
        rows, cols = exclusion_pairs(exclude, n_queries)
        rows, cols = rows.to(device), cols.to(device)
        target_excluded[rows[cols == targets[rows]]] = True
    chunks = [(start, min(start + item_chunk, n_items)) for start in range(0, n_items, item_chunk)]

    def scores_of(start: int, stop: int) -> torch.Tensor:
        return (queries @ table[start:stop].T).float()

    def mask(scores: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        if start == 0:
            scores[:, 0] = float("-inf")
        if rows is not None:
            inside = (cols >= start) & (cols < stop)
            scores[rows[inside], cols[inside] - start] = float("-inf")
        return scores

    target_scores = torch.empty(n_queries, device=device)
    best_scores = best_idx = None
    for start, stop in chunks:
        scores = scores_of(start, stop)
        here = (targets >= start) & (targets < stop)
        target_scores[here] = scores[here, targets[here] - start]
        scores = mask(scores, start, stop)
        if len(chunks) == 1:
            better = (scores >= target_scores[:, None]).sum(dim=1)
        chunk_scores, chunk_idx = torch.topk(scores, min(k, stop - start), dim=1)
        chunk_idx += start
        if best_scores is None:
            best_scores, best_idx = chunk_scores, chunk_idx
        else:
            merged = torch.cat([best_scores, chunk_scores], 1)
            order = torch.topk(merged, min(k, merged.shape[1]), dim=1).indices
            best_scores = torch.gather(merged, 1, order)
            best_idx = torch.gather(torch.cat([best_idx, chunk_idx], 1), 1, order)
    if len(chunks) > 1:
        better = torch.zeros(n_queries, dtype=torch.long, device=device)
        for start, stop in chunks:
            better += (mask(scores_of(start, stop), start, stop) >= target_scores[:, None]).sum(dim=1)
    # ``better`` counted the target itself (s ≥ s); that makes it the 1-based rank.
    ranks = better.double()
    ranks[target_excluded | ~torch.isfinite(target_scores)] = math.inf
    return ranks, best_idx


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
    """Full-ranking metrics of ``model`` on ``eval_set``; the result records ``exclude_seen`` and the user count."""
    was_training = model.training
    model.eval()
    max_k = max(ks)
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
    result = metrics_from_ranks(ranks, ks)
    top = np.concatenate(recommended) if recommended else np.zeros((0, max_k), dtype=np.int64)
    for k in ks:
        result[f"coverage@{k}"] = float(len(np.unique(top[:, :k])) / num_items) if len(top) else 0.0
    result["num_users"] = int(len(ranks))
    result["exclude_seen"] = bool(exclude_seen)
    return result

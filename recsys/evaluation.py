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

import numpy as np
import torch

from kernels.topk import target_ranks, topk_scores
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

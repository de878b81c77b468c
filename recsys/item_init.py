"""Item tables that start from what is known about the items instead of noise (model-specs §14).

``item_init=text``: an ID-based model's item table starts from the principal components of the items' frozen text
embeddings, then trains as usual: "LLMInit" in Liu et al., "LLM-ESR: Large Language Models Enhancement for Long-tailed
Sequential Recommendation" (NeurIPS 2024, §4.1 baselines: PCA of the LLM item embeddings to the model's size), and
the finding of Qu et al., "The Elephant in the Room: Rethinking the Usage of Pre-trained Language Model in Sequential
Recommendation" (RecSys 2024, §5) that initialising the item table of SASRec/BERT4Rec from a language model is the
cheapest way to use one: it costs nothing at inference. Items with similar text start close together, in the input
table and, tied, in the scoring table, which helps the many items with few interactions.

The text embeddings are those of ``recsys.text`` (the bundled MiniLM unless a local encoder is named), centred and
projected on their first d principal directions: E₀ = s · (T − mean T) V_d, with V_d the top-d right singular
vectors of the centred T and the scale s chosen so that E₀ has the standard deviation of the table the model's own
initialisation drew (so the model's learning-rate and initialisation choices still hold).

``item_init=cooccurrence``, for catalogues without text: the table starts from a factorisation of how items follow
each other in the TRAINING sequences only (never a validation or test target). Levy & Goldberg, "Neural Word
Embedding as Implicit Matrix Factorization" (NIPS 2014, §3-4): skip-gram with negative sampling factorises the
shifted pointwise mutual information of co-occurrences, and the truncated SVD of the positive PMI matrix is its
closed-form counterpart (item2vec, Barkan & Koenigstein 2016, is skip-gram over item sequences). Counts pair items
at most ``COOCCURRENCE_WINDOW`` steps apart in a user's sequence, weighted 1/distance, both directions:
PPMI(i, j) = max(0, log(C_ij · C / (C_i · C_j))), and E₀ = s · U_d √Σ_d of its top-d singular triplets, rescaled as
above. Items without a positive PMI in training (never co-occurring, mostly) keep their random rows.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict


COOCCURRENCE_WINDOW = 3  # the item2vec/word2vec habit of a few steps; nearer neighbours count more (1/distance)


class ItemInitSettings(BaseModel):
    """A model config's fields for the initialisation; ``random`` (the default) is the model unchanged."""

    model_config = ConfigDict(extra="forbid")
    item_init: Literal["random", "text", "cooccurrence"] = "random"
    item_init_encoder: str | None = None  # item_init=text: a local transformers directory; None: the bundled MiniLM


def principal_components(embeddings: np.ndarray, d: int) -> tuple[torch.Tensor, float]:
    """(V, d) projections of the centred ``embeddings`` (V, D) on their top-d principal directions, and the share
    of the variance they keep."""
    x = torch.from_numpy(np.asarray(embeddings, dtype=np.float64))
    if d > min(x.shape):
        raise ValueError(f"item_init=text needs hidden size ≤ {min(x.shape)} (the text embeddings' rank bound), "
                         f"got {d}")
    x = x - x.mean(0)
    u, s, _ = torch.linalg.svd(x, full_matrices=False)
    kept = float((s[:d] ** 2).sum() / (s ** 2).sum().clamp_min(1e-30))
    return u[:, :d] * s[:d], kept


def cooccurrence_factors(train, num_items: int, d: int) -> torch.Tensor:
    """(num_items, d) rows U_d √Σ_d of the positive PMI of item co-occurrences in ``train`` (a ``Jagged`` of
    training sequences); all-zero rows for items without a positive PMI (those that never co-occur, mostly)."""
    items, rows = np.asarray(train.items, dtype=np.int64) - 1, train.row_ids()
    heads, tails, weights = [], [], []
    for gap in range(1, COOCCURRENCE_WINDOW + 1):
        same_user = rows[:-gap] == rows[gap:]
        a, b = items[:-gap][same_user], items[gap:][same_user]
        heads += [a, b]
        tails += [b, a]
        weights.append(np.full(2 * len(a), 1.0 / gap))
    counts = torch.sparse_coo_tensor(torch.from_numpy(np.stack([np.concatenate(heads), np.concatenate(tails)])),
                                     torch.from_numpy(np.concatenate(weights)), (num_items, num_items),
                                     check_invariants=True).coalesce()
    (i, j), c = counts.indices(), counts.values()
    marginal = torch.zeros(num_items, dtype=torch.float64).index_add_(0, i, c)
    pmi = torch.log(c * c.sum() / (marginal[i] * marginal[j]))
    keep = pmi > 0
    ppmi = torch.sparse_coo_tensor(torch.stack([i[keep], j[keep]]), pmi[keep], (num_items, num_items),
                                   check_invariants=True)
    u, s, _ = torch.svd_lowrank(ppmi, q=min(d + 10, num_items), niter=6)
    return u[:, :d] * s[:d].sqrt()


class ItemInitialised:
    """Mixed into a model (``class BSARec(ItemInitialised, SequentialModel)``) whose config has
    ``ItemInitSettings`` and whose input table is ``self.item_embedding``; runs in the ``prepare`` hook, after the
    model's own initialisation and before training (a bundle restores the trained table, so this runs once)."""

    def prepare(self, dataset) -> dict[str, dict[str, float]]:
        figures = super().prepare(dataset)
        if self.config.item_init == "random":
            return figures
        items = self.item_embedding.weight[1:self.num_items + 1]  # not the padding row nor special tokens
        if self.config.item_init == "text":
            from recsys.text import TextEncoder, dataset_text_embeddings

            text = dataset_text_embeddings(dataset, self.num_items, TextEncoder(self.config.item_init_encoder))
            init, kept = principal_components(text, items.shape[1])
            known = torch.ones(self.num_items, dtype=torch.bool)
            figure = {"text_variance_kept": kept}
        else:
            init = cooccurrence_factors(dataset.split().train, self.num_items, items.shape[1])
            known = init.abs().sum(1) > 0
            figure = {"items_with_cooccurrences": float(known.double().mean())}
        scale = items.detach().double().std() / init[known].std().clamp_min(1e-30)
        with torch.no_grad():
            items[known] = (init[known] * scale).to(items.dtype)
        return {**figures, "item_init": figure}

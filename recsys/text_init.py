"""Item embeddings initialised from item text (model-specs §14).

An ID-based model's item table starts from the principal components of the items' frozen text embeddings instead of
noise, then trains as usual: "LLMInit" in Liu et al., "LLM-ESR: Large Language Models Enhancement for Long-tailed
Sequential Recommendation" (NeurIPS 2024, §4.1 baselines: PCA of the LLM item embeddings to the model's size), and
the finding of Qu et al., "The Elephant in the Room: Rethinking the Usage of Pre-trained Language Model in Sequential
Recommendation" (RecSys 2024, §5) that initialising the item table of SASRec/BERT4Rec from a language model is the
cheapest way to use one: it costs nothing at inference. Items with similar text start close together, in the input
table and, tied, in the scoring table, which helps the many items with few interactions.

The text embeddings are those of ``recsys.text`` (the bundled MiniLM unless a local encoder is named), centred and
projected on their first d principal directions: E₀ = s · (T − mean T) V_d, with V_d the top-d right singular
vectors of the centred T and the scale s chosen so that E₀ has the standard deviation of the table the model's own
initialisation drew (so the model's learning-rate and initialisation choices still hold).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict


class TextInitSettings(BaseModel):
    """A model config's fields for the initialisation; ``random`` (the default) is the model unchanged."""

    model_config = ConfigDict(extra="forbid")
    item_init: Literal["random", "text"] = "random"
    item_init_encoder: str | None = None  # a local transformers directory; None: the bundled MiniLM


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


class TextInitialised:
    """Mixed into a model (``class BSARec(TextInitialised, SequentialModel)``) whose config has
    ``TextInitSettings`` and whose input table is ``self.item_embedding``; runs in the ``prepare`` hook, after the
    model's own initialisation and before training (a bundle restores the trained table, so this runs once)."""

    def prepare(self, dataset) -> dict[str, dict[str, float]]:
        figures = super().prepare(dataset)
        if self.config.item_init != "text":
            return figures
        from recsys.text import TextEncoder, dataset_text_embeddings

        items = self.item_embedding.weight[1:self.num_items + 1]  # not the padding row nor special tokens
        text = dataset_text_embeddings(dataset, self.num_items, TextEncoder(self.config.item_init_encoder))
        init, kept = principal_components(text, items.shape[1])
        scale = items.detach().double().std() / init.std().clamp_min(1e-30)
        with torch.no_grad():
            items.copy_(init * scale)
        return {**figures, "item_init": {"text_variance_kept": kept}}

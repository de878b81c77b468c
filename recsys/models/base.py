"""The model contract (architecture page, "Model contract") and the registry.

A model is an ``nn.Module`` registered under a name with a pydantic config. Score-based models implement
``encode(batch) -> (B, D)`` and ``item_embeddings() -> (V+1, D)``; scores are ``encode @ item_embeddings.T``.
Every model implements ``loss(batch)`` (or ``fit`` for count-based baselines). Configs are typed, serialise into
``config.json`` and back, and are the source of the MLflow params.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

from pipelines.jagged import Jagged
from recsys.batching import CausalTrainBatches, SequenceBatch

MODELS: dict[str, type["SequentialModel"]] = {}


class ModelConfig(BaseModel):
    """Fields common to every model. Unknown keys are an error, so a typo in ``--set`` never passes silently."""

    model_config = ConfigDict(extra="forbid")
    max_len: int = 50


class SequentialModel(nn.Module):
    name: ClassVar[str]
    Config: ClassVar[type[ModelConfig]] = ModelConfig
    # True when the model learns by gradient descent; False for fitted baselines.
    trainable: ClassVar[bool] = True
    # TrainConfig fields this model trains best with (measured; see the README's model table); --set overrides.
    train_defaults: ClassVar[dict[str, Any]] = {}
    # True for generative models (semantic ids): they implement ``recommend`` and have no ``item_embeddings``.
    generative: ClassVar[bool] = False

    def __init__(self, config: ModelConfig, num_items: int):
        super().__init__()
        self.config = config
        self.num_items = num_items

    def encode(self, batch: SequenceBatch) -> torch.Tensor:
        raise NotImplementedError

    def item_embeddings(self) -> torch.Tensor:
        raise NotImplementedError

    def loss(self, batch: SequenceBatch) -> torch.Tensor:
        raise NotImplementedError

    def similar_item_vectors(self) -> torch.Tensor:
        """Item vectors (V + 1, d), row 0 padding, whose cosine similarity defines "similar items" (the service's
        ``/similar``): the scoring table by default; generative models, which have none, give content vectors."""
        return self.item_embeddings()

    def prepare(self, dataset) -> dict[str, dict[str, float]]:
        """Look at the processed dataset once, after construction and before training (e.g. TIGER encodes item
        text and fits its semantic ids here). Whatever it learns must live in buffers or parameters whose shapes
        follow from the config and ``num_items``, so a bundle restores it. Returns figures about it (section →
        flat dict) that the run logs to MLflow and keeps in ``metrics.json``. Most models need nothing."""
        return {}

    @torch.no_grad()
    def recommend(self, batch: SequenceBatch, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k item ids (B, k) in 1..V and their scores (B, k), best first: the one entry point shared by
        score-based models (here, ``encode @ item_embeddings.T`` over the whole catalogue, padding excluded) and
        generative ones (which override it)."""
        scores = self.encode(batch) @ self.item_embeddings()[1:].T
        top_scores, top = scores.topk(min(k, scores.shape[1]), dim=1)
        return top + 1, top_scores

    def prepare_training(self, train: Jagged) -> None:
        """Called by ``Trainer.fit`` once before training with the TRAINING split only (never valid/test targets):
        hands the loss the training-target counts per item (``SequenceLoss.prepare``), which sampled losses need
        for popularity sampling and the logQ correction. Nothing is stored in the state dict: it is recomputed
        from the split on every fit (and on resume)."""
        loss_fn = getattr(self, "loss_fn", None)
        if loss_fn is not None and hasattr(loss_fn, "prepare"):
            from recsys.losses import training_target_counts

            loss_fn.prepare(training_target_counts(train, self.num_items))

    def train_batches(self, users: np.ndarray, train: Jagged, batch_size: int):
        """The training batches this model learns from: an object with ``epoch(rng)`` yielding SequenceBatches
        and ``__len__``. Causal models train on every position at once; models that look ahead override this."""
        return CausalTrainBatches(users, train, self.config.max_len, batch_size)

    def fit(self, users: np.ndarray, train: Jagged) -> None:
        """Closed-form fit for non-trainable baselines."""
        raise NotImplementedError

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def left_pad_positions(items: torch.Tensor, max_len: int) -> torch.Tensor:
    """Position ids for left-padded ``items`` (B, T): the last column is ``max_len`` whatever T is, so a history
    gets the same position embeddings at any batch width (padding never changes a score); pads get 0."""
    width = items.shape[1]
    if width > max_len:
        raise ValueError(f"sequence of width {width} exceeds max_len {max_len}")
    positions = torch.arange(max_len - width + 1, max_len + 1, device=items.device)
    return positions.expand_as(items).masked_fill(items == 0, 0)


def register(cls: type[SequentialModel]) -> type[SequentialModel]:
    if cls.name in MODELS:
        raise ValueError(f"model {cls.name!r} registered twice")
    MODELS[cls.name] = cls
    return cls


def model_class(name: str) -> type[SequentialModel]:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(sorted(MODELS))}")
    return MODELS[name]


def build_model(name: str, num_items: int, config: dict[str, Any] | ModelConfig | None = None) -> SequentialModel:
    cls = model_class(name)
    if not isinstance(config, ModelConfig):
        config = cls.Config(**(config or {}))
    return cls(config, num_items)

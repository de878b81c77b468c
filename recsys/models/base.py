"""The model contract (architecture page, "Model contract") and the registry.

A model is an ``nn.Module`` registered under a name with a pydantic config. Score-based models implement
``encode(batch) -> (B, D)`` and ``item_embeddings() -> (V+1, D)``; scores are ``encode @ item_embeddings.T``.
Every model implements ``loss(batch)`` (or ``fit`` for count-based baselines). Configs are typed, serialise into
``config.json`` and back, and are the source of the MLflow params.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

from pipelines.jagged import Jagged
from recsys.batching import SequenceBatch
from recsys.ranking import ExactSearch, Exclusions, Ranking, Searcher, drop_excluded, excluded_rows, \
    ranks_in_lists, row_chunks
from recsys.supervision import EveryPosition, Supervision

MODELS: dict[str, type["SequentialModel"]] = {}


class ModelConfig(BaseModel):
    """Fields common to every model. Unknown keys are an error, so a typo in ``--set`` never passes silently."""

    model_config = ConfigDict(extra="forbid")
    max_len: int = 50


@dataclass(frozen=True)
class Borrowed:
    """Something a model takes from another run's bundle, handed to its constructor by the run path (a model never
    loads bundles): ``field`` is the config field holding the bundle directory, ``part`` what is taken (its detached
    scoring table, or the whole model, frozen), ``provider`` the model whose run in the same report hands its bundle
    over when the field is unset."""

    field: str
    part: Literal["item_table", "model"]
    provider: str | None = None


class SequentialModel(nn.Module):
    name: ClassVar[str]
    Config: ClassVar[type[ModelConfig]] = ModelConfig
    # True when the model learns by gradient descent; False for fitted baselines.
    trainable: ClassVar[bool] = True
    # TrainConfig fields this model trains best with (measured; docs/results.md); --set overrides.
    train_defaults: ClassVar[dict[str, Any]] = {}
    # True for generative models (GenerativeModel): they rank by search and have no ``item_embeddings``.
    generative: ClassVar[bool] = False
    # constructor argument → what it takes from another run's bundle (SLMRec: SASRec's item table, its teacher)
    borrows: ClassVar[dict[str, Borrowed]] = {}

    def __init__(self, config: ModelConfig, num_items: int):
        super().__init__()
        self.config = config
        self.num_items = num_items

    # What the model learns from (batches and supervised positions); models that look ahead or mask override it.
    supervision: Supervision = EveryPosition()

    def sequence_states(self, batch: SequenceBatch) -> torch.Tensor:
        """The encoder's output at every position, (B, T, d), for a left-padded batch."""
        raise NotImplementedError

    def queries(self, states: torch.Tensor) -> torch.Tensor:
        """Query vectors scored against ``item_embeddings()`` from encoder states (N, d): themselves by default;
        a model with an output transform or bias (BERT4Rec) maps them here."""
        return states

    def encode(self, batch: SequenceBatch) -> torch.Tensor:
        """The query (B, d) at the prediction point, the last column."""
        return self.queries(self.sequence_states(batch)[:, -1, :])

    def item_embeddings(self) -> torch.Tensor:
        """The scoring table (V + 1, d), row 0 padding: the tied input table by default."""
        return self.item_embedding.weight

    def loss(self, batch: SequenceBatch) -> torch.Tensor:
        """The loss object ``self.loss_fn`` at the positions ``self.supervision`` supervises."""
        return self.supervision.loss(self, batch)

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
    def recommend(self, batch: SequenceBatch, k: int, exclude: Exclusions | None = None,
                  targets: torch.Tensor | None = None, searcher: Searcher | None = None) -> Ranking:
        """The top-k items of each row (and, given ``targets``, each target's rank): the one entry point of
        evaluation and serving (``recsys.ranking``). Score-based models search ``encode @ item_embeddings.T`` with
        ``searcher`` (exact over the whole catalogue when None); the target rank is always exact."""
        queries = self.encode(batch)
        exact = ExactSearch(self.item_embeddings())
        items, scores = (searcher or exact).top(queries, k, exclude)
        return Ranking(items, scores, None if targets is None else exact.target_ranks(queries, targets, exclude))

    def prepare_training(self, train: Jagged) -> None:
        """Called by ``Trainer.fit`` once before training with the TRAINING split only (never valid/test targets):
        hands the loss the training-target counts per item (``SequenceLoss.prepare``), which sampled losses need
        for popularity sampling and the logQ correction. Nothing is stored in the state dict: it is recomputed
        from the split on every fit (and on resume)."""
        loss_fn = getattr(self, "loss_fn", None)
        if loss_fn is not None and hasattr(loss_fn, "prepare"):
            from recsys.losses import training_target_counts

            loss_fn.prepare(training_target_counts(train, self.num_items))

    def start_epoch(self, epoch: int) -> None:
        """Called by ``Trainer.fit`` before each training epoch (ICSRec re-clusters its intents here)."""

    def train_batches(self, users: np.ndarray, train: Jagged, batch_size: int):
        """The training batches this model learns from: an object with ``epoch(rng)`` yielding SequenceBatches
        and ``__len__``, as ``self.supervision`` decides."""
        return self.supervision.batches(users, train, self.config.max_len, batch_size)

    def fit(self, users: np.ndarray, train: Jagged) -> None:
        """Closed-form fit for non-trainable baselines."""
        raise NotImplementedError

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


class GenerativeModel(SequentialModel):
    """A model that generates its lists (semantic-id decoders) instead of scoring a catalogue table: it implements
    ``beam_search`` and inherits ``recommend``, which asks each search for k + |excluded| items (in row chunks of at
    most ROW_BUDGET rows × list length, since beams widen with the list), drops the excluded ones, and ranks a target
    by its place in the list (inf when absent, so MRR is over the list, not the catalogue)."""

    generative = True
    ROW_BUDGET = 16384

    def beam_search(self, batch: SequenceBatch, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """n distinct items (B, n) in 1..V (0 where fewer exist) and their scores, best first."""
        raise NotImplementedError

    @torch.no_grad()
    def recommend(self, batch: SequenceBatch, k: int, exclude: Exclusions | None = None,
                  targets: torch.Tensor | None = None, searcher: Searcher | None = None) -> Ranking:
        if searcher is not None:
            raise ValueError(f"{self.name} ranks by its own search and takes no searcher")
        excluded = None if exclude is None else excluded_rows(exclude)
        extra = np.zeros(len(batch.items), dtype=np.int64) if excluded is None else np.array([len(e) for e in excluded])
        parts = []
        for start, stop in row_chunks(extra, k, self.ROW_BUDGET):
            rows = slice(start, stop)
            sub = SequenceBatch(batch.items[rows], batch.times[rows], None,
                                None if batch.user_idx is None else batch.user_idx[rows])
            items, scores = self.beam_search(sub, min(k + int(extra[rows].max(initial=0)), self.num_items))
            parts.append(drop_excluded(items, scores, None if excluded is None else excluded[rows], k))
        items, scores = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        return Ranking(items, scores, None if targets is None else ranks_in_lists(items, targets.to(items.device)))


def register(cls: type[SequentialModel]) -> type[SequentialModel]:
    if cls.name in MODELS:
        raise ValueError(f"model {cls.name!r} registered twice")
    MODELS[cls.name] = cls
    return cls


def model_class(name: str) -> type[SequentialModel]:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(sorted(MODELS))}")
    return MODELS[name]


def build_model(name: str, num_items: int, config: dict[str, Any] | ModelConfig | None = None,
                **borrowed: Any) -> SequentialModel:
    """``borrowed``: the inputs the model ``borrows`` from other runs (``recsys.bundle.borrowed_inputs``)."""
    cls = model_class(name)
    if not isinstance(config, ModelConfig):
        config = cls.Config(**(config or {}))
    return cls(config, num_items, **borrowed)

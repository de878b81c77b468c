"""ReaRec: implicit multi-step reasoning after the sequence, for causal encoders (Tang et al., "Think Before
Recommend: Unleashing the Latent Reasoning Power for Sequential Recommendation", 2025, §3; model-specs §11).

The encoder's last state h₀ is fed back as one more input token with the k-th reasoning position embedding r_k
added (which keeps reasoning tokens apart from item positions): h_k is the state at the new last position of
f([X; h₀ + r₁; …; h_{k−1} + r_k]), k = 1..K (§3.2). Two learning methods (§3.3; loss objects in recsys/losses.py):

- ``erl`` (Ensemble Reasoning Learning): cross-entropy of the mean of h₀..h_K, minus λ times the mean pairwise KL
  between the steps' item distributions so the steps do not collapse onto one; the user vector is that mean.
- ``prl`` (Progressive Reasoning Learning): the last step's cross-entropy plus the earlier steps' at temperatures
  τ·s^(K−k) (softer early, sharper late), and a contrastive term between two passes whose reasoning tokens carry
  Gaussian noise (reasoning-aware contrastive learning); the user vector is h_K.

Each state needs its own chain, so a reasoning model trains on every prefix at its last position (``LastPosition``;
a causal encoder ignores left pads, so prefix batches are only as wide as their longest prefix). ``inference_steps``
sets K at inference (at most the trained K; default: the trained K). Differences from the authors' code: the noise
is on from the first epoch (they wait two), and the temperature is 1 (our logits are unscaled dot products).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from recsys.batching import SequenceBatch
from recsys.losses import EnsembleReasoning, ProgressiveReasoning
from recsys.supervision import LastPosition


class ReasoningSettings(BaseModel):
    """ReaRec's fields of a causal encoder's config; ``reasoning_steps=0`` is the plain encoder."""

    model_config = ConfigDict(extra="forbid")
    reasoning_steps: int = Field(0, ge=0)  # K while training
    reasoning: Literal["erl", "prl"] = "erl"
    inference_steps: int | None = Field(None, ge=0)  # K at inference; None: reasoning_steps
    reasoning_temperature: float = Field(1.0, gt=0)  # τ
    reasoning_kl_weight: float = 0.05  # ERL's λ (the authors' default)
    reasoning_temperature_scale: float = Field(5.0, gt=0)  # PRL's s (the authors' default)
    reasoning_noise: float = Field(0.01, ge=0)  # PRL's noise std on reasoning tokens (the authors' default)
    reasoning_contrast_weight: float = Field(1.0, ge=0)  # PRL's contrastive weight (the authors' default)

    @model_validator(mode="after")
    def _steps(self):
        if self.inference_steps is not None and self.inference_steps > self.reasoning_steps:
            raise ValueError(f"inference_steps {self.inference_steps} exceeds the {self.reasoning_steps} reasoning "
                             "steps trained (their reasoning position embeddings would be untrained)")
        return self


class Reasoning:
    """Mixed into a causal model (``class SASRec(Reasoning, SequentialModel)``) whose config has
    ``ReasoningSettings``; the model splits ``sequence_states`` into ``embed(batch) -> (x, padding)`` and
    ``encode_embedded(x, padding) -> states`` and calls ``setup_reasoning(d)`` before its init."""

    def setup_reasoning(self, dim: int) -> None:
        c = self.config
        if not c.reasoning_steps:
            return  # the plain encoder: no parameter, no change to its initialisation
        self.reasoning_positions = nn.Embedding(c.reasoning_steps, dim)
        self.supervision = LastPosition()
        self.reasoning_loss = (EnsembleReasoning(c.reasoning_temperature, c.reasoning_kl_weight)
                               if c.reasoning == "erl" else
                               ProgressiveReasoning(c.reasoning_temperature, c.reasoning_temperature_scale,
                                                    c.reasoning_contrast_weight))

    def sequence_states(self, batch: SequenceBatch) -> torch.Tensor:
        return self.encode_embedded(*self.embed(batch))

    def reasoning_states(self, batch: SequenceBatch, steps: int, noise: float = 0.0) -> torch.Tensor:
        """h₀..h_steps (B, steps + 1, d)."""
        x, padding = self.embed(batch)
        h = self.encode_embedded(x, padding)[:, -1]
        states = [h]
        for k in range(steps):
            token = h + self.reasoning_positions.weight[k]
            if noise:
                token = token + noise * torch.randn_like(token)
            x = torch.cat([x, token[:, None]], dim=1)
            padding = nn.functional.pad(padding, (0, 1), value=False)
            h = self.encode_embedded(x, padding)[:, -1]
            states.append(h)
        return torch.stack(states, dim=1)

    def encode(self, batch: SequenceBatch) -> torch.Tensor:
        c = self.config
        steps = c.reasoning_steps if c.inference_steps is None else c.inference_steps
        if not steps:
            return super().encode(batch)
        states = self.reasoning_states(batch, steps)
        return states.mean(dim=1) if c.reasoning == "erl" else states[:, -1]

    def loss(self, batch: SequenceBatch) -> torch.Tensor:
        c = self.config
        if not c.reasoning_steps:
            return super().loss(batch)
        noise = c.reasoning_noise if c.reasoning == "prl" else 0.0
        states = self.reasoning_states(batch, c.reasoning_steps, noise)
        other = None
        if c.reasoning == "prl" and c.reasoning_contrast_weight:
            other = self.reasoning_states(batch, c.reasoning_steps, noise)  # a second view: new noise and dropout
        return self.reasoning_loss(states, batch.targets[:, -1], self.item_embeddings(), other)

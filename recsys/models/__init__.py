"""Model registry: importing this package registers every built-in model."""

from recsys.models.base import MODELS, ModelConfig, SequentialModel, build_model, model_class, register
# importing a model module registers it (side effect)
from recsys.models import (  # noqa: F401
    bert4rec, bsarec, gru4rec, mamba4rec, pop, sasrec, sid_decoder, sigma, slmrec, tiger, tim4rec)

__all__ = ["MODELS", "ModelConfig", "SequentialModel", "build_model", "model_class", "register"]

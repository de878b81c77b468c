"""Model registry: importing this package registers every built-in model."""

from recsys.models.base import MODELS, ModelConfig, SequentialModel, build_model, model_class, register
# importing a model module registers it (side effect)
from recsys.models import bert4rec, bsarec, gru4rec, mamba4rec, pop, sasrec, sigma, slmrec, tiger, tim4rec  # noqa: F401

__all__ = ["MODELS", "ModelConfig", "SequentialModel", "build_model", "model_class", "register"]

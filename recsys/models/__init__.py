"""Model registry: importing this package registers every built-in model."""

from recsys.models.base import MODELS, ModelConfig, SequentialModel, build_model, model_class, register
from recsys.models import gru4rec, pop, sasrec  # noqa: F401  (registration side effect)

__all__ = ["MODELS", "ModelConfig", "SequentialModel", "build_model", "model_class", "register"]

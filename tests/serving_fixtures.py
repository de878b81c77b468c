"""Small bundles for the service tests: random-weight models over a toy catalogue with external ids ``it<i>``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch

import recsys.models  # noqa: F401  (registers the models)
from recsys.bundle import save_bundle
from recsys.models.base import build_model
from tests.helpers import TINY_GENERATIVE, fitted_tiny_generative

NUM_ITEMS = 40


def toy_items(num_items: int = NUM_ITEMS) -> pd.DataFrame:
    idx = np.arange(1, num_items + 1)
    return pd.DataFrame({"item_idx": idx, "item_id": [f"it{i}" for i in idx], "title": [f"Item {i}" for i in idx],
                         "popularity": (num_items + 1 - idx) * 3})


def make_bundle(path: Path, model: str = "sasrec", seed: int = 0, **config) -> Path:
    if model in TINY_GENERATIVE:  # semantic ids from random "text", no hidden_size
        network = fitted_tiny_generative(model, NUM_ITEMS, seed=seed, **{"max_len": 8, **config})
    else:
        torch.manual_seed(seed)
        network = build_model(model, NUM_ITEMS, {"hidden_size": 16, "max_len": 8, **config})
    metrics = {"test": {"hr@10": 0.5, "ndcg@10": 0.25, "mrr": 0.2, "exclude_seen": True}}
    return save_bundle(path, network.eval(), {"exclude_seen": True}, toy_items(), metrics)

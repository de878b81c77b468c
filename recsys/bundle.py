"""Model bundles: what training produces and what evaluation and serving load (architecture page, "Bundle").

A bundle is a directory with ``config.json`` (model name, resolved configs, dataset identity), ``weights.safetensors``
(no pickle anywhere), ``items.parquet`` (the id map and titles) and ``metrics.json``, and from a training run
``test_ranks.parquet`` (each test user's target rank). It is written atomically: a directory that has the four
required files was written completely (``config.json`` comes last, renamed into place whole).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from safetensors.torch import load_file, save_file

from kernels.atomic import atomic_directory, atomic_write_bytes
from recsys.models import SequentialModel, build_model, model_class
from recsys.models.base import ModelConfig

FORMAT_VERSION = 1
BUNDLE_FILES = ("config.json", "weights.safetensors", "items.parquet", "metrics.json")
USER_RANKS = "test_ranks.parquet"  # optional: each test user's target rank, for paired significance tests


@dataclass
class Bundle:
    path: Path
    model: SequentialModel
    config: dict
    items: pd.DataFrame
    metrics: dict


def save_bundle(out_dir: str | Path, model: SequentialModel, config: dict, items: pd.DataFrame, metrics: dict,
                user_ranks: pd.DataFrame | None = None) -> Path:
    """Write a bundle. ``config`` carries train config and dataset identity; the model's own config is added;
    ``user_ranks`` (user_idx and each test user's target rank) goes to ``test_ranks.parquet``."""
    out_dir = Path(out_dir)
    full_config = {
        "format_version": FORMAT_VERSION,
        "model": model.name,
        "model_config": model.config.model_dump(mode="json"),
        "num_items": model.num_items,
        **config,
    }
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_directory(out_dir, marker="config.json") as tmp:
        save_file(state, str(tmp / "weights.safetensors"))
        columns = [c for c in ("item_idx", "item_id", "title", "popularity") if c in items.columns]
        items[columns].to_parquet(tmp / "items.parquet", index=False)
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
        if user_ranks is not None:
            user_ranks.to_parquet(tmp / USER_RANKS, index=False)
        # last and whole: the four files together say complete, even in the temporary directory
        atomic_write_bytes(tmp / "config.json", json.dumps(full_config, indent=2, sort_keys=True).encode())
    return out_dir


def load_bundle(path: str | Path, device: str | torch.device = "cpu") -> Bundle:
    path = Path(path)
    missing = [f for f in BUNDLE_FILES if not (path / f).is_file()]
    if missing:
        raise FileNotFoundError(f"{path} is not a complete bundle: missing {', '.join(missing)}")
    config = json.loads((path / "config.json").read_text())
    if config.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: bundle format {config.get('format_version')} is not supported ({FORMAT_VERSION})")
    model = build_model(config["model"], config["num_items"], config["model_config"])
    try:
        model.load_state_dict(load_file(str(path / "weights.safetensors")))
    except RuntimeError as err:  # e.g. a bundle saved before a model gained a layer that is now on by default
        raise ValueError(f"{path}: weights.safetensors does not fit the {config['model']} config it was saved with "
                         f"(saved by another version?): {err}") from err
    model.to(device).eval()
    items = pd.read_parquet(path / "items.parquet")
    metrics = json.loads((path / "metrics.json").read_text())
    return Bundle(path=path, model=model, config=config, items=items, metrics=metrics)


def borrowed_inputs(name: str, config: ModelConfig, num_items: int) -> dict:
    """The inputs model ``name`` ``borrows`` from the bundles its ``config`` names, for ``build_model``: a bundle's
    scoring table (detached) or its whole model (frozen, in eval mode). Loading them never draws from this run's
    random stream. A bundle must be of the same catalogue."""
    out = {}
    for arg, spec in model_class(name).borrows.items():
        path = getattr(config, spec.field)
        if path is None:
            continue
        if not Path(path).is_dir():
            raise FileNotFoundError(f"{spec.field} {path} not found")
        with torch.random.fork_rng(devices=[]):
            model = load_bundle(path).model
        if model.num_items != num_items:
            raise ValueError(f"{spec.field} {path} has {model.num_items} items, this dataset {num_items}: "
                             "train it on the same dataset")
        if spec.part == "model":
            out[arg] = model.requires_grad_(False).eval()
            continue
        try:
            out[arg] = model.item_embeddings().detach().float().clone()
        except (NotImplementedError, AttributeError):
            raise ValueError(f"{path} ({model.name}) has no item table to borrow") from None
    return out

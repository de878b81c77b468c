"""One training run end to end: dataset → split → model → trainer → final metrics → bundle → MLflow.

Under torchrun every rank runs this same function: all ranks train and evaluate (``recsys.trainer``,
``recsys.evaluation``), and rank 0 alone writes the bundle, removes the checkpoint and talks to MLflow."""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pandas as pd

from kernels.atomic import atomic_write_bytes, sweep_stale_temporaries
from pipelines.build import Engine, build_dataset
from pipelines.cli import parse_settings as parse_overrides  # noqa: F401  (one parser for --set)
from pipelines.dataset import ProcessedDataset, load_dataset
from pipelines.jagged import Split
from recsys import distributed
from recsys.bundle import borrowed_inputs, save_bundle
from recsys.evaluation import cutoffs, evaluate, evaluate_users, item_percentiles
from recsys.models import build_model, model_class
from recsys.tracking import RunLog, Tracker
from recsys.trainer import TrainConfig, Trainer


@dataclass
class RunResult:
    bundle_dir: Path
    metrics: dict
    model_version: str | None
    run_id: str | None


@dataclass(frozen=True)
class Recipe:
    """A procedure of several runs that ``recsys report`` lists like a model (e.g. SLMRec's distillation), so the
    report names none: ``settings()`` are the keys it accepts; ``run(ds, settings, results, **kw)`` trains with the
    results of the models listed before it and returns (report rows: name → RunResult, the registry model each
    row's version belongs to, lines for the report's notes)."""

    name: str
    settings: Callable[[], set[str]]
    run: Callable[..., tuple[dict[str, "RunResult"], dict[str, str], list[str]]]


RECIPES: dict[str, Recipe] = {}


def register_recipe(recipe: Recipe) -> Recipe:
    RECIPES[recipe.name] = recipe
    return recipe


def scoped_settings(overrides: dict[str, Any], scopes: dict[str, set[str] | None],
                    plain_to: list[str] | None = None) -> dict[str, dict[str, Any]]:
    """The one reading of scoped ``--set`` values (``recsys report``'s models, ``recsys distill``'s roles):
    ``scope.key=value`` goes to that scope; a plain ``key=value`` to every scope of ``plain_to`` (default: all)
    that accepts it, and a scoped value wins over a plain one whatever the order given. ``scopes`` maps each
    scope to the keys it accepts (None: any, checked later by the run it reaches)."""
    own: dict[str, dict[str, Any]] = {scope: {} for scope in scopes}
    for key, value in sorted(overrides.items(), key=lambda kv: "." in kv[0]):
        scope, dot, name = key.partition(".")
        if dot:
            if scope not in scopes:
                raise ValueError(f"setting {key!r}: {scope!r} is not one of {list(scopes)}")
            if scopes[scope] is not None and name not in scopes[scope]:
                raise ValueError(f"setting {key!r}: {scope} has no setting {name!r}")
            own[scope][name] = value
            continue
        takers = [s for s in (plain_to or list(scopes)) if scopes[s] is None or key in scopes[s]]
        if not takers:
            raise ValueError(f"setting(s) {[key]} apply to none of {list(scopes)}")
        for scope in takers:
            own[scope][key] = value
    return own


def model_settings(model_name: str) -> set[str]:
    """Every key ``--set`` may give a run of ``model_name``: its config's fields and the training settings."""
    return set(model_class(model_name).Config.model_fields) | set(TrainConfig.model_fields)


def split_overrides(model_name: str, overrides: dict[str, Any]) -> tuple[dict, dict]:
    """Route each override to the model config or the train config; an unknown key is an error."""
    model_fields = set(model_class(model_name).Config.model_fields)
    train_fields = set(TrainConfig.model_fields)
    model_over, train_over = {}, {}
    for key, value in overrides.items():
        if key in model_fields:
            model_over[key] = value
        elif key in train_fields:
            train_over[key] = value
        else:
            raise ValueError(
                f"unknown setting {key!r} for model {model_name!r}; model settings: {sorted(model_fields)}; "
                f"training settings: {sorted(train_fields)}"
            )
    return model_over, train_over


def fingerprint(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def history_rows(history: list[dict]) -> list[dict]:
    """Per-epoch summary kept in metrics.json (enough to plot learning curves)."""
    return [
        {"epoch": h["epoch"], "loss": h["loss"], "seconds": h["seconds"], "elapsed": h.get("elapsed", h["seconds"]),
         "valid_ndcg@10": h["valid"]["ndcg@10"], "valid_hr@10": h["valid"]["hr@10"],
         **({"test_ndcg@10": h["test"]["ndcg@10"], "test_hr@10": h["test"]["hr@10"]} if "test" in h else {})}
        for h in history
    ]


def resolve_dataset(dataset: str | Path | ProcessedDataset, *, raw_dir=None, data_root=None,
                    engine: Engine | None = None) -> ProcessedDataset:
    """A loaded dataset, a processed-dataset directory, or a catalogue name (built by ``engine``, or reused when up
    to date)."""
    if isinstance(dataset, ProcessedDataset):
        return dataset
    if (Path(dataset) / "manifest.json").is_file():
        return load_dataset(dataset)
    # under torchrun rank 0 builds (or finds) the dataset first; the other ranks then find it up to date
    distributed.on_main(lambda: build_dataset(str(dataset), raw_dir, data_root=data_root, engine=engine))
    return load_dataset(build_dataset(str(dataset), raw_dir, data_root=data_root, engine=engine))


REGISTRY_RECORD = "registry.json"  # beside a bundle: the registry version and MLflow run it was logged as


def finished_run(out_dir: Path, model_name: str, model_config: dict, run_config: dict) -> RunResult | None:
    """The run already finished at ``out_dir`` with these settings (the dataset by content, ``max_minutes`` aside:
    it never changes what an epoch computes), or None: ``--resume`` reuses it instead of training again."""
    try:
        config = json.loads((out_dir / "config.json").read_text())
        metrics = json.loads((out_dir / "metrics.json").read_text())
    except (OSError, ValueError):
        return None
    budget = lambda c: {k: v for k, v in c.items() if k != "max_minutes"}  # noqa: E731
    try:
        # through the config classes, so an option added since (whose default is the old behaviour) is its default
        saved_model = model_class(model_name).Config(**config.get("model_config", {})).model_dump(mode="json")
        saved_train = TrainConfig(**config.get("train_config", {})).model_dump(mode="json")
    except ValueError:  # a field that no longer exists, or a model that is gone
        return None
    same = (config.get("model") == model_name and saved_model == model_config
            and budget(saved_train) == budget(run_config["train_config"])
            and all(config.get("dataset", {}).get(k) == run_config["dataset"][k] for k in ("content_hash", "split"))
            and config.get("exclude_seen") == run_config["exclude_seen"])
    if not same or metrics.get("stopped_because") == "time budget" or not (out_dir / "weights.safetensors").is_file():
        return None
    record = out_dir / REGISTRY_RECORD
    registry = json.loads(record.read_text()) if record.is_file() else {}
    return RunResult(out_dir, metrics, registry.get("version"), registry.get("run_id"))


def remove_stale_checkpoint(checkpoint_dir: Path, key: str) -> None:
    """Remove the checkpoint of run ``key`` beside its finished bundle. A run killed after writing its bundle and
    before removing its checkpoint leaves it there, and ``--resume`` then reuses the bundle: left in place, that
    stale resume point would refuse a later ``--resume`` with other settings into the same directory (found by
    make test-chaos). A checkpoint of other settings is another run's progress and stays."""
    path = checkpoint_dir / "last.pt"
    if not path.is_file():
        return
    import torch

    if torch.load(path, weights_only=True, map_location="cpu").get("fingerprint") == key:
        Trainer(TrainConfig(device="cpu"), checkpoint_dir=checkpoint_dir).remove_checkpoint()


def train_run(
    model_name: str,
    dataset: str | ProcessedDataset,
    *,
    raw_dir: str | Path | None = None,
    data_root: str | Path | None = None,
    engine: Engine | None = None,
    epochs: int | None = None,
    overrides: dict[str, Any] | None = None,
    seed: int | None = None,
    out_dir: str | Path | None = None,
    resume: bool = False,
    track: bool = True,
    progress: bool = True,
    tags: dict[str, str] | None = None,
    extra_metrics: Callable[[Any, Split, dict], dict[str, dict]] | None = None,
) -> RunResult:
    """Train ``model_name`` on ``dataset``, evaluate it, write its bundle and log the run to MLflow.

    ``tags`` are added to the MLflow run (e.g. to link a distilled student to its teacher's run).
    ``extra_metrics(model, split, metrics)`` runs on the trained model before the bundle is written and returns sections
    (name → flat dict of figures) merged into ``metrics.json`` and logged with the section name as prefix, so
    the bundle is written once, atomically, with them.
    """
    ds = resolve_dataset(dataset, raw_dir=raw_dir, data_root=data_root, engine=engine)
    distributed.check_same("dataset content hash", ds.content_hash)
    model_over, train_over = split_overrides(model_name, overrides or {})
    if epochs is not None:
        train_over["epochs"] = epochs
    if seed is not None:
        train_over["seed"] = seed
    # the model's own training defaults (e.g. BERT4Rec's longer schedule) sit under the user's overrides
    train_config = TrainConfig(**{**model_class(model_name).train_defaults, **train_over})
    split = ds.split()
    exclude_seen = train_config.exclude_seen if train_config.exclude_seen is not None else not ds.has_repeats
    dataset_name = ds.manifest["name"]
    out_dir = Path(out_dir) if out_dir else Path("runs") / dataset_name / model_name

    import torch

    torch.manual_seed(train_config.seed)
    model_config = model_class(model_name).Config(**model_over)
    model = build_model(model_name, ds.num_items, model_config,
                        **borrowed_inputs(model_name, model_config, ds.num_items))
    prepared = model.prepare(ds)  # e.g. TIGER's semantic ids from item text, before any training
    run_config = {
        "train_config": train_config.model_dump(mode="json"),
        "dataset": {"name": dataset_name, "path": str(ds.path.resolve()), "content_hash": ds.content_hash,
                    "split": split.kind},
        "exclude_seen": exclude_seen,
    }
    # max_minutes decides only where training stops, never what an epoch computes, so it is left out of the
    # fingerprint: a run stopped by its time budget resumes under a larger one
    resumable = {**run_config, "train_config": {k: v for k, v in run_config["train_config"].items()
                                                if k != "max_minutes"}}
    key = fingerprint(model_name, model.config.model_dump(mode="json"), resumable)
    checkpoint_dir = out_dir.with_name(out_dir.name + ".checkpoints")
    if resume and (done := finished_run(out_dir, model_name, model.config.model_dump(mode="json"), run_config)):
        print(f"{out_dir}: reusing the finished run with these settings", file=sys.stderr)
        distributed.on_main(lambda: remove_stale_checkpoint(checkpoint_dir, key))
        # a killed write of this bundle may have left its temporary beside it, and reusing writes nothing new
        distributed.on_main(lambda: sweep_stale_temporaries(out_dir, marker="config.json"))
        return done
    tracker = None
    if track and distributed.is_main():
        tracker = Tracker(experiment=dataset_name, run_name=model_name,
                          tags={"model": model_name, "dataset_hash": ds.content_hash, **(tags or {})},
                          run_id_file=checkpoint_dir / "mlflow_run_id")
    log = RunLog(tracker, main=distributed.is_main())
    log.start({"model": model_name, "model_config": model.config.model_dump(mode="json"),
               "seed": train_config.seed, "world_size": distributed.world_size(), **run_config}, prepared)

    trainer = Trainer(train_config, checkpoint_dir=checkpoint_dir, progress=progress)
    status = "FAILED"
    try:
        result = trainer.fit(model, split, ds.num_items, exclude_seen, on_epoch=log.epoch, resume=resume,
                             fingerprint=key, test_set=split.test)
        eval_kw = dict(ks=cutoffs(train_config.max_k), batch_size=train_config.eval_batch_size, device=trainer.device,
                       item_percentile=item_percentiles(split.train, ds.num_items))
        valid = evaluate(model, split.valid, ds.num_items, exclude_seen, **eval_kw)
        test, test_users = evaluate_users(model, split.test, ds.num_items, exclude_seen, **eval_kw)
        test_other, other_users = evaluate_users(model, split.test, ds.num_items, not exclude_seen, **eval_kw)
        # per-user test ranks under both exclusion settings, for paired significance tests between runs
        user_ranks = pd.DataFrame({"user_idx": test_users.user_idx, "rank": test_users.ranks,
                                   f"rank_exclude_seen_{'off' if exclude_seen else 'on'}": other_users.ranks})
        trained_epochs = [h for h in result.history if h["loss"] is not None]
        metrics = {
            "valid": valid,
            "test": test,
            f"test_exclude_seen_{'off' if exclude_seen else 'on'}": test_other,
            "train_seconds": result.train_seconds,
            "epochs": result.epochs,
            "best_epoch": result.best_epoch,
            "seconds_per_epoch": sum(h["seconds"] for h in trained_epochs) / max(len(trained_epochs), 1),
            "stopped_because": result.stopped_because,
            "parameters": model.num_parameters(),
            "exclude_seen": exclude_seen,
            "history": history_rows(result.history),
            **prepared,
        }
        extra = extra_metrics(model, split, metrics) if extra_metrics else {}
        metrics.update(extra)
        finished = result.stopped_because != "time budget"

        def publish() -> str | None:
            save_bundle(out_dir, model.cpu(), run_config, ds.items, metrics, user_ranks)
            version = log.finish(out_dir, model_name, metrics, extra)
            if version is not None:  # so a report that reuses this run can still point the champion alias at it
                atomic_write_bytes(out_dir / REGISTRY_RECORD, json.dumps({"version": version,
                                                                         "run_id": log.run_id}).encode())
            if finished:
                trainer.remove_checkpoint()  # a finished run needs no resume point
            else:
                print(f"stopped by max_minutes after epoch {result.history[-1]['epoch']} of {train_config.epochs}; "
                      "the checkpoint is kept: --resume with a larger max_minutes continues the same schedule",
                      file=sys.stderr)
            return version

        version = distributed.on_main(publish)
        status = "FINISHED"
        return RunResult(out_dir, metrics, version, log.run_id)
    finally:
        log.end(status)

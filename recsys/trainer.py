"""Training loop shared by every gradient-trained model.

Each model chooses its training batches (``model.train_batches``): causal models learn from every position of
each sequence in one pass, look-ahead models from sampled prefix cut points, BERT4Rec from cloze maskings.
Each epoch ends with full-ranking validation; early stopping watches validation NDCG@10 with a patience, and the
best epoch's weights are restored at the end. A checkpoint is written atomically after every epoch and ``resume=True``
continues from it bit for bit: batch order comes from ``(seed, epoch)`` and the torch RNG state is saved.
"""

from __future__ import annotations

import copy
import io
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from tqdm import tqdm

from pipelines.jagged import EvalSet, Split
from pipelines.atomic import atomic_write_bytes
from recsys.evaluation import cutoffs, evaluate
from recsys.models.base import SequentialModel

SELECTION_METRIC = "ndcg@10"


class TrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    # Defaults measured on Amazon Beauty (README): cosine decay over 40 epochs from 2e-3 beats a constant 1e-3
    # both in quality and in time to reach it; ``epochs`` is also the cosine horizon.
    epochs: int = 40
    batch_size: int = 128
    lr: float = 2e-3
    optimizer: Literal["adam", "adamw"] = "adam"
    # "cosine" decays the learning rate per epoch from lr to lr/20 over ``epochs`` (a function of the epoch alone,
    # so a resumed run follows the same schedule)
    lr_schedule: Literal["constant", "cosine"] = "cosine"
    betas: tuple[float, float] = (0.9, 0.98)
    weight_decay: float = 0.0
    grad_clip: float | None = 5.0
    patience: int = 10
    eval_batch_size: int = 512
    # Wall-clock training budget of the whole run (a resumed run counts its earlier epochs): training stops after
    # the epoch that crosses it. The run's checkpoint is then kept, and ``--resume`` with a larger budget continues
    # the same schedule (recsys.run leaves max_minutes out of the run's fingerprint for that).
    max_minutes: float | None = Field(None, gt=0)
    exclude_seen: bool | None = None  # None: the dataset's default (on unless users repeat items)
    seed: int = 42
    device: str = "auto"
    # Evaluate the test split after every epoch too, for learning curves and time-to-target reports only:
    # model selection always uses validation.
    report_test_each_epoch: bool = False
    # Per-epoch validation (early stopping, epoch selection) on a fixed random sample of this many validation users;
    # None: all of them. For models whose evaluation is costly: TIGER's beam search takes ~16 ms a user on this CPU,
    # so all 22,363 Beauty users would cost ~6 min an epoch. The final valid and test figures always use every user.
    valid_users: int | None = Field(None, ge=1)
    # Metrics are reported at the cutoffs of KS up to this one (at least 10: epochs are selected by NDCG@10).
    # Generative models beam-search lists this long, so 10 instead of 50 makes TIGER's evaluation ~4× cheaper
    # (measured on Beauty, exclusion off).
    max_k: Literal[10, 20, 50] = 50
    # "bf16" runs the training forward passes under torch.autocast(bfloat16): matmuls in bf16, fp32 weights,
    # optimiser and kernels (see kernels._backend.fp32_under_autocast), no loss scaling (bf16 has fp32's range).
    # Evaluation always runs in fp32, so figures stay comparable across precisions.
    precision: Literal["fp32", "bf16"] = "fp32"


@dataclass
class TrainResult:
    history: list[dict] = field(default_factory=list)
    best_epoch: int = 0
    epochs: int = 0
    train_seconds: float = 0.0
    stopped_because: str = ""


EpochCallback = Callable[[dict], None]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    cls = torch.optim.AdamW if config.optimizer == "adamw" else torch.optim.Adam
    # parameters tagged _no_weight_decay (Mamba's A_log, D and dt bias, model-specs §3a) are never decayed
    no_decay = [p for p in model.parameters() if getattr(p, "_no_weight_decay", False)]
    decay = [p for p in model.parameters() if not getattr(p, "_no_weight_decay", False)]
    groups = [{"params": decay}] + ([{"params": no_decay, "weight_decay": 0.0}] if no_decay else [])
    # fused: one vectorised kernel per parameter (CPU and CUDA) instead of about ten elementwise passes each, the
    # same update rule (Kingma & Ba 2015, Alg. 1) rounded slightly differently
    return cls(groups, lr=config.lr, betas=config.betas, weight_decay=config.weight_decay, fused=True)


def epoch_learning_rate(config: TrainConfig, epoch: int) -> float:
    if config.lr_schedule == "constant" or config.epochs <= 1:
        return config.lr
    progress = (epoch - 1) / (config.epochs - 1)
    floor = config.lr / 20
    return floor + (config.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def _save_checkpoint(path: Path, state: dict) -> None:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def _load_checkpoint(path: Path) -> dict:
    # weights_only: a checkpoint is tensors and plain containers, never arbitrary pickled objects
    return torch.load(path, weights_only=True)


class Trainer:
    def __init__(self, config: TrainConfig, checkpoint_dir: Path | None = None, progress: bool = True):
        self.config = config
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir else None
        self.progress = progress
        self.device = resolve_device(config.device)

    @property
    def checkpoint_path(self) -> Path | None:
        return self.checkpoint_dir / "last.pt" if self.checkpoint_dir else None

    def fit(
        self,
        model: SequentialModel,
        split: Split,
        num_items: int,
        exclude_seen: bool,
        on_epoch: EpochCallback | None = None,
        resume: bool = False,
        fingerprint: str = "",
        test_set: EvalSet | None = None,
    ) -> TrainResult:
        """Train ``model`` on ``split.train``, selecting the epoch by validation NDCG@10.

        ``fingerprint`` identifies the run's settings; a checkpoint written under another fingerprint is refused.
        """
        cfg = self.config
        model.to(self.device)
        result = TrainResult()
        valid_set = split.valid.sample(cfg.valid_users, cfg.seed)
        if not model.trainable:
            start = time.perf_counter()
            model.fit(split.train_users, split.train)
            result.train_seconds = time.perf_counter() - start
            valid = self._evaluate(model, valid_set, num_items, exclude_seen)
            result.history.append({"epoch": 0, "loss": None, "valid": valid, "seconds": result.train_seconds})
            result.stopped_because = "closed-form fit"
            if on_epoch:
                on_epoch(result.history[-1])
            return result

        batches = model.train_batches(split.train_users, split.train, cfg.batch_size)
        optimizer = _optimizer(model, cfg)
        best_score, best_state, bad_epochs, start_epoch, elapsed = -1.0, None, 0, 1, 0.0
        if resume and self.checkpoint_path and self.checkpoint_path.exists():
            state = _load_checkpoint(self.checkpoint_path)
            if state["fingerprint"] != fingerprint:
                raise ValueError(
                    f"checkpoint {self.checkpoint_path} belongs to a run with other settings; "
                    "remove it or run without --resume"
                )
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            best_state, best_score = state["best_model"], state["best_score"]
            bad_epochs, start_epoch, elapsed = state["bad_epochs"], state["epoch"] + 1, state["elapsed"]
            result.history, result.best_epoch = state["history"], state["best_epoch"]
            torch.set_rng_state(state["torch_rng"])
            print(f"resumed from {self.checkpoint_path} after epoch {state['epoch']}", file=sys.stderr)
        else:
            torch.manual_seed(cfg.seed)

        result.stopped_because = "max epochs"
        for epoch in range(start_epoch, cfg.epochs + 1):
            if bad_epochs >= cfg.patience:
                result.stopped_because = "early stopping"
                break
            if cfg.max_minutes is not None and elapsed >= cfg.max_minutes * 60:
                result.stopped_because = "time budget"
                break
            epoch_start = time.perf_counter()
            for group in optimizer.param_groups:
                group["lr"] = epoch_learning_rate(cfg, epoch)
            loss = self._train_epoch(model, optimizer, batches, epoch)
            train_time = time.perf_counter() - epoch_start
            valid = self._evaluate(model, valid_set, num_items, exclude_seen)
            elapsed += time.perf_counter() - epoch_start
            record = {"epoch": epoch, "loss": loss, "valid": valid, "seconds": train_time, "elapsed": elapsed}
            if cfg.report_test_each_epoch and test_set is not None:
                record["test"] = self._evaluate(model, test_set, num_items, exclude_seen)
            result.history.append(record)
            if valid[SELECTION_METRIC] > best_score:
                best_score, result.best_epoch, bad_epochs = valid[SELECTION_METRIC], epoch, 0
                best_state = copy.deepcopy(model.state_dict())
            else:
                bad_epochs += 1
            if on_epoch:
                on_epoch(record)
            if self.checkpoint_path:
                _save_checkpoint(self.checkpoint_path, {
                    "fingerprint": fingerprint, "epoch": epoch, "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(), "best_model": best_state, "best_score": best_score,
                    "best_epoch": result.best_epoch, "bad_epochs": bad_epochs, "elapsed": elapsed,
                    "history": result.history, "torch_rng": torch.get_rng_state(),
                })
        else:
            if bad_epochs >= cfg.patience:
                result.stopped_because = "early stopping"
        if best_state is not None:
            model.load_state_dict(best_state)
        result.epochs = len(result.history)
        result.train_seconds = elapsed
        return result

    def _evaluate(self, model, eval_set: EvalSet, num_items: int, exclude_seen: bool) -> dict:
        return evaluate(model, eval_set, num_items, exclude_seen, ks=cutoffs(self.config.max_k),
                        batch_size=self.config.eval_batch_size, device=self.device)

    def remove_checkpoint(self) -> None:
        """Called once the bundle is written: a finished run needs no resume point."""
        if self.checkpoint_path and self.checkpoint_path.exists():
            self.checkpoint_path.unlink()
            try:
                self.checkpoint_dir.rmdir()
            except OSError:
                pass

    def _train_epoch(self, model, optimizer, batches, epoch: int) -> float:
        model.train()
        rng = np.random.default_rng([self.config.seed, epoch])
        total_loss, total_targets = 0.0, 0
        start = time.perf_counter()
        bar = tqdm(batches.epoch(rng), total=len(batches), desc=f"epoch {epoch}", leave=False,
                   disable=not self.progress, mininterval=1.0, file=sys.stderr)
        for batch in bar:
            batch = batch.to(self.device)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.config.precision == "bf16"):
                loss = model.loss(batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if self.config.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), self.config.grad_clip)
            optimizer.step()
            n = int((batch.targets != 0).sum())
            total_loss += loss.item() * n
            total_targets += n
            bar.set_postfix(loss=f"{total_loss / max(total_targets, 1):.4f}",
                            targets_per_s=f"{total_targets / (time.perf_counter() - start):.0f}", refresh=False)
        return total_loss / max(total_targets, 1)

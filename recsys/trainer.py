"""Training loop shared by every gradient-trained model.

Each model chooses its training batches (``model.train_batches``): causal models learn from every position of
each sequence in one pass, look-ahead models from sampled prefix cut points, BERT4Rec from cloze maskings.
Each epoch ends with full-ranking validation; early stopping watches validation NDCG@10 with a patience, and the
best epoch's weights are restored at the end. A checkpoint is written atomically after every epoch and ``resume=True``
continues from it bit for bit: batch order comes from ``(seed, epoch)`` and torch's RNG (dropout, sampled
negatives) is reseeded at every epoch from ``(seed, epoch, rank)``.

Under torchrun (``recsys.distributed``) the model is wrapped in DistributedDataParallel. Every rank walks the same
global batches in the same order and takes rows ``rank, rank + world, ...`` of each, so the sequence of updates
does not depend on the world size and every rank makes the same number of steps. DDP averages gradients over ranks,
so each rank's loss is scaled to (its sum over its targets) / (the global batch's targets) × world: the averaged
gradient is the one-process gradient. Validation is sharded over users (``recsys.evaluation``); checkpoints are
written by rank 0 and read by rank 0, which sends them to the others on resume.
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
from kernels.atomic import atomic_write_bytes
from recsys import distributed
from recsys.batching import SequenceBatch
from recsys.evaluation import cutoffs, evaluate
from recsys.losses import SequenceLoss
from recsys.models.base import SequentialModel

SELECTION_METRIC = "ndcg@10"


class TrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    # Defaults measured on Amazon Beauty (docs/results.md): cosine decay over 40 epochs from 2e-3 beats a constant 1e-3
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


def _load_checkpoint(path: Path) -> dict | None:
    """Rank 0 reads the checkpoint (None when there is none) and sends it to every rank: on several machines only
    rank 0's holds it."""
    def read():
        # weights_only: a checkpoint is tensors and plain containers, never arbitrary pickled objects
        return torch.load(path, weights_only=True) if path.exists() else None

    return distributed.broadcast_object(read() if distributed.is_main() else None)


class LossForward(torch.nn.Module):
    """``forward(batch, weight)`` is the model's training loss times ``weight``, so DistributedDataParallel (which
    hooks ``forward``) sees every training step. DDP is not told to look for unused parameters: every model uses
    all of its trainable parameters in each step, and one that never uses a parameter freezes it (SLMRec's
    backbone token table); the 2-rank test of every model (tests/e2e/test_distributed.py) holds them to that."""

    def __init__(self, model: SequentialModel):
        super().__init__()
        self.model = model

    def forward(self, batch: SequenceBatch, weight: torch.Tensor) -> torch.Tensor:
        return self.model.loss(batch) * weight


def deal(batch: SequenceBatch, rank: int, world: int) -> tuple[SequenceBatch, bool]:
    """Rows ``rank, rank + world, ...`` of a global batch. A rank whose share is empty (a last batch with fewer
    rows than ranks) gets row 0 and ``False``: it runs the step with its loss weighted by zero, so all ranks make
    the same number of steps and DDP's all-reduce never waits for a rank that has nothing to do."""
    if world == 1:
        return batch, True
    rows = torch.arange(rank, batch.items.shape[0], world)
    real = len(rows) > 0
    if not real:
        rows = torch.zeros(1, dtype=torch.long)
    pick = lambda t: None if t is None else t[rows]  # noqa: E731
    return SequenceBatch(pick(batch.items), pick(batch.times), pick(batch.targets), pick(batch.user_idx)), real


class Trainer:
    def __init__(self, config: TrainConfig, checkpoint_dir: Path | None = None, progress: bool = True):
        self.config = config
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir else None
        self.progress = progress
        self.device = distributed.device_for(config.device)

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

        model.prepare_training(split.train)  # training-split item counts for sampled losses (no valid/test targets)
        batches = model.train_batches(split.train_users, split.train, cfg.batch_size)
        optimizer = _optimizer(model, cfg)
        best_score, best_state, bad_epochs, start_epoch, elapsed = -1.0, None, 0, 1, 0.0
        state = _load_checkpoint(self.checkpoint_path) if resume and self.checkpoint_path else None
        if state is not None:
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
            if distributed.is_main():
                print(f"resumed from {self.checkpoint_path} after epoch {state['epoch']}", file=sys.stderr)
        # DDP sends rank 0's parameters and buffers to every rank here, so all ranks start from the same state
        step_module = LossForward(model)
        if distributed.world_size() > 1:
            from torch.nn.parallel import DistributedDataParallel

            step_module = DistributedDataParallel(
                step_module, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                forward_sync_buffers=False)

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
            model.start_epoch(epoch)
            loss = self._train_epoch(step_module, optimizer, batches, epoch)
            train_time = time.perf_counter() - epoch_start
            valid = self._evaluate(model, valid_set, num_items, exclude_seen)
            # the slowest rank's times, so every rank takes the same max_minutes decision
            train_time, epoch_time = distributed.all_reduce_array(
                np.array([train_time, time.perf_counter() - epoch_start]), op="max")
            elapsed += float(epoch_time)
            record = {"epoch": epoch, "loss": loss, "valid": valid, "seconds": float(train_time), "elapsed": elapsed}
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
                # the RNG needs no saving: every epoch reseeds it from (seed, epoch, rank)
                checkpoint = {
                    "fingerprint": fingerprint, "epoch": epoch, "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(), "best_model": best_state, "best_score": best_score,
                    "best_epoch": result.best_epoch, "bad_epochs": bad_epochs, "elapsed": elapsed,
                    "history": result.history, "world_size": distributed.world_size(),
                }
                distributed.on_main(lambda: _save_checkpoint(self.checkpoint_path, checkpoint))
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
        """Called (on rank 0) once the bundle is written: a finished run needs no resume point (nor the MLflow run
        id that recsys.tracking keeps beside it)."""
        if not self.checkpoint_dir:
            return
        for name in ("last.pt", "mlflow_run_id"):
            (self.checkpoint_dir / name).unlink(missing_ok=True)
        try:
            self.checkpoint_dir.rmdir()
        except OSError:
            pass

    def _train_epoch(self, step_module, optimizer, batches, epoch: int) -> float:
        """One pass over the global batches; returns the mean training loss over every target of the epoch."""
        step_module.train()
        rank, world = distributed.rank(), distributed.world_size()
        torch.manual_seed(distributed.epoch_seed(self.config.seed, epoch, rank))
        rng = np.random.default_rng([self.config.seed, epoch])
        params = [p for p in step_module.parameters() if p.requires_grad]
        loss_sum, total_targets = 0.0, 0  # this rank's share; all-reduced once at the end of the epoch
        start = time.perf_counter()
        bar = tqdm(batches.epoch(rng), total=len(batches), desc=f"epoch {epoch}", leave=False,
                   disable=not self.progress or not distributed.is_main(), mininterval=1.0, file=sys.stderr)
        for global_batch in bar:
            batch, real = deal(global_batch, rank, world)
            batch = batch.to(self.device)
            n_global = int((global_batch.targets != 0).sum())
            n_local = int((batch.targets != 0).sum()) if real else 0
            weight = torch.tensor(SequenceLoss.data_parallel_weight(n_local, n_global, world), device=self.device)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.config.precision == "bf16"):
                loss = step_module(batch, weight)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if self.config.grad_clip:
                torch.nn.utils.clip_grad_norm_(params, self.config.grad_clip)
            optimizer.step()
            if n_local:
                loss_sum += loss.item() * n_global / world
            total_targets += n_local
            bar.set_postfix(loss=f"{loss_sum / max(total_targets, 1):.4f}",
                            targets_per_s=f"{total_targets * world / (time.perf_counter() - start):.0f}",
                            refresh=False)
        loss_sum, total_targets = distributed.all_reduce_array(np.array([loss_sum, total_targets], np.float64))
        return float(loss_sum / max(total_targets, 1))

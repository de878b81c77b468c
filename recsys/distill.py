"""SLMRec's recipe end to end (model-specs §6, "Recipe"): borrow a pretrained item table (training SASRec first
when none is given), fine-tune an M-layer teacher with cross-entropy, freeze it, then train an N = M/4-layer
student with cross-entropy + block-aligned distillation + multiple supervision (``recsys.models.slmrec``).

The runs are linked in MLflow: a parent run ``slmrec-distill`` with the SASRec, teacher and student runs nested
under it, the student tagged with its ``teacher_run_id``. The student bundle's ``metrics.json`` carries a
``distillation`` section (written with the bundle, atomically): both test NDCG@10, the kept fraction, depths,
parameter counts and the teacher's over the student's scoring time on the same requests.

A trained teacher bundle can be reused (``teacher_bundle``, CLI ``--teacher-bundle``): the teacher step is
skipped and its depth and test metrics are read from the bundle (e.g. to distil several students from one teacher).

Overrides: ``key=value`` applies to teacher and student; ``teacher.key``, ``student.key`` and ``sasrec.key``
apply to that run only (e.g. ``student.lr=0.003``, ``sasrec.hidden_size=64``).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kernels import topk_scores
from recsys.batching import SequenceBatch, eval_batches
from recsys import distributed
from recsys.models import model_class
from recsys.run import (Recipe, RunResult, model_settings, register_recipe, resolve_dataset, scoped_settings,
                        train_run)

ROLES = ("sasrec", "teacher", "student")
SET_BY_THE_RECIPE = ("num_layers", "teacher_bundle")


@dataclass
class DistillResult:
    teacher: RunResult
    student: RunResult
    distillation: dict
    item_table_bundle: Path
    parent_run_id: str | None


def json_config(bundle_dir: Path) -> dict:
    import json

    return json.loads((Path(bundle_dir) / "config.json").read_text())


def split_by_role(overrides: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``role.key`` settings to that role; plain keys to both teacher and student."""
    for key in overrides:
        role, dot, name = key.partition(".")
        if (name if dot else key) in SET_BY_THE_RECIPE and role != "sasrec":
            raise ValueError(f"{key} is set by the recipe (use --teacher-layers / --student-layers)")
    return scoped_settings(overrides, dict.fromkeys(ROLES), plain_to=["teacher", "student"])


@torch.no_grad()
def scoring_seconds(model, batches: list[SequenceBatch], k: int = 10, repeats: int = 3) -> float:
    """Best-of-``repeats`` wall time to answer ``batches``: encode, then exact top-k over the catalogue."""
    model.eval()
    table = model.item_embeddings()[1:]
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for batch in batches:
            topk_scores(model.encode(batch), table, k)
        best = min(best, time.perf_counter() - start)
    return best


def timing_batches(split, max_len: int, batch_size: int, max_requests: int) -> list[SequenceBatch]:
    """The first ``max_requests`` test histories (in evaluation order), batched as evaluation does."""
    out, count = [], 0
    for eval_batch in eval_batches(split.test, max_len, batch_size):
        if count >= max_requests:
            break
        out.append(eval_batch.batch)
        count += len(eval_batch.targets)
    return out


def distillation_figures(student, teacher, teacher_metrics: dict, student_metrics: dict, batches, repeats: int):
    teacher_seconds = scoring_seconds(teacher, batches, repeats=repeats)
    student_seconds = scoring_seconds(student, batches, repeats=repeats)
    teacher_ndcg, student_ndcg = teacher_metrics["test"]["ndcg@10"], student_metrics["test"]["ndcg@10"]
    return {
        "teacher_ndcg@10": teacher_ndcg,
        "student_ndcg@10": student_ndcg,
        "kept_fraction": student_ndcg / teacher_ndcg if teacher_ndcg > 0 else float("nan"),
        "teacher_layers": teacher.config.num_layers,
        "student_layers": student.config.num_layers,
        # the frozen item table is a buffer, counted in neither; the student's training-only supervision heads
        # are left out (they never score)
        "teacher_params": teacher.scoring_parameters(),
        "student_params": student.scoring_parameters(),
        "teacher_scoring_seconds": teacher_seconds,
        "student_scoring_seconds": student_seconds,
        "speedup": teacher_seconds / student_seconds,
        "timing_requests": sum(len(b.items) for b in batches),
    }


def student_depth(teacher_layers: int, student_layers: int | None) -> int:
    student_layers = student_layers if student_layers is not None else teacher_layers // 4
    if not 1 <= student_layers < teacher_layers:
        raise ValueError(f"student layers must be between 1 and the teacher's {teacher_layers} - 1, "
                         f"got {student_layers} (default M/4)")
    return student_layers


def reused_teacher(bundle_dir: str | Path, dataset_hash: str, teacher_layers: int | None) -> RunResult:
    """A trained SLMRec teacher bundle as a ``RunResult`` (no MLflow run id: it is not this recipe's run)."""
    import json

    bundle_dir = Path(bundle_dir)
    config_path, metrics_path = bundle_dir / "config.json", bundle_dir / "metrics.json"
    if not config_path.is_file() or not metrics_path.is_file():
        raise FileNotFoundError(f"teacher bundle {bundle_dir} has no config.json / metrics.json")
    config = json.loads(config_path.read_text())
    if config.get("model") != "slmrec":
        raise ValueError(f"teacher bundle {bundle_dir} is a {config.get('model')!r}, not an slmrec")
    if config["dataset"]["content_hash"] != dataset_hash:
        raise ValueError(f"teacher bundle {bundle_dir} was trained on another dataset (content hash differs)")
    layers = config["model_config"]["num_layers"]
    if teacher_layers is not None and teacher_layers != layers:
        raise ValueError(f"--teacher-layers {teacher_layers} but the teacher bundle has {layers} layers")
    return RunResult(bundle_dir, json.loads(metrics_path.read_text()), None, None)


def distill_run(
    dataset,
    teacher_layers: int | None,
    student_layers: int | None = None,
    *,
    item_table_bundle: str | Path | None = None,
    teacher_bundle: str | Path | None = None,
    raw_dir=None,
    data_root=None,
    engine=None,
    epochs: int | None = None,
    overrides: dict[str, Any] | None = None,
    seed: int | None = None,
    out_root: str | Path | None = None,
    track: bool = True,
    progress: bool = True,
    resume: bool = False,
    timing_requests: int = 4096,
    timing_repeats: int = 3,
) -> DistillResult:
    """Train (SASRec,) teacher and student; return both runs and the ``distillation`` figures. With
    ``teacher_bundle`` the teacher is reused, not trained (``teacher_layers`` may then be None). ``resume``
    continues each run from its checkpoint (a restart under torchrun sets it)."""
    if teacher_bundle is None:
        if teacher_layers is None:
            raise ValueError("the teacher's depth is needed (--teacher-layers) unless a teacher bundle is reused")
        student_layers = student_depth(teacher_layers, student_layers)  # checked before any data is built
    ds = resolve_dataset(dataset, raw_dir=raw_dir, data_root=data_root, engine=engine)
    reused = reused_teacher(teacher_bundle, ds.content_hash, teacher_layers) if teacher_bundle else None
    if reused is not None:
        teacher_layers = json_config(reused.bundle_dir)["model_config"]["num_layers"]
        student_layers = student_depth(teacher_layers, student_layers)
    by_role = split_by_role(overrides or {})
    out_root = Path(out_root) if out_root else Path("runs") / ds.manifest["name"] / "slmrec-distill"
    common = dict(epochs=epochs, seed=seed, track=track, progress=progress, resume=resume)
    parent = None
    if track and distributed.is_main():
        from recsys.tracking import Tracker

        parent = Tracker(experiment=ds.manifest["name"], run_name="slmrec-distill",
                         tags={"model": "slmrec", "dataset_hash": ds.content_hash})
        parent.log_params({"teacher_layers": teacher_layers, "student_layers": student_layers,
                           "overrides": overrides or {},
                           "teacher_bundle": str(Path(teacher_bundle).resolve()) if teacher_bundle else None})
    status = "FAILED"
    try:
        if item_table_bundle is None and reused is not None:
            # the student must share the teacher's frozen table (checked when the teacher loads)
            item_table_bundle = json_config(reused.bundle_dir)["model_config"].get("item_table_bundle")
        if item_table_bundle is None:
            print("== SLMRec: training SASRec for the item table", file=sys.stderr)
            sasrec = train_run("sasrec", ds, overrides=by_role["sasrec"], out_dir=out_root / "sasrec",
                               tags={"distill_role": "item_table"}, **common)
            item_table_bundle = sasrec.bundle_dir
        table = {"item_table_bundle": str(Path(item_table_bundle).resolve())}

        if reused is not None:
            print(f"== SLMRec: teacher, {teacher_layers} layers, reused from {reused.bundle_dir}", file=sys.stderr)
            teacher = reused
        else:
            print(f"== SLMRec: teacher, {teacher_layers} layers", file=sys.stderr)
            teacher = train_run("slmrec", ds, overrides={**by_role["teacher"], **table, "num_layers": teacher_layers},
                                out_dir=out_root / "teacher", tags={"distill_role": "teacher"}, **common)

        figures: dict = {}

        def add_distillation(student_model, split, student_metrics):
            from recsys.bundle import load_bundle

            teacher_model = load_bundle(teacher.bundle_dir).model
            batches = timing_batches(split, student_model.config.max_len, 256, timing_requests)
            device = next(student_model.parameters()).device
            teacher_model.to(device)
            batches = [b.to(device) for b in batches]
            figures.update(distillation_figures(student_model, teacher_model, teacher.metrics, student_metrics,
                                                batches, timing_repeats))
            return {"distillation": figures}

        print(f"== SLMRec: student, {student_layers} layers, distilled", file=sys.stderr)
        student_settings = {**by_role["student"], **table, "num_layers": student_layers,
                            "teacher_bundle": str(Path(teacher.bundle_dir).resolve())}
        student = train_run("slmrec", ds, overrides=student_settings, out_dir=out_root / "student",
                            tags={"distill_role": "student",
                                  **({"teacher_run_id": teacher.run_id} if track and teacher.run_id else {})},
                            extra_metrics=add_distillation, **common)
        if parent:  # rank 0 only
            parent.log_metrics(figures)
            for key, run in (("teacher_run_id", teacher), ("student_run_id", student)):
                if run.run_id:
                    parent.client.set_tag(parent.run_id, key, run.run_id)
        status = "FINISHED"
        return DistillResult(teacher, student, figures, Path(item_table_bundle),
                             parent.run_id if parent else None)
    finally:
        if parent:
            parent.end(status)


# ------------------------------------------------------------------ the recipe in ``recsys report`` / ``make eval``
DEPTHS = ("teacher_layers", "student_layers")


def recipe_settings() -> set[str]:
    """What ``slmrec-distill.key`` takes in a report: slmrec's and training settings but the ones the recipe owns
    (depths come as ``teacher_layers`` / ``student_layers``), and any of them for one role (``student.lr``)."""
    slmrec, sasrec = model_settings("slmrec"), model_settings("sasrec")
    roles = {f"{role}.{key}" for role in ROLES for key in (sasrec if role == "sasrec" else slmrec)}
    return (slmrec - set(SET_BY_THE_RECIPE)) | set(DEPTHS) | roles


def report_runs(ds, settings: dict, results: dict[str, RunResult], *, epochs, seed, track, resume=False,
                out_root=None):
    """SLMRec's teacher and student as two report rows (borrowing the item table of a SASRec listed before), their
    registry model, and the distillation figures as a note."""
    settings = dict(settings)
    depths = {key: settings.pop(key, None) for key in DEPTHS}
    borrowed = model_class("slmrec").borrows["item_table"]  # SASRec's table, when SASRec was listed before
    table = settings.pop(borrowed.field, None) or (
        results[borrowed.provider].bundle_dir if borrowed.provider in results else None)
    if depths["teacher_layers"] is None:  # SLMRec's own default depth
        depths["teacher_layers"] = model_class("slmrec").Config.model_fields["num_layers"].default
    run = distill_run(ds, int(depths["teacher_layers"]),
                      int(depths["student_layers"]) if depths["student_layers"] is not None else None,
                      item_table_bundle=table, epochs=epochs, overrides=settings, seed=seed, track=track,
                      resume=resume, out_root=out_root)
    rows = {"slmrec-teacher": run.teacher, "slmrec-student": run.student}
    return rows, dict.fromkeys(rows, "slmrec"), distillation_lines(run.distillation)


def distillation_lines(figures: dict) -> list[str]:
    return [
        "",
        f"SLMRec distillation: the {figures['student_layers']}-layer student keeps "
        f"{100 * figures['kept_fraction']:.1f}% of the {figures['teacher_layers']}-layer teacher's NDCG@10 "
        f"({figures['student_ndcg@10']:.4f} vs {figures['teacher_ndcg@10']:.4f}) and scores "
        f"{figures['timing_requests']:,} test requests {figures['speedup']:.2f}x faster "
        f"({figures['student_scoring_seconds']:.2f} s vs {figures['teacher_scoring_seconds']:.2f} s, same run); "
        f"scoring parameters {figures['student_params']:,} vs {figures['teacher_params']:,} "
        "(the frozen item table excluded).",
    ]


register_recipe(Recipe("slmrec-distill", recipe_settings, report_runs))

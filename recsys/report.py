"""``make eval``: build a dataset, train and evaluate each model under one protocol, write a comparison report,
log everything to MLflow and point the registry alias ``champion`` at the best model (by validation NDCG@10:
test figures never choose anything).

Settings (``--set``): a plain ``key=value`` goes to every listed model that has the key; ``model.key=value`` to that
model only (e.g. ``sasrec.hidden_size=64``).

A model that borrows from another run (``SequentialModel.borrows``: SLMRec the item table of SASRec) gets the bundle
of that model when it is listed before it. Recipes registered with ``recsys.run.register_recipe`` are listed like
models and add their own rows and notes (``slmrec-distill``: SLMRec's teacher and distilled student,
``recsys.distill``; its settings are scoped, e.g. ``slmrec-distill.teacher_layers=8``,
``slmrec-distill.student.lr=0.003``)."""

from __future__ import annotations

import csv
import io
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from kernels.atomic import atomic_write_bytes  # noqa: E402
from recsys import distributed  # noqa: E402
from recsys.models import model_class  # noqa: E402
from recsys.run import RECIPES, RunResult, model_settings, resolve_dataset, scoped_settings, train_run  # noqa: E402
import recsys.distill  # noqa: E402,F401  (registers the recipes listed beside models)

COLUMNS = ("model", "hr@10", "ndcg@10", "mrr", "train_seconds", "seconds_per_epoch", "parameters", "epochs",
           "best_epoch", "valid_ndcg@10", "coverage@10")


def result_row(model: str, result: RunResult) -> dict:
    m = result.metrics
    return {
        "model": model, "hr@10": m["test"]["hr@10"], "ndcg@10": m["test"]["ndcg@10"], "mrr": m["test"]["mrr"],
        "train_seconds": m["train_seconds"], "seconds_per_epoch": m["seconds_per_epoch"],
        "parameters": m["parameters"], "epochs": m["epochs"], "best_epoch": m["best_epoch"],
        "valid_ndcg@10": m["valid"]["ndcg@10"], "coverage@10": m["test"]["coverage@10"],
    }


def write_markdown(
    path: Path, dataset: str, manifest: dict, rows: list[dict], exclude_seen: bool, champion: str,
    notes: list[str] = (),
) -> None:
    counts = manifest.get("counts", {})
    lines = [
        f"# Evaluation on `{dataset}`",
        "",
        f"Dataset content hash `{manifest.get('content_hash', '?')[:16]}`; {counts.get('users', '?')} users, "
        f"{counts.get('items', '?')} items, {counts.get('interactions', '?')} interactions.",
        f"Protocol: {manifest.get('settings', {}).get('split', 'loo')} split, full ranking over the whole catalogue, "
        f"exclude_seen={'on' if exclude_seen else 'off'}; model selection by validation NDCG@10. "
        f"Champion (registry alias `champion`): **{champion}**.",
        "",
        "| model | HR@10 | NDCG@10 | MRR | train time (s) | s/epoch | parameters | epochs (best) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['hr@10']:.4f} | {r['ndcg@10']:.4f} | {r['mrr']:.4f} | {r['train_seconds']:.1f} | "
            f"{r['seconds_per_epoch']:.2f} | {r['parameters']:,} | {r['epochs']} ({r['best_epoch']}) |"
        )
    lines += notes
    atomic_write_bytes(path, ("\n".join(lines) + "\n").encode())


def write_figure(path: Path, dataset: str, results: dict[str, RunResult]) -> None:
    fig, (curves, bars) = plt.subplots(1, 2, figsize=(12, 4.5))
    colour = {name: f"C{i % 10}" for i, name in enumerate(results)}  # one colour per model in every panel
    for name, result in results.items():
        history = [h for h in result.metrics["history"] if h["loss"] is not None]
        if history:
            curves.plot([h["epoch"] for h in history], [h["valid_ndcg@10"] for h in history], marker=".", label=name,
                        color=colour[name])
        else:
            curves.axhline(result.metrics["valid"]["ndcg@10"], linestyle="--", label=f"{name} (no training)",
                           color=colour[name])
    curves.set(title=f"{dataset}: validation NDCG@10 per epoch", xlabel="epoch", ylabel="NDCG@10")
    curves.legend()
    metrics = ("hr@10", "ndcg@10", "mrr")
    width = 0.8 / max(len(results), 1)
    for i, (name, result) in enumerate(results.items()):
        bars.bar([j + i * width for j in range(len(metrics))], [result.metrics["test"][m] for m in metrics],
                 width=width, label=name, color=colour[name])
    bars.set_xticks([j + width * (len(results) - 1) / 2 for j in range(len(metrics))], [m.upper() for m in metrics])
    bars.set(title=f"{dataset}: test metrics (full ranking)")
    bars.legend()
    fig.tight_layout()
    image = io.BytesIO()
    fig.savefig(image, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, image.getvalue())


def accepted_settings(name: str) -> set[str]:
    """The keys a listed model (or recipe) takes."""
    return RECIPES[name].settings() if name in RECIPES else model_settings(name)


def settings_by_model(models: list[str], overrides: dict) -> dict[str, dict]:
    """Each listed model's settings: the plain keys it accepts, then its scoped ``model.key`` ones (which win)."""
    return scoped_settings(overrides, {name: accepted_settings(name) for name in models})


def run_report(dataset: str, models: list[str], *, raw_dir=None, data_root=None, engine=None, epochs: int | None = None,
               overrides: dict | None = None, seed: int | None = None, out_root: Path = Path("reports"),
               track: bool = True, resume: bool = False) -> Path:
    """Train and evaluate each of ``models`` and write the report. Under torchrun every rank trains and
    evaluates; rank 0 alone sets the champion and writes the report. ``resume`` continues each model's run from
    its checkpoint where one is left (a restarted job)."""
    ds = resolve_dataset(dataset, raw_dir=raw_dir, data_root=data_root, engine=engine)
    settings = settings_by_model(models, overrides or {})
    results: dict[str, RunResult] = {}
    registered: dict[str, str] = {}  # report row → the registry model its version belongs to
    notes: list[str] = []
    for name in models:
        if distributed.is_main():
            print(f"== training {name} on {dataset}", file=sys.stderr)
        own = settings[name]
        if name in RECIPES:
            runs, registry, lines = RECIPES[name].run(ds, own, results, epochs=epochs, seed=seed, track=track,
                                                      resume=resume)
            results.update(runs)
            registered.update(registry)
            notes += lines
            continue
        for spec in model_class(name).borrows.values():
            # e.g. SLMRec borrows the item table of the SASRec trained just before it (model-specs §6)
            if spec.provider in results and spec.field not in own:
                own[spec.field] = str(results[spec.provider].bundle_dir.resolve())
        results[name] = train_run(name, ds, epochs=epochs, overrides=own, seed=seed,
                                  out_dir=Path("runs") / ds.manifest["name"] / name, track=track, resume=resume)
        registered[name] = name
    rows = [result_row(name, r) for name, r in results.items()]

    def write() -> Path:
        champion = max(rows, key=lambda r: r["valid_ndcg@10"])["model"]
        if track:
            from recsys.tracking import set_champion

            set_champion(registered[champion], results[champion].model_version, sorted(set(registered.values())))
        out_dir = out_root / ds.manifest["name"]
        out_dir.mkdir(parents=True, exist_ok=True)
        exclude_seen = next(iter(results.values())).metrics["exclude_seen"]
        write_markdown(out_dir / "eval.md", ds.manifest["name"], ds.manifest, rows, exclude_seen, champion, notes)
        table = io.StringIO()
        writer = csv.DictWriter(table, fieldnames=COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_bytes(out_dir / "eval.csv", table.getvalue().encode())
        write_figure(out_dir / "eval.png", ds.manifest["name"], results)
        return out_dir

    return distributed.on_main(write)

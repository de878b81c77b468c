"""``make eval``: build a dataset, train and evaluate each model under one protocol, write a comparison report,
log everything to MLflow and point the registry alias ``champion`` at the best model (by validation NDCG@10:
test figures never choose anything).

``slmrec`` listed after ``sasrec`` borrows that SASRec's item table; listed alone it learns its own. A distilled
teacher/student pair comes from ``recsys distill`` (see the README), not from this report."""

from __future__ import annotations

import csv
import io
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from pipelines.atomic import atomic_write_bytes  # noqa: E402
from recsys.models import model_class  # noqa: E402
from recsys.run import RunResult, resolve_dataset, train_run  # noqa: E402
from recsys.trainer import TrainConfig  # noqa: E402

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
    path: Path, dataset: str, manifest: dict, rows: list[dict], exclude_seen: bool, champion: str
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
    atomic_write_bytes(path, ("\n".join(lines) + "\n").encode())


def write_figure(path: Path, dataset: str, results: dict[str, RunResult]) -> None:
    fig, (curves, bars) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, result in results.items():
        history = [h for h in result.metrics["history"] if h["loss"] is not None]
        if history:
            curves.plot([h["epoch"] for h in history], [h["valid_ndcg@10"] for h in history], marker=".", label=name)
        else:
            curves.axhline(result.metrics["valid"]["ndcg@10"], linestyle="--", label=f"{name} (no training)")
    curves.set(title=f"{dataset}: validation NDCG@10 per epoch", xlabel="epoch", ylabel="NDCG@10")
    curves.legend()
    metrics = ("hr@10", "ndcg@10", "mrr")
    width = 0.8 / max(len(results), 1)
    for i, (name, result) in enumerate(results.items()):
        bars.bar([j + i * width for j in range(len(metrics))], [result.metrics["test"][m] for m in metrics],
                 width=width, label=name)
    bars.set_xticks([j + width * (len(results) - 1) / 2 for j in range(len(metrics))], [m.upper() for m in metrics])
    bars.set(title=f"{dataset}: test metrics (full ranking)")
    bars.legend()
    fig.tight_layout()
    image = io.BytesIO()
    fig.savefig(image, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, image.getvalue())


def run_report(dataset: str, models: list[str], *, raw_dir=None, data_root=None, epochs: int | None = None,
               overrides: dict | None = None, seed: int | None = None, out_root: Path = Path("reports"),
               track: bool = True) -> Path:
    ds = resolve_dataset(dataset, raw_dir=raw_dir, data_root=data_root)
    overrides = overrides or {}
    accepted = {name: set(model_class(name).Config.model_fields) | set(TrainConfig.model_fields) for name in models}
    unknown = [key for key in overrides if not any(key in keys for keys in accepted.values())]
    if unknown:
        raise ValueError(f"setting(s) {unknown} apply to none of the models {models}")
    results: dict[str, RunResult] = {}
    for name in models:
        print(f"== training {name} on {dataset}", file=sys.stderr)
        own = {key: value for key, value in overrides.items() if key in accepted[name]}
        if name == "slmrec" and "sasrec" in results and "item_table_bundle" not in own:
            # SLMRec's recipe borrows a trained SASRec item table (model-specs §6): the one trained just before
            own["item_table_bundle"] = str(results["sasrec"].bundle_dir.resolve())
        results[name] = train_run(name, ds, epochs=epochs, overrides=own, seed=seed,
                                  out_dir=Path("runs") / ds.manifest["name"] / name, track=track)
    rows = [result_row(name, r) for name, r in results.items()]
    champion = max(rows, key=lambda r: r["valid_ndcg@10"])["model"]
    if track:
        from recsys.tracking import set_champion

        set_champion(champion, results[champion].model_version, list(results))
    out_dir = out_root / ds.manifest["name"]
    out_dir.mkdir(parents=True, exist_ok=True)
    exclude_seen = next(iter(results.values())).metrics["exclude_seen"]
    write_markdown(out_dir / "eval.md", ds.manifest["name"], ds.manifest, rows, exclude_seen, champion)
    table = io.StringIO()
    writer = csv.DictWriter(table, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_bytes(out_dir / "eval.csv", table.getvalue().encode())
    write_figure(out_dir / "eval.png", ds.manifest["name"], results)
    return out_dir

"""``make eval``: build a dataset, train and evaluate each model under one protocol, write a comparison report,
log everything to MLflow and point the registry alias ``champion`` at the best model (by validation NDCG@10:
test figures never choose anything).

Settings (``--set``): a plain ``key=value`` goes to every listed model that has the key; ``model.key=value`` to that
model only (e.g. ``sasrec.hidden_size=64``). ``row=model`` lists a variant of a model under its own row (e.g.
``--models sasrec esasrec=sasrec --set esasrec.layer=ligr --set esasrec.loss=sampled_softmax``).

A model that borrows from another run (``SequentialModel.borrows``: SLMRec the item table of SASRec) gets the bundle
of that model when it is listed before it. Recipes registered with ``recsys.run.register_recipe`` are listed like
models and add their own rows and notes (``slmrec-distill``: SLMRec's teacher and distilled student,
``recsys.distill``; its settings are scoped, e.g. ``slmrec-distill.teacher_layers=8``,
``slmrec-distill.student.lr=0.003``).

With several seeds (``--seeds 42 43 44``, ``make eval SEEDS="42 43 44"``) each model is trained once per seed and the
table gives mean ± standard deviation; every model is compared with the best one (by mean validation NDCG@10) and
with SASRec, and a variant row with the row of its own model, by a paired bootstrap over test users
(``recsys.significance``), so the table says which differences are real. Coverage@10 and the popularity
percentile of the top-10 stand beside accuracy, and the test figures with the other exclusion setting come from the
same trained models."""

from __future__ import annotations

import csv
import json
import io
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from kernels.atomic import atomic_write_bytes  # noqa: E402
from recsys import distributed  # noqa: E402
from recsys.bundle import USER_RANKS  # noqa: E402
from recsys.models import model_class  # noqa: E402
from recsys.report_html import dataset_statistics, write_html  # noqa: E402
from recsys.run import RECIPES, RunResult, model_settings, resolve_dataset, scoped_settings, train_run  # noqa: E402
from recsys.significance import paired_bootstrap, per_user_metric  # noqa: E402
import recsys.distill  # noqa: E402,F401  (registers the recipes listed beside models)

SUMMARISED = ("hr@10", "ndcg@10", "mrr", "coverage@10", "popularity_percentile@10")
COLUMNS = ("model", *SUMMARISED, "seeds", *[f"{m}_sd" for m in SUMMARISED], "other_exclusion",
           "other_hr@10", "other_ndcg@10", "valid_ndcg@10", "train_seconds", "seconds_per_epoch", "parameters",
           "epochs", "best_epoch")
COMPARED = ("ndcg@10", "hr@10")


def mean_sd(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    array = np.asarray(values, dtype=np.float64)
    return float(array.mean()), float(array.std(ddof=1)) if len(array) > 1 else 0.0


def result_row(model: str, runs: list[RunResult]) -> dict:
    """One report row: the mean and spread over the model's seeds (one run per seed)."""
    metrics = [r.metrics for r in runs]
    other = next(k for k in metrics[0] if k.startswith("test_exclude_seen_"))
    row = {"model": model, "seeds": len(runs), "other_exclusion": other.removeprefix("test_exclude_seen_")}
    for m in SUMMARISED:
        row[m], row[f"{m}_sd"] = mean_sd([x["test"].get(m, float("nan")) for x in metrics])
    for m in ("hr@10", "ndcg@10"):
        row[f"other_{m}"] = mean_sd([x[other][m] for x in metrics])[0]
    for m in ("train_seconds", "seconds_per_epoch", "epochs", "best_epoch"):
        row[m] = mean_sd([x[m] for x in metrics])[0]
    row["valid_ndcg@10"] = mean_sd([x["valid"]["ndcg@10"] for x in metrics])[0]
    row["parameters"] = metrics[0]["parameters"]
    return row


def seed_ranks(runs: list[RunResult]) -> pd.DataFrame | None:
    """Each test user's target rank (index user_idx), one column per seed; None without saved ranks."""
    columns = []
    for run in runs:
        path = run.bundle_dir / USER_RANKS
        if not path.is_file():
            return None
        columns.append(pd.read_parquet(path).set_index("user_idx")["rank"])
    return pd.concat(columns, axis=1)


def references_by_row(rows: list[str], best: str, backbone: dict[str, str]) -> dict[str, list[str]]:
    """What each row is compared with: the best row (by validation), SASRec, and, for a variant ``row=model``, the
    row of its own model when listed (a method's gain over its backbone, same seeds)."""
    out = {}
    for row in rows:
        wanted = [best, "sasrec", backbone.get(row, row)]
        out[row] = [ref for i, ref in enumerate(wanted) if ref in rows and ref != row and ref not in wanted[:i]]
    return out


def significance(runs: dict[str, list[RunResult]], references: dict[str, list[str]]) -> dict[str, dict[str, dict]]:
    """row → reference → metric → ``PairedDifference`` of the row against each of its references, on the per-user
    metric averaged over each model's seeds."""
    ranks = {name: seed_ranks(r) for name, r in runs.items()}
    out: dict[str, dict[str, dict]] = {}
    for metric in COMPARED:
        users = {name: None if r is None else r.apply(lambda c: per_user_metric(c.to_numpy(), metric)).mean(axis=1)
                 for name, r in ranks.items()}
        for name in runs:
            for ref in references[name]:
                if users[name] is None or users[ref] is None:
                    continue
                a, b = users[name].align(users[ref], join="inner")
                out.setdefault(name, {}).setdefault(ref, {})[metric] = paired_bootstrap(a.to_numpy(), b.to_numpy())
    return out


def fmt(mean: float, sd: float, seeds: int) -> str:
    return f"{mean:.4f} ± {sd:.4f}" if seeds > 1 else f"{mean:.4f}"


def run_seed(run: RunResult) -> int:
    """The seed a run trained with (each model's configured one when the report was given none)."""
    return json.loads((run.bundle_dir / "config.json").read_text())["train_config"]["seed"]


def protocol_lines(manifest: dict, exclude_seen: bool, champion: str, seeds: list) -> list[str]:
    """What was compared and how: the sentences above the tables of the Markdown and HTML reports."""
    counts = manifest.get("counts", {})
    return [
        f"Dataset content hash `{manifest.get('content_hash', '?')[:16]}`; {counts.get('users', '?')} users, "
        f"{counts.get('items', '?')} items, {counts.get('interactions', '?')} interactions.",
        f"Protocol: {manifest.get('settings', {}).get('split', 'loo')} split, full ranking over the whole catalogue, "
        f"exclude_seen={'on' if exclude_seen else 'off'}; model selection by validation NDCG@10. "
        f"Champion (registry alias `champion`): **{champion}** (the single run with the best validation NDCG@10).",
        f"Seeds: {', '.join(str(s) for s in seeds)}" + (" (mean ± sample standard deviation over seeds)."
                                                       if len(seeds) > 1 else "."),
    ]


SIGNIFICANCE_NOTE = ("Paired bootstrap over test users (10,000 resamples; per-user metric averaged over seeds): "
                     "difference of the row minus the reference, its 95% interval and two-sided p-value.")


def result_table(rows: list[dict], exclude_seen: bool) -> tuple[list[str], list[list[str]]]:
    """The comparison table's header and cells."""
    other = "kept" if exclude_seen else "excluded"
    header = ["model", "HR@10", "NDCG@10", "MRR", "coverage@10", "popularity pct@10",
              f"HR@10 / NDCG@10, history {other}", "train time (s)", "s/epoch", "parameters", "epochs (best)"]
    cells = [[r["model"], fmt(r["hr@10"], r["hr@10_sd"], r["seeds"]), fmt(r["ndcg@10"], r["ndcg@10_sd"], r["seeds"]),
              fmt(r["mrr"], r["mrr_sd"], r["seeds"]), f"{r['coverage@10']:.4f}", f"{r['popularity_percentile@10']:.1f}",
              f"{r['other_hr@10']:.4f} / {r['other_ndcg@10']:.4f}", f"{r['train_seconds']:.1f}",
              f"{r['seconds_per_epoch']:.2f}", f"{r['parameters']:,}", f"{r['epochs']:g} ({r['best_epoch']:g})"]
             for r in rows]
    return header, cells


def significance_table(rows: list[dict], tests: dict, references: dict[str, list[str]]
                       ) -> tuple[list[str], list[list[str]]]:
    """The paired-bootstrap table's header and cells: one line per (row, reference) pair tested."""
    header = ["model", "reference", "ΔNDCG@10 [95% CI]", "p", "ΔHR@10 [95% CI]", "p"]
    cells = []
    for name in [r["model"] for r in rows]:
        for ref in references[name]:
            found = tests.get(name, {}).get(ref)
            if found:
                pairs = [(f"{d.mean:+.4f} [{d.low:+.4f}, {d.high:+.4f}]", f"{d.p_value:.4f}")
                         for d in (found[m] for m in COMPARED)]
                cells.append([name, ref, *[c for pair in pairs for c in pair]])
    return header, cells


def markdown_table(header: list[str], cells: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(c) + " |" for c in cells]


def write_markdown(path: Path, dataset: str, protocol: list[str], comparison: tuple[list[str], list[list[str]]],
                   significance: tuple[list[str], list[list[str]]], notes: list[str] = ()) -> None:
    """``eval.md`` from the tables ``result_table`` and ``significance_table`` built (the HTML page uses the same)."""
    lines = [f"# Evaluation on `{dataset}`", "", *protocol, "", *markdown_table(*comparison)]
    if significance[1]:
        lines += ["", SIGNIFICANCE_NOTE, "", *markdown_table(*significance)]
    lines += notes
    atomic_write_bytes(path, ("\n".join(lines) + "\n").encode())


def write_figure(path: Path, dataset: str, runs: dict[str, list[RunResult]]) -> bytes:
    fig, (curves, bars) = plt.subplots(1, 2, figsize=(12, 4.5))
    colour = {name: f"C{i % 10}" for i, name in enumerate(runs)}  # one colour per model in every panel
    for name, seeds in runs.items():
        for i, result in enumerate(seeds):
            label = name if i == 0 else None
            history = [h for h in result.metrics["history"] if h["loss"] is not None]
            if history:
                curves.plot([h["epoch"] for h in history], [h["valid_ndcg@10"] for h in history], marker=".",
                            label=label, color=colour[name], alpha=1.0 if i == 0 else 0.5)
            else:
                curves.axhline(result.metrics["valid"]["ndcg@10"], linestyle="--",
                               label=label and f"{name} (no training)", color=colour[name])
    curves.set(title=f"{dataset}: validation NDCG@10 per epoch", xlabel="epoch", ylabel="NDCG@10")
    curves.legend()
    metrics = ("hr@10", "ndcg@10", "mrr")
    width = 0.8 / max(len(runs), 1)
    for i, (name, seeds) in enumerate(runs.items()):
        stats = [mean_sd([r.metrics["test"][m] for r in seeds]) for m in metrics]
        bars.bar([j + i * width for j in range(len(metrics))], [s[0] for s in stats], width=width, label=name,
                 color=colour[name], yerr=[s[1] for s in stats] if len(seeds) > 1 else None, capsize=3)
    bars.set_xticks([j + width * (len(runs) - 1) / 2 for j in range(len(metrics))], [m.upper() for m in metrics])
    bars.set(title=f"{dataset}: test metrics (full ranking)")
    bars.legend()
    fig.tight_layout()
    image = io.BytesIO()
    fig.savefig(image, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, image.getvalue())
    return image.getvalue()


def row_model(entry: str) -> tuple[str, str]:
    """A ``--models`` entry: ``model``, or ``row=model`` for a variant of a model under its own row name (e.g.
    ``esasrec=sasrec`` with ``--set esasrec.layer=ligr``)."""
    row, _, model = entry.partition("=")
    return (row, model or row)


def accepted_settings(name: str) -> set[str]:
    """The keys a listed model (or recipe) takes."""
    return RECIPES[name].settings() if name in RECIPES else model_settings(name)


def settings_by_model(models: list[str], overrides: dict) -> dict[str, dict]:
    """Each listed row's settings: the plain keys its model accepts, then its scoped ``row.key`` ones (which win)."""
    return scoped_settings(overrides, {row: accepted_settings(model) for row, model in map(row_model, models)})


def run_report(dataset: str, models: list[str], *, raw_dir=None, data_root=None, engine=None, epochs: int | None = None,
               overrides: dict | None = None, seed: int | None = None, seeds: list[int] | None = None,
               out_root: Path = Path("reports"), track: bool = True, resume: bool = False) -> Path:
    """Train and evaluate each of ``models`` once per seed (``seeds``, else ``seed``) and write the report. Under
    torchrun every rank trains and evaluates; rank 0 alone sets the champion and writes the report. ``resume``
    reuses each run that finished with the same settings and continues each one left with a checkpoint."""
    ds = resolve_dataset(dataset, raw_dir=raw_dir, data_root=data_root, engine=engine)
    settings = settings_by_model(models, overrides or {})
    by_seed = bool(seeds)  # runs/<dataset>/<row>/seed-<S> whenever seeds are listed
    seeds = list(seeds) if seeds else [seed]
    runs: dict[str, list[RunResult]] = {}  # report row → one run per seed
    registered: dict[str, str] = {}  # report row → the registry model its versions belong to
    notes: list[str] = []
    for s in seeds:
        results: dict[str, RunResult] = {}  # this seed's runs, which later models may borrow from
        for name, model in map(row_model, models):
            if distributed.is_main():
                print(f"== training {name} on {dataset}" + (f", seed {s}" if by_seed else ""), file=sys.stderr)
            own = dict(settings[name])
            out_dir = Path("runs") / ds.manifest["name"] / name / (f"seed-{s}" if by_seed else "")
            if model in RECIPES:
                rows, registry, lines = RECIPES[model].run(ds, own, results, epochs=epochs, seed=s, track=track,
                                                           resume=resume, out_root=out_dir)
                results.update(rows)
                registered.update(registry)
                notes += [f"{line} (seed {s})" if line and by_seed else line for line in lines]
                continue
            for spec in model_class(model).borrows.values():
                # e.g. SLMRec borrows the item table of the SASRec trained just before it (model-specs §6)
                if spec.provider in results and spec.field not in own:
                    own[spec.field] = str(results[spec.provider].bundle_dir.resolve())
            results[name] = train_run(model, ds, epochs=epochs, overrides=own, seed=s, out_dir=out_dir, track=track,
                                      resume=resume)
            registered[name] = model
        for row, result in results.items():
            runs.setdefault(row, []).append(result)
    rows = [result_row(name, r) for name, r in runs.items()]
    best = max(rows, key=lambda r: r["valid_ndcg@10"])["model"]  # by mean validation NDCG@10, never test
    references = references_by_row(list(runs), best, dict(map(row_model, models)))
    tests = significance(runs, references)

    def write() -> Path:
        champion, run = max(((name, r) for name, seeds_ in runs.items() for r in seeds_),
                            key=lambda pair: pair[1].metrics["valid"]["ndcg@10"])
        if track and run.model_version is not None:
            from recsys.tracking import set_champion

            set_champion(registered[champion], run.model_version, sorted(set(registered.values())))
        out_dir = out_root / ds.manifest["name"]
        out_dir.mkdir(parents=True, exist_ok=True)
        exclude_seen = next(iter(runs.values()))[0].metrics["exclude_seen"]
        used = seeds if by_seed or seed is not None else sorted({run_seed(r) for rs in runs.values() for r in rs})
        protocol = protocol_lines(ds.manifest, exclude_seen, champion, used)
        comparison, compared = result_table(rows, exclude_seen), significance_table(rows, tests, references)
        write_markdown(out_dir / "eval.md", ds.manifest["name"], protocol, comparison, compared, notes)
        table = io.StringIO()
        writer = csv.DictWriter(table, fieldnames=COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_bytes(out_dir / "eval.csv", table.getvalue().encode())
        figure = write_figure(out_dir / "eval.png", ds.manifest["name"], runs)
        write_html(out_dir / "report.html", ds.manifest["name"], dataset_statistics(ds), protocol,
                   [("Comparison", "", *comparison), ("Significance", SIGNIFICANCE_NOTE, *compared)], figure, notes)
        if track:
            from recsys.tracking import log_report

            log_report(ds.manifest["name"], [out_dir / f for f in ("report.html", "eval.png", "eval.md", "eval.csv")],
                       " ".join(protocol))
        return out_dir

    return distributed.on_main(write)

"""The command line end to end on a small synthetic dataset: build → train (MLflow) → evaluate → report,
and a training process killed mid-run that resumes to the same result as an uninterrupted one."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from recsys.cli import main

SMALL = ["--set", "num_users=300", "--set", "num_items=120"]


@pytest.fixture
def small_dataset(tmp_path, capsys) -> Path:
    assert main(["data", "build", "--dataset", "synthetic", *SMALL]) == 0
    path = Path(capsys.readouterr().out.strip())
    assert (path / "manifest.json").is_file()
    return path


def test_train_evaluate_and_mlflow_registration(small_dataset, tmp_path, capsys):
    out = tmp_path / "bundle"
    code = main(["train", "--model", "sasrec", "--dataset", str(small_dataset), "--epochs", "2", "--seed", "7",
                 "--out", str(out), "--set", "hidden_size=16", "--set", "lr=0.005", "--no-progress"])
    assert code == 0
    capsys.readouterr()
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["epochs"] == 2 and metrics["train_seconds"] > 0
    for key in ("ndcg@10", "hr@10", "mrr", "coverage@10"):
        assert 0 <= metrics["test"][key] <= 1

    assert main(["evaluate", "--bundle", str(out)]) == 0
    assert json.loads(capsys.readouterr().out) == metrics["test"]
    assert main(["evaluate", "--bundle", str(out), "--split", "valid"]) == 0
    assert json.loads(capsys.readouterr().out) == metrics["valid"]

    from mlflow import MlflowClient

    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    version = client.get_latest_versions("recsys-sasrec")[0]
    run = client.get_run(version.run_id)
    assert run.data.params["model_config.hidden_size"] == "16"
    assert run.data.params["seed"] == "7"
    assert run.data.tags["dataset_hash"] == json.loads((small_dataset / "manifest.json").read_text())["content_hash"]
    assert len(client.get_metric_history(run.info.run_id, "valid_ndcg_at_10")) == 2
    assert run.data.metrics["test_ndcg_at_10"] == pytest.approx(metrics["test"]["ndcg@10"])


def test_max_k_bundle_evaluates_to_its_logged_cutoffs(small_dataset, tmp_path, capsys):
    out = tmp_path / "bundle"
    assert main(["train", "--model", "sasrec", "--dataset", str(small_dataset), "--epochs", "1", "--out", str(out),
                 "--set", "hidden_size=16", "--set", "max_k=10", "--set", "valid_users=50", "--no-progress"]) == 0
    capsys.readouterr()
    metrics = json.loads((out / "metrics.json").read_text())
    assert "ndcg@10" in metrics["test"] and "ndcg@20" not in metrics["test"]
    assert metrics["valid"]["num_users"] > 50  # the final figures use every user; only the epochs' are sampled
    assert main(["evaluate", "--bundle", str(out)]) == 0
    assert json.loads(capsys.readouterr().out) == metrics["test"]


def test_a_run_stopped_by_its_time_budget_keeps_its_checkpoint_and_resumes_under_a_larger_one(
        small_dataset, tmp_path, capsys):
    out, checkpoint = tmp_path / "bundle", tmp_path / "bundle.checkpoints" / "last.pt"
    train = ["train", "--model", "sasrec", "--dataset", str(small_dataset), "--epochs", "3", "--out", str(out),
             "--set", "hidden_size=16", "--no-track", "--no-progress"]
    assert main([*train, "--set", "max_minutes=1e-9"]) == 0  # the budget is spent by the first epoch
    assert "checkpoint is kept" in capsys.readouterr().err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["stopped_because"] == "time budget" and metrics["epochs"] == 1
    assert checkpoint.exists()
    assert main([*train, "--resume"]) == 0  # no budget now: max_minutes is not part of the run's fingerprint
    assert "resumed from" in capsys.readouterr().err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["stopped_because"] == "max epochs" and [h["epoch"] for h in metrics["history"]] == [1, 2, 3]
    assert not checkpoint.exists()


def test_report_writes_table_csv_figure_and_sets_champion(small_dataset, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = main(["report", "--dataset", str(small_dataset), "--models", "pop", "sasrec", "--epochs", "3",
                 "--set", "hidden_size=16", "--set", "lr=0.005"])
    assert code == 0
    name = json.loads((small_dataset / "manifest.json").read_text())["name"]
    report = tmp_path / "reports" / name
    table = (report / "eval.md").read_text()
    assert "| pop |" in table and "| sasrec |" in table
    assert "Seeds: 42." in table  # no --seeds: the seed each model trained with (its default), never "None"
    assert (report / "eval.csv").read_text().startswith("model,hr@10,ndcg@10,mrr")
    assert (report / "eval.png").stat().st_size > 10_000

    from mlflow import MlflowClient

    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    holders = []
    for model in ("pop", "sasrec"):
        try:
            client.get_model_version_by_alias(f"recsys-{model}", "champion")
            holders.append(model)
        except Exception:
            pass
    assert len(holders) == 1 and f"**{holders[0]}**" in table

    # `make serve` with no argument serves that champion, fetched from the registry through its models:/ URI
    from fastapi.testclient import TestClient

    from serving.app import create_app
    from serving.settings import ServiceSettings

    with TestClient(create_app(ServiceSettings(cache_dir=str(tmp_path / "cache")))) as service:
        served = service.get("/v1/models").json()["models"]
        assert [m["name"] for m in served] == holders
        assert served[0]["source"] == f"models:/recsys-{holders[0]}@champion"
        assert len(service.post("/v1/recommend", json={"history": ["1", "2"], "k": 5}).json()["items"]) == 5


def test_report_over_seeds_gives_mean_sd_significance_and_reuses_finished_runs(small_dataset, tmp_path, capsys,
                                                                                monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ["report", "--dataset", str(small_dataset), "--models", "pop", "sasrec", "ligr=sasrec", "--epochs", "2",
            "--seeds", "1", "2", "--set", "hidden_size=16", "--set", "lr=0.005", "--set", "ligr.layer=ligr"]
    assert main(args) == 0
    name = json.loads((small_dataset / "manifest.json").read_text())["name"]
    table = (tmp_path / "reports" / name / "eval.md").read_text()
    assert "Seeds: 1, 2 (mean ± sample standard deviation over seeds)." in table
    assert "| sasrec | " in table and " ± " in table
    # every model against the best one by validation (sasrec here) and against SASRec: pop vs sasrec is a row
    assert "| pop | sasrec | " in table and "Paired bootstrap over test users" in table
    # a variant row: SASRec with LiGR layers, trained under its own name
    ligr = json.loads((tmp_path / "runs" / name / "ligr" / "seed-1" / "config.json").read_text())
    assert ligr["model"] == "sasrec" and ligr["model_config"]["layer"] == "ligr" and "| ligr | " in table
    import pandas as pd

    # the page people look at: self-contained, the same tables, the figure inline; logged to MLflow with the PNG
    page = (tmp_path / "reports" / name / "report.html").read_text()
    assert "<td>ligr</td><td>sasrec</td>" in page and "Paired bootstrap over test users" in page
    assert "src='data:image/png;base64," in page and "<td>interactions</td>" in page
    assert not re.search(r"(src|href)=['\"](?!data:)", page)  # nothing fetched from elsewhere
    from mlflow import MlflowClient

    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name(name)
    assert "full ranking over the whole catalogue" in experiment.tags["mlflow.note.content"]
    [report_run] = client.search_runs([experiment.experiment_id], "tags.`recsys.kind` = 'report'")
    assert {f.path for f in client.list_artifacts(report_run.info.run_id)} >= {"report.html", "eval.png"}
    rows = pd.read_csv(tmp_path / "reports" / name / "eval.csv").set_index("model")
    assert rows.loc["sasrec", "seeds"] == 2 and rows.loc["sasrec", "ndcg@10_sd"] > 0
    assert 0 < rows.loc["pop", "popularity_percentile@10"] <= 100 and rows.loc["pop", "other_exclusion"] == "off"
    seed_runs = [tmp_path / "runs" / name / "sasrec" / f"seed-{s}" for s in (1, 2)]
    weights = [load_file(str(run / "weights.safetensors")) for run in seed_runs]
    assert all((run / "test_ranks.parquet").is_file() for run in seed_runs)
    assert any((weights[0][k] != weights[1][k]).any() for k in weights[0])  # the seeds trained different models
    capsys.readouterr()
    assert main([*args, "--resume"]) == 0  # nothing left to train: the six finished runs are reused
    assert capsys.readouterr().err.count("reusing the finished run") == 6
    assert (tmp_path / "reports" / name / "eval.md").read_text() == table


def test_unknown_setting_is_a_clear_error(small_dataset, capsys):
    assert main(["train", "--model", "sasrec", "--dataset", str(small_dataset), "--set", "hiden_size=3",
                 "--no-track"]) == 2
    assert "unknown setting 'hiden_size'" in capsys.readouterr().err


def _train_command(dataset: Path, out: Path, extra=()) -> list[str]:
    return [sys.executable, "-m", "recsys.cli", "train", "--model", "sasrec", "--dataset", str(dataset),
            "--epochs", "4", "--seed", "5", "--out", str(out), "--set", "hidden_size=16", "--no-track",
            "--no-progress", *extra]


def test_killed_training_resumes_to_the_uninterrupted_result(small_dataset, tmp_path):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    full = tmp_path / "full"
    subprocess.run(_train_command(small_dataset, full), check=True, env=env, capture_output=True)

    killed = tmp_path / "killed"
    checkpoint = tmp_path / "killed.checkpoints" / "last.pt"
    proc = subprocess.Popen(_train_command(small_dataset, killed), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not checkpoint.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert checkpoint.exists() and not (killed / "metrics.json").exists()

    subprocess.run(_train_command(small_dataset, killed, ["--resume"]), check=True, env=env, capture_output=True)
    a, b = load_file(str(full / "weights.safetensors")), load_file(str(killed / "weights.safetensors"))
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    assert json.loads((full / "metrics.json").read_text())["test"] == json.loads(
        (killed / "metrics.json").read_text())["test"]
    assert not checkpoint.exists()  # a finished run removes its resume point

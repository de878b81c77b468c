"""What `make eval` logs is visible through MLflow's REST API (a real `mlflow server` process)."""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request

from recsys.report import run_report
from tests.helpers import serve_mlflow


def _call(base: str, path: str, body: dict | None = None) -> dict:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(base + path, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def test_report_runs_and_champion_visible_through_rest_api(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    from pipelines.build import build_dataset

    dataset = build_dataset("synthetic", data_root=tmp_path / "data", num_users=200, num_items=80, num_clusters=8)
    run_report(str(dataset), ["pop", "sasrec"], epochs=2, overrides={"hidden_size": 16})

    uri = os.environ["MLFLOW_TRACKING_URI"]
    with serve_mlflow("--backend-store-uri", uri, "--workers", "1", timeout=90) as base:
        experiments = _call(base, "/api/2.0/mlflow/experiments/search", {"max_results": 10})["experiments"]
        ids = [e["experiment_id"] for e in experiments if e["name"] == dataset.name]
        runs = _call(base, "/api/2.0/mlflow/runs/search", {"experiment_ids": ids})["runs"]
        tags = [{t["key"]: t["value"] for t in r["data"]["tags"]} for r in runs]
        by_model = {t["model"]: r for t, r in zip(tags, runs) if "model" in t}
        assert set(by_model) == {"pop", "sasrec"}
        assert [t.get("recsys.kind") for t in tags if "model" not in t] == ["report"]  # the report's own run
        metrics = {m["key"] for m in by_model["sasrec"]["data"]["metrics"]}
        assert {"test_ndcg_at_10", "test_hr_at_10", "valid_ndcg_at_10", "loss"} <= metrics
        holders = []
        for model in ("pop", "sasrec"):
            try:
                _call(base, f"/api/2.0/mlflow/registered-models/alias?name=recsys-{model}&alias=champion")
                holders.append(model)
            except urllib.error.HTTPError:
                pass
        assert len(holders) == 1

"""What `make eval` logs is visible through MLflow's REST API (a real `mlflow server` process)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

from recsys.report import run_report


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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

    port = _free_port()
    uri = os.environ["MLFLOW_TRACKING_URI"]
    # mlflow's helper processes outlive a plain kill of the parent: own session, stop the whole group.
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri, "--host", "127.0.0.1",
         "--port", str(port), "--workers", "1"],
        start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 90
        while True:
            try:
                urllib.request.urlopen(base + "/health", timeout=2)
                break
            except OSError:
                assert server.poll() is None and time.time() < deadline, "mlflow server did not start"
                time.sleep(0.5)
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
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()

"""Shared fixtures. Tests never touch the network and never write outside their tmp dirs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


@pytest.fixture(autouse=True)
def _isolated_mlflow(tmp_path, monkeypatch):
    """Each test gets its own MLflow store, so no test writes into the repo's mlruns/."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("RECSYS_DATA_ROOT", str(tmp_path / "data"))


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Tests run on one intra-op thread: on a shared 2-core machine two threads thrash whenever anything else
    runs (5-25x slowdowns measured), and small test shapes gain nothing from a second thread."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def shared_dataset(name: str) -> Path:
    path = SHARED_DATA / name
    if not path.is_dir():
        pytest.skip(f"real data {name} not available (../shared/data absent)")
    return path

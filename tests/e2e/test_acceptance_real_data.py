"""Acceptance runs on the real data (`make test-slow`; minutes each, skipped when ../shared/data is absent)."""

from __future__ import annotations

import pytest

from pipelines.build import build_dataset
from recsys.run import train_run
from tests.conftest import shared_dataset

pytestmark = pytest.mark.slow


def test_sasrec_reaches_the_beauty_target_within_ten_minutes(tmp_path):
    path = build_dataset("amazon-beauty", shared_dataset("amazon-beauty"), data_root=tmp_path / "data")
    result = train_run("sasrec", str(path), out_dir=tmp_path / "sasrec", overrides={"max_minutes": 10},
                       track=False, progress=False)
    metrics = result.metrics
    assert metrics["exclude_seen"] is True and metrics["train_seconds"] <= 10 * 60 + 60  # stops after that epoch
    assert metrics["test"]["hr@10"] >= 0.085 and metrics["test"]["ndcg@10"] >= 0.050
    pop = train_run("pop", str(path), out_dir=tmp_path / "pop", track=False, progress=False).metrics
    assert metrics["test"]["ndcg@10"] > 5 * pop["test"]["ndcg@10"]


def test_sasrec_on_movielens_100k_beats_popularity(tmp_path):
    path = build_dataset("ml-100k", shared_dataset("ml-100k"), data_root=tmp_path / "data")
    sasrec = train_run("sasrec", str(path), out_dir=tmp_path / "sasrec", overrides={"dropout": 0.2},
                       track=False, progress=False).metrics
    pop = train_run("pop", str(path), out_dir=tmp_path / "pop", track=False, progress=False).metrics
    assert sasrec["test"]["hr@10"] > 1.8 * pop["test"]["hr@10"]

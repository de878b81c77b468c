"""``--resume`` reuses a finished run only when it was trained with the same settings (recsys.run.finished_run)."""

import json

import pytest

from recsys.models import model_class
from recsys.run import finished_run
from recsys.trainer import TrainConfig

RUN_CONFIG = {"train_config": TrainConfig().model_dump(mode="json"),
              "dataset": {"name": "d", "path": "/x", "content_hash": "h", "split": "loo"}, "exclude_seen": True}


def finished(tmp_path, model_config: dict, **train):
    out = tmp_path / "run"
    out.mkdir(exist_ok=True)
    train_config = {**RUN_CONFIG["train_config"], **train}
    (out / "config.json").write_text(json.dumps({**RUN_CONFIG, "model": "sasrec", "model_config": model_config,
                                                  "train_config": train_config}))
    (out / "metrics.json").write_text(json.dumps({"stopped_because": "early stopping", "test": {}}))
    (out / "weights.safetensors").write_bytes(b"")
    return out


@pytest.fixture
def current():
    return model_class("sasrec").Config().model_dump(mode="json")


def test_a_run_saved_before_an_option_existed_is_reused_with_the_option_at_its_default(tmp_path, current):
    older = {k: v for k, v in current.items() if not k.startswith("item_init")}  # as saved before item_init
    assert finished_run(finished(tmp_path, older), "sasrec", current, RUN_CONFIG) is not None
    assert finished_run(finished(tmp_path, older, max_minutes=5.0), "sasrec", current, RUN_CONFIG) is not None


@pytest.mark.parametrize("change", [{"hidden_size": 32}, {"item_init": "text"}, {"no_such_field": 1}])
def test_a_run_with_other_settings_is_not_reused(tmp_path, current, change):
    assert finished_run(finished(tmp_path, {**current, **change}), "sasrec", current, RUN_CONFIG) is None


def test_other_training_settings_are_not_reused(tmp_path, current):
    assert finished_run(finished(tmp_path, current, lr=0.01), "sasrec", current, RUN_CONFIG) is None

"""Trainer guarantees: seeded determinism, a resumed run equals an uninterrupted one, best-epoch restore,
and bundles that reproduce their metrics exactly."""

import json
import re

import numpy as np
import pandas as pd
import pytest
import torch
from pydantic import ValidationError

from recsys.bundle import load_bundle, save_bundle
from recsys.evaluation import cutoffs, evaluate
from recsys.models import build_model
from recsys.trainer import TrainConfig, Trainer
from tests.helpers import toy_split

MODEL = {"hidden_size": 8, "max_len": 8, "dropout": 0.3}


class Killed(Exception):
    pass


def _train(tmp_path, epochs, resume=False, name="ckpt", seed=3, kill_after=None, **extra):
    split, num_items = toy_split()
    torch.manual_seed(seed)
    model = build_model("sasrec", num_items, MODEL)
    config = TrainConfig(epochs=epochs, batch_size=16, lr=3e-3, seed=seed, patience=100, **extra)

    def on_epoch(record):
        # called before the epoch's checkpoint is written: dying at epoch k+1 leaves the checkpoint of epoch k
        if kill_after is not None and record["epoch"] == kill_after + 1:
            raise Killed

    result = Trainer(config, checkpoint_dir=tmp_path / name, progress=False).fit(
        model, split, num_items, exclude_seen=True, resume=resume, fingerprint="run", on_epoch=on_epoch)
    return model, result


def test_resumed_run_equals_uninterrupted_run(tmp_path):
    full_model, full = _train(tmp_path, epochs=4, name="a")
    # killed during epoch 3 (same settings, so the same cosine schedule): resuming continues after epoch 2
    with pytest.raises(Killed):
        _train(tmp_path, epochs=4, name="b", kill_after=2)
    resumed_model, resumed = _train(tmp_path, epochs=4, resume=True, name="b", seed=3)
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in full.history]
    for key, value in full_model.state_dict().items():
        assert torch.equal(value, resumed_model.state_dict()[key]), key


def test_run_stopped_by_its_time_budget_resumes_to_the_uninterrupted_result(tmp_path):
    full_model, full = _train(tmp_path, epochs=3, name="full")
    _, stopped = _train(tmp_path, epochs=3, name="budget", max_minutes=1e-9)  # spent by the first epoch
    assert stopped.stopped_because == "time budget" and [h["epoch"] for h in stopped.history] == [1]
    resumed_model, resumed = _train(tmp_path, epochs=3, name="budget", resume=True)
    assert resumed.stopped_because == "max epochs"
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in full.history]
    for key, value in full_model.state_dict().items():
        assert torch.equal(value, resumed_model.state_dict()[key]), key


def test_same_seed_same_weights_other_seed_differs(tmp_path):
    a, _ = _train(tmp_path, epochs=1, name="x", seed=1)
    b, _ = _train(tmp_path, epochs=1, name="y", seed=1)
    c, _ = _train(tmp_path, epochs=1, name="z", seed=2)
    assert torch.equal(a.item_embedding.weight, b.item_embedding.weight)
    assert not torch.equal(a.item_embedding.weight, c.item_embedding.weight)


def test_resume_refuses_a_checkpoint_of_other_settings(tmp_path):
    split, num_items = toy_split()
    _train(tmp_path, epochs=1, name="c")
    model = build_model("sasrec", num_items, MODEL)
    trainer = Trainer(TrainConfig(epochs=2), checkpoint_dir=tmp_path / "c", progress=False)
    with pytest.raises(ValueError, match="other settings"):
        trainer.fit(model, split, num_items, True, resume=True, fingerprint="another run")


def test_best_epoch_is_restored(tmp_path):
    model, result = _train(tmp_path, epochs=5, name="d")
    split, num_items = toy_split()
    best = max(result.history, key=lambda h: h["valid"]["ndcg@10"])
    assert result.best_epoch == best["epoch"]
    assert evaluate(model, split.valid, num_items, True)["ndcg@10"] == best["valid"]["ndcg@10"]


def test_valid_users_validates_every_epoch_on_one_seeded_sample_and_max_k_limits_the_cutoffs(tmp_path):
    split, num_items = toy_split()
    n = len(split.valid) // 2
    model, result = _train(tmp_path, epochs=3, name="s", valid_users=n, max_k=10)
    for record in result.history:
        assert record["valid"]["num_users"] == n
        assert {key.rsplit("@", 1)[1] for key in record["valid"] if "@" in key} == {"1", "5", "10"}
    best = result.history[result.best_epoch - 1]["valid"]
    # the restored best epoch scores on the trainer's sample (the config's seed, 3) exactly what it scored then
    assert evaluate(model, split.valid.sample(n, 3), num_items, True, ks=cutoffs(10)) == best
    with pytest.raises(ValidationError):
        TrainConfig(max_k=5)  # below the selection metric's cutoff


@pytest.mark.parametrize("model_name", ["sasrec", "mamba4rec"])
def test_bf16_precision_trains_under_autocast_with_fp32_weights(tmp_path, model_name):
    """precision=bf16: every training forward runs under bf16 autocast (the model's linear layers emit bf16) while
    the weights stay fp32; the run learns about as well as in fp32 on the toy data."""
    split, num_items = toy_split()
    seen = []

    def run(precision):
        torch.manual_seed(0)
        model = build_model(model_name, num_items, MODEL)
        linear = next(m for m in model.modules() if isinstance(m, torch.nn.Linear))
        linear.register_forward_hook(lambda module, args, out: seen.append((precision, out.dtype)) if
                                     module.training else None)
        config = TrainConfig(epochs=4, batch_size=16, lr=3e-3, seed=0, patience=100, precision=precision)
        result = Trainer(config, checkpoint_dir=tmp_path / precision, progress=False).fit(
            model, split, num_items, exclude_seen=True, fingerprint=precision)
        return model, result

    model, bf16 = run("bf16")
    _, fp32 = run("fp32")
    assert {dtype for precision, dtype in seen if precision == "bf16"} == {torch.bfloat16}
    assert {dtype for precision, dtype in seen if precision == "fp32"} == {torch.float32}
    assert all(p.dtype == torch.float32 for p in model.parameters())
    losses = [h["loss"] for h in bf16.history]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]
    assert losses != [h["loss"] for h in fp32.history]  # autocast really changed the arithmetic
    assert abs(losses[-1] - fp32.history[-1]["loss"]) < 0.05 * fp32.history[-1]["loss"]


def test_eval_set_sample_is_fixed_by_its_seed_and_keeps_the_order():
    valid = toy_split()[0].valid
    a, again, other = valid.sample(5, 0), valid.sample(5, 0), valid.sample(5, 1)
    assert np.array_equal(a.user_idx, again.user_idx) and not np.array_equal(a.user_idx, other.user_idx)
    rows = [int(np.flatnonzero(valid.user_idx == user)[0]) for user in a.user_idx]
    assert rows == sorted(rows) and len(set(rows)) == 5
    for i, row in enumerate(rows):
        assert a.target[i] == valid.target[row] and a.target_time[i] == valid.target_time[row]
        assert all(np.array_equal(x, y) for x, y in zip(a.history.row(i), valid.history.row(row)))
    assert valid.sample(None, 0) is valid and valid.sample(len(valid), 0) is valid


def test_early_stopping_stops_after_patience(tmp_path):
    split, num_items = toy_split()
    model = build_model("sasrec", num_items, MODEL)
    # lr 0: nothing improves after the first epoch
    result = Trainer(TrainConfig(epochs=50, lr=0.0, patience=2), progress=False).fit(model, split, num_items, True)
    assert result.stopped_because == "early stopping"
    assert result.epochs == 3


def test_bundle_round_trip_reproduces_metrics_exactly(tmp_path):
    import pandas as pd

    model, _ = _train(tmp_path, epochs=2, name="e")
    split, num_items = toy_split()
    metrics = {"test": evaluate(model, split.test, num_items, True)}
    items = pd.DataFrame({"item_idx": range(1, num_items + 1), "item_id": [f"i{i}" for i in range(1, num_items + 1)],
                          "title": ""})
    save_bundle(tmp_path / "bundle", model, {"exclude_seen": True}, items, metrics)
    loaded = load_bundle(tmp_path / "bundle")
    assert evaluate(loaded.model, split.test, num_items, True) == loaded.metrics["test"] == metrics["test"]
    assert sorted(p.name for p in (tmp_path / "bundle").iterdir()) == [
        "config.json", "items.parquet", "metrics.json", "weights.safetensors"]


def test_failed_bundle_write_leaves_nothing_that_looks_complete(tmp_path, monkeypatch):
    import recsys.bundle as bundle_module

    model, _ = _train(tmp_path, epochs=1, name="f")

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(bundle_module, "save_file", boom)
    with pytest.raises(OSError):
        save_bundle(tmp_path / "bundle", model, {}, pd.DataFrame({"item_idx": [1], "item_id": ["a"]}), {})
    assert not (tmp_path / "bundle").exists()
    assert not any(p.name.startswith(".bundle") for p in tmp_path.iterdir())


def test_bundle_whose_weights_do_not_fit_its_config_is_refused_with_its_path(tmp_path):
    """A gru4rec bundle saved before ``output_projection`` existed (and defaulted to on) names no such key, so its
    config now builds a model with a layer its weights lack: a clear error naming the bundle, not torch's."""
    model = build_model("gru4rec", 5, {"hidden_size": 8, "max_len": 4, "output_projection": False})
    items = pd.DataFrame({"item_idx": range(1, 6), "item_id": [f"i{i}" for i in range(1, 6)]})
    path = save_bundle(tmp_path / "bundle", model.eval(), {}, items, {})
    config = json.loads((path / "config.json").read_text())
    del config["model_config"]["output_projection"]
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=re.escape(str(path)) + ".*does not fit the gru4rec config"):
        load_bundle(path)

"""SLMRec (model-specs §6): backbone loading and truncation, the frozen borrowed item table, left padding,
block-aligned distillation with a frozen teacher kept out of the student, bundles, and the distillation recipe
end to end through the command line with linked MLflow runs."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from recsys.bundle import borrowed_inputs, load_bundle, save_bundle
from recsys.models import build_model
from recsys.losses import BlockDistillation
from recsys.models.slmrec import SLMRecConfig, block_alignment, default_blocks
from tests.helpers import left_padded_batch

NUM_ITEMS = 20
TINY = {"hidden_size": 16, "num_heads": 2, "max_len": 12, "dropout": 0.0}
ROWS = [[3, 4, 5, 6, 7], [7, 8], [9, 1, 2]]


def items_frame(num_items: int = NUM_ITEMS) -> pd.DataFrame:
    idx = np.arange(1, num_items + 1)
    return pd.DataFrame({"item_idx": idx, "item_id": [f"it{i}" for i in idx]})


def save(path: Path, model) -> Path:
    return save_bundle(path, model.eval(), {"exclude_seen": True}, items_frame(model.num_items), {})


@pytest.fixture
def sasrec_bundle(tmp_path) -> Path:
    torch.manual_seed(1)
    return save(tmp_path / "sasrec", build_model("sasrec", NUM_ITEMS, {"hidden_size": 8, "max_len": 12}))


def with_borrowed(num_items: int, config: dict):
    """An slmrec built as the run path builds it: the item table and teacher its config names resolved first."""
    config = SLMRecConfig(**config)
    return build_model("slmrec", num_items, config, **borrowed_inputs("slmrec", config, num_items))


def causal_batch(rows, width):
    """A training batch: inputs e₁…e_{m−1}, targets e₂…e_m, left-padded."""
    batch = left_padded_batch([r[:-1] for r in rows], width)
    batch.targets = left_padded_batch([r[1:] for r in rows], width).items
    return batch


def scores(model, rows, width):
    with torch.no_grad():
        return model.encode(left_padded_batch(rows, width)) @ model.item_embeddings().T


def test_random_backbone_has_the_configured_shape():
    model = build_model("slmrec", NUM_ITEMS, {**TINY, "num_layers": 3})
    assert len(model.backbone.layers) == 3 and model.backbone.config.hidden_size == 16
    assert model.config.item_dim == 16  # a learned table defaults to the backbone width
    assert scores(model.eval(), ROWS, 5).shape == (3, NUM_ITEMS + 1)
    with pytest.raises(ValueError, match="exceeds max_len"):
        model.encode(left_padded_batch([list(range(1, 14))], 13))
    with pytest.raises(ValueError, match="divisible"):
        build_model("slmrec", NUM_ITEMS, {**TINY, "num_heads": 3})
    with pytest.raises(ValueError, match="backbone_path"):
        build_model("slmrec", NUM_ITEMS, {**TINY, "lora_rank": 4})


def save_llama(path: Path, layers: int = 4, causal_lm: bool = False) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaModel

    torch.manual_seed(3)
    config = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=24, num_hidden_layers=layers,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    model = (LlamaForCausalLM if causal_lm else LlamaModel)(config)
    model.save_pretrained(path)
    return model


@pytest.mark.parametrize("causal_lm", [False, True])
def test_backbone_loads_from_a_local_directory_truncated_to_its_first_layers(tmp_path, causal_lm):
    saved = save_llama(tmp_path / "llama", layers=4, causal_lm=causal_lm)
    saved_layers = (saved.model if causal_lm else saved).layers
    model = build_model("slmrec", NUM_ITEMS, {"backbone_path": str(tmp_path / "llama"), "num_layers": 2,
                                              "max_len": 12, "hidden_size": 999})
    assert len(model.backbone.layers) == 2 and model.backbone.config.num_hidden_layers == 2
    assert model.backbone.config.hidden_size == 16  # the backbone's width wins over hidden_size
    for kept, original in zip(model.backbone.layers, saved_layers[:2]):
        for (name, p), q in zip(kept.named_parameters(), original.parameters()):
            assert torch.equal(p, q), name
    assert model.backbone.get_input_embeddings().weight.shape[0] == 1  # token table dropped
    assert scores(model.eval(), ROWS, 5).shape == (3, NUM_ITEMS + 1)
    with pytest.raises(ValueError, match="exceeds the backbone's 4 layers"):
        build_model("slmrec", NUM_ITEMS, {"backbone_path": str(tmp_path / "llama"), "num_layers": 5})
    with pytest.raises(FileNotFoundError, match="no config.json"):
        build_model("slmrec", NUM_ITEMS, {"backbone_path": str(tmp_path / "nowhere")})


def test_a_non_causal_backbone_is_refused(tmp_path):
    from transformers import BertConfig, BertModel

    BertModel(BertConfig(vocab_size=8, hidden_size=8, num_hidden_layers=1, num_attention_heads=1,
                         intermediate_size=8)).save_pretrained(tmp_path / "bert")
    with pytest.raises(ValueError, match="not a causal decoder"):
        build_model("slmrec", NUM_ITEMS, {"backbone_path": str(tmp_path / "bert"), "num_layers": 1})


def test_lora_trains_only_adapters_of_a_loaded_backbone(tmp_path):
    save_llama(tmp_path / "llama", layers=2)
    model = build_model("slmrec", NUM_ITEMS, {"backbone_path": str(tmp_path / "llama"), "num_layers": 2,
                                              "max_len": 12, "lora_rank": 2})
    trainable = [n for n, p in model.backbone.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert {n.split(".lora_")[0].split(".")[-1] for n in trainable} == {"gate_proj", "up_proj", "down_proj"}
    model.loss(causal_batch(ROWS, 4)).backward()
    assert all(p.grad is not None for n, p in model.backbone.named_parameters() if "lora_B" in n)
    # a bundle round trip rebuilds the same adapter layout
    bundle = load_bundle(save(tmp_path / "bundle", model))
    torch.testing.assert_close(scores(bundle.model, ROWS, 5), scores(model.eval(), ROWS, 5))


@pytest.mark.parametrize("setup", ["random-1", "random-3", "loaded-gqa", "lora"])
def test_scoring_runs_the_last_layer_at_the_last_position_only_with_the_same_result(tmp_path, setup):
    torch.manual_seed(0)
    if setup.startswith("random"):
        config = {**TINY, "num_layers": int(setup[-1])}
    else:
        save_llama(tmp_path / "llama", layers=3)  # 2 query heads over 1 key/value head
        config = {"backbone_path": str(tmp_path / "llama"), "num_layers": 3, "max_len": 12,
                  "lora_rank": 2 if setup == "lora" else 0}
    model = build_model("slmrec", NUM_ITEMS, config).eval()
    body = model.backbone.get_base_model() if setup == "lora" else model.backbone
    seen = []
    body.layers[-1].mlp.register_forward_hook(lambda module, args, out: seen.append(args[0].shape))
    rows = [*ROWS, [4]]
    for width in (5, 12):
        batch = left_padded_batch(rows, width)
        with torch.no_grad():
            full = model.score_head(model.layer_states(batch.items)[-1][:, -1])
            seen.clear()
            fast = model.encode(batch)
        assert seen == [torch.Size([len(rows), body.config.hidden_size])]  # one state per row, not per position
        torch.testing.assert_close(fast, full, rtol=1e-4, atol=1e-5)


def test_left_padding_and_batch_width_never_change_a_score(sasrec_bundle):
    torch.manual_seed(0)
    model = with_borrowed(NUM_ITEMS, {**TINY, "num_layers": 2, "item_table_bundle": str(sasrec_bundle)}).eval()
    tight, wide = scores(model, ROWS, 5), scores(model, ROWS, 12)
    alone = scores(model, ROWS[1:2], 2)
    torch.testing.assert_close(wide, tight, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(alone[0], tight[1], rtol=1e-4, atol=1e-5)
    # and the pads are really masked: a different history in the padded slots would otherwise leak in
    assert not torch.allclose(scores(model, [[5, 6, 7, 8, 7]], 5)[0], tight[1])


def test_borrowed_item_table_is_frozen_and_saved_with_the_model(sasrec_bundle, tmp_path):
    sasrec = load_bundle(sasrec_bundle).model
    torch.manual_seed(0)
    model = with_borrowed(NUM_ITEMS, {**TINY, "num_layers": 2, "item_table_bundle": str(sasrec_bundle)})
    assert model.config.item_dim == 8  # d_i read from the SASRec bundle
    assert torch.equal(model.item_embeddings(), sasrec.item_embeddings())
    assert "item_table" not in dict(model.named_parameters()) and "item_table" in model.state_dict()
    before = model.item_table.clone()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model.train()
    model.loss(causal_batch(ROWS, 4)).backward()
    assert not model.item_table.requires_grad and model.item_table.grad is None
    assert model.input_projection.weight.grad is not None and model.score_head.weight.grad is not None
    optimizer.step()
    assert torch.equal(model.item_table, before)

    # the SLMRec bundle is self-contained: it loads after the SASRec bundle is gone
    bundle_dir = save(tmp_path / "slmrec", model)
    expected = scores(model.eval(), ROWS, 5)
    shutil.rmtree(sasrec_bundle)
    loaded = load_bundle(bundle_dir).model
    torch.testing.assert_close(scores(loaded, ROWS, 5), expected)
    assert torch.equal(loaded.item_embeddings(), before)
    # but a model built without the table's source and never loaded refuses to score with a placeholder
    orphan = build_model("slmrec", NUM_ITEMS, loaded.config)  # nothing resolved
    with pytest.raises(RuntimeError, match="placeholder"):
        orphan.item_embeddings()


def test_item_table_of_another_catalogue_is_refused(sasrec_bundle):
    with pytest.raises(ValueError, match="has 20 items, this dataset 25"):
        with_borrowed(25, {**TINY, "item_table_bundle": str(sasrec_bundle)})
    with pytest.raises(FileNotFoundError, match="not found"):
        with_borrowed(NUM_ITEMS, {**TINY, "item_table_bundle": str(sasrec_bundle) + "-missing"})


def test_block_alignment_follows_the_spec():
    assert block_alignment(8, 32, 4) == [(2, 8), (4, 16), (6, 24), (8, 32)]  # model-specs §6
    assert block_alignment(2, 8, 2) == [(1, 4), (2, 8)]
    assert default_blocks(2) == 2 and default_blocks(8, 32) == 4 and default_blocks(3) == 1
    with pytest.raises(ValueError, match="must divide"):
        block_alignment(2, 8, 4)


def test_distillation_loss_matches_a_hand_computed_value():
    s = [torch.tensor([[3.0, 4.0], [1.0, 0.0]])]
    t = [torch.tensor([[3.0, 0.0], [1.0, 0.0]])]
    # row 1: cos = 9 / (5·3) = 0.6, ‖s − t‖ = 4; row 2: identical
    expected = ((1 - 0.6) * 2.0 + 0.5 * 4.0 + 0.0) / 2
    assert BlockDistillation(cosine_weight=2.0, l2_weight=0.5)(s, t).item() == pytest.approx(expected)
    two_blocks = BlockDistillation(cosine_weight=2.0, l2_weight=0.5)(s * 2, t * 2)
    assert two_blocks.item() == pytest.approx(2 * expected)  # a sum over blocks
    same = torch.randn(4, 3, requires_grad=True)
    zero = BlockDistillation()([same], [same.detach().clone()])
    zero.backward()
    assert zero.item() == pytest.approx(0.0, abs=1e-6) and torch.isfinite(same.grad).all()


def teacher_and_student(tmp_path, sasrec_bundle, teacher_layers=4, student_layers=2, **student_config):
    base = {**TINY, "item_table_bundle": str(sasrec_bundle)}
    torch.manual_seed(0)
    teacher_dir = save(tmp_path / "teacher", with_borrowed(NUM_ITEMS, {**base, "num_layers": teacher_layers}))
    student = with_borrowed(NUM_ITEMS, {**base, "num_layers": student_layers, "teacher_bundle": str(teacher_dir),
                                        **student_config})
    return teacher_dir, student


def test_teacher_is_frozen_and_never_part_of_the_student(tmp_path, sasrec_bundle):
    teacher_dir, student = teacher_and_student(tmp_path, sasrec_bundle)
    assert len(student.supervision_heads) == 1  # B = 2 blocks for N = 2: one head below the last block
    student.train()
    loss = student.loss(causal_batch(ROWS, 4))
    teacher = student.teacher()
    assert not teacher.training  # student.train() never switches the teacher's dropout on
    plain = with_borrowed(NUM_ITEMS, {**student.config.model_dump(), "teacher_bundle": None,
                                              "supervision_weight": 0.0})
    plain.load_state_dict({k: v for k, v in student.state_dict().items() if "supervision" not in k})
    assert loss.item() > plain.train().loss(causal_batch(ROWS, 4)).item()  # KD and MS terms are added
    loss.backward()
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert student.supervision_heads[0].weight.grad is not None
    own = {id(p) for p in student.parameters()}
    assert not any(id(p) in own for p in teacher.parameters())
    assert not any(k.startswith("_teacher") or "teacher" in k for k in student.state_dict())
    saved = load_bundle(save(tmp_path / "student", student))
    assert set(saved.model.state_dict()) == set(student.state_dict())
    assert "_teacher" not in saved.model.__dict__  # loading a student never loads its teacher


def test_distillation_term_is_zero_when_the_student_equals_the_teacher_at_aligned_layers(tmp_path, sasrec_bundle):
    teacher_dir, student = teacher_and_student(tmp_path, sasrec_bundle, teacher_layers=2, student_layers=2,
                                               supervision_weight=0.0)
    student.load_state_dict(load_bundle(teacher_dir).model.state_dict())
    batch = causal_batch(ROWS, 4)
    student.eval()
    states = student.layer_states(batch.items, all_layers=True)
    term = student.distillation_terms(batch, states, student.item_embeddings())
    assert term.item() == pytest.approx(0.0, abs=1e-5)
    with torch.no_grad():
        student.input_projection.weight.add_(0.1)
    states = student.layer_states(batch.items, all_layers=True)
    assert student.distillation_terms(batch, states, student.item_embeddings()).item() > 1e-3


def test_teacher_of_incompatible_depth_or_table_is_refused(tmp_path, sasrec_bundle):
    with pytest.raises(ValueError, match="must divide"):
        teacher_and_student(tmp_path, sasrec_bundle, teacher_layers=3, student_layers=2)
    torch.manual_seed(5)
    other = save(tmp_path / "other", build_model("slmrec", NUM_ITEMS, {**TINY, "num_layers": 4}))
    with pytest.raises(ValueError, match="share the same frozen item table"):
        with_borrowed(NUM_ITEMS, {**TINY, "num_layers": 2, "item_table_bundle": str(sasrec_bundle),
                                  "teacher_bundle": str(other)})
    # a student built without its teacher resolved cannot compute the distillation loss
    student = build_model("slmrec", NUM_ITEMS, {**TINY, "num_layers": 2, "teacher_bundle": str(other)})
    with pytest.raises(RuntimeError, match="was not given"):
        student.loss(causal_batch(ROWS, 4))


def test_bundle_round_trip_gives_the_same_scores(tmp_path):
    torch.manual_seed(0)
    model = build_model("slmrec", NUM_ITEMS, {**TINY, "num_layers": 2}).eval()
    bundle = load_bundle(save(tmp_path / "b", model))
    torch.testing.assert_close(scores(bundle.model, ROWS, 5), scores(model, ROWS, 5))


def test_distill_command_writes_the_distillation_metrics_and_links_the_runs(tmp_path, capsys):
    from mlflow import MlflowClient

    from recsys.cli import main

    assert main(["data", "build", "--dataset", "synthetic", "--set", "num_users=300", "--set", "num_items=120"]) == 0
    dataset = capsys.readouterr().out.strip()
    out = tmp_path / "distill"
    code = main(["distill", "--dataset", dataset, "--teacher-layers", "4", "--epochs", "1", "--out", str(out),
                 "--set", "hidden_size=16", "--set", "num_heads=2", "--set", "max_len=20",
                 "--set", "sasrec.hidden_size=16", "--no-progress"])
    assert code == 0
    printed = json.loads(capsys.readouterr().out)
    metrics = json.loads((out / "student" / "metrics.json").read_text())
    figures = metrics["distillation"]
    assert figures == printed["distillation"]
    for key in ("teacher_ndcg@10", "student_ndcg@10", "teacher_layers", "student_layers", "teacher_params",
                "student_params", "speedup"):
        assert key in figures, key
    teacher_metrics = json.loads((out / "teacher" / "metrics.json").read_text())
    assert figures["teacher_layers"] == 4 and figures["student_layers"] == 1
    assert figures["teacher_ndcg@10"] == teacher_metrics["test"]["ndcg@10"]
    assert figures["student_ndcg@10"] == metrics["test"]["ndcg@10"]
    assert figures["teacher_params"] > figures["student_params"] > 0 and figures["speedup"] > 0
    student_config = json.loads((out / "student" / "config.json").read_text())["model_config"]
    assert student_config["num_layers"] == 1 and student_config["teacher_bundle"] == str((out / "teacher").resolve())

    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    name = json.loads((Path(dataset) / "manifest.json").read_text())["name"]
    runs = client.search_runs([client.get_experiment_by_name(name).experiment_id])
    by_role = {r.data.tags.get("distill_role", r.info.run_name): r for r in runs}
    assert set(by_role) == {"item_table", "teacher", "student", "slmrec-distill"}
    parent = by_role["slmrec-distill"]
    for role in ("item_table", "teacher", "student"):
        assert by_role[role].data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert by_role["student"].data.tags["teacher_run_id"] == by_role["teacher"].info.run_id
    assert parent.data.tags["teacher_run_id"] == by_role["teacher"].info.run_id
    assert parent.data.metrics["speedup"] == pytest.approx(figures["speedup"])
    assert by_role["student"].data.metrics["distillation_student_ndcg_at_10"] == pytest.approx(
        figures["student_ndcg@10"])
    assert parent.info.status == "FINISHED"

    # a trained teacher is reused, not retrained: its depth, table and metrics come from its bundle
    again = tmp_path / "again"
    code = main(["distill", "--dataset", dataset, "--teacher-bundle", str(out / "teacher"), "--student-layers", "2",
                 "--epochs", "1", "--out", str(again), "--set", "hidden_size=16", "--set", "num_heads=2",
                 "--set", "max_len=20", "--no-progress", "--no-track"])
    assert code == 0 and not (again / "teacher").exists()
    figures = json.loads((again / "student" / "metrics.json").read_text())["distillation"]
    assert figures["teacher_layers"] == 4 and figures["student_layers"] == 2
    assert figures["teacher_ndcg@10"] == teacher_metrics["test"]["ndcg@10"]
    capsys.readouterr()
    assert main(["distill", "--dataset", dataset, "--teacher-bundle", str(out / "teacher"), "--teacher-layers", "8",
                 "--no-track"]) == 2
    assert "the teacher bundle has 4 layers" in capsys.readouterr().err
    assert main(["distill", "--dataset", dataset, "--teacher-bundle", str(out / "sasrec"), "--no-track"]) == 2
    assert "not an slmrec" in capsys.readouterr().err


def test_distill_rejects_settings_the_recipe_owns(tmp_path):
    from recsys.distill import distill_run, split_by_role

    assert split_by_role({"lr": 1, "student.lr": 2, "sasrec.hidden_size": 8}) == {
        "sasrec": {"hidden_size": 8}, "teacher": {"lr": 1}, "student": {"lr": 2}}
    with pytest.raises(ValueError, match="set by the recipe"):
        split_by_role({"num_layers": 2})
    with pytest.raises(ValueError, match="'tutor' is not one of"):
        split_by_role({"tutor.lr": 2})
    with pytest.raises(ValueError, match="student layers"):
        distill_run("synthetic", teacher_layers=2)  # 2 // 4 = 0 layers


def test_report_gives_slmrec_the_item_table_of_the_sasrec_trained_before_it(tmp_path, capsys, monkeypatch):
    from recsys.cli import main

    assert main(["data", "build", "--dataset", "synthetic", "--set", "num_users=300", "--set", "num_items=120"]) == 0
    dataset = Path(capsys.readouterr().out.strip())
    monkeypatch.chdir(tmp_path)
    assert main(["report", "--dataset", str(dataset), "--models", "sasrec", "slmrec", "--epochs", "1",
                 "--set", "hidden_size=16", "--set", "num_layers=1", "--set", "num_heads=2", "--no-track"]) == 0
    name = json.loads((dataset / "manifest.json").read_text())["name"]
    assert "| slmrec |" in (tmp_path / "reports" / name / "eval.md").read_text()
    slmrec = load_bundle(tmp_path / "runs" / name / "slmrec")
    sasrec = load_bundle(tmp_path / "runs" / name / "sasrec")
    assert slmrec.config["model_config"]["item_table_bundle"] == str(sasrec.path.resolve())
    assert torch.equal(slmrec.model.item_embeddings(), sasrec.model.item_embeddings())


def test_report_runs_the_distillation_recipe_beside_sasrec(tmp_path, capsys, monkeypatch):
    from recsys.cli import main

    assert main(["data", "build", "--dataset", "synthetic", "--set", "num_users=300", "--set", "num_items=120"]) == 0
    dataset = Path(capsys.readouterr().out.strip())
    monkeypatch.chdir(tmp_path)
    assert main(["report", "--dataset", str(dataset), "--models", "sasrec", "slmrec-distill", "--epochs", "1",
                 "--set", "hidden_size=16", "--set", "num_heads=2", "--set", "slmrec-distill.teacher_layers=4",
                 "--set", "slmrec-distill.student.lr=0.003"]) == 0
    name = json.loads((dataset / "manifest.json").read_text())["name"]
    report = (tmp_path / "reports" / name / "eval.md").read_text()
    # the champion alias lands on the registered model of the winning row (teacher and student are recsys-slmrec)
    from mlflow import MlflowClient

    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    champion = report.split("Champion (registry alias `champion`): **")[1].split("**")[0]
    registered = "recsys-sasrec" if champion == "sasrec" else "recsys-slmrec"
    version = client.get_model_version_by_alias(registered, "champion")
    assert client.get_run(version.run_id).data.tags.get("distill_role", "sasrec") == champion.removeprefix("slmrec-")
    for row in ("| sasrec |", "| slmrec-teacher |", "| slmrec-student |"):
        assert row in report, row
    assert "1-layer student keeps" in report and "4-layer teacher" in report
    runs = tmp_path / "runs" / name
    student = load_bundle(runs / "slmrec-distill" / "student")
    assert student.config["model_config"]["num_layers"] == 1
    assert student.config["train_config"]["lr"] == 0.003
    assert torch.equal(student.model.item_embeddings(), load_bundle(runs / "sasrec").model.item_embeddings())


def test_report_settings_go_to_the_models_that_take_them():
    from recsys.report import settings_by_model

    own = settings_by_model(["sasrec", "slmrec-distill"], {
        "lr": 0.002, "sasrec.hidden_size": 64, "slmrec-distill.teacher_layers": 8, "slmrec-distill.lr": 0.001})
    assert own == {"sasrec": {"lr": 0.002, "hidden_size": 64},
                   "slmrec-distill": {"lr": 0.001, "teacher_layers": 8}}
    # num_layers is the recipe's: plain, it goes to a plain slmrec only
    assert settings_by_model(["slmrec", "slmrec-distill"], {"num_layers": 2}) == {
        "slmrec": {"num_layers": 2}, "slmrec-distill": {}}
    with pytest.raises(ValueError, match="is not one of"):
        settings_by_model(["sasrec"], {"bert4rec.lr": 1})
    with pytest.raises(ValueError, match="has no setting"):
        settings_by_model(["sasrec"], {"sasrec.mask_prob": 0.2})
    with pytest.raises(ValueError, match="apply to none"):
        settings_by_model(["pop"], {"hidden_size": 8})


def test_item_text_embeddings_are_concatenated_before_the_projection_and_kept_in_the_bundle(tmp_path, sasrec_bundle):
    """``item_text``: MiniLM embeddings of each item's text join the borrowed table at the input (P takes
    d_i + 384); the table used for scoring is unchanged; a bundle restores the text table without re-encoding."""
    from types import SimpleNamespace

    titles = ["red lipstick", "pink lip gloss", "nail polish", "shampoo", "conditioner"] * 4
    items = items_frame().assign(title=[f"{t} {i}" for i, t in enumerate(titles)], brand="Acme")
    dataset = SimpleNamespace(items=items, path=tmp_path, content_hash="abc")
    torch.manual_seed(0)
    model = with_borrowed(NUM_ITEMS, {**TINY, "num_layers": 2, "item_text": True,
                                      "item_table_bundle": str(sasrec_bundle)}).eval()
    assert model.input_projection.in_features == model.config.item_dim + 384
    model.prepare(dataset)
    norms = model.text_table.norm(dim=1)
    assert norms[0] == 0 and torch.allclose(norms[1:], torch.ones(NUM_ITEMS), atol=1e-4)  # pad row stays zero
    assert torch.equal(model.item_embeddings(), load_bundle(sasrec_bundle).model.item_embeddings())
    before = scores(model, ROWS, 6)
    loss = model.train().loss(causal_batch(ROWS, 6))
    loss.backward()
    assert torch.isfinite(loss) and model.text_table.grad is None  # frozen, a buffer
    model.eval()
    reloaded = load_bundle(save(tmp_path / "with_text", model)).model
    assert torch.equal(reloaded.text_table, model.text_table)
    torch.testing.assert_close(scores(reloaded, ROWS, 6), before)
    model.text_table[5] = 0.0  # the text is used: item 5 in a history changes the scores
    assert not torch.allclose(scores(model, ROWS, 6), before)

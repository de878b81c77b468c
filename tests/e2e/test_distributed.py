"""Training and evaluation as several ranks of one torchrun job (recsys.distributed), for real: gloo process groups
on this machine's CPUs, two separate `--nnodes 2` launches meeting through c10d rendezvous on 127.0.0.1, and a rank
killed with SIGKILL under `--max-restarts 1`. Nothing of torch.distributed is mocked."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from recsys.cli import main
from tests.helpers import free_port

SMALL = ["--set", "num_users=300", "--set", "num_items=120"]
# 300 users give 300 training windows: 20 steps of 15 sequences an epoch; dropout 0 so ranks draw nothing
EQUIVALENCE = ["--epochs", "1", "--threads", "1", "--no-progress", "--seed", "3", "--set", "batch_size=15",
               "--set", "dropout=0", "--set", "hidden_size=16", "--set", "max_len=20"]


@pytest.fixture
def small_dataset(tmp_path, capsys) -> Path:
    assert main(["data", "build", "--dataset", "synthetic", *SMALL]) == 0
    return Path(capsys.readouterr().out.strip())


def torchrun(*args: str, nproc: int = 2, extra: tuple[str, ...] = (), check: bool = True,
             wait: bool = True, cwd: Path | None = None) -> subprocess.CompletedProcess | subprocess.Popen:
    """``torchrun [extra] --nproc-per-node N -m recsys ARGS`` with this interpreter (torch.distributed.run), run
    in ``cwd`` (where reports/ and runs/ go)."""
    if not extra:
        extra = ("--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{free_port()}")
    command = [sys.executable, "-m", "torch.distributed.run", *extra, "--nproc-per-node", str(nproc),
               "-m", "recsys", *args]
    if not wait:
        return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=cwd)
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=cwd)
    if check and done.returncode != 0:
        raise AssertionError(f"torchrun failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}")
    return done


def one_process(*args: str) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "recsys", *args], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-6000:]
    return done


def weights_differ(a: Path, b: Path, skip=()) -> float:
    wa, wb = load_file(a / "weights.safetensors"), load_file(b / "weights.safetensors")
    assert wa.keys() == wb.keys()
    return max(float((wa[k] - wb[k]).abs().max()) for k in wa if k not in skip)


def redundant_key_biases(bundle: Path) -> set[str]:
    """SASRec's key projection bias (the first half of ``key_value.bias``) shifts every attention score of a query
    by the same q·b, which softmax ignores: its gradient is zero in exact arithmetic, so Adam turns rounding noise
    into ±lr steps whatever the world size, and its value never changes a score. Left out of the weight comparison
    (the scores are compared instead, through the metrics)."""
    return {k for k in load_file(bundle / "weights.safetensors") if k.endswith("attn.key_value.bias")}


@pytest.mark.parametrize("model", ["sasrec", "mamba4rec"])
def test_two_ranks_end_with_the_weights_of_one_process(small_dataset, tmp_path, model):
    """20 steps of full cross-entropy at the same global batch: 2 gloo ranks of 1 thread each end where 1 process
    of 1 thread ends, to 1e-4, because each global batch is dealt to the ranks and each rank's loss is weighted by
    its share of the batch's targets."""
    args = ["train", "--model", model, "--dataset", str(small_dataset), "--no-track", *EQUIVALENCE]
    one_process(*args, "--out", str(tmp_path / "one"))
    torchrun(*args, "--out", str(tmp_path / "two"))
    one, two = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("one", "two"))
    assert weights_differ(tmp_path / "one", tmp_path / "two", skip=redundant_key_biases(tmp_path / "one")) <= 1e-4
    assert one["history"][0]["loss"] == pytest.approx(two["history"][0]["loss"], abs=1e-6)
    for split in ("valid", "test"):
        assert one[split]["num_users"] == two[split]["num_users"] == 300
        assert one[split]["ndcg@10"] == pytest.approx(two[split]["ndcg@10"], abs=1e-4)


def test_sharded_evaluation_equals_one_process(small_dataset, tmp_path):
    """Each rank ranks its share of the users; sums, counts and coverage bitmaps are all-reduced: the figures
    are the one-process figures (counts exactly, means to 1e-9), on every split and with exclusion on and off."""
    bundle = tmp_path / "bundle"
    assert main(["train", "--model", "sasrec", "--dataset", str(small_dataset), "--no-track", "--out", str(bundle),
                 *EQUIVALENCE]) == 0
    for split in ("test", "valid"):
        whole = json.loads(one_process("evaluate", "--bundle", str(bundle), "--split", split).stdout)
        sharded = json.loads(torchrun("evaluate", "--bundle", str(bundle), "--split", split, nproc=3).stdout)
        assert sharded.keys() == whole.keys()
        for key, value in whole.items():
            if key.startswith("coverage") or key in ("num_users", "exclude_seen"):
                assert sharded[key] == value, key
            else:
                assert sharded[key] == pytest.approx(value, abs=1e-9), key


def test_two_machine_rehearsal_trains_together(small_dataset, tmp_path):
    """Two separate `torchrun --nnodes 2` launches, one per "machine", meet through c10d rendezvous on 127.0.0.1
    and train SASRec together; the job's metrics are the one-process run's."""
    args = ["train", "--model", "sasrec", "--dataset", str(small_dataset), "--no-track", *EQUIVALENCE,
            "--out", str(tmp_path / "two-nodes")]
    endpoint = f"127.0.0.1:{free_port()}"
    nodes = [torchrun(*args, nproc=1, wait=False,
                      extra=("--nnodes", "2", "--node-rank", str(r), "--rdzv-backend", "c10d", "--rdzv-endpoint",
                             endpoint, "--rdzv-id", "rehearsal")) for r in (0, 1)]
    outputs = [node.communicate(timeout=600)[0] for node in nodes]
    assert all(node.returncode == 0 for node in nodes), "\n".join(o[-3000:] for o in outputs)
    one_process(*args[:-1], str(tmp_path / "one"))
    one, two = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("one", "two-nodes"))
    for split in ("valid", "test"):
        for key in ("hr@10", "ndcg@10", "hr@50", "mrr", "num_users"):
            assert two[split][key] == pytest.approx(one[split][key], abs=1e-6), (split, key)


def worker_of_rank(launcher: subprocess.Popen, rank: int) -> int | None:
    """The pid of the torchrun worker with RANK=rank (a child of the launcher), or None while it has none."""
    for child in Path(f"/proc/{launcher.pid}/task/{launcher.pid}/children").read_text().split():
        try:
            environ = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in environ:
            return int(child)
    return None


def test_a_rank_killed_mid_run_restarts_and_ends_as_an_uninterrupted_run(small_dataset, tmp_path):
    """SIGKILL rank 1 after the first epoch's checkpoint, under `--max-restarts 1`: torchrun restarts the job, it
    resumes from the checkpoint by itself (TORCHELASTIC_RESTART_COUNT), and ends with the uninterrupted job's weights
    and metrics. The interrupted MLflow run is marked FAILED and the resumed one points back at it."""
    settings = ["--epochs", "6", "--threads", "1", "--no-progress", "--set", "batch_size=15", "--set", "hidden_size=16",
                "--set", "max_len=20", "--set", "patience=10"]
    args = ["train", "--model", "sasrec", "--dataset", str(small_dataset), *settings]
    torchrun(*args, "--no-track", "--out", str(tmp_path / "clean"))

    restart = ("--max-restarts", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{free_port()}")
    job = torchrun(*args, "--out", str(tmp_path / "killed"), extra=restart, wait=False)
    checkpoint = tmp_path / "killed.checkpoints" / "last.pt"
    deadline = time.monotonic() + 300
    while not checkpoint.exists() and job.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    victim = worker_of_rank(job, 1)
    assert checkpoint.exists() and victim is not None, "the job ended before it could be interrupted"
    os.kill(victim, signal.SIGKILL)
    output = job.communicate(timeout=600)[0]
    assert job.returncode == 0, output[-6000:]
    assert "resumed from" in output and not checkpoint.exists()

    assert weights_differ(tmp_path / "clean", tmp_path / "killed") == 0.0
    clean, killed = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("clean", "killed"))
    assert killed["test"] == clean["test"] and killed["valid"] == clean["valid"]
    assert [h["loss"] for h in killed["history"]] == [h["loss"] for h in clean["history"]]

    from mlflow import MlflowClient

    runs = MlflowClient(os.environ["MLFLOW_TRACKING_URI"]).search_runs(
        [e.experiment_id for e in MlflowClient(os.environ["MLFLOW_TRACKING_URI"]).search_experiments()])
    by_status = {run.info.status: run for run in runs}
    assert sorted(by_status) == ["FAILED", "FINISHED"] and len(runs) == 2
    assert by_status["FINISHED"].data.tags["resumed_from"] == by_status["FAILED"].info.run_id
    assert by_status["FAILED"].data.tags["recsys.interrupted"] == "true"


def test_every_gradient_trained_model_trains_under_two_ranks(small_dataset, tmp_path):
    """One epoch of each gradient-trained model (the SLMRec distillation recipe included: SASRec table, teacher,
    student; Mamba4Rec on the sampled softmax with logQ) as a 2-rank report: DDP never meets a parameter without a
    gradient, rank 0 alone writes the report and the registry versions, and every rank finishes."""
    tiny_tiger = [f"tiger.{k}={v}" for k, v in {"codebook_size": 16, "d_model": 32, "num_heads": 2, "head_dim": 16,
                                                  "d_ff": 64, "num_encoder_layers": 1, "num_decoder_layers": 1}.items()]
    models = ["pop", "sasrec", "gru4rec", "bert4rec", "mamba4rec", "sigma", "tim4rec", "tiger", "slmrec-distill"]
    done = torchrun("report", "--dataset", str(small_dataset), "--models", *models, "--epochs", "1", "--threads", "1",
                    "--set", "max_len=10", "--set", "sasrec.hidden_size=16", "--set", "slmrec-distill.teacher_layers=4",
                    "--set", "mamba4rec.loss=sampled_softmax", "--set", "mamba4rec.negative_sampling=popularity",
                    *[a for s in tiny_tiger for a in ("--set", s)], cwd=tmp_path)
    assert done.stdout.count("# Evaluation on") == 1  # rank 0 alone prints the report
    report = next((tmp_path / "reports").glob("synthetic-*/eval.csv")).read_text()
    for row in ["pop", "sasrec", "gru4rec", "bert4rec", "mamba4rec", "sigma", "tim4rec", "tiger", "slmrec-teacher",
                "slmrec-student"]:
        assert f"\n{row}," in report, row
    from mlflow import MlflowClient

    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    assert len(client.search_model_versions("name='recsys-tiger'")) == 1  # one rank registered it, once


def test_deal_partitions_a_global_batch_and_gives_an_empty_share_a_zero_weight():
    """Rows rank, rank + world, ...: the ranks' shares partition the batch; a rank left without rows (a last batch
    smaller than the world) still gets a row to run the step on, flagged as not real so its loss weighs 0."""
    import torch

    from recsys.batching import SequenceBatch
    from recsys.trainer import deal

    items = torch.arange(1, 16).view(5, 3)
    batch = SequenceBatch(items, items * 10, items + 1, torch.arange(5))
    shares = [deal(batch, r, 3) for r in range(3)]
    assert all(real for _, real in shares)
    assert sorted(int(u) for share, _ in shares for u in share.user_idx) == [0, 1, 2, 3, 4]
    assert torch.equal(shares[1][0].items, items[[1, 4]]) and torch.equal(shares[1][0].targets, items[[1, 4]] + 1)
    small = SequenceBatch(items[:1], items[:1], items[:1], torch.arange(1))
    share, real = deal(small, 1, 2)
    assert not real and share.items.shape[0] == 1
    assert deal(batch, 0, 1) == (batch, True)

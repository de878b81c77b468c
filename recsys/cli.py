"""The ``recsys`` command line. Other tools and tests rely on these exact forms:

    recsys data build --dataset NAME [--raw-dir DIR]                       prints the processed dataset's path
    recsys train --model NAME --dataset NAME [--raw-dir DIR] [--epochs N] [--set key=value ...] [--seed S] [--out DIR]
    recsys evaluate --bundle DIR [--split test|valid]                       prints the metrics as JSON
    recsys report --dataset NAME --models A B [--epochs N] [--seeds S ...] [--resume]   what `make eval` runs
    recsys distill --dataset NAME [--raw-dir DIR] --teacher-layers M [--student-layers N] [--set key=value ...]
    recsys distill --dataset NAME [--raw-dir DIR] --teacher-bundle DIR [--student-layers N] [--set key=value ...]
    recsys mlflow-ui                                                        the MLflow dashboard on 127.0.0.1:5000
    recsys serve [--bundle DIR ... | --model-uri models:/recsys-sasrec@champion ...] [--port 8000]

train, evaluate, report and distill also run as several ranks of one job under torchrun (``torchrun
--nproc-per-node N -m recsys train ...``, the same flags; docs/scaling.md): rank 0 prints and writes, and a job
that torchrun restarts (``--max-restarts``) resumes from its last checkpoints by itself.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

from pipelines.cli import add_engine_arguments, engine_from_args
from pipelines.errors import BadInputError, EmptyDatasetError, RawDataMissingError
from recsys import distributed

USER_ERRORS = (BadInputError, EmptyDatasetError, RawDataMissingError, ValueError, FileNotFoundError)


def cmd_train(args) -> int:
    from recsys.run import parse_overrides, train_run

    result = train_run(args.model, args.dataset, raw_dir=args.raw_dir, data_root=args.data_root,
                       engine=engine_from_args(args), epochs=args.epochs,
                       overrides=parse_overrides(args.set), seed=args.seed, out_dir=args.out,
                       resume=args.resume or distributed.restart_count() > 0,
                       track=not args.no_track, progress=not args.no_progress)
    if distributed.is_main():
            print(json.dumps({"bundle": str(result.bundle_dir), "test": result.metrics["test"],
                          "model_version": result.model_version}, indent=2))
    return 0


def cmd_evaluate(args) -> int:
    from pipelines.dataset import load_dataset
    from recsys.bundle import load_bundle
    from recsys.evaluation import KS, cutoffs, evaluate, item_percentiles

    bundle = load_bundle(args.bundle)
    info = bundle.config["dataset"]
    ds = load_dataset(info["path"])
    if ds.content_hash != info["content_hash"]:
        raise ValueError(f"dataset at {info['path']} changed since this bundle was trained "
                         f"({ds.content_hash[:12]} != {info['content_hash'][:12]}); rebuild it with the same settings")
    split = ds.split(info["split"])
    eval_set = split.test if args.split == "test" else split.valid
    train_config = bundle.config["train_config"]
    ks = cutoffs(train_config.get("max_k", max(KS)))  # bundles from before max_k existed report every cutoff
    metrics = evaluate(bundle.model, eval_set, ds.num_items, bundle.config["exclude_seen"], ks=ks,
                       batch_size=train_config["eval_batch_size"], device=distributed.device_for("auto"),
                       item_percentile=item_percentiles(split.train, ds.num_items))
    if distributed.is_main():
        print(json.dumps(metrics, indent=2, sort_keys=True))
    return 0


def cmd_report(args) -> int:
    from recsys.report import run_report
    from recsys.run import parse_overrides

    out = run_report(args.dataset, args.models, raw_dir=args.raw_dir, data_root=args.data_root,
                     engine=engine_from_args(args), epochs=args.epochs,
                     overrides=parse_overrides(args.set), seed=args.seed, seeds=args.seeds, track=not args.no_track,
                     resume=args.resume or distributed.restart_count() > 0)
    if distributed.is_main():
        print((out / "eval.md").read_text())
        print(f"report written to {out}/ (eval.md, eval.csv, eval.png)", file=sys.stderr)
    return 0


def cmd_distill(args) -> int:
    from recsys.distill import distill_run
    from recsys.run import parse_overrides

    result = distill_run(args.dataset, args.teacher_layers, args.student_layers,
                         item_table_bundle=args.item_table_bundle, teacher_bundle=args.teacher_bundle,
                         raw_dir=args.raw_dir, data_root=args.data_root, engine=engine_from_args(args),
                         epochs=args.epochs, overrides=parse_overrides(args.set), seed=args.seed, out_root=args.out,
                         track=not args.no_track, progress=not args.no_progress,
                         resume=distributed.restart_count() > 0)
    if distributed.is_main():
        print(json.dumps({"teacher": str(result.teacher.bundle_dir), "student": str(result.student.bundle_dir),
                          "distillation": result.distillation}, indent=2))
    return 0


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def cmd_mlflow_ui(args) -> int:
    from recsys.tracking import tracking_uri

    uri = tracking_uri()
    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", args.host,
               "--port", str(args.port)]
    # mlflow's helper processes outlive a plain kill of the parent: run it in its own session, stop the group on
    # Ctrl-C and on SIGTERM (a service manager's stop, a test's teardown), which would otherwise orphan it
    signal.signal(signal.SIGTERM, _interrupt)
    proc = subprocess.Popen(command, start_new_session=True)
    try:
        print(f"MLflow dashboard on http://{args.host}:{args.port} (store {uri}); Ctrl-C stops it", file=sys.stderr)
        return proc.wait()
    except KeyboardInterrupt:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait()
        return 0


def add_registered_commands(sub) -> None:
    """Subcommands other packages register under the ``recsys.commands`` entry point (pyproject.toml): ``data``
    (pipelines.cli) and ``serve`` (serving.cli). Each entry is a function that adds its parser to ``sub``."""
    for entry in sorted(entry_points(group="recsys.commands"), key=lambda e: e.name):
        entry.load()(sub)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="recsys", description="Sequential recommendation platform")
    sub = parser.add_subparsers(dest="command", required=True)
    add_registered_commands(sub)

    def common(p):
        p.add_argument("--raw-dir", default=None, help="directory with the raw files (offline use)")
        p.add_argument("--data-root", default=None, help="root of data/raw and data/processed (default ./data)")
        p.add_argument("--epochs", type=int, default=None)
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a model or training setting, e.g. --set hidden_size=128 --set lr=0.002")
        p.add_argument("--seed", type=int, default=None)
        p.add_argument("--no-track", action="store_true", help="do not log to MLflow")
        threads(p)
        add_engine_arguments(p)

    def threads(p):
        p.add_argument("--threads", type=int, default=None,
                       help=f"intra-op threads per process (default ${distributed.THREADS_ENV}, else the cores divided "
                            "by the ranks on this machine)")

    train = sub.add_parser("train", help="train one model and write a bundle")
    train.add_argument("--model", required=True)
    train.add_argument("--dataset", required=True)
    train.add_argument("--out", default=None, help="bundle directory (default runs/<dataset>/<model>)")
    train.add_argument("--resume", action="store_true", help="continue from the last epoch checkpoint")
    train.add_argument("--no-progress", action="store_true")
    common(train)
    train.set_defaults(func=cmd_train)

    ev = sub.add_parser("evaluate", help="evaluate a bundle on its dataset")
    ev.add_argument("--bundle", required=True)
    ev.add_argument("--split", choices=["test", "valid"], default="test")
    threads(ev)
    ev.set_defaults(func=cmd_evaluate)

    rep = sub.add_parser("report", help="train and compare several models (make eval)")
    rep.add_argument("--dataset", default="synthetic")
    rep.add_argument("--models", nargs="+", default=["pop", "sasrec"])
    rep.add_argument("--seeds", nargs="+", type=int, default=None,
                     help="train each model once per seed; the table gives mean ± sd and paired bootstrap tests")
    rep.add_argument("--resume", action="store_true",
                     help="reuse runs that finished with the same settings and continue interrupted ones")
    common(rep)
    rep.set_defaults(func=cmd_report)

    dist = sub.add_parser("distill", help="SLMRec: train a teacher, then distil it into a student of M/4 layers")
    dist.add_argument("--dataset", required=True)
    dist.add_argument("--teacher-layers", type=int, default=None, help="required unless --teacher-bundle")
    dist.add_argument("--student-layers", type=int, default=None, help="default: teacher layers / 4")
    dist.add_argument("--item-table-bundle", default=None,
                      help="a trained bundle (SASRec) whose item table is borrowed; default: train SASRec first")
    dist.add_argument("--teacher-bundle", default=None,
                      help="reuse this trained slmrec teacher bundle instead of training one (its depth, item table "
                           "and test metrics are read from it)")
    dist.add_argument("--out", default=None, help="root of the bundles (default runs/<dataset>/slmrec-distill)")
    dist.add_argument("--no-progress", action="store_true")
    common(dist)
    dist.set_defaults(func=cmd_distill)

    ui = sub.add_parser("mlflow-ui", help="start the MLflow dashboard")
    ui.add_argument("--host", default="127.0.0.1")
    ui.add_argument("--port", type=int, default=5000)
    ui.set_defaults(func=cmd_mlflow_ui)

    return parser


# the commands that train or evaluate, and so run as ranks of one job under torchrun
DISTRIBUTED_COMMANDS = ("train", "evaluate", "report", "distill")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command in DISTRIBUTED_COMMANDS:
            distributed.init(args.threads)
        elif distributed.launched():
            raise ValueError(f"`recsys {args.command}` runs in one process; only {DISTRIBUTED_COMMANDS} run under "
                             "torchrun with several ranks")
        code = args.func(args)
        distributed.shutdown(succeeded=True)
        return code
    except USER_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        distributed.shutdown(succeeded=False)  # a no-op after the shutdown above


if __name__ == "__main__":
    sys.exit(main())

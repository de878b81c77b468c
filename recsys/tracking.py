"""MLflow tracking with an embedded default store.

Runs go to a SQLite file under ``mlruns/`` (artifacts beside it) unless ``MLFLOW_TRACKING_URI`` is set. Every
training run logs its resolved config, dataset manifest hash, seed, per-epoch loss and validation metrics, the
final metrics and the bundle, and registers a model version ``recsys-<model>``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

DEFAULT_DIR = Path("mlruns")


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(DEFAULT_DIR / 'mlflow.db').resolve()}"


_OPENED: set[str] = set()  # the SQLite stores this process has opened


def open_client():
    """An ``MlflowClient`` on ``tracking_uri()`` (also made the process's current tracking URI).

    Opening a SQLite store that does not exist yet creates its tables by running MLflow's migrations, and two
    processes doing that at once (two ``make eval`` started together on a fresh ``mlruns/``) break each other: one
    dies with alembic's "Online migration expected to match one row". So the first opening of a SQLite store is
    serialized by an exclusive lock on a file beside it; the second process then finds the tables and migrates
    nothing. A server store (``http://``, ``postgresql://``) is created by its server once. Later openings in the
    same process reuse MLflow's store object and take no lock."""
    import mlflow
    from mlflow import MlflowClient

    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    if not uri.startswith("sqlite:///") or uri in _OPENED:
        return MlflowClient()
    import fcntl

    db = Path(uri.removeprefix("sqlite:///"))
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(db.with_name(db.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        client = MlflowClient()  # builds the tracking store, which creates the tables
        client.search_registered_models(max_results=1)  # and the registry store, checked against them
    _OPENED.add(uri)
    return client


def registered_name(model_name: str) -> str:
    return f"recsys-{model_name}"


def _flatten(prefix: str, value, out: dict) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _flatten(f"{prefix}.{k}" if prefix else k, v, out)
    else:
        out[prefix] = value


def _metric_key(name: str) -> str:
    # MLflow metric names allow letters, digits, _ - . / and spaces; '@' is not among them.
    return name.replace("@", "_at_")


class Tracker:
    """One MLflow run. Import of mlflow is deferred so that code paths without tracking stay fast."""

    def __init__(self, experiment: str, run_name: str, tags: dict | None = None, run_id_file: Path | None = None):
        """``run_id_file`` (beside a training run's checkpoint) records this run's id. A run that finds there the
        id of a run that did not finish is the resumption of an interrupted one (``--resume``, or a restart under
        ``torchrun --max-restarts``): the new run is tagged ``resumed_from`` with its id, and the interrupted run
        is tagged ``recsys.interrupted`` and marked FAILED if it still reads RUNNING (a process killed outright
        cannot end its run; one stopped by torchrun's SIGTERM ends it FAILED itself)."""
        import mlflow

        self.mlflow = mlflow
        self.client = open_client()
        location = None
        if "MLFLOW_TRACKING_URI" not in os.environ:
            location = (DEFAULT_DIR / "artifacts" / experiment).resolve().as_uri()
        experiment_id = self._get_or_create(
            lambda: getattr(self.client.get_experiment_by_name(experiment), "experiment_id", None),
            lambda: self.client.create_experiment(experiment, artifact_location=location))
        self.experiment_id = experiment_id
        tags = dict(tags or {})
        interrupted = self._interrupted_run(run_id_file)
        if interrupted:
            self.client.set_tag(interrupted, "recsys.interrupted", "true")
            if self.client.get_run(interrupted).info.status == "RUNNING":
                self.client.set_terminated(interrupted, status="FAILED")
            tags["resumed_from"] = interrupted
        # a run started while another is active (e.g. a distillation's parent run) is nested under it
        self.run = mlflow.start_run(experiment_id=experiment_id, run_name=run_name, tags=tags,
                                    nested=mlflow.active_run() is not None)
        self.run_id = self.run.info.run_id
        if run_id_file is not None:
            from kernels.atomic import atomic_write_bytes

            atomic_write_bytes(Path(run_id_file), self.run_id.encode())

    @staticmethod
    def _get_or_create(get, create):
        """``get()``, else ``create()``. Two runs that start at once (two reports on one dataset) can both find
        nothing and both create; the store refuses the second with RESOURCE_ALREADY_EXISTS (its unique
        constraint), and the loser then takes what the winner created instead of failing its run."""
        from mlflow.exceptions import MlflowException

        found = get()
        if found is not None:
            return found
        try:
            return create()
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS" or (found := get()) is None:
                raise
            return found

    def _interrupted_run(self, run_id_file: Path | None) -> str | None:
        from mlflow.exceptions import MlflowException

        if run_id_file is None or not Path(run_id_file).is_file():
            return None
        run_id = Path(run_id_file).read_text().strip()
        try:
            return run_id if self.client.get_run(run_id).info.status != "FINISHED" else None
        except MlflowException:  # a run of another store, or deleted
            return None

    def log_params(self, params: dict) -> None:
        flat: dict = {}
        _flatten("", params, flat)
        self.mlflow.log_params({k: str(v)[:500] for k, v in flat.items()})

    def log_metrics(self, metrics: dict, step: int | None = None, prefix: str = "") -> None:
        numeric = {_metric_key(prefix + k): float(v) for k, v in metrics.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)}
        self.mlflow.log_metrics(numeric, step=step)

    def log_bundle(self, bundle_dir: Path, model_name: str) -> str:
        """Log the bundle directory and register it as a new version of ``recsys-<model>``; returns the version."""
        self.mlflow.log_artifacts(str(bundle_dir), "bundle")
        name = registered_name(model_name)
        self._get_or_create(lambda: name if self._registered(name) else None,
                            lambda: self.client.create_registered_model(name).name)
        version = self.client.create_model_version(
            name, source=f"{self.run.info.artifact_uri}/bundle", run_id=self.run_id
        )
        return version.version

    def _registered(self, name: str) -> bool:
        from mlflow.exceptions import MlflowException

        try:
            self.client.get_registered_model(name)
            return True
        except MlflowException:
            return False

    def end(self, status: str = "FINISHED") -> None:
        self.mlflow.end_run(status=status)


def log_report(experiment: str, files: list[Path], description: str) -> str:
    """A run named ``report`` in the dataset's experiment holding the comparison report's files as artifacts; the
    experiment's description (what the MLflow UI shows above its runs) becomes ``description`` with a pointer to
    it. Returns the run id."""
    tracker = Tracker(experiment, run_name="report", tags={"recsys.kind": "report"})
    for path in files:
        tracker.mlflow.log_artifact(str(path))
    note = f"{description}\n\nThe latest comparison: run `report` ({tracker.run_id}), artifact `report.html`."
    tracker.client.set_experiment_tag(tracker.experiment_id, "mlflow.note.content", note)
    tracker.end()
    return tracker.run_id


def set_champion(model_name: str, version: str, candidates: list[str], attempts: int = 3) -> None:
    """Point the ``champion`` alias at ``recsys-<model>`` version ``version`` and remove it from the others,
    so exactly one registered model carries it (of ``candidates``; two reports of different model lists each move
    it among their own)."""
    from mlflow.exceptions import MlflowException

    client = open_client()
    for other in candidates:
        if other != model_name:
            try:
                client.delete_registered_model_alias(registered_name(other), "champion")
            except MlflowException:
                pass
    for attempt in range(attempts):
        try:
            client.set_registered_model_alias(registered_name(model_name), "champion", version)
            return
        except MlflowException as exc:
            # Two reports finishing together both find no `champion` row and both insert one: the store refuses
            # the second (a unique-constraint error, BAD_REQUEST) and the report died before writing eval.md.
            # Setting it again updates the row the other report wrote: the later report's choice stands.
            if exc.error_code != "BAD_REQUEST" or attempt == attempts - 1:
                raise


class RunLog:
    """Everything a training run reports, as one callback object the run path calls at fixed points: ``start``
    (params and what ``prepare`` found), ``epoch`` (the trainer's per-epoch record: a line on stderr, the metrics
    to MLflow), ``finish`` (final figures and the bundle, registered as a model version) and ``end``. Without a
    tracker (``--no-track``, or a rank other than 0) it only prints, and only on rank 0."""

    def __init__(self, tracker: Tracker | None, main: bool = True):
        self.tracker = tracker
        self.main = main

    @property
    def run_id(self) -> str | None:
        return self.tracker.run_id if self.tracker else None

    def start(self, params: dict, prepared: dict[str, dict]) -> None:
        if self.tracker:
            self.tracker.log_params(params)
            for section, figures in prepared.items():
                self.tracker.log_metrics(figures, prefix=f"{section}_")

    def epoch(self, record: dict) -> None:
        if not self.main:
            return
        valid = record["valid"]
        summary = f"epoch {record['epoch']}: valid ndcg@10 {valid['ndcg@10']:.4f} hr@10 {valid['hr@10']:.4f}"
        if record["loss"] is not None:
            summary += f" loss {record['loss']:.4f} ({record['seconds']:.1f}s)"
        print(summary, file=sys.stderr)
        if self.tracker:
            metrics = {f"valid_{k}": v for k, v in valid.items()}
            if record["loss"] is not None:
                metrics.update(loss=record["loss"], epoch_seconds=record["seconds"])
            self.tracker.log_metrics(metrics, step=record["epoch"])

    def finish(self, bundle_dir: Path, model_name: str, metrics: dict, extra: dict[str, dict]) -> str | None:
        """Final test metrics, run figures and the extra sections; the bundle as a new registry version."""
        if not self.tracker:
            return None
        self.tracker.log_metrics(metrics["test"], prefix="test_")
        self.tracker.log_metrics({k: metrics[k] for k in ("train_seconds", "epochs", "best_epoch", "parameters")})
        for section, figures in extra.items():
            self.tracker.log_metrics(figures, prefix=f"{section}_")
        return self.tracker.log_bundle(bundle_dir, model_name)

    def end(self, status: str) -> None:
        if self.tracker:
            self.tracker.end(status)

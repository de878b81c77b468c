"""Two ``recsys report`` runs logging into one MLflow store at once, as two people running ``make eval`` on the same
dataset do (each in their own working directory): ten pairs on a SQLite file (each pair on a new store, so both also
race to create it), and ten pairs through an ``mlflow server --backend-store-uri postgresql://...`` on a real
PostgreSQL, reached with ``MLFLOW_TRACKING_URI=http://...`` (marker ``tracking``: ``make test-tracking``, which
installs Debian's postgresql and the ``[postgres]`` extra). Nothing of MLflow or PostgreSQL is mocked.

A run is lost when it is absent, not FINISHED, or lacks a metric, parameter or artifact that the same report run
alone logs. Each pair is also checked for distinct registry versions, each bound to its own run; for the
``champion`` alias on a version one of the two registered; and for a consistent store (read with SQL: nothing
orphaned, nothing left RUNNING, version numbers 1..n without duplicates).

The first test, cheap and in the default suite, has two processes create a new store, an experiment, a registered
model and the ``champion`` alias at the same moment: the races behind the lost runs these reports can meet, each of
which failed a run before recsys.tracking handled it (``open_client``, ``Tracker._get_or_create``,
``set_champion``)."""

from __future__ import annotations

import json
import os
import pwd
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import pytest

from recsys.tracking import registered_name
from tests.helpers import free_port, serve_mlflow

MODELS = ("pop", "sasrec")
REPORT = ["--models", *MODELS, "--epochs", "1", "--set", "sasrec.hidden_size=16", "--threads", "1"]
PEOPLE = (("ana", 1), ("bo", 2))  # working directory and seed of each of the two reports
REPETITIONS = 10
CHAMPION = re.compile(r"Champion \(registry alias `champion`\): \*\*(.+?)\*\*")

# Runs ``rounds`` times, in step with the other process through ``barrier``: a run in experiment race-<i> that
# registers a version of recsys-race-<i> and points the champion alias at it (both processes create the store, the
# experiment, the registered model and the alias at the same moment).
RACE = r"""
import sys, time
from pathlib import Path
from recsys.tracking import Tracker, set_champion

me, rounds, barrier, bundle = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4])


def together(step):
    (barrier / f"{step}.{me}").touch()
    deadline = time.time() + 60
    while len(list(barrier.glob(f"{step}.*"))) < 2:
        if time.time() > deadline:
            sys.exit(f"{step}: the other process never came (it failed)")
        time.sleep(0.0005)


for i in range(rounds):
    together(f"run-{i}")
    tracker = Tracker(f"race-{i}", run_name=f"run-{me}")
    version = tracker.log_bundle(bundle, f"race-{i}")
    tracker.end()
    together(f"champion-{i}")
    set_champion(f"race-{i}", version, [f"race-{i}"])
"""


def test_runs_started_at_the_same_moment_on_a_new_store_all_finish(tmp_path):
    from mlflow import MlflowClient

    rounds, barrier, bundle = 6, tmp_path / "barrier", tmp_path / "bundle"
    barrier.mkdir()
    bundle.mkdir()
    (bundle / "config.json").write_text("{}")
    procs = [subprocess.Popen([sys.executable, "-c", RACE, me, str(rounds), str(barrier), str(bundle)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for me in ("a", "b")]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    for proc, output in zip(procs, outputs):
        assert proc.returncode == 0, output[-4000:]
    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    for i in range(rounds):
        experiment = client.get_experiment_by_name(f"race-{i}")
        runs = client.search_runs([experiment.experiment_id])
        assert sorted(r.info.run_name for r in runs) == ["run-a", "run-b"]
        assert {r.info.status for r in runs} == {"FINISHED"}
        versions = client.search_model_versions(f"name = 'recsys-race-{i}'")
        assert sorted(int(v.version) for v in versions) == [1, 2]
        assert {v.run_id for v in versions} == {r.info.run_id for r in runs}
        assert str(client.get_model_version_by_alias(f"recsys-race-{i}", "champion").version) in {"1", "2"}


# ---- two reports at once -------------------------------------------------------------------------------------------


def start_report(dataset: Path, work: Path, seed: int, uri: str) -> subprocess.Popen:
    """``recsys report`` in its own working directory (its runs/ and reports/), logging to ``uri``."""
    work.mkdir(parents=True)
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "OMP_NUM_THREADS": "1"}
    with open(work / "output.txt", "w") as output:
        return subprocess.Popen([sys.executable, "-m", "recsys", "report", "--dataset", str(dataset), *REPORT,
                                 "--seed", str(seed)], cwd=work, env=env, stdout=output, stderr=subprocess.STDOUT)


def finish(proc: subprocess.Popen, work: Path) -> str | None:
    """None when the report exited 0, else what went wrong (the end of its output)."""
    code = proc.wait(timeout=600)
    return None if code == 0 else f"{work.name} exited {code}:\n{(work / 'output.txt').read_text()[-3000:]}"


def run_kind(run) -> str:
    """``report`` for a report's own run, else the model a training run trained."""
    return run.data.tags.get("recsys.kind") or run.data.tags.get("model", "?")


def artifact_paths(client, run_id: str, path: str | None = None) -> set[str]:
    found = set()
    for entry in client.list_artifacts(run_id, path):
        found |= artifact_paths(client, run_id, entry.path) if entry.is_dir else {entry.path}
    return found


def logged(client, run) -> dict[str, set[str]]:
    return {"metrics": set(run.data.metrics), "params": set(run.data.params),
            "artifacts": artifact_paths(client, run.info.run_id)}


@pytest.fixture(scope="module")
def datasets(tmp_path_factory) -> list[Path]:
    """A small synthetic dataset per repetition (seed r: a new experiment for each pair), and one for the report
    that runs alone."""
    from pipelines.build import build_dataset

    root = tmp_path_factory.mktemp("data")
    return [build_dataset("synthetic", data_root=root, seed=r, num_users=200, num_items=80, num_clusters=8)
            for r in range(REPETITIONS + 1)]


@pytest.fixture(scope="module")
def solo(datasets, tmp_path_factory) -> dict[str, tuple[int, dict[str, set[str]]]]:
    """What one report logs when it runs alone: for each kind of run (a model's training run, the report's own
    run), how many there are and the metric, parameter and artifact names each holds."""
    from mlflow import MlflowClient

    work = tmp_path_factory.mktemp("solo")
    uri = f"sqlite:///{work / 'mlflow.db'}"
    failure = finish(start_report(datasets[-1], work / "alone", 1, uri), work / "alone")
    assert failure is None, failure
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(datasets[-1].name)
    shape: dict[str, tuple[int, dict]] = {}
    for run in client.search_runs([experiment.experiment_id]):
        count, _ = shape.get(run_kind(run), (0, None))
        shape[run_kind(run)] = (count + 1, logged(client, run))
    assert set(shape) == {*MODELS, "report"} and all(n == 1 for n, _ in shape.values())
    assert {"report.html", "eval.csv"} <= shape["report"][1]["artifacts"]
    assert "test_ndcg_at_10" in shape["sasrec"][1]["metrics"]
    assert "bundle/config.json" in shape["sasrec"][1]["artifacts"]
    return shape


# SQL over MLflow's tables (the same on SQLite and PostgreSQL): rows that a consistent store never has
INCONSISTENT = {
    "runs whose experiment is missing":
        "SELECT count(*) FROM runs r LEFT JOIN experiments e ON r.experiment_id = e.experiment_id "
        "WHERE e.experiment_id IS NULL",
    "runs not FINISHED": "SELECT count(*) FROM runs WHERE status <> 'FINISHED'",
    "metrics whose run is missing":
        "SELECT count(*) FROM metrics m LEFT JOIN runs r ON m.run_uuid = r.run_uuid WHERE r.run_uuid IS NULL",
    "params whose run is missing":
        "SELECT count(*) FROM params p LEFT JOIN runs r ON p.run_uuid = r.run_uuid WHERE r.run_uuid IS NULL",
    "tags whose run is missing":
        "SELECT count(*) FROM tags t LEFT JOIN runs r ON t.run_uuid = r.run_uuid WHERE r.run_uuid IS NULL",
    "model versions whose run is missing":
        "SELECT count(*) FROM model_versions v LEFT JOIN runs r ON v.run_id = r.run_uuid WHERE r.run_uuid IS NULL",
    "model versions whose registered model is missing":
        "SELECT count(*) FROM model_versions v LEFT JOIN registered_models m ON v.name = m.name WHERE m.name IS NULL",
    "model versions not READY": "SELECT count(*) FROM model_versions WHERE status <> 'READY'",
    "aliases on a missing version":
        "SELECT count(*) FROM registered_model_aliases a LEFT JOIN model_versions v "
        "ON a.name = v.name AND a.version = v.version WHERE v.name IS NULL",
}


def store_problems(db_uri: str, registrations: int) -> list[str]:
    """What is inconsistent in the store at ``db_uri``, where each model of MODELS should have ``registrations``
    versions numbered 1..n."""
    import sqlalchemy

    engine = sqlalchemy.create_engine(db_uri)
    try:
        with engine.connect() as db:
            problems = [f"{n} {what}" for what, sql in INCONSISTENT.items()
                        if (n := db.execute(sqlalchemy.text(sql)).scalar())]
            versions = {name: (count, distinct, top) for name, count, distinct, top in db.execute(sqlalchemy.text(
                "SELECT name, count(*), count(DISTINCT version), max(version) FROM model_versions GROUP BY name"))}
    finally:
        engine.dispose()
    for model in MODELS:
        found = versions.get(registered_name(model), (0, 0, 0))
        if found != (registrations,) * 3:
            problems.append(f"{registered_name(model)}: (versions, distinct, highest) {found}, "
                            f"expected {registrations} numbered 1..{registrations}")
    return problems


def check_pair(client, uri: str, dataset: Path, works: list[Path], solo) -> tuple[int, int, list[str]]:
    """(runs expected, runs lost, problems) after the two reports of ``works`` ran on ``dataset``."""
    import mlflow
    from mlflow.exceptions import MlflowException

    problems: list[str] = []
    expected = {kind: len(works) * n for kind, (n, _) in solo.items()}
    complete: Counter = Counter()
    complete_ids: set[str] = set()
    report_runs = []
    experiment = client.get_experiment_by_name(dataset.name)
    for run in client.search_runs([experiment.experiment_id]) if experiment else []:
        kind = run_kind(run)
        if kind not in solo:
            problems.append(f"a run no report makes: {run.info.run_id} ({kind})")
            continue
        got = logged(client, run)
        missing = {what: sorted(names - got[what]) for what, names in solo[kind][1].items() if names - got[what]}
        if run.info.status != "FINISHED" or missing:
            problems.append(f"{kind} run {run.info.run_id}: {run.info.status}, missing {missing}")
            continue
        complete[kind] += 1
        complete_ids.add(run.info.run_id)
        if kind == "report":
            report_runs.append(run.info.run_id)
    lost = sum(max(n - complete[kind], 0) for kind, n in expected.items())
    extra = sum(max(n - expected[kind], 0) for kind, n in complete.items())
    if extra:
        problems.append(f"{extra} more complete runs than two reports make")

    # each training run registered its own version; the two reports' versions of a model differ
    registered: dict[str, list[dict]] = {model: [] for model in MODELS}
    for work in works:
        for model in MODELS:
            record = work / "runs" / dataset.name / model / "registry.json"
            if not record.is_file():
                problems.append(f"{work.name}: no registry record for {model}")
                continue
            registered[model].append(json.loads(record.read_text()))
    for model, records in registered.items():
        if len({str(r["version"]) for r in records}) != len(records):
            problems.append(f"{model}: the two reports got the same version {records}")
        for record in records:
            version = client.get_model_version(registered_name(model), record["version"])
            state = "complete" if record["run_id"] in complete_ids else "lost"
            if version.run_id != record["run_id"] or state == "lost":
                problems.append(f"{model} version {record['version']} is bound to run {version.run_id}; its report "
                                f"logged run {record['run_id']} ({state})")

    # the report runs hold what each report wrote, one each
    written = sorted((w / "reports" / dataset.name / "eval.csv").read_text() for w in works
                     if (w / "reports" / dataset.name / "eval.csv").is_file())
    fetched = sorted(Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="eval.csv",
                                                              tracking_uri=uri, dst_path=str(works[0].parent / run_id))
                          ).read_text() for run_id in report_runs)
    if written != fetched:
        problems.append("the report runs' eval.csv are not the two the reports wrote")

    # the champion: on a version of the model the reports chose, registered by one of them
    chosen = {m.group(1) for w in works if (p := w / "reports" / dataset.name / "eval.md").is_file()
              and (m := CHAMPION.search(p.read_text()))}
    holders = {}
    for model in MODELS:
        try:
            holders[model] = str(client.get_model_version_by_alias(registered_name(model), "champion").version)
        except MlflowException:
            pass
    if not holders or not set(holders) <= chosen or (len(chosen) == 1 and len(holders) != 1):
        problems.append(f"champion on {holders}, the reports chose {chosen}")
    for model, version in holders.items():
        if version not in {str(r["version"]) for r in registered[model]}:
            problems.append(f"champion on {model} version {version}, which neither report registered")
    return sum(expected.values()), lost, problems


def concurrent_reports(store: str, datasets: list[Path], root: Path, solo, uri_for, db_uri_for,
                       fresh_store: bool) -> None:
    """REPETITIONS pairs of reports started together, each pair checked; asserts 0 lost runs and prints the tally.
    ``uri_for(r)``/``db_uri_for(r)``: the tracking URI the reports use and the store's database in repetition r."""
    from mlflow import MlflowClient

    expected = lost = 0
    problems: list[str] = []
    seconds = []
    for r in range(REPETITIONS):
        works = [root / f"pair-{r}" / who for who, _ in PEOPLE]
        started = time.perf_counter()
        procs = [start_report(datasets[r], work, seed, uri_for(r)) for work, (_, seed) in zip(works, PEOPLE)]
        failures = [f for f in (finish(p, w) for p, w in zip(procs, works)) if f]
        seconds.append(time.perf_counter() - started)
        n, n_lost, found = check_pair(MlflowClient(uri_for(r)), uri_for(r), datasets[r], works, solo)
        registrations = 2 if fresh_store else 2 * (r + 1)
        found += [f"store: {p}" for p in store_problems(db_uri_for(r), registrations)]
        expected, lost = expected + n, lost + n_lost
        problems += [f"pair {r}: {p}" for p in failures + found]
    print(f"{store}: {REPETITIONS} pairs of concurrent reports, {expected} runs expected, {lost} lost; "
          f"{len(problems)} problems; seconds per pair {min(seconds):.1f}-{max(seconds):.1f} "
          f"(total {sum(seconds):.0f})")
    assert lost == 0 and not problems, "\n".join(problems)


@pytest.fixture
def quiet_downloads(monkeypatch):
    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


@pytest.mark.tracking
def test_two_concurrent_reports_on_sqlite_lose_no_run(datasets, solo, tmp_path, quiet_downloads):
    def uri(r: int) -> str:
        return f"sqlite:///{tmp_path / f'store-{r}' / 'mlflow.db'}"  # a new store each pair: both create it

    concurrent_reports("sqlite", datasets, tmp_path, solo, uri, uri, fresh_store=True)


# ---- a real PostgreSQL and an mlflow server on it -------------------------------------------------------------------


def postgres_bin() -> Path | None:
    """The directory of PostgreSQL's initdb and pg_ctl: on PATH, else Debian's /usr/lib/postgresql/<version>/bin."""
    found = shutil.which("initdb")
    dirs = [Path(found).resolve().parent] if found else []
    dirs += sorted((p.parent for p in Path("/usr/lib/postgresql").glob("*/bin/initdb")),
                   key=lambda d: int(d.parent.name) if d.parent.name.isdigit() else 0, reverse=True)
    return next((d for d in dirs if (d / "initdb").is_file() and (d / "pg_ctl").is_file()), None)


def as_postgres(command: list[str]) -> list[str]:
    """``command`` as the postgres user when we are root (PostgreSQL refuses to run as root, and CI runs as root)."""
    if os.geteuid() != 0:
        return command
    if shutil.which("runuser"):
        return ["runuser", "-u", "postgres", "--", *command]
    return ["su", "postgres", "-s", "/bin/sh", "-c", shlex.join(command)]


@pytest.fixture
def postgres():
    """A PostgreSQL server of its own on a free port of 127.0.0.1 with a role and database ``mlflow``; yields the
    connection URI; stopped and its files removed afterwards, also when the test fails."""
    bin_dir = postgres_bin()
    if bin_dir is None:
        pytest.skip("PostgreSQL is not installed (no initdb/pg_ctl on PATH or in /usr/lib/postgresql/*/bin); "
                    "`make test-tracking` installs Debian's postgresql")
    try:
        import psycopg
    except ImportError:
        pytest.fail("the PostgreSQL driver is missing: install the [postgres] extra (`make test-tracking` does)")
    home = Path(tempfile.mkdtemp(prefix="recsys-pg-"))  # outside pytest's tmp dirs, which only their owner may enter
    if os.geteuid() == 0:
        user = pwd.getpwnam("postgres")
        os.chown(home, user.pw_uid, user.pw_gid)
    data, log, port = home / "data", home / "server.log", free_port()

    def pg(tool: str, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(as_postgres([str(bin_dir / tool), *args]), cwd=home, capture_output=True, text=True,
                              timeout=180)

    started = False
    try:
        done = pg("initdb", "-D", str(data), "-U", "postgres", "--auth=trust", "--no-locale", "-E", "UTF8")
        assert done.returncode == 0, done.stdout + done.stderr
        started = True  # from here on a server may be running: stop it whatever happens
        done = pg("pg_ctl", "-D", str(data), "-l", str(log), "-w", "-t", "120",
                  "-o", f"-p {port} -k {home} -c listen_addresses=127.0.0.1", "start")
        assert done.returncode == 0, done.stdout + done.stderr + (log.read_text() if log.exists() else "")
        # autocommit: CREATE DATABASE runs outside a transaction
        with psycopg.connect(host="127.0.0.1", port=port, user="postgres", dbname="postgres",
                             autocommit=True) as connection:
            connection.execute("CREATE ROLE mlflow LOGIN PASSWORD 'mlflow'")
            connection.execute("CREATE DATABASE mlflow OWNER mlflow")
        yield f"postgresql://mlflow:mlflow@127.0.0.1:{port}/mlflow"
    finally:
        if started:
            pg("pg_ctl", "-D", str(data), "-m", "fast", "-w", "stop")
        shutil.rmtree(home, ignore_errors=True)


@pytest.fixture
def mlflow_server(postgres, tmp_path):
    """``mlflow server`` on that database, serving artifacts from a directory of its own, two workers; yields its
    http:// address, stopped afterwards (before the database, which it needs)."""
    # 180 s: the first start creates MLflow's tables in PostgreSQL
    with serve_mlflow("--backend-store-uri", postgres, "--serve-artifacts", "--artifacts-destination",
                      str(tmp_path / "artifacts"), "--workers", "2", timeout=180,
                      log=tmp_path / "mlflow-server.log") as base:
        yield base


@pytest.mark.tracking
def test_two_concurrent_reports_on_a_postgresql_mlflow_server_lose_no_run(datasets, solo, postgres, mlflow_server,
                                                                          tmp_path, quiet_downloads, monkeypatch):
    concurrent_reports("postgresql", datasets, tmp_path, solo, lambda r: mlflow_server, lambda r: postgres,
                       fresh_store=False)

    # the service pointed at the same server serves the champion, its bundle fetched through the artifact proxy
    from fastapi.testclient import TestClient

    from serving.app import create_app
    from serving.settings import ServiceSettings

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    with TestClient(create_app(ServiceSettings(cache_dir=str(tmp_path / "cache")))) as service:
        [served] = service.get("/v1/models").json()["models"]
        assert served["source"] == f"models:/{registered_name(served['name'])}@champion"
        assert len(service.post("/v1/recommend", json={"history": ["1", "2"], "k": 5}).json()["items"]) == 5

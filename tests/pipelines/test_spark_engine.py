"""The Spark engine builds the same dataset as the in-process engine (``make test-spark``; needs PySpark and Java 17).

Identity means: the same content hash, id maps (users.parquet, items.parquet), interactions, cleaning statistics,
temporal cutoffs, skipped-line counts and splits. Every reader format is checked on its fixture, malformed lines
give the same error or the same skips, a messy 200k-event log in part files (duplicates, repeats, ties) builds
alike, and the real ML-100K and Amazon Beauty files when ../shared is present. One test builds against a Spark
standalone master and worker started on 127.0.0.1; one kills builds with SIGKILL.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.build import Engine, GenericInput, build_dataset
from pipelines.dataset import load_dataset
from pipelines.errors import BadInputError, EmptyDatasetError
from pipelines.jagged import content_hash
from tests.conftest import REPO_ROOT, shared_dataset
from tests.helpers import free_port
from tests.pipelines.test_pipelines_readers import FIXTURES, MALFORMED, copy_fixture, insert_line

pytestmark = pytest.mark.spark

if shutil.which("java") is None:
    pytest.skip("Java not found: the Spark engine needs Java 17 (Debian: apt install openjdk-17-jre-headless)",
                allow_module_level=True)
pytest.importorskip("pyspark", reason="PySpark is not installed: `make test-spark` installs the [spark] extra")

SPARK = Engine("spark")
CATALOGUE_FIXTURES = {  # catalogue recipe → fixture folder in its raw format
    "ml-100k": "ml-100k",
    "ml-1m": "ml-1m",
    "ml-20m": "ml-20m",
    "amazon-beauty": "amazon-json",
}


@pytest.fixture(scope="module", autouse=True)
def spark():
    """One local[2] session for the module; builds find and reuse it (pipelines.spark_engine.spark_session)."""
    from pipelines.spark_engine import spark_session

    session, _ = spark_session("local[2]", {"spark.driver.memory": "1g"})
    yield session
    session.stop()


def build_both(tmp_path: Path, name: str, raw_dir: Path | None = None, **kwargs) -> tuple[Path, Path]:
    a = build_dataset(name, raw_dir, data_root=tmp_path / "inprocess", **kwargs)
    b = build_dataset(name, raw_dir, data_root=tmp_path / "spark", engine=SPARK, **kwargs)
    return a, b


def assert_same_dataset(a: Path, b: Path) -> None:
    ma, mb = (json.loads((p / "manifest.json").read_text()) for p in (a, b))
    assert (ma["engine"], mb["engine"]) == ("inprocess", "spark")
    for key in ("content_hash", "counts", "cleaning_stats", "temporal_cutoffs", "skipped_lines", "source_files",
                "settings", "input_hash", "timestamps_are_positions", "warnings"):
        assert ma[key] == mb[key], key
    for name in ("interactions", "users", "items"):
        pd.testing.assert_frame_equal(pd.read_parquet(a / f"{name}.parquet"), pd.read_parquet(b / f"{name}.parquet"))
    da, db = load_dataset(a, mmap_cache=False), load_dataset(b, mmap_cache=False)
    assert content_hash(db.sequences, db.num_items) == mb["content_hash"]  # the streamed hash is the real one
    for kind in ("loo", "temporal"):
        sa, sb = da.split(kind), db.split(kind)
        np.testing.assert_array_equal(sa.train_users, sb.train_users)
        for x, y in ((sa.train, sb.train), (sa.valid.history, sb.valid.history), (sa.test.history, sb.test.history)):
            for field in ("offsets", "items", "times"):
                np.testing.assert_array_equal(getattr(x, field), getattr(y, field))
        for field in ("user_idx", "target", "target_time"):
            np.testing.assert_array_equal(getattr(sa.valid, field), getattr(sb.valid, field))
            np.testing.assert_array_equal(getattr(sa.test, field), getattr(sb.test, field))


# ---------------------------------------------------------------------------------------------------------------
# Every reader format, on its fixture


@pytest.mark.parametrize("recipe", list(CATALOGUE_FIXTURES))
def test_catalogue_formats_build_identically(tmp_path, recipe):
    assert_same_dataset(*build_both(tmp_path, recipe, FIXTURES / CATALOGUE_FIXTURES[recipe]))


def test_synthetic_recipe_builds_identically(tmp_path):
    """make eval's default dataset: generated in memory, handed to Spark as a Parquet file, with its item text."""
    assert_same_dataset(*build_both(tmp_path, "synthetic", num_users=300, num_items=120, num_clusters=6,
                                    repeat_prob=0.1))


@pytest.mark.parametrize("folder", ["amazon-tsv", "p5"])
def test_shared_amazon_forms_build_identically(tmp_path, folder):
    assert_same_dataset(*build_both(tmp_path, "amazon-beauty", FIXTURES / folder))


def test_gzipped_crlf_sources_build_identically(tmp_path):
    raw = copy_fixture("ml-1m", tmp_path / "raw", gz=True)
    assert_same_dataset(*build_both(tmp_path, "ml-1m", raw))


def test_generic_csv_parquet_and_p5_inputs_build_identically(tmp_path):
    csv = GenericInput(FIXTURES / "generic" / "log.csv", rating_col="rating")
    assert_same_dataset(*build_both(tmp_path / "csv", "mine", generic=csv))
    frame = pd.read_csv(FIXTURES / "generic" / "log.csv", dtype=str)
    frame["timestamp"] = frame["timestamp"].astype("int64")
    frame.to_parquet(tmp_path / "log.parquet", index=False)
    parquet = GenericInput(tmp_path / "log.parquet")
    assert_same_dataset(*build_both(tmp_path / "parquet", "mine", generic=parquet))
    p5 = GenericInput(FIXTURES / "p5" / "sequential_data.txt", file_format="p5")
    assert_same_dataset(*build_both(tmp_path / "p5", "mine", generic=p5))


def test_generic_date_strings_build_identically(tmp_path):
    path = tmp_path / "dates.csv"
    rows = ["user,item,when"] + [f"u{u},i{(u * 7 + k) % 9},2024-0{1 + k % 9}-1{u % 10}T0{k % 10}:00:00+02:00"
                                 for u in range(12) for k in range(8)]
    path.write_text("\n".join(rows) + "\n")
    generic = GenericInput(path, user_col="user", item_col="item", time_col="when")
    assert_same_dataset(*build_both(tmp_path, "dates", generic=generic, min_item_interactions=2))


@pytest.mark.parametrize("settings", [
    {"rating_threshold": 4.0},
    {"dedupe": False, "min_user_interactions": 1, "min_item_interactions": 1},
    {"min_user_interactions": 5, "min_item_interactions": 5, "split": "temporal"},
], ids=["rating-threshold", "no-dedupe-no-kcore", "kcore-temporal"])
def test_cleaning_settings_build_identically(tmp_path, settings):
    assert_same_dataset(*build_both(tmp_path, "ml-100k", FIXTURES / "ml-100k", **settings))


def test_a_log_emptied_by_filtering_is_the_same_clear_error(tmp_path):
    messages = []
    for engine in (None, SPARK):
        with pytest.raises(EmptyDatasetError) as info:
            build_dataset("ml-100k", FIXTURES / "ml-100k", data_root=tmp_path / str(engine), engine=engine,
                          min_user_interactions=50)
        messages.append(str(info.value))
    assert messages[0] == messages[1] and "k-core" in messages[0]


# ---------------------------------------------------------------------------------------------------------------
# Malformed lines: the same error, or the same skips


def _build_malformed(tmp_path, fixture, raw_dir, engine, policy):
    """The fixture's catalogue recipe (the Amazon forms are amazon-beauty's), or the generic reader."""
    if fixture == "generic":
        return build_dataset("mine", data_root=tmp_path / str(engine), engine=engine, on_bad_lines=policy,
                             generic=GenericInput(raw_dir / "log.csv", rating_col="rating"))
    recipe = {v: k for k, v in CATALOGUE_FIXTURES.items()}.get(fixture, "amazon-beauty")
    return build_dataset(recipe, raw_dir, data_root=tmp_path / str(engine), engine=engine, on_bad_lines=policy)


@pytest.mark.parametrize(("fixture", "filename", "line_no", "raw"), MALFORMED)
def test_malformed_line_gives_the_same_error(tmp_path, fixture, filename, line_no, raw):
    raw_dir = copy_fixture(fixture, tmp_path / "raw")
    insert_line(raw_dir / filename, line_no, raw)
    errors = []
    for engine in (None, SPARK):
        with pytest.raises(BadInputError) as info:
            _build_malformed(tmp_path, fixture, raw_dir, engine, "error")
        errors.append(info.value)
    assert str(errors[1]) == str(errors[0])
    assert errors[1].line == line_no and Path(errors[1].path).name == filename


@pytest.mark.parametrize(("fixture", "filename", "line_no", "raw"), MALFORMED[::3])
def test_malformed_line_is_skipped_alike(tmp_path, fixture, filename, line_no, raw):
    raw_dir = copy_fixture(fixture, tmp_path / "raw")
    insert_line(raw_dir / filename, line_no, raw)
    a = _build_malformed(tmp_path, fixture, raw_dir, None, "skip")
    b = _build_malformed(tmp_path, fixture, raw_dir, SPARK, "skip")
    assert_same_dataset(a, b)
    assert json.loads((b / "manifest.json").read_text())["skipped_lines"] == {filename: 1}


# ---------------------------------------------------------------------------------------------------------------
# A messy log in part files


def messy_log(n: int = 200_000, seed: int = 0) -> pd.DataFrame:
    """Zipf-skewed users and items, coarse timestamps (many ties inside a user), repeats, 5% exact duplicates."""
    rng = np.random.default_rng(seed)
    users = rng.zipf(1.3, n) % 6000
    items = rng.zipf(1.2, n) % 4000
    frame = pd.DataFrame({"user_id": [f"u{u}" for u in users], "item_id": [f"i{i}" for i in items],
                          "timestamp": 1_600_000_000 + rng.integers(0, 2_000, n) * 3_600,
                          "rating": rng.integers(1, 6, n).astype(float)})
    copies = frame.sample(frac=0.05, random_state=seed)
    frame = pd.concat([frame, copies]).sample(frac=1.0, random_state=seed + 1).reset_index(drop=True)
    return frame


@pytest.fixture(scope="module")
def messy_parts(tmp_path_factory):
    """The messy log as 4 CSV parts (with Spark's _SUCCESS marker beside them) and as 3 Parquet parts."""
    folder = tmp_path_factory.mktemp("messy")
    frame = messy_log()
    csv, parquet = _mkdir(folder / "csv"), _mkdir(folder / "parquet")
    for i, part in enumerate(np.array_split(np.arange(len(frame)), 4)):
        frame.iloc[part].to_csv(csv / f"part-{i:05d}.csv", index=False)
    for i, part in enumerate(np.array_split(np.arange(len(frame)), 3)):
        frame.iloc[part].to_parquet(parquet / f"part-{i:05d}.parquet", index=False)
    (csv / "_SUCCESS").write_text("")
    return folder


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.mark.parametrize("form", ["csv", "parquet"])
def test_messy_200k_log_in_parts_builds_identically(tmp_path, messy_parts, form):
    generic = GenericInput(messy_parts / form, rating_col="rating")
    a, b = build_both(tmp_path, "messy", generic=generic)
    assert_same_dataset(a, b)
    manifest = json.loads((b / "manifest.json").read_text())
    assert manifest["cleaning_stats"]["removed_duplicates"] > 5_000 and manifest["counts"]["has_repeats"]
    assert manifest["cleaning_stats"]["kcore_passes"] >= 2


def test_messy_log_glob_with_threshold_and_temporal_split(tmp_path, messy_parts):
    generic = GenericInput(messy_parts / "csv" / "part-0000[0-2].csv", rating_col="rating")
    assert_same_dataset(*build_both(tmp_path, "messy", generic=generic, rating_threshold=3, split="temporal"))


# ---------------------------------------------------------------------------------------------------------------
# Real data (skips without ../shared)


@pytest.mark.parametrize("name", ["ml-100k", "amazon-beauty"])
def test_real_data_builds_identically(tmp_path, name):
    assert_same_dataset(*build_both(tmp_path, name, shared_dataset(name)))


def test_real_beauty_p5_sequences_build_identically(tmp_path):
    source = shared_dataset("amazon-beauty")
    raw = _mkdir(tmp_path / "raw")
    for name in ("sequential_data.txt.gz", "datamaps.json.gz"):
        shutil.copy(source / name, raw / name)
    assert_same_dataset(*build_both(tmp_path, "amazon-beauty", raw))


# ---------------------------------------------------------------------------------------------------------------
# A real cluster: a standalone master and one worker on 127.0.0.1


def _spark_class(*args: str, log: Path) -> subprocess.Popen:
    import pyspark

    home = Path(pyspark.__file__).parent
    env = {**os.environ, "SPARK_HOME": str(home), "SPARK_LOCAL_IP": "127.0.0.1", "PYSPARK_PYTHON": sys.executable}
    return subprocess.Popen([str(home / "bin" / "spark-class"), *args], env=env, stdout=log.open("wb"),
                            stderr=subprocess.STDOUT, start_new_session=True)


def _wait_for(predicate, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _recsys(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "recsys", *args], cwd=REPO_ROOT, capture_output=True, text=True,
                          **kwargs)


def test_standalone_cluster_on_localhost_builds_identically(tmp_path, messy_parts):
    port, ui = free_port(), free_port()
    master_log, worker_log = tmp_path / "master.log", tmp_path / "worker.log"
    master = _spark_class("org.apache.spark.deploy.master.Master", "--host", "127.0.0.1", "--port", str(port),
                          "--webui-port", str(ui), log=master_log)
    worker = None
    try:
        _wait_for(lambda: b"I have been elected leader" in master_log.read_bytes(), 90, "the Spark master")
        worker = _spark_class("org.apache.spark.deploy.worker.Worker", f"spark://127.0.0.1:{port}", "--host",
                              "127.0.0.1", "--cores", "2", "--memory", "2g", "--webui-port", str(free_port()),
                              log=worker_log)
        _wait_for(lambda: b"Successfully registered with master" in worker_log.read_bytes(), 90, "the Spark worker")
        data = messy_parts / "parquet"
        done = _recsys("data", "build", "--dataset", "messy", "--input", str(data), "--rating-col", "rating",
                       "--data-root", str(tmp_path / "spark"), "--engine", "spark",
                       "--spark-master", f"spark://127.0.0.1:{port}", "--spark-conf", "spark.driver.memory=1g",
                       "--spark-conf", "spark.executor.memory=1g", "--spark-conf", "spark.driver.host=127.0.0.1",
                       timeout=900)
        assert done.returncode == 0, done.stderr[-3000:]
        assert b"Asked to launch executor" in worker_log.read_bytes()  # the job really ran on the worker
    finally:
        for proc in (worker, master):
            if proc is not None:
                _stop(proc)
    a = build_dataset("messy", data_root=tmp_path / "inprocess", generic=GenericInput(data, rating_col="rating"))
    assert_same_dataset(a, Path(done.stdout.strip()))


# ---------------------------------------------------------------------------------------------------------------
# SIGKILL during a build


def _kill_build_midway(args: list[str], target: Path, seconds: float) -> None:
    """Start ``recsys data build`` in its own process group and SIGKILL the whole group (driver, JVM, Python
    workers) ``seconds`` after the build's temporary directory appears."""
    proc = subprocess.Popen([sys.executable, "-m", "recsys", *args], cwd=REPO_ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        _wait_for(lambda: any(target.parent.glob(f".{target.name}.tmp-*")) or proc.poll() is not None, 300,
                  "the build's temporary directory")
        time.sleep(seconds)
        assert proc.poll() is None, "the build ended before the kill; the test would prove nothing"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _assert_nothing_half_written(processed: Path) -> None:
    for manifest in processed.glob("**/manifest.json"):
        ds = load_dataset(manifest.parent, mmap_cache=False)
        assert content_hash(ds.sequences, ds.num_items) == ds.content_hash
        assert ds.items["item_idx"].tolist() == list(range(1, ds.num_items + 1))


@pytest.mark.parametrize("seconds", [1.0, 6.0, 12.0])
def test_sigkill_during_a_build_and_a_rebuild_leaves_nothing_half_written(tmp_path, messy_parts, seconds):
    root = tmp_path / "data"
    args = ["data", "build", "--dataset", "messy", "--input", str(messy_parts / "parquet"), "--rating-col",
            "rating", "--data-root", str(root), "--engine", "spark", "--spark-master", "local[2]",
            "--spark-conf", "spark.driver.memory=1g"]
    target = root / "processed" / "messy"
    _kill_build_midway(args, target, seconds)
    assert not (target / "manifest.json").exists()
    _assert_nothing_half_written(root / "processed")

    done = _recsys(*args, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    first = json.loads((target / "manifest.json").read_text())["content_hash"]

    _kill_build_midway([*args, "--force"], target, seconds)  # a rebuild replacing the dataset, killed
    _assert_nothing_half_written(root / "processed")
    assert json.loads((target / "manifest.json").read_text())["content_hash"] == first  # the previous one survived

    done = _recsys(*args, "--force", timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((target / "manifest.json").read_text())["content_hash"] == first


# ---------------------------------------------------------------------------------------------------------------
# The rest of the platform reads a Spark-built dataset unchanged


def test_train_reads_a_spark_built_dataset(tmp_path):
    done = _recsys("train", "--model", "pop", "--dataset", "ml-100k", "--raw-dir", str(FIXTURES / "ml-100k"),
                   "--data-root", str(tmp_path / "data"), "--engine", "spark", "--spark-conf",
                   "spark.driver.memory=1g", "--no-track", "--no-progress", "--out", str(tmp_path / "bundle"),
                   timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    manifest = json.loads((tmp_path / "data" / "processed" / "ml-100k" / "manifest.json").read_text())
    assert manifest["engine"] == "spark"
    assert "hr@10" in json.loads(done.stdout)["test"]


def test_engine_options_are_checked():
    with pytest.raises(ValueError, match="engine must be one of"):
        Engine("dask")
    with pytest.raises(ValueError, match="need --engine spark"):
        Engine("inprocess", master="local[2]")


def test_gzip_reads_like_plain(tmp_path):
    """A gzipped file is one split for Spark; its line numbers still count from the file's start."""
    raw = copy_fixture("amazon-tsv", tmp_path / "raw", gz=True)
    with gzip.open(raw / "beauty_5core_interactions.tsv.gz", "rb") as f:
        assert f.readline().startswith(b"user")
    assert_same_dataset(*build_both(tmp_path, "amazon-beauty", raw))


def test_many_small_blocks_keep_line_numbers(tmp_path):
    """Spark cuts files into blocks (here of 256 bytes); line numbers and order still match the whole file."""
    from pyspark.sql import SparkSession

    session = SparkSession.getActiveSession()
    session.conf.set("spark.sql.files.maxPartitionBytes", "256")
    try:
        raw_dir = copy_fixture("ml-100k", tmp_path / "raw")
        insert_line(raw_dir / "u.data", 29, b"7\t3\t4\t87420abc\n")
        with pytest.raises(BadInputError) as info:
            build_dataset("ml-100k", raw_dir, data_root=tmp_path / "s", engine=SPARK)
        assert info.value.line == 29
        raw_dir = copy_fixture("ml-100k", tmp_path / "clean")
        assert_same_dataset(*build_both(tmp_path, "ml-100k", raw_dir))
    finally:
        session.conf.unset("spark.sql.files.maxPartitionBytes")


def test_arrow_table_of_parts_matches(tmp_path):
    """Parquet parts with several row groups: rows keep their file order across Spark's splits."""
    frame = messy_log(30_000, seed=3)
    folder = _mkdir(tmp_path / "parts")
    for i, part in enumerate(np.array_split(np.arange(len(frame)), 2)):
        pq.write_table(pa.Table.from_pandas(frame.iloc[part], preserve_index=False),
                       folder / f"part-{i}.parquet", row_group_size=2_000)
    generic = GenericInput(folder, rating_col="rating")
    assert_same_dataset(*build_both(tmp_path, "parts", generic=generic))

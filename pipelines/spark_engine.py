"""The processed dataset built on Apache Spark (``recsys data build --engine spark``), for logs beyond one machine.

Same plan, parsers and rules as the in-process engine (``pipelines.build``, ``pipelines.cleaning``), as Spark
DataFrame steps: rating threshold, exact-duplicate removal (the first row in source order stays), iterative k-core
to a fixed point (users, then items, per pass; each pass checkpointed), users numbered 0..U-1 by their first row in
source order, each user's events ordered by (timestamp, source order), items numbered 1..V by their first appearance
in that user-major order, the temporal cutoffs as exact order statistics of the timestamps.

Spark writes the sorted interactions and the user table as part files into a scratch folder of the build's
temporary directory; the driver then streams the parts in order into the one ``interactions.parquet`` /
``sequences.parquet`` / ``users.parquet`` of the dataset contract (bounded memory, the sort order checked on the
way), computes the content hash from what it wrote, and the manifest goes last. The whole temporary directory is
renamed into place only when everything is written (``kernels.atomic``).
"""

from __future__ import annotations

import glob
import hashlib
import os
import shutil
import sys
import time
import warnings
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from pyspark import StorageLevel
from pyspark.sql import DataFrame, SparkSession, Window
from pyspark.sql import functions as F

from .dataset import item_table, write_manifest
from .errors import EmptyDatasetError
from .rawio import BadLines
from .rawlog import FileSpec, ReadPlan
from .splits import lower_quantile_index
from .readers_generic import parse_parquet_log
from .spark_read import LOG_SCHEMA, SOURCE, collect_bad_lines, item_schema, parse_parquet, parse_text

DEFAULT_MASTER = "local[*]"
_DEFAULT_CONF = {
    "spark.ui.enabled": "false",
    "spark.sql.session.timeZone": "UTC",
    "spark.sql.execution.arrow.maxRecordsPerBatch": "100000",
    "spark.sql.shuffle.partitions": "16",
}
# Materialised intermediate results go to the workers' local disks, never to the JVM heap: caching 100M parsed rows
# in memory ran a 4 GB driver out of heap (MEMORY_AND_DISK unrolls a whole partition on the heap first).
_ON_DISK = StorageLevel.DISK_ONLY
_ROWS_PER_GROUP = 1 << 20  # events per row group of the consolidated Parquet files
_COLLECT_ALL_BELOW = 2_000_000  # timestamps: below this many, the driver sorts them all; above, it brackets first


def spark_session(master: str | None = None, conf: dict[str, str] | None = None) -> tuple[SparkSession, bool]:
    """The session already running in this process (a notebook, the tests), or a new one on ``master`` with
    ``conf``; True when it is ours to stop. A running session is never replaced (Spark allows one per process)."""
    active = SparkSession.getActiveSession()
    if active is not None:
        if master or conf:
            print(f"using the Spark session already running here ({active.sparkContext.master}); "
                  "--spark-master / --spark-conf apply to new sessions only", file=sys.stderr)
        return active, False
    # Workers run this interpreter, which has the platform installed (a cluster's nodes need the same install).
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    warnings.filterwarnings("ignore", message="PySpark does not yet fully support pandas")
    builder = SparkSession.builder.appName("recsys data build").master(master or DEFAULT_MASTER)
    for key, value in {**_DEFAULT_CONF, **(conf or {})}.items():
        builder = builder.config(key, value)
    session = builder.getOrCreate()
    session.sparkContext.setLogLevel("ERROR")
    return session, True


def build_with_spark(plan: ReadPlan, settings: dict, bad: BadLines, directory: Path, manifest: dict, started: float,
                     *, master: str | None = None, conf: dict[str, str] | None = None) -> dict:
    """Read, clean and write the dataset into ``directory`` (the build's temporary directory); returns the manifest."""
    spark, owned = spark_session(master, conf)
    scratch = directory / "_spark"
    try:
        log, text = _read(spark, plan, bad, scratch)
        bad.print_summary()
        log, stats = _clean(log, plan.has_rating, settings)
        users, items = _number(log)
        log = log.join(users.select("user", "user_idx"), "user").join(items.select("item", "item_idx"), "item")
        log = _materialised(log.select("user_idx", "item_idx", "ts", *SOURCE))
        stats["has_repeats"] = bool(log.groupBy("user_idx", "item_idx").count().filter("count > 1").limit(1).count())
        n = int(log.count())
        cutoffs = _temporal_cutoffs(log, n, settings["temporal_valid_quantile"], settings["temporal_test_quantile"])
        log.orderBy("user_idx", "ts", *SOURCE).write.parquet(str(scratch / "interactions"))
        users.select("user_idx", "user").orderBy("user_idx").write.parquet(str(scratch / "users"))
        item_rows = items.select("item_idx", "item", "popularity").orderBy("item_idx").toArrow()
        item_text = _item_text(text, items, plan)
        num_users = _consolidate_users(scratch / "users", directory / "users.parquet")
        num_items = item_rows.num_rows
        digest = _consolidate_log(scratch / "interactions", directory, n, num_users, num_items)
    finally:
        if owned:
            spark.stop()
        shutil.rmtree(scratch, ignore_errors=True)
    item_table(np.asarray(item_rows.column("item").to_pylist(), dtype=object),
               item_rows.column("popularity").to_numpy(), item_text).to_parquet(directory / "items.parquet",
                                                                                 index=False)
    manifest.update(temporal_cutoffs={"valid": cutoffs[0], "test": cutoffs[1]}, skipped_lines=dict(bad.skipped),
                    build_seconds=round(time.perf_counter() - started, 3))
    return write_manifest(directory, manifest, users=num_users, items=num_items, interactions=n, stats=stats,
                          digest=digest)


# ---------------------------------------------------------------------------------------------------------------
# Reading


def _read(spark: SparkSession, plan: ReadPlan, bad: BadLines, scratch: Path) -> tuple[DataFrame, DataFrame | None]:
    """The raw log (user, item, ts, rating, source order) and the item text (item_id, text columns), bad lines
    handled by the policy."""
    specs = plan.logs
    if plan.frame is not None:  # generated in memory (synthetic): hand it to Spark as a Parquet file
        path = scratch / "generated" / "log.parquet"
        path.parent.mkdir(parents=True)
        columns = [c for c in ("user", "item", "ts", "rating") if c in plan.frame]
        pq.write_table(pa.Table.from_pandas(plan.frame[columns], preserve_index=False), path)
        parse = partial(parse_parquet_log, user_col="user", item_col="item", time_col="ts",
                        rating_col="rating" if "rating" in columns else None, epochs=True)
        specs = [FileSpec(path, parse, columns=tuple(columns))]
    parsed = _parse(spark, specs, LOG_SCHEMA).persist(_ON_DISK)
    collect_bad_lines(parsed, specs, bad)
    log = parsed.filter(F.col("bad_reason").isNull()).select("user", "item", "ts", "rating", *SOURCE)
    for column, mapping in plan.id_maps.items():
        pairs = spark.createDataFrame(list(mapping.items()), f"{column} string, mapped string")
        log = (log.join(F.broadcast(pairs), column, "left")
               .withColumn(column, F.coalesce("mapped", column)).drop("mapped"))
    text = None
    if plan.items:
        wanted = None
        if any(s.needs_log_items for s in plan.items):
            wanted = {row.item for row in log.select("item").distinct().collect()}
        schema = item_schema(plan.item_columns)
        parsed_items = _parse(spark, plan.items, schema, wanted).persist(_ON_DISK)
        collect_bad_lines(parsed_items, plan.items, bad)
        text = parsed_items.filter(F.col("bad_reason").isNull())
    elif plan.items_frame is not None:
        table = pa.Table.from_pandas(plan.items_frame.astype({"item_id": str}), preserve_index=False)
        text = spark.createDataFrame(table).withColumns(
            {"src_file": F.lit(0), "src_line": F.monotonically_increasing_id(), "src_row": F.lit(0)})
    return log, text


def _parse(spark, specs: list[FileSpec], schema: str, wanted: set | None = None) -> DataFrame:
    if specs[0].is_parquet:
        return parse_parquet(spark, specs, schema)
    return parse_text(spark, specs, schema, wanted)


def _item_text(text: DataFrame | None, items: DataFrame, plan: ReadPlan) -> pd.DataFrame | None:
    """One text row per kept item (its first in source order), as the in-process engine's item-text frame."""
    if text is None:
        return None
    first = Window.partitionBy("item_id").orderBy(*SOURCE)
    columns = [c for c in text.columns if c not in (*SOURCE, "bad_line", "bad_reason", "bad_text")]
    kept = (text.join(items.select(F.col("item").alias("item_id")), "item_id", "left_semi")
            .withColumn("_k", F.row_number().over(first)).filter("_k = 1").orderBy(*SOURCE).select(*columns)
            .toArrow())
    # Built from Python values, as the in-process readers build theirs, so pandas infers the same dtypes.
    return pd.DataFrame({c: kept.column(c).to_pylist() for c in columns}, columns=columns)


# ---------------------------------------------------------------------------------------------------------------
# Cleaning (pipelines.cleaning, step by step)


def _clean(log: DataFrame, has_rating: bool, settings: dict) -> tuple[DataFrame, dict]:
    n = log.count()
    stats: dict = {"raw_interactions": int(n)}
    if n == 0:
        raise EmptyDatasetError("the raw data has no interactions (nothing to clean)")
    threshold = settings["rating_threshold"]
    if threshold is not None:
        if not has_rating:
            raise ValueError("rating_threshold is set but this source has no rating column")
        # Spark orders NaN above every number; a missing rating never passes (as NaN >= t is False in numpy).
        log = log.filter(~F.isnan("rating") & (F.col("rating") >= float(threshold)))
        kept = log.count()
        stats["removed_by_rating_threshold"] = int(n - kept)
        if kept == 0:
            raise EmptyDatasetError(f"rating_threshold={threshold} removed every interaction")
        n = kept
    if settings["dedupe"]:
        keys = ["user", "item", "ts"] + (["rating"] if has_rating else [])
        log = (log.groupBy(*keys).agg(F.min(F.struct(*SOURCE)).alias("src"))
               .select(*keys, *[F.col(f"src.{c}").alias(c) for c in SOURCE]))
        kept = log.count()
        stats["removed_duplicates"] = int(n - kept)
        n = kept
    log, passes, kept = _kcore(log, n, settings["min_user_interactions"], settings["min_item_interactions"])
    stats["removed_by_kcore"] = int(n - kept)
    stats["kcore_passes"] = passes
    if kept == 0:
        raise EmptyDatasetError(
            f"k-core filtering (min_user_interactions={settings['min_user_interactions']}, "
            f"min_item_interactions={settings['min_item_interactions']}) removed every interaction")
    return log, stats


def _kcore(log: DataFrame, n: int, min_user: int, min_item: int) -> tuple[DataFrame, int, int]:
    """Users with fewer than ``min_user`` events, then items with fewer than ``min_item``, until a pass removes
    nothing (``pipelines.cleaning.kcore_mask``; the same passes, so the same pass count)."""
    passes = 0
    while True:
        passes += 1
        before = n
        for column, least in (("user", min_user), ("item", min_item)):
            if least > 1:
                count = F.count("*").over(Window.partitionBy(column))
                log = log.withColumn("_n", count).filter(F.col("_n") >= least).drop("_n")
        log = _materialised(log)  # the next pass starts from here, not from the raw files
        n = log.count()
        if n == before or before == 0:
            return log, passes, n


def _number(log: DataFrame) -> tuple[DataFrame, DataFrame]:
    """users (user, user_idx 0..U-1 by first row in source order) and items (item, item_idx 1..V by first
    appearance in the user-major, time-ordered log; popularity)."""
    users = _ranked(log.groupBy("user").agg(F.min(F.struct(*SOURCE)).alias("first")), "first", "user_idx", 0)
    with_users = log.join(users.select("user", "user_idx"), "user")
    first = F.min(F.struct("user_idx", "ts", *SOURCE)).alias("first")
    items = _ranked(with_users.groupBy("item").agg(first, F.count("*").alias("popularity")), "first", "item_idx", 1)
    return users, items


def _materialised(frame: DataFrame) -> DataFrame:
    """``frame`` computed once and kept on local disk, its lineage cut (later jobs read these very partitions)."""
    return frame.localCheckpoint(eager=True, storageLevel=_ON_DISK)


def _ranked(frame: DataFrame, key: str, name: str, start: int) -> DataFrame:
    """``frame`` with ``name`` = start + its position in ``key`` order (keys are unique).

    After a global sort, partition p holds the p-th range; ``monotonically_increasing_id`` is (p << 33) + the row's
    place in its partition, so the position is the rows of the partitions before p plus that place.
    """
    ordered = _materialised(frame.orderBy(key))
    placed = ordered.withColumn("_p", F.spark_partition_id()).withColumn("_m", F.monotonically_increasing_id())
    counts = sorted((row["_p"], row["count"]) for row in placed.groupBy("_p").count().collect())
    offsets, total = [], start
    for partition, count in counts:
        offsets.append((partition, total))
        total += count
    bases = frame.sparkSession.createDataFrame(offsets, "_p int, _base long")
    position = F.col("_base") + F.col("_m") - F.shiftleft(F.col("_p").cast("long"), 33)
    return _materialised(placed.join(F.broadcast(bases), "_p").withColumn(name, position.cast("int"))
                         .drop("_p", "_m", "_base"))


def _temporal_cutoffs(log: DataFrame, n: int, valid_q: float, test_q: float) -> tuple[int, int]:
    """``pipelines.splits.default_temporal_cutoffs`` exactly: order statistics of every event's timestamp."""
    ranks = [lower_quantile_index(n, q) for q in (valid_q, test_q)]
    if n <= _COLLECT_ALL_BELOW:
        times = np.sort(log.select("ts").toArrow().column("ts").to_numpy())
        return int(times[ranks[0]]), int(times[ranks[1]])
    return tuple(_order_statistic(log, n, rank) for rank in ranks)


def _order_statistic(log: DataFrame, n: int, rank: int, error: float = 1e-3) -> int:
    """The rank-th smallest timestamp: Spark's approximate quantiles (rank error at most ``error`` n) bracket it,
    then the driver sorts only the values inside the bracket."""
    q = rank / max(n - 1, 1)
    low, high = log.approxQuantile("ts", [max(q - 2 * error, 0.0), min(q + 2 * error, 1.0)], error)
    below = log.filter(F.col("ts") < low).count()
    inside = np.sort(log.filter(F.col("ts").between(low, high)).select("ts").toArrow().column("ts").to_numpy())
    if not below <= rank < below + len(inside):
        raise RuntimeError(f"timestamp quantile bracket [{low}, {high}] missed rank {rank} of {n}")
    return int(inside[rank - below])


# ---------------------------------------------------------------------------------------------------------------
# Consolidation: Spark's part files → the dataset's single files


def _parts(folder: Path) -> list[str]:
    return sorted(glob.glob(str(folder / "part-*.parquet")))


def _consolidate_users(folder: Path, target: Path) -> int:
    writer, expected = None, 0
    try:
        for part in _parts(folder):
            for batch in pq.ParquetFile(part).iter_batches(batch_size=_ROWS_PER_GROUP):
                user_idx = batch.column("user_idx").to_numpy()
                if not np.array_equal(user_idx, np.arange(expected, expected + len(user_idx))):
                    raise RuntimeError("Spark's user table is not numbered 0..U-1 in order")
                expected += len(user_idx)
                frame = pd.DataFrame({"user_idx": user_idx.astype(np.int32),
                                      "user_id": pd.array(batch.column("user").to_pylist(), dtype="string")})
                table = pa.Table.from_pandas(frame, preserve_index=False)
                writer = writer or pq.ParquetWriter(target, table.schema)
                writer.write_table(table)
    finally:
        if writer is not None:
            writer.close()
    return expected


def _consolidate_log(folder: Path, directory: Path, n: int, num_users: int, num_items: int) -> str:
    """Stream the sorted interaction parts into interactions.parquet and sequences.parquet (one row per user);
    returns the content hash (``pipelines.jagged.content_hash`` of the same arrays, computed as they stream)."""
    small = n < 2**31  # as pipelines.dataset.write_dataset: 32-bit list offsets while they fit
    offset_type, list_array, list_of = ((pa.int32(), pa.ListArray, pa.list_) if small
                                        else (pa.int64(), pa.LargeListArray, pa.large_list))
    log_schema = pa.schema([("user_idx", pa.int32()), ("item_idx", pa.int32()), ("ts", pa.int64())])
    seq_schema = pa.schema([("user_idx", pa.int32()), ("items", list_of(pa.int32())),
                            ("timestamps", list_of(pa.int64()))])
    lengths = np.zeros(num_users, dtype=np.int64)
    order = _SortCheck()
    with pq.ParquetWriter(directory / "interactions.parquet", log_schema) as log_writer, \
            pq.ParquetWriter(directory / "sequences.parquet", seq_schema) as seq_writer:
        pending: list[pa.RecordBatch] = []
        for part in _parts(folder):
            for batch in pq.ParquetFile(part).iter_batches(batch_size=_ROWS_PER_GROUP):
                order.check(batch)
                log_writer.write_table(pa.Table.from_batches([batch.select(["user_idx", "item_idx", "ts"])])
                                       .cast(log_schema))
                pending.append(batch)
                if sum(b.num_rows for b in pending) >= _ROWS_PER_GROUP:
                    pending = _write_users(pending, seq_writer, lengths, list_array, offset_type, final=False)
        _write_users(pending, seq_writer, lengths, list_array, offset_type, final=True)
    if order.rows != n or (lengths == 0).any():
        raise RuntimeError(f"Spark wrote {order.rows} of {n} interactions, or a user without events")
    return _content_hash(directory / "sequences.parquet", lengths, num_items)


def _write_users(pending, writer, lengths, list_array, offset_type, final: bool) -> list[pa.RecordBatch]:
    """Write the users whose events are all in ``pending`` as sequence rows; return what belongs to the last one."""
    if not pending:
        return []
    table = pa.Table.from_batches(pending).combine_chunks()
    user_idx = table.column("user_idx").to_numpy()
    cut = len(user_idx) if final else int(np.searchsorted(user_idx, user_idx[-1], side="left"))
    if cut == 0:
        return pending
    users, starts = np.unique(user_idx[:cut], return_index=True)
    counts = np.diff(np.append(starts, cut))
    lengths[users] = counts
    offsets = pa.array(np.append(starts, cut), offset_type)
    items = table.column("item_idx").slice(0, cut).combine_chunks().cast(pa.int32())
    times = table.column("ts").slice(0, cut).combine_chunks().cast(pa.int64())
    writer.write_table(pa.table({"user_idx": pa.array(users.astype(np.int32)),
                                 "items": list_array.from_arrays(offsets, items),
                                 "timestamps": list_array.from_arrays(offsets, times)}, schema=writer.schema))
    return table.slice(cut).to_batches()


class _SortCheck:
    """Asserts that the rows Spark wrote come in (user_idx, ts, source order) order, across batches and parts."""

    def __init__(self):
        self.last = None
        self.rows = 0

    def check(self, batch: pa.RecordBatch) -> None:
        keys = [batch.column(c).to_numpy() for c in ("user_idx", "ts", *SOURCE)]
        if self.last is not None:
            keys = [np.concatenate([[prev], k]) for prev, k in zip(self.last, keys)]
        ahead = np.zeros(len(keys[0]) - 1, dtype=bool)  # row i+1 already known to be after row i
        for k in keys:
            before, after = k[:-1], k[1:]
            if (~ahead & (after < before)).any():
                raise RuntimeError("Spark's interaction parts are not in (user, time, source) order")
            ahead |= after > before
        self.last = [k[-1] for k in keys]
        self.rows += batch.num_rows


def _content_hash(sequences: Path, lengths: np.ndarray, num_items: int) -> str:
    """sha256 of num_items, the offsets, every item, every timestamp: ``pipelines.jagged.content_hash`` streamed."""
    digest = hashlib.sha256()
    digest.update(np.int64(num_items).tobytes())
    digest.update(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64).tobytes())
    for column, dtype in (("items", np.int32), ("timestamps", np.int64)):
        for batch in pq.ParquetFile(sequences).iter_batches(columns=[column]):
            values = batch.column(column).flatten().to_numpy().astype(dtype, copy=False)
            digest.update(np.ascontiguousarray(values).tobytes())
    return digest.hexdigest()

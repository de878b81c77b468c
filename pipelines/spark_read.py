"""A read plan (``pipelines.rawlog``) executed on Spark: raw files → DataFrames of parsed rows with their source order.

Text files are read by Spark's text source, line by line (LF only, so a stray CR inside a line never splits it, as
in the in-process engine), and each line gets its 1-based line number: Spark reads a file in blocks, so a first
job counts the lines of every (file, block) and the driver turns those counts into each block's first line number;
inside a block, lines keep their order and ``monotonically_increasing_id`` numbers them consecutively. The lines of
each Arrow batch then go to the same parser the in-process engine uses (``mapInArrow``), on the workers.

Source order, the tie-break for equal timestamps, is (file in path order, line or Parquet row, row inside the
parsed batch): the columns ``src_file``, ``src_line`` (the first line or row of the batch the row was parsed
from) and ``src_row``. Bad lines come back as rows with ``bad_reason`` set; ``collect_bad_lines`` applies the
``--on-bad-lines`` policy to them exactly as the in-process engine would have.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from urllib.parse import unquote, urlparse

import numpy as np
import pandas as pd
import pyarrow as pa

from pyspark.sql import DataFrame, SparkSession, Window
from pyspark.sql import functions as F

from .errors import BadInputError
from .rawio import BadLines, Lines
from .rawlog import FileSpec

SOURCE = ["src_file", "src_line", "src_row"]
_SOURCE_SCHEMA = "src_file int, src_line long, src_row int, bad_line long, bad_reason string, bad_text string"
LOG_SCHEMA = "user string, item string, ts long, rating double, " + _SOURCE_SCHEMA


def item_schema(item_columns: dict[str, str]) -> str:
    kinds = {"string": "string", "float64": "double"}
    return ", ".join(["item_id string"] + [f"`{c}` {kinds[k]}" for c, k in item_columns.items()] + [_SOURCE_SCHEMA])


class CollectedBadLines(BadLines):
    """Keeps every bad line of one batch (number, reason, text) for the driver, which applies the real policy."""

    def __init__(self):
        super().__init__("skip")
        self.records: list[tuple[int | None, str, str | None]] = []

    def report(self, path, line, reason, text=None):
        self.records.append((line, reason, text))

    def forget(self, path):
        self.records.clear()


def spark_path(path: Path) -> str:
    return Path(path).resolve().as_uri()


def _file_index(specs: list[FileSpec]) -> dict[str, int]:
    """Spark's ``_metadata.file_path`` (a URI, percent-encoded) → index of the file in the plan."""
    return {str(Path(s.path).resolve()): i for i, s in enumerate(specs)}


def _local(uri: str) -> str:
    return str(Path(unquote(urlparse(uri).path)).resolve())


def numbered_lines(spark: SparkSession, specs: list[FileSpec]) -> DataFrame:
    """(raw bytes without LF, src_file, line) for every line of the text files of ``specs``, in file order."""
    index = _file_index(specs)
    lines = (spark.read.option("lineSep", "\n").text([spark_path(s.path) for s in specs])
             .select(F.col("value").cast("binary").alias("raw"), F.col("_metadata.file_path").alias("path"),
                     F.col("_metadata.file_block_start").alias("block"), F.monotonically_increasing_id().alias("mono")))
    blocks = lines.groupBy("path", "block").agg(F.min("mono").alias("first"), F.count("*").alias("n")).collect()
    rows, seen = [], {}
    for block in sorted(blocks, key=lambda b: (index[_local(b.path)], b.block)):
        file = index[_local(block.path)]
        before = seen.get(file, 0)
        rows.append((block.path, block.block, file, before + 1 - block.first))  # line = mono + base
        seen[file] = before + block.n
    if not rows:
        return spark.createDataFrame([], "raw binary, src_file int, line long")
    bases = spark.createDataFrame(rows, "path string, block long, src_file int, base long")
    return (lines.join(F.broadcast(bases), ["path", "block"])
            .select("raw", "src_file", (F.col("mono") + F.col("base")).alias("line")))


def parse_text(spark: SparkSession, specs: list[FileSpec], schema: str, wanted: set | None = None) -> DataFrame:
    """Every text file of ``specs`` through its parser; rows as in ``schema`` (LOG_SCHEMA or item_schema)."""
    run = partial(_parse_text_batches, specs, schema_types(schema), wanted)
    return numbered_lines(spark, specs).mapInArrow(run, schema)


def parse_parquet(spark: SparkSession, specs: list[FileSpec], schema: str) -> DataFrame:
    """Every Parquet file of ``specs`` (their ``columns``) through its parser, with the row index as the line."""
    frame = spark.read.parquet(*[spark_path(s.path) for s in specs]).select(
        *[F.col(f"`{c}`") for c in specs[0].columns], F.col("_metadata.file_path").alias("path"),
        F.col("_metadata.row_index").alias("line"))
    return frame.mapInArrow(partial(_parse_parquet_batches, specs, schema_types(schema)), schema)


def _runs(files: np.ndarray):
    """(start, stop) of the runs of equal values (one batch may hold the end of one file and the start of another)."""
    cuts = np.flatnonzero(np.diff(files)) + 1
    edges = np.concatenate([[0], cuts, [len(files)]])
    return zip(edges[:-1].tolist(), edges[1:].tolist())


def _parse_text_batches(specs, types, wanted, batches):
    for batch in batches:
        files = batch.column("src_file").to_numpy()
        for start, stop in _runs(files):
            spec = specs[int(files[start])]
            numbers = batch.column("line").to_numpy()[start:stop]
            lines = Lines(Path(spec.path), batch.column("raw").slice(start, stop - start), numbers)
            bad = CollectedBadLines()
            frame = spec.parse(lines, bad, wanted=wanted) if spec.needs_log_items else spec.parse(lines, bad)
            yield _output(frame, types, int(files[start]), int(numbers[0]), bad)


def _parse_parquet_batches(specs, types, batches):
    index = _file_index(specs)
    for batch in batches:
        paths = batch.column("path").to_pylist()
        lookup = {p: index[_local(p)] for p in set(paths)}  # Spark's path URIs → the plan's file index
        files = np.array([lookup[p] for p in paths], dtype=np.int32)
        for start, stop in _runs(files):
            spec = specs[int(files[start])]
            rows = batch.slice(start, stop - start)
            first = int(rows.column("line")[0].as_py())
            if not np.array_equal(rows.column("line").to_numpy(), np.arange(first, first + len(rows))):
                raise RuntimeError(f"{spec.path}: Spark handed over Parquet rows out of order")
            table = pa.Table.from_batches([rows.select(list(spec.columns))])
            bad = CollectedBadLines()
            frame = spec.parse(table, Path(spec.path), first, bad)
            yield _output(frame, types, int(files[start]), first, bad)


_ARROW = {"string": pa.string(), "long": pa.int64(), "double": pa.float64(), "int": pa.int32()}


def schema_types(schema: str) -> dict[str, pa.DataType]:
    """``"a string, b long"`` → {"a": string, "b": int64} (the Arrow types of a mapInArrow output)."""
    pairs = [c.strip().rsplit(" ", 1) for c in schema.split(",")]
    return {name.strip("`"): _ARROW[kind] for name, kind in pairs}


def _as_str(values: pd.Series) -> pa.Array:
    """External ids as the in-process engine writes them (``pipelines.cleaning``: pandas' str of each value);
    integers through Arrow's cast, which writes them alike and much faster."""
    if pd.api.types.is_integer_dtype(values.dtype):
        return pa.array(values.to_numpy()).cast(pa.string())
    return pa.array(pd.Index(values).astype(str).to_numpy(dtype=object), pa.string())


def _output(frame: pd.DataFrame, types: dict[str, pa.DataType], file: int, first_line: int,
            bad: CollectedBadLines) -> pa.RecordBatch:
    """Parsed rows, then one row per bad line, as one batch of the declared schema."""
    n, m = len(frame), len(bad.records)
    columns = {}
    for name, kind in types.items():
        if name in ("user", "item", "item_id"):
            good = _as_str(frame[name]) if n else pa.array([], pa.string())
        elif name in frame:
            good = pa.array(frame[name], from_pandas=True, type=kind) if n else pa.array([], kind)
        else:
            good = pa.nulls(n, kind)
        columns[name] = pa.concat_arrays([good, pa.nulls(m, kind)])
    columns["src_file"] = pa.array(np.full(n + m, file, dtype=np.int32))
    columns["src_line"] = pa.array(np.full(n + m, first_line, dtype=np.int64))
    columns["src_row"] = pa.array(np.arange(n + m, dtype=np.int32))
    columns["bad_line"] = pa.array([None] * n + [r[0] for r in bad.records], pa.int64())
    columns["bad_reason"] = pa.array([None] * n + [r[1] for r in bad.records], pa.string())
    columns["bad_text"] = pa.array([None] * n + [r[2] for r in bad.records], pa.string())
    return pa.RecordBatch.from_pydict({name: columns[name] for name in types}, schema=pa.schema(types.items()))


def collect_bad_lines(parsed: DataFrame, specs: list[FileSpec], bad: BadLines) -> None:
    """Apply the policy to the bad lines Spark's parsers found: ``error`` raises for the first (in source order),
    as the in-process engine does; ``skip`` counts them per file with the first ten line numbers."""
    rows = parsed.filter(F.col("bad_reason").isNotNull())
    if bad.on_bad_lines == "error":
        first = rows.orderBy("src_file", "src_line", "src_row").limit(1).collect()
        if first:
            row = first[0]
            raise BadInputError(specs[row.src_file].path, row.bad_line, row.bad_reason, row.bad_text)
        return
    order = Window.partitionBy("src_file").orderBy("src_line", "src_row")
    first_ten = F.sort_array(F.collect_list(F.when(F.col("k") <= 10, F.struct("k", "bad_line"))))
    counted = (rows.withColumn("k", F.row_number().over(order))
               .groupBy("src_file").agg(F.count("*").alias("n"), first_ten.alias("first")))
    for row in sorted(counted.collect(), key=lambda r: r.src_file):
        name = Path(specs[row.src_file].path).name
        bad.skipped[name] = bad.skipped.get(name, 0) + row.n
        bad.examples.setdefault(name, []).extend(x.bad_line for x in row.first[: 10 - len(bad.examples.get(name, []))])

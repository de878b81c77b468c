"""Readers for user-supplied files: a generic CSV/Parquet log and the P5 ``user item item ...`` form."""

from __future__ import annotations

import glob
import json
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .errors import BadInputError
from .rawio import BadLines, Lines, open_binary, read_delimited
from .rawlog import FileSpec, RawLog, ReadPlan, read_plan


_TIME_SAMPLE_ROWS = 10_000


def input_files(path: str | Path) -> list[Path]:
    """A user's log as one file, a directory of part files, or a glob (``logs/part-*.csv``), in path order.

    In a directory, names starting with ``.`` or ``_`` (``_SUCCESS``, ``.crc`` files) are not data, as in Spark.
    """
    path = Path(path)
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith((".", "_")))
    else:
        files = sorted(Path(p) for p in glob.glob(str(path)) if Path(p).is_file())
    if not files:
        raise FileNotFoundError(f"input file not found: {path}" + (" (no data files in it)" if path.is_dir() else ""))
    return files


def plan_table(path: str | Path, *, user_col: str, item_col: str, time_col: str, rating_col: str | None = None,
               file_format: str | None = None, sep: str = ",") -> ReadPlan:
    """A log with named user/item/time (and optional rating) columns: CSV files (header row) or Parquet files.

    Times may be integer or float epochs (seconds), Arrow timestamps/dates, or date strings; whether a text time
    column holds epochs or dates is decided once, from the first file's first 10,000 rows, so every file and every
    batch reads alike. A row with an empty id or an unreadable time is a malformed line: named by file and line, or
    skipped and counted. Every CSV part must have the same header.
    """
    files = input_files(path)
    file_format = file_format or ("parquet" if files[0].name.endswith((".parquet", ".pq")) else "csv")
    wanted = [user_col, item_col, time_col] + ([rating_col] if rating_col else [])
    columns = dict(user_col=user_col, item_col=item_col, time_col=time_col, rating_col=rating_col)
    if file_format == "parquet":
        for file in files:
            _check_columns(file, wanted, pq.read_schema(file).names)
        first = next(pq.ParquetFile(files[0]).iter_batches(batch_size=_TIME_SAMPLE_ROWS, columns=[time_col]), None)
        sample = first.column(0) if first is not None else pa.array([], pq.read_schema(files[0]).field(time_col).type)
        epochs = _time_kind(pa.chunked_array([sample])) == "epoch"
        parse = partial(parse_parquet_log, **columns, epochs=epochs)
        logs = [FileSpec(file, parse, columns=tuple(wanted)) for file in files]
    elif file_format == "csv":
        header = _header(files[0], sep)
        for file in files:
            _check_columns(file, wanted, _header(file, sep))
            if _header(file, sep) != header:
                raise BadInputError(file, 1, f"header differs from the first part's ({files[0].name}: {header})")
        first = Lines.head(files[0], _TIME_SAMPLE_ROWS + 1)
        sample = _read_csv_columns(first, BadLines("skip"), header, wanted, sep)
        epochs = _time_kind(sample.column(time_col)) == "epoch"
        parse = partial(parse_csv_log, header=tuple(header), sep=sep, **columns, epochs=epochs)
        logs = [FileSpec(file, parse) for file in files]
    else:
        raise ValueError(f"unknown input format {file_format!r} (expected csv or parquet)")
    return ReadPlan(logs, has_rating=rating_col is not None)


def read_table_file(path: Path, bad: BadLines, **options) -> RawLog:
    """``plan_table`` read in process."""
    return read_plan(plan_table(path, **options), bad)


def parse_csv_log(lines: Lines, bad: BadLines, *, header: tuple[str, ...], sep: str, user_col: str, item_col: str,
                  time_col: str, rating_col: str | None, epochs: bool) -> pd.DataFrame:
    wanted = [user_col, item_col, time_col] + ([rating_col] if rating_col else [])
    table = _read_csv_columns(lines, bad, header, wanted, sep)
    ts, bad_rows = _timestamps(table.column(time_col), epochs)
    for name in (user_col, item_col):
        bad_rows = bad_rows | _empty(table.column(name))
    if bad_rows.any():
        # Re-read line by line with the same checks, so each bad row is named by its physical line.
        bad.forget(lines.path)
        table = _read_csv_columns(lines, bad, header, wanted, sep, row_check=_row_check(epochs))
        ts, _ = _timestamps(table.column(time_col), epochs)
    return _log_frame(table, ts, user_col, item_col, rating_col)


def parse_parquet_log(table: pa.Table, path: Path, first_row: int, bad: BadLines, *, user_col: str, item_col: str,
                      time_col: str, rating_col: str | None, epochs: bool) -> pd.DataFrame:
    ts, bad_rows = _timestamps(table.column(time_col), epochs)
    for name in (user_col, item_col):
        bad_rows = bad_rows | _empty(table.column(name))
    if bad_rows.any():
        for row in np.flatnonzero(bad_rows):
            bad.report(path, None, f"data row {first_row + row + 1}: empty id or unreadable time")
        keep = pa.array(~bad_rows)
        table, ts = table.filter(keep), ts[~bad_rows]
    return _log_frame(table, ts, user_col, item_col, rating_col)


def _log_frame(table: pa.Table, ts: np.ndarray, user_col: str, item_col: str, rating_col: str | None) -> pd.DataFrame:
    frame = pd.DataFrame({
        "user": _column_numpy(table.column(user_col)),
        "item": _column_numpy(table.column(item_col)),
        "ts": ts,
    })
    if rating_col:
        frame["rating"] = pc.cast(table.column(rating_col), pa.float64()).to_numpy()
    return frame


def _check_columns(path: Path, wanted: list[str], present: list[str]) -> None:
    missing = [c for c in wanted if c not in present]
    if missing:
        raise BadInputError(path, 1, f"column(s) {missing} not found; the file has {present}")


def _read_csv_columns(lines: Lines, bad: BadLines, header, wanted: list[str], sep: str, row_check=None) -> pa.Table:
    # Ids stay strings (they are external ids); time/rating are typed later so dates also work.
    columns = {name: "string" for name in header}
    return read_delimited(lines, sep=sep, header=True, quoted=True, bad=bad, columns=columns, keep=wanted,
                          row_check=row_check, force_scan=row_check is not None)


def _header(path: Path, sep: str) -> list[str]:
    with open_binary(path) as f:
        first = f.readline().decode("utf-8-sig").rstrip("\r\n")  # utf-8-sig: spreadsheets write a BOM
    return [name.strip().strip('"') for name in first.split(sep)]


def _column_numpy(column: pa.ChunkedArray) -> np.ndarray:
    if pa.types.is_dictionary(column.type):
        column = pc.cast(column, column.type.value_type)
    return column.to_numpy(zero_copy_only=False)


def _empty(column: pa.ChunkedArray) -> np.ndarray:
    """Missing ids: nulls, NaN, or text that is blank once stripped."""
    if pa.types.is_integer(column.type):  # the common case of large logs: no string round trip
        return column.is_null().to_numpy(zero_copy_only=False)
    values = pd.Series(_column_numpy(column))
    return (values.isna() | (values.astype(str).str.strip() == "")).to_numpy()


def _time_kind(column: pa.ChunkedArray) -> str:
    """"epoch" when the column is numeric or mostly numeric strings, else "date" (decided once per column)."""
    kind = column.type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_dictionary(kind)):
        return "epoch" if pa.types.is_integer(kind) or pa.types.is_floating(kind) else "date"
    numeric = pd.to_numeric(pd.Series(_column_numpy(column)), errors="coerce")
    return "epoch" if numeric.notna().mean() >= 0.5 else "date"


def _timestamps(column: pa.ChunkedArray, epochs: bool) -> tuple[np.ndarray, np.ndarray]:
    """int64 seconds and a mask of unreadable values."""
    kind = column.type
    if pa.types.is_integer(kind) or pa.types.is_floating(kind):
        values = pc.cast(column, pa.float64()).to_numpy(zero_copy_only=False)
        bad = np.isnan(values)
        return np.floor(np.where(bad, 0, values)).astype(np.int64), bad
    if pa.types.is_timestamp(kind) or pa.types.is_date(kind):
        seconds = pc.cast(pc.cast(column, pa.timestamp("s"), safe=False), pa.int64())  # floors sub-seconds
        bad = seconds.is_null().to_numpy(zero_copy_only=False)
        return seconds.fill_null(0).to_numpy(), bad
    values = pd.Series(_column_numpy(column))
    if epochs:
        numeric = pd.to_numeric(values, errors="coerce")
        bad = numeric.isna().to_numpy()
        return np.floor(numeric.fillna(0).to_numpy(dtype=np.float64)).astype(np.int64), bad
    parsed = pd.to_datetime(values, errors="coerce", utc=True, format="mixed")
    bad = parsed.isna().to_numpy()
    seconds = parsed.astype("datetime64[s, UTC]").astype("int64").to_numpy()
    return np.where(bad, 0, seconds), bad


def _row_check(epochs: bool):
    """The per-line form of the checks above, for the line-by-line re-read (values: user, item, time, ...)."""
    def check(values: list) -> str | None:
        if not str(values[0]).strip() or not str(values[1]).strip():
            return "empty user or item id"
        text = str(values[2]).strip()
        try:
            float(text) if epochs else pd.to_datetime(text, utc=True, format="mixed")
        except (ValueError, TypeError, OverflowError):
            return f"timestamp {text!r} is not a {'number' if epochs else 'date'}"
        return None
    return check


def plan_p5_sequences(path: Path, datamaps_path: Path | None = None) -> ReadPlan:
    """P5 ``sequential_data.txt``: ``user item item ...`` per line, time-ordered, no timestamps.

    The position inside the line becomes ``ts`` (0, 1, 2, ...), which keeps the order exact and makes
    temporal splits meaningless (recorded in the manifest). With ``datamaps.json`` the P5 numbers are
    mapped back to the external ids (reviewerID / asin).
    """
    id_maps, extra = {}, []
    if datamaps_path is not None:
        with open_binary(datamaps_path) as f:
            maps = json.loads(f.read().decode("utf-8"))
        extra.append(datamaps_path)
        id_maps = {column: maps[key] for column, key in (("user", "id2user"), ("item", "id2item")) if key in maps}
    return ReadPlan([FileSpec(path, parse_p5)], id_maps=id_maps, timestamps_are_positions=True, extra_files=extra)


def read_p5_sequences(path: Path, bad: BadLines, datamaps_path: Path | None = None) -> RawLog:
    return read_plan(plan_p5_sequences(path, datamaps_path), bad)


def parse_p5(lines: Lines, bad: BadLines) -> pd.DataFrame:
    users, items, positions = [], [], []
    for line_no, text in lines.numbered(bad):
        tokens = text.split()
        if not tokens:
            continue
        if len(tokens) < 2 or not all(t.isdigit() for t in tokens):
            bad.report(lines.path, line_no, "expected 'user item item ...' with integer ids", text)
            continue
        n = len(tokens) - 1
        users.extend([tokens[0]] * n)
        items.extend(tokens[1:])
        positions.extend(range(n))
    return pd.DataFrame({"user": users, "item": items, "ts": np.asarray(positions, dtype=np.int64)})

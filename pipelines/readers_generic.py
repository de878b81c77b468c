"""Readers for user-supplied files: a generic CSV/Parquet log and the P5 ``user item item ...`` form."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .errors import BadInputError
from .rawio import BadLines, numbered_lines, open_binary, read_delimited
from .rawlog import RawLog


def read_table_file(path: Path, bad: BadLines, *, user_col: str, item_col: str, time_col: str,
                    rating_col: str | None = None, file_format: str | None = None, sep: str = ",") -> RawLog:
    """A log with named user/item/time (and optional rating) columns, CSV (header row) or Parquet.

    Times may be integer or float epochs (seconds), Arrow timestamps/dates, or date strings. A row with an
    empty id or an unreadable time is a malformed line: named by file and line, or skipped and counted.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"input file not found: {path}")
    file_format = file_format or ("parquet" if path.name.endswith((".parquet", ".pq")) else "csv")
    wanted = [user_col, item_col, time_col] + ([rating_col] if rating_col else [])
    if file_format == "parquet":
        _check_columns(path, wanted, pq.read_schema(path).names)
        table = pq.read_table(path, columns=wanted)
    elif file_format == "csv":
        table = _read_csv_columns(path, bad, wanted, sep)
    else:
        raise ValueError(f"unknown input format {file_format!r} (expected csv or parquet)")

    epochs = _time_kind(table.column(time_col)) == "epoch"
    ts, bad_rows = _timestamps(table.column(time_col), epochs)
    for name in (user_col, item_col):
        bad_rows = bad_rows | _empty(table.column(name))
    if bad_rows.any():
        if file_format == "csv":
            # Re-read line by line with the same checks, so each bad row is named by its physical line.
            bad.forget(path)
            table = _read_csv_columns(path, bad, wanted, sep, row_check=_row_check(epochs))
            ts, _ = _timestamps(table.column(time_col), epochs)
        else:
            for row in np.flatnonzero(bad_rows):
                bad.report(path, None, f"data row {row + 1}: empty id or unreadable time")
            keep = pa.array(~bad_rows)
            table, ts = table.filter(keep), ts[~bad_rows]
    frame = pd.DataFrame({
        "user": _column_numpy(table.column(user_col)),
        "item": _column_numpy(table.column(item_col)),
        "ts": ts,
    })
    if rating_col:
        frame["rating"] = pc.cast(table.column(rating_col), pa.float64()).to_numpy()
    return RawLog(frame, None, [path])


def _check_columns(path: Path, wanted: list[str], present: list[str]) -> None:
    missing = [c for c in wanted if c not in present]
    if missing:
        raise BadInputError(path, 1, f"column(s) {missing} not found; the file has {present}")


def _read_csv_columns(path: Path, bad: BadLines, wanted: list[str], sep: str, row_check=None) -> pa.Table:
    header = _header(path, sep)
    _check_columns(path, wanted, header)
    # Ids stay strings (they are external ids); time/rating are typed later so dates also work.
    columns = {name: "string" for name in header}
    return read_delimited(path, sep=sep, header=True, quoted=True, bad=bad, columns=columns, keep=wanted,
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


def read_p5_sequences(path: Path, bad: BadLines, datamaps_path: Path | None = None) -> RawLog:
    """P5 ``sequential_data.txt``: ``user item item ...`` per line, time-ordered, no timestamps.

    The position inside the line becomes ``ts`` (0, 1, 2, ...), which keeps the order exact and makes
    temporal splits meaningless (recorded in the manifest). With ``datamaps.json`` the P5 numbers are
    mapped back to the external ids (reviewerID / asin).
    """
    users, items, positions = [], [], []
    with open_binary(path) as f:
        for line_no, text in numbered_lines(f, path, bad):
            tokens = text.split()
            if not tokens:
                continue
            if len(tokens) < 2 or not all(t.isdigit() for t in tokens):
                bad.report(path, line_no, "expected 'user item item ...' with integer ids", text)
                continue
            n = len(tokens) - 1
            users.extend([tokens[0]] * n)
            items.extend(tokens[1:])
            positions.extend(range(n))
    frame = pd.DataFrame({"user": users, "item": items, "ts": np.asarray(positions, dtype=np.int64)})
    files = [path]
    if datamaps_path is not None:
        with open_binary(datamaps_path) as f:
            maps = json.loads(f.read().decode("utf-8"))
        files.append(datamaps_path)
        if "id2user" in maps:
            frame["user"] = frame["user"].map(maps["id2user"]).fillna(frame["user"])
        if "id2item" in maps:
            frame["item"] = frame["item"].map(maps["id2item"]).fillna(frame["item"])
    return RawLog(frame, None, files, timestamps_are_positions=True)

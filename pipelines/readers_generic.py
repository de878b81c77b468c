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
    """A log with named user/item/time (and optional rating) columns, CSV (header row) or Parquet."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"input file not found: {path}")
    file_format = file_format or ("parquet" if path.name.endswith((".parquet", ".pq")) else "csv")
    wanted = [user_col, item_col, time_col] + ([rating_col] if rating_col else [])
    if file_format == "parquet":
        schema = pq.read_schema(path)
        _check_columns(path, wanted, schema.names)
        table = pq.read_table(path, columns=wanted)
    elif file_format == "csv":
        table = _read_csv_columns(path, bad, wanted, sep)
    else:
        raise ValueError(f"unknown input format {file_format!r} (expected csv or parquet)")
    frame = pd.DataFrame({
        "user": _column_numpy(table.column(user_col)),
        "item": _column_numpy(table.column(item_col)),
        "ts": _timestamps(path, table.column(time_col)),
    })
    if rating_col:
        frame["rating"] = pc.cast(table.column(rating_col), pa.float64()).to_numpy()
    if frame["user"].isna().any() or frame["item"].isna().any():
        row = int(np.flatnonzero(frame["user"].isna().to_numpy() | frame["item"].isna().to_numpy())[0])
        raise BadInputError(path, row + 2 if file_format == "csv" else None,
                            f"missing user/item id in data row {row + 1}")
    return RawLog(frame, None, [path])


def _check_columns(path: Path, wanted: list[str], present: list[str]) -> None:
    missing = [c for c in wanted if c not in present]
    if missing:
        raise BadInputError(path, 1, f"column(s) {missing} not found; the file has {present}")


def _read_csv_columns(path: Path, bad: BadLines, wanted: list[str], sep: str) -> pa.Table:
    header = _header(path, sep)
    _check_columns(path, wanted, header)
    # Ids stay strings (they are external ids); time/rating are typed later so dates also work.
    columns = {name: "string" for name in header}
    return read_delimited(path, sep=sep, header=True, quoted=True, bad=bad, columns=columns, keep=wanted)


def _header(path: Path, sep: str) -> list[str]:
    with open_binary(path) as f:
        first = f.readline().decode("utf-8").rstrip("\r\n")
    return [name.strip().strip('"') for name in first.split(sep)]


def _column_numpy(column: pa.ChunkedArray) -> np.ndarray:
    if pa.types.is_dictionary(column.type):
        column = pc.cast(column, column.type.value_type)
    return column.to_numpy(zero_copy_only=False)


def _timestamps(path: Path, column: pa.ChunkedArray) -> np.ndarray:
    """int64 seconds from integer/float epochs, Arrow timestamps/dates, or date strings."""
    kind = column.type
    if pa.types.is_integer(kind):
        return column.to_numpy().astype(np.int64, copy=False)
    if pa.types.is_floating(kind):
        return np.floor(column.to_numpy()).astype(np.int64)
    if pa.types.is_timestamp(kind) or pa.types.is_date(kind):
        return pc.cast(pc.cast(column, pa.timestamp("s")), pa.int64()).to_numpy()
    values = pd.Series(column.to_numpy(zero_copy_only=False))
    numeric = pd.to_numeric(values, errors="coerce")
    if numeric.notna().all():
        return np.floor(numeric.to_numpy(dtype=np.float64)).astype(np.int64)
    parsed = pd.to_datetime(values, errors="coerce", utc=True)
    if parsed.isna().any():
        row = int(np.flatnonzero(parsed.isna().to_numpy())[0])
        raise BadInputError(path, row + 2, f"timestamp {values.iloc[row]!r} is neither a number nor a date")
    return (parsed.astype("datetime64[s, UTC]").astype("int64")).to_numpy()


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

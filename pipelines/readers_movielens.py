"""Readers for the GroupLens MovieLens releases (100K, 1M/10M ``::`` .dat, 20M/25M/latest CSV)."""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd

from .errors import RawDataMissingError
from .rawio import BadLines, find_variant, numbered_lines, open_binary, read_delimited
from .rawlog import RawLog

ML100K_GENRES = [
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama",
    "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western",
]


def _require(directory: Path, *names: str) -> Path:
    for name in names:
        found = find_variant(directory, name)
        if found is not None:
            return found
    expected = " or ".join(f"{n}[.gz]" for n in names)
    raise RawDataMissingError(f"{expected} not found in {directory}")


def _ratings_frame(table) -> pd.DataFrame:
    frame = table.to_pandas()
    frame.columns = ["user", "item", "rating", "ts"]
    return frame[["user", "item", "ts", "rating"]]


def read_ml100k(directory: Path, bad: BadLines) -> RawLog:
    ratings_path = _require(directory, "u.data")
    table = read_delimited(ratings_path, sep="\t", bad=bad,
                           columns={"user": "int64", "item": "int64", "rating": "float64", "ts": "int64"})
    files = [ratings_path]
    items = None
    item_path = find_variant(directory, "u.item")
    if item_path is not None:
        files.append(item_path)

        def movie(fields):  # id | title | release date | video date | URL | 19 genre flags
            genres = "|".join(g for g, flag in zip(ML100K_GENRES, fields[5:]) if flag.strip() == "1")
            return int(fields[0]), fields[1], fields[2], genres

        # u.item is ISO-8859-1.
        items = _read_item_lines(item_path, bad, "latin-1", "|", 5 + len(ML100K_GENRES), movie,
                                 ["item_id", "title", "release_date", "genres"])
    return RawLog(_ratings_frame(table), _items_with_str_ids(items), files)


def read_ml_dat(directory: Path, bad: BadLines, allow_partial: bool = True) -> RawLog:
    """ML-1M / ML-10M: ``UserID::MovieID::Rating::Timestamp`` and ``MovieID::Title::Genres``."""
    warnings = []
    ratings_path = find_variant(directory, "ratings.dat")
    if ratings_path is None and allow_partial:
        ratings_path = find_variant(directory, "ratings_partial_users1-2999.dat")
        if ratings_path is not None:
            message = (f"warning: using {ratings_path.name}, a PARTIAL copy of ML-1M ratings (users 1-2999, "
                       "487,650 of 1,000,209 ratings); results are not comparable to published ML-1M numbers")
            print(message, file=sys.stderr)
            warnings.append(message)
    if ratings_path is None:
        raise RawDataMissingError(f"ratings.dat[.gz] not found in {directory}")
    table = read_delimited(ratings_path, sep="::", bad=bad,
                           columns={"user": "int64", "item": "int64", "rating": "float64", "ts": "int64"})
    files = [ratings_path]
    items = None
    movies_path = find_variant(directory, "movies.dat")
    if movies_path is not None:
        files.append(movies_path)
        items = _read_item_lines(movies_path, bad, _guess_encoding(movies_path), "::", 3,
                                 lambda f: (int(f[0]), f[1], f[2]), ["item_id", "title", "genres"])
    return RawLog(_ratings_frame(table), _items_with_str_ids(items), files, warnings)


def read_ml_csv(directory: Path, bad: BadLines) -> RawLog:
    """ML-20M / 25M / latest: ``ratings.csv`` and ``movies.csv`` with headers (titles quoted)."""
    ratings_path = _require(directory, "ratings.csv")
    table = read_delimited(ratings_path, sep=",", header=True, bad=bad,
                           columns={"user": "int64", "item": "int64", "rating": "float64", "ts": "int64"})
    files = [ratings_path]
    items = None
    movies_path = find_variant(directory, "movies.csv")
    if movies_path is not None:
        files.append(movies_path)
        movies = read_delimited(movies_path, sep=",", header=True, quoted=True, bad=bad,
                                columns={"item_id": "int64", "title": "string", "genres": "string"})
        items = movies.to_pandas()
    return RawLog(_ratings_frame(table), _items_with_str_ids(items), files)


def _read_item_lines(path: Path, bad: BadLines, encoding: str, sep: str, n_fields: int, make_row,
                     columns: list[str]) -> pd.DataFrame:
    """Movie metadata lines (``sep``-separated, first field the numeric id) → one row per movie."""
    rows = []
    with open_binary(path) as f:
        for line_no, text in numbered_lines(f, path, bad, encoding):
            if not text.strip():
                continue
            fields = text.split(sep)
            if len(fields) != n_fields or not fields[0].isdigit():
                bad.report(path, line_no, f"expected {n_fields} {sep!r}-separated fields starting with the id", text)
                continue
            rows.append(make_row(fields))
    return pd.DataFrame(rows, columns=columns)


def _guess_encoding(path: Path) -> str:
    """ML-1M is ISO-8859-1, ML-10M is UTF-8: take UTF-8 when the whole file decodes as UTF-8."""
    with open_binary(path) as f:
        data = f.read()
    try:
        data.decode("utf-8")
        return "utf-8"
    except UnicodeDecodeError:
        return "latin-1"


def _items_with_str_ids(items: pd.DataFrame | None) -> pd.DataFrame | None:
    if items is None:
        return None
    items = items.drop_duplicates("item_id", keep="first").copy()
    items["item_id"] = items["item_id"].astype(str)
    return items

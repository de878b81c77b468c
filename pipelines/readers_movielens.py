"""Readers for the GroupLens MovieLens releases (100K, 1M/10M ``::`` .dat, 20M/25M/latest CSV).

``plan_*`` find a release's files and name a parser per file (``pipelines.rawlog``); ``read_*`` run that plan
in process.
"""

from __future__ import annotations

import sys
from functools import partial
from pathlib import Path

import pandas as pd

from .errors import RawDataMissingError
from .rawio import BadLines, Lines, find_variant, open_binary, read_delimited
from .rawlog import FileSpec, RawLog, ReadPlan, read_plan

ML100K_GENRES = [
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama",
    "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western",
]
_RATING_COLUMNS = {"user": "int64", "item": "int64", "rating": "float64", "ts": "int64"}


def _require(directory: Path, *names: str) -> Path:
    for name in names:
        found = find_variant(directory, name)
        if found is not None:
            return found
    expected = " or ".join(f"{n}[.gz]" for n in names)
    raise RawDataMissingError(f"{expected} not found in {directory}")


def parse_ratings(lines: Lines, bad: BadLines, sep: str, header: bool = False) -> pd.DataFrame:
    """``user<sep>item<sep>rating<sep>timestamp`` rows (every release's ratings file)."""
    frame = read_delimited(lines, sep=sep, header=header, bad=bad, columns=_RATING_COLUMNS).to_pandas()
    frame.columns = ["user", "item", "rating", "ts"]
    return frame[["user", "item", "ts", "rating"]]


def parse_ml100k_items(lines: Lines, bad: BadLines) -> pd.DataFrame:
    """u.item (ISO-8859-1): id | title | release date | video date | URL | 19 genre flags."""
    def movie(fields):
        genres = "|".join(g for g, flag in zip(ML100K_GENRES, fields[5:]) if flag.strip() == "1")
        return int(fields[0]), fields[1], fields[2], genres

    return _item_lines(lines, bad, "latin-1", "|", 5 + len(ML100K_GENRES), movie,
                       ["item_id", "title", "release_date", "genres"])


def parse_dat_movies(lines: Lines, bad: BadLines, encoding: str) -> pd.DataFrame:
    """movies.dat: ``MovieID::Title::Genres``."""
    return _item_lines(lines, bad, encoding, "::", 3, lambda f: (int(f[0]), f[1], f[2]), ["item_id", "title", "genres"])


def parse_csv_movies(lines: Lines, bad: BadLines) -> pd.DataFrame:
    """movies.csv: ``movieId,title,genres`` with a header, titles quoted when they hold commas."""
    return read_delimited(lines, sep=",", header=True, quoted=True, bad=bad,
                          columns={"item_id": "int64", "title": "string", "genres": "string"}).to_pandas()


def _item_lines(lines: Lines, bad: BadLines, encoding: str, sep: str, n_fields: int, make_row,
                columns: list[str]) -> pd.DataFrame:
    """Movie metadata lines (``sep``-separated, first field the numeric id) → one row per movie."""
    rows = []
    for line_no, text in lines.numbered(bad, encoding):
        if not text.strip():
            continue
        fields = text.split(sep)
        if len(fields) != n_fields or not fields[0].isdigit():
            bad.report(lines.path, line_no, f"expected {n_fields} {sep!r}-separated fields starting with the id", text)
            continue
        rows.append(make_row(fields))
    return pd.DataFrame(rows, columns=columns)


def plan_ml100k(directory: Path) -> ReadPlan:
    items = find_variant(directory, "u.item")
    return ReadPlan(
        logs=[FileSpec(_require(directory, "u.data"), partial(parse_ratings, sep="\t"))],
        items=[FileSpec(items, parse_ml100k_items)] if items else [],
        item_columns={"title": "string", "release_date": "string", "genres": "string"}, has_rating=True)


def plan_ml_dat(directory: Path, allow_partial: bool = True) -> ReadPlan:
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
    movies = find_variant(directory, "movies.dat")
    return ReadPlan(
        logs=[FileSpec(ratings_path, partial(parse_ratings, sep="::"))],
        items=[FileSpec(movies, partial(parse_dat_movies, encoding=_guess_encoding(movies)))] if movies else [],
        item_columns={"title": "string", "genres": "string"}, has_rating=True, warnings=warnings)


def plan_ml_csv(directory: Path) -> ReadPlan:
    """ML-20M / 25M / latest: ``ratings.csv`` and ``movies.csv`` with headers (titles quoted)."""
    movies = find_variant(directory, "movies.csv")
    return ReadPlan(
        logs=[FileSpec(_require(directory, "ratings.csv"), partial(parse_ratings, sep=",", header=True))],
        items=[FileSpec(movies, parse_csv_movies)] if movies else [],
        item_columns={"title": "string", "genres": "string"}, has_rating=True)


def read_ml100k(directory: Path, bad: BadLines) -> RawLog:
    return read_plan(plan_ml100k(directory), bad)


def read_ml_dat(directory: Path, bad: BadLines, allow_partial: bool = True) -> RawLog:
    return read_plan(plan_ml_dat(directory, allow_partial), bad)


def read_ml_csv(directory: Path, bad: BadLines) -> RawLog:
    return read_plan(plan_ml_csv(directory), bad)


def _guess_encoding(path: Path) -> str:
    """ML-1M is ISO-8859-1, ML-10M is UTF-8: take UTF-8 when the whole file decodes as UTF-8 (decided once per file,
    before parsing, so every batch of the Spark engine decodes alike)."""
    with open_binary(path) as f:
        data = f.read()
    try:
        data.decode("utf-8")
        return "utf-8"
    except UnicodeDecodeError:
        return "latin-1"

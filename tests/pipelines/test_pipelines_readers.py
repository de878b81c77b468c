"""Raw readers on tiny fixtures in the exact raw formats (tests/fixtures/<format>/).

The fixtures are invented rows (6 users x 6 items, 33 events, every user and item with >= 5 events;
user 2 has two events with the same timestamp; generic/log.csv also holds one exact duplicate row).
Each reader is checked on its clean fixture, on a gzipped copy, and on copies with one malformed
line inserted (error policy: BadInputError naming the file and the 1-based line; skip policy: every
other row kept, one line counted).
"""

from __future__ import annotations

import csv
import gzip
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.errors import BadInputError, RawDataMissingError
from pipelines.rawio import BadLines
from pipelines.readers_amazon import read_amazon
from pipelines.readers_generic import read_p5_sequences, read_table_file
from pipelines.readers_movielens import read_ml100k, read_ml_csv, read_ml_dat

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"

N_EVENTS = 33
USERS_P5 = {1: "A1TESTUSER0001", 2: "A2TESTUSER0002", 3: "A3TESTUSER0003", 4: "AXTESTUSER0004",
            5: "A5TESTUSER0005", 6: "AZTESTUSER0006"}
ITEMS_P5 = {1: "B000TEST01", 2: "B000TEST02", 3: "B000TEST03", 4: "B000TEST04", 5: "B000TEST05", 6: "7000000006"}


def _amazon(directory, bad):
    return read_amazon(directory, bad, "Beauty", "beauty")


def _generic(directory, bad):
    path = directory / "log.csv"
    if not path.exists():
        path = directory / "log.csv.gz"
    return read_table_file(path, bad, user_col="user_id", item_col="item_id", time_col="timestamp",
                           rating_col="rating")


READERS = {
    "ml-100k": read_ml100k,
    "ml-1m": read_ml_dat,
    "ml-20m": read_ml_csv,
    "amazon-json": _amazon,
    "amazon-tsv": _amazon,
    "p5": _amazon,
    "generic": _generic,
}


def read_fixture(name: str, directory: Path | None = None, bad: BadLines | None = None):
    return READERS[name](directory or FIXTURES / name, bad or BadLines("error"))


def assert_same_log(got, want):
    pd.testing.assert_frame_equal(got.interactions.reset_index(drop=True), want.interactions.reset_index(drop=True))
    if want.items is None:
        assert got.items is None
    else:
        pd.testing.assert_frame_equal(got.items.reset_index(drop=True), want.items.reset_index(drop=True))
    assert got.timestamps_are_positions == want.timestamps_are_positions


def copy_fixture(name: str, dest: Path, gz: bool = False) -> Path:
    """Copy tests/fixtures/<name> into dest (each file gzipped with the gzip module when gz)."""
    dest.mkdir(parents=True, exist_ok=True)
    for src in sorted((FIXTURES / name).iterdir()):
        if gz:
            with open(src, "rb") as f_in, gzip.open(dest / f"{src.name}.gz", "wb") as f_out:
                shutil.copyfileobj(f_in, f_out)
        else:
            shutil.copy(src, dest / src.name)
    return dest


def insert_line(path: Path, line_no: int, raw: bytes) -> None:
    """Insert ``raw`` (one line, with its ending) so that it becomes 1-based line ``line_no``."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        lines = f.read().splitlines(keepends=True)
    assert 1 <= line_no <= len(lines) + 1
    lines.insert(line_no - 1, raw)
    with opener(path, "wb") as f:
        f.write(b"".join(lines))


def assert_names_line(exc: BadInputError, filename: str, line_no: int) -> None:
    message = str(exc)
    assert filename in message
    assert f", line {line_no}:" in message
    assert exc.line == line_no
    assert Path(exc.path).name == filename


# ---------------------------------------------------------------------------------------------------
# Fixture sanity: every dataset is a 5-core as written (other tests build datasets from them).


@pytest.mark.parametrize("name", list(READERS))
def test_fixture_is_five_core_with_equal_timestamp_pair(name):
    frame = read_fixture(name).interactions
    assert frame.groupby("user").size().min() >= 5
    assert frame.groupby("item").size().min() >= 5
    assert frame["user"].nunique() == 6 and frame["item"].nunique() == 6
    if name == "p5":
        return  # positions as timestamps: no ties by construction
    # at least one user has two different items at the same timestamp
    same = frame.drop_duplicates(["user", "item", "ts"]).groupby(["user", "ts"]).size()
    assert (same >= 2).any()


# ---------------------------------------------------------------------------------------------------
# MovieLens


def test_ml100k_ratings_and_items():
    log = read_fixture("ml-100k")
    frame = log.interactions
    assert list(frame.columns) == ["user", "item", "ts", "rating"]
    assert [str(t) for t in frame.dtypes] == ["int64", "int64", "int64", "float64"]
    assert len(frame) == N_EVENTS
    # source order kept (u.data is not sorted): compare with an independent parse of the file
    oracle = pd.read_csv(FIXTURES / "ml-100k/u.data", sep="\t", names=["user", "item", "rating", "ts"])
    np.testing.assert_array_equal(frame[["user", "item", "ts", "rating"]].to_numpy(),
                                  oracle[["user", "item", "ts", "rating"]].to_numpy())
    assert frame.iloc[0].tolist() == [2, 1, 874201259, 5.0]
    assert frame.iloc[1].tolist() == [1, 1, 874100611, 5.0]
    # items: latin-1 titles decoded, genre flags turned into names, ids as str
    items = log.items.set_index("item_id")
    assert list(items.index) == ["1", "2", "3", "4", "5", "6"]
    assert items.loc["3", "title"] == "Café Noir (1994)"
    assert items.loc["5", "title"] == "Château Rouge (1993)"
    assert items.loc["1", "genres"] == "Animation|Children's|Comedy"
    assert items.loc["6", "genres"] == "Western"
    assert items.loc["4", "release_date"] == "14-Feb-1996"
    assert [p.name for p in log.files] == ["u.data", "u.item"]


def test_ml1m_dat_latin1_titles_and_order():
    log = read_fixture("ml-1m")
    frame = log.interactions
    assert list(frame.columns) == ["user", "item", "ts", "rating"]
    assert [str(t) for t in frame.dtypes] == ["int64", "int64", "int64", "float64"]
    assert len(frame) == N_EVENTS
    # ratings.dat is grouped by user but not time-sorted inside a user: the file order is kept
    assert frame.iloc[:3].values.tolist() == [[1, 17, 978301083, 3.0], [1, 1, 978300523, 5.0],
                                              [1, 73, 978301680, 4.0]]
    with open(FIXTURES / "ml-1m/ratings.dat") as f:
        oracle = [[int(v) for v in line.strip().split("::")] for line in f]
    assert frame[["user", "item", "rating", "ts"]].astype("int64").values.tolist() == oracle
    # movies.dat is ISO-8859-1 (the raw bytes are not UTF-8)
    raw = (FIXTURES / "ml-1m/movies.dat").read_bytes()
    assert "Misérables".encode("latin-1") in raw
    items = log.items.set_index("item_id")
    assert items.loc["73", "title"] == "Misérables, Les (1995)"
    assert items.loc["2858", "title"] == "Américain, L' (1999)"
    assert items.loc["648", "title"] == "Mission: Unlikely (1996)"  # a single ':' inside a title
    assert items.loc["73", "genres"] == "Drama|Musical"
    assert "3000" in items.index  # unrated movies are kept in the item table
    assert log.warnings == []


def test_ml10m_style_utf8_movies_dat(tmp_path):
    directory = copy_fixture("ml-1m", tmp_path / "ml")
    text = (FIXTURES / "ml-1m/movies.dat").read_bytes().decode("latin-1")
    (directory / "movies.dat").write_bytes(text.encode("utf-8"))
    items = read_ml_dat(directory, BadLines()).items.set_index("item_id")
    assert items.loc["73", "title"] == "Misérables, Les (1995)"


def test_ml1m_partial_ratings_file_gives_warning(tmp_path):
    directory = tmp_path / "ml"
    directory.mkdir()
    shutil.copy(FIXTURES / "ml-1m/ratings.dat", directory / "ratings_partial_users1-2999.dat")
    log = read_ml_dat(directory, BadLines())
    assert len(log.interactions) == N_EVENTS
    assert log.warnings and "PARTIAL" in log.warnings[0]
    with pytest.raises(RawDataMissingError):
        read_ml_dat(directory, BadLines(), allow_partial=False)


def test_ml20m_csv_quoted_titles():
    log = read_fixture("ml-20m")
    frame = log.interactions
    assert list(frame.columns) == ["user", "item", "ts", "rating"]
    assert [str(t) for t in frame.dtypes] == ["int64", "int64", "int64", "float64"]
    assert len(frame) == N_EVENTS
    oracle = pd.read_csv(FIXTURES / "ml-20m/ratings.csv")
    np.testing.assert_array_equal(frame["user"], oracle["userId"])
    np.testing.assert_array_equal(frame["item"], oracle["movieId"])
    np.testing.assert_array_equal(frame["ts"], oracle["timestamp"])
    np.testing.assert_array_equal(frame["rating"], oracle["rating"])
    assert 0.5 in set(frame["rating"])  # half stars
    items = log.items.set_index("item_id")
    assert len(items) == 6
    assert items.loc["11", "title"] == "American Vice President, The (1995)"
    assert items.loc["11", "genres"] == "Comedy|Drama|Romance"
    assert items.loc["47", "title"] == 'Seven Sins, The (a.k.a. "Se7en Sins") (1995)'
    assert items.loc["32", "title"] == "Twelve Ravens (a.k.a. 12 Ravens) (1995)"


# ---------------------------------------------------------------------------------------------------
# Amazon


def test_amazon_2014_reviews_and_python_literal_meta():
    log = read_fixture("amazon-json")
    frame = log.interactions
    assert list(frame.columns) == ["user", "item", "ts", "rating"]
    assert pd.api.types.is_string_dtype(frame["user"]) and pd.api.types.is_string_dtype(frame["item"])
    assert str(frame["ts"].dtype) == "int64" and str(frame["rating"].dtype) == "float64"
    with open(FIXTURES / "amazon-json/reviews_Beauty_5.json") as f:
        records = [json.loads(line) for line in f]
    assert len(frame) == len(records) == N_EVENTS
    assert frame["user"].tolist() == [r["reviewerID"] for r in records]
    assert frame["item"].tolist() == [r["asin"] for r in records]
    assert frame["ts"].tolist() == [r["unixReviewTime"] for r in records]
    assert frame["rating"].tolist() == [r["overall"] for r in records]
    assert (frame["ts"] % 86400 == 0).all()  # day resolution, as in the real data
    # the meta lines are Python dict literals, not JSON
    first_meta = (FIXTURES / "amazon-json/meta_Beauty.json").read_text().splitlines()[0]
    assert first_meta.startswith("{'asin': ")
    items = log.items.set_index("item_id")
    assert sorted(items.index) == sorted(ITEMS_P5.values())  # B000UNUSED (never reviewed) dropped
    assert items.loc["B000TEST01", "title"] == "Rosewater Face Wash, 8 oz"
    assert items.loc["B000TEST01", "brand"] == "Petalia"
    assert items.loc["B000TEST01", "categories"] == "Beauty > Skin Care > Face > Cleansers"
    assert items.loc["B000TEST01", "price"] == pytest.approx(15.99)
    assert items.loc["B000TEST02", "title"] == "Burt's Honey Lip Balm"
    assert items.loc["B000TEST02", "categories"] == "Beauty > Skin Care > Lips | Health & Personal Care"
    assert np.isnan(items.loc["B000TEST03", "price"])  # no price in the record
    assert items.loc["B000TEST04", "brand"] == ""  # no brand in the record
    assert items.loc["7000000006", "title"] == "Perfume Sampler été"
    assert str(items["price"].dtype) == "float64"
    assert [p.name for p in log.files] == ["reviews_Beauty_5.json", "meta_Beauty.json"]


def test_amazon_tsv_and_items_jsonl():
    log = read_fixture("amazon-tsv")
    frame = log.interactions
    assert list(frame.columns) == ["user", "item", "ts"]
    assert pd.api.types.is_string_dtype(frame["user"]) and pd.api.types.is_string_dtype(frame["item"])
    assert str(frame["ts"].dtype) == "int64"
    oracle = pd.read_csv(FIXTURES / "amazon-tsv/beauty_5core_interactions.tsv", sep="\t", dtype={"item_id": str})
    assert len(frame) == len(oracle) == N_EVENTS
    assert frame["user"].tolist() == oracle["user_id"].tolist()
    assert frame["item"].tolist() == oracle["item_id"].tolist()
    assert frame["ts"].tolist() == oracle["timestamp"].tolist()
    assert frame["item"].iloc[-1] == "B000TEST05" and "7000000006" in set(frame["item"])  # digit asin stays str
    items = log.items.set_index("item_id")
    assert list(items.index) == [ITEMS_P5[i] for i in range(1, 7)]
    assert items.loc["B000TEST01", "categories"] == "Beauty > Skin Care > Face > Cleansers"
    assert np.isnan(items.loc["B000TEST03", "price"])  # "price": null
    assert items.loc["B000TEST04", "brand"] == "Unknown"
    assert items.loc["B000TEST05", "title"] == ""
    assert items.loc["7000000006", "title"] == "Perfume Sampler été"
    assert items.loc["B000TEST02", "price"] == pytest.approx(3.0)


def test_p5_sequences_crlf_with_datamaps():
    raw = (FIXTURES / "p5/sequential_data.txt").read_bytes()
    assert raw.count(b"\r\n") == 6  # CRLF endings, as in the real Beauty copy
    log = read_fixture("p5")
    assert log.timestamps_are_positions
    frame = log.interactions
    assert list(frame.columns) == ["user", "item", "ts"]
    assert str(frame["ts"].dtype) == "int64"
    assert len(frame) == N_EVENTS
    assert not frame["item"].str.contains("\r").any()
    assert set(frame["user"]) == set(USERS_P5.values())
    assert set(frame["item"]) == set(ITEMS_P5.values())
    # positions restart at 0 for each user and follow the line order
    for _, group in frame.groupby("user", sort=False):
        assert group["ts"].tolist() == list(range(len(group)))
    user2 = frame[frame["user"] == USERS_P5[2]]["item"].tolist()
    assert user2 == [ITEMS_P5[i] for i in (2, 1, 3, 4, 6, 5)]
    assert [p.name for p in log.files] == ["sequential_data.txt", "datamaps.json"]
    # the same events, in the same order, as the TSV form of the same (invented) data
    tsv = read_fixture("amazon-tsv").interactions
    assert frame["user"].tolist() == tsv["user"].tolist()
    assert frame["item"].tolist() == tsv["item"].tolist()


def test_p5_sequences_without_datamaps_keep_p5_numbers():
    log = read_p5_sequences(FIXTURES / "p5/sequential_data.txt", BadLines())
    assert log.timestamps_are_positions
    frame = log.interactions
    assert len(frame) == N_EVENTS
    assert frame["user"].iloc[0] == "1" and frame["item"].tolist()[:6] == ["1", "2", "3", "4", "5", "6"]
    with_maps = read_p5_sequences(FIXTURES / "p5/sequential_data.txt", BadLines(), FIXTURES / "p5/datamaps.json")
    assert with_maps.interactions["user"].iloc[0] == USERS_P5[1]
    assert with_maps.interactions["item"].tolist()[:6] == [ITEMS_P5[i] for i in range(1, 7)]


def test_amazon_prefers_2014_reviews_then_tsv_then_p5(tmp_path):
    directory = tmp_path / "all"
    for name in ("p5", "amazon-tsv", "amazon-json"):
        copy_fixture(name, directory)
    assert read_amazon(directory, BadLines(), "Beauty", "beauty").files[0].name == "reviews_Beauty_5.json"
    (directory / "reviews_Beauty_5.json").unlink()
    assert read_amazon(directory, BadLines(), "Beauty", "beauty").files[0].name == "beauty_5core_interactions.tsv"
    (directory / "beauty_5core_interactions.tsv").unlink()
    assert read_amazon(directory, BadLines(), "Beauty", "beauty").files[0].name == "sequential_data.txt"
    (directory / "sequential_data.txt").unlink()
    with pytest.raises(RawDataMissingError, match="reviews_Beauty_5.json"):
        read_amazon(directory, BadLines(), "Beauty", "beauty")


# ---------------------------------------------------------------------------------------------------
# Generic CSV / Parquet


def test_generic_csv_log():
    log = read_fixture("generic")
    frame = log.interactions
    assert list(frame.columns) == ["user", "item", "ts", "rating"]
    assert str(frame["ts"].dtype) == "int64" and str(frame["rating"].dtype) == "float64"
    with open(FIXTURES / "generic/log.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(frame) == len(rows) == N_EVENTS + 1  # one exact duplicate row is kept by the reader
    assert frame["user"].tolist() == [r["user_id"] for r in rows]
    assert frame["item"].tolist() == [r["item_id"] for r in rows]
    assert frame["ts"].tolist() == [int(r["timestamp"]) for r in rows]
    assert frame["rating"].tolist() == [float(r["rating"]) for r in rows]
    assert frame.duplicated().sum() == 1
    assert log.items is None


def _generic_with_times(tmp_path, times, name="dates.csv") -> Path:
    with open(FIXTURES / "generic/log.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    path = tmp_path / name
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        for row, when in zip(rows, times):
            writer.writerow({**row, "timestamp": when})
    return path


def _epochs():
    return read_fixture("generic").interactions["ts"].to_numpy()


@pytest.mark.parametrize("style", ["space", "iso_t_z", "iso_offset"])
def test_generic_csv_date_string_timestamps(tmp_path, style):
    epochs = _epochs()
    stamps = pd.to_datetime(epochs, unit="s", utc=True)
    if style == "space":
        times = stamps.strftime("%Y-%m-%d %H:%M:%S")
    elif style == "iso_t_z":
        times = stamps.strftime("%Y-%m-%dT%H:%M:%SZ")
    else:  # same instants written in UTC+02:00
        times = (stamps.tz_convert("Etc/GMT-2")).strftime("%Y-%m-%dT%H:%M:%S+02:00")
    path = _generic_with_times(tmp_path, list(times))
    frame = read_table_file(path, BadLines(), user_col="user_id", item_col="item_id", time_col="timestamp").interactions
    assert str(frame["ts"].dtype) == "int64"
    np.testing.assert_array_equal(frame["ts"].to_numpy(), epochs)
    assert "rating" not in frame.columns


def test_generic_csv_float_timestamps_are_floored(tmp_path):
    epochs = _epochs()
    path = _generic_with_times(tmp_path, [f"{t}.75" for t in epochs])
    frame = read_table_file(path, BadLines(), user_col="user_id", item_col="item_id", time_col="timestamp").interactions
    np.testing.assert_array_equal(frame["ts"].to_numpy(), epochs)


def test_generic_parquet(tmp_path):
    want = read_fixture("generic").interactions
    epochs = want["ts"].to_numpy()
    table = pa.table({
        "uid": pa.array([int(u[1:]) for u in want["user"]], pa.int64()),
        "iid": pa.array(want["item"].tolist(), pa.string()).dictionary_encode(),
        "when": pa.array(epochs, pa.int64()),
        "stars": pa.array(want["rating"].to_numpy(), pa.float32()),
        "extra": pa.array(["x"] * len(want)),
    })
    path = tmp_path / "log.parquet"
    pq.write_table(table, path)
    frame = read_table_file(path, BadLines(), user_col="uid", item_col="iid", time_col="when",
                            rating_col="stars").interactions
    assert list(frame.columns) == ["user", "item", "ts", "rating"]
    assert frame["user"].tolist() == [int(u[1:]) for u in want["user"]]
    assert frame["item"].tolist() == want["item"].tolist()
    np.testing.assert_array_equal(frame["ts"].to_numpy(), epochs)
    assert str(frame["ts"].dtype) == "int64" and str(frame["rating"].dtype) == "float64"
    np.testing.assert_allclose(frame["rating"].to_numpy(), want["rating"].to_numpy())

    # Arrow timestamp (whole seconds) and float epochs also work
    as_time = table.set_column(2, "when", pa.array(epochs * 1000, pa.int64()).cast(pa.timestamp("ms")))
    pq.write_table(as_time, tmp_path / "time.parquet")
    got = read_table_file(tmp_path / "time.parquet", BadLines(), user_col="uid", item_col="iid", time_col="when")
    np.testing.assert_array_equal(got.interactions["ts"].to_numpy(), epochs)
    as_float = table.set_column(2, "when", pa.array(epochs + 0.5, pa.float64()))
    pq.write_table(as_float, tmp_path / "float.pq")
    got = read_table_file(tmp_path / "float.pq", BadLines(), user_col="uid", item_col="iid", time_col="when")
    np.testing.assert_array_equal(got.interactions["ts"].to_numpy(), epochs)
    # epochs as text and dates as text: the kind is decided from the first rows of the column
    as_text = table.set_column(2, "when", pa.array([str(t) for t in epochs], pa.string()))
    pq.write_table(as_text, tmp_path / "text.parquet")
    got = read_table_file(tmp_path / "text.parquet", BadLines(), user_col="uid", item_col="iid", time_col="when")
    np.testing.assert_array_equal(got.interactions["ts"].to_numpy(), epochs)
    dates = pd.to_datetime(epochs, unit="s", utc=True).strftime("%Y-%m-%dT%H:%M:%SZ")
    pq.write_table(table.set_column(2, "when", pa.array(list(dates), pa.string())), tmp_path / "dates.parquet")
    got = read_table_file(tmp_path / "dates.parquet", BadLines(), user_col="uid", item_col="iid", time_col="when")
    np.testing.assert_array_equal(got.interactions["ts"].to_numpy(), epochs)


def test_generic_input_directory_and_glob_read_parts_in_path_order(tmp_path):
    lines = (FIXTURES / "generic" / "log.csv").read_text().splitlines()
    parts = tmp_path / "parts"
    parts.mkdir()
    for i, chunk in enumerate([lines[1:12], lines[12:25], lines[25:]]):
        (parts / f"part-{i}.csv").write_text("\n".join([lines[0], *chunk]) + "\n")
    (parts / "_SUCCESS").write_text("")
    (parts / ".part-0.csv.crc").write_text("x")
    options = dict(user_col="user_id", item_col="item_id", time_col="timestamp", rating_col="rating")
    whole = read_table_file(FIXTURES / "generic" / "log.csv", BadLines(), **options)
    for source in (parts, parts / "part-*.csv"):
        got = read_table_file(source, BadLines(), **options)
        pd.testing.assert_frame_equal(got.interactions, whole.interactions)
        assert [p.name for p in got.files] == ["part-0.csv", "part-1.csv", "part-2.csv"]
    (parts / "part-3.csv").write_text("item_id,user_id,rating,timestamp,comment\n")
    with pytest.raises(BadInputError, match="header differs"):
        read_table_file(parts, BadLines(), **options)
    with pytest.raises(FileNotFoundError, match="input file not found"):
        read_table_file(tmp_path / "nothing-*.csv", BadLines(), **options)


def test_generic_missing_column_lists_present_columns(tmp_path):
    with pytest.raises(BadInputError) as info:
        read_table_file(FIXTURES / "generic/log.csv", BadLines(), user_col="user_id", item_col="asin",
                        time_col="timestamp")
    message = str(info.value)
    assert "log.csv" in message and "'asin'" in message
    for column in ("user_id", "item_id", "rating", "timestamp", "comment"):
        assert f"'{column}'" in message
    pq.write_table(pa.table({"u": [1], "i": [2], "t": [3]}), tmp_path / "x.parquet")
    with pytest.raises(BadInputError) as info:
        read_table_file(tmp_path / "x.parquet", BadLines(), user_col="u", item_col="i", time_col="time")
    assert "x.parquet" in str(info.value) and "['u', 'i', 't']" in str(info.value)


def test_generic_missing_file_and_unknown_format(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_table_file(tmp_path / "nope.csv", BadLines(), user_col="u", item_col="i", time_col="t")
    with pytest.raises(ValueError, match="unknown input format"):
        read_table_file(FIXTURES / "generic/log.csv", BadLines(), user_col="user_id", item_col="item_id",
                        time_col="timestamp", file_format="xlsx")


def test_generic_csv_other_separator(tmp_path):
    text = (FIXTURES / "generic/log.csv").read_text()
    rows = list(csv.reader(text.splitlines()))
    path = tmp_path / "log.tsv"
    path.write_text("".join("\t".join(row) + "\n" for row in rows))
    frame = read_table_file(path, BadLines(), user_col="user_id", item_col="item_id", time_col="timestamp",
                            sep="\t").interactions
    pd.testing.assert_frame_equal(frame, read_fixture("generic").interactions[["user", "item", "ts"]])


# ---------------------------------------------------------------------------------------------------
# gzip and CRLF


@pytest.mark.parametrize("name", list(READERS))
def test_gzipped_copy_reads_identically(tmp_path, name):
    directory = copy_fixture(name, tmp_path / name, gz=True)
    assert all(p.suffix == ".gz" for p in directory.iterdir())
    got = read_fixture(name, directory)
    assert_same_log(got, read_fixture(name))
    assert all(p.suffix == ".gz" for p in got.files)


@pytest.mark.parametrize("name", ["ml-100k", "ml-1m", "ml-20m", "amazon-json", "amazon-tsv", "generic"])
def test_crlf_copy_reads_identically(tmp_path, name):
    directory = copy_fixture(name, tmp_path / name)
    for path in directory.iterdir():
        data = path.read_bytes()
        path.write_bytes(data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n"))
    assert_same_log(read_fixture(name, directory), read_fixture(name))


def test_p5_lf_copy_reads_identically(tmp_path):
    directory = copy_fixture("p5", tmp_path / "p5")
    path = directory / "sequential_data.txt"
    path.write_bytes(path.read_bytes().replace(b"\r\n", b"\n"))
    assert_same_log(read_fixture("p5", directory), read_fixture("p5"))


# ---------------------------------------------------------------------------------------------------
# One malformed line: error names file and line; skip keeps all other rows and counts one line.

MALFORMED = [
    # (reader, file, 1-based line the bad line becomes, bad line bytes)
    pytest.param("ml-100k", "u.data", 5, b"7\t3\t4\n", id="ml100k-data-field-count"),
    pytest.param("ml-100k", "u.data", 12, b"7\t3\t4\t87420abc\n", id="ml100k-data-ts-not-int"),
    pytest.param("ml-100k", "u.data", 1, b"7\t3\t4\t874201259.5\n", id="ml100k-data-ts-float-first-line"),
    pytest.param("ml-100k", "u.data", 34, b"7\t3\t4\t8742\xff1259\n", id="ml100k-data-undecodable-last-line"),
    pytest.param("ml-100k", "u.item", 3, b"7|Short Line (1995)|01-Jan-1995\n", id="ml100k-item-field-count"),
    pytest.param("ml-100k", "u.item", 7, b"x7|Bad Id (1995)|01-Jan-1995||http://x|" + b"|".join([b"0"] * 19) + b"\n",
                 id="ml100k-item-bad-id"),
    pytest.param("ml-1m", "ratings.dat", 2, b"7::3::4\n", id="ml1m-ratings-field-count"),
    pytest.param("ml-1m", "ratings.dat", 20, b"7::3::4::97830abc\n", id="ml1m-ratings-ts-not-int"),
    pytest.param("ml-1m", "ratings.dat", 34, b"7::3::\xff::978300000\n", id="ml1m-ratings-undecodable"),
    pytest.param("ml-1m", "ratings.dat", 9, b"7::3::4::978300000::9\n", id="ml1m-ratings-extra-field"),
    pytest.param("ml-1m", "movies.dat", 4, b"9999::No Genres Here (1999)\n", id="ml1m-movies-field-count"),
    pytest.param("ml-20m", "ratings.csv", 2, b"7,3,4.0\n", id="ml20m-ratings-field-count"),
    pytest.param("ml-20m", "ratings.csv", 17, b"7,3,4.0,1112abc\n", id="ml20m-ratings-ts-not-int"),
    pytest.param("ml-20m", "ratings.csv", 30, b"7,3,4.0,111\xff2\n", id="ml20m-ratings-undecodable"),
    pytest.param("ml-20m", "movies.csv", 5, b"99,Only A Title (1999)\n", id="ml20m-movies-field-count"),
    pytest.param("ml-20m", "movies.csv", 3, b"9x,Bad Id (1999),Drama\n", id="ml20m-movies-bad-id"),
    pytest.param("amazon-json", "reviews_Beauty_5.json", 7,
                 b'{"reviewerID": "A9", "asin": "B000TEST01", "overall": 5.0, "unixReviewTime": 12\n',
                 id="amazon-reviews-broken-json"),
    pytest.param("amazon-json", "reviews_Beauty_5.json", 12,
                 b'{"reviewerID": "A9", "asin": "B000TEST01", "overall": 5.0, "unixReviewTime": "soon"}\n',
                 id="amazon-reviews-ts-not-int"),
    pytest.param("amazon-json", "reviews_Beauty_5.json", 1,
                 b'{"reviewerID": "A9", "asin": "B000TEST01", "overall": 5.0}\n', id="amazon-reviews-no-ts"),
    pytest.param("amazon-json", "reviews_Beauty_5.json", 20,
                 b'{"reviewerID": "A9\xff", "asin": "B000TEST01", "overall": 5.0, "unixReviewTime": 1299456000}\n',
                 id="amazon-reviews-undecodable"),
    pytest.param("amazon-json", "meta_Beauty.json", 3, b"{'asin': 'B000TEST02', 'title': 'Broken\n",
                 id="amazon-meta-broken-literal"),
    pytest.param("amazon-json", "meta_Beauty.json", 5, b"{'title': 'No asin at all', 'price': 1.0}\n",
                 id="amazon-meta-no-asin"),
    pytest.param("amazon-json", "meta_Beauty.json", 8, b"{'asin': 'B000TEST03', 'title': 'Bad \xff byte'}\n",
                 id="amazon-meta-undecodable"),
    pytest.param("amazon-tsv", "beauty_5core_interactions.tsv", 2, b"A9\tB000TEST01\t1299715200\n",
                 id="amazon-tsv-field-count"),
    pytest.param("amazon-tsv", "beauty_5core_interactions.tsv", 15, b"A9\tB000TEST01\tyesterday\t9\t1\n",
                 id="amazon-tsv-ts-not-int"),
    pytest.param("amazon-tsv", "beauty_5core_interactions.tsv", 35, b"A9\xff\tB000TEST01\t1299715200\t9\t1\n",
                 id="amazon-tsv-undecodable"),
    pytest.param("amazon-tsv", "beauty_items.jsonl", 4, b'{"item_id": "B000TEST09", "title": \n',
                 id="amazon-items-broken-json"),
    pytest.param("amazon-tsv", "beauty_items.jsonl", 2, b'["not", "an", "object"]\n', id="amazon-items-not-object"),
    pytest.param("p5", "sequential_data.txt", 3, b"7 3 x 4\r\n", id="p5-non-integer-id"),
    pytest.param("p5", "sequential_data.txt", 7, b"7\r\n", id="p5-user-without-items"),
    pytest.param("p5", "sequential_data.txt", 1, b"7 3 \xff\r\n", id="p5-undecodable"),
    pytest.param("generic", "log.csv", 2, b"u9,item-1,4.0\n", id="generic-field-count"),
    pytest.param("generic", "log.csv", 20, b"u9,item-1,4.0,1600000000,ok,extra\n", id="generic-extra-field"),
    pytest.param("generic", "log.csv", 35, b"u9,item-\xff,4.0,1600000000,ok\n", id="generic-undecodable"),
    pytest.param("generic", "log.csv", 11, b'u9,item-1,4.0,1600000000,"unclosed, quote\n', id="generic-unclosed-quote"),
    # here the swallowed field leaves a row with too few fields, so the line is caught
    pytest.param("ml-20m", "movies.csv", 3, b'99,"Unclosed, title (1999),Drama\n', id="ml20m-movies-unclosed-quote"),
]


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gz"])
@pytest.mark.parametrize(("name", "filename", "line_no", "raw"), MALFORMED)
def test_malformed_line_error_names_file_and_line(tmp_path, name, filename, line_no, raw, gz):
    directory = copy_fixture(name, tmp_path / name, gz=gz)
    target = directory / (f"{filename}.gz" if gz else filename)
    insert_line(target, line_no, raw)
    with pytest.raises(BadInputError) as info:
        read_fixture(name, directory, BadLines("error"))
    assert_names_line(info.value, target.name, line_no)


@pytest.mark.parametrize(("name", "filename", "line_no", "raw"), MALFORMED)
def test_malformed_line_skip_keeps_other_rows(tmp_path, name, filename, line_no, raw):
    directory = copy_fixture(name, tmp_path / name)
    insert_line(directory / filename, line_no, raw)
    bad = BadLines("skip")
    got = read_fixture(name, directory, bad)
    assert_same_log(got, read_fixture(name))
    assert bad.skipped == {filename: 1}
    assert bad.total == 1
    assert bad.examples == {filename: [line_no]}


def test_skip_counts_several_lines_per_file(tmp_path, capsys):
    directory = copy_fixture("ml-100k", tmp_path / "ml")
    insert_line(directory / "u.data", 3, b"1\t2\n")
    insert_line(directory / "u.data", 10, b"1\t2\t3\tfour\n")
    insert_line(directory / "u.item", 1, b"broken\n")
    bad = BadLines("skip")
    assert_same_log(read_ml100k(directory, bad), read_fixture("ml-100k"))
    assert bad.skipped == {"u.data": 2, "u.item": 1} and bad.total == 3
    assert bad.examples["u.data"] == [3, 10]
    bad.print_summary()
    assert "skipped 2 malformed line(s) in u.data (first lines: 3, 10)" in capsys.readouterr().err


def test_blank_lines_are_not_malformed(tmp_path):
    directory = copy_fixture("ml-1m", tmp_path / "ml")
    insert_line(directory / "ratings.dat", 5, b"\n")
    bad = BadLines("skip")
    assert_same_log(read_ml_dat(directory, bad), read_fixture("ml-1m"))
    assert bad.total == 0


def test_bad_lines_policy_is_validated():
    with pytest.raises(ValueError, match="on_bad_lines"):
        BadLines("warn")


# ---------------------------------------------------------------------------------------------------
# Edge cases that were reader bugs once (each fixed; keep them fixed).


def _generic_text(tmp_path, text: str, name: str = "log.csv") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_generic_unclosed_quote_does_not_swallow_rest_of_file(tmp_path):
    path = _generic_text(tmp_path, 'u,i,t,c\na,x,1,ok\nb,y,2,"unclosed, quote\nc,z,3,ok\nd,w,4,ok\n')
    with pytest.raises(BadInputError) as info:
        read_table_file(path, BadLines(), user_col="u", item_col="i", time_col="t")
    assert_names_line(info.value, "log.csv", 3)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_generic_bad_epoch_timestamp_names_its_line(tmp_path):
    path = _generic_text(tmp_path, "u,i,t\na,x,1600000000\nb,y,1600000001\nb,y,zzz\nc,z,1600000003\n")
    with pytest.raises(BadInputError) as info:
        read_table_file(path, BadLines(), user_col="u", item_col="i", time_col="t")
    assert_names_line(info.value, "log.csv", 4)


def test_generic_bad_timestamp_is_skipped_with_skip_policy(tmp_path):
    path = _generic_text(tmp_path, "u,i,t\na,x,2020-01-01\nb,y,zzz\nc,z,2020-01-03\n")
    bad = BadLines("skip")
    frame = read_table_file(path, bad, user_col="u", item_col="i", time_col="t").interactions
    assert frame["user"].tolist() == ["a", "c"]
    assert bad.skipped == {"log.csv": 1}


@pytest.mark.parametrize("before", [b"\n", b"b,y\n"], ids=["blank-line", "skipped-line"])
def test_generic_bad_timestamp_line_number_after_dropped_lines(tmp_path, before):
    path = tmp_path / "log.csv"
    path.write_bytes(b"u,i,t\na,x,2020-01-01\n" + before + b"b,y,zzz\nc,z,2020-01-03\n")
    bad = BadLines("skip")
    frame = read_table_file(path, bad, user_col="u", item_col="i", time_col="t").interactions
    assert frame["user"].tolist() == ["a", "c"]
    assert bad.examples["log.csv"] == ([4] if before == b"\n" else [3, 4])
    if before == b"\n":
        with pytest.raises(BadInputError) as info:
            read_table_file(path, BadLines(), user_col="u", item_col="i", time_col="t")
        assert_names_line(info.value, "log.csv", 4)


def test_generic_empty_item_id_is_rejected(tmp_path):
    path = _generic_text(tmp_path, "u,i,t\na,x,1\nb,,2\n")
    with pytest.raises(BadInputError) as info:
        read_table_file(path, BadLines(), user_col="u", item_col="i", time_col="t")
    assert_names_line(info.value, "log.csv", 3)


def test_generic_parquet_subsecond_timestamps(tmp_path):
    times = pa.array([1577836800_500000, 1577923200_000000], pa.timestamp("us"))
    pq.write_table(pa.table({"u": [1, 2], "i": [3, 4], "t": times}), tmp_path / "s.parquet")
    frame = read_table_file(tmp_path / "s.parquet", BadLines(), user_col="u", item_col="i", time_col="t").interactions
    assert frame["ts"].tolist() == [1577836800, 1577923200]


def test_generic_csv_with_utf8_bom(tmp_path):
    path = tmp_path / "bom.csv"
    path.write_bytes("\ufeffu,i,t\na,x,1\nb,y,2\n".encode("utf-8"))
    frame = read_table_file(path, BadLines(), user_col="u", item_col="i", time_col="t").interactions
    assert frame["user"].tolist() == ["a", "b"]


def test_generic_mixed_iso_date_strings(tmp_path):
    path = _generic_text(tmp_path, "u,i,t\na,x,2020-01-05\nb,y,2020-01-05 10:00:00\n")
    frame = read_table_file(path, BadLines(), user_col="u", item_col="i", time_col="t").interactions
    assert frame["ts"].tolist() == [1578182400, 1578218400]


def test_ml_dat_single_colon_line_is_malformed(tmp_path):
    directory = tmp_path / "ml"
    directory.mkdir()
    (directory / "ratings.dat").write_text("1::2::3::4\n1:9:5::3::7\n")
    with pytest.raises(BadInputError) as info:
        read_ml_dat(directory, BadLines())
    assert_names_line(info.value, "ratings.dat", 2)

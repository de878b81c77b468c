"""Readers for the Amazon product data (2014 release, McAuley et al.) and the P5/TIGER 5-core copies.

Three raw forms are accepted, tried in this order for a category:
1. the original ``reviews_<Cat>_5.json[.gz]`` (JSON lines) + ``meta_<Cat>.json[.gz]`` (Python dict
   literals in the 2014 release, so each line is parsed as JSON first, then as a literal);
2. the shared ``<cat>_5core_interactions.tsv[.gz]`` (rows already in P5 order) + ``<cat>_items.jsonl[.gz]``;
3. the P5 ``sequential_data.txt`` / ``sequential.txt`` with ``datamaps.json`` (no timestamps).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.json as pajson

from .errors import RawDataMissingError
from .rawio import BadLines, find_variant, iter_records, open_binary, read_delimited
from .rawlog import RawLog
from .readers_generic import read_p5_sequences

_REVIEW_SCHEMA = pa.schema([("reviewerID", pa.string()), ("asin", pa.string()),
                            ("unixReviewTime", pa.int64()), ("overall", pa.float64())])


def read_amazon(directory: Path, bad: BadLines, category: str, short: str) -> RawLog:
    """``category`` is the 2014 file stem (``Beauty``, ``Sports_and_Outdoors``); ``short`` the shared prefix."""
    reviews = find_variant(directory, f"reviews_{category}_5.json")
    if reviews is not None:
        log = read_reviews(reviews, bad)
        meta = find_variant(directory, f"meta_{category}.json")
        if meta is not None:
            log.items = read_metadata(meta, bad, set(log.interactions["item"].unique()))
            log.files.append(meta)
        return log
    tsv = find_variant(directory, f"{short}_5core_interactions.tsv")
    if tsv is not None:
        table = read_delimited(tsv, sep="\t", header=True, bad=bad, keep=["user", "item", "ts"],
                               columns={"user": "string", "item": "string", "ts": "int64",
                                        "p5_user_idx": "int64", "p5_item_idx": "int64"})
        log = RawLog(table.to_pandas(), None, [tsv])
        items_path = find_variant(directory, f"{short}_items.jsonl")
        if items_path is not None:
            log.items = read_metadata(items_path, bad, None)
            log.files.append(items_path)
        return log
    for name in ("sequential_data.txt", "sequential.txt"):
        sequences = find_variant(directory, name)
        if sequences is not None:
            return read_p5_sequences(sequences, bad, find_variant(directory, "datamaps.json"))
    raise RawDataMissingError(
        f"none of reviews_{category}_5.json[.gz], {short}_5core_interactions.tsv[.gz], "
        f"sequential_data.txt[.gz] or sequential.txt[.gz] found in {directory}")


def read_reviews(path: Path, bad: BadLines) -> RawLog:
    try:
        table = pajson.read_json(path, parse_options=pajson.ParseOptions(
            explicit_schema=_REVIEW_SCHEMA, unexpected_field_behavior="ignore"))
        if any(table.column(name).null_count for name in ("reviewerID", "asin", "unixReviewTime")):
            raise pa.ArrowInvalid("missing required field")
        table.validate(full=True)  # read_json does not check UTF-8 inside strings; the scan names the line
        frame = table.to_pandas()
    except pa.ArrowInvalid:
        frame = _scan_reviews(path, bad)
    frame = frame.rename(columns={"reviewerID": "user", "asin": "item", "unixReviewTime": "ts", "overall": "rating"})
    return RawLog(frame[["user", "item", "ts", "rating"]], None, [path])


def _scan_reviews(path: Path, bad: BadLines) -> pd.DataFrame:
    rows = []
    for line_no, record in iter_records(path, bad):
        try:
            rows.append((str(record["reviewerID"]), str(record["asin"]), int(record["unixReviewTime"]),
                         float(record.get("overall", "nan"))))
        except (KeyError, TypeError, ValueError) as exc:
            bad.report(path, line_no, f"review record lacks a valid field ({exc})")
    return pd.DataFrame(rows, columns=["reviewerID", "asin", "unixReviewTime", "overall"]).astype(
        {"unixReviewTime": "int64", "overall": "float64"})


_ASIN = re.compile(r"""["']asin["']\s*:\s*["']([^"']+)["']""")


def read_metadata(path: Path, bad: BadLines, wanted: set | None) -> pd.DataFrame:
    """Item text: ``asin``/``item_id``, title, brand, categories (list or list of lists), price."""
    def want(text: str) -> bool:
        # Cheap pre-filter: parsing 250k Python literals to keep 12k of them is the slow part.
        match = _ASIN.search(text)
        return match is None or match.group(1) in wanted

    rows = []
    for line_no, record in iter_records(path, bad, want=None if wanted is None else want):
        item_id = record.get("asin", record.get("item_id"))
        if item_id is None:
            bad.report(path, line_no, "metadata record has no 'asin' / 'item_id'")
            continue
        rows.append({
            "item_id": str(item_id),
            "title": _text(record.get("title")),
            "brand": _text(record.get("brand")),
            "categories": _categories(record.get("categories")),
            "price": _price(record.get("price")),
        })
    frame = pd.DataFrame(rows, columns=["item_id", "title", "brand", "categories", "price"])
    return frame.drop_duplicates("item_id", keep="first")


def _text(value) -> str:
    return "" if value is None else str(value)


def _categories(value) -> str:
    if not value:
        return ""
    if all(isinstance(v, (list, tuple)) for v in value):  # 2014 meta: list of category paths
        return " | ".join(" > ".join(map(str, path)) for path in value)
    return " > ".join(map(str, value))


def _price(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


def read_datamaps(path: Path) -> dict:
    with open_binary(path) as f:
        return json.loads(f.read().decode("utf-8"))

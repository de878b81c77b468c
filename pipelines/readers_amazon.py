"""Readers for the Amazon product data (2014 release, McAuley et al.) and the P5/TIGER 5-core copies.

Three raw forms are accepted, tried in this order for a category:
1. the original ``reviews_<Cat>_5.json[.gz]`` (JSON lines) + ``meta_<Cat>.json[.gz]`` (Python dict
   literals in the 2014 release, so each line is parsed as JSON first, then as a literal);
2. the shared ``<cat>_5core_interactions.tsv[.gz]`` (rows already in P5 order) + ``<cat>_items.jsonl[.gz]``;
3. the P5 ``sequential_data.txt`` / ``sequential.txt`` with ``datamaps.json`` (no timestamps).
"""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.json as pajson

from .errors import RawDataMissingError
from .rawio import BadLines, Lines, find_variant, iter_records, read_delimited
from .rawlog import FileSpec, RawLog, ReadPlan, read_plan
from .readers_generic import plan_p5_sequences

_REVIEW_SCHEMA = pa.schema([("reviewerID", pa.string()), ("asin", pa.string()),
                            ("unixReviewTime", pa.int64()), ("overall", pa.float64())])
ITEM_COLUMNS = {"title": "string", "brand": "string", "categories": "string", "price": "float64"}


def plan_amazon(directory: Path, category: str, short: str) -> ReadPlan:
    """``category`` is the 2014 file stem (``Beauty``, ``Sports_and_Outdoors``); ``short`` the shared prefix."""
    reviews = find_variant(directory, f"reviews_{category}_5.json")
    if reviews is not None:
        meta = find_variant(directory, f"meta_{category}.json")
        items = [FileSpec(meta, parse_metadata, needs_log_items=True)] if meta else []
        return ReadPlan([FileSpec(reviews, parse_reviews)], items, ITEM_COLUMNS, has_rating=True)
    tsv = find_variant(directory, f"{short}_5core_interactions.tsv")
    if tsv is not None:
        items_path = find_variant(directory, f"{short}_items.jsonl")
        items = [FileSpec(items_path, parse_metadata)] if items_path else []
        return ReadPlan([FileSpec(tsv, parse_shared_tsv)], items, ITEM_COLUMNS)
    for name in ("sequential_data.txt", "sequential.txt"):
        sequences = find_variant(directory, name)
        if sequences is not None:
            return plan_p5_sequences(sequences, find_variant(directory, "datamaps.json"))
    raise RawDataMissingError(
        f"none of reviews_{category}_5.json[.gz], {short}_5core_interactions.tsv[.gz], "
        f"sequential_data.txt[.gz] or sequential.txt[.gz] found in {directory}")


def read_amazon(directory: Path, bad: BadLines, category: str, short: str) -> RawLog:
    return read_plan(plan_amazon(directory, category, short), bad)


def parse_shared_tsv(lines: Lines, bad: BadLines) -> pd.DataFrame:
    """The shared ``<cat>_5core_interactions.tsv``: user, item, timestamp, P5 user and item numbers (header)."""
    return read_delimited(lines, sep="\t", header=True, bad=bad, keep=["user", "item", "ts"],
                          columns={"user": "string", "item": "string", "ts": "int64",
                                   "p5_user_idx": "int64", "p5_item_idx": "int64"}).to_pandas()


def parse_reviews(lines: Lines, bad: BadLines) -> pd.DataFrame:
    """2014 review JSON lines: reviewerID, asin, unixReviewTime, overall."""
    try:
        table = pajson.read_json(lines.arrow_source(), parse_options=pajson.ParseOptions(
            explicit_schema=_REVIEW_SCHEMA, unexpected_field_behavior="ignore"))
        if any(table.column(name).null_count for name in ("reviewerID", "asin", "unixReviewTime")):
            raise pa.ArrowInvalid("missing required field")
        table.validate(full=True)  # read_json does not check UTF-8 inside strings; the scan names the line
        frame = table.to_pandas()
    except pa.ArrowInvalid:
        frame = _scan_reviews(lines, bad)
    frame = frame.rename(columns={"reviewerID": "user", "asin": "item", "unixReviewTime": "ts", "overall": "rating"})
    return frame[["user", "item", "ts", "rating"]]


def _scan_reviews(lines: Lines, bad: BadLines) -> pd.DataFrame:
    rows = []
    for line_no, record in iter_records(lines, bad):
        try:
            rows.append((str(record["reviewerID"]), str(record["asin"]), int(record["unixReviewTime"]),
                         float(record.get("overall", "nan"))))
        except (KeyError, TypeError, ValueError) as exc:
            bad.report(lines.path, line_no, f"review record lacks a valid field ({exc})")
    return pd.DataFrame(rows, columns=["reviewerID", "asin", "unixReviewTime", "overall"]).astype(
        {"unixReviewTime": "int64", "overall": "float64"})


_ASIN = re.compile(r"""["']asin["']\s*:\s*["']([^"']+)["']""")


def parse_metadata(lines: Lines, bad: BadLines, wanted: set | None = None) -> pd.DataFrame:
    """Item text: ``asin``/``item_id``, title, brand, categories (list or list of lists), price. With ``wanted``,
    only records of those items are parsed (a record whose asin the pre-filter cannot see is parsed anyway)."""
    def want(text: str) -> bool:
        # Cheap pre-filter: parsing 250k Python literals to keep 12k of them is the slow part.
        match = _ASIN.search(text)
        return match is None or match.group(1) in wanted

    rows = []
    for line_no, record in iter_records(lines, bad, want=None if wanted is None else want):
        item_id = record.get("asin", record.get("item_id"))
        if item_id is None:
            bad.report(lines.path, line_no, "metadata record has no 'asin' / 'item_id'")
            continue
        rows.append({
            "item_id": str(item_id),
            "title": _text(record.get("title")),
            "brand": _text(record.get("brand")),
            "categories": _categories(record.get("categories")),
            "price": _price(record.get("price")),
        })
    return pd.DataFrame(rows, columns=["item_id", *ITEM_COLUMNS])


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

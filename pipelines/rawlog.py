"""The common shape every raw source takes before cleaning: a read plan (which files, which parser for each), and
the raw log the in-process engine makes of it.

A recipe (MovieLens, Amazon, P5, a user's CSV/Parquet files) only *plans*: it finds the files and names a parser per
file. Each engine then executes the same plan with the same parsers: the in-process engine parses each whole file
(``read_plan``), the Spark engine (``pipelines.spark_read``) parses the lines of each file in batches on its workers.
So the two engines can only differ in how rows are put together, never in how a line is read.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pandas as pd
import pyarrow.parquet as pq

from .rawio import BadLines, Lines

# Interaction frames a log parser returns: external ids (any hashable dtype), int64 seconds, optional float64 rating.
LOG_COLUMNS = ("user", "item", "ts", "rating")


@dataclass(frozen=True)
class FileSpec:
    """One raw file and its parser (a module-level function or a ``functools.partial`` of one, so it pickles).

    Text files: ``parse(lines: Lines, bad) -> DataFrame``. Parquet files (``columns`` set): ``parse(table, path,
    first_row, bad) -> DataFrame`` on the listed columns of rows ``first_row``, ``first_row + 1``, ...
    Item files whose parser takes ``wanted`` (``needs_log_items``) get the set of raw item ids of the log and may
    skip records of other items.
    """

    path: Path
    parse: Callable
    columns: tuple[str, ...] | None = None
    needs_log_items: bool = False

    @property
    def is_parquet(self) -> bool:
        return self.columns is not None

    def read(self, bad: BadLines, wanted: set | None = None) -> pd.DataFrame:
        """The in-process engine: parse the whole file."""
        if self.is_parquet:
            return self.parse(pq.read_table(self.path, columns=list(self.columns)), self.path, 0, bad)
        if self.needs_log_items:
            return self.parse(Lines(self.path), bad, wanted=wanted)
        return self.parse(Lines(self.path), bad)


@dataclass
class ReadPlan:
    """Everything a recipe decided before any row is parsed."""

    logs: list[FileSpec]
    items: list[FileSpec] = field(default_factory=list)
    # Item text columns and their kind ("string" | "float64"), in order (the Spark engine declares them up front).
    item_columns: dict[str, str] = field(default_factory=dict)
    has_rating: bool = False
    # P5 datamaps: external ids for the P5 numbers, {"user": {"1": "A1..."}, "item": {...}}; unmapped ids stay.
    id_maps: dict[str, dict] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    # Sources without real timestamps (P5 sequences) use the position as ts; recorded in the manifest.
    timestamps_are_positions: bool = False
    extra_files: list[Path] = field(default_factory=list)  # read by the planner itself (datamaps.json)
    # A log generated in memory (the synthetic recipe) instead of files, and item text known up front.
    frame: pd.DataFrame | None = None
    items_frame: pd.DataFrame | None = None

    @property
    def files(self) -> list[Path]:
        """Every raw file the plan reads (recorded with its sha256 in the manifest)."""
        return [s.path for s in self.logs] + [s.path for s in self.items] + self.extra_files


@dataclass
class RawLog:
    """An interaction log in source order (row order is the tie-break for equal timestamps).

    ``interactions`` has columns ``user``, ``item`` (external ids, any hashable dtype), ``ts`` (int64)
    and optionally ``rating`` (float64). ``items`` holds optional item text keyed by ``item_id``
    (external id as str); ``files`` are the raw files read (recorded with sha256 in the manifest).
    """

    interactions: pd.DataFrame
    items: pd.DataFrame | None = None
    files: list[Path] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    timestamps_are_positions: bool = False


def read_plan(plan: ReadPlan, bad: BadLines) -> RawLog:
    """The in-process engine's reading: every file whole, in plan order (which is source order)."""
    frames = [spec.read(bad) for spec in plan.logs] if plan.frame is None else [plan.frame]
    frame = frames[0] if len(frames) == 1 else pd.concat(frames, ignore_index=True)
    for column, mapping in plan.id_maps.items():
        frame[column] = map_ids(frame[column], mapping)
    items = plan.items_frame
    if plan.items:
        wanted = set(frame["item"].unique()) if any(s.needs_log_items for s in plan.items) else None
        parts = [spec.read(bad, wanted) for spec in plan.items]
        items = first_item_rows(parts[0] if len(parts) == 1 else pd.concat(parts, ignore_index=True))
    return RawLog(frame, items, plan.files, list(plan.warnings), plan.timestamps_are_positions)


def map_ids(values: pd.Series, mapping: dict) -> pd.Series:
    return values.map(mapping).fillna(values)


def first_item_rows(items: pd.DataFrame) -> pd.DataFrame:
    """One row per item (its first in source order), ids as str."""
    items = items.drop_duplicates("item_id", keep="first").copy()
    items["item_id"] = items["item_id"].astype(str)
    return items.reset_index(drop=True)

"""The common shape every raw reader returns, before cleaning."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd


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
    # Sources without real timestamps (P5 sequences) use the position as ts; recorded in the manifest.
    timestamps_are_positions: bool = False

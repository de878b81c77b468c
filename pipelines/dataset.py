"""The processed dataset on disk (architecture page, "Processed dataset") and its in-memory form.

Layout of ``data/processed/<name>/``:
- ``interactions.parquet``: user_idx int32, item_idx int32, ts int64 (user-major, time-sorted);
- ``sequences.parquet``: user_idx int32, items list<int32>, timestamps list<int64> (one row per user);
- ``items.parquet``: item_idx int32 (1..V; 0 is padding and has no row), item_id (external), text
  fields, popularity (interaction count);
- ``users.parquet``: user_idx int32, user_id (external);
- ``manifest.json``: schema version, source files and sha256, every setting, counts, content hash.
  It is written last, inside an atomic directory swap: a directory without it is not a dataset;
- ``cache/sequences.arrow``: derived, not part of the contract: ``sequences.parquet`` as a memory-mappable
  Arrow IPC file, validated against the content hash before every use (``pipelines.sequence_cache``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from kernels.atomic import atomic_write_bytes
from .cleaning import CleanLog
from .jagged import Jagged, Split, content_hash
from .sequence_cache import load_cached_sequences, write_sequence_cache
from .splits import leave_one_out_split, temporal_split

SCHEMA_VERSION = 1
SPLITS = ("loo", "temporal")


@dataclass
class ProcessedDataset:
    path: Path
    manifest: dict
    user_idx: np.ndarray  # int32, row i of ``sequences`` belongs to user_idx[i]
    sequences: Jagged
    items: pd.DataFrame

    @property
    def name(self) -> str:
        return self.manifest["name"]

    @property
    def num_items(self) -> int:
        return int(self.manifest["counts"]["items"])

    @property
    def num_users(self) -> int:
        return int(self.manifest["counts"]["users"])

    @property
    def content_hash(self) -> str:
        return self.manifest["content_hash"]

    @property
    def has_repeats(self) -> bool:
        return bool(self.manifest["counts"]["has_repeats"])

    def split(self, kind: str | None = None) -> Split:
        """The split named in the manifest's settings (default), or ``"loo"`` / ``"temporal"``."""
        kind = kind or self.manifest["settings"]["split"]
        if kind == "loo":
            return leave_one_out_split(self.user_idx, self.sequences)
        if kind == "temporal":
            cutoffs = self.manifest["temporal_cutoffs"]
            return temporal_split(self.user_idx, self.sequences, cutoffs["valid"], cutoffs["test"])
        raise ValueError(f"unknown split {kind!r}; expected one of {SPLITS}")


def load_dataset(path: str | Path, *, mmap_cache: bool = True) -> ProcessedDataset:
    """Read a processed dataset. With ``mmap_cache`` (the default) the sequences come from the memory-mapped Arrow
    cache (``pipelines.sequence_cache``; written on first use), so the processes of one machine share one copy and
    ``user_idx``/``sequences`` are read-only views; ``mmap_cache=False`` decodes ``sequences.parquet`` into this
    process's own (writable) arrays."""
    path = Path(path)
    manifest_path = path / "manifest.json"
    if not manifest_path.is_file():
        raise FileNotFoundError(f"{path} is not a processed dataset (no manifest.json); build it with "
                                "`recsys data build --dataset NAME`")
    manifest = json.loads(manifest_path.read_text())
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise ValueError(f"{path} has dataset schema {manifest.get('schema_version')}, this code reads "
                         f"{SCHEMA_VERSION}; rebuild it with `recsys data build --force`")
    if mmap_cache:
        user_idx, sequences = load_cached_sequences(path, manifest, lambda: read_sequences(path))
    else:
        user_idx, sequences = read_sequences(path)
        pa.default_memory_pool().release_unused()  # the Parquet decode's freed buffers (see sequence_cache)
    return ProcessedDataset(
        path=path,
        manifest=manifest,
        user_idx=user_idx,
        sequences=sequences,
        items=pd.read_parquet(path / "items.parquet"),
    )


def read_sequences(path: str | Path) -> tuple[np.ndarray, Jagged]:
    """Decode ``sequences.parquet`` into (user_idx int32, Jagged) arrays owned by this process."""
    table = pq.read_table(Path(path) / "sequences.parquet")
    items_col = table.column("items").combine_chunks()
    times_col = table.column("timestamps").combine_chunks()
    offsets = items_col.offsets.to_numpy().astype(np.int64)
    base = offsets[0]
    sequences = Jagged(offsets - base, items_col.values.to_numpy()[base:offsets[-1]],
                       times_col.values.to_numpy()[base:offsets[-1]])
    return table.column("user_idx").to_numpy().astype(np.int32), sequences


def sequences_from_log(log: CleanLog) -> tuple[np.ndarray, Jagged]:
    """Per-user rows of a user-major, time-sorted clean log (user_idx 0..U-1 in order)."""
    lengths = np.bincount(log.user_idx, minlength=log.num_users)
    return np.arange(log.num_users, dtype=np.int32), Jagged.from_lengths(lengths, log.item_idx, log.ts)


def item_table(item_ids: np.ndarray, popularity: np.ndarray, text: pd.DataFrame | None) -> pd.DataFrame:
    """item_idx, external item_id, the source's text fields (empty when missing), popularity; ``item_ids`` and
    ``popularity`` are those of item_idx 1..V in order."""
    items = pd.DataFrame({
        "item_idx": np.arange(1, len(item_ids) + 1, dtype=np.int32),
        "item_id": pd.array(item_ids, dtype="string"),
        "popularity": np.asarray(popularity, dtype=np.int64),
    })
    if text is None or text.empty:
        items["title"] = ""
        return items
    text = text.drop_duplicates("item_id", keep="first").astype({"item_id": "string"})
    merged = items.merge(text, on="item_id", how="left", validate="one_to_one")
    for column in text.columns:
        if column != "item_id" and merged[column].dtype == object:
            merged[column] = merged[column].fillna("").astype("string")
    if "title" not in merged:
        merged["title"] = ""
    return merged


def write_dataset(directory: Path, log: CleanLog, text: pd.DataFrame | None, manifest: dict) -> dict:
    """Write the four Parquet files and the manifest into ``directory`` (an atomic temp dir)."""
    user_idx, sequences = sequences_from_log(log)
    pq.write_table(pa.table({
        "user_idx": pa.array(log.user_idx, pa.int32()),
        "item_idx": pa.array(log.item_idx, pa.int32()),
        "ts": pa.array(log.ts, pa.int64()),
    }), directory / "interactions.parquet")
    offsets = pa.array(sequences.offsets.astype(np.int32 if sequences.offsets[-1] < 2**31 else np.int64))
    list_type = pa.ListArray if offsets.type == pa.int32() else pa.LargeListArray
    pq.write_table(pa.table({
        "user_idx": pa.array(user_idx, pa.int32()),
        "items": list_type.from_arrays(offsets, pa.array(sequences.items, pa.int32())),
        "timestamps": list_type.from_arrays(offsets, pa.array(sequences.times, pa.int64())),
    }), directory / "sequences.parquet")
    digest = content_hash(sequences, log.num_items)
    write_sequence_cache(directory, user_idx, sequences, digest)  # derived; loads would write it otherwise
    popularity = np.bincount(log.item_idx, minlength=log.num_items + 1)[1:]
    item_table(log.item_ids, popularity, text).to_parquet(directory / "items.parquet", index=False)
    pd.DataFrame({"user_idx": user_idx, "user_id": pd.array(log.user_ids, dtype="string")}).to_parquet(
        directory / "users.parquet", index=False)
    return write_manifest(directory, manifest, users=log.num_users, items=log.num_items,
                          interactions=int(len(log.item_idx)), stats=log.stats, digest=digest)


def write_manifest(directory: Path, manifest: dict, *, users: int, items: int, interactions: int, stats: dict,
                   digest: str) -> dict:
    """The manifest, written last (whichever engine wrote the data files): a directory without it is no dataset."""
    manifest = {
        **manifest,
        "schema_version": SCHEMA_VERSION,
        "counts": {"users": users, "items": items, "interactions": interactions,
                   "has_repeats": bool(stats["has_repeats"])},
        "cleaning_stats": stats,
        "content_hash": digest,
    }
    # renamed into place whole: a manifest.json is never half a file, even in a build's temporary directory
    atomic_write_bytes(directory / "manifest.json", (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode())
    return manifest

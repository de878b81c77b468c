"""A memory-mapped Arrow IPC copy of ``sequences.parquet``, shared by every process that loads the dataset.

Decoding the Parquet file gives each process (each ``torchrun`` rank) its own copy of the flat sequence arrays.
This cache holds the same columns uncompressed in one Arrow IPC file, ``<dataset>/cache/sequences.arrow``, and
``load_cached_sequences`` opens it with ``pyarrow.memory_map``: the numpy arrays it returns are read-only views of
the file's pages in the OS page cache, so the ranks on one machine share one copy.

Layout: one record batch, one row per user, the Parquet file's columns with 64-bit list offsets so that every
array is a zero-copy view with the dtype ``Jagged`` keeps (offsets int64, items int32, times int64):
``user_idx`` int32, ``items`` large_list<int32>, ``timestamps`` large_list<int64> (the two lists share their
offsets; the file stores them twice, 8 bytes per user). The schema metadata records the cache version and the
manifest's content hash.

The cache is derived, never trusted: ``sequences.parquet`` and ``manifest.json`` stay the dataset. A cache is used
only when its schema, version and recorded content hash match and the sha256 of its mapped arrays (the same
``content_hash`` the manifest records, about 0.15 s per 20M events) equals the manifest's; anything else (a
stale, foreign, truncated or corrupted file) is rebuilt from the Parquet file. It is written by the build (into
the dataset's temporary directory, so a forced rebuild replaces it with the rest of the directory) or, when
missing, by the first load: under an exclusive lock so that concurrent ranks decode the Parquet file once, into a
temporary file renamed into place, so that a reader never sees half a file.
"""

from __future__ import annotations

import fcntl
import os
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pyarrow as pa

from kernels.atomic import atomic_file
from .jagged import Jagged, content_hash

CACHE_DIR = "cache"
CACHE_FILE = "sequences.arrow"
CACHE_VERSION = "1"
SCHEMA = pa.schema([
    pa.field("user_idx", pa.int32(), nullable=False),
    pa.field("items", pa.large_list(pa.field("item", pa.int32(), nullable=False)), nullable=False),
    pa.field("timestamps", pa.large_list(pa.field("item", pa.int64(), nullable=False)), nullable=False),
])

Decoded = tuple[np.ndarray, Jagged]


def cache_path(dataset_dir: str | Path) -> Path:
    return Path(dataset_dir) / CACHE_DIR / CACHE_FILE


def write_sequence_cache(dataset_dir: str | Path, user_idx: np.ndarray, sequences: Jagged, expected_hash: str) -> Path:
    """Write the cache of (user_idx, sequences) atomically; ``expected_hash`` is their manifest content hash.

    ``dataset_dir`` must exist (it is never created here: a cache alone must not make a directory look like a
    dataset, nor recreate one that a rebuild has just moved away)."""
    dataset_dir = Path(dataset_dir)
    if not dataset_dir.is_dir():
        raise FileNotFoundError(f"{dataset_dir} does not exist")
    (dataset_dir / CACHE_DIR).mkdir(exist_ok=True)
    offsets = pa.array(np.ascontiguousarray(sequences.offsets, dtype=np.int64))
    batch = pa.record_batch([
        pa.array(np.ascontiguousarray(user_idx, dtype=np.int32)),
        pa.LargeListArray.from_arrays(offsets, pa.array(sequences.items), type=SCHEMA.field("items").type),
        pa.LargeListArray.from_arrays(offsets, pa.array(sequences.times), type=SCHEMA.field("timestamps").type),
    ], schema=SCHEMA.with_metadata({"cache_version": CACHE_VERSION, "content_hash": expected_hash}))
    path = cache_path(dataset_dir)
    with atomic_file(path, make_parents=False) as tmp:
        with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, batch.schema) as writer:
            writer.write_batch(batch)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it owner-only; the Parquet files beside it are world-readable
    return path


def open_sequence_cache(dataset_dir: str | Path, expected_hash: str, num_items: int) -> Decoded | None:
    """The cached (user_idx, sequences) as read-only views of the memory-mapped file, or None when the cache is
    missing or does not hold exactly the sequences whose content hash is ``expected_hash``."""
    path = cache_path(dataset_dir)
    if not path.is_file():
        return None
    try:
        reader = pa.ipc.open_file(pa.memory_map(str(path), "r"))
        metadata = reader.schema.metadata or {}
        if (not reader.schema.equals(SCHEMA, check_metadata=False) or reader.num_record_batches != 1
                or metadata.get(b"cache_version") != CACHE_VERSION.encode()
                or metadata.get(b"content_hash") != expected_hash.encode()):
            return None
        batch = reader.get_batch(0)
        items, times = batch.column("items"), batch.column("timestamps")
        if batch.column("user_idx").null_count or items.null_count or times.null_count or items.offset \
                or times.offset:
            return None
        offsets = items.offsets.to_numpy(zero_copy_only=True)
        if not np.array_equal(offsets, times.offsets.to_numpy(zero_copy_only=True)):
            return None
        sequences = Jagged(offsets, items.values.to_numpy(zero_copy_only=True),
                           times.values.to_numpy(zero_copy_only=True))
        user_idx = batch.column("user_idx").to_numpy(zero_copy_only=True)
        if content_hash(sequences, num_items) != expected_hash:
            return None
    except (OSError, pa.ArrowException, ValueError):
        return None
    return user_idx, sequences


@contextmanager
def _exclusive(dataset_dir: Path) -> Iterator[None]:
    """An exclusive advisory lock beside the cache, so that concurrent loaders decode and write it once."""
    (dataset_dir / CACHE_DIR).mkdir(exist_ok=True)  # never parents=True: see write_sequence_cache
    fd = os.open(dataset_dir / CACHE_DIR / f"{CACHE_FILE}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def load_cached_sequences(dataset_dir: str | Path, manifest: dict, decode: Callable[[], Decoded]) -> Decoded:
    """(user_idx, sequences) from the cache when it is valid; otherwise ``decode()`` (the Parquet reader), which
    is written as the cache and then reopened memory-mapped. When the cache cannot be written (a read-only
    directory, say) the decoded arrays are returned with a warning; a decode that does not match the manifest's
    content hash is never cached."""
    dataset_dir = Path(dataset_dir)
    expected, num_items = manifest["content_hash"], int(manifest["counts"]["items"])
    cached = open_sequence_cache(dataset_dir, expected, num_items)
    if cached is not None:
        return cached
    decoded = None
    try:
        with _exclusive(dataset_dir):
            cached = open_sequence_cache(dataset_dir, expected, num_items)  # written while we waited?
            if cached is not None:
                return cached
            decoded = decode()
            if content_hash(decoded[1], num_items) != expected:
                warnings.warn(f"{dataset_dir}/sequences.parquet does not match the manifest's content hash; "
                              "not caching it (rebuild the dataset with `recsys data build --force`)", stacklevel=3)
                return decoded
            write_sequence_cache(dataset_dir, *decoded, expected)
    except OSError as error:
        warnings.warn(f"cannot write the sequence cache of {dataset_dir} ({error}); every process keeps its own "
                      "decoded copy", stacklevel=3)
        return decoded if decoded is not None else decode()
    # Drop the decode before mapping the file (the writer's peak stays that of the decode alone) and give its memory
    # back to the OS: Arrow's allocator otherwise keeps the freed Parquet buffers, and the rank that wrote the cache
    # would hold a private copy's worth of memory for nothing.
    del decoded
    pa.default_memory_pool().release_unused()
    cached = open_sequence_cache(dataset_dir, expected, num_items)
    return cached if cached is not None else decode()  # only if the file changed under us since it was written

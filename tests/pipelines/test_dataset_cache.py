"""The memory-mapped Arrow cache of the processed sequences (pipelines/sequence_cache.py): same arrays as the
Parquet decode, zero-copy read-only views of the file, reused, never trusted when stale or corrupt, safe under
concurrent creation, replaced by a forced rebuild."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from pipelines import sequence_cache
from pipelines.build import build_dataset
from pipelines.dataset import load_dataset, read_sequences
from pipelines.jagged import Jagged
from pipelines.sequence_cache import cache_path, write_sequence_cache

SMALL = {"num_users": 200, "num_items": 80, "num_clusters": 8}
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def dataset(tmp_path) -> Path:
    return build_dataset("synthetic", data_root=tmp_path, **SMALL)


def _assert_same_as_parquet(ds) -> None:
    user_idx, sequences = read_sequences(ds.path)
    pairs = [(ds.user_idx, user_idx), (ds.sequences.offsets, sequences.offsets),
             (ds.sequences.items, sequences.items), (ds.sequences.times, sequences.times)]
    for got, want in pairs:
        assert got.dtype == want.dtype and np.array_equal(got, want)


def _mapped_ranges(path: Path) -> list[tuple[int, int]]:
    """Address ranges where ``path`` is mapped into this process (Linux /proc/self/maps)."""
    ranges = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5].split(" (deleted)")[0] == str(path.resolve()):
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            ranges.append((lo, hi))
    return ranges


def _stamp(path: Path) -> tuple[int, int]:
    stat = cache_path(path).stat()
    return stat.st_ino, stat.st_mtime_ns


def test_build_writes_the_cache_and_it_equals_the_parquet_decode(dataset):
    assert cache_path(dataset).is_file()
    ds = load_dataset(dataset)
    _assert_same_as_parquet(ds)
    assert ds.split().train.items.sum() == load_dataset(dataset, mmap_cache=False).split().train.items.sum()


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux /proc/self/maps")
def test_arrays_are_read_only_views_of_the_mapped_file(dataset):
    ds = load_dataset(dataset)
    ranges = _mapped_ranges(cache_path(dataset))
    assert ranges, "the cache file is not memory-mapped"
    for array in (ds.user_idx, ds.sequences.offsets, ds.sequences.items, ds.sequences.times):
        start = array.ctypes.data
        assert any(lo <= start and start + array.nbytes <= hi for lo, hi in ranges), "array is a copy"
        assert not array.flags.writeable
    with pytest.raises(ValueError, match="read-only"):
        ds.sequences.items[0] = 1
    own = load_dataset(dataset, mmap_cache=False).sequences.items  # the opt-out decodes a private copy
    assert not any(lo <= own.ctypes.data < hi for lo, hi in ranges)


def test_first_load_writes_a_missing_cache_and_later_loads_reuse_it(dataset, monkeypatch):
    cache_path(dataset).unlink()
    _assert_same_as_parquet(load_dataset(dataset))
    stamp = _stamp(dataset)

    def no_rewrite(*args, **kwargs):
        raise AssertionError("a valid cache was rewritten")

    monkeypatch.setattr(sequence_cache, "write_sequence_cache", no_rewrite)
    _assert_same_as_parquet(load_dataset(dataset))
    assert _stamp(dataset) == stamp
    assert sorted(p.name for p in cache_path(dataset).parent.iterdir()) == ["sequences.arrow", "sequences.arrow.lock"]


def test_a_foreign_cache_is_ignored_and_rebuilt(dataset, tmp_path):
    other = load_dataset(build_dataset("synthetic", data_root=tmp_path / "other", seed=1, **SMALL))
    manifest = json.loads((dataset / "manifest.json").read_text())
    assert other.content_hash != manifest["content_hash"]
    # The other dataset's arrays under this dataset's hash (a lying label) and under their own hash (stale).
    for label in (manifest["content_hash"], other.content_hash):
        write_sequence_cache(dataset, other.user_idx, other.sequences, label)
        ds = load_dataset(dataset)
        _assert_same_as_parquet(ds)
        meta = pa.ipc.open_file(pa.memory_map(str(cache_path(dataset)))).schema.metadata
        assert meta[b"content_hash"] == manifest["content_hash"].encode()


@pytest.mark.parametrize("damage", ["flip_last_byte", "truncate", "garbage", "empty"])
def test_a_corrupted_cache_is_rebuilt(dataset, damage):
    path = cache_path(dataset)
    data = bytearray(path.read_bytes())
    if damage == "flip_last_byte":  # inside the data, past the header: only the content hash notices
        ds = load_dataset(dataset)
        offset = ds.sequences.times.ctypes.data - _mapped_ranges(path)[0][0] + ds.sequences.times.nbytes - 1
        del ds
        data[offset] ^= 0xFF
    elif damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "garbage":
        data = bytearray(b"not an arrow file" * 10)
    else:
        data = bytearray()
    path.write_bytes(bytes(data))
    _assert_same_as_parquet(load_dataset(dataset))
    assert path.read_bytes() != bytes(data)


def test_no_cache_without_a_manifest(dataset):
    (dataset / "manifest.json").unlink()
    cache = cache_path(dataset)
    cache.unlink()
    with pytest.raises(FileNotFoundError, match="manifest"):
        load_dataset(dataset)
    assert not cache.exists()
    with pytest.raises(FileNotFoundError):  # the writer never creates the dataset directory itself
        write_sequence_cache(dataset.parent / "absent", np.zeros(0, np.int32), Jagged.empty(), "x")
    assert not (dataset.parent / "absent").exists()


def test_forced_rebuild_replaces_the_cache(dataset, tmp_path):
    other = load_dataset(build_dataset("synthetic", data_root=tmp_path / "other", seed=1, **SMALL))
    write_sequence_cache(dataset, other.user_idx, other.sequences, other.content_hash)
    stale = _stamp(dataset)
    build_dataset("synthetic", data_root=dataset.parent.parent, force=True, **SMALL)
    assert _stamp(dataset) != stale
    meta = pa.ipc.open_file(pa.memory_map(str(cache_path(dataset)))).schema.metadata
    assert meta[b"content_hash"] == json.loads((dataset / "manifest.json").read_text())["content_hash"].encode()


def test_an_unwritable_cache_falls_back_to_the_decode(dataset, monkeypatch):
    cache_path(dataset).unlink()

    def refuse(*args, **kwargs):
        raise PermissionError("read-only file system")

    monkeypatch.setattr(sequence_cache, "write_sequence_cache", refuse)
    with pytest.warns(UserWarning, match="cannot write the sequence cache"):
        ds = load_dataset(dataset)
    _assert_same_as_parquet(ds)
    assert not cache_path(dataset).exists()


def test_a_parquet_file_that_disagrees_with_the_manifest_is_not_cached(dataset):
    cache_path(dataset).unlink()
    manifest = json.loads((dataset / "manifest.json").read_text())
    manifest["content_hash"] = "0" * 64
    (dataset / "manifest.json").write_text(json.dumps(manifest))
    with pytest.warns(UserWarning, match="does not match the manifest"):
        load_dataset(dataset)
    assert not cache_path(dataset).exists()


CONCURRENT = """
import sys
sys.path.insert(0, sys.argv[1])
from pipelines.dataset import load_dataset
from pipelines.jagged import content_hash
from pipelines.sequence_cache import cache_path
ds = load_dataset(sys.argv[2])
start = ds.sequences.items.ctypes.data
mapped = any(
    line.split()[-1] == str(cache_path(sys.argv[2]).resolve())
    and int(line.split("-")[0], 16) <= start < int(line.split()[0].split("-")[1], 16)
    for line in open("/proc/self/maps") if len(line.split()) == 6
)
print(content_hash(ds.sequences, ds.num_items), mapped)
"""


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux /proc/self/maps")
def test_concurrent_first_loads_write_one_valid_cache(dataset):
    cache_path(dataset).unlink()
    procs = [subprocess.Popen([sys.executable, "-c", CONCURRENT, str(REPO), str(dataset)], stdout=subprocess.PIPE,
                              text=True) for _ in range(4)]
    outputs = [p.communicate(timeout=120)[0].split() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    expected = json.loads((dataset / "manifest.json").read_text())["content_hash"]
    assert outputs == [[expected, "True"]] * 4  # every process, the writer too, got the mapped, valid cache
    assert sorted(p.name for p in cache_path(dataset).parent.iterdir()) == ["sequences.arrow", "sequences.arrow.lock"]
    _assert_same_as_parquet(load_dataset(dataset))
    assert os.path.getsize(cache_path(dataset)) > 0


def _reference_prefix(sequences: Jagged, lengths: np.ndarray) -> Jagged:
    rows = [sequences.row(i) for i in range(len(sequences))]
    items = [r[0][:n] for r, n in zip(rows, lengths)]
    times = [r[1][:n] for r, n in zip(rows, lengths)]
    return Jagged.from_lengths(np.asarray(lengths), np.concatenate(items or [np.zeros(0, np.int32)]),
                               np.concatenate(times or [np.zeros(0, np.int64)]))


def test_prefix_and_take_match_a_per_row_reference_and_share_whole_arrays():
    rng = np.random.default_rng(0)
    row_lengths = rng.integers(0, 6, 50)
    sequences = Jagged.from_lengths(row_lengths, rng.integers(1, 99, row_lengths.sum()).astype(np.int32),
                                    np.arange(row_lengths.sum(), dtype=np.int64))
    for lengths in (rng.integers(0, row_lengths + 1), np.zeros_like(row_lengths), np.maximum(row_lengths - 1, 0)):
        got, want = sequences.prefix(lengths), _reference_prefix(sequences, lengths)
        assert all(np.array_equal(a, b) for a, b in zip((got.offsets, got.items, got.times),
                                                        (want.offsets, want.items, want.times)))
    assert sequences.prefix(row_lengths) is sequences
    assert sequences.take(np.arange(len(sequences))) is sequences
    assert sequences.take(np.ones(len(sequences), bool)) is sequences
    assert np.array_equal(sequences.take(np.arange(len(sequences))[::-1]).row(0)[0], sequences.row(49)[0])
    assert Jagged.empty().prefix(np.zeros(0, np.int64)) is not None


@pytest.mark.parametrize("kind", ["loo", "temporal"])
def test_split_of_the_mapped_dataset_equals_the_split_of_the_decode(dataset, kind):
    mapped, own = load_dataset(dataset).split(kind), load_dataset(dataset, mmap_cache=False).split(kind)
    assert np.array_equal(mapped.train_users, own.train_users)
    for a, b in [(mapped.train, own.train), (mapped.valid.history, own.valid.history),
                 (mapped.test.history, own.test.history)]:
        assert all(np.array_equal(x, y) for x, y in zip((a.offsets, a.items, a.times), (b.offsets, b.items, b.times)))
    for a, b in [(mapped.valid, own.valid), (mapped.test, own.test)]:
        assert np.array_equal(a.target, b.target) and np.array_equal(a.user_idx, b.user_idx)
    if kind == "loo":  # the k-core keeps >= 5 events per user, so all are evaluated: one shared copy
        assert mapped.valid.history is mapped.train

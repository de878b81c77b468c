"""Processed-dataset builds: layout, reuse, atomicity, split leakage, bad input, offline downloads, real data."""

from __future__ import annotations

import gzip
import json
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipelines import build as build_module
from pipelines.build import GenericInput, build_dataset
from pipelines.dataset import load_dataset
from pipelines.errors import BadInputError, EmptyDatasetError, RawDataMissingError
from recsys.cli import main
from tests.conftest import shared_dataset

SMALL = {"num_users": 200, "num_items": 80, "num_clusters": 8}


def test_synthetic_build_layout_and_manifest(tmp_path):
    path = build_dataset("synthetic", data_root=tmp_path, **SMALL)
    assert path.parent == tmp_path / "processed" and path.name.startswith("synthetic-")
    manifest = json.loads((path / "manifest.json").read_text())
    for name in ("interactions.parquet", "sequences.parquet", "items.parquet", "users.parquet"):
        assert (path / name).is_file()
    ds = load_dataset(path)
    counts = manifest["counts"]
    interactions = pd.read_parquet(path / "interactions.parquet")
    assert len(interactions) == counts["interactions"] == len(ds.sequences.items)
    assert interactions["item_idx"].min() == 1 and interactions["item_idx"].max() == counts["items"]
    assert ds.items["item_idx"].tolist() == list(range(1, counts["items"] + 1))
    assert ds.items["popularity"].sum() == counts["interactions"]
    assert ds.items["title"].str.len().min() > 0  # synthetic items carry text
    assert (np.diff(interactions["ts"].to_numpy())[np.diff(interactions["user_idx"].to_numpy()) == 0] >= 0).all()
    assert manifest["settings"]["num_users"] == 200 and manifest["settings"]["split"] == "loo"
    assert not ds.has_repeats


def test_same_inputs_reuse_the_build_and_force_rebuilds(tmp_path, capsys):
    first = build_dataset("synthetic", data_root=tmp_path, **SMALL)
    stamp = (first / "manifest.json").stat().st_mtime_ns
    assert build_dataset("synthetic", data_root=tmp_path, **SMALL) == first
    assert "reusing" in capsys.readouterr().err
    assert (first / "manifest.json").stat().st_mtime_ns == stamp
    build_dataset("synthetic", data_root=tmp_path, force=True, **SMALL)
    assert (first / "manifest.json").stat().st_mtime_ns != stamp


def test_generator_is_deterministic_per_seed(tmp_path):
    a = load_dataset(build_dataset("synthetic", data_root=tmp_path / "a", **SMALL))
    b = load_dataset(build_dataset("synthetic", data_root=tmp_path / "b", **SMALL))
    c = load_dataset(build_dataset("synthetic", data_root=tmp_path / "c", seed=1, **SMALL))
    assert a.content_hash == b.content_hash != c.content_hash


def test_synthetic_has_sequential_signal_beyond_popularity(tmp_path):
    """A first-order item-to-item count model must clearly beat popularity on the default generator."""
    ds = load_dataset(build_dataset("synthetic", data_root=tmp_path, num_users=1500))
    split = ds.split()
    v = ds.num_items + 1
    counts = np.zeros((v, v))
    rows = split.train
    same_user = np.diff(rows.row_ids()) == 0
    np.add.at(counts, (rows.items[:-1][same_user], rows.items[1:][same_user]), 1)
    popularity = np.bincount(rows.items, minlength=v).astype(float)
    popularity[0] = -1
    last = split.test.history.items[split.test.history.offsets[1:] - 1]
    markov_hit = np.mean([t in np.argsort(-counts[i])[:10] for i, t in zip(last, split.test.target)])
    pop_hit = np.isin(split.test.target, np.argsort(-popularity)[:10]).mean()
    assert markov_hit > 2 * pop_hit


@pytest.mark.parametrize("kind", ["loo", "temporal"])
def test_no_target_or_later_event_leaks_into_training(tmp_path, kind):
    ds = load_dataset(build_dataset("synthetic", data_root=tmp_path, **SMALL))
    split = ds.split(kind)
    full = {int(u): ds.sequences.row(i) for i, u in enumerate(ds.user_idx)}
    train = {int(u): split.train.row(i) for i, u in enumerate(split.train_users)}
    for eval_set in (split.valid, split.test):
        assert len(eval_set) > 0
        for i, user in enumerate(eval_set.user_idx):
            items, times = full[int(user)]
            history = eval_set.history.row(i)[0]
            cut = len(history)  # the target's position in the user's full sequence
            assert (history == items[:cut]).all() and eval_set.target[i] == items[cut]
            train_items, train_times = train.get(int(user), (items[:0], times[:0]))
            # training input = a prefix that ends before this target
            assert len(train_items) <= cut and (train_items == items[:len(train_items)]).all()
            if kind == "temporal":
                assert (train_times < ds.manifest["temporal_cutoffs"]["valid"]).all()
    if kind == "loo":  # the test history contains the validation target
        assert (split.test.history.lengths() == split.valid.history.lengths() + 1).all()


def test_interrupted_build_leaves_the_previous_dataset_intact(tmp_path, monkeypatch):
    path = build_dataset("synthetic", data_root=tmp_path, **SMALL)
    before = (path / "manifest.json").read_bytes()

    def explode(directory, *args, **kwargs):
        (directory / "interactions.parquet").write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(build_module, "write_dataset", explode)
    with pytest.raises(KeyboardInterrupt):
        build_dataset("synthetic", data_root=tmp_path, force=True, **SMALL)
    assert (path / "manifest.json").read_bytes() == before
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no temp dirs left behind
    with pytest.raises(KeyboardInterrupt):
        build_dataset("synthetic", data_root=tmp_path / "fresh", **SMALL)
    assert not any((tmp_path / "fresh" / "processed").iterdir())


def test_filtering_everything_away_is_a_clear_error(tmp_path):
    with pytest.raises(EmptyDatasetError, match="k-core"):
        build_dataset("synthetic", data_root=tmp_path, min_user_interactions=1000, **SMALL)
    assert not (tmp_path / "processed").exists() or not any((tmp_path / "processed").iterdir())


def test_unknown_setting_lists_the_accepted_ones(tmp_path):
    with pytest.raises(ValueError, match="min_user_interactions"):
        build_dataset("synthetic", data_root=tmp_path, min_users=3)


def _write_log(path: Path, bad_line: str | None = None) -> Path:
    rows = ["user_id,item_id,timestamp"]
    for user in range(6):
        for item in range(6):
            rows.append(f"u{user},i{item},{1000 + 10 * item}")
    if bad_line is not None:
        rows.insert(4, bad_line)  # physical line 5
    path.write_text("\n".join(rows) + "\n")
    return path


def test_malformed_line_names_file_and_line_or_is_skipped_and_counted(tmp_path, capsys):
    log = _write_log(tmp_path / "log.csv", bad_line="u9,i9")
    with pytest.raises(BadInputError, match=r"log\.csv, line 5"):
        build_dataset("mine", data_root=tmp_path, generic=GenericInput(log))
    path = build_dataset("mine", data_root=tmp_path, on_bad_lines="skip", generic=GenericInput(log))
    assert json.loads((path / "manifest.json").read_text())["skipped_lines"] == {"log.csv": 1}
    assert "skipped 1 malformed line(s) in log.csv" in capsys.readouterr().err
    assert load_dataset(path).num_users == 6

    # the command line: a clear message and exit code 2, no traceback, nothing half-written
    code = main(["data", "build", "--dataset", "other", "--input", str(log), "--data-root", str(tmp_path / "x")])
    assert code == 2 and "log.csv, line 5" in capsys.readouterr().err
    assert not (tmp_path / "x" / "processed" / "other").exists()


def test_equal_timestamps_keep_source_order(tmp_path):
    rows = ["user_id,item_id,timestamp"] + [f"u{u},i{i},{7 if i in (2, 4) else i}" for u in range(5)
                                            for i in (3, 2, 4, 0, 1, 5)]
    (tmp_path / "log.csv").write_text("\n".join(rows) + "\n")
    ds = load_dataset(build_dataset("ties", data_root=tmp_path, generic=GenericInput(tmp_path / "log.csv")))
    external = ds.items.set_index("item_idx")["item_id"]
    # sorted by time; the two events at t=7 keep their file order (i2 before i4)
    assert [external[i] for i in ds.sequences.row(0)[0]] == ["i0", "i1", "i3", "i5", "i2", "i4"]


def test_exact_duplicates_are_removed(tmp_path):
    log = _write_log(tmp_path / "log.csv")
    log.write_text(log.read_text() + "u0,i0,1000\n")
    path = build_dataset("dups", data_root=tmp_path, generic=GenericInput(log))
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["cleaning_stats"]["removed_duplicates"] == 1 and manifest["counts"]["interactions"] == 36


def test_offline_without_raw_files_says_to_pass_raw_dir(tmp_path, monkeypatch, capsys):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(RawDataMissingError, match="--raw-dir"):
        build_dataset("ml-100k", data_root=tmp_path)
    assert not (tmp_path / "raw" / "ml-100k").exists()
    assert main(["data", "build", "--dataset", "ml-100k", "--data-root", str(tmp_path)]) == 2
    assert "--raw-dir" in capsys.readouterr().err


def test_download_verifies_and_unpacks(tmp_path, monkeypatch):
    """The download path with a local fake server response: zip flattened, checksum checked."""
    import hashlib
    import io
    import zipfile

    payload = io.BytesIO()
    with zipfile.ZipFile(payload, "w") as archive:
        archive.writestr("ml-100k/u.data", "".join(f"{u}\t{i}\t5\t{100 + i}\n" for u in range(1, 7)
                                                   for i in range(1, 7)))
    data = payload.getvalue()
    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout: io.BytesIO(data))
    entry = json.loads(build_module.CATALOGUE_PATH.read_text())["datasets"]["ml-100k"]
    entry["download"][0]["sha256"] = hashlib.sha256(data).hexdigest()
    build_module.download("ml-100k", entry, tmp_path / "raw" / "ml-100k")
    assert (tmp_path / "raw" / "ml-100k" / "u.data").is_file()
    entry["download"][0]["sha256"] = "0" * 64
    with pytest.raises(RawDataMissingError, match="checksum"):
        build_module.download("ml-100k", entry, tmp_path / "raw" / "again")


# ----- real data (skipped cleanly when ../shared/data is absent) -----------------------------------

def _p5_sequences(path: Path) -> list[list[int]]:
    with gzip.open(path, "rt") as f:
        return [list(map(int, line.split()[1:])) for line in f.read().splitlines()]


@pytest.mark.parametrize("name,users,items,interactions", [
    ("amazon-beauty", 22_363, 12_101, 198_502),
    ("amazon-sports", 35_598, 18_357, 296_337),
    ("amazon-toys", 19_412, 11_924, 167_597),
])
def test_amazon_p5_splits_match_published_counts_and_order(tmp_path, name, users, items, interactions):
    raw = shared_dataset(name)
    ds = load_dataset(build_dataset(name, raw, data_root=tmp_path))
    assert (ds.num_users, ds.num_items, len(ds.sequences.items)) == (users, items, interactions)
    p5 = raw / ("sequential.txt.gz" if name == "amazon-toys" else "sequential_data.txt.gz")
    assert all(seq == ds.sequences.row(i)[0].tolist() for i, seq in enumerate(_p5_sequences(p5)))


def test_ml100k_all_ratings(tmp_path):
    ds = load_dataset(build_dataset("ml-100k", shared_dataset("ml-100k"), data_root=tmp_path))
    assert (ds.num_users, ds.num_items, len(ds.sequences.items)) == (943, 1682, 100_000)  # all ratings
    assert ds.items["title"].str.contains("Toy Story").any()


def test_ml1m_partial_copy_warns(tmp_path):
    path = build_dataset("ml-1m", shared_dataset("ml-1m"), data_root=tmp_path)
    manifest = json.loads((path / "manifest.json").read_text())
    assert any("PARTIAL" in w for w in manifest["warnings"]) and manifest["counts"]["users"] == 2999


def test_lower_quantile_index_is_the_rank_numpy_picks():
    """The Spark engine selects the cutoffs by rank; that rank must be the one np.quantile(method="lower") uses."""
    from pipelines.splits import lower_quantile_index

    rng = np.random.default_rng(0)
    for n in [1, 2, 3, 7, 10, 101, 1000, 12345, 198502]:
        values = np.sort(rng.integers(0, 10**9, n))
        for q in [0.0, 0.1, 0.5, 0.8, 0.9, 0.95, 0.999, 1.0, 1 / 3]:
            assert values[lower_quantile_index(n, q)] == np.quantile(values, q, method="lower")

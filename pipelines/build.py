"""Raw source → processed dataset: locate (or download) raw files, read, clean, write atomically, reuse.

``build_dataset`` is the one entry point (the ``recsys data build`` command calls it). A build is
keyed by an input hash over the recipe, every setting and the sha256 of every raw file: when the
target directory already holds a manifest with the same input hash the build is skipped.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kernels.atomic import atomic_directory, sweep_stale_temporaries
from .cleaning import clean_interactions
from .dataset import write_dataset
from .errors import RawDataMissingError
from .rawio import BadLines, find_variant, sha256_file
from .rawlog import FileSpec, ReadPlan, read_plan
from .readers_amazon import plan_amazon
from .readers_generic import input_files, parse_p5, plan_table
from .readers_movielens import plan_ml100k, plan_ml_csv, plan_ml_dat
from .splits import default_temporal_cutoffs
from .synthetic import SyntheticConfig, generate_interactions, generate_item_text

CATALOGUE_PATH = Path(__file__).resolve().parents[1] / "data" / "catalogue.json"
# Bump when cleaning or the on-disk layout changes, so stale processed datasets are rebuilt.
PIPELINE_VERSION = 1

CLEANING_DEFAULTS: dict[str, Any] = {
    "rating_threshold": None,
    "dedupe": True,
    "min_user_interactions": 5,
    "min_item_interactions": 5,
    "split": "loo",
    "temporal_valid_quantile": 0.8,
    "temporal_test_quantile": 0.9,
}


ENGINES = ("inprocess", "spark")


@dataclass(frozen=True)
class Engine:
    """What builds a dataset: the in-process engine (the default), or Apache Spark on ``master`` (default
    ``local[*]``) with extra Spark settings ``conf`` (``spark.driver.memory=4g``, ...)."""

    name: str = "inprocess"
    master: str | None = None
    conf: tuple[tuple[str, str], ...] = ()

    def __post_init__(self):
        if self.name not in ENGINES:
            raise ValueError(f"engine must be one of {ENGINES}, got {self.name!r}")
        if self.name != "spark" and (self.master or self.conf):
            raise ValueError("--spark-master / --spark-conf need --engine spark")


@dataclass(frozen=True)
class GenericInput:
    """A user's own log (``--input``): CSV/Parquet with named columns, or the P5 ``user item item ...`` form; one
    file, a directory of part files or a glob."""

    path: Path
    file_format: str | None = None  # csv | parquet | p5 (guessed from the suffix when None)
    user_col: str = "user_id"
    item_col: str = "item_id"
    time_col: str = "timestamp"
    rating_col: str | None = None
    sep: str = ","

    def plan(self) -> ReadPlan:
        if self.file_format == "p5":
            return ReadPlan([FileSpec(p, parse_p5) for p in input_files(self.path)], timestamps_are_positions=True)
        return plan_table(self.path, user_col=self.user_col, item_col=self.item_col, time_col=self.time_col,
                          rating_col=self.rating_col, file_format=self.file_format, sep=self.sep)


def load_catalogue() -> dict:
    return json.loads(CATALOGUE_PATH.read_text())["datasets"]


def default_data_root() -> Path:
    return Path(os.environ.get("RECSYS_DATA_ROOT", "data"))


def resolve_settings(recipe: str, settings: dict[str, Any], entry: dict | None = None) -> dict[str, Any]:
    """Defaults (the catalogue entry's ``settings`` override the generic ones) + overrides; an unknown key is an
    error that lists the accepted ones."""
    accepted = dict(CLEANING_DEFAULTS)
    if recipe == "synthetic":
        accepted.update(SyntheticConfig().to_dict())
    accepted.update((entry or {}).get("settings", {}))
    unknown = sorted(set(settings) - set(accepted))
    if unknown:
        raise ValueError(f"unknown data setting(s) {unknown} for {recipe!r}; accepted: {sorted(accepted)}")
    resolved = {**accepted, **settings}
    if resolved["split"] not in ("loo", "temporal"):
        raise ValueError(f"split must be 'loo' or 'temporal', got {resolved['split']!r}")
    return resolved


def _short_hash(payload: Any) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def build_dataset(
    name: str,
    raw_dir: str | Path | None = None,
    *,
    data_root: str | Path | None = None,
    on_bad_lines: str = "error",
    force: bool = False,
    generic: GenericInput | None = None,
    engine: Engine | None = None,
    **settings: Any,
) -> Path:
    """Build (or reuse) ``<data_root>/processed/<name>`` and return its path.

    Settings that differ from the recipe's defaults go into the directory name (``name-<hash8>``), so
    a small variant never overwrites the default build. ``generic`` reads a user's own file instead of
    a catalogue recipe. ``Engine("spark", ...)`` runs the same reading and cleaning on Apache Spark
    (``pipelines.spark_engine``) and writes the same dataset; a dataset is reused whichever engine built it, since
    both give the same content.
    """
    engine = engine or Engine()
    data_root = Path(data_root) if data_root else default_data_root()
    catalogue = load_catalogue()
    if generic is None and name not in catalogue:
        raise ValueError(f"unknown dataset {name!r}; catalogue: {sorted(catalogue)} (or pass --input FILE "
                         "with --user-col/--item-col/--time-col for your own log)")
    recipe = "generic" if generic is not None else catalogue[name]["reader"]
    entry = catalogue.get(name, {})
    resolved = resolve_settings(recipe, settings, entry)
    defaults = resolve_settings(recipe, {}, entry)
    changed = {k: v for k, v in resolved.items() if defaults[k] != v}
    dir_name = name if not changed or generic is not None else f"{name}-{_short_hash(changed)[:8]}"
    target = data_root / "processed" / dir_name

    bad = BadLines(on_bad_lines)
    started = time.perf_counter()
    source = None if recipe == "synthetic" else _source_directory(name, entry, raw_dir, data_root, generic)
    digests: dict[Path, str] = {}
    input_hash = _input_hash(recipe, resolved, source, entry, generic, digests)
    if not force and _is_current(target, input_hash):
        print(f"reusing {target} (same inputs and settings)", file=sys.stderr)
        sweep_stale_temporaries(target, marker="manifest.json")  # a killed rebuild's leftovers: reusing writes nothing
        return target

    plan = _plan(recipe, name, entry, source, generic, resolved)
    manifest = {
        "name": dir_name,
        "recipe": name if generic is None else "generic",
        "reader": recipe,
        "engine": engine.name,
        "pipeline_version": PIPELINE_VERSION,
        "input_hash": input_hash,
        "settings": resolved,
        "source_files": [{"name": p.name, "sha256": digests.get(p) or sha256_file(p), "bytes": p.stat().st_size}
                         for p in plan.files],
        "timestamps_are_positions": plan.timestamps_are_positions,
        "warnings": plan.warnings,
    }
    with atomic_directory(target, marker="manifest.json") as tmp:
        if engine.name == "spark":
            from .spark_engine import build_with_spark  # PySpark is an optional extra
            build_with_spark(plan, resolved, bad, tmp, manifest, started, master=engine.master, conf=dict(engine.conf))
        else:
            _build_in_process(plan, resolved, bad, tmp, manifest, started)
    return target


def _build_in_process(plan: ReadPlan, settings: dict, bad: BadLines, directory: Path, manifest: dict,
                      started: float) -> None:
    raw = read_plan(plan, bad)
    bad.print_summary()
    log = clean_interactions(
        raw.interactions, rating_threshold=settings["rating_threshold"], dedupe=settings["dedupe"],
        min_user_interactions=settings["min_user_interactions"],
        min_item_interactions=settings["min_item_interactions"])
    valid_cut, test_cut = default_temporal_cutoffs(log.ts, settings["temporal_valid_quantile"],
                                                   settings["temporal_test_quantile"])
    manifest.update(temporal_cutoffs={"valid": valid_cut, "test": test_cut}, skipped_lines=dict(bad.skipped),
                    build_seconds=round(time.perf_counter() - started, 3))
    write_dataset(directory, log, raw.items, manifest)


def _is_current(target: Path, input_hash: str) -> bool:
    manifest = target / "manifest.json"
    if not manifest.is_file():
        return False
    try:
        return json.loads(manifest.read_text()).get("input_hash") == input_hash
    except json.JSONDecodeError:
        return False


def _input_hash(recipe: str, settings: dict, source: Path | None, entry: dict, generic: GenericInput | None,
                digests: dict[Path, str]) -> str:
    """Hash of the recipe, settings and every raw file's sha256 (``digests`` receives them, for the manifest)."""
    files: list[Path] = []
    extra = {}
    if generic is not None:
        files = input_files(generic.path)
        extra = {k: str(v) for k, v in vars(generic).items() if k != "path"}
    elif source is not None:
        # Only the files a recipe can read: a raw directory may hold unrelated large files.
        names = sorted({f for layout in entry.get("layouts", []) for f in layout})
        files = [p for p in (find_variant(source, n) for n in names) if p is not None]
    for p in files:
        digests[p] = sha256_file(p)
    return _short_hash({"recipe": recipe, "settings": settings, "files": [(p.name, digests[p]) for p in files],
                        "generic": extra,
                        "pipeline_version": PIPELINE_VERSION})


def _plan(recipe, name, entry, source, generic, resolved) -> ReadPlan:
    if recipe == "generic":
        return generic.plan()
    if recipe == "synthetic":
        config = SyntheticConfig(**{k: v for k, v in resolved.items() if k in SyntheticConfig.field_names()})
        frame = generate_interactions(config).rename(columns={"user_id": "user", "item_id": "item"})
        return ReadPlan([], frame=frame, items_frame=generate_item_text(config))
    if recipe == "movielens_100k":
        return plan_ml100k(source)
    if recipe == "movielens_dat":
        return plan_ml_dat(source)
    if recipe == "movielens_csv":
        return plan_ml_csv(source)
    if recipe == "amazon":
        return plan_amazon(source, entry["amazon_category"], entry["shared_prefix"])
    raise ValueError(f"dataset {name!r}: unknown reader {recipe!r} in the catalogue")


def _has_layout(directory: Path, entry: dict) -> bool:
    return any(all(find_variant(directory, f) for f in layout) for layout in entry.get("layouts", []))


def _source_directory(name: str, entry: dict | None, raw_dir, data_root: Path,
                      generic: GenericInput | None) -> Path | None:
    """Where the raw files are: ``--raw-dir``, else ``data/raw/<name>/``, else a verified download."""
    if generic is not None:
        input_files(generic.path)  # fails early, naming the path, when there is nothing to read
        return None
    if raw_dir is not None:
        raw_dir = Path(raw_dir)
        if not raw_dir.is_dir():
            raise FileNotFoundError(f"--raw-dir {raw_dir} is not a directory")
        return raw_dir
    default = data_root / "raw" / name
    if default.is_dir() and _has_layout(default, entry):
        return default
    download(name, entry, default)
    return default


def _expected_files(entry: dict) -> str:
    return " or ".join("[" + ", ".join(layout) + "]" for layout in entry.get("layouts", []))


def download(name: str, entry: dict, target: Path, timeout: float = 30.0) -> None:
    """Fetch the catalogue's files into ``target`` atomically, verifying sha256 where one is known."""
    if not entry.get("download"):
        raise RawDataMissingError(f"{name}: no download source is known; pass --raw-dir DIR with "
                                  f"{_expected_files(entry)}")
    with atomic_directory(target) as tmp:
        for source in entry["download"]:
            url = source["url"]
            try:
                with urllib.request.urlopen(url, timeout=timeout) as response, \
                        tempfile.NamedTemporaryFile(dir=tmp, delete=False) as out:
                    shutil.copyfileobj(response, out, 1 << 20)
                    fetched = Path(out.name)
            except (urllib.error.URLError, OSError) as exc:
                raise RawDataMissingError(
                    f"{name}: could not download {url} ({exc}). Offline? Put the raw files in a directory and "
                    f"pass --raw-dir DIR (expected {_expected_files(entry)}; see data/catalogue.json)") from None
            expected = source.get("sha256")
            if expected and sha256_file(fetched) != expected:
                raise RawDataMissingError(f"{name}: checksum mismatch for {url}; the download is corrupt or changed")
            if source.get("archive") == "zip":
                with zipfile.ZipFile(fetched) as archive:
                    for member in archive.infolist():
                        if not member.is_dir():  # flatten "ml-100k/u.data" to "u.data"
                            (tmp / Path(member.filename).name).write_bytes(archive.read(member))
                fetched.unlink()
            else:
                fetched.rename(tmp / source["file"])

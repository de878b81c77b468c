"""Dataset memory per rank (not a test): two processes load the same processed dataset at once and build its split,
as two ``torchrun`` ranks on one machine do, before and after the memory-mapped sequence cache.

Each process reports, at each stage (after imports, after ``load_dataset``, after ``split()``), its VmRSS (with the
anonymous / file-backed parts) from /proc/self/status, its ru_maxrss, and its PSS from /proc/self/smaps_rollup. PSS
divides every shared page between the processes that map it, so it is the honest per-rank figure: with the cache the
sequences are file pages shared by both ranks (RSS counts them in full in each, PSS half in each). Both processes are
held at a barrier at every stage so that each measurement sees the other process alive at the same stage.

Modes: ``before`` runs the pipelines package of ``--baseline-rev`` (default: the commit before the cache was added,
extracted with ``git archive``); ``after_cold`` deletes the cache first, so the two processes race to create it;
``after_warm`` finds it in place. Datasets: Amazon Beauty (when ../shared/data/amazon-beauty exists) and the ~20M-event
synthetic log (``--users 800000``).

Writes reports/benchmarks/dataset_memory.json. Usage: ``python tests/benchmarks/dataset_memory.py
[--data-root DIR] [--users 800000] [--skip-large]``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from io import BytesIO
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from kernels.atomic import atomic_write_bytes  # noqa: E402

BEAUTY = REPO.parent / "shared" / "data" / "amazon-beauty"

CHILD = r"""
import json, resource, sys, time
code, path = sys.argv[1], sys.argv[2]
sys.path.insert(0, code)
from pipelines.dataset import load_dataset

def memory():
    status = dict(line.split(":", 1) for line in open("/proc/self/status") if ":" in line)
    rollup = dict(line.split(":", 1) for line in open("/proc/self/smaps_rollup").read().splitlines()[1:])
    mb = lambda table, key: int(table[key].split()[0]) / 1024 if key in table else None
    return {"rss_mb": mb(status, "VmRSS"), "rss_anon_mb": mb(status, "RssAnon"), "rss_file_mb": mb(status, "RssFile"),
            "pss_mb": mb(rollup, "Pss"), "pss_anon_mb": mb(rollup, "Pss_Anon"), "pss_file_mb": mb(rollup, "Pss_File"),
            "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}

def barrier(stage, **extra):
    print("ready", flush=True)
    sys.stdin.readline()
    print(json.dumps({"stage": stage, **memory(), **extra}), flush=True)
    sys.stdin.readline()

barrier("imported")
start = time.perf_counter()
ds = load_dataset(path)
barrier("loaded", seconds=time.perf_counter() - start, mapped=not ds.sequences.items.flags.owndata)
start = time.perf_counter()
split = ds.split()
barrier("split", seconds=time.perf_counter() - start)
"""


def _send(procs, line: str = "\n") -> None:
    for p in procs:
        p.stdin.write(line)
        p.stdin.flush()


def _read(p) -> str:
    line = p.stdout.readline()
    if not line:
        raise RuntimeError(f"benchmark child exited early: {p.stderr.read()}")
    return line.strip()


def run_pair(code: Path, dataset: Path, stages: int = 3) -> list[dict]:
    """Two children loading ``dataset`` with the pipelines package under ``code``; per stage, both measurements."""
    procs = [subprocess.Popen([sys.executable, "-c", CHILD, str(code), str(dataset)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results: list[list[dict]] = [[], []]
    try:
        for _ in range(stages):
            for p in procs:
                assert _read(p) == "ready"
            _send(procs)  # measure
            for i, p in enumerate(procs):
                results[i].append(json.loads(_read(p)))
            _send(procs)  # go on to the next stage, both at once
        for p in procs:
            p.wait(timeout=600)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return [{"process": i, "stages": stages_} for i, stages_ in enumerate(results)]


def baseline_code(rev: str | None, into: Path) -> tuple[str, Path]:
    """The pipelines package as of ``rev`` (default: the parent of the commit that added the cache)."""
    if rev is None:
        added = subprocess.run(["git", "log", "--diff-filter=A", "--format=%H", "--", "pipelines/sequence_cache.py"],
                               cwd=REPO, check=True, capture_output=True, text=True).stdout.split()
        rev = f"{added[-1]}^"
    sha = subprocess.run(["git", "rev-parse", rev], cwd=REPO, check=True, capture_output=True, text=True).stdout.strip()
    archive = subprocess.run(["git", "archive", sha, "pipelines"], cwd=REPO, check=True, capture_output=True).stdout
    with tarfile.open(fileobj=BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    return sha, into


def build(name: str, raw: Path | None, root: Path, **settings) -> Path:
    code = ("import sys; sys.path.insert(0, sys.argv[1]); from pipelines.build import build_dataset; "
            f"print(build_dataset({name!r}, {str(raw) if raw else None!r}, data_root=sys.argv[2], **{settings!r}))")
    out = subprocess.run([sys.executable, "-c", code, str(REPO), str(root)], check=True, capture_output=True, text=True)
    return Path(out.stdout.strip().splitlines()[-1])


def summarise(pair: list[dict]) -> dict:
    """Per stage, the mean over the two processes (they differ only in who wrote the cache)."""
    out = {}
    for s, stage in enumerate(pair[0]["stages"]):
        rows = [p["stages"][s] for p in pair]
        out[stage["stage"]] = {k: round(sum(r[k] for r in rows) / 2, 1) for k in stage
                               if k.endswith("_mb") and stage[k] is not None}
        if "seconds" in stage:
            out[stage["stage"]]["seconds"] = round(max(r["seconds"] for r in rows), 3)
    return out


def bench(dataset: Path, baseline: Path) -> dict:
    from pipelines.sequence_cache import cache_path

    manifest = json.loads((dataset / "manifest.json").read_text())
    result = {"dataset": dataset.name, "users": manifest["counts"]["users"],
              "events": manifest["counts"]["interactions"],
              "sequences_parquet_mb": round((dataset / "sequences.parquet").stat().st_size / 2**20, 1)}
    shutil.rmtree(dataset / "cache", ignore_errors=True)  # the baseline code never sees a cache
    raw = {"before": run_pair(baseline, dataset)}
    raw["after_cold"] = run_pair(REPO, dataset)  # no cache yet: the two race to write it
    result["cache_mb"] = round(cache_path(dataset).stat().st_size / 2**20, 1)
    raw["after_warm"] = run_pair(REPO, dataset)
    result.update({mode: summarise(pair) for mode, pair in raw.items()})
    result["per_process"] = raw
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=800_000, help="synthetic users (~25 events each: ~20M events)")
    parser.add_argument("--data-root", help="where to build (or reuse) the datasets; default: a temporary directory")
    parser.add_argument("--baseline-rev", help="git revision whose pipelines/ is 'before'")
    parser.add_argument("--skip-large", action="store_true", help="only Amazon Beauty")
    parser.add_argument("--out", default=str(REPO / "reports" / "benchmarks" / "dataset_memory.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.data_root) if args.data_root else Path(tmp) / "data"
        sha, baseline = baseline_code(args.baseline_rev, Path(tmp) / "baseline")
        result: dict = {"baseline_rev": sha, "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        if BEAUTY.is_dir():
            result["beauty"] = bench(build("amazon-beauty", BEAUTY, root), baseline)
        else:
            result["beauty"] = {"skipped": "../shared/data/amazon-beauty not present"}
        if not args.skip_large:
            result["synthetic_20m"] = bench(build("synthetic", None, root, num_users=args.users), baseline)
    result["machine"] = {"cpus": __import__("os").cpu_count(), "python": sys.version.split()[0]}
    atomic_write_bytes(Path(args.out), (json.dumps(result, indent=2) + "\n").encode())
    print(json.dumps({k: v if not isinstance(v, dict) else {m: v.get(m) for m in ("before", "after_cold",
                      "after_warm", "skipped") if m in v} for k, v in result.items()}, indent=2))


if __name__ == "__main__":
    main()

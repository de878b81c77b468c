"""Pipeline benchmark (not a test): how fast raw logs become processed datasets, and at what memory.

Measures, each against a baseline taken in the same run (the machines are shared and noisy):
- Amazon Beauty (../shared/data/amazon-beauty, when present): a full forced build vs. the I/O floor of
  just parsing the raw TSV with pyarrow; acceptance: build < 5 s.
- A ~20M-row synthetic log, built in a child process so its peak RSS is measured alone: the full build
  (generate, dedupe, k-core, sort, write Parquet) vs. generation alone; acceptance: < 120 s, < 6 GB.

Writes reports/benchmarks/pipeline.json. Usage: ``make bench`` or
``python tests/benchmarks/pipeline.py [--users 800000]``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from kernels.atomic import atomic_write_bytes  # noqa: E402

BEAUTY = REPO.parent / "shared" / "data" / "amazon-beauty"

CHILD = """
import json, resource, sys, time
sys.path.insert(0, {repo!r})
from pipelines.build import build_dataset
from pipelines.synthetic import SyntheticConfig, generate_interactions
mode, users, root = sys.argv[1], int(sys.argv[2]), sys.argv[3]
start = time.perf_counter()
if mode == "generate":
    rows = len(generate_interactions(SyntheticConfig(num_users=users)))
else:
    path = build_dataset("synthetic", data_root=root, force=True, num_users=users)
    rows = json.load(open(path / "manifest.json"))["counts"]["interactions"]
seconds = time.perf_counter() - start
print(json.dumps({{"seconds": seconds, "rows": rows,
                  "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}}))
"""


def run_child(mode: str, users: int, root: str) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD.format(repo=str(REPO)), mode, str(users), root],
                         check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench_beauty(root: Path, repeats: int = 3) -> dict:
    import pyarrow.csv as pacsv

    from pipelines.build import build_dataset

    if not BEAUTY.is_dir():
        return {"skipped": "../shared/data/amazon-beauty not present"}
    build_dataset("amazon-beauty", BEAUTY, data_root=root)  # warm the imports and the page cache
    builds, floors = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        path = build_dataset("amazon-beauty", BEAUTY, data_root=root, force=True)
        builds.append(time.perf_counter() - start)
        start = time.perf_counter()
        pacsv.read_csv(BEAUTY / "beauty_5core_interactions.tsv.gz",
                       parse_options=pacsv.ParseOptions(delimiter="\t"))
        floors.append(time.perf_counter() - start)
    counts = json.loads((path / "manifest.json").read_text())["counts"]
    return {"build_seconds": min(builds), "raw_parse_seconds": min(floors),
            "ratio_build_to_raw_parse": min(builds) / min(floors), "counts": counts,
            "target_seconds": 5.0, "meets_target": min(builds) < 5.0}


def bench_large(root: Path, users: int) -> dict:
    generate = run_child("generate", users, str(root))
    build = run_child("build", users, str(root))
    return {"rows": build["rows"], "users": users, "build_seconds": build["seconds"],
            "generate_only_seconds": generate["seconds"],
            "ratio_build_to_generate": build["seconds"] / generate["seconds"],
            "peak_rss_gb": build["peak_rss_gb"], "generate_only_peak_rss_gb": generate["peak_rss_gb"],
            "target_seconds": 120.0, "target_peak_gb": 6.0,
            "meets_target": build["seconds"] < 120.0 and build["peak_rss_gb"] < 6.0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=840_000, help="synthetic users (about 24 events each)")
    parser.add_argument("--out", default=str(REPO / "reports" / "benchmarks" / "pipeline.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        result = {"beauty": bench_beauty(Path(tmp) / "beauty"), "synthetic_20m": bench_large(Path(tmp) / "big",
                                                                                              args.users)}
    result["machine"] = {"cpus": __import__("os").cpu_count(), "python": sys.version.split()[0]}
    out = Path(args.out)
    atomic_write_bytes(out, (json.dumps(result, indent=2) + "\n").encode())
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

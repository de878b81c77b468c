"""Both dataset engines on the same large synthetic logs (not a test): wall time and peak memory, same run.

The log (the synthetic generator's structure, ``--events`` events, users and items as integer ids) is written as
Parquet part files of about 5M events, the form a cluster keeps logs in. Each engine then builds the processed
dataset from those parts in its own process tree, watched every 0.2 s:
- in-process (pyarrow/pandas, one process): peak resident memory; stopped when it passes ``--memory-cap-gb``
  (default 20), which records the size at which it no longer fits;
- Spark (``local[2]``, driver memory capped at 4 GB): peak resident memory of the whole tree (driver JVM, its Python
  workers and the build's own Python process).
When both finish, their content hashes must agree.

Writes reports/benchmarks/pipeline_engines.json. Usage:
``python tests/benchmarks/pipeline_engines.py --events 20000000 100000000``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from kernels.atomic import atomic_write_bytes  # noqa: E402

_EVENTS_PER_PART = 5_000_000
_MEAN_LEN = 25  # events per user of the generator's default length distribution

WRITE_PARTS = """
import sys
sys.path.insert(0, {repo!r})
import pyarrow as pa, pyarrow.parquet as pq
from pipelines.synthetic import SyntheticConfig, generate_interactions
folder, part, users, items = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
frame = generate_interactions(SyntheticConfig(num_users=users, num_items=items, num_clusters=200, seed=part))
frame["user_id"] += part * users  # one log: each part holds users of its own
pq.write_table(pa.Table.from_pandas(frame[["user_id", "item_id", "ts"]], preserve_index=False),
               f"{{folder}}/part-{{part:05d}}.parquet")
"""


def write_log(folder: Path, events: int, items: int) -> dict:
    """The log's part files (reused when a complete earlier copy is in ``folder``)."""
    marker = folder / "_COMPLETE"  # names starting with _ are not data (pipelines.readers_generic.input_files)
    if marker.is_file():
        return json.loads(marker.read_text())
    folder.mkdir(parents=True, exist_ok=True)
    parts = max(1, round(events / _EVENTS_PER_PART))
    users = events // _MEAN_LEN // parts
    start = time.perf_counter()
    for part in range(parts):
        subprocess.run([sys.executable, "-c", WRITE_PARTS.format(repo=str(REPO)), str(folder), str(part), str(users),
                        str(items)], check=True)
    size = sum(p.stat().st_size for p in folder.iterdir())
    info = {"parts": parts, "users_per_part": users, "bytes": size, "seconds": round(time.perf_counter() - start, 1)}
    marker.write_text(json.dumps(info))
    return info


def tree_rss(pid: int) -> dict[str, int]:
    """Resident bytes of ``pid`` and all its descendants (from /proc), by program name (java, python, ...)."""
    children: dict[int, list[int]] = {}
    rss: dict[int, tuple[str, int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                name, rest = f.read().split(" (", 1)[1].rsplit(")", 1)
            fields = rest.split()
            children.setdefault(int(fields[1]), []).append(int(entry))
            rss[int(entry)] = (name, int(fields[21]) * os.sysconf("SC_PAGE_SIZE"))
        except (OSError, IndexError, ValueError):
            continue
    by_name: dict[str, int] = {}
    stack = [pid]
    while stack:
        p = stack.pop()
        if p in rss:
            name = "python" if rss[p][0].startswith("python") else rss[p][0]
            by_name[name] = by_name.get(name, 0) + rss[p][1]
        stack.extend(children.get(p, []))
    return by_name


def run_watched(command: list[str], cap_bytes: int, env: dict | None = None) -> dict:
    """Run ``command`` in its own process group; peak tree RSS; killed (status "over memory cap") past the cap."""
    start = time.perf_counter()
    proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, env=env)
    peak, at_peak, status = 0, {}, "ok"
    while proc.poll() is None:
        now = tree_rss(proc.pid)
        if sum(now.values()) > peak:
            peak, at_peak = sum(now.values()), now
        if peak > cap_bytes:
            os.killpg(proc.pid, signal.SIGKILL)
            status = "over memory cap"
            break
        time.sleep(0.2)
    out, err = proc.communicate()
    seconds = time.perf_counter() - start
    if status == "ok" and proc.returncode != 0:
        status = f"failed: {err.strip().splitlines()[-1] if err.strip() else proc.returncode}"
    return {"status": status, "seconds": round(seconds, 1), "peak_rss_gb": round(peak / 2**30, 2),
            "at_peak_gb_by_program": {k: round(v / 2**30, 2) for k, v in at_peak.items()},
            "path": out.strip().splitlines()[-1] if status == "ok" and out.strip() else None}


def build_command(parts: Path, root: Path, engine: str) -> list[str]:
    command = [sys.executable, "-m", "recsys", "data", "build", "--dataset", "bench", "--input", str(parts),
               "--user-col", "user_id", "--item-col", "item_id", "--time-col", "ts", "--data-root", str(root),
               "--force"]
    if engine == "spark":
        command += ["--engine", "spark", "--spark-master", "local[2]", "--spark-conf", "spark.driver.memory=4g"]
    return command


def bench(events: int, work: Path, cap_gb: float, engines: list[str], keep_log: bool) -> dict:
    parts = work / f"log-{events}"
    result = {"events_requested": events, "log": write_log(parts, events, items=max(10_000, events // 1000))}
    for engine in engines:
        root = work / f"data-{engine}"
        result[engine] = run_watched(build_command(parts, root, engine), int(cap_gb * 2**30))
        path = result[engine].pop("path")
        if path:
            manifest = json.loads((Path(path) / "manifest.json").read_text())
            result[engine].update(content_hash=manifest["content_hash"], counts=manifest["counts"])
        shutil.rmtree(root, ignore_errors=True)
    done = [e for e in engines if result[e]["status"] == "ok"]
    if len(done) == 2:
        result["same_content_hash"] = result[done[0]]["content_hash"] == result[done[1]]["content_hash"]
        result["ratio_spark_to_inprocess_seconds"] = round(result["spark"]["seconds"] /
                                                           result["inprocess"]["seconds"], 2)
    if not keep_log:
        shutil.rmtree(parts, ignore_errors=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, nargs="+", default=[20_000_000, 100_000_000])
    parser.add_argument("--engines", nargs="+", default=["inprocess", "spark"])
    parser.add_argument("--memory-cap-gb", type=float, default=20.0)
    parser.add_argument("--work", default=None, help="scratch folder, where the logs are kept for the next run "
                        "(default: a temporary one, removed)")
    parser.add_argument("--out", default=str(REPO / "reports" / "benchmarks" / "pipeline_engines.json"))
    args = parser.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="engines-"))
    report = {"machine": {"cores": os.cpu_count()}, "memory_cap_gb": args.memory_cap_gb,
              "spark": {"master": "local[2]", "driver_memory": "4g"}, "runs": []}
    for events in args.events:
        report["runs"].append(bench(events, work, args.memory_cap_gb, args.engines, keep_log=args.work is not None))
        print(json.dumps(report["runs"][-1], indent=2), flush=True)
        atomic_write_bytes(args.out, json.dumps(report, indent=2).encode())
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()

"""The REST service under load, driven by wrk (a C load generator: a Python client caps near 200 req/s on these
two cores and would measure itself). Not a test; writes reports/benchmarks/serving_load.json (issue [6]).

Against SASRec trained on Amazon Beauty (``--bundle``; default runs/amazon-beauty/sasrec/seed-42, trained when
missing), k = 10, histories of 1–50 items drawn by popularity:

1. ``load``: concurrency 1 and 32, beside the in-run baseline: the same service with the garbage collector's
   freeze of loaded objects turned off and an unbounded queue (the service as it was before).
2. ``overload``: concurrency 256 (wrk ignores Retry-After and resends at once) against a queue of 64 queries:
   refused requests get 503 with Retry-After before their body is read; the share refused, the requests answered
   per second, the latency of all responses.
3. ``slow_clients``: concurrency 32 alone, beside 16 clients sending their body one byte every 20 ms, and beside
   8 clients that pipeline requests and never read the answers, and beside 8 that pipeline and read (the control:
   the same extra clients when they behave); the slow-body requests must still be answered.
4. ``soak``: 200,000 requests at concurrency 32 in ten tenths, a hot reload every 10 s: errors, resident memory
   after each tenth, p50/p99 of each tenth, the reload statuses.

Usage: ``python tests/benchmarks/serving_load.py [--bundle DIR] [--soak-requests N]`` (needs ``wrk`` on PATH;
``make bench-serving-load`` installs Debian's).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import httpx  # noqa: E402

from kernels.atomic import atomic_write_bytes  # noqa: E402
from served import Server, beauty_bundle, histories  # noqa: E402

# wrk's Lua side: cycle through the request bodies and print the summary as JSON (latency in microseconds).
WRK_SCRIPT = r"""
local bodies = {}
for line in io.lines(os.getenv("WRK_BODIES")) do bodies[#bodies + 1] = line end
local i = 0
init = function(args) i = math.random(#bodies) end
request = function()
  i = i % #bodies + 1
  return wrk.format("POST", "/v1/recommend", {["Content-Type"] = "application/json"}, bodies[i])
end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format('WRK_JSON {"requests": %d, "seconds": %.3f, "non_2xx": %d, "socket_errors": %d, ' ..
    '"p50_ms": %.3f, "p90_ms": %.3f, "p99_ms": %.3f, "max_ms": %.3f}\n', summary.requests,
    summary.duration / 1e6, e.status, e.connect + e.read + e.write + e.timeout, latency:percentile(50) / 1e3,
    latency:percentile(90) / 1e3, latency:percentile(99) / 1e3, latency.max / 1e3))
end
"""

# The baseline service: today's code with the two load measures undone (the GC freeze, the bounded queue).
BASELINE = ("import sys, serving.app; serving.app.freeze_loaded_objects = lambda: None; "
            "from recsys.cli import main; sys.exit(main(sys.argv[1:]))")


def wrk(base: str, bodies: Path, concurrency: int, seconds: float) -> dict:
    """One wrk run of ``seconds`` (2 threads)."""
    env = {**os.environ, "WRK_BODIES": str(bodies)}
    script = bodies.with_suffix(".lua")
    script.write_text(WRK_SCRIPT)
    done = subprocess.run(["wrk", "-t", str(min(2, concurrency)), "-c", str(concurrency), "-d", f"{seconds:.0f}s",
                           "--timeout", "10s",
                           "-s", str(script), base], env=env, capture_output=True, text=True, check=True)
    line = next(ln for ln in done.stdout.splitlines() if ln.startswith("WRK_JSON "))
    out = json.loads(line.removeprefix("WRK_JSON "))
    out["requests_per_second"] = round(out["requests"] / out["seconds"], 1)
    out["p99_over_p50"] = round(out["p99_ms"] / out["p50_ms"], 2)
    return out


def resident_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    raise RuntimeError("no VmRSS")


def start(bundle: Path, cache: Path, *extra: str, baseline: bool = False) -> Server:
    command = ["-c", BASELINE] if baseline else None
    return Server(bundle, "--max-queue", "1000000" if baseline else "256", *extra, roots=[bundle.parent],
                  cache=cache, python_args=command)


def bench_load(bundle: Path, bodies: Path, cache: Path, seconds: float) -> dict:
    """Each service alone on the machine in turn, warmed up, then concurrency 1 and 32."""
    out = {}
    for name, baseline in (("service", False), ("baseline_no_gc_freeze_unbounded_queue", True)):
        server = start(bundle, cache, baseline=baseline)
        try:
            wrk(server.base, bodies, 8, seconds=5)
            out[name] = {"concurrency_1": wrk(server.base, bodies, 1, seconds=seconds),
                         "concurrency_32": wrk(server.base, bodies, 32, seconds=seconds)}
        finally:
            server.stop()
    service, base = out["service"]["concurrency_32"], out["baseline_no_gc_freeze_unbounded_queue"]["concurrency_32"]
    out["throughput_ratio_vs_baseline"] = round(service["requests_per_second"] / base["requests_per_second"], 2)
    out["p99_ratio_vs_baseline"] = round(service["p99_ms"] / base["p99_ms"], 2)
    return out


def bench_overload(bundle: Path, bodies: Path, cache: Path, seconds: float) -> dict:
    server = start(bundle, cache, "--max-queue", "64")
    try:
        wrk(server.base, bodies, 8, seconds=5)
        before = answered(server.base)
        over = wrk(server.base, bodies, 256, seconds=seconds)
        over["answered_per_second"] = round((answered(server.base) - before) / over["seconds"], 1)
    finally:
        server.stop()
    over["refused_share"] = round(over["non_2xx"] / over["requests"], 3)
    return over


class SlowClients:
    """``n_body`` clients sending a request body one byte every ``gap`` seconds (each answer's status kept),
    ``n_deaf`` clients that pipeline requests and never read, and ``n_readers`` that pipeline the same way but read
    every answer (the control: what the same clients cost when they behave), all on their own threads until
    ``stop()``."""

    def __init__(self, port: int, body: bytes, n_body: int = 8, n_deaf: int = 8, n_readers: int = 0,
                 gap: float = 0.02):
        self.port, self.body, self.gap = port, body, gap
        self.statuses: list[int] = []
        self.halt = threading.Event()
        self.threads = [threading.Thread(target=self.slow_body, daemon=True) for _ in range(n_body)]
        self.threads += [threading.Thread(target=self.pipeline, args=(False,), daemon=True) for _ in range(n_deaf)]
        self.threads += [threading.Thread(target=self.pipeline, args=(True,), daemon=True) for _ in range(n_readers)]
        for t in self.threads:
            t.start()

    def head(self) -> bytes:
        return (b"POST /v1/recommend HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n" % len(self.body))

    def slow_body(self) -> None:
        while not self.halt.is_set():
            with socket.create_connection(("127.0.0.1", self.port), timeout=60) as s:
                s.sendall(self.head())
                for byte in self.body:
                    s.sendall(bytes([byte]))
                    time.sleep(self.gap)
                self.statuses.append(int(s.recv(64)[9:12]))

    def pipeline(self, read: bool) -> None:
        with socket.create_connection(("127.0.0.1", self.port), timeout=60) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            if read:
                threading.Thread(target=self.drain, args=(s,), daemon=True).start()
            request = self.head() + self.body
            while not self.halt.is_set():
                try:
                    s.settimeout(1)
                    s.sendall(request)  # blocks once the server stops reading us: that is the point
                except OSError:
                    time.sleep(0.2)
            self.halt.wait()

    def drain(self, s: socket.socket) -> None:
        while not self.halt.is_set():
            try:
                s.recv(65536)
            except OSError:
                time.sleep(0.05)

    def stop(self) -> None:
        self.halt.set()
        for t in self.threads:
            t.join(timeout=30)


def answered(base: str) -> int:
    """Recommend requests the server has answered with 200 so far (its /metrics)."""
    text = httpx.get(f"{base}/metrics").text
    return sum(int(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith('recsys_requests_total{method="POST",route="/v1/recommend",status="200"}'))


def bench_slow_clients(bundle: Path, bodies: Path, cache: Path, seconds: float) -> dict:
    """wrk at concurrency 32 alone, beside 16 slow-body clients, beside 8 clients that never read, and beside 8
    that pipeline the same way but read (the control); the requests the server answered beyond wrk's are the other
    clients' (a never-reading client's pipelined requests are real work until flow control stops reading it)."""
    server = start(bundle, cache)
    body = bodies.read_text().splitlines()[0].encode()
    out = {"slow_body_bytes": len(body)}
    try:
        wrk(server.base, bodies, 8, seconds=5)
        for case, n_body, n_deaf, n_readers in (("alone", 0, 0, 0), ("beside_16_slow_bodies", 16, 0, 0),
                                                ("beside_8_never_reading", 0, 8, 0),
                                                ("beside_8_pipelining_readers", 0, 0, 8)):
            before = answered(server.base)
            slow = (SlowClients(server.port, body, n_body=n_body, n_deaf=n_deaf, n_readers=n_readers)
                    if n_body or n_deaf or n_readers else None)
            try:
                run = wrk(server.base, bodies, 32, seconds=seconds)
            finally:
                if slow is not None:
                    slow.stop()
            run["answered_to_slow_clients"] = answered(server.base) - before - run["requests"]
            if n_body:
                run["slow_body_statuses"] = slow.statuses
            out[case] = run
        out["ok_after"] = httpx.post(f"{server.base}/v1/recommend", content=body,
                                     headers={"Content-Type": "application/json"}).status_code == 200
    finally:
        server.stop()
    for case in ("beside_16_slow_bodies", "beside_8_never_reading", "beside_8_pipelining_readers"):
        out[case]["throughput_ratio"] = round(out[case]["requests_per_second"] / out["alone"]["requests_per_second"], 2)
        out[case]["p99_ratio"] = round(out[case]["p99_ms"] / out["alone"]["p99_ms"], 2)
    return out


def bench_soak(bundle: Path, bodies: Path, cache: Path, total: int, reload_every: float) -> dict:
    server = start(bundle, cache)
    reloads: list[int] = []
    halt = threading.Event()

    def reloader():
        with httpx.Client(base_url=server.base, timeout=120) as client:
            while not halt.wait(reload_every):
                reloads.append(client.post("/v1/models/reload", json={"source": str(bundle)}).status_code)

    tenths = []
    try:
        # wrk runs for a time, not a count: each tenth lasts what a tenth of ``total`` takes at the warm-up's rate
        rate = wrk(server.base, bodies, 32, seconds=10)["requests_per_second"]
        thread = threading.Thread(target=reloader, daemon=True)
        thread.start()
        for _ in range(10):
            run = wrk(server.base, bodies, 32, seconds=max(1.0, 1.1 * total / 10 / rate))
            run["resident_mb_after"] = resident_mb(server.proc.pid)
            tenths.append(run)
        halt.set()
        thread.join(timeout=180)
    finally:
        halt.set()
        server.stop()
    first, last = tenths[0], tenths[-1]
    return {"requests": sum(t["requests"] for t in tenths), "errors": sum(t["non_2xx"] + t["socket_errors"]
                                                                         for t in tenths),
            "reloads": {str(code): reloads.count(code) for code in sorted(set(reloads))},
            "resident_growth": round(last["resident_mb_after"] / first["resident_mb_after"] - 1, 4),
            "first_tenth": first, "last_tenth": last, "tenths": tenths}


def main() -> None:
    import pandas as pd

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, default=None)
    parser.add_argument("--seconds", type=float, default=20, help="length of each load, overload and slow run")
    parser.add_argument("--soak-requests", type=int, default=200_000)
    parser.add_argument("--reload-every", type=float, default=10.0)
    parser.add_argument("--only", nargs="*", default=["load", "overload", "slow_clients", "soak"])
    parser.add_argument("--out", type=Path, default=REPO / "reports" / "benchmarks" / "serving_load.json")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("wrk is not on PATH: `apt-get install wrk` (make bench-serving-load does it)")
    cache = REPO / ".cache" / "serving-bench"
    cache.mkdir(parents=True, exist_ok=True)
    bundle = beauty_bundle(args.bundle)
    items = pd.read_parquet(bundle / "items.parquet")
    bodies = cache / "bodies.txt"
    bodies.write_text("".join(json.dumps({"history": [str(i) for i in h], "k": 10, "exclude_seen": True}) + "\n"
                              for h in histories(items["item_id"].astype(str).to_numpy(),
                                                 items["popularity"].to_numpy(float), 2000)))
    result = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform()}, "bundle": str(bundle),
              "wrk": subprocess.run(["wrk", "--version"], capture_output=True, text=True).stdout.split("\n")[0]}
    if "load" in args.only:
        result["load"] = bench_load(bundle, bodies, cache, args.seconds)
    if "overload" in args.only:
        result["overload"] = bench_overload(bundle, bodies, cache, args.seconds)
    if "slow_clients" in args.only:
        result["slow_clients"] = bench_slow_clients(bundle, bodies, cache, args.seconds)
    if "soak" in args.only:
        result["soak"] = bench_soak(bundle, bodies, cache, args.soak_requests, args.reload_every)
    atomic_write_bytes(args.out, (json.dumps(result, indent=2) + "\n").encode())
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

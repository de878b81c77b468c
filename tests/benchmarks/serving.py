"""Serving benchmark (not a test): ``recsys serve`` in its own process, driven over HTTP on 127.0.0.1 from this
process (issue [4]). Writes reports/benchmarks/serving.json.

1. SASRec trained on Amazon Beauty (``--bundle``; default runs/amazon-beauty/sasrec/seed-42, trained when missing):
   - latency at concurrency 1 (p50/p95/p99 over ``--latency-requests`` sequential requests);
   - throughput at concurrency 32 over ``--requests`` requests, with two hot reloads during the load; errors
     and failed reloads are counted;
   - the same load with micro-batching off (``--max-batch 1``): the in-run baseline for the batching gain.
2. A synthetic 1,000,000-item catalogue (clustered item vectors in a random SASRec): index build time, the
   approximate index's recall@10 against exact search measured on real recommend requests, and p99 at
   concurrency 1, beside the same catalogue served with an exact index (the in-run baseline).

Requests are histories of 1–50 items drawn by popularity from the bundle's catalogue, k = 10, exclude_seen on.
Usage: ``python tests/benchmarks/serving.py [--bundle DIR] [--skip-large]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import httpx  # noqa: E402

from kernels.atomic import atomic_write_bytes  # noqa: E402
from served import Server, beauty_bundle, histories  # noqa: E402


def summary(latencies: list[float], seconds: float, errors: int) -> dict:
    ms = np.array(latencies) * 1000
    return {"requests": len(latencies), "errors": errors, "seconds": round(seconds, 2),
            "requests_per_second": round(len(latencies) / seconds, 1),
            "p50_ms": round(float(np.percentile(ms, 50)), 2), "p95_ms": round(float(np.percentile(ms, 95)), 2),
            "p99_ms": round(float(np.percentile(ms, 99)), 2), "max_ms": round(float(ms.max()), 2)}


class Connection:
    """A minimal HTTP/1.1 keep-alive client on asyncio streams. The driver shares this machine's two cores with
    the server, so it must cost far less per request than the server does (httpx costs about as much)."""

    def __init__(self, base: str):
        host, port = base.removeprefix("http://").split(":")
        self.host, self.port = host, int(port)
        self.reader = self.writer = None

    async def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        self.writer.write(b"POST %s HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
                          b"Content-Length: %d\r\n\r\n%s" % (path.encode(), self.host.encode(), len(body), body))
        head = await self.reader.readuntil(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n")[1:]:
            if line[:15].lower() == b"content-length:":
                length = int(line[15:])
        return int(head[9:12]), await self.reader.readexactly(length)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


async def drive(base: str, bodies: list[dict], concurrency: int, total: int, reload_after: list[float] = (),
                reload_source: str | None = None) -> dict:
    """``concurrency`` clients on keep-alive connections send ``total`` requests; reloads at the given seconds.
    A request counts as an error unless it gets 200 with exactly k items."""
    encoded = [(json.dumps(b).encode(), b["k"]) for b in bodies]
    latencies, errors, reloads = [], 0, []
    next_index = 0

    async def worker():
        nonlocal next_index, errors
        connection = Connection(base)
        try:
            while next_index < total:
                body, k = encoded[next_index % len(encoded)]
                next_index += 1
                start = time.perf_counter()
                try:
                    status, data = await connection.post("/v1/recommend", body)
                    ok = status == 200 and len(json.loads(data)["items"]) == k
                except (OSError, asyncio.IncompleteReadError, ValueError):
                    ok, connection = False, Connection(base)
                latencies.append(time.perf_counter() - start)
                errors += not ok
        finally:
            connection.close()

    async def reloader():
        async with httpx.AsyncClient(base_url=base, timeout=120) as client:
            for at in reload_after:
                await asyncio.sleep(max(0.0, at - (time.perf_counter() - began)))
                response = await client.post("/v1/models/reload", json={"source": reload_source})
                reloads.append(response.status_code)

    began = time.perf_counter()
    await asyncio.gather(reloader(), *[worker() for _ in range(concurrency)])
    seconds = time.perf_counter() - began
    out = summary(latencies, seconds, errors)
    if reload_after:
        out["reload_statuses"] = reloads
    return out


def bench_beauty(bundle: Path, args, cache: Path) -> dict:
    import pandas as pd

    items = pd.read_parquet(bundle / "items.parquet")
    bodies = [{"history": h, "k": 10, "exclude_seen": True}
              for h in histories(items["item_id"].astype(str).to_numpy(), items["popularity"].to_numpy(float), 2000)]
    out = {"bundle": str(bundle), "catalogue": int(len(items))}
    server = Server(bundle, roots=[bundle.parent], cache=cache)
    try:
        asyncio.run(drive(server.base, bodies, 8, 500))  # warm-up
        out["concurrency_1"] = asyncio.run(drive(server.base, bodies, 1, args.latency_requests))
        out["concurrency_32"] = asyncio.run(drive(server.base, bodies, 32, args.requests, reload_after=[4.0, 12.0],
                                                  reload_source=str(bundle)))
    finally:
        server.stop()
    server = Server(bundle, "--max-batch", "1", roots=[bundle.parent], cache=cache)
    try:
        asyncio.run(drive(server.base, bodies, 8, 500))
        out["concurrency_32_no_microbatching"] = asyncio.run(drive(server.base, bodies, 32, args.requests // 4))
    finally:
        server.stop()
    out["microbatching_throughput_ratio"] = round(out["concurrency_32"]["requests_per_second"]
                                                  / out["concurrency_32_no_microbatching"]["requests_per_second"], 2)
    return out


def synthetic_catalogue(path: Path, num_items: int, seed: int = 0) -> Path:
    """A random SASRec whose item vectors form 2,000 clusters (item tables of trained models are clustered)."""
    import pandas as pd
    import torch

    import recsys.models  # noqa: F401
    from recsys.bundle import save_bundle
    from recsys.models.base import build_model

    if (path / "config.json").is_file():
        return path
    torch.manual_seed(seed)
    model = build_model("sasrec", num_items, {"hidden_size": 64, "max_len": 50})
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(2000, 64, generator=gen)
    members = torch.randint(0, 2000, (num_items,), generator=gen)
    table = centres[members] + 0.5 * torch.randn(num_items, 64, generator=gen)
    with torch.no_grad():
        model.item_embedding.weight[1:] = table * 0.1
    idx = np.arange(1, num_items + 1)
    items = pd.DataFrame({"item_idx": idx, "item_id": [f"s{i}" for i in idx],
                          "popularity": np.random.default_rng(seed).zipf(1.5, num_items).clip(max=10**6)})
    return save_bundle(path, model.eval(), {"exclude_seen": True}, items, {})


def recall_vs_exact(base: str, bundle: Path, bodies: list[dict]) -> float:
    """Recall@10 of the served (approximate) answers against exact search over the same query vectors."""
    import torch

    from recsys.batching import pad_histories
    from recsys.bundle import load_bundle

    b = load_bundle(bundle)
    hits = []
    with httpx.Client(base_url=base, timeout=60) as client, torch.no_grad():
        table = b.model.item_embeddings()[1:]
        for body in bodies:
            served = [it["item_id"] for it in client.post("/v1/recommend", json=body).json()["items"]]
            idx = np.array([int(i[1:]) for i in body["history"]])
            query = b.model.encode(pad_histories([(idx, np.zeros_like(idx))], b.model.config.max_len))
            exact = {f"s{i + 1}" for i in (query @ table.T)[0].topk(10).indices.tolist()}
            hits.append(len(exact & set(served)) / 10)
    return float(np.mean(hits))


def bench_large(args, cache: Path) -> dict:
    bundle = synthetic_catalogue(cache / "synthetic-1m", args.large_items)
    ids = np.array([f"s{i}" for i in range(1, args.large_items + 1)])
    bodies = [{"history": h, "k": 10, "exclude_seen": False}
              for h in histories(ids, np.ones(len(ids)), 1000, seed=1)]
    out = {"catalogue": args.large_items}
    for kind, extra in (("approximate", []), ("exact", ["--exact-max-items", str(args.large_items)])):
        shutil.rmtree(bundle / "faiss", ignore_errors=True)
        server = Server(bundle, *extra, roots=[bundle.parent], cache=cache)
        try:
            models = httpx.get(f"{server.base}/v1/models").json()["models"][0]
            run = {"startup_seconds_with_index_build": round(server.startup_seconds, 1),
                   "index": models["recommend_index"]}
            asyncio.run(drive(server.base, bodies, 1, 100))
            run["concurrency_1"] = asyncio.run(drive(server.base, bodies, 1, args.latency_requests // 2))
            if kind == "approximate":
                run["recall@10_vs_exact_on_requests"] = recall_vs_exact(server.base, bundle, bodies[:300])
        finally:
            server.stop()
        out[kind] = run
    out["exact_over_approximate_p99"] = round(out["exact"]["concurrency_1"]["p99_ms"]
                                              / out["approximate"]["concurrency_1"]["p99_ms"], 2)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, default=None)
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--latency-requests", type=int, default=2_000)
    parser.add_argument("--large-items", type=int, default=1_000_000)
    parser.add_argument("--skip-large", action="store_true")
    parser.add_argument("--out", type=Path, default=REPO / "reports" / "benchmarks" / "serving.json")
    args = parser.parse_args()
    cache = REPO / ".cache" / "serving-bench"
    cache.mkdir(parents=True, exist_ok=True)
    result = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                          "processor": platform.processor() or platform.machine()},
              "beauty_sasrec": bench_beauty(beauty_bundle(args.bundle), args, cache)}
    if not args.skip_large:
        result["synthetic_1m"] = bench_large(args, cache)
    atomic_write_bytes(args.out, (json.dumps(result, indent=2) + "\n").encode())
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

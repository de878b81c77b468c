"""Generative retrieval benchmark: beam-search latency and training throughput of TIGER and sid_decoder (not a
test; issue [5]). Writes reports/benchmarks/generative.json.

A TIGER of the default shape (T5 4 + 4 layers, d_model 128, 3 levels × 256 codes + a collision code, beam width
10) and a sid_decoder of its default shape (4 causal layers, d_model 128, the same semantic ids) over a catalogue
of Amazon Beauty's size (12,101 items), beside SASRec of its default shape over the same catalogue (encode + exact
top-k through ``recommend``): the in-run baseline, so the figures that matter are the ratios.

Semantic ids come from residual k-means over the real Beauty item text embeddings when their MiniLM cache is
there (``--text-cache``, an .npy written by ``recsys train --model tiger``), else over random unit vectors of the
same shape; latency depends on the trie's shape and the model's size, not on trained weights, so both models are
randomly initialised.

Cases, k = 10, each over the same ``--requests`` histories of 1-50 items (uniform lengths, random items):
- ``single``: one request at a time (the service's latency path): p50/p95/p99 per request;
- ``single_exclude_seen``: the same with the history excluded, which the service does by asking the beam for
  k + (history length) items and filtering, so the beam is wider;
- ``batched``: requests in batches of ``--batch-size``: milliseconds per request.
- ``training``: ``--train-steps`` optimiser steps of each generative model on its own training batches (batch 256)
  of random sequences with Beauty's lengths (5 + Poisson(3.9) items, mean ≈ 8.9): seconds per 1,000 target items.
Usage: ``python tests/benchmarks/generative.py [--requests 200] [--train-steps 20] [--text-cache FILE]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

NUM_ITEMS = 12_101  # Amazon Beauty, P5/TIGER split


def histories(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(1, NUM_ITEMS + 1, size=int(rng.integers(1, 51))) for _ in range(n)]


def batch_of(rows: list[np.ndarray], max_len: int):
    """The service's inference batch for these histories (timestamps unused by both models)."""
    from recsys.batching import pad_histories

    return pad_histories([(row, np.zeros_like(row)) for row in rows], max_len)


def percentiles(seconds: list[float]) -> dict:
    ms = np.asarray(seconds) * 1000
    return {"p50_ms": float(np.percentile(ms, 50)), "p95_ms": float(np.percentile(ms, 95)),
            "p99_ms": float(np.percentile(ms, 99)), "mean_ms": float(ms.mean())}


def time_model(model, requests: list[np.ndarray], k: int, batch_size: int, exclude_seen: bool) -> dict:
    import torch

    from recsys.ranking import exclusions

    max_len = model.config.max_len
    with torch.inference_mode():
        model.recommend(batch_of(requests[:2], max_len), k)  # warm-up
        single, single_excl = [], []
        for row in requests:
            batch = batch_of([row], max_len)
            start = time.perf_counter()
            model.recommend(batch, k)
            single.append(time.perf_counter() - start)
            if exclude_seen:
                start = time.perf_counter()
                items = model.recommend(batch, k, exclude=exclusions([row])).items
                single_excl.append(time.perf_counter() - start)
                assert (items > 0).all() and not torch.isin(items, torch.from_numpy(row)).any()
        start = time.perf_counter()
        for lo in range(0, len(requests), batch_size):
            model.recommend(batch_of(requests[lo:lo + batch_size], max_len), k)
        batched = time.perf_counter() - start
    out = {"single": percentiles(single), "batched_ms_per_request": 1000 * batched / len(requests)}
    if exclude_seen:
        out["single_exclude_seen"] = percentiles(single_excl)
    return out


def training_seconds_per_1000_targets(model, steps: int, seed: int = 0) -> dict:
    """Adam steps over the model's own training batches of random Beauty-length sequences."""
    import torch

    from pipelines.jagged import Jagged

    rng = np.random.default_rng(seed)
    lengths = 5 + rng.poisson(3.9, size=256 * (steps + 1))  # enough rows for every model's batches
    train = Jagged.from_lengths(lengths, rng.integers(1, NUM_ITEMS + 1, size=int(lengths.sum())),
                                np.zeros(int(lengths.sum()), dtype=np.int64))
    batches = iter(model.train_batches(np.arange(len(lengths)), train, 256).epoch(rng))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    seconds, targets = 0.0, 0
    for step in range(steps + 1):
        batch = next(batches)
        start = time.perf_counter()
        optimizer.zero_grad()
        model.loss(batch).backward()
        optimizer.step()
        if step:  # the first step warms up
            seconds += time.perf_counter() - start
            targets += int(model.supervision.positions(batch).sum())  # the targets this step's loss covers
    model.eval()
    return {"steps": steps, "targets": targets, "seconds_per_1000_targets": 1000 * seconds / targets}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--train-steps", type=int, default=20)
    parser.add_argument("--text-cache", default=None, help="Beauty's cached MiniLM item embeddings (.npy)")
    parser.add_argument("--out", default=str(REPO / "reports" / "benchmarks" / "generative.json"))
    args = parser.parse_args()

    import torch

    from kernels.atomic import atomic_write_bytes
    from recsys.models import build_model

    torch.manual_seed(0)
    if args.text_cache:
        embeddings, text = np.load(args.text_cache).astype(np.float32), "Beauty MiniLM embeddings"
    else:
        embeddings = np.random.default_rng(0).normal(size=(NUM_ITEMS, 384)).astype(np.float32)
        embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
        text = "random unit vectors"
    tiger = build_model("tiger", NUM_ITEMS, {}).eval()
    start = time.perf_counter()
    stats = tiger.fit_semantic_ids(embeddings)
    fit_seconds = time.perf_counter() - start
    decoder = build_model("sid_decoder", NUM_ITEMS, {}).eval()
    decoder.fit_semantic_ids(embeddings)  # the same quantiser and seed: the same ids as TIGER's
    assert torch.equal(decoder.codes, tiger.codes)
    sasrec = build_model("sasrec", NUM_ITEMS, {}).eval()
    requests = histories(args.requests)

    results = {"tiger": time_model(tiger, requests, 10, args.batch_size, exclude_seen=True),
               "sid_decoder": time_model(decoder, requests, 10, args.batch_size, exclude_seen=True),
               "sasrec": time_model(sasrec, requests, 10, args.batch_size, exclude_seen=False)}
    for name, model in (("tiger", tiger), ("sid_decoder", decoder)):
        results[name]["training"] = training_seconds_per_1000_targets(model, args.train_steps)

    def ratio(a: str, b: str) -> dict:
        return {"single_p50": results[a]["single"]["p50_ms"] / results[b]["single"]["p50_ms"],
                "single_p99": results[a]["single"]["p99_ms"] / results[b]["single"]["p99_ms"],
                "batched": results[a]["batched_ms_per_request"] / results[b]["batched_ms_per_request"]}
    report = {
        "setup": {"catalogue": NUM_ITEMS, "k": 10, "requests": args.requests, "batch_size": args.batch_size,
                  "history_lengths": "uniform 1-50", "semantic_ids_from": text,
                  "semantic_id_fit_seconds": fit_seconds, "collision_rate": stats["collision_rate"],
                  "tiger_parameters": tiger.num_parameters(), "sid_decoder_parameters": decoder.num_parameters(),
                  "sasrec_parameters": sasrec.num_parameters(),
                  "beam_width": tiger.config.beam_width, "threads": torch.get_num_threads(),
                  "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"},
        **results,
        "tiger_over_sasrec": ratio("tiger", "sasrec"),
        "sid_decoder_over_tiger": {**ratio("sid_decoder", "tiger"), "training_seconds_per_1000_targets":
                                   results["sid_decoder"]["training"]["seconds_per_1000_targets"]
                                   / results["tiger"]["training"]["seconds_per_1000_targets"]},
    }
    atomic_write_bytes(Path(args.out), json.dumps(report, indent=2).encode())
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

"""Prometheus text exposition (format 0.0.4) without a client library: request counters, a latency histogram
per route, the micro-batch size histogram and the served model versions."""

from __future__ import annotations

import threading
from collections import defaultdict

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Histogram:
    def __init__(self, buckets):
        self.buckets = buckets
        self.counts = [0] * len(buckets)
        self.total = 0
        self.sum = 0.0

    def observe(self, value: float) -> None:
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += 1
        self.total += 1
        self.sum += value

    def lines(self, name: str, labels: str) -> list[str]:
        sep = "," if labels else ""
        out = [f'{name}_bucket{{{labels}{sep}le="{b}"}} {c}' for b, c in zip(self.buckets, self.counts)]
        out.append(f'{name}_bucket{{{labels}{sep}le="+Inf"}} {self.total}')
        plain = f"{{{labels}}}" if labels else ""
        out.append(f"{name}_sum{plain} {self.sum}")
        out.append(f"{name}_count{plain} {self.total}")
        return out


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class Metrics:
    def __init__(self):
        self.lock = threading.Lock()
        self.requests: dict[tuple[str, str, int], int] = defaultdict(int)
        self.latency: dict[str, Histogram] = {}
        self.batch_sizes = Histogram(BATCH_BUCKETS)
        self.fallbacks = 0
        self.reloads: dict[str, int] = defaultdict(int)

    def observe_request(self, method: str, route: str, status: int, seconds: float) -> None:
        with self.lock:
            self.requests[(method, route, status)] += 1
            self.latency.setdefault(route, Histogram(LATENCY_BUCKETS)).observe(seconds)

    def observe_batch(self, size: int) -> None:
        with self.lock:
            self.batch_sizes.observe(size)

    def render(self, models: dict[str, tuple[str, str]]) -> str:
        """``models``: name → (version, source)."""
        with self.lock:
            lines = ["# HELP recsys_requests_total HTTP requests by method, route and status.",
                     "# TYPE recsys_requests_total counter"]
            for (method, route, status), n in sorted(self.requests.items()):
                lines.append(f'recsys_requests_total{{method="{method}",route="{_escape(route)}",'
                             f'status="{status}"}} {n}')
            lines += ["# HELP recsys_request_seconds Request latency by route.",
                      "# TYPE recsys_request_seconds histogram"]
            for route, hist in sorted(self.latency.items()):
                lines += hist.lines("recsys_request_seconds", f'route="{_escape(route)}"')
            lines += ["# HELP recsys_batch_size Queries per inference micro-batch.",
                      "# TYPE recsys_batch_size histogram"]
            lines += self.batch_sizes.lines("recsys_batch_size", "")
            lines += ["# HELP recsys_fallbacks_total Requests answered by the popularity fallback.",
                      "# TYPE recsys_fallbacks_total counter", f"recsys_fallbacks_total {self.fallbacks}",
                      "# HELP recsys_reloads_total Model reloads by outcome.", "# TYPE recsys_reloads_total counter"]
            for outcome, n in sorted(self.reloads.items()):
                lines.append(f'recsys_reloads_total{{outcome="{outcome}"}} {n}')
            lines += ["# HELP recsys_model_info The model version each name serves (value 1).",
                      "# TYPE recsys_model_info gauge"]
            for name, (version, source) in sorted(models.items()):
                lines.append(f'recsys_model_info{{model="{_escape(name)}",version="{_escape(version)}",'
                             f'source="{_escape(source)}"}} 1')
        return "\n".join(lines) + "\n"

"""Service settings: every knob has a default that works on a laptop and an environment variable for deployment."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field


def _env_list(name: str) -> list[str]:
    value = os.environ.get(name, "")
    return [part for part in value.split(os.pathsep) if part]


class IndexSettings(BaseModel):
    """faiss index choice: exact inner product up to ``exact_max_items``, an approximate index above it, tuned at
    build time to the smallest search effort whose recall@10 against exact reaches ``target_recall``."""

    exact_max_items: int = Field(100_000, ge=1)
    approximate: Literal["ivf", "hnsw"] = "ivf"
    target_recall: float = Field(0.95, gt=0.0, le=1.0)
    tuning_queries: int = Field(1000, ge=10)


class ServiceSettings(BaseModel):
    # model sources: bundle directories and/or ``models:/<name>@<alias>`` / ``models:/<name>/<version>`` URIs;
    # empty means the registry's ``champion`` (what the last ``make eval`` chose)
    bundles: list[str] = Field(default_factory=list)
    model_uris: list[str] = Field(default_factory=list)
    # directories bundles may be loaded from (reload requests included); the given bundles' parents are added
    bundle_roots: list[str] = Field(default_factory=lambda: _env_list("RECSYS_BUNDLE_ROOTS") or ["runs", "reports"])
    # where registry downloads and indexes of read-only bundles are cached
    cache_dir: str = Field(default_factory=lambda: os.environ.get("RECSYS_SERVING_CACHE", ".cache/serving"))
    api_key: str | None = Field(default_factory=lambda: os.environ.get("RECSYS_API_KEY") or None)
    admin_api_key: str | None = Field(default_factory=lambda: os.environ.get("RECSYS_ADMIN_API_KEY") or None)
    max_body_bytes: int = Field(1 << 20, ge=1024)
    max_batch: int = Field(64, ge=1)  # micro-batch: most requests encoded together
    # how long a micro-batch may wait to fill; 0: batches form only from requests that queued while the previous
    # batch ran (no added latency at low load; measured the same throughput at concurrency 32 as 1 ms)
    max_wait_ms: float = Field(0.0, ge=0.0)
    # queries that may wait for a micro-batch; past it requests get 503 with Retry-After at once, so a burst
    # beyond capacity is refused quickly instead of making every request wait longer
    max_queue: int = Field(256, ge=1)
    retry_after_s: int = Field(1, ge=0)
    max_history: int = Field(10_000, ge=1)  # longest history a request may send (the model keeps its max_len)
    index: IndexSettings = Field(default_factory=IndexSettings)

    def allowed_roots(self) -> list[Path]:
        roots = [Path(r).resolve() for r in self.bundle_roots]
        roots += [Path(b).resolve().parent for b in self.bundles]
        roots.append(Path(self.cache_dir).resolve())
        return roots

"""faiss indexes over a model's item table, built once per model version and saved beside the bundle.

Exact inner product (``IndexFlatIP``) up to ``exact_max_items``; above it an approximate index (IVF with
√N·4 lists, or HNSW with M = 32) whose search effort (``nprobe`` / ``efSearch``) is tuned at build time: the
smallest setting whose recall@10 against the exact search reaches the target on sampled queries. The measured
recall is saved with the index and reported by ``GET /v1/models``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np
import torch

from recsys.ranking import Exclusions, excluded_rows
from serving.settings import IndexSettings

RECALL_K = 10


@dataclass
class ItemIndex:
    index: faiss.Index
    kind: str  # "exact", "ivf" or "hnsw"
    recall_at_10: float  # 1.0 for exact
    search_param: int | None  # nprobe (ivf) or efSearch (hnsw)

    @property
    def ntotal(self) -> int:
        return self.index.ntotal

    def search(self, queries: np.ndarray, k: int, effort: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """(scores, rows) each (Q, k); rows are positions in the indexed table, -1 where fewer than k were found.
        ``effort`` multiplies the tuned nprobe / efSearch (a retry for queries that came back short)."""
        params = None
        if self.kind == "ivf" and effort > 1:
            params = faiss.SearchParametersIVF(nprobe=min(self.index.nlist, self.search_param * effort))
        elif self.kind == "hnsw" and effort > 1:
            params = faiss.SearchParametersHNSW(efSearch=self.search_param * effort)
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        return self.index.search(queries, min(k, self.ntotal), params=params)

    def top(self, queries: torch.Tensor, k: int, exclude: Exclusions | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``recsys.ranking.Searcher`` the service hands ``model.recommend``: (item ids (Q, k) in 1..V, 0
        where short; scores), exclusions removed. It over-fetches by the number of excluded items (enough for an
        exact index); an approximate index may still come back short (its probed cells hold too few items): those
        queries are searched again with twice the fetch and twice the search effort, until the search is
        exhaustive."""
        vectors = queries.float().cpu().numpy()
        n = self.ntotal
        excluded = [np.zeros(0, np.int64)] * len(vectors) if exclude is None else excluded_rows(exclude)
        items = np.zeros((len(vectors), k), dtype=np.int64)
        scores = np.full((len(vectors), k), -np.inf, dtype=np.float32)
        pending = list(range(len(vectors)))
        fetch = {i: min(n, k + len(excluded[i])) for i in pending}
        effort = 1
        while pending:
            found_scores, rows = self.search(vectors[pending], max(fetch[i] for i in pending), effort)
            exhausted = effort >= self.exhaustive_at
            still = []
            for j, i in enumerate(pending):
                valid = rows[j] >= 0
                found, row_scores = rows[j][valid] + 1, found_scores[j][valid]
                keep = ~np.isin(found, excluded[i])
                found, row_scores = found[keep][:k], row_scores[keep][:k]
                if len(found) < min(k, n - len(excluded[i])) and not (exhausted and fetch[i] >= n):
                    fetch[i] = min(n, 2 * fetch[i])
                    still.append(i)
                else:
                    items[i, :len(found)], scores[i, :len(found)] = found, row_scores
            pending, effort = still, effort * 2
        return torch.from_numpy(items), torch.from_numpy(scores)

    @property
    def exhaustive_at(self) -> int:
        """The ``effort`` from which a search visits the whole catalogue (1 for exact)."""
        if self.kind == "ivf":
            return -(-self.index.nlist // self.search_param)
        return 1 if self.kind == "exact" else max(1, self.ntotal // self.search_param)

    def meta(self) -> dict:
        return {"kind": self.kind, "ntotal": self.ntotal, "recall@10": self.recall_at_10,
                "search_param": self.search_param}


def recall_at_k(found: np.ndarray, exact: np.ndarray) -> float:
    """Mean |found ∩ exact| / k over queries (rows of item positions)."""
    hits = [len(set(f[f >= 0]) & set(e[e >= 0])) / max(1, (e >= 0).sum()) for f, e in zip(found, exact)]
    return float(np.mean(hits))


def _set_search_param(index: faiss.Index, kind: str, value: int) -> None:
    if kind == "ivf":
        index.nprobe = value
    else:
        index.hnsw.efSearch = value


def _tune(index: faiss.Index, kind: str, queries: np.ndarray, exact: np.ndarray, target: float,
          candidates: list[int]) -> tuple[int, float]:
    """Smallest candidate search effort reaching ``target`` recall (the largest one when none does)."""
    recall = 0.0
    for value in candidates:
        _set_search_param(index, kind, value)
        recall = recall_at_k(index.search(queries, RECALL_K)[1], exact)
        if recall >= target:
            return value, recall
    return candidates[-1], recall


def build_index(table: np.ndarray, settings: IndexSettings, queries: np.ndarray | None = None,
                seed: int = 0) -> ItemIndex:
    """Index ``table`` (N, d) for maximum inner product. ``queries`` is a sample of the search workload used to
    tune and measure the approximate index (default: rows of the table itself)."""
    table = np.ascontiguousarray(table, dtype=np.float32)
    n, d = table.shape
    exact = faiss.IndexFlatIP(d)
    exact.add(table)
    if n <= settings.exact_max_items:
        return ItemIndex(exact, "exact", 1.0, None)
    rng = np.random.default_rng(seed)
    if queries is None:
        queries = table[rng.choice(n, min(n, settings.tuning_queries), replace=False)]
    queries = np.ascontiguousarray(queries[: settings.tuning_queries], dtype=np.float32)
    exact_rows = exact.search(queries, RECALL_K)[1]
    if settings.approximate == "ivf":
        nlist = int(4 * np.sqrt(n))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
        index.train(table[rng.choice(n, min(n, 64 * nlist), replace=False)])
        index.add(table)
        candidates = [p for p in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512) if p <= nlist] + [nlist]
    else:
        index = faiss.IndexHNSWFlat(d, 32, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = 100
        index.add(table)
        candidates = [16, 32, 64, 128, 256, 512, 1024]
    value, recall = _tune(index, settings.approximate, queries, exact_rows, settings.target_recall, candidates)
    _set_search_param(index, settings.approximate, value)
    return ItemIndex(index, settings.approximate, recall, value)


def save_index(item_index: ItemIndex, directory: Path, name: str, fingerprint: str) -> None:
    """Write ``name.faiss`` then ``name.json`` (the marker of a complete index), each through a rename."""
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / f".{name}.faiss.{os.getpid()}.tmp"
    faiss.write_index(item_index.index, str(tmp))
    os.replace(tmp, directory / f"{name}.faiss")
    meta = {**item_index.meta(), "fingerprint": fingerprint}
    tmp_meta = directory / f".{name}.json.{os.getpid()}.tmp"
    tmp_meta.write_text(json.dumps(meta, indent=2))
    os.replace(tmp_meta, directory / f"{name}.json")


def load_index(directory: Path, name: str, fingerprint: str, settings: IndexSettings) -> ItemIndex | None:
    """The saved index if it was built from the same table (``fingerprint``) with the same index choice."""
    meta_path, index_path = directory / f"{name}.json", directory / f"{name}.faiss"
    if not (meta_path.is_file() and index_path.is_file()):
        return None
    meta = json.loads(meta_path.read_text())
    wanted = "exact" if meta.get("ntotal", 0) <= settings.exact_max_items else settings.approximate
    if meta.get("fingerprint") != fingerprint or meta.get("kind") != wanted:
        return None
    index = faiss.read_index(str(index_path))
    if meta["kind"] != "exact":
        _set_search_param(index, meta["kind"], meta["search_param"])
    return ItemIndex(index, meta["kind"], meta["recall@10"], meta["search_param"])

"""A model as the service holds it: the bundle's network, its id map and titles, and its faiss indexes.

Every model ranks through ``model.recommend``: score-based models hand it the inner-product index over their item
table as the searcher; generative models (TIGER) search by beam and have no recommend index. ``/similar`` always uses
a cosine index over ``model.similar_item_vectors()`` (the item table, or TIGER's text embeddings).

Loading resolves a source (a bundle directory under an allowed root, or a ``models:/`` URI of this platform's
MLflow registry), builds or reuses the indexes for that model version, and returns an immutable
``ServedModel``. The service swaps whole ``ServedModel`` objects on reload, so a request always finishes on the
version it started with.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from kernels._cpu import cpu_kernels
from recsys.batching import pad_histories
from recsys.bundle import load_bundle
from recsys.ranking import exclusions
from serving.index import ItemIndex, build_index, load_index, save_index
from serving.settings import ServiceSettings


class SourceNotAllowed(ValueError):
    """A bundle path outside the configured roots or a URI outside this platform's registry."""


@dataclass
class Query:
    """One prepared request: internal item ids, their timestamps, and what to leave out."""

    history: np.ndarray  # int64 item_idx, most recent last, already cut to the model's max_len
    times: np.ndarray  # int64, same length
    k: int
    excluded: np.ndarray  # int64 item_idx never to recommend


@dataclass
class ServedModel:
    name: str
    version: str
    source: str
    model: torch.nn.Module
    max_len: int
    item_ids: np.ndarray  # object array, position = item_idx (0 = padding, None)
    titles: np.ndarray  # object array, position = item_idx
    popularity: np.ndarray  # float64, position = item_idx
    recommend_index: ItemIndex | None  # None for generative models: they rank by beam search
    similar_index: ItemIndex
    metrics: dict
    id_to_idx: dict[str, int] = field(repr=False, default_factory=dict)

    def __post_init__(self):
        self.id_to_idx = {str(ext): i for i, ext in enumerate(self.item_ids) if i > 0}
        self.popular_order = np.argsort(-self.popularity[1:], kind="stable") + 1

    @property
    def num_items(self) -> int:
        return len(self.item_ids) - 1

    @property
    def generative(self) -> bool:
        return self.recommend_index is None

    def describe(self) -> dict:
        ranking = ({"kind": "beam search", "beam_width": int(self.model.config.beam_width)} if self.generative
                   else self.recommend_index.meta())
        return {"name": self.name, "version": self.version, "source": self.source, "num_items": self.num_items,
                "max_len": self.max_len, "recommend_index": ranking,
                "similar_index": self.similar_index.meta(),
                "test_metrics": {k: v for k, v in self.metrics.get("test", {}).items()
                                 if k in ("hr@10", "ndcg@10", "mrr", "exclude_seen")}}

    # --- the numeric work; runs in the service's inference thread -------------------------------------------------

    @torch.no_grad()
    def rank(self, queries: list[Query]) -> list[tuple[np.ndarray, np.ndarray]]:
        """(item_idx, scores) best first for each query, exclusions removed: one ``model.recommend`` call for the
        micro-batch, searching the recommend index (generative models search by beam and have none). Empty
        histories get the popularity ranking (the caller flags the fallback)."""
        out: list[tuple[np.ndarray, np.ndarray] | None] = [None] * len(queries)
        with_history = [i for i, q in enumerate(queries) if len(q.history)]
        for i, q in enumerate(queries):
            if not len(q.history):
                out[i] = self.popular(q.k, q.excluded)
        if with_history:
            chosen = [queries[i] for i in with_history]
            ranking = self.model.recommend(pad_histories([(q.history, q.times) for q in chosen], self.max_len),
                                           max(q.k for q in chosen), exclude=exclusions([q.excluded for q in chosen]),
                                           searcher=self.recommend_index)
            for i, q, items, scores in zip(with_history, chosen, ranking.items.numpy(),
                                           ranking.scores.float().numpy()):
                keep = items > 0  # 0 pads a list that ran short
                out[i] = (items[keep][: q.k], scores[keep][: q.k])
        return out  # type: ignore[return-value]

    def popular(self, k: int, excluded: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        order = self.popular_order
        if len(excluded):
            order = order[~np.isin(order, excluded)]
        top = order[:k]
        return top, self.popularity[top]

    def similar(self, item_idx: int, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Nearest items by cosine similarity of the item embeddings, the item itself left out."""
        vector = self.similar_index.index.reconstruct(int(item_idx - 1))[None, :]
        scores, rows = self.similar_index.search(vector, k + 1)
        keep = (rows[0] >= 0) & (rows[0] != item_idx - 1)
        return rows[0][keep][:k] + 1, scores[0][keep][:k]


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _inside(path: Path, roots: list[Path]) -> bool:
    return any(path == root or root in path.parents for root in roots)


def check_bundle_path(path: str | Path, settings: ServiceSettings) -> Path:
    resolved = Path(path).resolve()
    if not _inside(resolved, settings.allowed_roots()):
        raise SourceNotAllowed(f"bundle path {path} is outside the allowed bundle directories")
    if not resolved.is_dir():
        raise FileNotFoundError(f"no bundle directory at {path}")
    return resolved


def _parse_model_uri(uri: str) -> tuple[str, str | None, str | None]:
    """``models:/<name>@<alias>`` or ``models:/<name>/<version>`` → (name, alias, version)."""
    if not uri.startswith("models:/"):
        raise SourceNotAllowed(f"model URI {uri!r} must look like models:/<name>@<alias> or models:/<name>/<version>")
    rest = uri.removeprefix("models:/")
    if "@" in rest:
        name, alias = rest.split("@", 1)
        ref = (name, alias, None)
    elif rest.count("/") == 1:
        name, version = rest.split("/")
        ref = (name, None, version)
    else:
        raise SourceNotAllowed(f"model URI {uri!r} must look like models:/<name>@<alias> or models:/<name>/<version>")
    if not ref[0].startswith("recsys-") or any(c in rest for c in ("..", "\\")) or not all(ref[0].split("-")):
        raise SourceNotAllowed(f"model URI {uri!r} does not name a model of this platform's registry (recsys-*)")
    return ref


def fetch_registered_bundle(uri: str, settings: ServiceSettings) -> tuple[Path, str]:
    """Download (once) the bundle a registry URI points at; returns its local directory and the version."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from recsys.tracking import open_client, tracking_uri

    name, alias, version = _parse_model_uri(uri)
    client = open_client()
    try:
        mv = client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(name, version)
    except MlflowException as err:
        raise FileNotFoundError(f"{uri} is not in the model registry at {tracking_uri()}") from err
    target = Path(settings.cache_dir).resolve() / "registry" / name / str(mv.version)
    if not (target / "config.json").is_file():
        partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=mv.source, dst_path=str(partial)))
        shutil.rmtree(target, ignore_errors=True)
        os.replace(local, target)  # the bundle directory appears only once fully downloaded
        shutil.rmtree(partial, ignore_errors=True)
    return target, str(mv.version)


def champion_uri() -> str:
    """``models:/<name>@champion`` for the registered model that the last ``make eval`` chose."""
    from recsys.tracking import open_client, tracking_uri

    for registered in open_client().search_registered_models():
        if "champion" in (registered.aliases or {}):
            return f"models:/{registered.name}@champion"
    raise FileNotFoundError(f"no registered model carries the 'champion' alias in {tracking_uri()}: run `make eval` "
                            "first, or pass BUNDLE=dir / MODEL_URI=models:/...")


def _index_dir(bundle_dir: Path, fingerprint: str, settings: ServiceSettings) -> Path:
    beside = bundle_dir / "faiss"
    try:
        beside.mkdir(exist_ok=True)
        if os.access(beside, os.W_OK):
            return beside
    except OSError:
        pass
    return Path(settings.cache_dir).resolve() / "faiss" / fingerprint[:16]


@torch.no_grad()
def sample_queries(model: torch.nn.Module, popularity: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """Query vectors of ``n`` random histories (1 to max_len items drawn by popularity): the recommend
    workload an approximate index is tuned on. Item vectors themselves would be much easier queries (each sits
    in its own cell) and overstate recall."""
    rng = np.random.default_rng(seed)
    p = popularity[1:] + 1.0
    p /= p.sum()
    max_len = int(model.config.max_len)
    rows = [rng.choice(len(p), rng.integers(1, max_len + 1), p=p) + 1 for _ in range(n)]
    out = [model.encode(pad_histories([(r, np.zeros(len(r), dtype=np.int64)) for r in rows[s:s + 256]], max_len))
           for s in range(0, n, 256)]
    return torch.cat(out).float().numpy()


def indexes_for(model: torch.nn.Module, table: np.ndarray | None, similar: np.ndarray, popularity: np.ndarray,
                bundle_dir: Path, fingerprint: str, settings: ServiceSettings) -> tuple[ItemIndex | None, ItemIndex]:
    """The inner-product index over the scoring ``table`` (recommend, tuned on sampled user queries; None when the
    model has no table) and the cosine index over the ``similar`` vectors (tuned on the items themselves), loaded
    when saved for this fingerprint, else built and saved."""
    directory = _index_dir(bundle_dir, fingerprint, settings)
    normed = similar / np.maximum(np.linalg.norm(similar, axis=1, keepdims=True), 1e-12)
    out: dict[str, ItemIndex | None] = {"recommend": None}
    for name, vectors in (("recommend", table), ("similar", normed)):
        if vectors is None:
            continue
        index = load_index(directory, name, fingerprint, settings.index)
        if index is None:
            queries = None
            if name == "recommend" and len(table) > settings.index.exact_max_items:
                queries = sample_queries(model, popularity, settings.index.tuning_queries)
            index = build_index(vectors, settings.index, queries)
            save_index(index, directory, name, fingerprint)
        out[name] = index
    return out["recommend"], out["similar"]


def load_served_model(source: str, settings: ServiceSettings) -> ServedModel:
    """Load a bundle directory or a ``models:/`` URI into a ``ServedModel`` (indexes built once per version)."""
    if source.startswith("models:/"):
        bundle_dir, version = fetch_registered_bundle(source, settings)
    else:
        bundle_dir, version = check_bundle_path(source, settings), None
    bundle = load_bundle(bundle_dir)
    weights_hash = _file_sha256(bundle_dir / "weights.safetensors")
    version = version or weights_hash[:12]
    model = bundle.model
    cpu_kernels()  # build (or load) the fused CPU kernels now, not on the first request a Mamba model serves
    with torch.no_grad():
        similar = model.similar_item_vectors()[1:].float().cpu().numpy()
        table = None if model.generative else model.item_embeddings()[1:].float().cpu().numpy()
    items = bundle.items.sort_values("item_idx")
    num_items = bundle.config["num_items"]
    item_ids = np.empty(num_items + 1, dtype=object)
    titles = np.empty(num_items + 1, dtype=object)
    popularity = np.zeros(num_items + 1, dtype=np.float64)
    idx = items["item_idx"].to_numpy()
    item_ids[idx] = items["item_id"].astype(str).to_numpy()
    if "title" in items.columns:
        titles[idx] = [None if t is None or t != t else str(t) for t in items["title"].to_numpy()]
    if "popularity" in items.columns:
        popularity[idx] = items["popularity"].to_numpy(dtype=np.float64)
    # an index is reused only for the same weights and the same index settings
    fingerprint = hashlib.sha256(f"{weights_hash}:{settings.index.model_dump_json()}".encode()).hexdigest()
    recommend_index, similar_index = indexes_for(model, table, similar, popularity, bundle_dir, fingerprint,
                                                 settings)
    return ServedModel(name=bundle.config["model"], version=version, source=source, model=bundle.model,
                       max_len=int(bundle.model.config.max_len), item_ids=item_ids, titles=titles,
                       popularity=popularity, recommend_index=recommend_index, similar_index=similar_index,
                       metrics=bundle.metrics)

"""The FastAPI application: next-item ranking and item retrieval over registered models (issue [4]).

Everything a client can send is validated by the schemas (422), limited in size (413), authenticated when an
API key is configured (401), or refers to something that does not exist (404) or is not allowed (403); no client
input reaches a 500. Model work runs in one inference thread fed by the micro-batcher, never on the event loop;
when its queue is full a request is refused at once with 503 and Retry-After (a client may retry; nothing waits
without bound).
"""

from __future__ import annotations

import asyncio
import gc
import hmac
import time
from contextlib import asynccontextmanager

import numpy as np
from fastapi import Depends, FastAPI, HTTPException, Query as QueryParam, Request
from fastapi.responses import JSONResponse, PlainTextResponse

from serving.batcher import MicroBatcher, QueueFull
from serving.metrics import Metrics
from serving.model import Query, ServedModel, SourceNotAllowed, champion_uri, load_served_model
from serving.schemas import (BatchRecommendRequest, BatchRecommendResponse, ItemResponse, ModelsResponse,
                             RecommendRequest, RecommendResponse, ReloadRequest, ReloadResponse, SimilarResponse)
from serving.settings import ServiceSettings

API_KEY_HEADER = "X-API-Key"
RANKING_PATHS = ("/v1/recommend", "/v1/recommend/batch")  # the routes that queue for the micro-batcher


class ServiceState:
    def __init__(self, settings: ServiceSettings):
        self.settings = settings
        self.models: dict[str, ServedModel] = {}
        self.default: str | None = None
        self.metrics = Metrics()
        self.batcher = MicroBatcher(settings.max_batch, settings.max_wait_ms, settings.max_queue,
                                    self.metrics.observe_batch)
        self.reload_lock = asyncio.Lock()

    def served(self, name: str | None) -> ServedModel:
        key = name or self.default
        if key not in self.models:
            raise HTTPException(404, f"no served model named {name!r}; serving: {sorted(self.models)}")
        return self.models[key]

    def load_all(self) -> None:
        sources = [*self.settings.bundles, *self.settings.model_uris] or [champion_uri()]
        for source in sources:
            served = load_served_model(source, self.settings)
            if served.name in self.models:
                raise ValueError(f"two sources serve a model named {served.name!r}")
            self.models[served.name] = served
            self.default = self.default or served.name
        freeze_loaded_objects()


def freeze_loaded_objects() -> None:
    """Move everything alive now (the libraries, the loaded models' id maps and titles) out of the garbage
    collector's reach: a full collection then walks only what requests allocate, instead of ~250,000 long-lived
    objects, which showed up as p99 stalls under load (docs/benchmarks.md). Unfreezing first lets the collection
    free a model replaced by a reload even where its objects form cycles."""
    gc.unfreeze()
    gc.collect()
    gc.freeze()


class BodyLimit:
    """Pure ASGI middleware: 413 for bodies over the limit (declared or streamed), and per-route metrics."""

    def __init__(self, app, state: ServiceState):
        self.app = app
        self.state = state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        status = {"code": 500}
        limit = self.state.settings.max_body_bytes

        async def send_observed(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        declared = dict(scope.get("headers") or []).get(b"content-length")
        try:
            if scope["path"] in RANKING_PATHS and self.state.batcher.full():
                # refused before the body is read or validated: under overload a refusal must cost far less
                # than an answer, or refusals eat the capacity the admitted requests need
                retry = str(self.state.settings.retry_after_s)
                response = JSONResponse({"detail": "overloaded, retry later: the ranking queue is full"},
                                        status_code=503, headers={"Retry-After": retry})
                return await response(scope, receive, send_observed)
            if declared is not None and (not declared.isdigit() or int(declared) > limit):
                response = JSONResponse({"detail": f"request body over the {limit}-byte limit"}, status_code=413)
                return await response(scope, receive, send_observed)
            received = 0

            async def limited_receive():
                nonlocal received
                message = await receive()
                received += len(message.get("body", b""))
                if received > limit:
                    raise HTTPException(413, f"request body over the {limit}-byte limit")
                return message

            await self.app(scope, limited_receive, send_observed)
        finally:
            route = scope.get("route")
            path = getattr(route, "path", scope["path"] if scope["path"] in RANKING_PATHS else "unmatched")
            self.state.metrics.observe_request(scope["method"], path, status["code"], time.perf_counter() - start)


def _scored(served: ServedModel, items: np.ndarray, scores: np.ndarray) -> list[dict]:
    """``ScoredItem`` dicts. Responses are built as plain JSON (the schemas document them): validating our own
    output again would cost more than the model call on the hot path."""
    return [{"item_id": served.item_ids[i], "score": s, "title": served.titles[i]}
            for i, s in zip(items.tolist(), scores.tolist())]


def prepare(served: ServedModel, request: RecommendRequest) -> tuple[Query, list[str]]:
    """Map external ids to the model's, list the unknown ones, keep the most recent ``max_len`` known events."""
    history, times, unknown = [], [], []
    stamps = request.timestamps or [0] * len(request.history)
    for item, stamp in zip(request.history, stamps):
        idx = served.id_to_idx.get(str(item))
        if idx is None:
            unknown.append(str(item))
        else:
            history.append(idx)
            times.append(stamp)
    excluded = {served.id_to_idx[str(x)] for x in request.exclude if str(x) in served.id_to_idx}
    if request.exclude_seen:
        excluded.update(history)
    query = Query(history=np.asarray(history[-served.max_len:], dtype=np.int64),
                  times=np.asarray(times[-served.max_len:], dtype=np.int64), k=request.k,
                  excluded=np.fromiter(excluded, dtype=np.int64, count=len(excluded)))
    return query, list(dict.fromkeys(unknown))


def create_app(settings: ServiceSettings | None = None, state: ServiceState | None = None) -> FastAPI:
    settings = settings or ServiceSettings()
    state = state or ServiceState(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if not state.models:
            await asyncio.to_thread(state.load_all)
        state.batcher.start()
        yield
        await state.batcher.stop()

    def require_key(request: Request) -> None:
        if settings.api_key and not hmac.compare_digest(request.headers.get(API_KEY_HEADER, ""), settings.api_key):
            raise HTTPException(401, f"missing or wrong {API_KEY_HEADER} header")

    def require_admin_key(request: Request) -> None:
        key = settings.admin_api_key or settings.api_key
        if key and not hmac.compare_digest(request.headers.get(API_KEY_HEADER, ""), key):
            raise HTTPException(401, f"missing or wrong {API_KEY_HEADER} header (admin)")

    app = FastAPI(title="recsys", version="1", lifespan=lifespan,
                  description="Next-item recommendation and item retrieval over the platform's trained models.")
    app.state.service = state
    app.add_middleware(BodyLimit, state=state)
    guarded = [Depends(require_key)]

    async def recommend_many(requests: list[RecommendRequest]) -> list[dict]:
        prepared = []
        for request in requests:
            served = state.served(request.model)
            prepared.append((served, *prepare(served, request)))
        # one submission per model version, so a batch call is one micro-batch job per model
        groups: dict[int, list[int]] = {}
        for i, (served, _, _) in enumerate(prepared):
            groups.setdefault(id(served), []).append(i)
        ranked: list = [None] * len(prepared)
        try:
            results = await asyncio.gather(*[
                state.batcher.submit(prepared[members[0]][0], [prepared[i][1] for i in members])
                for members in groups.values()])
        except QueueFull as err:
            raise HTTPException(503, f"overloaded, retry later: {err}",
                                headers={"Retry-After": str(settings.retry_after_s)}) from err
        for members, result in zip(groups.values(), results):
            for i, r in zip(members, result):
                ranked[i] = r
        out = []
        for (served, query, unknown), (items, scores) in zip(prepared, ranked):
            fallback = None if len(query.history) else "popularity"
            state.metrics.fallbacks += fallback is not None
            out.append({"model": served.name, "version": served.version, "items": _scored(served, items, scores),
                        "unknown_items": unknown, "fallback": fallback})
        return out

    @app.post("/v1/recommend", response_model=RecommendResponse, dependencies=guarded, tags=["recommend"])
    async def recommend(request: RecommendRequest) -> JSONResponse:
        """Next-item ranking for one raw history."""
        return JSONResponse((await recommend_many([request]))[0])

    @app.post("/v1/recommend/batch", response_model=BatchRecommendResponse, dependencies=guarded,
              tags=["recommend"])
    async def recommend_batch(body: BatchRecommendRequest) -> JSONResponse:
        """Many histories in one call (up to 256); each is answered as ``/v1/recommend`` would."""
        return JSONResponse({"results": await recommend_many(body.requests)})

    def item_index(served: ServedModel, item_id: str) -> int:
        idx = served.id_to_idx.get(item_id)
        if idx is None:
            raise HTTPException(404, f"item {item_id!r} is not in model {served.name!r}'s catalogue")
        return idx

    @app.get("/v1/items/{item_id}/similar", response_model=SimilarResponse, dependencies=guarded, tags=["items"])
    async def similar(item_id: str, k: int = QueryParam(10, ge=1, le=1000),
                      model: str | None = QueryParam(None, max_length=100)) -> JSONResponse:
        """Nearest items by cosine similarity of the model's item embeddings (faiss)."""
        served = state.served(model)
        items, scores = await state.batcher.run_in_thread(served.similar, item_index(served, item_id), k)
        return JSONResponse({"model": served.name, "version": served.version, "item_id": item_id,
                             "items": _scored(served, items, scores)})

    @app.get("/v1/items/{item_id}", response_model=ItemResponse, dependencies=guarded, tags=["items"])
    async def item(item_id: str, model: str | None = QueryParam(None, max_length=100)) -> ItemResponse:
        served = state.served(model)
        idx = item_index(served, item_id)
        return ItemResponse(model=served.name, item_id=item_id, title=served.titles[idx],
                            popularity=float(served.popularity[idx]))

    @app.get("/v1/models", response_model=ModelsResponse, dependencies=guarded, tags=["models"])
    async def models() -> ModelsResponse:
        return ModelsResponse(default=state.default or "", models=[m.describe() for m in state.models.values()])

    @app.post("/v1/models/reload", response_model=ReloadResponse, dependencies=[Depends(require_admin_key)],
              tags=["models"])
    async def reload(body: ReloadRequest | None = None) -> ReloadResponse:
        """Load a model version and swap it in; requests already in flight finish on the previous version."""
        body = body or ReloadRequest()
        current = state.served(body.model)
        source = body.source or current.source
        async with state.reload_lock:
            try:
                fresh = await asyncio.to_thread(load_served_model, source, settings)
            except SourceNotAllowed as err:
                state.metrics.reloads["refused"] += 1
                raise HTTPException(403, str(err)) from err
            except (FileNotFoundError, NotADirectoryError) as err:
                state.metrics.reloads["failed"] += 1
                raise HTTPException(404, str(err)) from err
            except (ValueError, KeyError, OSError, RuntimeError) as err:
                state.metrics.reloads["failed"] += 1
                raise HTTPException(422, f"cannot load {source!r}: {err}") from err
            if fresh.name != current.name and fresh.name in state.models:
                raise HTTPException(409, f"{source!r} holds model {fresh.name!r}, which is already served")
            if fresh.name != current.name:
                del state.models[current.name]
                state.default = fresh.name if state.default == current.name else state.default
            state.models[fresh.name] = fresh  # one reference swap: new requests see the new version
            state.metrics.reloads["ok"] += 1
        await asyncio.to_thread(freeze_loaded_objects)
        return ReloadResponse(model=fresh.name, previous_version=current.version, version=fresh.version,
                              source=source)

    @app.get("/healthz", tags=["health"])
    async def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/readyz", tags=["health"])
    async def readyz():
        if not state.models:
            return JSONResponse({"status": "loading"}, status_code=503)
        return {"status": "ready", "models": {n: m.version for n, m in state.models.items()}}

    @app.get("/metrics", response_class=PlainTextResponse, dependencies=guarded, tags=["health"])
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(state.metrics.render({n: (m.version, m.source) for n, m in state.models.items()}),
                                 media_type="text/plain; version=0.0.4")

    return app

"""The REST service in-process (FastAPI TestClient): semantics, offline/online parity, security, reload under
load, metrics. The real-uvicorn integration test is tests/serving/test_serving_integration.py."""

from __future__ import annotations

import asyncio
import threading

import httpx
import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from kernels.topk import topk_scores
from recsys.batching import pad_histories
from recsys.bundle import load_bundle
from recsys.models import MODELS
from serving.app import create_app
from serving.schemas import BatchRecommendResponse, SimilarResponse
from serving.settings import ServiceSettings
from tests.serving_fixtures import NUM_ITEMS, make_bundle


@pytest.fixture()
def bundles(tmp_path):
    root = tmp_path / "bundles"
    return {"a": make_bundle(root / "sasrec-a", seed=0), "b": make_bundle(root / "sasrec-b", seed=1),
            "gru": make_bundle(root / "gru4rec", model="gru4rec"), "root": root}


def settings_for(tmp_path, bundles, *names, **extra):
    return ServiceSettings(bundles=[str(bundles[n]) for n in names], bundle_roots=[str(bundles["root"])],
                           cache_dir=str(tmp_path / "cache"), **extra)


@pytest.fixture()
def client(tmp_path, bundles):
    with TestClient(create_app(settings_for(tmp_path, bundles, "a", "gru"))) as c:
        yield c


def offline_top(bundle_dir, history, k, exclude_seen=True):
    """What `recsys` computes offline for one history: encode, then exact top-k through the kernels."""
    bundle = load_bundle(bundle_dir)
    idx = [int(i.removeprefix("it")) for i in history]
    batch = pad_histories([(np.array(idx), np.zeros(len(idx), dtype=np.int64))], bundle.model.config.max_len)
    with torch.no_grad():
        query = bundle.model.encode(batch)
        table = bundle.model.item_embeddings()[1:]
    exclude = None
    if exclude_seen:
        seen = torch.tensor(sorted({i - 1 for i in idx[-bundle.model.config.max_len:]} | {i - 1 for i in idx}))
        exclude = (torch.tensor([0, len(seen)]), seen)
    scores, top = topk_scores(query, table, k, exclude=exclude)
    return [f"it{i + 1}" for i in top[0].tolist()], scores[0].tolist()


@pytest.mark.parametrize("exclude_seen", [True, False])
def test_service_returns_exactly_the_offline_items_and_scores(client, bundles, exclude_seen):
    history = ["it3", "it7", "it7", "it12", "it30", "it1", "it2", "it5", "it9", "it11", "it13"]  # > max_len 8
    body = client.post("/v1/recommend", json={"history": history, "k": 15, "exclude_seen": exclude_seen}).json()
    items, scores = offline_top(bundles["a"], history, 15, exclude_seen)
    assert [it["item_id"] for it in body["items"]] == items
    np.testing.assert_allclose([it["score"] for it in body["items"]], scores, rtol=1e-5, atol=1e-6)
    assert body["model"] == "sasrec" and body["fallback"] is None and body["unknown_items"] == []
    assert body["items"][0]["title"] == f"Item {items[0].removeprefix('it')}"


def test_only_the_most_recent_max_len_events_count(client):
    long = [f"it{i}" for i in range(1, 21)]
    full = client.post("/v1/recommend", json={"history": long, "exclude_seen": False}).json()
    recent = client.post("/v1/recommend", json={"history": long[-8:], "exclude_seen": False}).json()
    assert full["items"] == recent["items"]


def test_unknown_items_are_listed_and_ignored(client):
    known = client.post("/v1/recommend", json={"history": ["it4", "it5"]}).json()
    mixed = client.post("/v1/recommend", json={"history": ["x1", "it4", 99, "it5", "x1"]}).json()
    assert mixed["unknown_items"] == ["x1", "99"] and mixed["items"] == known["items"]


@pytest.mark.parametrize("history", [[], ["nope", "gone"]])
def test_empty_or_unknown_history_falls_back_to_popularity(client, history):
    body = client.post("/v1/recommend", json={"history": history, "k": 3, "exclude": ["it2"]}).json()
    assert body["fallback"] == "popularity"
    assert [it["item_id"] for it in body["items"]] == ["it1", "it3", "it4"]  # popularity falls with the id
    assert body["items"][0]["score"] == NUM_ITEMS * 3


def test_exclusions_and_k(client):
    body = client.post("/v1/recommend", json={"history": ["it4"], "k": NUM_ITEMS, "exclude": ["it9", "zz"]}).json()
    ids = [it["item_id"] for it in body["items"]]
    assert len(ids) == NUM_ITEMS - 2 and "it4" not in ids and "it9" not in ids
    kept = client.post("/v1/recommend", json={"history": ["it4"], "k": 1000, "exclude_seen": False}).json()
    assert len(kept["items"]) == NUM_ITEMS and "it4" in [it["item_id"] for it in kept["items"]]


@pytest.mark.parametrize("body", [{"history": ["it1"], "k": 0}, {"history": ["it1"], "k": 1001},
                                  {"history": ["it1"], "timestamps": [1, 2]}, {"history": "it1"},
                                  {"history": [None]}, {"history": [""]}, {"history": ["it1"], "extra": 1},
                                  {"history": ["a" * 300]}, {"history": ["it1"], "k": "many"}])
def test_invalid_requests_are_422_with_a_reason(client, body):
    response = client.post("/v1/recommend", json=body)
    assert response.status_code == 422 and response.json()["detail"]


def test_unknown_model_and_item_are_404(client):
    assert client.post("/v1/recommend", json={"history": ["it1"], "model": "bert9"}).status_code == 404
    assert client.get("/v1/items/nope").status_code == 404
    assert client.get("/v1/items/nope/similar").status_code == 404


def test_malformed_json_and_oversized_bodies_are_4xx(client):
    assert client.post("/v1/recommend", content=b"{not json",
                       headers={"content-type": "application/json"}).status_code == 422
    assert client.post("/v1/recommend", content=b"[" * (2 << 20)).status_code == 413


def test_batch_answers_each_request_like_the_single_endpoint(client):
    requests = [{"history": ["it4", "it5"], "k": 5}, {"history": []}, {"history": ["it6"], "model": "gru4rec"}]
    results = client.post("/v1/recommend/batch", json={"requests": requests}).json()["results"]
    assert results == [client.post("/v1/recommend", json=r).json() for r in requests]
    assert [r["model"] for r in results] == ["sasrec", "sasrec", "gru4rec"]
    BatchRecommendResponse.model_validate({"results": results})  # built as plain JSON: it must match the schema


def test_similar_items_never_include_the_item_itself(client, bundles):
    body = SimilarResponse.model_validate(client.get("/v1/items/it5/similar", params={"k": 5}).json()).model_dump()
    ids = [it["item_id"] for it in body["items"]]
    assert len(ids) == 5 and "it5" not in ids
    table = load_bundle(bundles["a"]).model.item_embeddings()[1:].detach()
    table = table / table.norm(dim=1, keepdim=True)
    cosine = table @ table[4]
    cosine[4] = -2
    assert ids == [f"it{i + 1}" for i in cosine.topk(5).indices.tolist()]
    assert client.get("/v1/items/it5").json() == {"model": "sasrec", "item_id": "it5", "title": "Item 5",
                                                  "popularity": float((NUM_ITEMS + 1 - 5) * 3)}


def test_indexes_are_built_once_per_version_and_saved_beside_the_bundle(client, bundles):
    assert sorted(p.name for p in (bundles["a"] / "faiss").iterdir()) == [
        "recommend.faiss", "recommend.json", "similar.faiss", "similar.json"]
    models = client.get("/v1/models").json()
    assert models["default"] == "sasrec" and {m["name"] for m in models["models"]} == {"sasrec", "gru4rec"}
    assert models["models"][0]["recommend_index"]["kind"] == "exact"


def test_api_key_guards_everything_but_health(tmp_path, bundles):
    with TestClient(create_app(settings_for(tmp_path, bundles, "a", api_key="s3cret"))) as c:
        assert c.get("/healthz").status_code == 200 and c.get("/readyz").status_code == 200
        assert c.post("/v1/recommend", json={"history": []}).status_code == 401
        assert c.get("/metrics", headers={"X-API-Key": "wrong"}).status_code == 401
        assert c.post("/v1/recommend", json={"history": []}, headers={"X-API-Key": "s3cret"}).status_code == 200
        assert c.post("/v1/models/reload", headers={"X-API-Key": "s3cret"}).status_code == 200


def test_reload_swaps_the_version_and_refuses_what_it_must(client, bundles, tmp_path):
    before = client.get("/v1/models").json()["models"][0]["version"]
    swapped = client.post("/v1/models/reload", json={"source": str(bundles["b"])}).json()
    assert swapped["previous_version"] == before and swapped["version"] != before
    assert client.post("/v1/recommend", json={"history": ["it1"]}).json()["version"] == swapped["version"]
    assert client.post("/v1/models/reload", json={"source": "/etc"}).status_code == 403
    assert client.post("/v1/models/reload", json={"source": "models:/other-thing@champion"}).status_code == 403
    assert client.post("/v1/models/reload", json={"source": str(bundles["root"] / "missing")}).status_code == 404
    (bundles["root"] / "not-a-bundle").mkdir()
    assert client.post("/v1/models/reload", json={"source": str(bundles["root"] / "not-a-bundle")}).status_code == 404
    assert client.post("/v1/models/reload", json={"model": "nope"}).status_code == 404
    assert client.post("/v1/models/reload", json={"source": str(bundles["gru"])}).status_code == 409


def test_hot_reload_under_concurrent_load_fails_no_request(tmp_path, bundles):
    """Requests in flight while the model is swapped back and forth all succeed, each on one whole version."""
    app = create_app(settings_for(tmp_path, bundles, "a", max_batch=8))
    versions = {}

    async def scenario():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            async def user(i):
                statuses = []
                for j in range(15):
                    r = await c.post("/v1/recommend", json={"history": [f"it{(i + j) % NUM_ITEMS + 1}"], "k": 5})
                    statuses.append(r.status_code)
                    versions.setdefault(r.json().get("version"), 0)
                return statuses

            async def reloader():
                codes = []
                for source in ("b", "a", "b"):
                    await asyncio.sleep(0.01)
                    codes.append((await c.post("/v1/models/reload", json={"source": str(bundles[source])})).status_code)
                return codes

            return await asyncio.gather(reloader(), *[user(i) for i in range(16)])

    async def with_lifespan():  # model loading and the batcher, as uvicorn would start them
        async with app.router.lifespan_context(app):
            return await scenario()

    reload_codes, *users = asyncio.run(with_lifespan())
    assert reload_codes == [200, 200, 200]
    assert all(code == 200 for statuses in users for code in statuses)
    assert len(versions) == 2  # both versions answered


def test_a_full_queue_answers_503_with_retry_after_and_the_service_recovers(tmp_path, bundles):
    """With the inference thread held busy, at most ``max_queue`` queries wait (plus one batch taken); the rest are
    refused at once with 503 and Retry-After (by the middleware before the body is read, or by the batcher), and
    everything admitted is answered once the thread is free."""
    app = create_app(settings_for(tmp_path, bundles, "a", max_batch=2, max_queue=4))
    batcher = app.state.service.batcher

    async def scenario():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            gate = threading.Event()
            busy = asyncio.ensure_future(batcher.run_in_thread(gate.wait))
            await asyncio.sleep(0.05)
            sent = [asyncio.ensure_future(c.post("/v1/recommend", json={"history": [f"it{i + 1}"], "k": 3}))
                    for i in range(12)]
            in_batch = 0
            for _ in range(1500):  # every request refused, waiting, or in the one batch taken (held by the gate)
                in_batch = int(app.state.service.metrics.batch_sizes.sum)
                if sum(f.done() for f in sent) + batcher.waiting + in_batch == 12:
                    break
                await asyncio.sleep(0.02)
            refused = [f.result() for f in sent if f.done()]
            waiting = batcher.waiting
            gate.set()
            await busy
            answered = await asyncio.gather(*sent)
            after = await c.post("/v1/recommend", json={"history": ["it1"], "k": 3})
            return refused, (waiting, in_batch), answered, after, (await c.get("/metrics")).text

    async def with_lifespan():
        async with app.router.lifespan_context(app):
            return await scenario()

    refused, (waiting, in_batch), answered, after, metrics = asyncio.run(with_lifespan())
    # 12 sent: at most max_queue wait and max_batch are in the batch taken (when the worker collects depends on the
    # scheduling), every other one was refused
    assert waiting <= 4 and in_batch <= 2 and len(refused) == 12 - waiting - in_batch >= 6
    for response in refused:
        assert response.status_code == 503 and response.headers["retry-after"] == "1"
        assert "overloaded" in response.json()["detail"]
    assert sorted(r.status_code for r in answered).count(200) == 12 - len(refused)
    assert after.status_code == 200 and batcher.waiting == 0
    assert f'route="/v1/recommend",status="503"}} {len(refused)}' in metrics


def test_metrics_expose_counts_latency_batches_and_versions(client):
    client.post("/v1/recommend", json={"history": ["it1"]})
    client.post("/v1/recommend", json={"history": []})
    text = client.get("/metrics").text
    assert 'recsys_requests_total{method="POST",route="/v1/recommend",status="200"} 2' in text
    assert 'recsys_request_seconds_bucket{route="/v1/recommend",le="+Inf"} 2' in text
    assert "recsys_batch_size_count 2" in text and "recsys_fallbacks_total 1" in text
    assert 'recsys_model_info{model="sasrec"' in text


def test_approximate_index_answers_are_full_and_respect_exclusions(tmp_path, bundles):
    """With the approximate index forced on the toy catalogue, short answers are retried until k items come
    back, excluded items never appear, and nearly all of the exact top-10 is found."""
    from serving.settings import IndexSettings

    approximate = settings_for(tmp_path, bundles, "a", index=IndexSettings(exact_max_items=10, tuning_queries=50))
    with TestClient(create_app(approximate)) as c:
        assert c.get("/v1/models").json()["models"][0]["recommend_index"]["kind"] == "ivf"
        exclude = [f"it{i}" for i in range(1, 30)]
        body = c.post("/v1/recommend", json={"history": ["it3", "it4"], "k": 10, "exclude": exclude}).json()
        ids = [it["item_id"] for it in body["items"]]
        assert len(ids) == 10 and not set(ids) & set(exclude + ["it3", "it4"])
        recall = []
        for start in range(1, 30):
            history = [f"it{start}", f"it{start + 5}"]
            served = [it["item_id"] for it in c.post("/v1/recommend", json={"history": history}).json()["items"]]
            recall.append(len(set(served) & set(offline_top(bundles["a"], history, 10)[0])) / 10)
        assert np.mean(recall) >= 0.9


def test_ivf_tuning_reaches_the_target_recall_and_the_saved_index_round_trips(tmp_path):
    from serving.index import build_index, load_index, recall_at_k, save_index
    from serving.settings import IndexSettings

    rng = np.random.default_rng(0)
    centres = rng.normal(size=(50, 16))
    table = (centres[rng.integers(0, 50, 5000)] + 0.3 * rng.normal(size=(5000, 16))).astype(np.float32)
    queries = (centres[rng.integers(0, 50, 300)] + 0.3 * rng.normal(size=(300, 16))).astype(np.float32)
    settings = IndexSettings(exact_max_items=1000, tuning_queries=300)
    index = build_index(table, settings, queries)
    exact = (queries @ table.T).argsort(axis=1)[:, ::-1][:, :10]
    assert index.kind == "ivf" and index.recall_at_10 >= 0.95
    assert recall_at_k(index.search(queries, 10)[1], exact) >= 0.95
    save_index(index, tmp_path, "recommend", "abc")
    again = load_index(tmp_path, "recommend", "abc", settings)
    assert again.search_param == index.search_param and np.array_equal(again.search(queries, 10)[1],
                                                                        index.search(queries, 10)[1])
    assert load_index(tmp_path, "recommend", "other-weights", settings) is None
    assert not list(tmp_path.glob(".*.tmp"))


@pytest.mark.parametrize("name", sorted(n for n, cls in MODELS.items() if cls.trainable))
def test_every_trainable_model_is_servable(tmp_path, name):
    bundle = make_bundle(tmp_path / "bundles" / name, model=name)
    settings = ServiceSettings(bundles=[str(bundle)], cache_dir=str(tmp_path / "cache"))
    with TestClient(create_app(settings)) as c:
        body = c.post("/v1/recommend", json={"history": ["it3", "it4", "it5"], "timestamps": [10, 70, 4000],
                                             "k": 7}).json()
        assert body["model"] == name and len(body["items"]) == 7
        assert len(c.get("/v1/items/it3/similar", params={"k": 3}).json()["items"]) == 3


def test_generative_model_is_served_by_its_beam_search(tmp_path):
    """TIGER has no item table: /recommend returns exactly its constrained beam search (exclusions applied after),
    /similar ranks by the items' text embeddings."""
    bundle_dir = make_bundle(tmp_path / "bundles" / "tiger", model="tiger")
    settings = ServiceSettings(bundles=[str(bundle_dir)], cache_dir=str(tmp_path / "cache"))
    history = ["it3", "it7", "it12", "it30"]
    model = load_bundle(bundle_dir).model
    idx = np.array([int(i.removeprefix("it")) for i in history])
    with torch.no_grad():
        items, scores = model.beam_search(pad_histories([(idx, np.zeros_like(idx))], model.config.max_len), 5 + 4)
    keep = ~np.isin(items[0].numpy(), idx)
    expected = [f"it{i}" for i in items[0].numpy()[keep][:5]]
    text = model.item_text[1:].numpy()
    text = text / np.linalg.norm(text, axis=1, keepdims=True)
    nearest = [f"it{i + 1}" for i in np.argsort(-(text @ text[2]), kind="stable") if i != 2][:3]
    with TestClient(create_app(settings)) as c:
        body = c.post("/v1/recommend", json={"history": history, "k": 5}).json()
        assert [it["item_id"] for it in body["items"]] == expected
        np.testing.assert_allclose([it["score"] for it in body["items"]], scores[0].numpy()[keep][:5], rtol=1e-5)
        described = c.get("/v1/models").json()["models"][0]
        assert described["recommend_index"]["kind"] == "beam search"
        similar = c.get("/v1/items/it3/similar", params={"k": 3}).json()["items"]
        assert [it["item_id"] for it in similar] == nearest
        every = c.post("/v1/recommend", json={"history": ["it1"], "k": NUM_ITEMS - 1}).json()["items"]
        assert sorted(int(it["item_id"].removeprefix("it")) for it in every) == list(range(2, NUM_ITEMS + 1))

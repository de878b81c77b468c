"""The service as users run it: ``recsys serve`` in its own process (real uvicorn on 127.0.0.1), driven over
HTTP. Recommend, batch, similar, reload and metrics end to end, then a property-based fuzz run over the OpenAPI
schema (schemathesis, bounded budget) that must never get a 5xx."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import time

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable

from tests.serving_fixtures import make_bundle
from tests.helpers import free_port

KEY = "integration-key"
ADMIN_KEY = "integration-admin-key"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    first, second = make_bundle(root / "bundles" / "v1", seed=0), make_bundle(root / "bundles" / "v2", seed=1)
    port = free_port()
    env = {**os.environ, "RECSYS_API_KEY": KEY, "RECSYS_ADMIN_API_KEY": ADMIN_KEY,
           "RECSYS_BUNDLE_ROOTS": str(root / "bundles"), "RECSYS_SERVING_CACHE": str(root / "cache"),
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "recsys.cli", "serve", "--bundle", str(first), "--port", str(port)],
                            cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"recsys serve exited: {proc.stdout.read().decode()[-2000:]}")
        try:
            if httpx.get(f"{base}/readyz", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.2)
    else:
        proc.kill()
        pytest.fail("recsys serve did not become ready in 120 s")
    yield {"base": base, "bundles": (first, second)}
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture()
def http(server):
    with httpx.Client(base_url=server["base"], headers={"X-API-Key": KEY}, timeout=30) as client:
        yield client


def test_recommend_batch_similar_reload_and_metrics_over_http(server, http):
    one = http.post("/v1/recommend", json={"history": ["it3", "it4", "unknown"], "k": 5})
    assert one.status_code == 200
    body = one.json()
    assert len(body["items"]) == 5 and body["unknown_items"] == ["unknown"] and body["fallback"] is None
    batch = http.post("/v1/recommend/batch", json={"requests": [{"history": ["it3", "it4", "unknown"], "k": 5},
                                                                {"history": []}]}).json()["results"]
    assert batch[0] == body and batch[1]["fallback"] == "popularity"
    similar = http.get("/v1/items/it3/similar", params={"k": 4}).json()
    assert len(similar["items"]) == 4 and "it3" not in [it["item_id"] for it in similar["items"]]
    assert http.post("/v1/models/reload", json={}).status_code == 401  # the client key is not the admin key
    reloaded = http.post("/v1/models/reload", json={"source": str(server["bundles"][1])},
                         headers={"X-API-Key": ADMIN_KEY}).json()
    assert reloaded["previous_version"] == body["version"] != reloaded["version"]
    assert http.post("/v1/recommend", json={"history": ["it3"]}).json()["version"] == reloaded["version"]
    metrics = http.get("/metrics").text
    assert 'route="/v1/recommend",status="200"' in metrics and f'version="{reloaded["version"]}"' in metrics
    assert httpx.post(f"{server['base']}/v1/recommend", json={"history": []}).status_code == 401
    assert httpx.get(f"{server['base']}/healthz").json() == {"status": "ok"}


def test_fuzzed_requests_never_get_a_server_error(server):
    """Every operation of the OpenAPI schema (the admin reload route included), with bodies, paths and queries
    generated from it (valid and invalid), 20 examples per generation mode, sent with no key, the client key and
    the admin key: any status but 5xx is fine."""
    schema = schemathesis.openapi.from_url(f"{server['base']}/openapi.json", headers={"X-API-Key": KEY})
    failures, calls = [], []
    operations = [result.ok() for result in schema.get_all_operations()]
    keys = {"no key": {}, "client key": {"X-API-Key": KEY}, "admin key": {"X-API-Key": ADMIN_KEY}}
    for operation, mode, (who, headers) in itertools.product(operations, schemathesis.GenerationMode, keys.items()):

        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(max_examples=20, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def call(case):
            response = case.call(headers=headers, timeout=30)
            calls.append((operation.path, who, response.status_code))
            if response.status_code >= 500:
                failures.append(f"{case.method} {case.formatted_path} ({who}) {case.body!r:.200} -> "
                                f"{response.status_code}: {response.text[:300]}")

        try:
            call()
        except Unsatisfiable:  # nothing can be invalid about an operation without inputs (GET /healthz)
            pass
    print(f"schemathesis: {len(calls)} cases over {len(operations)} operations, "
          f"{sum(code >= 500 for _, _, code in calls)} server errors")
    assert not failures, "\n".join(failures[:10])
    assert len(operations) >= 9 and len(calls) >= 9 * 2 * 3 * 5  # every operation, mode and key really exercised
    by_key = {who: [code for _, w, code in calls if w == who] for who in keys}
    assert 401 in by_key["no key"] and 200 in by_key["client key"]
    reload = {who: {code for path, w, code in calls if path == "/v1/models/reload" and w == who} for who in keys}
    assert 401 in reload["client key"] and 200 not in reload["client key"]  # malformed bodies may get 400/422 first
    assert reload["admin key"] - {401}

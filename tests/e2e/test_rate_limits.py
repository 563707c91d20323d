"""Per-key rate limits: a token bucket per API key, shared by API replicas through Redis, in
process memory for the embedded default. The refill is one request per 100 s, so no request
of a test is ever let through by time passing: only the counts are asserted."""

from __future__ import annotations

import sys
import time

import httpx
import pytest

from tests.e2e.stack import ServiceStack, free_port

LIMITS = {"rate_limit_per_s": "0.01", "rate_limit_burst": "3"}


def _state(response: httpx.Response) -> tuple[int, int, int]:
    return (int(response.headers["RateLimit-Limit"]), int(response.headers["RateLimit-Remaining"]),
            int(response.headers["RateLimit-Reset"]))


def _assert_refused(response: httpx.Response) -> None:
    assert response.status_code == 429, response.text
    assert response.json()["error"]["type"] == "rate_limit_error"
    assert "at most 3 at once" in response.json()["error"]["message"]
    assert 1 <= int(response.headers["Retry-After"]) <= 100  # one request's worth of refill
    limit, remaining, reset = _state(response)
    assert (limit, remaining) == (3, 0) and 0 < reset <= 300


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/healthz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.fixture
def replicas(tmp_path):
    """Two API processes on PostgreSQL + Redis, as two replicas behind a load balancer."""
    stack = ServiceStack.postgres_redis(tmp_path / "s", **LIMITS)
    stack.start(with_worker=False)
    try:
        port = free_port()
        stack._spawn("api-2", [sys.executable, "-m", "uvicorn", "app.main:app", "--host", "127.0.0.1",
                                "--port", str(port)])
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while not _healthy(url):
            assert time.monotonic() < deadline, stack.logs()
            time.sleep(0.3)
        yield stack, url
    finally:
        stack.stop()


def test_replicas_share_each_keys_bucket_through_redis(replicas):
    stack, other_url = replicas
    first = stack.client
    second = httpx.Client(base_url=other_url, headers=first.headers, timeout=60)
    assert _state(first.get("/v1/models"))[:2] == (3, 2)
    assert _state(second.get("/v1/models"))[:2] == (3, 1)   # the other replica drew from the same bucket
    assert _state(first.get("/v1/models"))[:2] == (3, 0)
    _assert_refused(second.get("/v1/models"))
    _assert_refused(first.post("/v1/jobs", json={}))          # refused before the body is even read
    # Another key has its own bucket; a request without a key is not counted (it gets its 401).
    other = stack.client_for(stack.create_key("tenant-other"))
    response = other.get("/v1/models")
    assert response.status_code == 200 and _state(response)[:2] == (3, 2)
    anonymous = httpx.get(f"{stack.url}/v1/models")
    assert anonymous.status_code == 401 and "RateLimit-Limit" not in anonymous.headers


def test_the_embedded_default_counts_in_process(tmp_path):
    with ServiceStack.embedded(tmp_path / "e", **LIMITS) as stack:
        client = stack.client
        assert [_state(client.get("/v1/jobs"))[1] for _ in range(3)] == [2, 1, 0]
        _assert_refused(client.get("/v1/jobs"))
        assert httpx.get(f"{stack.url}/healthz").status_code == 200


def test_429_is_documented_with_its_headers(pg_stack):
    schema = httpx.get(f"{pg_stack.url}/openapi.json").json()
    operation = schema["paths"]["/v1/models"]["get"]
    assert set(operation["responses"]["429"]["headers"]) == {
        "RateLimit-Limit", "RateLimit-Remaining", "RateLimit-Reset", "Retry-After"}
    assert "429" not in schema["paths"]["/healthz"]["get"]["responses"]

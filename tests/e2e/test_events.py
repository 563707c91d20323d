"""A job's log: paged, and streamed as Server-Sent Events that end with the final status."""

from __future__ import annotations

import json
import time
from contextlib import ExitStack

import httpx
import pytest

from tests.e2e.client import submit_job, upload_dataset, upload_model, wait_for
from tests.e2e.stack import ServiceStack
from tests.factories import make_checkpoint


def _parse_sse(text: str) -> list[dict]:
    events = []
    for block in text.strip().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines() if not line.startswith(":"))
        if fields:
            events.append({"id": int(fields["id"]), "event": fields["event"], "data": json.loads(fields["data"])})
    return events


def test_events_stream_in_order_and_end_with_the_final_status(stack, tmp_path):
    client = stack.client
    model = upload_model(client, make_checkpoint(tmp_path / "m"))
    dataset = upload_dataset(client)
    job = client.post("/v1/jobs", json={
        "model_id": model["id"], "evaluation": {"dataset_id": dataset["id"], "seq_len": 64},
        "stages": [{"type": "prune", "method": "magnitude", "sparsity": 0.5},
                   {"type": "quantize", "method": "rtn", "bits": 8}]}).json()

    # Opened right away: the stream follows the running job and closes by itself at the end.
    with client.stream("GET", f"/v1/jobs/{job['id']}/events/stream", timeout=120) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        streamed = _parse_sse(response.read().decode())

    ids = [e["id"] for e in streamed]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    statuses = [e["data"]["data"]["status"] for e in streamed if e["event"] == "status"]
    assert statuses == ["queued", "running", "succeeded"]
    assert streamed[-1]["event"] == "status"
    stages = [e["data"]["data"]["stage"] for e in streamed if e["event"] == "stage"]
    assert stages == ["load", "evaluate.before", "prune.magnitude", "quantize.rtn", "export", "evaluate.after"]
    assert any(e["event"] == "metric" for e in streamed) and any(e["event"] == "progress" for e in streamed)

    # The paged log holds the same events; paging by cursor walks it without gaps.
    paged, after = [], None
    while True:
        page = client.get(f"/v1/jobs/{job['id']}/events", params={"limit": 3, **({"after": after} if after else {})}).json()
        paged += page["data"]
        if not page["has_more"]:
            break
        after = page["data"][-1]["id"]
    assert [e["id"] for e in paged] == ids

    # Resuming with Last-Event-ID replays only what came after.
    resumed = client.get(f"/v1/jobs/{job['id']}/events/stream", headers={"Last-Event-ID": str(ids[-3])})
    assert [e["id"] for e in _parse_sse(resumed.text)] == ids[-2:]
    assert wait_for(client, job["id"])["status"] == "succeeded"


def test_events_of_another_tenant_are_404(pg_stack):
    other = pg_stack.client_for(pg_stack.create_key("tenant-events"))
    jobs = pg_stack.client.get("/v1/jobs", params={"limit": 1}).json()["data"]
    job_id = jobs[0]["id"] if jobs else "job_missing"
    assert other.get(f"/v1/jobs/{job_id}/events").status_code == 404
    assert other.get(f"/v1/jobs/{job_id}/events/stream").status_code == 404
    assert httpx.get(f"{pg_stack.url}/v1/jobs/{job_id}/events").status_code == 401


# -- limits: open streams per key and per tenant, and a stream's lifetime ----------------------

@pytest.fixture(scope="module")
def capped_stack(tmp_path_factory):
    """No worker (its job stays queued, so its streams stay open), two streams per key, three
    per tenant."""
    workdir = tmp_path_factory.mktemp("capped-streams")
    stack = ServiceStack.postgres_redis(workdir, event_streams_per_key="2", event_streams_per_tenant="3")
    stack.start(with_worker=False)
    try:
        stack.job_id = submit_job(stack.client, workdir / "model")["id"]
        yield stack
    finally:
        stack.stop()


def _open(client: httpx.Client, job_id: str, streams: ExitStack) -> httpx.Response:
    response = streams.enter_context(client.stream("GET", f"/v1/jobs/{job_id}/events/stream"))
    if response.status_code != 200:
        response.read()
    return response


def test_open_streams_are_capped_per_key_and_per_tenant(capped_stack):
    stack, job_id = capped_stack, capped_stack.job_id
    first, second = stack.client, stack.client_for(stack.create_key("tenant-a"))
    with ExitStack() as streams:
        assert [_open(first, job_id, streams).status_code for _ in range(2)] == [200, 200]
        refused = _open(first, job_id, streams)
        assert refused.status_code == 429
        assert int(refused.headers["Retry-After"]) > 0
        assert refused.json()["error"]["type"] == "rate_limit_error"
        assert "API key" in refused.json()["error"]["message"]

        # Another key of the tenant has places of its own, up to the tenant's three.
        assert _open(second, job_id, streams).status_code == 200
        refused = _open(second, job_id, streams)
        assert refused.status_code == 429 and "tenant" in refused.json()["error"]["message"]
        assert int(refused.headers["Retry-After"]) > 0

        # Another tenant is not counted with this one: it gets the usual 404 for the job.
        outsider = stack.client_for(stack.create_key("tenant-streams-other"))
        assert _open(outsider, job_id, streams).status_code == 404

    # Closed streams give their places back (the server sees each disconnect).
    deadline = time.monotonic() + 60
    while True:
        with first.stream("GET", f"/v1/jobs/{job_id}/events/stream") as response:
            status = response.status_code
        if status != 429:
            break
        assert time.monotonic() < deadline, "the closed streams' places never came back"
        time.sleep(0.2)
    assert status == 200


def test_a_stream_ends_at_its_time_limit_and_resumes(tmp_path):
    stack = ServiceStack.postgres_redis(tmp_path / "stack", event_stream_max_s="2")
    stack.start(with_worker=False)
    try:
        job = submit_job(stack.client, tmp_path / "model")
        with stack.client.stream("GET", f"/v1/jobs/{job['id']}/events/stream") as response:
            assert response.status_code == 200
            body = response.read().decode()  # returns: the server ended the stream
        events = _parse_sse(body)
        assert [e["data"]["data"]["status"] for e in events] == ["queued"]
        assert "time limit" in body and "Last-Event-ID" in body
        assert stack.client.get(f"/v1/jobs/{job['id']}").json()["status"] == "queued"

        # Reopened with the last id: nothing again, and again it ends by itself.
        resumed = stack.client.get(f"/v1/jobs/{job['id']}/events/stream",
                                   headers={"Last-Event-ID": str(events[-1]["id"])})
        assert resumed.status_code == 200 and _parse_sse(resumed.text) == []
        assert "time limit" in resumed.text
    finally:
        stack.stop()

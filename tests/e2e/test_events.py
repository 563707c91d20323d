"""A job's log: paged, and streamed as Server-Sent Events that end with the final status."""

from __future__ import annotations

import json

import httpx

from tests.e2e.client import upload_dataset, upload_model, wait_for
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

"""Idempotency-Key on POST: a retried request creates one object and gets the same answer."""

from __future__ import annotations

import json
import uuid

from tests.factories import checkpoint_files, make_checkpoint


def test_retried_job_post_creates_one_job(stack, tmp_path):
    client = stack.client
    files = [("files", (n, d)) for n, d in checkpoint_files(make_checkpoint(tmp_path / "m"))]
    key = str(uuid.uuid4())
    first = client.post("/v1/models", files=files, headers={"Idempotency-Key": key})
    # httpx picks a new multipart boundary for the retry: still the same request.
    again = client.post("/v1/models", files=files, headers={"Idempotency-Key": key})
    assert first.status_code == again.status_code == 201, again.text
    assert again.json()["id"] == first.json()["id"] and again.headers["idempotent-replayed"] == "true"
    model_id = first.json()["id"]
    assert [m["id"] for m in client.get("/v1/models", params={"limit": 100}).json()["data"]].count(model_id) == 1

    spec = {"model_id": model_id, "stages": [{"type": "prune", "method": "random", "sparsity": 0.2}]}
    key = str(uuid.uuid4())
    jobs_before = len(client.get("/v1/jobs", params={"limit": 100}).json()["data"])
    first = client.post("/v1/jobs", json=spec, headers={"Idempotency-Key": key})
    # Same body with other key order and spacing.
    body = json.dumps({"stages": spec["stages"], "model_id": model_id}, indent=2)
    again = client.post("/v1/jobs", content=body, headers={"Idempotency-Key": key, "Content-Type": "application/json"})
    assert first.status_code == again.status_code == 201 and again.json()["id"] == first.json()["id"]
    assert len(client.get("/v1/jobs", params={"limit": 100}).json()["data"]) == jobs_before + 1

    different = client.post("/v1/jobs", json={**spec, "metadata": {"x": "y"}}, headers={"Idempotency-Key": key})
    assert different.status_code == 409
    assert different.json()["error"]["param"] == "Idempotency-Key"
    assert len(client.get("/v1/jobs", params={"limit": 100}).json()["data"]) == jobs_before + 1


def test_keys_are_per_tenant_and_errors_are_replayed(pg_stack):
    key = str(uuid.uuid4())
    bad = {"model_id": "mdl_missing", "stages": [{"type": "quantize", "method": "rtn"}]}
    first = pg_stack.client.post("/v1/jobs", json=bad, headers={"Idempotency-Key": key})
    again = pg_stack.client.post("/v1/jobs", json=bad, headers={"Idempotency-Key": key})
    assert first.status_code == again.status_code == 404 and first.json() == again.json()
    other = pg_stack.client_for(pg_stack.create_key("tenant-idem"))
    response = other.post("/v1/jobs", json={**bad, "metadata": {"a": "b"}}, headers={"Idempotency-Key": key})
    assert response.status_code == 404  # B's key space is its own: no 409 from A's request

"""Idempotency-Key on POST: a retried request creates one object and gets the same answer."""

from __future__ import annotations

import json
import uuid

import psycopg

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


def _dataset_post(client, key: str, text: str = "some text to keep"):
    return client.post("/v1/datasets", files={"file": ("c.txt", text.encode())}, headers={"Idempotency-Key": key})


def _key_id(admin, secret: str) -> str:
    return next(k["id"] for k in admin.get("/v1/api-keys").json()["data"] if secret.startswith(k["prefix"]))


def test_a_stored_answer_belongs_to_the_api_key_that_made_it(stack):
    # Two keys of one tenant: the second key's request runs; it never gets the first's answer.
    first, second = (stack.client_for(stack.create_key("tenant-idem-keys")) for _ in range(2))
    key = str(uuid.uuid4())
    made = _dataset_post(first, key)
    other = _dataset_post(second, key)
    assert made.status_code == other.status_code == 201, other.text
    assert other.json()["id"] != made.json()["id"] and "idempotent-replayed" not in other.headers
    different = _dataset_post(second, key, text="another body")  # its own record: 409, not the first's
    assert different.status_code == 409 and different.json()["error"]["param"] == "Idempotency-Key"
    replay = _dataset_post(first, key)
    assert replay.json()["id"] == made.json()["id"] and replay.headers["idempotent-replayed"] == "true"


def test_a_revoked_key_gets_401_not_the_replay(pg_stack):
    admin = pg_stack.client_for(pg_stack.create_key("tenant-idem-revoke", admin=True))
    secret = pg_stack.create_key("tenant-idem-revoke")
    member = pg_stack.client_for(secret)
    key = str(uuid.uuid4())
    assert _dataset_post(member, key).status_code == 201
    assert admin.delete(f"/v1/api-keys/{_key_id(admin, secret)}").status_code == 200
    again = _dataset_post(member, key)
    assert again.status_code == 401 and "idempotent-replayed" not in again.headers


def test_a_demoted_key_gets_403_not_the_replay(pg_stack):
    secret = pg_stack.create_key("tenant-idem-demote", admin=True)
    client = pg_stack.client_for(secret)
    key = str(uuid.uuid4())
    assert _dataset_post(client, key).status_code == 201
    pg_stack.admin_cli("set-scope", _key_id(client, secret), "member")
    again = _dataset_post(client, key)
    assert again.status_code == 403 and again.json()["error"]["type"] == "permission_error"
    assert "idempotent-replayed" not in again.headers
    assert _dataset_post(client, str(uuid.uuid4())).status_code == 201  # what a member may do, it still does


def test_a_new_keys_secret_is_never_stored_nor_replayed(pg_stack):
    admin = pg_stack.client_for(pg_stack.create_key("tenant-idem-secret", admin=True))
    key = str(uuid.uuid4())
    created = admin.post("/v1/api-keys", json={"name": "ci"}, headers={"Idempotency-Key": key})
    assert created.status_code == 201
    secret, key_id = created.json()["key"], created.json()["id"]
    again = admin.post("/v1/api-keys", json={"name": "ci"}, headers={"Idempotency-Key": key})
    assert again.status_code == 409 and again.json()["error"]["param"] == "Idempotency-Key"
    assert key_id in again.json()["error"]["message"] and secret not in again.text
    # One key made, not two, and no stored answer holds the secret or its hash.
    assert [k["name"] for k in admin.get("/v1/api-keys").json()["data"]].count("ci") == 1
    url = pg_stack.env["SQUEEZE_DATABASE_URL"].replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(url) as conn:
        bodies = [bytes(row[0] or b"") for row in conn.execute("SELECT response_body FROM idempotency_keys")]
    assert bodies and not any(secret.encode() in body or secret[4:].encode() in body for body in bodies)


def test_openapi_documents_what_a_replay_may_answer(pg_stack):
    paths = pg_stack.client.get("/openapi.json").json()["paths"]
    posts = {path: ops["post"] for path, ops in paths.items() if "post" in ops and path.startswith("/v1/")}
    assert "/v1/api-keys" in posts and "/v1/jobs" in posts
    for path, operation in posts.items():
        assert {"403", "409"} <= set(operation["responses"]), path
        assert "Idempotency-Key" in operation["responses"]["403"]["description"], path

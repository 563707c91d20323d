"""Tenancy, keys, paging, filters, metadata and downloads, through HTTP on PostgreSQL + Redis."""

from __future__ import annotations

import hashlib

import httpx
import pytest

from tests.e2e.client import upload_dataset, upload_model, wait_for
from tests.factories import make_checkpoint


@pytest.fixture(scope="module")
def finished(pg_stack, tmp_path_factory):
    """A succeeded job of tenant A (prune only: quick)."""
    client = pg_stack.client
    model = upload_model(client, make_checkpoint(tmp_path_factory.mktemp("m")), metadata='{"team": "search"}')
    dataset = upload_dataset(client)
    job = client.post("/v1/jobs", json={"model_id": model["id"], "metadata": {"run": "nightly"},
                                        "stages": [{"type": "prune", "method": "magnitude", "sparsity": 0.3}]}).json()
    job = wait_for(client, job["id"])
    assert job["status"] == "succeeded", pg_stack.logs()
    return {"model": model, "dataset": dataset, "job": job}


@pytest.fixture(scope="module")
def tenant_b(pg_stack):
    return pg_stack.client_for(pg_stack.create_key("tenant-b"))


def test_requests_without_a_valid_key_are_401(pg_stack):
    for headers in ({}, {"Authorization": "Bearer sqz_not-a-key"}, {"Authorization": "Basic abc"}):
        response = httpx.get(f"{pg_stack.url}/v1/models", headers=headers)
        assert response.status_code == 401
        assert response.json()["error"]["type"] == "authentication_error"


def test_another_tenant_sees_nothing_and_gets_404(finished, tenant_b):
    model, dataset, job = finished["model"], finished["dataset"], finished["job"]
    for path in (f"/v1/models/{model['id']}", f"/v1/datasets/{dataset['id']}", f"/v1/jobs/{job['id']}",
                 f"/v1/jobs/{job['id']}/artifact"):
        response = tenant_b.get(path)
        assert response.status_code == 404, path
        assert model["id"] not in response.text or "no model" in response.text
    assert tenant_b.post(f"/v1/jobs/{job['id']}/cancel").status_code == 404
    assert tenant_b.delete(f"/v1/models/{model['id']}").status_code == 404
    assert tenant_b.delete(f"/v1/datasets/{dataset['id']}").status_code == 404
    for path in ("/v1/models", "/v1/datasets", "/v1/jobs"):
        assert tenant_b.get(path).json()["data"] == []
    # Nor can B start a job on A's model.
    response = tenant_b.post("/v1/jobs", json={"model_id": model["id"], "stages": [{"type": "quantize", "method": "rtn"}]})
    assert response.status_code == 404 and response.json()["error"]["param"] == "model_id"


def test_admin_manages_keys_and_revocation_is_immediate(pg_stack, tenant_b):
    admin = pg_stack.client
    assert tenant_b.get("/v1/api-keys").status_code == 403
    created = admin.post("/v1/api-keys", json={"name": "ci"})  # for its own tenant (see test_tenancy.py)
    assert created.status_code == 201
    body = created.json()
    assert body["key"].startswith("sqz_") and body["key"].startswith(body["prefix"])
    listed = admin.get("/v1/api-keys").json()["data"]
    assert body["id"] in [k["id"] for k in listed] and all("key" not in k for k in listed)
    client_c = pg_stack.client_for(body["key"])
    assert client_c.get("/v1/models").status_code == 200
    assert admin.delete(f"/v1/api-keys/{body['id']}").json()["revoked_at"]
    assert client_c.get("/v1/models").status_code == 401
    assert admin.delete(f"/v1/api-keys/{body['id']}").status_code == 409


def test_paging_and_filters(pg_stack, finished, tmp_path):
    client = pg_stack.client
    ids = [upload_dataset(client, text=f"text number {i}")["id"] for i in range(3)]
    first = client.get("/v1/datasets", params={"limit": 2}).json()
    assert [d["id"] for d in first["data"]] == ids[::-1][:2] and first["has_more"] is True
    second = client.get("/v1/datasets", params={"limit": 2, "after": first["data"][-1]["id"]}).json()
    assert second["data"][0]["id"] == ids[0]
    models = client.get("/v1/models", params={"metadata[team]": "search"}).json()["data"]
    assert [m["id"] for m in models] == [finished["model"]["id"]]
    assert client.get("/v1/models", params={"metadata[team]": "ads"}).json()["data"] == []
    jobs = client.get("/v1/jobs", params={"status": "succeeded", "metadata[run]": "nightly"}).json()["data"]
    assert finished["job"]["id"] in [j["id"] for j in jobs]
    assert client.get("/v1/jobs", params={"status": "failed"}).json()["data"] == []
    created = finished["job"]["created_at"]
    assert client.get("/v1/jobs", params={"created_after": created}).json()["data"]
    assert client.get("/v1/jobs", params={"created_before": "2000-01-01T00:00:00Z"}).json()["data"] == []
    assert client.get("/v1/jobs", params={"limit": 0}).status_code == 422


def test_download_supports_head_etag_and_ranges(pg_stack, finished):
    client = pg_stack.client
    url = f"/v1/jobs/{finished['job']['id']}/artifact"
    whole = client.get(url)
    size, digest = int(whole.headers["content-length"]), whole.headers["x-checksum-sha256"]
    assert hashlib.sha256(whole.content).hexdigest() == digest == finished["job"]["artifact"]["sha256"]
    head = client.head(url)
    assert head.status_code == 200 and head.content == b""
    assert int(head.headers["content-length"]) == size and head.headers["x-checksum-sha256"] == digest
    assert client.get(url, headers={"If-None-Match": head.headers["etag"]}).status_code == 304
    # Reassemble from ranges, out of order, to the same sha256.
    cut = [0, 1000, size // 2, size]
    parts = {}
    for start, end in reversed(list(zip(cut, cut[1:]))):
        response = client.get(url, headers={"Range": f"bytes={start}-{end - 1}"})
        assert response.status_code == 206 and len(response.content) == end - start
        parts[start] = response.content
    assert hashlib.sha256(b"".join(parts[k] for k in sorted(parts))).hexdigest() == digest
    assert client.get(url, headers={"Range": f"bytes={size + 10}-"}).status_code == 416


def test_openapi_documents_every_response(pg_stack):
    schema = httpx.get(f"{pg_stack.url}/openapi.json").json()
    for path, operations in schema["paths"].items():
        for method, operation in operations.items():
            codes = set(operation["responses"])
            if path.startswith("/v1/"):
                assert "401" in codes, (method, path)
            if "{" in path:
                assert "404" in codes, (method, path)
            if method == "post" and path.startswith("/v1/"):
                assert "422" in codes, (method, path)

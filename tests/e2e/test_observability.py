"""Health, readiness, Prometheus metrics and request ids."""

from __future__ import annotations

import httpx

from tests.e2e.client import upload_model, wait_for
from tests.factories import make_checkpoint


def test_health_ready_and_metrics(stack, tmp_path):
    assert httpx.get(f"{stack.url}/healthz").json() == {"status": "ok"}
    ready = httpx.get(f"{stack.url}/readyz")
    assert ready.status_code == 200 and ready.json()["checks"] == {"database": "ok", "broker": "ok"}

    client = stack.client
    model = upload_model(client, make_checkpoint(tmp_path / "m"))
    job = client.post("/v1/jobs", json={"model_id": model["id"],
                                        "stages": [{"type": "prune", "method": "magnitude", "sparsity": 0.4}]}).json()
    assert wait_for(client, job["id"])["status"] == "succeeded"

    scraped = stack.operator_client().get("/metrics")
    assert scraped.status_code == 200 and scraped.headers["content-type"].startswith("text/plain")
    text = scraped.text
    assert 'squeeze_http_request_duration_seconds_count{method="POST",route="/v1/jobs",status="201"}' in text
    assert 'route="/v1/jobs/{job_id}"' in text
    succeeded = [line for line in text.splitlines() if line.startswith('squeeze_jobs{status="succeeded"}')]
    assert succeeded and float(succeeded[0].split()[-1]) >= 1
    assert "squeeze_queue_depth" in text
    assert 'squeeze_job_duration_seconds_count{method="prune.magnitude"}' in text


def test_metrics_need_an_operator_key(stack):
    # Jobs by status count every tenant's: no tenant key, admin or not, reads them.
    anonymous = httpx.get(f"{stack.url}/metrics")
    assert anonymous.status_code == 401 and anonymous.json()["error"]["type"] == "authentication_error"
    assert "squeeze_jobs" not in anonymous.text
    for key in (stack.admin_key, stack.create_key("tenant-metrics")):
        refused = stack.client_for(key).get("/metrics")
        assert refused.status_code == 403 and refused.json()["error"]["type"] == "permission_error"
        assert "squeeze_jobs" not in refused.text
    assert "squeeze_jobs" in stack.operator_client().get("/metrics").text


def test_request_id_is_echoed(stack):
    response = stack.client.get("/v1/models", headers={"X-Request-ID": "abc-123"})
    assert response.headers["x-request-id"] == "abc-123"
    assert len(stack.client.get("/v1/models").headers["x-request-id"]) == 32


def test_readyz_reports_an_unreachable_broker(tmp_path):
    from tests.e2e.stack import ServiceStack

    stack = ServiceStack(tmp_path, {"SQUEEZE_VAR_DIR": str(tmp_path / "var"),
                                    "SQUEEZE_BROKER_URL": "redis://127.0.0.1:1/0"})
    stack.env["SQUEEZE_QUEUE_NAME"] = "unused"
    with stack:
        response = httpx.get(f"{stack.url}/readyz", timeout=30)
        assert response.status_code == 503 and response.json()["checks"]["broker"].startswith("error")

"""Webhooks: signed the Standard Webhooks way, retried, every attempt recorded."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from tests.e2e.client import upload_model, wait_for
from tests.factories import make_checkpoint

SECRET = "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()


class Receiver:
    """A webhook endpoint: answers 500 to the first delivery, 204 afterwards, and keeps what
    it received."""

    def __init__(self):
        self.received: list[dict] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["content-length"])).decode()
                receiver.received.append({"headers": {k.lower(): v for k, v in self.headers.items()}, "body": body})
                self.send_response(500 if len(receiver.received) == 1 else 204)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


def _verify(headers: dict, body: str) -> bool:
    """The documented scheme, written here from the spec rather than imported."""
    key = base64.b64decode(SECRET.removeprefix("whsec_"))
    signed = f"{headers['webhook-id']}.{headers['webhook-timestamp']}.{body}".encode()
    expected = "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
    return abs(time.time() - int(headers["webhook-timestamp"])) < 300 and expected in headers["webhook-signature"].split()


def test_signed_deliveries_are_retried_and_recorded(pg_stack, tmp_path):
    receiver = Receiver()
    client = pg_stack.client
    model = upload_model(client, make_checkpoint(tmp_path / "m"))
    job = client.post("/v1/jobs", json={
        "model_id": model["id"], "stages": [{"type": "prune", "method": "magnitude", "sparsity": 0.5}],
        "webhook": {"url": receiver.url, "secret": SECRET, "events": ["job.running", "job.succeeded"]}}).json()
    assert "secret" not in json.dumps(job)
    assert wait_for(client, job["id"])["status"] == "succeeded"

    deadline = time.monotonic() + 120  # returns as soon as the deliveries settle
    while time.monotonic() < deadline:
        deliveries = client.get(f"/v1/jobs/{job['id']}/webhook-deliveries").json()["data"]
        if deliveries and all(d["status"] == "delivered" for d in deliveries) and len(deliveries) == 2:
            break
        time.sleep(0.3)
    assert [d["event_type"] for d in deliveries] == ["job.running", "job.succeeded"]
    assert all(d["status"] == "delivered" for d in deliveries)

    assert all(_verify(r["headers"], r["body"]) for r in receiver.received)
    tampered = receiver.received[-1]
    assert not _verify(tampered["headers"], tampered["body"].replace("job.", "job!"))  # any edit breaks it
    # The first attempt got a 500 and was retried under the same webhook-id.
    first = next(d for d in deliveries if d["attempts"] == 2)
    assert [a["status_code"] for a in first["attempt_log"]] == [500, 204]
    ids = [r["headers"]["webhook-id"] for r in receiver.received]
    assert ids.count(first["id"]) == 2
    bodies = [json.loads(r["body"]) for r in receiver.received]
    assert {b["type"] for b in bodies} == {"job.running", "job.succeeded"}
    assert all(b["data"]["job_id"] == job["id"] for b in bodies)


def test_a_receiver_that_never_answers_ends_failed(pg_stack, tmp_path):
    client = pg_stack.client
    model = upload_model(client, make_checkpoint(tmp_path / "m"))
    job = client.post("/v1/jobs", json={
        "model_id": model["id"], "stages": [{"type": "prune", "method": "random", "sparsity": 0.5}],
        "webhook": {"url": "http://127.0.0.1:9/unreachable", "secret": SECRET}}).json()
    assert wait_for(client, job["id"])["status"] == "succeeded"
    deadline = time.monotonic() + 120  # returns as soon as the deliveries settle
    while time.monotonic() < deadline:
        deliveries = client.get(f"/v1/jobs/{job['id']}/webhook-deliveries").json()["data"]
        if deliveries and deliveries[0]["status"] == "failed":
            break
        time.sleep(0.3)
    assert deliveries[0]["status"] == "failed" and deliveries[0]["attempts"] == 4
    assert all(a["status_code"] is None and a["error"] for a in deliveries[0]["attempt_log"])

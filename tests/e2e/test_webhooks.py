"""Webhooks: signed the Standard Webhooks way, retried, every attempt recorded; addresses the
server must not reach refused at submission; secrets encrypted at rest.

The receivers here are on 127.0.0.1, which only a stack whose operator allows it
(``SQUEEZE_WEBHOOK_ALLOWED_NETWORKS=127.0.0.0/8``) delivers to; the shared stack, which does not,
refuses such URLs. The refusal at send time (a name that resolves to loopback) is proved with a
resolver the test controls in tests/app/services/test_webhooks.py."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import psycopg
import pytest

from tests.e2e.client import upload_model, wait_for
from tests.e2e.stack import ServiceStack
from tests.factories import make_checkpoint

SECRET = "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()
ANY_MODEL = "mdl_0123456789abcdef0123456789abcdef"  # the body is refused before the model is looked up


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


@pytest.fixture(scope="module")
def hook_stack(tmp_path_factory):
    """PostgreSQL + Redis with loopback receivers allowed, as an operator would allow an
    internal network."""
    with ServiceStack.postgres_redis(tmp_path_factory.mktemp("webhooks"),
                                     webhook_allowed_networks="127.0.0.0/8") as stack:
        yield stack


def _job(client, model_id: str, webhook: dict):
    return client.post("/v1/jobs", json={
        "model_id": model_id, "stages": [{"type": "prune", "method": "random", "sparsity": 0.5}],
        "webhook": webhook})


def test_signed_deliveries_are_retried_and_recorded(hook_stack, tmp_path):
    receiver = Receiver()
    client = hook_stack.client
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


def test_a_receiver_that_never_answers_ends_failed(hook_stack, tmp_path):
    client = hook_stack.client
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
    # The reason in generic words: not the socket's error text.
    assert all(a["status_code"] is None and a["error"] == "connection failed" for a in deliveries[0]["attempt_log"])


@pytest.mark.parametrize("url", [
    "http://127.0.0.1:8000/hooks", "http://localhost:8000/", "http://hooks.localhost/", "http://[::1]/",
    "http://169.254.169.254/latest/meta-data/", "http://[::ffff:127.0.0.1]/", "http://2130706433/",
    "http://10.0.0.1/", "http://[fd00::1]/", "http://0.0.0.0:8000/", "http://user:pass@example.com/"])
def test_addresses_the_server_must_not_reach_are_refused_at_submission(pg_stack, url):
    response = _job(pg_stack.client, ANY_MODEL, {"url": url, "secret": SECRET})
    assert response.status_code == 422, response.text
    assert response.json()["error"]["param"] == "webhook.url"


@pytest.mark.parametrize("secret, why", [
    ("whsec_" + base64.b64encode(b"x" * 15).decode(), "15 bytes"),
    ("whsec_" + base64.b64encode(b"x" * 65).decode(), "65 bytes"),
    ("whsec_" + "A" * 23, "not whole base64"),
    ("whsec_" + "A" * 5000, "longer than the column"),
    (base64.b64encode(b"x" * 32).decode(), "no prefix"),
])
def test_a_secret_that_does_not_decode_to_16_to_64_bytes_is_refused(pg_stack, secret, why):
    response = _job(pg_stack.client, ANY_MODEL, {"url": "https://hooks.example.com/", "secret": secret})
    assert response.status_code == 422, (why, response.text)
    assert response.json()["error"]["param"] == "webhook.secret"


def test_a_url_longer_than_its_column_is_a_422_not_a_500(pg_stack):
    # 1990 characters typed, over 2000 once "é" is written %C3%A9 as it is stored.
    url = "https://hooks.example.com/" + "é" * 10 + "a" * 1954
    response = _job(pg_stack.client, ANY_MODEL, {"url": url, "secret": SECRET})
    assert response.status_code == 422 and response.json()["error"]["param"] == "webhook.url"


def test_the_secret_is_stored_encrypted(hook_stack, tmp_path):
    model = upload_model(hook_stack.client, make_checkpoint(tmp_path / "m"))
    job = _job(hook_stack.client, model["id"], {"url": "http://127.0.0.1:9/", "secret": SECRET}).json()
    database = hook_stack.env["SQUEEZE_DATABASE_URL"].replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(database) as conn:
        [(stored,)] = conn.execute("SELECT webhook_secret FROM jobs WHERE id = %s", (job["id"],)).fetchall()
    key_text = SECRET.removeprefix("whsec_")
    assert stored.startswith("v1:") and key_text not in stored and SECRET not in stored
    assert base64.b64decode(key_text).hex() not in stored


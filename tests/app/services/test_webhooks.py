"""The webhook dispatcher on real databases (SQLite and PostgreSQL), sending to receivers on
127.0.0.1 only. DNS is a resolver the test controls: ``receiver.test`` means 127.0.0.1, and
anything else it answers is refused before a socket is opened.

What is proved here: a name that resolves to loopback is refused without the operator's
allow-list (and nothing reaches the receiver), the connection goes to the checked address with
the name only in ``Host``, the attempt log holds generic reasons only, one deadline bounds an
attempt whatever the receiver does, the body of an answer is never read, a delivery that raises
is a failed attempt that does not stop the others, claims are exclusive across dispatchers,
and one tenant's slow receiver takes at most its share of the pool."""

from __future__ import annotations

import base64
import json
import secrets
import socket
import threading
import time
from collections import Counter

import pytest
from sqlalchemy import delete, select

from app.config import get_settings
from app.db.models import Job, WebhookAttempt, WebhookDelivery, new_id
from app.webhooks import REFUSED, Dispatcher, claim_due, deliver, seal_secret, verify

SECRET = "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


class Receiver:
    """A TCP server on 127.0.0.1 that runs ``answer(conn, request_head)`` for each connection.
    ``hold`` keeps connections of answers that wait open until the test lets go."""

    def __init__(self, answer):
        self.answer = answer
        self.requests: list[dict] = []
        self.connections = 0
        self.hold = threading.Event()
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn):
        with conn:
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                data += chunk
            head, _, body = data.partition(b"\r\n\r\n")
            lines = head.decode().split("\r\n")
            headers = {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
            while len(body) < int(headers.get("content-length", 0)):
                body += conn.recv(65536)
            self.requests.append({"line": lines[0], "headers": headers, "body": body.decode()})
            self.answer(conn, self)

    def close(self):
        self.hold.set()
        self.sock.close()


def status(code: int):
    def answer(conn, receiver):
        conn.sendall(f"HTTP/1.1 {code} X\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".encode())
    return answer


def never_answers(conn, receiver):
    receiver.hold.wait(60)


def trickles(conn, receiver):
    """An answer's head one byte at a time, each byte well within any per-read timeout."""
    for byte in b"HTTP/1.1 200 OK\r\nX-Slow: " + b"a" * 10_000:
        if receiver.hold.wait(0.05):
            return
        try:
            conn.sendall(bytes([byte]))
        except OSError:
            return


def endless_body(conn, receiver):
    """A 200 whose announced gigabyte of body never comes: reading it would wait forever."""
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000000\r\n\r\n" + b"x" * 1000)
    receiver.hold.wait(60)


@pytest.fixture
def hooks(db, tmp_path, monkeypatch):
    """The database, settings for short attempts, receivers (closed at the end) and a way to
    queue a delivery to one of them."""
    receivers: list[Receiver] = []
    queued: list[str] = []

    class Hooks:
        lookups: list[str] = []
        answers = {"receiver.test": ["127.0.0.1"]}

        @staticmethod
        def resolver(host, port):
            Hooks.lookups.append(host)
            if host not in Hooks.answers:
                raise socket.gaierror(socket.EAI_NONAME, "unknown")
            return Hooks.answers[host]

        @staticmethod
        def settings(**values: str):
            for name, value in values.items():
                monkeypatch.setenv(f"SQUEEZE_{name.upper()}", value)
            get_settings.cache_clear()

        @staticmethod
        def receiver(answer) -> Receiver:
            receivers.append(Receiver(answer))
            return receivers[-1]

        @staticmethod
        def queue(receiver_or_url, tenant: str | None = None, secret: str = SECRET) -> str:
            """A delivery row as ``queue_for_event`` leaves it, for a job of ``tenant``."""
            url = receiver_or_url if isinstance(receiver_or_url, str) else \
                f"http://receiver.test:{receiver_or_url.port}/hooks?x=1"
            tenant = tenant or db.tenant()
            job = db.job(tenant, db.model(tenant), stages=[])
            job.webhook_url, job.webhook_secret = url, seal_secret(secret)
            delivery = WebhookDelivery(id=new_id("msg"), job_id=job.id, tenant_id=tenant, event_id=1,
                                       event_type="job.succeeded", url=url,
                                       payload=json.dumps({"type": "job.succeeded", "data": {"job_id": job.id}}))
            db.session.add(delivery)
            db.session.commit()
            queued.append(delivery.id)
            return delivery.id

        @staticmethod
        def attempts(delivery_id: str) -> list[tuple[int | None, str | None]]:
            with db.new_session() as session:
                return [(a.status_code, a.error) for a in session.scalars(
                    select(WebhookAttempt).where(WebhookAttempt.delivery_id == delivery_id).order_by(WebhookAttempt.id))]

        @staticmethod
        def send(delivery_id: str):
            """Claims what is due and makes those attempts here, in the test's thread; the outcome
            of this delivery's."""
            outcomes = {c.delivery_id: deliver(c, Hooks.resolver) for c in claim_due(100, per_tenant=100)}
            return outcomes[delivery_id]

    Hooks.settings(var_dir=str(tmp_path / "var"), webhook_timeout_s="1", webhook_lease_s="30",
                   webhook_backoff_s="[0, 0, 0]", webhook_allowed_networks="")
    yield Hooks
    for receiver in receivers:
        receiver.close()
    # PostgreSQL's database is the session's: leave no due delivery for the next test to claim.
    db.session.rollback()
    db.session.execute(delete(WebhookDelivery).where(WebhookDelivery.id.in_(queued)))
    db.session.commit()


def test_a_name_that_resolves_to_loopback_is_refused_without_the_setting(hooks):
    receiver = hooks.receiver(status(204))
    delivery = hooks.queue(receiver)
    outcome = hooks.send(delivery)
    assert outcome.error == REFUSED and hooks.attempts(delivery) == [(None, REFUSED)]
    assert receiver.connections == 0 and hooks.lookups == ["receiver.test"]


def test_with_the_setting_the_checked_address_is_reached_with_the_name_in_host(hooks):
    hooks.settings(webhook_allowed_networks="127.0.0.0/8")
    receiver = hooks.receiver(status(204))
    delivery = hooks.queue(receiver)
    assert hooks.send(delivery).delivered and hooks.attempts(delivery) == [(204, None)]
    # receiver.test exists only in the test's resolver: the socket went to the address it gave.
    [request] = receiver.requests
    assert request["line"] == "POST /hooks?x=1 HTTP/1.1"
    assert request["headers"]["host"] == f"receiver.test:{receiver.port}"
    assert verify(SECRET, request["headers"], request["body"])  # signed with the secret, decrypted


def test_the_host_is_resolved_and_checked_again_at_every_attempt(hooks):
    hooks.settings(webhook_allowed_networks="127.0.0.0/8")
    receiver = hooks.receiver(status(500))
    delivery = hooks.queue(receiver)
    hooks.send(delivery)
    hooks.answers["receiver.test"] = ["10.0.0.7"]  # rebound to a private address since
    hooks.send(delivery)
    assert hooks.attempts(delivery) == [(500, "http 500"), (None, REFUSED)]
    assert receiver.connections == 1 and hooks.lookups == ["receiver.test", "receiver.test"]


def test_the_log_says_why_in_generic_words_only(hooks):
    hooks.settings(webhook_allowed_networks="127.0.0.0/8")
    closed = socket.create_server(("127.0.0.1", 0))
    closed_port = closed.getsockname()[1]
    closed.close()  # nothing listens there now: connection refused
    failures = {
        hooks.queue(f"http://receiver.test:{closed_port}/"): (None, "connection failed"),
        hooks.queue("http://nowhere.test/"): (None, "connection failed"),  # does not resolve
        hooks.queue(hooks.receiver(status(404))): (404, "http 404"),
        hooks.queue(f"http://127.0.0.2:{closed_port}/"): (None, "connection failed"),
    }
    hooks.send(next(iter(failures)))
    assert {delivery: hooks.attempts(delivery) for delivery in failures} == \
        {delivery: [expected] for delivery, expected in failures.items()}


def test_no_redirect_is_followed_and_no_proxy_from_the_environment_is_used(hooks, monkeypatch):
    hooks.settings(webhook_allowed_networks="127.0.0.0/8")
    target, proxy = hooks.receiver(status(204)), hooks.receiver(status(204))
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.setenv(name, f"http://127.0.0.1:{proxy.port}")

    def redirect(conn, receiver):
        conn.sendall(f"HTTP/1.1 307 X\r\nLocation: http://127.0.0.1:{target.port}/\r\n"
                     "Content-Length: 0\r\n\r\n".encode())

    redirected = hooks.queue(hooks.receiver(redirect))
    direct = hooks.queue(target)
    hooks.send(redirected)
    assert hooks.attempts(redirected) == [(307, "http 307")] and hooks.attempts(direct) == [(204, None)]
    assert len(target.requests) == 1 and proxy.connections == 0


@pytest.mark.parametrize("answer", [never_answers, trickles], ids=["silent", "trickling"])
def test_one_deadline_ends_an_attempt_whatever_the_receiver_does(hooks, answer):
    hooks.settings(webhook_allowed_networks="127.0.0.0/8")
    receiver = hooks.receiver(answer)
    delivery = hooks.queue(receiver)
    # A trickle of 10 000 bytes at 20 a second would take minutes; per-read timeouts never fire.
    assert hooks.send(delivery).error == "timeout"
    assert hooks.attempts(delivery) == [(None, "timeout")] and receiver.connections == 1


def test_the_deadline_holds_while_the_name_server_is_slow(hooks):
    hooks.settings(webhook_allowed_networks="127.0.0.0/8")
    receiver = hooks.receiver(status(204))
    delivery = hooks.queue(receiver)
    answered = threading.Event()

    def slow_lookup(host, port):
        answered.wait(60)  # an unanswered DNS query, until the test ends
        return ["127.0.0.1"]

    claims = claim_due(10, per_tenant=10)
    try:
        assert [deliver(claim, slow_lookup).error for claim in claims] == ["timeout"]
    finally:
        answered.set()
    assert hooks.attempts(delivery) == [(None, "timeout")] and receiver.connections == 0


def test_the_body_of_an_answer_is_never_read(hooks):
    hooks.settings(webhook_allowed_networks="127.0.0.0/8")
    delivery = hooks.queue(hooks.receiver(endless_body))
    assert hooks.send(delivery).delivered and hooks.attempts(delivery) == [(200, None)]


def test_a_delivery_that_raises_is_a_failed_attempt_and_the_others_go_on(hooks, db):
    hooks.settings(webhook_allowed_networks="127.0.0.0/8")
    receiver = hooks.receiver(status(204))
    broken = hooks.queue(receiver)
    job = db.session.get(Job, db.session.get(WebhookDelivery, broken).job_id)
    job.webhook_secret = "v1:00000000:AAAA"  # a secret that no longer decrypts (say, a lost key)
    db.session.commit()
    fine = [hooks.queue(receiver) for _ in range(3)]
    dispatcher = Dispatcher(resolver=hooks.resolver)
    try:
        assert len(dispatcher.dispatch_due()) == 4
    finally:
        dispatcher.pool.shutdown(wait=True)
    assert hooks.attempts(broken) == [(None, "internal error")]
    assert all(hooks.attempts(d) == [(204, None)] for d in fine) and len(receiver.requests) == 3


def test_concurrent_dispatchers_never_claim_the_same_attempt(hooks, db):
    tenant = db.tenant()
    queued = {hooks.queue("http://receiver.test:9/", tenant) for _ in range(20)}
    start = threading.Barrier(3)
    won: list[list] = [[], [], []]

    def claim(slot):
        start.wait()
        won[slot] = claim_due(20, per_tenant=20)

    threads = [threading.Thread(target=claim, args=(i,)) for i in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    ids = [c.delivery_id for claims in won for c in claims]
    assert sorted(ids) == sorted(queued)  # each attempt claimed once, none lost
    assert claim_due(20, per_tenant=20) == []  # all under lease now


def test_an_attempt_is_counted_once_even_if_two_dispatchers_made_it(hooks):
    hooks.settings(webhook_allowed_networks="127.0.0.0/8")
    receiver = hooks.receiver(status(500))
    delivery = hooks.queue(receiver)
    [claim] = claim_due(10, per_tenant=10)
    deliver(claim, hooks.resolver)
    deliver(claim, hooks.resolver)  # a second dispatcher holding the same (stale) claim
    assert hooks.attempts(delivery) == [(500, "http 500")]


def test_a_tenant_gets_at_most_its_share_of_the_pool(hooks, db):
    slow, quick = db.tenant(), db.tenant()
    for _ in range(6):  # older than the quick tenant's, and more than the slots
        hooks.queue("http://receiver.test:9/", slow)
    quick_delivery = hooks.queue("http://receiver.test:9/", quick)
    claims = claim_due(4, per_tenant=1)
    assert Counter(c.tenant_id for c in claims) == {slow: 1, quick: 1}
    assert quick_delivery in [c.delivery_id for c in claims]
    assert claim_due(4, Counter({slow: 1}), per_tenant=1) == []  # the slow tenant's first still in flight


def test_a_slow_receiver_holds_only_its_tenants_share_while_others_are_delivered(hooks, db):
    hooks.settings(webhook_allowed_networks="127.0.0.0/8", webhook_timeout_s="25", webhook_lease_s="60",
                   webhook_workers="2", webhook_per_tenant="1")
    slow_receiver, quick_receiver = hooks.receiver(never_answers), hooks.receiver(status(204))
    slow, quick = db.tenant(), db.tenant()
    stuck = [hooks.queue(slow_receiver, slow) for _ in range(3)]
    delivered = hooks.queue(quick_receiver, quick)
    dispatcher = Dispatcher(resolver=hooks.resolver)
    try:
        first = dispatcher.dispatch_due()
        assert Counter(c.tenant_id for c in first) == {slow: 1, quick: 1}
        deadline = time.monotonic() + 60  # returns as soon as the quick one is done
        while time.monotonic() < deadline and (not hooks.attempts(delivered) or quick in dispatcher.in_flight):
            time.sleep(0.05)
        assert hooks.attempts(delivered) == [(204, None)]
        # The slow tenant's attempt is held by its receiver (until the test lets go): its other
        # deliveries wait, and the free slot stays free for any other tenant.
        assert dispatcher.dispatch_due() == [] and dispatcher.in_flight == {slow: 1}
        assert sum(1 for d in stuck if not hooks.attempts(d)) == 3
    finally:
        slow_receiver.close()
        dispatcher.pool.shutdown(wait=True)

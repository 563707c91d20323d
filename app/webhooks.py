"""Webhook deliveries: queued with the event they announce, sent by a dispatcher thread.

Signing follows Standard Webhooks (https://www.standardwebhooks.com)::

    signed = f"{webhook_id}.{webhook_timestamp}.{body}"
    signature = "v1," + base64(HMAC-SHA256(base64decode(secret.removeprefix("whsec_")), signed))

A receiver checks it with ``verify(secret, headers, body)`` (or any Standard Webhooks library),
and rejects timestamps more than five minutes old. Deliveries are at least once: the
``webhook-id`` stays the same across retries so the receiver can drop duplicates.

The URL is a tenant's, the connection is made from inside the operator's network, so:

- only public addresses are reached (``app/netguard.py``; ``SQUEEZE_WEBHOOK_ALLOWED_NETWORKS``
  adds private ones): the host is resolved at every attempt, every address checked, and the
  socket connected to a checked address (the name goes only into ``Host`` and TLS SNI);
  no redirect is followed and no proxy from the environment is used;
- the attempt log says only ``http <code>``, ``timeout``, ``connection failed``,
  ``refused: address not allowed`` or ``internal error``, never an error's text, which would
  tell a tenant what answers where on the server's network;
- an attempt has one deadline for all of it (``SQUEEZE_WEBHOOK_TIMEOUT_S``), the answer's body is
  never read, and attempts run on a small pool with a per-tenant cap, so a slow receiver holds
  at most its tenant's share;
- the signing key is stored encrypted (``app/crypto.py``).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import socket
import ssl
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from datetime import timedelta
from functools import lru_cache
from urllib.parse import unquote, urlsplit

import certifi
import httpcore
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from app import crypto
from app.background import PeriodicThread
from app.config import get_settings
from app.db.models import Job, JobEvent, WebhookAttempt, WebhookDelivery, new_id, utcnow
from app.db.session import session_scope
from app.netguard import AddressNotAllowed, AddressPolicy, IPAddress, Resolver

log = logging.getLogger("squeeze.webhooks")

SECRET_CONTEXT = "webhook_secret"  # binds the stored token to this column (crypto's associated data)
REFUSED = "refused: address not allowed"


# -- submission ------------------------------------------------------------------------------


def address_policy() -> AddressPolicy:
    return _policy(get_settings().webhook_allowed_networks)


@lru_cache(maxsize=4)
def _policy(allowed_networks: str) -> AddressPolicy:
    return AddressPolicy.from_setting(allowed_networks)


def check_submitted_url(url) -> None:
    """The part of the address rule that needs no lookup, for the spec's validator: raises
    ValueError (a 422 naming ``webhook.url``)."""
    parts = urlsplit(str(url))
    if parts.username is not None or parts.password is not None:
        raise ValueError("URL must not carry credentials: the receiver authenticates deliveries by their signature")
    try:
        address_policy().check_submitted_host(parts.hostname or "")
    except AddressNotAllowed:
        raise ValueError("URL host is not allowed: deliveries go to public addresses only "
                         "(loopback, private, link-local and other special addresses are refused)") from None


def seal_secret(secret: str) -> str:
    """What is stored for a ``whsec_`` secret: its key bytes, encrypted."""
    return crypto.encrypt(base64.b64decode(secret.removeprefix("whsec_")), context=SECRET_CONTEXT)


# -- signing ---------------------------------------------------------------------------------


def sign(secret: str, webhook_id: str, timestamp: int, body: str) -> str:
    return sign_with_key(base64.b64decode(secret.removeprefix("whsec_")), webhook_id, timestamp, body)


def sign_with_key(key: bytes, webhook_id: str, timestamp: int, body: str) -> str:
    digest = hmac.new(key, f"{webhook_id}.{timestamp}.{body}".encode(), hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def verify(secret: str, headers: dict[str, str], body: str, tolerance_s: int = 300) -> bool:
    """The receiver's check: one of the signatures matches and the timestamp is recent."""
    timestamp = int(headers["webhook-timestamp"])
    if abs(time.time() - timestamp) > tolerance_s:
        return False
    expected = sign(secret, headers["webhook-id"], timestamp, body)
    return any(hmac.compare_digest(expected, given) for given in headers["webhook-signature"].split())


# -- queueing --------------------------------------------------------------------------------


def event_type_for(event: JobEvent) -> str:
    if event.type == "status":
        return f"job.{event.data.get('status')}"
    return f"job.{event.type}"


def queue_for_event(session: Session, job: Job, event: JobEvent) -> None:
    """Called as the event is recorded, in the same transaction: no event is announced that was
    not committed, and none committed is forgotten."""
    if not job.webhook_url:
        return
    event_type = event_type_for(event)
    if event_type not in (job.webhook_events or []):
        return
    session.flush()  # the event's id goes into the payload
    body = {
        "type": event_type,
        "timestamp": event.created_at.isoformat(),
        "data": {"job_id": job.id, "status": job.status, "event": {
            "id": event.id, "type": event.type, "message": event.message, "data": event.data}},
    }
    session.add(WebhookDelivery(
        id=new_id("msg"), job_id=job.id, tenant_id=job.tenant_id, event_id=event.id,
        event_type=event_type, url=job.webhook_url, payload=json.dumps(body, separators=(",", ":")),
    ))


# -- claiming --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Claim:
    """The right to make attempt number ``attempts + 1`` of a delivery. ``deadline`` (monotonic
    clock) ends the attempt, queueing and lookup included, well before the lease does."""

    delivery_id: str
    tenant_id: str
    attempts: int
    deadline: float


def claim_due(slots: int, in_flight: Counter[str] | None = None, per_tenant: int | None = None) -> list[Claim]:
    """Claims up to ``slots`` due deliveries, leaving each tenant at most ``per_tenant`` in flight
    (``in_flight``: this process's attempts under way, by tenant).

    A claim is one conditional UPDATE (still pending, due, and at the attempt count read), so
    of several dispatchers (API replicas) exactly one wins each attempt; it pushes
    ``next_attempt_at`` past the lease, so an attempt whose dispatcher died is made again after it.
    """
    settings = get_settings()
    per_tenant = per_tenant or settings.webhook_per_tenant
    taken = Counter(in_flight or {})
    full = [tenant for tenant, count in taken.items() if count >= per_tenant]
    now = utcnow()
    # Each tenant's oldest few only, so that one tenant's backlog cannot fill the window.
    rank = func.row_number().over(partition_by=WebhookDelivery.tenant_id, order_by=WebhookDelivery.next_attempt_at)
    candidates = (
        select(WebhookDelivery.id, WebhookDelivery.tenant_id, WebhookDelivery.attempts,
               WebhookDelivery.next_attempt_at, rank.label("rank"))
        .where(WebhookDelivery.status == "pending", WebhookDelivery.next_attempt_at <= now,
               WebhookDelivery.tenant_id.not_in(full))
        .subquery()
    )
    with session_scope() as session:
        due = session.execute(
            select(candidates.c.id, candidates.c.tenant_id, candidates.c.attempts)
            .where(candidates.c.rank <= per_tenant)
            .order_by(candidates.c.next_attempt_at).limit(slots * per_tenant)
        ).all()
    claims: list[Claim] = []
    for delivery_id, tenant_id, attempts in due:
        if len(claims) == slots:
            break
        if taken[tenant_id] >= per_tenant:
            continue
        with session_scope() as session:  # one short transaction per row: no lock held across rows
            won = session.execute(
                update(WebhookDelivery)
                .where(WebhookDelivery.id == delivery_id, WebhookDelivery.status == "pending",
                       WebhookDelivery.attempts == attempts, WebhookDelivery.next_attempt_at <= now)
                .values(next_attempt_at=now + timedelta(seconds=settings.webhook_lease_s))
            ).rowcount
        if won:
            claims.append(Claim(delivery_id, tenant_id, attempts, time.monotonic() + settings.webhook_timeout_s))
            taken[tenant_id] += 1
    return claims


# -- one attempt -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    status_code: int | None
    error: str | None  # one of the generic reasons, None when delivered

    @property
    def delivered(self) -> bool:
        return self.error is None


def deliver(claim: Claim, resolver: Resolver | None = None) -> Outcome:
    """Makes the claimed attempt and records it. Whatever goes wrong in the attempt is recorded
    as a failed attempt (``internal error``), retried like any other failure."""
    started = time.perf_counter()
    try:
        outcome = _attempt(claim, resolver)
    except Exception:
        log.exception("webhook delivery %s failed inside the server", claim.delivery_id)
        outcome = Outcome(None, "internal error")
    _record(claim, outcome, duration_ms=round(1000 * (time.perf_counter() - started), 2))
    return outcome


def _attempt(claim: Claim, resolver: Resolver | None) -> Outcome:
    delivery_id, deadline = claim.delivery_id, claim.deadline
    with session_scope() as session:
        delivery = session.get(WebhookDelivery, delivery_id)
        job = session.get(Job, delivery.job_id)
        url, body, sealed_secret = delivery.url, delivery.payload, job.webhook_secret
    key = crypto.decrypt(sealed_secret, context=SECRET_CONTEXT)
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    # The lookup runs on its own small pool so that the deadline holds even while a name
    # server is slow (getaddrinfo cannot be interrupted; its own timeout ends the thread).
    lookup = _lookups.submit(address_policy().resolve, parts.hostname or "", port, resolver)
    try:
        addresses = lookup.result(timeout=max(0.0, deadline - time.monotonic()))
    except FutureTimeout:
        return Outcome(None, "timeout")
    except AddressNotAllowed:
        return Outcome(None, REFUSED)
    except OSError:  # the name does not resolve
        return Outcome(None, "connection failed")

    timestamp = int(time.time())
    headers = [("Host", parts.netloc.rsplit("@", 1)[-1]), ("Content-Type", "application/json"),
               ("Content-Length", str(len(body.encode()))), ("Connection", "close"),
               ("User-Agent", "Squeeze-Webhooks"), ("webhook-id", delivery_id),
               ("webhook-timestamp", str(timestamp)),
               ("webhook-signature", sign_with_key(key, delivery_id, timestamp, body))]
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    origin = httpcore.Origin(parts.scheme.encode(), parts.hostname.encode(), port)
    try:
        with httpcore.HTTPConnection(origin, ssl_context=_ssl_context(),
                                     network_backend=PinnedBackend(addresses, deadline)) as connection:
            with connection.stream("POST", httpcore.URL(scheme=origin.scheme, host=origin.host, port=port,
                                                        target=target.encode()),
                                   headers=headers, content=body.encode(),
                                   extensions={"timeout": dict.fromkeys(("connect", "read", "write", "pool"),
                                                                        deadline - time.monotonic())}) as response:
                status = response.status  # the head only: the body is never read
    except httpcore.TimeoutException:
        return Outcome(None, "timeout")
    except (httpcore.NetworkError, httpcore.ProtocolError, OSError):
        return Outcome(None, "connection failed")
    return Outcome(status, None if 200 <= status < 300 else f"http {status}")


def _record(claim: Claim, outcome: Outcome, duration_ms: float) -> None:
    """Counts the attempt, if it is still ours to count (no other dispatcher recorded attempt
    ``claim.attempts + 1`` first), and schedules the next one."""
    settings = get_settings()
    number = claim.attempts + 1
    backoff = settings.webhook_backoff_s
    if outcome.delivered:
        values = {"status": "delivered", "delivered_at": utcnow()}
    elif number > len(backoff):
        values = {"status": "failed"}
    else:
        values = {"next_attempt_at": utcnow() + timedelta(seconds=backoff[number - 1])}
    with session_scope() as session:
        counted = session.execute(
            update(WebhookDelivery)
            .where(WebhookDelivery.id == claim.delivery_id, WebhookDelivery.attempts == claim.attempts,
                   WebhookDelivery.status == "pending")
            .values(attempts=number, **values)
        ).rowcount
        if counted:
            session.add(WebhookAttempt(delivery_id=claim.delivery_id, status_code=outcome.status_code,
                                       error=outcome.error, duration_ms=duration_ms))
    log.info("webhook delivery %s attempt %d: %s", claim.delivery_id, number,
             "delivered" if outcome.delivered else outcome.error)


_lookups = ThreadPoolExecutor(max_workers=4, thread_name_prefix="webhook-lookup")


@lru_cache(maxsize=1)
def _ssl_context() -> ssl.SSLContext:
    return ssl.create_default_context(cafile=certifi.where())


# -- the connection: to a checked address, within one deadline ---------------------------------


class PinnedBackend(httpcore.NetworkBackend):
    """Connects to the addresses already checked, whatever host httpcore asks for (that name
    only goes into Host and SNI), and bounds every socket operation by the attempt's deadline."""

    def __init__(self, addresses: list[IPAddress], deadline: float):
        self.addresses = addresses
        self.deadline = deadline

    def connect_tcp(self, host, port, timeout=None, local_address=None, socket_options=None):
        for address in self.addresses:
            left = _left(self.deadline, httpcore.ConnectTimeout)
            try:
                sock = socket.create_connection((str(address), port), timeout=left)
            except TimeoutError:
                raise httpcore.ConnectTimeout("timeout") from None
            except OSError:
                continue  # the next checked address, as a browser would
            return DeadlineStream(sock, self.deadline)
        raise httpcore.ConnectError("connection failed")

    def connect_unix_socket(self, path, timeout=None, socket_options=None):
        raise httpcore.ConnectError("not a network address")

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)


class DeadlineStream(httpcore.NetworkStream):
    """A socket whose every read, write and TLS handshake ends by the deadline: a receiver
    that trickles its answer a byte at a time cannot hold the attempt past it."""

    def __init__(self, sock: socket.socket, deadline: float):
        self.sock = sock
        self.deadline = deadline

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        self.sock.settimeout(_left(self.deadline, httpcore.ReadTimeout))
        try:
            return self.sock.recv(max_bytes)
        except TimeoutError:
            raise httpcore.ReadTimeout("timeout") from None
        except OSError:
            raise httpcore.ReadError("read failed") from None

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        if not buffer:
            return
        self.sock.settimeout(_left(self.deadline, httpcore.WriteTimeout))  # sendall: one deadline for all of it
        try:
            self.sock.sendall(buffer)
        except TimeoutError:
            raise httpcore.WriteTimeout("timeout") from None
        except OSError:
            raise httpcore.WriteError("write failed") from None

    def close(self) -> None:
        self.sock.close()

    def start_tls(self, ssl_context, server_hostname=None, timeout=None) -> "DeadlineStream":
        self.sock.settimeout(_left(self.deadline, httpcore.ConnectTimeout))  # the handshake's deadline
        try:
            return DeadlineStream(ssl_context.wrap_socket(self.sock, server_hostname=server_hostname), self.deadline)
        except TimeoutError:
            self.sock.close()
            raise httpcore.ConnectTimeout("timeout") from None
        except OSError:  # ssl.SSLError (certificate, protocol) is one
            self.sock.close()
            raise httpcore.ConnectError("tls failed") from None

    def get_extra_info(self, info: str):
        if info == "ssl_object":
            return getattr(self.sock, "_sslobj", None)
        if info == "socket":
            return self.sock
        if info == "is_readable":
            return False  # never reused: one connection per attempt
        return None


def _left(deadline: float, timeout_error: type[Exception]) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise timeout_error("timeout")
    return left


# -- the dispatcher --------------------------------------------------------------------------


class Dispatcher(PeriodicThread):
    """Claims what its pool can send now, and sends it there. Several API replicas may each
    run one: each attempt is claimed by one of them (``claim_due``). At most
    ``SQUEEZE_WEBHOOK_WORKERS`` attempts are in flight in this process, at most
    ``SQUEEZE_WEBHOOK_PER_TENANT`` of one tenant."""

    def __init__(self, interval_s: float = 0.5, resolver: Resolver | None = None):
        settings = get_settings()
        self.resolver = resolver
        self.workers = settings.webhook_workers
        self.pool = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="webhook")
        self.in_flight: Counter[str] = Counter()
        self._lock = threading.Lock()
        super().__init__("webhook-dispatcher", interval_s, self.dispatch_due)

    def dispatch_due(self) -> list[Claim]:
        with self._lock:
            in_flight = Counter(self.in_flight)
        slots = self.workers - sum(in_flight.values())
        if slots <= 0:
            return []
        claims = claim_due(slots, in_flight)
        for claim in claims:
            with self._lock:
                self.in_flight[claim.tenant_id] += 1
            self.pool.submit(self._send, claim)
        return claims

    def _send(self, claim: Claim) -> None:
        try:
            deliver(claim, self.resolver)
        except Exception:  # recording failed (database away): the lease runs out, the attempt is made again
            log.exception("webhook delivery %s could not be recorded", claim.delivery_id)
        finally:
            with self._lock:
                self.in_flight[claim.tenant_id] -= 1
                if not self.in_flight[claim.tenant_id]:
                    del self.in_flight[claim.tenant_id]

    def stop(self) -> None:
        super().stop()
        self.pool.shutdown(wait=True, cancel_futures=True)  # each attempt ends by its deadline


# -- the delivery log ------------------------------------------------------------------------


def deliveries_for(session: Session, job_id: str) -> list[dict]:
    rows = session.scalars(
        select(WebhookDelivery).where(WebhookDelivery.job_id == job_id).order_by(WebhookDelivery.created_at)
    ).all()
    attempts = session.scalars(
        select(WebhookAttempt).where(WebhookAttempt.delivery_id.in_([r.id for r in rows])).order_by(WebhookAttempt.id)
    ).all() if rows else []
    out = []
    for row in rows:
        out.append({
            "id": row.id, "object": "webhook.delivery", "event_id": row.event_id, "event_type": row.event_type,
            "url": row.url, "status": row.status, "attempts": row.attempts,
            "next_attempt_at": row.next_attempt_at if row.status == "pending" else None,
            "created_at": row.created_at, "delivered_at": row.delivered_at,
            "attempt_log": [{"attempted_at": a.attempted_at, "status_code": a.status_code, "error": a.error,
                             "duration_ms": a.duration_ms} for a in attempts if a.delivery_id == row.id],
        })
    return out

"""Webhook deliveries: queued with the event they announce, sent by a dispatcher thread.

Signing follows Standard Webhooks (https://www.standardwebhooks.com)::

    signed = f"{webhook_id}.{webhook_timestamp}.{body}"
    signature = "v1," + base64(HMAC-SHA256(base64decode(secret.removeprefix("whsec_")), signed))

A receiver checks it with ``verify(secret, headers, body)`` (or any Standard Webhooks library),
and rejects timestamps more than five minutes old. Deliveries are at least once: the
``webhook-id`` stays the same across retries so the receiver can drop duplicates.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from datetime import timedelta

import httpx
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from app.background import PeriodicThread
from app.config import get_settings
from app.db.models import Job, JobEvent, WebhookAttempt, WebhookDelivery, new_id, utcnow
from app.db.session import session_scope


LEASE = timedelta(seconds=60)  # a claimed delivery is retried by another dispatcher after this


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


def sign(secret: str, webhook_id: str, timestamp: int, body: str) -> str:
    key = base64.b64decode(secret.removeprefix("whsec_"))
    digest = hmac.new(key, f"{webhook_id}.{timestamp}.{body}".encode(), hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def verify(secret: str, headers: dict[str, str], body: str, tolerance_s: int = 300) -> bool:
    """The receiver's check: one of the signatures matches and the timestamp is recent."""
    timestamp = int(headers["webhook-timestamp"])
    if abs(time.time() - timestamp) > tolerance_s:
        return False
    expected = sign(secret, headers["webhook-id"], timestamp, body)
    return any(hmac.compare_digest(expected, given) for given in headers["webhook-signature"].split())


def _claim_due(limit: int = 20) -> list[str]:
    now = utcnow()
    with session_scope() as session:
        due = session.scalars(
            select(WebhookDelivery.id)
            .where(WebhookDelivery.status == "pending", WebhookDelivery.next_attempt_at <= now)
            .order_by(WebhookDelivery.next_attempt_at).limit(limit)
        ).all()
        claimed = []
        for delivery_id in due:
            # Push next_attempt_at out: whoever moves it first owns this attempt.
            result = session.execute(
                update(WebhookDelivery)
                .where(WebhookDelivery.id == delivery_id, WebhookDelivery.status == "pending",
                       WebhookDelivery.next_attempt_at <= now)
                .values(next_attempt_at=now + LEASE)
            )
            if result.rowcount:
                claimed.append(delivery_id)
        return claimed


def deliver(delivery_id: str, client: httpx.Client) -> None:
    settings = get_settings()
    with session_scope() as session:
        delivery = session.get(WebhookDelivery, delivery_id)
        job = session.get(Job, delivery.job_id)
        url, body, secret = delivery.url, delivery.payload, job.webhook_secret
    timestamp = int(time.time())
    headers = {"content-type": "application/json", "webhook-id": delivery_id,
               "webhook-timestamp": str(timestamp), "webhook-signature": sign(secret, delivery_id, timestamp, body)}
    started = time.perf_counter()
    status_code, error = None, None
    try:
        response = client.post(url, content=body, headers=headers, timeout=settings.webhook_timeout_s)
        status_code = response.status_code
    except httpx.HTTPError as exc:
        error = f"{type(exc).__name__}: {exc}"
    ok = status_code is not None and 200 <= status_code < 300
    with session_scope() as session:
        delivery = session.get(WebhookDelivery, delivery_id)
        delivery.attempts += 1
        session.add(WebhookAttempt(delivery_id=delivery_id, status_code=status_code, error=error,
                                   duration_ms=round(1000 * (time.perf_counter() - started), 2)))
        backoff = settings.webhook_backoff_s
        if ok:
            delivery.status, delivery.delivered_at = "delivered", utcnow()
        elif delivery.attempts > len(backoff):
            delivery.status = "failed"
        else:
            delivery.next_attempt_at = utcnow() + timedelta(seconds=backoff[delivery.attempts - 1])


class Dispatcher(PeriodicThread):
    """Sends due deliveries. Several API replicas may each run one: a delivery is claimed by
    one statement, so each attempt is made once."""

    def __init__(self, interval_s: float = 0.5):
        self.client = httpx.Client(follow_redirects=False)
        super().__init__("webhook-dispatcher", interval_s, self.dispatch_due)

    def dispatch_due(self) -> None:
        for delivery_id in _claim_due():
            deliver(delivery_id, self.client)

    def stop(self) -> None:
        super().stop()
        self.client.close()


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


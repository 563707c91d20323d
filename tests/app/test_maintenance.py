"""The sweep of abandoned temporary files: what an API process killed mid-request leaves."""

from __future__ import annotations

import os
import time
import uuid

from app.maintenance import sweep_temporary
from app.storage import LocalStore


def _age(path, seconds: float) -> None:
    old = time.time() - seconds
    for item in [path, *path.rglob("*")] if path.is_dir() else [path]:
        os.utime(item, (old, old))


def test_only_idle_abandoned_upload_files_are_swept(tmp_path):
    store = LocalStore(tmp_path)
    tmp = tmp_path / "tmp"
    abandoned = tmp / f"staging-{uuid.uuid4().hex}"   # an upload whose API process died
    (abandoned / "model.safetensors").parent.mkdir()
    (abandoned / "model.safetensors").write_bytes(b"x" * 100)
    busy = store.staging_dir()                          # this process is still validating it
    (busy / "config.json").write_text("{}")
    recent = tmp / f"staging-{uuid.uuid4().hex}"        # another replica's, still being written
    recent.mkdir()
    job = store.staging_dir(owner="job_0123")           # a job's: the worker's to clean
    trash = tmp / f"deleted-{uuid.uuid4().hex}"          # a delete cut off before its rmtree
    trash.mkdir()
    parts = tmp / "upload-upl_1"
    parts.mkdir()
    (parts / "part-00001").write_bytes(b"p" * 10)       # a received part: kept, whatever its age
    (parts / ".part-00002-abcd").write_bytes(b"half")   # a part cut off mid-body
    for path in (abandoned, busy, job, trash, parts):
        _age(path, 120)

    assert sweep_temporary(tmp, max_idle_s=60) == 3
    assert sorted(p.name for p in tmp.iterdir()) == sorted([busy.name, recent.name, job.name, parts.name])
    assert [p.name for p in parts.iterdir()] == ["part-00001"]
    # Once its request is over the live folder is released; aged, it would go like the others.
    store.discard(busy)
    assert not busy.exists()
    assert sweep_temporary(tmp, max_idle_s=60) == 0


# -- retention: the reconciler prunes what is kept only for a while ------------------------------

from datetime import timedelta  # noqa: E402

from app.config import get_settings  # noqa: E402
from app.db.models import (IdempotencyKey, JobEvent, JobStatus, WebhookAttempt, WebhookDelivery,  # noqa: E402
                           new_id, utcnow)
from app.maintenance import prune_expired  # noqa: E402
from tests.app.services.conftest import db, migrated_postgres, migrated_sqlite  # noqa: E402,F401


def _finished(db, tenant, model, status: JobStatus, days_ago: float | None):
    job = db.job(tenant, model, status=status)
    job.finished_at = utcnow() - timedelta(days=days_ago) if days_ago is not None else None
    for n in range(3):
        db.session.add(JobEvent(job_id=job.id, tenant_id=tenant, type="status", message=f"event {n}", data={},
                                created_at=utcnow() - timedelta(days=60)))
    db.session.commit()
    return job


def _delivery(db, job, status: str, days_ago: float) -> str:
    delivery = WebhookDelivery(id=new_id("msg"), job_id=job.id, tenant_id=job.tenant_id, event_id=1,
                               event_type="job.succeeded", url="https://example.invalid/hook", payload="{}",
                               status=status, attempts=1, created_at=utcnow() - timedelta(days=days_ago))
    db.session.add(delivery)
    db.session.flush()
    db.session.add(WebhookAttempt(delivery_id=delivery.id, status_code=500, duration_ms=1.0))
    db.session.commit()
    return delivery.id


def _idempotency(db, tenant, hours_ago: float) -> str:
    key = new_id("idem")
    row = {"tenant_id": tenant, "api_key_id": new_id("key"), "key": key, "status": "done", "response_status": 201,
           "created_at": utcnow() - timedelta(hours=hours_ago)}
    # The row's columns as the schema has them (the key's id came with per-key scoping).
    db.session.add(IdempotencyKey(**{k: v for k, v in row.items() if k in IdempotencyKey.__table__.columns}))
    db.session.commit()
    return key


def test_retention_prunes_old_rows_and_keeps_recent_ones(db, monkeypatch):
    tenant = db.tenant()
    model = db.model(tenant)
    old = _finished(db, tenant, model, JobStatus.SUCCEEDED, days_ago=45)          # default: 30 days
    old_failed = _finished(db, tenant, model, JobStatus.FAILED, days_ago=31)
    recent = _finished(db, tenant, model, JobStatus.CANCELLED, days_ago=2)
    running = _finished(db, tenant, model, JobStatus.RUNNING, days_ago=None)      # old events, still running
    settled_old = _delivery(db, old, "delivered", days_ago=40)
    failed_old = _delivery(db, old, "failed", days_ago=40)
    retrying_old = _delivery(db, old, "pending", days_ago=40)                      # still being retried
    settled_recent = _delivery(db, recent, "delivered", days_ago=1)
    stale_key, fresh_key = _idempotency(db, tenant, hours_ago=30), _idempotency(db, tenant, hours_ago=2)

    pruned = prune_expired()

    assert pruned == {"events": 6, "webhook_attempts": 2, "webhook_deliveries": 2, "idempotency_keys": 1}
    session = db.new_session()
    with_events = {job_id for (job_id,) in session.query(JobEvent.job_id).filter(JobEvent.tenant_id == tenant)}
    assert with_events == {recent.id, running.id}
    assert {d.id for d in session.query(WebhookDelivery).filter(WebhookDelivery.tenant_id == tenant)} == {
        retrying_old, settled_recent}
    assert {a.delivery_id for a in session.query(WebhookAttempt).filter(
        WebhookAttempt.delivery_id.in_([settled_old, failed_old, retrying_old, settled_recent]))} == {
        retrying_old, settled_recent}
    assert {k.key for k in session.query(IdempotencyKey).filter(IdempotencyKey.tenant_id == tenant)} == {fresh_key}
    session.close()

    # The retention is the operator's: a shorter one takes the recent job's events too.
    monkeypatch.setenv("SQUEEZE_EVENT_RETENTION_DAYS", "1")
    get_settings.cache_clear()
    assert prune_expired()["events"] == 3
    assert prune_expired() == {"events": 0, "webhook_attempts": 0, "webhook_deliveries": 0, "idempotency_keys": 0}

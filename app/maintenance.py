"""The reconciler: a daemon thread in each API process that keeps the database and the queue in
agreement. Every ``reconcile_interval_s`` it

- settles the jobs whose lease expired and whose worker no longer runs them (queued again,
  or failed with the true reason: ``app/services/leases.py``), and
- sends the jobs that were accepted while the broker was down, and
- sweeps the storage's temporary folder: staging left by uploads whose API process died
  mid-request, and the parts of resumable uploads past their expiry (in an object store too:
  their multipart uploads, and those no upload owns), and
- prunes what is kept only for a while: finished jobs' events, settled webhook deliveries and
  idempotency records past their retention (``SQUEEZE_*_RETENTION_DAYS``).

Every step is a conditional update, so any number of API replicas may run it at once.
"""

from __future__ import annotations

import logging
import re
import shutil
import time
from datetime import datetime, timedelta
from pathlib import Path

from sqlalchemy import delete, select

from app.background import PeriodicThread
from app.config import get_settings
from app.db.models import (IdempotencyKey, Job, JobEvent, JobStatus, Upload, UploadPart, WebhookAttempt,
                           WebhookDelivery, utcnow)
from app.db.session import session_scope
from app.storage import LIVE_STAGING, get_store

log = logging.getLogger("squeeze.reconciler")

TERMINAL = [status.value for status in JobStatus if status.is_terminal]


def reconcile_once() -> tuple[int, int]:
    from app.services.jobs import resend_unsent
    from app.services.leases import reclaim_lost_jobs

    with session_scope() as session:
        reclaimed = reclaim_lost_jobs(session)
    with session_scope() as session:
        sent = resend_unsent(session)
    if reclaimed or sent:
        log.info("reconciled: %d jobs of lost workers handled, %d queued jobs sent", reclaimed, sent)
    swept = sweep_storage()
    if swept:
        log.info("swept %d abandoned temporary files and folders", swept)
    global _last_prune
    if time.monotonic() - _last_prune >= PRUNE_EVERY_S:  # retention is in days: no need every round
        _last_prune = time.monotonic()
        pruned = prune_expired()
        if any(pruned.values()):
            log.info("pruned past their retention: %s", pruned)
    return reclaimed, sent


PRUNE_EVERY_S = 600.0
_last_prune = -PRUNE_EVERY_S  # the first round prunes


# Rows deleted per statement: a first prune of a large table never holds one huge transaction.
PRUNE_BATCH = 5000


def prune_expired(now: datetime | None = None) -> dict[str, int]:
    """Delete the events of jobs that finished more than ``event_retention_days`` ago, webhook
    deliveries delivered or failed more than ``webhook_delivery_retention_days`` ago (with their
    attempts), and idempotency records older than ``idempotency_retention_days``. A running or
    queued job's events, and a delivery still being retried, are kept whatever their age.
    Returns how many rows of each went."""
    settings, now = get_settings(), now or utcnow()
    finished_before = now - timedelta(days=settings.event_retention_days)
    old_jobs = select(Job.id).where(Job.status.in_(TERMINAL), Job.finished_at < finished_before)
    settled = select(WebhookDelivery.id).where(
        WebhookDelivery.status.in_(["delivered", "failed"]),
        WebhookDelivery.created_at < now - timedelta(days=settings.webhook_delivery_retention_days))
    stale_keys = select(IdempotencyKey.id).where(
        IdempotencyKey.created_at < now - timedelta(days=settings.idempotency_retention_days))
    return {
        "events": _delete_in_batches(JobEvent, select(JobEvent.id).where(JobEvent.job_id.in_(old_jobs))),
        # Attempts first: SQLite does not cascade unless told to.
        "webhook_attempts": _delete_in_batches(
            WebhookAttempt, select(WebhookAttempt.id).where(WebhookAttempt.delivery_id.in_(settled))),
        "webhook_deliveries": _delete_in_batches(WebhookDelivery, settled),
        "idempotency_keys": _delete_in_batches(IdempotencyKey, stale_keys),
    }


def _delete_in_batches(table, ids) -> int:
    total = 0
    while True:
        with session_scope() as session:
            batch = list(session.scalars(ids.limit(PRUNE_BATCH)))
            if batch:
                session.execute(delete(table).where(table.id.in_(batch)))
        total += len(batch)
        if len(batch) < PRUNE_BATCH:
            return total


# An upload's staging folder is "staging-<32 hex>"; a job's carries the job id and is the
# worker's to clean (or the lease reclaimer's, when the worker died).
_UPLOAD_STAGING = re.compile(r"staging-[0-9a-f]{32}")


def sweep_storage() -> int:
    """Expire the resumable uploads past their time and remove what interrupted requests left
    in the storage's ``tmp/``. Returns how many things were removed."""
    store, max_idle_s = get_store(), get_settings().staging_max_idle_s
    return expire_uploads(store) + sweep_temporary(store.root / "tmp", max_idle_s) + abort_orphan_parts(store, max_idle_s)


def expire_uploads(store) -> int:
    """Pending resumable uploads past ``expires_at`` become ``expired``; their parts go (files,
    or the store's multipart upload)."""
    with session_scope() as session:
        # "completing" too: a completion whose API process died is not coming back.
        expired = list(session.scalars(select(Upload.id).where(Upload.status.in_(["pending", "completing"]),
                                                               Upload.expires_at < utcnow())))
        if expired:
            session.execute(delete(UploadPart).where(UploadPart.upload_id.in_(expired)))
            for upload in session.scalars(select(Upload).where(Upload.id.in_(expired))):
                upload.status = "expired"
    for upload_id in expired:
        store.parts_discard(upload_id)
    return len(expired)


def abort_orphan_parts(store, max_idle_s: float) -> int:
    """Abort the store's multipart uploads older than ``max_idle_s`` that no pending upload owns
    (an API process died between starting one and recording its upload; or the upload ended
    and its abort failed). Parts left in the store cost storage and are invisible otherwise."""
    stale = store.parts_stale(max_idle_s)
    if not stale:
        return 0
    with session_scope() as session:
        owned = set(session.scalars(select(Upload.id).where(Upload.id.in_(stale),
                                                            Upload.status.in_(["pending", "completing"]))))
    orphans = [upload_id for upload_id in stale if upload_id not in owned]
    for upload_id in orphans:
        log.info("aborting the store's multipart upload of %s: no pending upload owns it", upload_id)
        store.parts_discard(upload_id)
    return len(orphans)


def sweep_temporary(tmp: Path, max_idle_s: float) -> int:
    """Remove upload staging folders and half-received parts nobody wrote to for ``max_idle_s``
    (their request died with its API process), and the trash of interrupted deletes.

    Idle time is the only sign of abandonment another API replica can see, so ``max_idle_s``
    must exceed the longest validation of an upload; this process's own live staging is never
    taken, nor a job's (the worker's, or the lease reclaimer's, to clean).

    >>> sweep_temporary(store.root / "tmp", max_idle_s=3600)   # doctest: +SKIP
    """
    cutoff = time.time() - max_idle_s
    swept = 0
    for path in tmp.iterdir():
        if _UPLOAD_STAGING.fullmatch(path.name) or path.name.startswith("deleted-"):
            if path not in LIVE_STAGING and (written := _last_write(path)) < cutoff:
                log.info("removing %s: untouched for %.0f s", path.name, time.time() - written)
                shutil.rmtree(path, ignore_errors=True)
                swept += 1
        elif path.name.startswith("upload-"):  # a part cut off mid-body; received parts stay
            for partial in path.glob(".part-*"):
                if (written := _last_write(partial)) < cutoff:
                    log.info("removing %s/%s: untouched for %.0f s", path.name, partial.name, time.time() - written)
                    partial.unlink(missing_ok=True)
                    swept += 1
    return swept


def _last_write(path: Path) -> float:
    try:
        times = [path.stat().st_mtime] + [p.stat().st_mtime for p in path.rglob("*")] if path.is_dir() else [path.stat().st_mtime]
    except FileNotFoundError:  # removed meanwhile by its owner
        return time.time()
    return max(times)


class Reconciler(PeriodicThread):
    def __init__(self, interval_s: float | None = None):
        super().__init__("reconciler", interval_s or get_settings().reconcile_interval_s, reconcile_once)

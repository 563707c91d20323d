"""Every query the services run, in one place."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import TypeVar

from sqlalchemy import and_, func, or_, select, update
from sqlalchemy.orm import Session

from app.db.models import Base, Job, JobEvent, JobStatus, Tenant, Upload

Row = TypeVar("Row", bound=Base)


# Row locks held until the transaction ends. A job being submitted "share"-locks each object its
# spec names; a deletion "update"-locks the object before it looks for jobs naming it: one waits
# for the other, so neither misses the other. PostgreSQL: FOR KEY SHARE / FOR UPDATE.
LOCKS = {"share": {"read": True, "key_share": True}, "update": True}


def get(session: Session, model: type[Row], object_id: str, tenant_id: str, lock: str | None = None) -> Row | None:
    """The row if it exists in this tenant. Another tenant's row is reported as absent.
    ``lock``: "share" or "update" (see LOCKS), or None."""
    if "\x00" in object_id:  # no id has one, and PostgreSQL cannot even compare it
        return None
    if lock is None:
        row = session.get(model, object_id)
    elif session.get_bind().dialect.name == "sqlite":
        # SQLite has no row locks, only one writer at a time: a write that changes nothing takes
        # that lock (both kinds), and the read after it sees what the previous writer committed.
        session.execute(update(model).where(model.id == object_id).values(id=model.id))
        row = session.get(model, object_id, populate_existing=True)
    else:
        row = session.get(model, object_id, with_for_update=LOCKS[lock])
    return row if row is not None and row.tenant_id == tenant_id else None


def page(
    session: Session,
    model: type[Row],
    *,
    tenant_id: str,
    limit: int,
    after: str | None = None,
    created_after: datetime | None = None,
    created_before: datetime | None = None,
    metadata: dict[str, str] | None = None,
    **filters,
) -> tuple[list[Row], bool]:
    """Newest first, keyset-paginated on (created_at, id): stable while rows are added."""
    query = select(model).where(model.tenant_id == tenant_id)
    for column, value in filters.items():
        if value is not None:
            query = query.where(getattr(model, column) == value)
    if created_after is not None:
        query = query.where(model.created_at >= created_after)
    if created_before is not None:
        query = query.where(model.created_at < created_before)
    for key, value in (metadata or {}).items():
        query = query.where(model.metadata_[key].as_string() == value)
    if after is not None:
        anchor = get(session, model, after, tenant_id)
        if anchor is None:
            return [], False
        query = query.where(
            or_(
                model.created_at < anchor.created_at,
                and_(model.created_at == anchor.created_at, model.id < anchor.id),
            )
        )
    query = query.order_by(model.created_at.desc(), model.id.desc()).limit(limit + 1)
    rows = list(session.scalars(query))
    return rows[:limit], len(rows) > limit


def jobs_using_model(session: Session, model_id: str) -> int:
    return session.scalar(select(func.count()).select_from(Job).where(Job.model_id == model_id))


def active_jobs(session: Session, tenant_id: str) -> list[Job]:
    return list(
        session.scalars(
            select(Job).where(
                Job.tenant_id == tenant_id,
                Job.status.in_([JobStatus.QUEUED.value, JobStatus.RUNNING.value]),
            )
        )
    )


def unsent_jobs(session: Session) -> list[Job]:
    """Queued jobs whose broker message was never sent (the broker was down at submit time)."""
    return list(
        session.scalars(
            select(Job).where(Job.status == JobStatus.QUEUED.value, Job.enqueued_at.is_(None))
        )
    )


def lock_tenant(session: Session, tenant_id: str) -> None:
    """Hold the tenant's row until the transaction ends: decisions that count a tenant's rows
    (running jobs, pending uploads) and then add one are made one at a time per tenant."""
    if session.get_bind().dialect.name == "sqlite":
        # No row locks: a write that changes nothing takes SQLite's one writer lock.
        session.execute(update(Tenant).where(Tenant.id == tenant_id).values(id=Tenant.id))
    else:
        # NO KEY UPDATE: rows that merely reference the tenant (a new model, a new job) may still
        # be inserted meanwhile.
        session.execute(select(Tenant.id).where(Tenant.id == tenant_id).with_for_update(key_share=True))


def running_job_count(session: Session, tenant_id: str) -> int:
    return session.scalar(select(func.count()).select_from(Job).where(
        Job.tenant_id == tenant_id, Job.status == JobStatus.RUNNING.value))


def pending_upload_count(session: Session, tenant_id: str, now: datetime) -> int:
    return session.scalar(select(func.count()).select_from(Upload).where(
        Upload.tenant_id == tenant_id, Upload.status == "pending", Upload.expires_at > now))


def tenant_at_capacity(session: Session, job_id: str, max_running: int) -> int | None:
    """Whether the job's tenant already runs ``max_running`` jobs: that count, or None when the
    job may start. Locks the tenant's row until the transaction ends, so that two workers
    claiming two of its jobs (``claim_job`` next, in the same transaction) cannot both take the
    last free place."""
    tenant_id = session.scalar(select(Job.tenant_id).where(Job.id == job_id))
    if tenant_id is None:
        return None
    lock_tenant(session, tenant_id)
    running = running_job_count(session, tenant_id)
    return running if running >= max_running else None


def last_event_message(session: Session, job_id: str) -> str | None:
    return session.scalar(select(JobEvent.message).where(JobEvent.job_id == job_id)
                          .order_by(JobEvent.id.desc()).limit(1))


def claim_job(session: Session, job_id: str, now: datetime, worker_id: str, lease_s: float) -> bool:
    """Move a queued job to running in one statement, under a lease held by ``worker_id``;
    False when another delivery won or the job was cancelled meanwhile. This is what makes a
    duplicated message harmless."""
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == JobStatus.QUEUED.value, Job.cancel_requested.is_(False))
        .values(status=JobStatus.RUNNING.value, started_at=now, attempts=Job.attempts + 1,
                worker_id=worker_id, lease_expires_at=now + timedelta(seconds=lease_s))
    )
    return result.rowcount == 1


def renew_lease(session: Session, job_id: str, worker_id: str, now: datetime, lease_s: float) -> bool:
    """The heartbeat. False means the lease is lost: the job was given to another worker."""
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == JobStatus.RUNNING.value, Job.worker_id == worker_id)
        .values(lease_expires_at=now + timedelta(seconds=lease_s))
    )
    return result.rowcount == 1


def expired_leases(session: Session, now: datetime) -> list[Job]:
    return list(session.scalars(
        select(Job).where(Job.status == JobStatus.RUNNING.value, Job.lease_expires_at < now)
    ))


def active_job_count(session: Session, tenant_id: str) -> int:
    # Counted in SQL: this runs on every job submission.
    return session.scalar(
        select(func.count()).select_from(Job).where(
            Job.tenant_id == tenant_id, Job.status.in_([JobStatus.QUEUED.value, JobStatus.RUNNING.value])
        )
    )


def cancel_if_queued(session: Session, job_id: str, now) -> bool:
    """Cancel in one statement, so a worker claiming the job at the same moment cannot be
    overwritten by a stale read: exactly one of the two updates matches."""
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == JobStatus.QUEUED.value)
        .values(status=JobStatus.CANCELLED.value, cancel_requested=True, finished_at=now)
    )
    return result.rowcount == 1


def request_cancel(session: Session, job_id: str) -> bool:
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == JobStatus.RUNNING.value)
        .values(cancel_requested=True)
    )
    return result.rowcount == 1

"""A job's log, written by the API (queued, cancelled) and the worker (everything else).

>>> record(session, job, "stage", "prune.magnitude started", stage="prune.magnitude", index=0)
>>> session.commit()   # events commit with the change they describe
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.db.models import Job, JobEvent, utcnow
from app.webhooks import queue_for_event

EVENT_TYPES = ("status", "stage", "progress", "metric", "warning", "error")


def record(session: Session, job: Job, type: str, message: str, **data: Any) -> JobEvent:
    if type not in EVENT_TYPES:
        raise ValueError(f"unknown event type {type!r}")
    event = JobEvent(job_id=job.id, tenant_id=job.tenant_id, type=type, message=message, data=data,
                     created_at=utcnow())
    session.add(event)
    queue_for_event(session, job, event)
    return event


def page(session: Session, job_id: str, *, after: int | None, limit: int) -> tuple[list[JobEvent], bool]:
    """Oldest first: a log reads forward. ``after`` is the id of the last event already seen."""
    query = select(JobEvent).where(JobEvent.job_id == job_id)
    if after is not None:
        query = query.where(JobEvent.id > after)
    rows = list(session.scalars(query.order_by(JobEvent.id).limit(limit + 1)))
    return rows[:limit], len(rows) > limit


def as_dict(event: JobEvent) -> dict[str, Any]:
    return {"id": event.id, "object": "job.event", "job_id": event.job_id, "type": event.type,
            "message": event.message, "data": event.data or {}, "created_at": event.created_at.isoformat()}

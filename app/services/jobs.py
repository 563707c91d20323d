"""Job decisions: accept a spec, enqueue it after commit, cancel, re-send what was never sent.

The row is committed before the broker hears of it, and the message carries only the id: a
worker that gets a message for a job that is no longer queued simply drops it.
"""

from __future__ import annotations

import logging

from sqlalchemy.orm import Session

from app.db import repositories
from app.db.models import Job, JobStatus, Model, new_id, utcnow
from app.config import get_settings
from app.errors import APIError, Conflict, NotFound, TooManyRequests
from app.services import events
from app.services.datasets import get_dataset
from app.services.models import get_model
from app.specs import JobSpec, reference_fields

log = logging.getLogger("squeeze.jobs")


def create_job(session: Session, tenant_id: str, spec: JobSpec) -> Job:
    model = get_model(session, tenant_id, spec.model_id)
    limit = get_settings().max_active_jobs_per_tenant
    if repositories.active_job_count(session, tenant_id) >= limit:
        raise TooManyRequests(f"at most {limit} queued or running jobs per tenant; wait for some to finish")
    try:
        _check_references(session, tenant_id, spec, model)
    except APIError:
        session.rollback()  # let go of the locks taken on the objects checked so far
        raise
    job = Job(
        id=new_id("job"), tenant_id=tenant_id, model_id=model.id, metadata_=spec.metadata,
        # The webhook lives in its own columns: its secret must never be echoed in `spec`.
        spec=spec.model_dump(mode="json", exclude={"metadata", "webhook"}),
        webhook_url=str(spec.webhook.url) if spec.webhook else None,
        webhook_events=spec.webhook.events if spec.webhook else None,
        webhook_secret=spec.webhook.secret if spec.webhook else None,
        status=JobStatus.QUEUED.value, progress=0.0, cancel_requested=False, attempts=0,
    )
    session.add(job)
    events.record(session, job, "status", "job queued", status=JobStatus.QUEUED.value)
    session.commit()
    enqueue(session, job)
    return job


def _check_references(session: Session, tenant_id: str, spec: JobSpec, model: Model) -> None:
    """Every object the spec names (each ``DatasetRef`` / ``ModelRef`` field, wherever it is)
    must exist in this tenant when the job is accepted: otherwise a 404 that names the field,
    e.g. ``stages.1.teacher_model_id``. Text is tokenized with the job model's tokenizer."""
    lookups = {"dataset": get_dataset, "model": get_model}
    for ref in reference_fields(spec):
        # Locked until the job is committed: a deletion of the object waits for it (or we for the deletion).
        lookups[ref.kind](session, tenant_id, ref.id, param=ref.path, lock="share")
        if ref.kind == "dataset" and not model.has_tokenizer:
            raise APIError(
                f"model {model.id!r} was uploaded without tokenizer files, so the text of {ref.path} "
                "cannot be tokenized; upload it again with tokenizer.json",
                param=ref.path,
            )


def enqueue(session: Session, job: Job) -> bool:
    """Send the job's id to the broker. If the broker is down the job stays queued with no
    ``enqueued_at`` and ``resend_unsent`` delivers it later: the job is never lost."""
    from worker.celery_app import send_run_job  # the API imports Celery only, never torch

    try:
        send_run_job(job.id)
    except Exception as exc:  # kombu raises many types; every one means "not sent"
        log.warning("broker unavailable, job %s stays queued for re-send: %s", job.id, exc)
        return False
    job.enqueued_at = utcnow()
    session.commit()
    return True


def resend_unsent(session: Session) -> int:
    """Deliver queued jobs whose message was never sent. Safe to run at any time."""
    return sum(enqueue(session, job) for job in repositories.unsent_jobs(session))


def get_job(session: Session, tenant_id: str, job_id: str) -> Job:
    job = repositories.get(session, Job, job_id, tenant_id)
    if job is None:
        raise NotFound(f"no job {job_id!r}", param="job_id")
    return job


def cancel_job(session: Session, tenant_id: str, job_id: str) -> Job:
    """A queued job is cancelled at once; a running one when the engine next checks (between
    layers and steps); a finished one cannot be cancelled."""
    job = get_job(session, tenant_id, job_id)
    if repositories.cancel_if_queued(session, job_id, utcnow()):
        session.refresh(job)
        events.record(session, job, "status", "job cancelled before it started", status=JobStatus.CANCELLED.value)
    elif repositories.request_cancel(session, job_id):
        events.record(session, job, "warning", "cancel requested; the job stops at the next layer or step")
    else:
        session.refresh(job)
        raise Conflict(f"job {job_id!r} is already {job.status}", param="job_id")
    session.commit()
    session.refresh(job)
    return job

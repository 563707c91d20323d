"""Job decisions: accept a spec, enqueue it after commit, cancel, re-send what was never sent.

The row is committed before the broker hears of it, and the message carries only the id: a
worker that gets a message for a job that is no longer queued simply drops it.
"""

from __future__ import annotations

import json
import logging

from sqlalchemy.orm import Session

from app.db import repositories
from app.db.models import Dataset, Job, JobStatus, Model, new_id, utcnow
from app.config import Settings, get_settings
from app.errors import APIError, Conflict, NotFound, TooManyRequests
from app.services import events
from app.services.budget import check_compute_budget
from app.services.datasets import get_dataset
from app.services.estimate import JobEstimate, ModelFacts, declared_limits, estimate_job, gib
from app.services.models import get_model
from app.specs import JobSpec, reference_fields
from app.storage import get_store
from app.webhooks import seal_secret

log = logging.getLogger("squeeze.jobs")


def create_job(session: Session, tenant_id: str, spec: JobSpec) -> Job:
    model = get_model(session, tenant_id, spec.model_id)
    limit = get_settings().max_active_jobs_per_tenant
    if repositories.active_job_count(session, tenant_id) >= limit:
        raise TooManyRequests(f"at most {limit} queued or running jobs per tenant; wait for some to finish")
    try:
        named = _check_references(session, tenant_id, spec, model)
        check_compute_budget(spec, model.context_length, get_settings().max_job_tokens)
        estimate = _estimate(spec, named)
        _check_fits(estimate, get_settings(), spec)
    except APIError:
        session.rollback()  # let go of the locks taken on the objects checked so far
        raise
    job = Job(
        id=new_id("job"), tenant_id=tenant_id, model_id=model.id, metadata_=spec.metadata,
        # The webhook lives in its own columns: its secret must never be echoed in `spec`.
        spec=spec.model_dump(mode="json", exclude={"metadata", "webhook"}),
        webhook_url=str(spec.webhook.url) if spec.webhook else None,
        webhook_events=spec.webhook.events if spec.webhook else None,
        webhook_secret=seal_secret(spec.webhook.secret) if spec.webhook else None,  # encrypted at rest
        status=JobStatus.QUEUED.value, progress=0.0, cancel_requested=False, attempts=0,
        estimate=estimate.as_json(),
    )
    session.add(job)
    events.record(session, job, "status", "job queued", status=JobStatus.QUEUED.value)
    session.commit()
    enqueue(session, job)
    return job


def _check_references(session: Session, tenant_id: str, spec: JobSpec, model: Model) -> dict[str, Model | Dataset]:
    """Every object the spec names (each ``DatasetRef`` / ``ModelRef`` field, wherever it is)
    must exist in this tenant when the job is accepted: otherwise a 404 that names the field,
    e.g. ``stages.1.teacher_model_id``. Text is tokenized with the job model's tokenizer.
    Returns the rows found, by id."""
    lookups = {"dataset": get_dataset, "model": get_model}
    found: dict[str, Model | Dataset] = {}
    for ref in reference_fields(spec):
        # Locked until the job is committed: a deletion of the object waits for it (or we for the deletion).
        found[ref.id] = lookups[ref.kind](session, tenant_id, ref.id, param=ref.path, lock="share")
        if ref.kind == "dataset" and not model.has_tokenizer:
            raise APIError(
                f"model {model.id!r} was uploaded without tokenizer files, so the text of {ref.path} "
                "cannot be tokenized; upload it again with tokenizer.json",
                param=ref.path,
            )
    return found


def _estimate(spec: JobSpec, named: dict[str, Model | Dataset]) -> JobEstimate:
    """The job's pre-flight estimate, from the rows it names and each model's config.json."""
    models = {id_: ModelFacts.from_row(row, _read_config(row)) for id_, row in named.items() if isinstance(row, Model)}
    datasets = {id_: row.size_bytes for id_, row in named.items() if isinstance(row, Dataset)}
    return estimate_job(spec, models, datasets, process_bytes=get_settings().worker_process_bytes)


def _read_config(model: Model) -> dict:
    """The model's config.json (validated at upload); empty if it cannot be read, and the
    estimate then assumes a shape from the parameter count."""
    try:
        config = json.loads(get_store().read_bytes(f"models/{model.id}/config.json"))
    except Exception:  # noqa: BLE001 - missing, unreadable or the store unreachable: no shape
        return {}
    return config if isinstance(config, dict) else {}


# The spec field a client changes to shrink each term of the estimate.
_TERM_PARAMS = {"stage": "stages", "student_weights": "stages", "text": "stages",
                "calibration": "calibration", "evaluation": "evaluation", "evaluation_tokens": "evaluation"}


def _check_fits(estimate: JobEstimate, settings: Settings, spec: JobSpec) -> None:
    """A 422 for a job whose estimated peak exceeds what a worker declares it gives one job
    (``SQUEEZE_WORKER_MEMORY_BYTES``, ``SQUEEZE_WORKER_DEVICE_MEMORY_BYTES``); its message
    names both numbers and the largest term, its ``param`` the field that term follows."""
    for where, key, limit, setting in declared_limits(settings):
        needed = getattr(estimate, key)
        if limit is None or needed <= limit:
            continue
        term, size = estimate.dominant(where)
        param = _TERM_PARAMS.get(term, "model_id")
        if term == "stage":
            param = f"stages.{estimate.largest_stage}"
        elif (param == "evaluation" and spec.evaluation is None) or (param == "calibration" and spec.calibration is None):
            param = "model_id"
        raise APIError(
            f"this job needs an estimated {gib(needed)} of {where} memory at its peak, more than the "
            f"{gib(limit)} a worker gives one job ({setting}); the largest part is {term} ({gib(size)}). "
            "A smaller model, fewer calibration samples, a shorter seq_len or a smaller batch_size needs less.",
            param=param, status_code=422,
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

"""What happens to a running job whose lease expired: its worker stopped renewing it.

A lease that expires only says the heartbeat is late. The worker may be dead (SIGKILL, the
OOM killer, a lost machine) or alive and slow (a loaded host, a database that answered late).
Handing a live worker's job to another would run it twice, and recording "worker lost" for a
job that is still going (or that its time limit stopped) would tell the client a wrong reason.
So before acting, the reconciler asks the worker itself, through the broker's control channel
(the Celery node named in the job's ``worker_id``), which jobs it is running:

- it answers and lists the job: alive, left alone; its heartbeat will catch up;
- it answers without the job, or no node answers within ``worker_ping_timeout_s``: the attempt
  is over. If the worker was still alive past the soft time limit (its last renewal says so),
  the time limit stopped it: failed ``time_limit_exceeded``, not retried (it would only run
  out of time again). Otherwise queued again while attempts remain, failed ``worker_lost``
  after that;
- the broker cannot be reached: nothing is known and nothing is changed this round.

A worker presumed dead that wakes up anyway cannot overwrite the outcome: every write of a
job's result is conditional on the lease still being its own (``worker/tasks.py``).
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta, timezone
from typing import Callable

from sqlalchemy import update
from sqlalchemy.orm import Session

from app.config import get_settings
from app.db import repositories
from app.db.models import Job, JobStatus, utcnow
from app.services import events
from app.storage import get_store

log = logging.getLogger("squeeze.reconciler")

# worker_id is "<celery node>#<pid>#<random>": the node is what the control channel addresses.
WORKER_ID_SEPARATOR = "#"

# nodes -> {node: ids of the jobs it runs} for the nodes that answered; None: broker unreachable.
RunningJobs = Callable[[set[str]], "dict[str, set[str]] | None"]


def make_worker_id(node: str, pid: int, nonce: str) -> str:
    return WORKER_ID_SEPARATOR.join((node, str(pid), nonce))


def node_of(worker_id: str | None) -> str:
    return (worker_id or "").split(WORKER_ID_SEPARATOR, 1)[0]


def running_jobs(nodes: set[str]) -> dict[str, set[str]] | None:
    """Ask the Celery nodes which jobs they are running now (their active ``run_job`` tasks)."""
    from worker.celery_app import RUN_JOB, broker_reachable
    from worker.celery_app import app as celery_app

    if not broker_reachable():
        return None
    try:
        replies = celery_app.control.inspect(destination=sorted(nodes),
                                             timeout=get_settings().worker_ping_timeout_s).active()
    except Exception as exc:  # kombu raises many types; each means the question went unasked
        log.warning("could not ask the workers which jobs they run: %s", exc)
        return None
    running: dict[str, set[str]] = {}
    for node, tasks in (replies or {}).items():
        # active() is asked unsafe (the default): args come as the list run_job received.
        running[node] = {str(task["args"][0]) for task in tasks or ()
                         if task.get("name") == RUN_JOB and task.get("args")}
    return running


def reclaim_lost_jobs(session: Session, ask: RunningJobs = running_jobs) -> int:
    """Settle the running jobs whose lease expired and whose worker no longer runs them.
    Returns how many were settled (queued again, failed or cancelled)."""
    settings = get_settings()
    now = utcnow()
    expired = repositories.expired_leases(session, now)
    if not expired:
        return 0
    answers = ask({node_of(job.worker_id) for job in expired})
    if answers is None:
        log.warning("%d job leases expired, but the broker cannot be reached to ask their workers; "
                    "left as they are this round", len(expired))
        return 0
    count = 0
    for job in expired:
        node = node_of(job.worker_id)
        if job.id in answers.get(node, ()):
            log.warning("job %s: lease expired but worker %s still runs it (late heartbeat); left to it", job.id, node)
            continue
        if _settle(session, job, now, settings):
            count += 1
    return count


def _settle(session: Session, job: Job, now: datetime, settings) -> bool:
    # Conditional on the lease still being the expired one: a late heartbeat wins.
    lease = job.lease_expires_at
    still_expired = session.execute(
        update(Job).where(Job.id == job.id, Job.status == JobStatus.RUNNING.value, Job.lease_expires_at == lease)
        .values(worker_id=None, lease_expires_at=None)
    ).rowcount
    if not still_expired:
        return False
    get_store().discard_staging(job.id)  # the lost attempt's half-written files
    session.refresh(job)
    if job.cancel_requested:
        job.status, job.finished_at = JobStatus.CANCELLED.value, now
        events.record(session, job, "status", "job cancelled (its worker stopped)", status=job.status)
    elif _alive_past_soft_limit(job.started_at, lease, settings):
        _fail(session, job, now, "time_limit_exceeded",
              f"the job ran longer than {settings.job_soft_time_limit_s} s and was stopped")
    elif job.attempts >= settings.job_max_attempts:
        _fail(session, job, now, "worker_lost",
              f"the worker running this job stopped {job.attempts} times (killed or out of memory); "
              "not retried again")
    else:
        job.status, job.enqueued_at, job.stage_name, job.stage_index = JobStatus.QUEUED.value, None, None, None
        events.record(session, job, "warning",
                      f"the worker stopped during attempt {job.attempts}; the job is queued again")
        events.record(session, job, "status", "job queued again", status=job.status)
    session.commit()
    return True


def _alive_past_soft_limit(started_at: datetime | None, lease_expires_at: datetime, settings) -> bool:
    """The last renewal (lease end minus one lease) came after the soft time limit: the worker
    was still alive when its time ran out, so the limit is what ended the attempt."""
    if started_at is None:
        return False
    last_renewal = _aware(lease_expires_at) - timedelta(seconds=settings.job_lease_s)
    return last_renewal >= _aware(started_at) + timedelta(seconds=settings.job_soft_time_limit_s)


def _aware(moment: datetime) -> datetime:
    # SQLite hands back naive datetimes; every stored time is UTC.
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


def _fail(session: Session, job: Job, now: datetime, error_type: str, message: str) -> None:
    job.status, job.finished_at = JobStatus.FAILED.value, now
    job.error_type, job.error_message = error_type, message
    events.record(session, job, "error", message, error_type=error_type)
    events.record(session, job, "status", "job failed", status=job.status)

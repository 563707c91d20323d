"""The Celery application shared by the API (which only sends) and the workers (which run).

Embedded default: kombu's filesystem transport under ``<var_dir>/broker``, so one machine needs
no broker server yet runs the very same task code as production (Redis)::

    celery -A worker.celery_app worker --concurrency=1 -Q squeeze-jobs

Compression jobs are long and expensive, hence: a message is acknowledged only after the job
ends (late ack), a worker takes one message at a time (prefetch 1), a message whose worker
died is given back to the queue (reject on worker lost), and every job has a time limit.
"""

from __future__ import annotations

from celery import Celery
from celery.signals import setup_logging

from app.config import Settings, get_settings

RUN_JOB = "squeeze.run_job"


def _transport_options(settings: Settings) -> dict:
    if settings.broker_url.startswith("filesystem://"):
        queue, processed, control = (settings.broker_folder / name for name in ("queue", "processed", "control"))
        for folder in (queue, processed, control):
            folder.mkdir(parents=True, exist_ok=True)
        # One folder for both directions: producer and consumer are on the same machine.
        # The control folder (broadcast commands) would otherwise land in the working directory.
        return {"data_folder_in": str(queue), "data_folder_out": str(queue),
                "processed_folder": str(processed), "store_processed": False,
                "control_folder": str(control)}
    # Redis re-delivers an unacknowledged message after the visibility timeout: it must be
    # longer than the longest job, or a healthy long job would be started a second time.
    return {"visibility_timeout": settings.job_time_limit_s + 3600}


def make_celery(settings: Settings) -> Celery:
    celery = Celery("squeeze", broker=settings.broker_url, include=["worker.tasks"])
    celery.conf.update(
        broker_transport_options=_transport_options(settings),
        broker_connection_retry_on_startup=True,
        broker_connection_timeout=5,
        task_default_queue=settings.queue_name,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        worker_concurrency=settings.worker_concurrency,
        task_time_limit=settings.job_time_limit_s,
        task_soft_time_limit=settings.job_soft_time_limit_s,
        # Results live in the database; Celery's result backend would be a second truth.
        task_ignore_result=True,
        # Submitting must not hang a request when the broker is down: try briefly, then let the
        # job stay queued for re-send.
        task_publish_retry_policy={"max_retries": 2, "interval_start": 0.2, "interval_step": 0.5},
        worker_hijack_root_logger=False,
    )
    return celery


app = make_celery(get_settings())


@setup_logging.connect
def _json_logs(**_kwargs) -> None:
    # Celery would install its own text handlers; one JSON format everywhere instead.
    from app.observability import configure_logging

    configure_logging(get_settings().log_level)


def send_run_job(job_id: str) -> None:
    app.send_task(RUN_JOB, args=[job_id], queue=get_settings().queue_name)


def broker_reachable(timeout: float = 2.0) -> bool:
    try:
        with app.connection_for_write() as connection:
            connection.ensure_connection(max_retries=1, timeout=timeout)
        return True
    except Exception:  # any transport error means "unreachable"
        return False

"""Serve Squeeze on one machine: migrations, one Celery worker process and the API.

``python -m app.serve`` (what ``make run`` calls). With no configuration this is the embedded
default: SQLite, the filesystem broker and artifacts under ./var. The worker is a real Celery
worker in its own process, exactly as in production; it is stopped when the API stops.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import uvicorn
from alembic import command
from alembic.config import Config

from app.config import get_settings


def migrate() -> None:
    config = Config("alembic.ini")
    config.attributes["configure_logger"] = False
    command.upgrade(config, "head")


def _die_with_parent() -> None:
    # Linux: the worker gets SIGTERM if this launcher dies, even by SIGKILL, so no orphan
    # worker keeps consuming the queue after `make run` is gone.
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def start_worker() -> subprocess.Popen:
    settings = get_settings()
    return subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker",
         "--loglevel=INFO", f"--concurrency={settings.worker_concurrency}",
         "-Q", settings.queue_name, "--hostname", f"squeeze-embedded-{os.getpid()}@%h"],
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        preexec_fn=_die_with_parent,
    )


def main() -> None:
    settings = get_settings()
    migrate()
    worker = start_worker()
    try:
        uvicorn.run("app.main:app", host=settings.host, port=settings.port, log_level="info")
    finally:
        worker.send_signal(signal.SIGTERM)
        try:
            worker.wait(timeout=30)
        except subprocess.TimeoutExpired:
            worker.kill()


if __name__ == "__main__":
    main()

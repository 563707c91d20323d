"""Serve Squeeze on one machine: migrations, one Celery worker process and the API.

``python -m app.serve`` (what ``make run`` calls). With no configuration this is the embedded
default: SQLite, the filesystem broker and artifacts under ./var. The worker is a real Celery
worker in its own process, exactly as in production.

Stopping (Ctrl-C's SIGINT, or SIGTERM, to this process or its process group) ends every process
this starts within ``SQUEEZE_SHUTDOWN_TIMEOUT_S`` and a few seconds:

- the worker runs in a process group of its own, so the terminal's signal reaches only this
  launcher, which alone stops the worker: SIGTERM to its main process at once (Celery's warm
  shutdown, which waits for a running job), then SIGKILL to the worker's whole group (its pool
  processes too) at the deadline;
- the API stops taking requests and gives open ones (event streams) until the deadline;
- a watchdog ends everything at the deadline plus a margin, whatever else hangs;
- if this launcher is killed outright, the kernel kills the worker (``PR_SET_PDEATHSIG``), and
  Celery's pool processes die with it.

The launcher then dies of the signal it was sent, as a shell expects of a stopped program.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager

import uvicorn
from alembic import command
from alembic.config import Config

from app.config import get_settings

log = logging.getLogger("squeeze.serve")

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
# Past the deadline, how long the watchdog still waits for the orderly path before it ends
# everything itself.
WATCHDOG_MARGIN_S = 5.0


def migrate() -> None:
    config = Config("alembic.ini")
    config.attributes["configure_logger"] = False
    command.upgrade(config, "head")


def _die_with_parent() -> None:
    # Linux: the worker is killed if this launcher dies, even by SIGKILL, so no orphan worker
    # keeps consuming the queue after `make run` is gone. SIGKILL, not SIGTERM: with the
    # launcher gone nothing would escalate a warm shutdown that hangs.
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
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
        start_new_session=True,  # its own process group: see the module docstring
    )


class WorkerProcess:
    """The worker and its process group (the Celery main process and its pool)."""

    def __init__(self, process: subprocess.Popen) -> None:
        self.process = process
        self.group = process.pid  # start_new_session: the group is named after its leader

    def ask_to_stop(self) -> None:
        # The main process only, as Celery expects: it stops its own pool (warm shutdown).
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)

    def stop(self, deadline: float) -> None:
        """Ask, wait until ``deadline`` (a ``time.monotonic()``), then kill the whole group."""
        self.ask_to_stop()
        try:
            self.process.wait(timeout=max(deadline - time.monotonic(), 0))
        except subprocess.TimeoutExpired:
            log.warning("the worker did not stop in time; killing it")
        # Always, even after a clean exit of the main process: a pool process it left behind
        # is still in the group (a group cannot be renamed while it has members).
        self._signal_group(signal.SIGKILL)
        self.process.wait()

    def _signal_group(self, sig: int) -> None:
        try:
            os.killpg(self.group, sig)
        except (ProcessLookupError, PermissionError):
            pass  # the group is empty: nothing left to stop


class _Server(uvicorn.Server):
    """uvicorn's server, with the stop signals handled here: uvicorn would re-raise them once it
    has stopped, and a re-raised SIGTERM ends the process before the worker is stopped."""

    def __init__(self, config: uvicorn.Config, on_stop) -> None:
        super().__init__(config)
        self.on_stop = on_stop
        self.received: list[int] = []

    @contextmanager
    def capture_signals(self):
        previous = {sig: signal.signal(sig, self._stop) for sig in STOP_SIGNALS}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _stop(self, sig: int, _frame) -> None:
        if not self.received:
            self.on_stop()
        self.received.append(sig)
        self.should_exit = True
        if len(self.received) > 1:
            self.force_exit = True  # a second Ctrl-C: no waiting for open connections


def _start_watchdog(worker: WorkerProcess, delay_s: float) -> None:
    def end_everything() -> None:
        time.sleep(delay_s)
        log.error("shutdown took longer than %.0f s; ending every process", delay_s)
        worker._signal_group(signal.SIGKILL)
        os._exit(1)

    threading.Thread(target=end_everything, name="shutdown-watchdog", daemon=True).start()


def main() -> None:
    settings = get_settings()
    migrate()
    worker = WorkerProcess(start_worker())
    stopping_since: list[float] = []

    def on_stop() -> None:
        # From the signal handler: start both clocks and the worker's warm shutdown at once,
        # so the API's and the worker's shutdowns overlap instead of adding up.
        stopping_since.append(time.monotonic())
        worker.ask_to_stop()
        _start_watchdog(worker, settings.shutdown_timeout_s + WATCHDOG_MARGIN_S)

    server = _Server(
        uvicorn.Config("app.main:app", host=settings.host, port=settings.port, log_level="info",
                       timeout_graceful_shutdown=settings.shutdown_timeout_s),
        on_stop,
    )
    try:
        server.run()
    finally:
        start = stopping_since[0] if stopping_since else time.monotonic()
        worker.stop(deadline=start + settings.shutdown_timeout_s)
    for sig in server.received[:1]:
        # End as the signal would have ended us (exit status 128 + n for the shell).
        signal.signal(sig, signal.SIG_DFL)
        signal.raise_signal(sig)


if __name__ == "__main__":
    main()

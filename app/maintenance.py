"""The reconciler: a daemon thread in each API process that keeps the database and the queue in
agreement. Every ``reconcile_interval_s`` it

- queues again (or fails, past ``job_max_attempts``) the jobs whose worker stopped renewing its
  lease, and
- sends the jobs that were accepted while the broker was down.

Every step is a conditional update, so any number of API replicas may run it at once.
"""

from __future__ import annotations

import logging
import threading

from app.config import get_settings
from app.db.session import session_scope

log = logging.getLogger("squeeze.reconciler")


def reconcile_once() -> tuple[int, int]:
    from app.services.jobs import reclaim_lost_jobs, resend_unsent

    with session_scope() as session:
        reclaimed = reclaim_lost_jobs(session)
    with session_scope() as session:
        sent = resend_unsent(session)
    if reclaimed or sent:
        log.info("reconciled: %d jobs of lost workers handled, %d queued jobs sent", reclaimed, sent)
    return reclaimed, sent


class Reconciler:
    def __init__(self, interval_s: float | None = None):
        self.interval_s = interval_s or get_settings().reconcile_interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="reconciler", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                reconcile_once()
            except Exception:  # the database may be restarting: try again next round
                log.exception("reconcile round failed")
            self._stop.wait(self.interval_s)

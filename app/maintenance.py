"""The reconciler: a daemon thread in each API process that keeps the database and the queue in
agreement. Every ``reconcile_interval_s`` it

- queues again (or fails, past ``job_max_attempts``) the jobs whose worker stopped renewing its
  lease, and
- sends the jobs that were accepted while the broker was down.

Every step is a conditional update, so any number of API replicas may run it at once.
"""

from __future__ import annotations

import logging

from app.background import PeriodicThread
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


class Reconciler(PeriodicThread):
    def __init__(self, interval_s: float | None = None):
        super().__init__("reconciler", interval_s or get_settings().reconcile_interval_s, reconcile_once)

"""What the reconciler does with a job whose lease expired, decided against a real (SQLite)
database: the worker is asked first, and the recorded reason is the true one.

The question to the workers is the one thing stood in for here (``ask``); the real control
channel is exercised end to end in tests/e2e/test_faults.py (a frozen worker keeps its job)."""

from __future__ import annotations

from datetime import timedelta
from types import SimpleNamespace

import pytest
from sqlalchemy.orm import sessionmaker

from app.db.models import Base, Job, JobEvent, JobStatus, Model, Tenant, utcnow
from app.db.session import make_engine
from app.services import leases
from app.storage import LocalStore

LEASE_S, SOFT_LIMIT_S = 60.0, 3600
NODE = "worker-1@host-a"


@pytest.fixture
def session(tmp_path, monkeypatch):
    engine = make_engine(f"sqlite:///{tmp_path / 'db.sqlite'}")
    Base.metadata.create_all(engine)
    settings = SimpleNamespace(job_lease_s=LEASE_S, job_soft_time_limit_s=SOFT_LIMIT_S, job_max_attempts=3)
    monkeypatch.setattr(leases, "get_settings", lambda: settings)
    monkeypatch.setattr(leases, "get_store", lambda: LocalStore(tmp_path / "storage"))
    with sessionmaker(bind=engine, expire_on_commit=False)() as session:
        session.add(Tenant(id="ten_1", name="a"))
        session.commit()
        session.add(Model(id="mod_1", tenant_id="ten_1", name="m", architecture="GPT2LMHeadModel",
                          model_type="gpt2", num_parameters=1, size_bytes=1, sha256="0" * 64, files=[],
                          has_tokenizer=True, dtype="float32"))
        session.commit()
        yield session
    engine.dispose()


def _running_job(session, *, ran_for_s: float, silent_for_s: float, attempts: int = 1, cancel: bool = False) -> Job:
    """A running job started ``ran_for_s`` ago whose last renewal was ``silent_for_s`` ago."""
    now = utcnow()
    last_renewal = now - timedelta(seconds=silent_for_s)
    job = Job(id=f"job_{len(session.query(Job).all())}", tenant_id="ten_1", model_id="mod_1", spec={},
              status=JobStatus.RUNNING.value, attempts=attempts, cancel_requested=cancel,
              started_at=now - timedelta(seconds=ran_for_s), enqueued_at=now,
              worker_id=leases.make_worker_id(NODE, 4242, "abcd1234"),
              lease_expires_at=last_renewal + timedelta(seconds=LEASE_S))
    session.add(job)
    session.commit()
    return job


def _answers(running: dict[str, set[str]] | None):
    asked = []

    def ask(nodes):
        asked.append(nodes)
        return running

    return ask, asked


def _error_type(session, job) -> tuple[str, str | None]:
    session.refresh(job)
    return job.status, job.error_type


def test_the_node_is_read_back_from_the_worker_id():
    assert leases.node_of(leases.make_worker_id("celery@gpu-7.example", 17, "ff00")) == "celery@gpu-7.example"
    assert leases.node_of(None) == ""


def test_a_job_its_live_worker_still_runs_is_left_to_it(session):
    job = _running_job(session, ran_for_s=300, silent_for_s=LEASE_S + 30)
    ask, asked = _answers({NODE: {job.id}})
    assert leases.reclaim_lost_jobs(session, ask) == 0
    assert asked == [{NODE}]
    assert _error_type(session, job) == ("running", None)
    assert job.worker_id.startswith(NODE) and job.attempts == 1


def test_nothing_changes_while_the_broker_cannot_be_asked(session):
    job = _running_job(session, ran_for_s=300, silent_for_s=LEASE_S + 30)
    ask, _ = _answers(None)
    assert leases.reclaim_lost_jobs(session, ask) == 0
    assert _error_type(session, job) == ("running", None)


def test_no_question_is_asked_while_every_lease_is_current(session):
    _running_job(session, ran_for_s=300, silent_for_s=5)
    ask, asked = _answers({})
    assert leases.reclaim_lost_jobs(session, ask) == 0
    assert asked == []


@pytest.mark.parametrize("answer", [{}, {NODE: set()}, {NODE: {"job_other"}}], ids=["silent", "idle", "other-job"])
def test_a_job_its_worker_no_longer_runs_is_queued_again(session, answer):
    job = _running_job(session, ran_for_s=300, silent_for_s=LEASE_S + 30)
    ask, _ = _answers(answer)
    assert leases.reclaim_lost_jobs(session, ask) == 1
    assert _error_type(session, job) == ("queued", None)
    assert job.worker_id is None and job.enqueued_at is None  # the reconciler sends it again
    messages = [e.message for e in session.query(JobEvent).filter_by(job_id=job.id)]
    assert any("queued again" in m for m in messages)


def test_after_the_last_attempt_the_job_fails_as_worker_lost(session):
    job = _running_job(session, ran_for_s=300, silent_for_s=LEASE_S + 30, attempts=3)
    assert leases.reclaim_lost_jobs(session, _answers({})[0]) == 1
    assert _error_type(session, job) == ("failed", "worker_lost")
    assert "stopped 3 times" in job.error_message


def test_a_worker_alive_past_its_soft_limit_was_stopped_by_the_time_limit(session):
    # Renewed 10 s after the soft limit, then killed (the hard limit): not retried, true reason.
    job = _running_job(session, ran_for_s=SOFT_LIMIT_S + LEASE_S + 20, silent_for_s=LEASE_S + 10)
    assert leases.reclaim_lost_jobs(session, _answers({NODE: set()})[0]) == 1
    assert _error_type(session, job) == ("failed", "time_limit_exceeded")
    assert f"{SOFT_LIMIT_S} s" in job.error_message and job.attempts == 1


def test_a_worker_that_died_before_its_time_limit_is_not_blamed_on_it(session):
    # Last renewal 100 s before the soft limit: it died of something else, noticed late.
    job = _running_job(session, ran_for_s=SOFT_LIMIT_S + 20, silent_for_s=120)
    assert leases.reclaim_lost_jobs(session, _answers({})[0]) == 1
    assert _error_type(session, job) == ("queued", None)


def test_a_cancel_asked_of_a_dead_worker_ends_the_job_cancelled(session):
    job = _running_job(session, ran_for_s=300, silent_for_s=LEASE_S + 30, cancel=True)
    assert leases.reclaim_lost_jobs(session, _answers({})[0]) == 1
    assert _error_type(session, job) == ("cancelled", None)


def test_a_heartbeat_that_lands_while_the_worker_is_asked_wins(session):
    job = _running_job(session, ran_for_s=300, silent_for_s=LEASE_S + 30)

    def ask_while_the_heartbeat_lands(nodes):
        # The worker's own connection, as its heartbeat thread would write.
        with sessionmaker(bind=session.get_bind())() as worker:
            worker.query(Job).filter_by(id=job.id).update({"lease_expires_at": utcnow() + timedelta(seconds=LEASE_S)})
            worker.commit()
        return {}

    assert leases.reclaim_lost_jobs(session, ask_while_the_heartbeat_lands) == 0
    assert _error_type(session, job) == ("running", None)

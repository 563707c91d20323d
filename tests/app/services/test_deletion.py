"""Deleting a model or a dataset while an unfinished job names it, in any reference field of its
spec (a distillation teacher, a student, calibration or evaluation text), is refused with a 409
that names the job; once the job has finished the object can go. A deletion and a submission
that names the same object at the same moment are ordered by a lock: one of them is refused."""

from __future__ import annotations

import threading

import pytest

from app.db.models import Dataset, Job, JobStatus, Model
from app.errors import Conflict, NotFound
from app.services import events
from app.services import models as models_service
from app.services.datasets import delete_dataset
from app.services.jobs import create_job
from app.services.models import delete_model
from app.specs import EvaluationSpec, JobSpec

RTN = {"type": "quantize", "method": "rtn"}


def _distill(dataset_id: str, **models: str) -> dict:
    return {"type": "distill", "method": "kd", "dataset_id": dataset_id, "steps": 1, **models}


@pytest.mark.parametrize("field", ["teacher_model_id", "student_model_id"])
@pytest.mark.parametrize("finish", [JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED])
def test_a_model_named_only_by_a_queued_jobs_stage_is_kept_until_the_job_finishes(db, field, finish):
    tenant = db.tenant()
    source, named = db.model(tenant), db.model(tenant)
    job = db.job(tenant, source, stages=[RTN, _distill(db.dataset(tenant).id, **{field: named.id})])

    for status in (JobStatus.QUEUED, JobStatus.RUNNING):
        job.status = status.value
        db.session.commit()
        with pytest.raises(Conflict) as refused:
            delete_model(db.session, db.store, tenant, named.id)
        assert (refused.value.status_code, refused.value.param) == (409, "model_id")
        assert job.id in refused.value.message and f"stages.1.{field}" in refused.value.message
        assert db.session.get(Model, named.id) is not None and db.store.path("models", named.id).exists()

    job.status = finish.value
    db.session.commit()
    delete_model(db.session, db.store, tenant, named.id)
    assert db.session.get(Model, named.id) is None and not db.store.path("models", named.id).exists()


def test_a_jobs_input_model_is_kept_even_after_the_job_finished(db):
    """Its records stay complete (the job's model_id is a foreign key)."""
    tenant = db.tenant()
    model = db.model(tenant)
    job = db.job(tenant, model, stages=[RTN])
    with pytest.raises(Conflict, match=job.id):
        delete_model(db.session, db.store, tenant, model.id)
    job.status = JobStatus.SUCCEEDED.value
    db.session.commit()
    with pytest.raises(Conflict, match="has jobs") as refused:
        delete_model(db.session, db.store, tenant, model.id)
    assert refused.value.param == "model_id"


@pytest.mark.parametrize("path", ["stages.1.dataset_id", "calibration.dataset_id", "evaluation.dataset_id"])
def test_a_dataset_named_by_an_unfinished_job_is_kept_until_it_finishes(db, path):
    tenant = db.tenant()
    model, dataset, other = db.model(tenant), db.dataset(tenant), db.dataset(tenant)
    # Only the field under test names `dataset`; the others name `other`.
    named = {p: dataset.id if p == path else other.id for p in
             ("stages.1.dataset_id", "calibration.dataset_id", "evaluation.dataset_id")}
    job = db.job(tenant, model,
                 stages=[{"type": "prune", "method": "wanda", "sparsity": 0.5}, _distill(named["stages.1.dataset_id"])],
                 calibration={"dataset_id": named["calibration.dataset_id"]},
                 evaluation={"dataset_id": named["evaluation.dataset_id"]})

    with pytest.raises(Conflict) as refused:
        delete_dataset(db.session, db.store, tenant, dataset.id)
    assert (refused.value.status_code, refused.value.param) == (409, "dataset_id")
    assert job.id in refused.value.message and path in refused.value.message

    job.status = JobStatus.CANCELLED.value
    db.session.commit()
    delete_dataset(db.session, db.store, tenant, dataset.id)
    assert db.session.get(Dataset, dataset.id) is None and not db.store.path("datasets", dataset.id).exists()


def test_objects_no_unfinished_job_names_are_deleted(db):
    tenant = db.tenant()
    source, teacher, dataset = db.model(tenant), db.model(tenant), db.dataset(tenant)
    db.job(tenant, source, status=JobStatus.QUEUED, stages=[RTN])  # names neither
    db.job(tenant, source, status=JobStatus.SUCCEEDED,
           stages=[_distill(dataset.id, teacher_model_id=teacher.id)])  # finished
    delete_model(db.session, db.store, tenant, teacher.id)
    delete_dataset(db.session, db.store, tenant, dataset.id)
    assert db.session.get(Model, teacher.id) is None and db.session.get(Dataset, dataset.id) is None


class _Caught(threading.Thread):
    """Runs ``work(session)`` in a session of its own, keeping its result or its exception."""

    def __init__(self, db, work):
        super().__init__(daemon=True)
        self.db, self.work, self.result, self.error = db, work, None, None
        self.start()

    def run(self):
        with self.db.new_session() as session:
            try:
                self.result = self.work(session)
            except Exception as exc:  # noqa: BLE001 - the test looks at it
                self.error = exc


def _pause_after(monkeypatch, module, name: str) -> tuple[threading.Event, threading.Event]:
    """``module.name`` runs, then waits for ``release``: a request caught between its check and
    its commit. ``reached`` is set when it gets there."""
    reached, release = threading.Event(), threading.Event()
    original = getattr(module, name)

    def paused(*args, **kwargs):
        result = original(*args, **kwargs)
        reached.set()
        assert release.wait(30)
        return result

    monkeypatch.setattr(module, name, paused)
    return reached, release


def _teacher_job_spec(source, teacher, dataset) -> JobSpec:
    return JobSpec.model_validate({"model_id": source.id, "stages": [_distill(dataset.id, teacher_model_id=teacher.id)]})


def test_a_deletion_waits_for_a_submission_naming_the_model_and_then_refuses(db, monkeypatch):
    tenant = db.tenant()
    source, teacher, dataset = db.model(tenant), db.model(tenant), db.dataset(tenant)
    # The submission has checked the teacher and is about to commit its job.
    reached, release = _pause_after(monkeypatch, events, "record")
    submit = _Caught(db, lambda session: create_job(session, tenant, _teacher_job_spec(source, teacher, dataset)).id)
    assert reached.wait(30)
    delete = _Caught(db, lambda session: delete_model(session, db.store, tenant, teacher.id))
    delete.join(0.5)
    assert delete.is_alive()  # waiting for the submission's lock on the teacher
    release.set()
    submit.join(30), delete.join(30)

    assert submit.error is None and isinstance(delete.error, Conflict)
    assert submit.result in delete.error.message and "stages.0.teacher_model_id" in delete.error.message
    with db.new_session() as session:
        assert session.get(Model, teacher.id) is not None


def test_a_submission_naming_a_model_being_deleted_waits_and_then_refuses(db, monkeypatch):
    tenant = db.tenant()
    source, teacher, dataset = db.model(tenant), db.model(tenant), db.dataset(tenant)
    # The deletion has found no job naming the teacher and is about to delete it.
    reached, release = _pause_after(monkeypatch, models_service, "refuse_while_referenced")
    delete = _Caught(db, lambda session: delete_model(session, db.store, tenant, teacher.id))
    assert reached.wait(30)
    submit = _Caught(db, lambda session: create_job(session, tenant, _teacher_job_spec(source, teacher, dataset)))
    submit.join(0.5)
    assert submit.is_alive()  # waiting for the deletion's lock on the teacher
    release.set()
    delete.join(30), submit.join(30)

    assert delete.error is None and isinstance(submit.error, NotFound)
    assert submit.error.param == "stages.0.teacher_model_id"
    with db.new_session() as session:
        assert session.query(Job).filter_by(tenant_id=tenant).count() == 0 and db.sent == []


def test_a_refused_submission_or_deletion_holds_no_lock(db):
    tenant = db.tenant()
    source, teacher, dataset = db.model(tenant), db.model(tenant), db.dataset(tenant)
    # The teacher is checked (and locked) before the missing evaluation dataset is found.
    spec = _teacher_job_spec(source, teacher, dataset).model_copy(
        update={"evaluation": EvaluationSpec(dataset_id="ds_missing")})
    with pytest.raises(NotFound):
        create_job(db.session, tenant, spec)
    delete = _Caught(db, lambda session: delete_model(session, db.store, tenant, teacher.id))
    delete.join(10)
    assert not delete.is_alive() and delete.error is None

    db.job(tenant, source, stages=[_distill(dataset.id)])
    with pytest.raises(Conflict):
        delete_dataset(db.session, db.store, tenant, dataset.id)
    submit = _Caught(db, lambda session: create_job(session, tenant, JobSpec.model_validate(
        {"model_id": source.id, "stages": [RTN], "evaluation": {"dataset_id": dataset.id}})))
    submit.join(10)
    assert not submit.is_alive() and submit.error is None

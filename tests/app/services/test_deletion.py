"""Deleting a model or a dataset while an unfinished job names it, in any reference field of its
spec (a distillation teacher, a student, calibration or evaluation text), is refused with a 409
that names the job; once the job has finished the object can go."""

from __future__ import annotations

import pytest

from app.db.models import Dataset, JobStatus, Model
from app.errors import Conflict
from app.services.datasets import delete_dataset
from app.services.models import delete_model

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

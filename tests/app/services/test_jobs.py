"""Accepting a job: every object the spec names must be the tenant's, and a refusal names the
field that holds the bad id (``param``), whichever ``DatasetRef`` / ``ModelRef`` field it is."""

from __future__ import annotations

import copy

import pytest

from app.errors import APIError, NotFound
from app.db.models import Job
from app.services.jobs import create_job
from app.specs import JobSpec

# Each field of a JobSpec that names another object, and the kind of object.
REFERENCE_PATHS = {
    "model_id": "model",
    "stages.1.dataset_id": "dataset",
    "stages.1.teacher_model_id": "model",
    "stages.1.student_model_id": "model",
    "calibration.dataset_id": "dataset",
    "evaluation.dataset_id": "dataset",
}


def _full_spec(model_id: str, teacher_id: str, student_id: str, dataset_id: str) -> dict:
    """A spec that fills every reference field."""
    return {
        "model_id": model_id,
        "stages": [{"type": "prune", "method": "wanda", "sparsity": 0.5},
                   {"type": "distill", "method": "kd", "dataset_id": dataset_id,
                    "teacher_model_id": teacher_id, "student_model_id": student_id, "steps": 1}],
        "calibration": {"dataset_id": dataset_id, "samples": 2},
        "evaluation": {"dataset_id": dataset_id},
    }


def _set(spec: dict, path: str, value: str) -> dict:
    spec = copy.deepcopy(spec)
    *parents, last = path.split(".")
    holder = spec
    for part in parents:
        holder = holder[int(part)] if isinstance(holder, list) else holder[part]
    holder[last] = value
    return spec


@pytest.fixture
def world(db):
    tenant = db.tenant()
    other = db.tenant()
    return {
        "db": db, "tenant": tenant,
        "spec": _full_spec(db.model(tenant).id, db.model(tenant).id, db.model(tenant).id, db.dataset(tenant).id),
        "foreign": {"model": db.model(other).id, "dataset": db.dataset(other).id},
    }


def test_the_reference_paths_tested_are_every_one_the_spec_declares(world):
    from app.specs import reference_fields

    spec = JobSpec.model_validate(world["spec"])
    assert {ref.path: ref.kind for ref in reference_fields(spec)} == REFERENCE_PATHS


def test_a_spec_whose_every_reference_is_the_tenants_is_accepted_and_sent(world):
    db = world["db"]
    job = create_job(db.session, world["tenant"], JobSpec.model_validate(world["spec"]))
    assert job.status == "queued" and db.sent == [job.id]
    assert job.spec["stages"][1]["teacher_model_id"] == world["spec"]["stages"][1]["teacher_model_id"]


@pytest.mark.parametrize("owner", ["missing", "another tenant's"])
@pytest.mark.parametrize("path", REFERENCE_PATHS)
def test_a_missing_or_foreign_reference_is_refused_naming_its_field(world, path, owner):
    db, kind = world["db"], REFERENCE_PATHS[path]
    bad_id = f"{'mdl' if kind == 'model' else 'ds'}_{'0' * 32}" if owner == "missing" else world["foreign"][kind]
    spec = JobSpec.model_validate(_set(world["spec"], path, bad_id))

    with pytest.raises(NotFound) as refused:
        create_job(db.session, world["tenant"], spec)

    assert (refused.value.status_code, refused.value.param) == (404, path)
    assert bad_id in refused.value.message and f"no {kind}" in refused.value.message
    assert db.session.query(Job).filter_by(tenant_id=world["tenant"]).count() == 0 and db.sent == []


def _naming_text_once(dataset_id: str) -> dict[str, dict]:
    """For each dataset field, a spec in which only that field names a dataset."""
    distill = {"type": "distill", "method": "kd", "dataset_id": dataset_id, "steps": 1}
    rtn, wanda = {"type": "quantize", "method": "rtn"}, {"type": "prune", "method": "wanda", "sparsity": 0.5}
    return {
        "stages.1.dataset_id": {"stages": [rtn, distill]},
        "calibration.dataset_id": {"stages": [wanda], "calibration": {"dataset_id": dataset_id}},
        "evaluation.dataset_id": {"stages": [rtn], "evaluation": {"dataset_id": dataset_id}},
    }


@pytest.mark.parametrize("path", [p for p, kind in REFERENCE_PATHS.items() if kind == "dataset"])
def test_text_cannot_be_named_for_a_model_without_a_tokenizer(db, path):
    tenant = db.tenant()
    model = db.model(tenant, has_tokenizer=False)
    spec = {"model_id": model.id, **_naming_text_once(db.dataset(tenant).id)[path]}

    with pytest.raises(APIError) as refused:
        create_job(db.session, tenant, JobSpec.model_validate(spec))

    assert (refused.value.status_code, refused.value.param) == (400, path)
    assert "tokenizer" in refused.value.message and db.sent == []

"""The pre-flight estimate at submission: recorded on every accepted job, and a 422 naming the
numbers (and the field to change) for a job larger than what a worker declares it gives one
job. In-process on SQLite and PostgreSQL with the migrations applied."""

from __future__ import annotations

import json
import re

import pytest

from app.config import get_settings
from app.db.models import Job
from app.errors import APIError
from app.services.jobs import create_job
from app.specs import JobSpec

GPT2 = {"model_type": "gpt2", "n_embd": 64, "n_layer": 2, "n_head": 4, "vocab_size": 400, "n_positions": 128}


@pytest.fixture
def world(db):
    tenant = db.tenant()
    model = db.model(tenant)
    (db.store.path("models", model.id) / "config.json").write_text(json.dumps(GPT2))
    return db, tenant, model, db.dataset(tenant)


def _declare(monkeypatch, **limits: int) -> None:
    for name, value in limits.items():
        monkeypatch.setenv(f"SQUEEZE_{name.upper()}", str(value))
    get_settings.cache_clear()


def _magnitude(model_id: str) -> JobSpec:
    return JobSpec.model_validate({"model_id": model_id,
                                   "stages": [{"type": "prune", "method": "magnitude", "sparsity": 0.5}]})


def test_an_accepted_job_records_its_estimate(world):
    db, tenant, model, _ = world
    job = create_job(db.session, tenant, _magnitude(model.id))
    estimate = db.new_session().get(Job, job.id).estimate
    assert estimate["host_bytes"] == sum(estimate["host"]["terms"].values()) > 2**30  # the process alone: 1 GiB
    assert estimate["device_bytes"] > 0 and estimate["disk_bytes"] > 0
    assert estimate["assumptions"]["config_read"] is True  # config.json was read from the store
    assert db.sent == [job.id]


def test_a_job_above_the_declared_host_memory_is_a_422_with_its_numbers(world, monkeypatch):
    db, tenant, model, _ = world
    _declare(monkeypatch, worker_memory_bytes=2**29)  # less than the process's own footprint
    with pytest.raises(APIError) as refused:
        create_job(db.session, tenant, _magnitude(model.id))
    error = refused.value
    assert error.status_code == 422 and error.param == "model_id"
    needed, limit = map(float, re.findall(r"(\d+\.\d\d) GiB", error.message)[:2])
    assert needed >= 1.00 and limit == 0.50  # the process alone is 1 GiB
    assert "host memory" in error.message and "SQUEEZE_WORKER_MEMORY_BYTES" in error.message
    assert "largest part is" in error.message
    assert db.new_session().query(Job).filter_by(tenant_id=tenant).count() == 0 and db.sent == []


def test_a_job_within_the_declared_memory_is_accepted(world, monkeypatch):
    db, tenant, model, _ = world
    _declare(monkeypatch, worker_memory_bytes=64 * 2**30, worker_device_memory_bytes=64 * 2**30)
    job = create_job(db.session, tenant, _magnitude(model.id))
    assert job.status == "queued" and job.estimate["host_bytes"] < 64 * 2**30


def test_a_job_above_the_declared_device_memory_names_the_stage_that_needs_it(world, monkeypatch):
    db, tenant, model, dataset = world
    # A distillation step of 1024 sequences of 2048 tokens: its activations dwarf the model.
    spec = JobSpec.model_validate({"model_id": model.id, "stages": [
        {"type": "prune", "method": "magnitude", "sparsity": 0.5},
        {"type": "distill", "method": "kd", "dataset_id": dataset.id, "batch_size": 1024, "seq_len": 2048}]})
    _declare(monkeypatch, worker_device_memory_bytes=4 * 2**30)
    with pytest.raises(APIError) as refused:
        create_job(db.session, tenant, spec)
    assert refused.value.status_code == 422 and refused.value.param == "stages.1"
    assert "device memory" in refused.value.message and "4.00 GiB" in refused.value.message
    assert "largest part is stage" in refused.value.message


def test_a_model_without_a_readable_config_is_estimated_from_its_parameters(db):
    tenant = db.tenant()
    model = db.model(tenant)  # a row without files
    job = create_job(db.session, tenant, _magnitude(model.id))
    assert job.estimate["assumptions"]["config_read"] is False and job.estimate["host_bytes"] > 0


def test_a_job_whose_calibration_dominates_names_the_calibration(world, monkeypatch):
    """Block by block, the calibration batches at one block boundary can be the largest part:
    the 422 points the client at the calibration section."""
    db, tenant, model, dataset = world
    spec = JobSpec.model_validate({"model_id": model.id, "stages": [{"type": "quantize", "method": "gptq"}],
                                   "calibration": {"dataset_id": dataset.id, "samples": 4096, "seq_len": 8192}})
    _declare(monkeypatch, worker_memory_bytes=2 * 2**30, max_job_tokens=10**9)
    with pytest.raises(APIError) as refused:
        create_job(db.session, tenant, spec)
    assert refused.value.status_code == 422 and refused.value.param == "calibration", refused.value.message
    assert "largest part is calibration" in refused.value.message

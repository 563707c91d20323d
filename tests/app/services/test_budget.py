"""The per-job compute budget (SQUEEZE_MAX_JOB_TOKENS): a spec whose maxima would pin a worker
for hours is refused at submission with a 422 that names the field and the numbers."""

from __future__ import annotations

import pytest

from app.config import get_settings
from app.db.models import Job
from app.errors import APIError
from app.services.budget import job_tokens
from app.services.jobs import create_job
from app.specs import JobSpec


def _spec(model_id: str, dataset_id: str, **sections) -> JobSpec:
    return JobSpec.model_validate({"model_id": model_id, "stages": [{"type": "prune", "method": "wanda", "sparsity": 0.5}],
                                   "calibration": {"dataset_id": dataset_id, "samples": 16, "seq_len": 64}, **sections})


def _budget(monkeypatch, tokens: str | None) -> None:
    if tokens is None:
        monkeypatch.delenv("SQUEEZE_MAX_JOB_TOKENS", raising=False)
    else:
        monkeypatch.setenv("SQUEEZE_MAX_JOB_TOKENS", tokens)
    get_settings.cache_clear()


def test_terms_follow_the_engine():
    spec = JobSpec.model_validate({
        "model_id": "mdl_" + "0" * 32,
        "stages": [{"type": "prune", "method": "sparsegpt", "sparsity": 0.5},
                   {"type": "quantize", "method": "gptq", "bits": 4},
                   {"type": "distill", "method": "kd", "dataset_id": "ds_" + "0" * 32, "steps": 10,
                    "batch_size": 4, "seq_len": 32}],
        "calibration": {"dataset_id": "ds_" + "0" * 32, "samples": 4096, "seq_len": 8192},
        "evaluation": {"dataset_id": "ds_" + "0" * 32, "max_tokens": 10_000_000, "stride": 1}})
    # Two data-aware stages calibrate; evaluation runs before and after, windows of the model's
    # context (here 128) moving one token at a time.
    assert job_tokens(spec, context_length=128) == {
        "calibration": 2 * 4096 * 8192, "evaluation": 2 * 10_000_000 * 128, "stages.2": 10 * 4 * 32}
    # With no stride given a window moves by half its length; it is at most 1024 tokens long.
    default = spec.model_copy(update={"evaluation": spec.evaluation.model_copy(update={"stride": None})})
    assert job_tokens(default, context_length=4096)["evaluation"] == 2 * 19532 * 1024  # ceil(10 M / 512) windows


def test_the_default_budget_refuses_a_stride_of_one_over_ten_million_tokens(db, monkeypatch):
    _budget(monkeypatch, None)
    tenant = db.tenant()
    model, dataset = db.model(tenant), db.dataset(tenant)
    spec = _spec(model.id, dataset.id, evaluation={"dataset_id": dataset.id, "max_tokens": 10_000_000, "stride": 1})
    with pytest.raises(APIError) as refused:
        create_job(db.session, tenant, spec)
    error = refused.value
    assert error.status_code == 422 and error.param == "evaluation.stride"
    assert "2,560,000,000" in error.message and "1,000,000,000" in error.message  # 2 x 10 M x 128, the budget
    assert "SQUEEZE_MAX_JOB_TOKENS" in error.message
    # The same evaluation with the default stride fits.
    fits = _spec(model.id, dataset.id, evaluation={"dataset_id": dataset.id, "max_tokens": 10_000_000})
    assert create_job(db.session, tenant, fits).status == "queued"


def test_an_operator_budget_bounds_calibration_and_distillation(db, monkeypatch):
    _budget(monkeypatch, "1000000")
    tenant = db.tenant()
    model, dataset = db.model(tenant), db.dataset(tenant)
    calibration = JobSpec.model_validate({
        "model_id": model.id, "stages": [{"type": "prune", "method": "wanda", "sparsity": 0.5}],
        "calibration": {"dataset_id": dataset.id, "samples": 4096, "seq_len": 8192}})
    with pytest.raises(APIError) as refused:
        create_job(db.session, tenant, calibration)
    assert refused.value.param == "calibration.samples" and "33,554,432" in refused.value.message
    distill = JobSpec.model_validate({
        "model_id": model.id, "stages": [{"type": "prune", "method": "magnitude", "sparsity": 0.5},
                                         {"type": "distill", "method": "kd", "dataset_id": dataset.id,
                                          "steps": 1_000_000, "batch_size": 2, "seq_len": 32}]})
    with pytest.raises(APIError) as refused:
        create_job(db.session, tenant, distill)
    assert refused.value.param == "stages.1.steps" and "64,000,000" in refused.value.message
    assert db.session.query(Job).filter(Job.tenant_id == tenant).count() == 0
    # Within the budget, the same kinds of job are accepted.
    small = _spec(model.id, dataset.id)
    assert create_job(db.session, tenant, small).status == "queued"

"""Fair share: one tenant's backlog does not starve another tenant's job.

A worker runs two jobs at once; a tenant may run one (``SQUEEZE_MAX_RUNNING_JOBS_PER_TENANT``).
Tenant A's first job never ends on its own (a million distillation steps) and A queues more
behind it; tenant B's single job, sent last, must start before any of A's backlog, and A's
waiting jobs say why they wait without using an attempt. Only the order of events is asserted.
"""

from __future__ import annotations

import time

import pytest

from tests.e2e.client import upload_dataset, upload_model, wait_for
from tests.e2e.stack import ServiceStack
from tests.factories import make_checkpoint

BACKLOG = 4


FAIR = {"max_running_jobs_per_tenant": "1", "fair_share_retry_s": "0.5"}


@pytest.fixture(params=["postgres_redis", "embedded"])
def fair_stack(request, tmp_path):
    """One worker that runs two jobs at once: on PostgreSQL + Redis, and embedded (SQLite and the
    filesystem broker, whose worker holds the re-sent messages until they are due)."""
    if request.param == "embedded":
        with ServiceStack.embedded(tmp_path / "e", worker_concurrency="2", **FAIR) as stack:
            yield stack
        return
    stack = ServiceStack.postgres_redis(tmp_path / "s", **FAIR)
    stack.start(with_worker=False)
    try:
        stack.start_worker(concurrency=2)
        yield stack
    finally:
        stack.stop()


def _job(client, model, stages) -> str:
    response = client.post("/v1/jobs", json={"model_id": model["id"], "stages": stages})
    assert response.status_code == 201, response.text
    return response.json()["id"]


def test_a_tenants_backlog_does_not_starve_another_tenants_job(fair_stack, tmp_path):
    folder = make_checkpoint(tmp_path / "tiny-gpt2")
    a = fair_stack.client_for(fair_stack.create_key("tenant-busy"))
    b = fair_stack.client_for(fair_stack.create_key("tenant-quiet"))
    model_a, model_b = upload_model(a, folder), upload_model(b, folder)
    dataset = upload_dataset(a)
    endless = _job(a, model_a, [{"type": "distill", "method": "kd", "dataset_id": dataset["id"],
                                 "steps": 1_000_000, "batch_size": 2, "seq_len": 32}])
    wait_for(a, endless, statuses=("running",), timeout=120)
    backlog = [_job(a, model_a, [{"type": "prune", "method": "magnitude", "sparsity": 0.2}]) for _ in range(BACKLOG)]
    quiet = _job(b, model_b, [{"type": "prune", "method": "magnitude", "sparsity": 0.2}])

    done = wait_for(b, quiet, timeout=240)
    assert done["status"] == "succeeded", done
    # B's job ran to the end while A's first job still runs and its whole backlog still waits.
    assert a.get(f"/v1/jobs/{endless}").json()["status"] == "running"
    for job_id in backlog:
        job = a.get(f"/v1/jobs/{job_id}").json()
        assert job["status"] == "queued" and job["attempts"] == 0, job

    # Each waiting job says why, once, however many times it was looked at.
    deadline = time.monotonic() + 60
    for job_id in backlog:
        while True:
            messages = [e["message"] for e in a.get(f"/v1/jobs/{job_id}/events").json()["data"]]
            if any(m.startswith("waiting:") for m in messages) or time.monotonic() > deadline:
                break
            time.sleep(0.3)
        waiting = [m for m in messages if m.startswith("waiting:")]
        assert waiting == ["waiting: tenant has 1 running jobs (at most 1 at once)"], messages

    # Once A's running job ends, its backlog runs, one at a time, each on its first attempt.
    assert a.post(f"/v1/jobs/{endless}/cancel").status_code == 200
    finished = [wait_for(a, job_id, timeout=240) for job_id in backlog]
    assert all(job["status"] == "succeeded" and job["attempts"] == 1 for job in finished), finished
    starts = sorted((job["started_at"], job["finished_at"]) for job in finished)
    assert all(earlier[1] <= later[0] for earlier, later in zip(starts, starts[1:])), starts
    assert all(job["started_at"] > done["finished_at"] for job in finished)

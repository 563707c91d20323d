"""The pre-flight estimate with real processes: a worker that declares less memory than a job's
estimate fails it before loading anything (the API, declaring nothing, accepted it), and on a
worker that declares nothing the job runs and its measured peak stays under its estimate."""

from __future__ import annotations

import re

from tests.e2e.client import upload_dataset, upload_model, wait_for
from tests.e2e.stack import ServiceStack
from tests.factories import make_checkpoint


def test_a_worker_refuses_a_job_above_its_memory_and_the_estimate_bounds_a_real_peak(tmp_path):
    # The API declares no limit; the first worker declares 256 MiB, less than any job needs.
    stack = ServiceStack.postgres_redis(tmp_path / "s", worker_settings={"worker_memory_bytes": str(256 * 2**20)})
    with stack:
        client = stack.client
        model = upload_model(client, make_checkpoint(tmp_path / "m"))
        dataset = upload_dataset(client)
        spec = {"model_id": model["id"],
                "stages": [{"type": "prune", "method": "wanda", "sparsity": 0.5},
                           {"type": "quantize", "method": "gptq", "bits": 4, "group_size": 32}],
                "calibration": {"dataset_id": dataset["id"], "samples": 4, "seq_len": 64},
                "evaluation": {"dataset_id": dataset["id"], "seq_len": 64, "stride": 32}}

        created = client.post("/v1/jobs", json=spec)
        assert created.status_code == 201, created.text
        estimate = created.json()["estimate"]
        assert estimate["host_bytes"] > 256 * 2**20 and set(estimate) >= {"host_bytes", "device_bytes", "disk_bytes"}
        job = wait_for(client, created.json()["id"])
        assert job["status"] == "failed", (job, stack.logs())
        assert job["error"]["type"] == "exceeds_worker_memory"
        needed, limit = map(float, re.findall(r"(\d+\.\d\d) GiB", job["error"]["message"])[:2])
        assert needed == round(estimate["host_bytes"] / 2**30, 2) and limit == 0.25
        assert "SQUEEZE_WORKER_MEMORY_BYTES" in job["error"]["message"]
        assert job["metrics"] is None and job["artifact"] is None  # nothing was run

        # A worker that declares nothing runs the same job; its peak stays within the estimate.
        stack.kill("worker")
        stack.worker_env = {}
        stack.start_worker()
        created = client.post("/v1/jobs", json=spec)
        assert created.status_code == 201, created.text
        job = wait_for(client, created.json()["id"])
        assert job["status"] == "succeeded", (job, stack.logs())
        metrics = job["metrics"]
        assert metrics["estimate"] == job["estimate"] == created.json()["estimate"]
        # A fresh worker process ran only this job: its lifetime peak is this job's.
        assert 0 < metrics["peak_rss_bytes"] <= job["estimate"]["host_bytes"], (metrics["peak_rss_bytes"], job["estimate"])
        assert metrics["after"]["artifact_bytes"] <= job["estimate"]["disk_bytes"]

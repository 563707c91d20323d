"""Small HTTP helpers shared by the end-to-end tests; each takes an authenticated client."""

from __future__ import annotations

import time
from pathlib import Path

import httpx

from tests.factories import CORPUS, checkpoint_files


def upload_model(client: httpx.Client, folder: Path, **form) -> dict:
    files = [("files", (name, data)) for name, data in checkpoint_files(folder)]
    response = client.post("/v1/models", files=files, data={"name": "tiny-gpt2", **form})
    assert response.status_code == 201, response.text
    return response.json()


def upload_dataset(client: httpx.Client, text: str = CORPUS, filename: str = "corpus.txt") -> dict:
    response = client.post("/v1/datasets", files={"file": (filename, text.encode())})
    assert response.status_code == 201, response.text
    return response.json()


def wait_for(client: httpx.Client, job_id: str, statuses=("succeeded", "failed", "cancelled"),
             timeout: float = 240) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if job["status"] in statuses:
            return job
        time.sleep(0.3)
    raise AssertionError(f"job {job_id} still {job['status']} after {timeout}s: {job}")


def submit_job(client: httpx.Client, folder: Path) -> dict:
    """A small model uploaded from ``folder`` and one quick job on it (RTN int8), as submitted;
    on a stack without a worker it stays queued."""
    from tests.factories import make_checkpoint

    model = upload_model(client, make_checkpoint(folder))
    response = client.post("/v1/jobs", json={"model_id": model["id"],
                                             "stages": [{"type": "quantize", "method": "rtn", "bits": 8}]})
    assert response.status_code == 201, response.text
    return response.json()

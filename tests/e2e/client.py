"""Small HTTP helpers shared by the end-to-end tests."""

from __future__ import annotations

import time
from pathlib import Path

import httpx

from tests.factories import CORPUS, checkpoint_files, make_checkpoint


def upload_model(url: str, folder: Path) -> dict:
    files = [("files", (name, data)) for name, data in checkpoint_files(folder)]
    response = httpx.post(f"{url}/v1/models", files=files, data={"name": "tiny-gpt2"}, timeout=60)
    assert response.status_code == 201, response.text
    return response.json()


def upload_dataset(url: str, text: str = CORPUS, filename: str = "corpus.txt") -> dict:
    response = httpx.post(f"{url}/v1/datasets", files={"file": (filename, text.encode())}, timeout=60)
    assert response.status_code == 201, response.text
    return response.json()


def wait_for(url: str, job_id: str, statuses=("succeeded", "failed", "cancelled"), timeout: float = 240) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = httpx.get(f"{url}/v1/jobs/{job_id}", timeout=10).json()
        if job["status"] in statuses:
            return job
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} still {job['status']} after {timeout}s: {job}")


__all__ = ["upload_model", "upload_dataset", "wait_for", "make_checkpoint"]

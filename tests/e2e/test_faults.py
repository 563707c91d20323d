"""Faults, really done: a worker SIGKILLed mid-job, the broker restarted mid-job, a job
submitted while the broker is unreachable, a job past its time limit.

Each test runs its own Redis on a private port, so stopping it disturbs nothing else."""

from __future__ import annotations

import socket
import subprocess
import time

import httpx
import pytest

from tests.e2e.client import upload_dataset, upload_model, wait_for
from tests.e2e.stack import ServiceStack, free_port
from tests.factories import CORPUS, make_checkpoint

FAST_RECOVERY = {"job_lease_s": "3", "reconcile_interval_s": "0.5"}


class PrivateRedis:
    def __init__(self, workdir):
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.workdir = workdir
        self.proc: subprocess.Popen | None = None

    def start(self) -> "PrivateRedis":
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.workdir)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return self
            except OSError:
                time.sleep(0.1)
        raise RuntimeError("redis did not start")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def redis(tmp_path):
    server = PrivateRedis(tmp_path).start()
    yield server
    server.stop()


def _long_job(client, tmp_path) -> dict:
    """A job that spends several seconds evaluating a long text: time to hurt it mid-way."""
    model = upload_model(client, make_checkpoint(tmp_path / "m"))
    dataset = upload_dataset(client, text=CORPUS * 30, filename="long.txt")
    response = client.post("/v1/jobs", json={
        "model_id": model["id"], "stages": [{"type": "prune", "method": "magnitude", "sparsity": 0.5}],
        "evaluation": {"dataset_id": dataset["id"], "seq_len": 32, "stride": 8, "max_tokens": 10_000_000}})
    assert response.status_code == 201, response.text
    return response.json()


def _wait_stage(client, job_id: str, stage: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if job["stage"] == stage:
            return
        assert job["status"] in ("queued", "running"), job
        time.sleep(0.1)
    raise AssertionError(f"job never reached {stage}")


def test_sigkilled_worker_job_finishes_exactly_once_on_another(tmp_path, redis):
    with ServiceStack.postgres_redis(tmp_path / "s", broker_url=redis.url, **FAST_RECOVERY) as stack:
        client = stack.client
        job = _long_job(client, tmp_path)
        _wait_stage(client, job["id"], "evaluate.before")
        stack.kill("worker")
        stack.start_worker("worker-2")
        done = wait_for(client, job["id"], timeout=300)
        assert done["status"] == "succeeded", stack.logs()
        assert done["attempts"] == 2
        events = client.get(f"/v1/jobs/{job['id']}/events", params={"limit": 1000}).json()["data"]
        statuses = [e["data"]["status"] for e in events if e["type"] == "status"]
        assert statuses == ["queued", "running", "queued", "running", "succeeded"]
        assert any("worker stopped" in e["message"] for e in events if e["type"] == "warning")
        # One artifact on disk, the one the job describes; no staging left behind.
        artifacts = sorted(p.name for p in (stack.storage_root / "artifacts").glob(f"{job['id']}*"))
        assert len(artifacts) == 1
        download = client.get(f"/v1/jobs/{job['id']}/artifact")
        import hashlib

        assert hashlib.sha256(download.content).hexdigest() == done["artifact"]["sha256"]
        time.sleep(1)
        assert not [p for p in (stack.storage_root / "tmp").iterdir() if p.name.startswith("staging")]


def test_a_job_whose_worker_keeps_dying_fails_with_the_reason(tmp_path, redis):
    with ServiceStack.postgres_redis(tmp_path / "s", broker_url=redis.url, job_max_attempts="1",
                                     **FAST_RECOVERY) as stack:
        client = stack.client
        job = _long_job(client, tmp_path)
        _wait_stage(client, job["id"], "evaluate.before")
        stack.kill("worker")
        done = wait_for(client, job["id"], timeout=60)
        assert done["status"] == "failed" and done["error"]["type"] == "worker_lost"
        assert "stopped" in done["error"]["message"]


def test_broker_restarted_mid_job(tmp_path, redis):
    with ServiceStack.postgres_redis(tmp_path / "s", broker_url=redis.url, **FAST_RECOVERY) as stack:
        client = stack.client
        job = _long_job(client, tmp_path)
        _wait_stage(client, job["id"], "evaluate.before")
        redis.stop()
        time.sleep(1)
        redis.start()
        done = wait_for(client, job["id"], timeout=300)
        assert done["status"] == "succeeded", stack.logs()
        assert done["attempts"] == 1
        # The worker reconnected: a job submitted after the restart runs too.
        again = client.post("/v1/jobs", json={"model_id": job["model_id"],
                                               "stages": [{"type": "prune", "method": "random", "sparsity": 0.1}]})
        assert wait_for(client, again.json()["id"], timeout=120)["status"] == "succeeded", stack.logs()


def test_job_submitted_while_the_broker_is_down_runs_once_it_is_back(tmp_path, redis):
    with ServiceStack.postgres_redis(tmp_path / "s", broker_url=redis.url, **FAST_RECOVERY) as stack:
        client = stack.client
        model = upload_model(client, make_checkpoint(tmp_path / "m"))
        redis.stop()
        assert httpx.get(f"{stack.url}/readyz", timeout=30).status_code == 503
        response = client.post("/v1/jobs", json={"model_id": model["id"],
                                                 "stages": [{"type": "prune", "method": "random", "sparsity": 0.3}]})
        assert response.status_code == 201 and response.json()["status"] == "queued"
        time.sleep(2)
        assert client.get(f"/v1/jobs/{response.json()['id']}").json()["status"] == "queued"
        redis.start()
        done = wait_for(client, response.json()["id"], timeout=120)
        assert done["status"] == "succeeded", stack.logs()


def test_job_past_its_time_limit_fails_with_the_reason(tmp_path, redis):
    with ServiceStack.postgres_redis(tmp_path / "s", broker_url=redis.url, job_soft_time_limit_s="2",
                                     job_time_limit_s="60", **FAST_RECOVERY) as stack:
        client = stack.client
        job = _long_job(client, tmp_path)
        done = wait_for(client, job["id"], timeout=120)
        assert done["status"] == "failed" and done["error"]["type"] == "time_limit_exceeded", done
        assert not list((stack.storage_root / "artifacts").glob(f"{job['id']}*"))


def _restart_postgres() -> None:
    import os
    import shutil

    if shutil.which("pg_ctlcluster") is None or os.geteuid() != 0:
        pytest.skip("restarting PostgreSQL needs pg_ctlcluster and root")
    version = sorted(os.listdir("/etc/postgresql"))[0]
    subprocess.run(["pg_ctlcluster", "--skip-systemctl-redirect", version, "main", "restart"], check=True,
                   timeout=120)


def test_postgres_restarted_mid_job(tmp_path, redis):
    with ServiceStack.postgres_redis(tmp_path / "s", broker_url=redis.url, job_lease_s="30",
                                     reconcile_interval_s="1") as stack:
        client = stack.client
        job = _long_job(client, tmp_path)
        _wait_stage(client, job["id"], "evaluate.before")
        _restart_postgres()
        done = wait_for(client, job["id"], timeout=300)
        assert done["status"] == "succeeded", stack.logs()
        assert len(list((stack.storage_root / "artifacts").glob(f"{job['id']}*"))) == 1
        # The API reconnected too: new work is accepted and runs.
        again = client.post("/v1/jobs", json={"model_id": job["model_id"],
                                               "stages": [{"type": "prune", "method": "random", "sparsity": 0.1}]})
        assert again.status_code == 201
        assert wait_for(client, again.json()["id"], timeout=120)["status"] == "succeeded"

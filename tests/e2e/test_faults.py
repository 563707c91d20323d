"""Faults, really done: a worker SIGKILLed mid-job, the broker restarted mid-job, a job
submitted while the broker is unreachable, a job past its time limit.

Each test runs its own Redis on a private port, so stopping it disturbs nothing else."""

from __future__ import annotations

import os
import signal
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
    """A job that spends several seconds in its stage, evaluating a long text: time to hurt it
    mid-way. (It runs block by block: the evaluation's windows go through each block in the
    same pass as the pruning, so the ``prune.magnitude`` phase is the long one.)"""
    model = upload_model(client, make_checkpoint(tmp_path / "m"))
    dataset = upload_dataset(client, text=CORPUS * 6, filename="long.txt")
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
        _wait_stage(client, job["id"], "prune.magnitude")
        stack.kill("worker")
        stack.start_worker("worker-2")
        done = wait_for(client, job["id"], timeout=420)
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
        _wait_until(lambda: not [p for p in (stack.storage_root / "tmp").iterdir() if p.name.startswith("staging")],
                    what="the lost attempt's staging to be removed")


def test_a_job_whose_worker_keeps_dying_fails_with_the_reason(tmp_path, redis):
    with ServiceStack.postgres_redis(tmp_path / "s", broker_url=redis.url, job_max_attempts="1",
                                     **FAST_RECOVERY) as stack:
        client = stack.client
        job = _long_job(client, tmp_path)
        _wait_stage(client, job["id"], "prune.magnitude")
        stack.kill("worker")
        done = wait_for(client, job["id"], timeout=60)
        assert done["status"] == "failed" and done["error"]["type"] == "worker_lost"
        assert "stopped" in done["error"]["message"]


def test_broker_restarted_mid_job(tmp_path, redis):
    with ServiceStack.postgres_redis(tmp_path / "s", broker_url=redis.url, **FAST_RECOVERY) as stack:
        client = stack.client
        job = _long_job(client, tmp_path)
        _wait_stage(client, job["id"], "prune.magnitude")
        redis.stop()
        time.sleep(1)
        redis.start()
        done = wait_for(client, job["id"], timeout=420)
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


@pytest.mark.parametrize("kind", ["postgres_redis", "embedded"])
def test_a_worker_frozen_past_its_lease_keeps_its_job(tmp_path, kind):
    """A live worker whose heartbeat is late (here: its job process stopped with SIGSTOP for
    longer than the lease) is asked before its job is handed on, says it still runs it, and
    finishes it: one attempt, no second run, no "worker lost"."""
    make = ServiceStack.postgres_redis if kind == "postgres_redis" else ServiceStack.embedded
    with make(tmp_path / "s", **FAST_RECOVERY) as stack:
        client = stack.client
        job = _long_job(client, tmp_path)
        _wait_stage(client, job["id"], "prune.magnitude")
        frozen = stack.job_process()
        os.kill(frozen, signal.SIGSTOP)
        try:
            # The reconciler's answer, not a sleep: its lease ran out and its node was asked.
            _wait_until(lambda: "still runs it" in stack.logs(), timeout=120, what="the reconciler to ask the worker")
        finally:
            os.kill(frozen, signal.SIGCONT)
        done = wait_for(client, job["id"], timeout=420)
        assert done["status"] == "succeeded" and done["attempts"] == 1, (done, stack.logs())
        events = client.get(f"/v1/jobs/{job['id']}/events", params={"limit": 1000}).json()["data"]
        assert [e["data"]["status"] for e in events if e["type"] == "status"] == ["queued", "running", "succeeded"]


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
        _wait_stage(client, job["id"], "prune.magnitude")
        _restart_postgres()
        done = wait_for(client, job["id"], timeout=420)
        assert done["status"] == "succeeded", stack.logs()
        assert len(list((stack.storage_root / "artifacts").glob(f"{job['id']}*"))) == 1
        # The API reconnected too: new work is accepted and runs.
        again = client.post("/v1/jobs", json={"model_id": job["model_id"],
                                               "stages": [{"type": "prune", "method": "random", "sparsity": 0.1}]})
        assert again.status_code == 201
        assert wait_for(client, again.json()["id"], timeout=120)["status"] == "succeeded"


# -- resources: memory and disk ------------------------------------------------------------------


def test_job_out_of_memory_fails_with_the_reason_and_the_worker_goes_on(tmp_path, redis):
    budget = 768 * 2**20
    with ServiceStack.postgres_redis(tmp_path / "s", broker_url=redis.url, job_memory_limit_bytes=str(budget),
                                     **FAST_RECOVERY) as stack:
        client = stack.client
        model = upload_model(client, make_checkpoint(tmp_path / "m"))
        dataset = upload_dataset(client, text=CORPUS * 4)
        # 1024 windows of 128 tokens in one step: teacher and student logits and the attention
        # of both need several GiB, far past the budget.
        hungry = client.post("/v1/jobs", json={"model_id": model["id"], "stages": [
            {"type": "distill", "method": "kd", "dataset_id": dataset["id"], "steps": 1,
             "batch_size": 1024, "seq_len": 128, "eval_every": 1}]})
        assert hungry.status_code == 201, hungry.text
        done = wait_for(client, hungry.json()["id"], timeout=300)
        assert done["status"] == "failed", stack.logs()
        assert done["error"]["type"] == "out_of_memory", done["error"]
        assert "768 MiB" in done["error"]["message"] and "SQUEEZE_JOB_MEMORY_LIMIT_BYTES" in done["error"]["message"]
        assert done["attempts"] == 1  # a clean failure, not a dead worker retried
        assert not list((stack.storage_root / "artifacts").glob(f"{done['id']}*"))
        assert not [p for p in (stack.storage_root / "tmp").iterdir() if p.name.startswith("staging")]
        # The worker survived it, and its limit was lifted and set again: the next job runs.
        small = client.post("/v1/jobs", json={"model_id": model["id"],
                                              "stages": [{"type": "prune", "method": "magnitude", "sparsity": 0.5}]})
        assert wait_for(client, small.json()["id"], timeout=120)["status"] == "succeeded", stack.logs()
        assert "worker_lost" not in stack.logs()


@pytest.fixture
def small_disk(tmp_path):
    """A real filesystem that fills up: a tmpfs of a few hundred KiB (needs root, as in CI)."""
    import os
    import shutil

    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small filesystem needs root")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "squeeze-test-disk", str(mount_point)],
                             capture_output=True, text=True)
    if mounted.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")

    def resize(kib: int) -> None:
        subprocess.run(["mount", "-o", f"remount,size={kib}k", str(mount_point)], check=True)

    yield mount_point, resize
    subprocess.run(["umount", "-l", str(mount_point)], check=False)


def _used_bytes(root) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def test_disk_full_while_writing_the_artifact_fails_cleanly(tmp_path, redis, small_disk):
    disk, resize = small_disk
    with ServiceStack.postgres_redis(tmp_path / "s", broker_url=redis.url, storage_root=str(disk),
                                     **FAST_RECOVERY) as stack:
        client = stack.client
        model = upload_model(client, make_checkpoint(tmp_path / "m"))
        stored = _used_bytes(disk)
        # Room for the model and the job's checkpoint, not for the tar made of it as well.
        resize(int(stored * 2.5) // 1024)
        job = client.post("/v1/jobs", json={"model_id": model["id"],
                                            "stages": [{"type": "prune", "method": "magnitude", "sparsity": 0.5}]})
        done = wait_for(client, job.json()["id"], timeout=120)
        assert done["status"] == "failed", stack.logs()
        assert done["error"]["type"] == "disk_full", done["error"]
        assert "no space left" in done["error"]["message"]
        assert done["artifact"] is None
        # Nothing half-written is left: no artifact file, no staging, only the model remains.
        assert not list((disk / "artifacts").iterdir())
        assert not list((disk / "tmp").iterdir())
        assert _used_bytes(disk) == stored
        assert client.get(f"/v1/jobs/{done['id']}/artifact").status_code == 409
        # Once there is room again, the same job spec succeeds on the same worker.
        resize(16 * 1024)
        again = client.post("/v1/jobs", json={"model_id": model["id"],
                                              "stages": [{"type": "prune", "method": "magnitude", "sparsity": 0.5}]})
        assert wait_for(client, again.json()["id"], timeout=120)["status"] == "succeeded", stack.logs()
        assert len(list((disk / "artifacts").iterdir())) == 1


# -- the API restarted while uploads are in flight ----------------------------------------------


def _send_half(stack, request: httpx.Request) -> socket.socket:
    """Send ``request``'s headers and half its body, and leave the connection open: an upload
    in flight."""
    body = request.read()
    head = [f"{request.method} {request.url.raw_path.decode()} HTTP/1.1", f"Host: 127.0.0.1:{stack.port}"]
    head += [f"{k}: {v}" for k, v in request.headers.items() if k.lower() not in ("host", "content-length")]
    head.append(f"Content-Length: {len(body)}")
    sock = socket.create_connection(("127.0.0.1", stack.port), timeout=10)
    sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode() + body[: len(body) // 2])
    return sock


def _wait_until(condition, timeout: float = 30, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def test_api_restarted_with_uploads_in_flight_loses_nothing_accepted(tmp_path, redis):
    import hashlib
    import io
    import tarfile

    with ServiceStack.postgres_redis(tmp_path / "s", broker_url=redis.url, staging_max_idle_s="4",
                                     reconcile_interval_s="0.5") as stack:
        client = stack.client
        tmp = stack.storage_root / "tmp"
        folder = make_checkpoint(tmp_path / "m")
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
            tar.add(folder, arcname="tiny")
        archive, part = buffer.getvalue(), 64 * 1024
        parts = [archive[i:i + part] for i in range(0, len(archive), part)]
        upload = client.post("/v1/uploads", json={"filename": "tiny.tar.gz", "size_bytes": len(archive),
                                                  "purpose": "model", "part_size": part}).json()
        assert len(parts) >= 3
        for number in (1, 2):
            assert client.put(f"/v1/uploads/{upload['id']}/parts/{number}", content=parts[number - 1]).status_code == 200
        # In flight when the API dies: part 3 of the resumable upload, and a one-request upload.
        auth = {"Authorization": f"Bearer {stack.admin_key}"}
        cut_part = _send_half(stack, httpx.Request("PUT", f"{stack.url}/v1/uploads/{upload['id']}/parts/3",
                                                   content=parts[2], headers=auth))
        cut_model = _send_half(stack, httpx.Request("POST", f"{stack.url}/v1/models", headers=auth,
                                                    files=[("files", ("tiny.tar.gz", archive))]))
        # The part streams straight to storage; the one-request upload is parsed into a spooled
        # temporary file (unlinked at creation) and reaches storage only once whole.
        _wait_until(lambda: list((tmp / f"upload-{upload['id']}").glob(".part-*")), what="the part to reach the disk")
        stack.kill("api")
        cut_part.close()
        cut_model.close()
        stack.start_api(wait=True)

        # What was accepted is all there: the upload and its two parts, readable and resumable.
        state = client.get(f"/v1/uploads/{upload['id']}").json()
        assert state["status"] == "pending"
        assert [p["part_number"] for p in state["parts"]] == [1, 2]
        assert [p["sha256"] for p in state["parts"]] == [hashlib.sha256(p).hexdigest() for p in parts[:2]]
        for number in range(3, len(parts) + 1):
            assert client.put(f"/v1/uploads/{upload['id']}/parts/{number}", content=parts[number - 1]).status_code == 200
        done = client.post(f"/v1/uploads/{upload['id']}/complete", json={"sha256": hashlib.sha256(archive).hexdigest()})
        assert done.status_code == 201, done.text
        model = client.get(f"/v1/models/{done.json()['model_id']}").json()
        assert model["architecture"] == "GPT2LMHeadModel"
        # What was cut off created nothing, and its half-written files are swept.
        assert [m["id"] for m in client.get("/v1/models").json()["data"]] == [model["id"]]
        _wait_until(lambda: not list(tmp.iterdir()), timeout=30, what="the sweep of abandoned staging")


def test_resumable_upload_past_its_expiry_is_marked_and_its_parts_removed(tmp_path, redis):
    with ServiceStack.postgres_redis(tmp_path / "s", broker_url=redis.url, upload_ttl_s="2",
                                     reconcile_interval_s="0.5") as stack:
        client = stack.client
        upload = client.post("/v1/uploads", json={"filename": "c.txt", "size_bytes": 200_000,
                                                  "purpose": "dataset", "part_size": 100_000}).json()
        assert client.put(f"/v1/uploads/{upload['id']}/parts/1", content=b"a" * 100_000).status_code == 200
        parts = stack.storage_root / "tmp" / f"upload-{upload['id']}"
        assert parts.exists()
        _wait_until(lambda: client.get(f"/v1/uploads/{upload['id']}").json()["status"] == "expired",
                    timeout=30, what="the upload to expire")
        assert not parts.exists()
        assert client.get(f"/v1/uploads/{upload['id']}").json()["parts"] == []
        refused = client.put(f"/v1/uploads/{upload['id']}/parts/2", content=b"a" * 100_000)
        assert refused.status_code == 409 and "expired" in refused.json()["error"]["message"]

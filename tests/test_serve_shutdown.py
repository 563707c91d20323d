"""Stopping ``make run`` (``python -m app.serve``) ends every process it started.

As a terminal stops it: SIGINT (Ctrl-C) or SIGTERM to its whole process group. Idle, or with the
worker in the middle of a job that cannot finish soon (a million distillation steps): the
worker's warm shutdown would wait for that job, so the launcher must cut it off at the deadline
(``SQUEEZE_SHUTDOWN_TIMEOUT_S``). Every process that existed under the launcher before the signal
must be gone within that deadline plus a generous margin: a bound, not a speed measurement.
"""

from __future__ import annotations

import os
import signal
import time

import psutil
import pytest

from tests.e2e.client import upload_dataset, upload_model
from tests.e2e.stack import ServiceStack
from tests.factories import make_checkpoint

SHUTDOWN_TIMEOUT_S = 5
# Far more than any orderly stop needs on a loaded machine; the launcher's own watchdog ends
# everything 5 s after the deadline.
MARGIN_S = 60


def _running(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _wait_until_gone(processes: list[psutil.Process], timeout: float) -> list[psutil.Process]:
    deadline = time.monotonic() + timeout
    while (alive := [p for p in processes if _running(p)]) and time.monotonic() < deadline:
        time.sleep(0.2)
    return alive


def _start_a_job_that_runs_for_hours(stack: ServiceStack, tmp_path) -> None:
    model = upload_model(stack.client, make_checkpoint(tmp_path / "m"))
    dataset = upload_dataset(stack.client)
    job = stack.client.post("/v1/jobs", json={"model_id": model["id"], "stages": [
        {"type": "distill", "method": "kd", "dataset_id": dataset["id"], "steps": 1_000_000,
         "batch_size": 2, "seq_len": 32}]})
    assert job.status_code == 201, job.text
    deadline = time.monotonic() + 240
    while (status := stack.client.get(f"/v1/jobs/{job.json()['id']}").json()["status"]) == "queued":
        assert time.monotonic() < deadline, "the worker never started the job"
        time.sleep(0.5)
    assert status == "running"


@pytest.mark.parametrize("sig, busy", [(signal.SIGTERM, False), (signal.SIGINT, True), (signal.SIGTERM, True)],
                         ids=["SIGTERM-idle", "SIGINT-busy", "SIGTERM-busy"])
def test_stopping_the_launcher_ends_every_process_it_started(tmp_path, sig, busy):
    stack = ServiceStack.embedded(tmp_path, shutdown_timeout_s=str(SHUTDOWN_TIMEOUT_S))
    processes: list[psutil.Process] = []
    try:
        stack.start()
        (_, serve), = stack.processes
        if busy:
            _start_a_job_that_runs_for_hours(stack, tmp_path)
        launcher = psutil.Process(serve.pid)
        processes = [launcher, *launcher.children(recursive=True)]
        celery = [p for p in processes if "celery" in " ".join(p.cmdline())]
        # The worker's main process and its prefork pool process, at least.
        assert len(celery) >= 2, [p.cmdline() for p in processes]

        os.killpg(serve.pid, sig)  # as a terminal signals its foreground process group

        alive = _wait_until_gone(processes, SHUTDOWN_TIMEOUT_S + MARGIN_S)
        assert not alive, f"still running: {[(p.pid, p.cmdline()) for p in alive]}\n{stack.logs()}"
        # The launcher ends as the signal would have ended it (a shell sees 128 + n).
        assert serve.wait(timeout=10) == -sig
        if busy:  # the warm shutdown could not finish the job: it was cut off at the deadline
            assert "did not stop in time" in stack.logs()
    finally:
        for process in processes:
            if _running(process):
                process.kill()
        stack.stop()

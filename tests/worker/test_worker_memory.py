"""A worker refuses, before loading anything, a job whose recorded estimate is more than the
memory it declares; the failure is named and carries both numbers."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from worker.tasks import ExceedsWorkerMemory, check_worker_memory, describe_failure

ESTIMATE = {"host_bytes": 3 * 2**30, "device_bytes": 5 * 2**30, "disk_bytes": 2**30}


def declared(host=None, device=None):
    return SimpleNamespace(worker_memory_bytes=host, worker_device_memory_bytes=device, job_memory_limit_bytes=None)


@pytest.mark.parametrize("settings", [declared(), declared(host=3 * 2**30, device=5 * 2**30)])
def test_a_job_within_what_the_worker_declares_passes(settings):
    check_worker_memory(ESTIMATE, settings)
    check_worker_memory(None, declared(host=1))  # a job accepted before estimates were recorded


@pytest.mark.parametrize("settings, where, numbers", [
    (declared(host=2 * 2**30), "host", ("3.00 GiB", "2.00 GiB", "SQUEEZE_WORKER_MEMORY_BYTES")),
    (declared(device=4 * 2**30), "device", ("5.00 GiB", "4.00 GiB", "SQUEEZE_WORKER_DEVICE_MEMORY_BYTES")),
])
def test_a_job_above_it_fails_exceeds_worker_memory_with_the_numbers(settings, where, numbers):
    with pytest.raises(ExceedsWorkerMemory) as refused:
        check_worker_memory(ESTIMATE, settings)
    error_type, message = describe_failure(refused.value, settings)
    assert error_type == "exceeds_worker_memory"
    assert f"of {where} memory" in message and all(number in message for number in numbers)

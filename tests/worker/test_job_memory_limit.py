"""The default per-job memory limit: what a job may map when the operator set no
SQUEEZE_JOB_MEMORY_LIMIT_BYTES."""

from __future__ import annotations

import os
import resource
from types import SimpleNamespace

from worker.tasks import job_memory_limit, memory_budget


def _settings(limit=None, worker=None, device="cpu"):
    return SimpleNamespace(job_memory_limit_bytes=limit, worker_memory_bytes=worker, device=device)


def test_a_cpu_worker_bounds_every_job_by_default():
    physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert job_memory_limit(_settings()) == physical
    # What the worker declares it gives one job, when it declares it; the operator's own limit first.
    assert job_memory_limit(_settings(worker=6 * 2**30)) == 6 * 2**30
    assert job_memory_limit(_settings(limit=2**30, worker=6 * 2**30)) == 2**30
    # The driver's address-space reservations on a GPU dwarf any memory: no default there.
    assert job_memory_limit(_settings(device="cuda:0")) is None
    assert job_memory_limit(_settings(limit=2**30, device="cuda")) == 2**30


def test_the_default_is_applied_while_the_job_runs_and_lifted_after():
    before = resource.getrlimit(resource.RLIMIT_AS)
    with memory_budget(job_memory_limit(_settings(worker=2**30))):
        soft, _ = resource.getrlimit(resource.RLIMIT_AS)
        assert soft != resource.RLIM_INFINITY
        try:
            bytearray(2 * 2**30)  # more than the job may map
        except MemoryError:
            refused = True
        else:
            refused = False
        assert refused
    assert resource.getrlimit(resource.RLIMIT_AS) == before

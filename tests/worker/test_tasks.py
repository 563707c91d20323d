"""The task plumbing that runs without a broker: the memory budget and failure reasons."""

from __future__ import annotations

import errno
import resource
from types import SimpleNamespace

import pytest

from worker.tasks import describe_failure, memory_budget


def test_memory_budget_fails_allocations_past_it_and_is_lifted_after():
    before = resource.getrlimit(resource.RLIMIT_AS)
    with memory_budget(256 * 2**20):
        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        assert soft != resource.RLIM_INFINITY and hard == before[1]
        with pytest.raises(MemoryError):
            bytearray(1024 * 2**20)
        small = bytearray(16 * 2**20)  # within the budget
        assert len(small) == 16 * 2**20
    assert resource.getrlimit(resource.RLIMIT_AS) == before
    with memory_budget(None):  # no budget configured: nothing changes
        assert resource.getrlimit(resource.RLIMIT_AS) == before


def test_memory_budget_never_raises_a_limit_already_set():
    before = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (64 * 2**30, before[1]))
    try:
        with memory_budget(10**15):
            assert resource.getrlimit(resource.RLIMIT_AS)[0] == 64 * 2**30
    finally:
        resource.setrlimit(resource.RLIMIT_AS, before)


@pytest.mark.parametrize("exc, kind, phrase", [
    (MemoryError(), "out_of_memory", "1024 MiB"),
    (RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 5 GB"), "out_of_memory", "allocate"),
    (RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"), "out_of_memory", "CUDA"),
    (OSError(errno.ENOSPC, "No space left on device"), "disk_full", "no space left"),
    (Exception("Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: \"No space left on device\" })"),
     "disk_full", "no space left"),
    (ValueError("sparsity does not fit"), "ValueError", "sparsity does not fit"),
])
def test_failures_are_named_by_what_ran_out(exc, kind, phrase):
    settings = SimpleNamespace(job_memory_limit_bytes=2**30)
    error_type, message = describe_failure(exc, settings)
    assert error_type == kind and phrase in message

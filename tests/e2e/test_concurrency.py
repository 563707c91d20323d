"""Many clients at once (issue 12): 64 and 256 connections reading a job get answers, not 5xx,
on PostgreSQL and on the embedded SQLite; 50 open event streams (more than the API's 40
threads) leave /healthz and the job's own URL answering.

Before the fix the thread pool and the connection pool starved each other: every thread
waited for a connection inside authentication while every connection belonged to a request
waiting for a thread, until the pool's 30 s timeout turned them into 500s. Nothing here times
the server: it only has to answer.
"""

from __future__ import annotations

import asyncio
from collections import Counter

import httpx
import pytest

from tests.e2e.client import submit_job
from tests.e2e.stack import ServiceStack

# Requests per key are rate limited by default; these tests are about the server's own limits.
SETTINGS = {"rate_limit_per_s": "0", "event_streams_per_key": "64", "event_streams_per_tenant": "64"}
STREAMS = 50


@pytest.fixture(scope="module", params=["postgres", "embedded"])
def busy_stack(request, tmp_path_factory):
    workdir = tmp_path_factory.mktemp(f"busy-{request.param}")
    if request.param == "postgres":
        # No worker: the job stays queued, so its event streams stay open.
        stack = ServiceStack.postgres_redis(workdir, **SETTINGS)
        stack.start(with_worker=False)
    else:
        stack = ServiceStack.embedded(workdir, **SETTINGS).start()
    try:
        stack.job_id = submit_job(stack.client, workdir / "model")["id"]
        yield stack
    finally:
        stack.stop()


async def _read_many(stack: ServiceStack, path: str, connections: int, per_connection: int) -> Counter:
    statuses: Counter = Counter()
    # A connection per request: on a crowded machine this client can take longer to send its
    # next request than the server waits on an idle keep-alive connection (5 s), and a request
    # sent as the server closes it fails in transit, which says nothing about the server.
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=stack.url, headers={"Authorization": f"Bearer {stack.admin_key}"},
                                 limits=limits, timeout=httpx.Timeout(120, pool=None)) as client:
        async def one_connection() -> None:
            for _ in range(per_connection):
                statuses[(await client.get(path)).status_code] += 1

        await asyncio.gather(*(one_connection() for _ in range(connections)))
    return statuses


@pytest.mark.parametrize("connections", [64, 256])
def test_concurrent_job_reads_all_answer(busy_stack, connections):
    per_connection = 1280 // connections
    statuses = asyncio.run(_read_many(busy_stack, f"/v1/jobs/{busy_stack.job_id}", connections, per_connection))
    assert statuses == Counter({200: connections * per_connection}), busy_stack.logs()[-3000:]


async def _while_streams_are_open(stack: ServiceStack) -> tuple[list[int], int, int, int]:
    headers = {"Authorization": f"Bearer {stack.admin_key}"}
    limits = httpx.Limits(max_connections=STREAMS + 10)
    async with httpx.AsyncClient(base_url=stack.url, headers=headers, limits=limits,
                                 timeout=httpx.Timeout(60, pool=None)) as client:
        async with asyncio.TaskGroup() as group:
            opened = asyncio.Event()
            statuses: list[int] = []

            async def hold_stream() -> None:
                async with client.stream("GET", f"/v1/jobs/{stack.job_id}/events/stream") as response:
                    statuses.append(response.status_code)
                    if len(statuses) == STREAMS:
                        opened.set()
                    await release.wait()

            release = asyncio.Event()
            tasks = [group.create_task(hold_stream()) for _ in range(STREAMS)]
            await asyncio.wait_for(opened.wait(), 120)
            # Every stream has its answer's head; now the rest of the API must still answer.
            health = (await client.get("/healthz")).status_code
            job = (await client.get(f"/v1/jobs/{stack.job_id}")).status_code
            still_open = sum(not task.done() for task in tasks)
            release.set()
    return statuses, health, job, still_open


def test_open_event_streams_leave_the_api_answering(busy_stack):
    if busy_stack.embedded_launcher:
        pytest.skip("the embedded stack's worker would finish the job, and that ends its streams")
    statuses, health, job, still_open = asyncio.run(_while_streams_are_open(busy_stack))
    assert statuses == [200] * STREAMS
    assert still_open == STREAMS  # the streams were open all along: the job is still queued
    assert (health, job) == (200, 200)

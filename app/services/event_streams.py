"""Live event streams: how many each key and tenant may hold open, and how a stream waits for
its job's next event without holding a thread or a database connection.

A waiting stream awaits an asyncio event. One task per API process asks the database every
``POLL_S`` for the newest event id of each job that a stream waits on (one short query, in a
thread), and wakes the streams behind. A woken stream reads its new events in a thread, one
short query; these reads run on at most ``READ_THREADS`` threads of their own, so 500 streams
woken at once queue there and not in the thread pool that every other request needs.

>>> async for chunk in follow(job_id, cursor=None, max_s=3600):   # "id: 7\\nevent: status\\n..."
...     ...
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
import weakref
from collections import Counter
from collections.abc import AsyncIterator, Callable
from functools import lru_cache
from typing import TypeVar

import anyio
from sqlalchemy import func, select

from app.auth import Principal
from app.config import get_settings
from app.db.models import Job, JobEvent, JobStatus
from app.db.session import read_scope
from app.errors import TooManyRequests
from app.services import events as service

log = logging.getLogger("squeeze.events")

POLL_S = 0.5
KEEPALIVE_S = 15.0
READ_THREADS = 4
PAGE = 200
# Streams are long: a slot frees up when one ends. A few seconds is a polite pace to ask again.
RETRY_AFTER_S = 5

T = TypeVar("T")
_per_loop: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _loop_local(make: Callable[[], T]) -> T:
    """One object per event loop and factory (asyncio primitives belong to one loop)."""
    objects = _per_loop.setdefault(asyncio.get_running_loop(), {})
    if make not in objects:
        objects[make] = make()
    return objects[make]


# -- caps -------------------------------------------------------------------------------------

class TooManyStreams(TooManyRequests):
    pass


class StreamSlots:
    """Open streams by key and by tenant, in this process."""

    def __init__(self, per_key: int, per_tenant: int):
        self.per_key, self.per_tenant = per_key, per_tenant
        self.by_key: Counter[str] = Counter()
        self.by_tenant: Counter[str] = Counter()
        self._lock = threading.Lock()  # test clients run one event loop per thread

    def take(self, principal: Principal) -> None:
        with self._lock:
            if self.by_key[principal.key_id] >= self.per_key:
                raise TooManyStreams(f"this API key has {self.per_key} event streams open, the most it may; "
                                     "close one or retry later", headers={"Retry-After": str(RETRY_AFTER_S)})
            if self.by_tenant[principal.tenant_id] >= self.per_tenant:
                raise TooManyStreams(f"this tenant has {self.per_tenant} event streams open, the most it may; "
                                     "close one or retry later", headers={"Retry-After": str(RETRY_AFTER_S)})
            self.by_key[principal.key_id] += 1
            self.by_tenant[principal.tenant_id] += 1

    def give_back(self, principal: Principal) -> None:
        with self._lock:
            for counter, name in ((self.by_key, principal.key_id), (self.by_tenant, principal.tenant_id)):
                counter[name] -= 1
                if counter[name] <= 0:
                    del counter[name]


@lru_cache
def slots() -> StreamSlots:
    settings = get_settings()
    return StreamSlots(settings.event_streams_per_key, settings.event_streams_per_tenant)


# -- database reads (each one short call on a thread) -------------------------------------------

def _read(job_id: str, cursor: int | None) -> tuple[list[tuple[int, str, str]], bool, bool]:
    """The events after ``cursor`` (a page), whether the job is over, whether more are left."""
    with read_scope() as session:
        # The status first: a job's final status event commits with the status, so once the
        # status reads final, the page read after it holds that event.
        job = session.get(Job, job_id)
        finished = job is None or JobStatus(job.status).is_terminal
        rows, has_more = service.page(session, job_id, after=cursor, limit=PAGE)
        return [(e.id, e.type, json.dumps(service.as_dict(e))) for e in rows], finished, has_more


def _newest(job_ids: list[str]) -> dict[str, int]:
    newest: dict[str, int] = {}
    with read_scope() as session:
        for start in range(0, len(job_ids), 500):
            chunk = job_ids[start:start + 500]
            newest.update(session.execute(select(JobEvent.job_id, func.max(JobEvent.id))
                                          .where(JobEvent.job_id.in_(chunk)).group_by(JobEvent.job_id)).all())
    return newest


def _reader_threads() -> anyio.CapacityLimiter:
    return anyio.CapacityLimiter(READ_THREADS)


async def _in_thread(function, *args):
    return await anyio.to_thread.run_sync(function, *args, limiter=_loop_local(_reader_threads))


# -- waiting for news ----------------------------------------------------------------------------

class JobWatch:
    """Streams waiting for their job's next event, and the task that polls for them."""

    def __init__(self):
        self.waiting: dict[str, list[tuple[int | None, asyncio.Event]]] = {}
        self.task: asyncio.Task | None = None

    async def wait(self, job_id: str, cursor: int | None, timeout: float) -> bool:
        """True once the job has an event past ``cursor``; False after ``timeout`` seconds."""
        entry = (cursor, asyncio.Event())
        self.waiting.setdefault(job_id, []).append(entry)
        if self.task is None:
            self.task = asyncio.get_running_loop().create_task(self._poll())
        try:
            await asyncio.wait_for(entry[1].wait(), timeout)
            return True
        except asyncio.TimeoutError:
            return False
        finally:
            waiters = self.waiting.get(job_id, [])
            waiters.remove(entry)
            if not waiters:
                self.waiting.pop(job_id, None)

    async def _poll(self) -> None:
        try:
            while self.waiting:
                await asyncio.sleep(POLL_S)
                try:
                    newest = await _in_thread(_newest, list(self.waiting))
                except Exception:  # the database is away: the streams wait, then try again
                    log.warning("polling for job events failed", exc_info=True)
                    continue
                for job_id, event_id in newest.items():
                    for cursor, woken in self.waiting.get(job_id, []):
                        if cursor is None or event_id > cursor:
                            woken.set()
        finally:
            self.task = None


def _event(event_id: int, event_type: str, data: str) -> str:
    return f"id: {event_id}\nevent: {event_type}\ndata: {data}\n\n"


async def follow(job_id: str, cursor: int | None, max_s: float) -> AsyncIterator[str]:
    """The job's events after ``cursor`` as Server-Sent Events, until the final status event
    has been sent or ``max_s`` seconds have passed; a comment every ``KEEPALIVE_S`` otherwise."""
    watch = _loop_local(JobWatch)
    deadline = time.monotonic() + max_s
    while True:
        payloads, finished, has_more = await _in_thread(_read, job_id, cursor)
        for event_id, event_type, data in payloads:
            yield _event(event_id, event_type, data)
            cursor = event_id
        if finished and not has_more:
            return  # the final status event was committed with the status: it has been sent
        if has_more:
            continue
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            yield ": this stream has reached its time limit; reopen it with Last-Event-ID\n\n"
            return
        if not await watch.wait(job_id, cursor, min(KEEPALIVE_S, remaining)):
            yield ": keep-alive\n\n"  # and read again: a deleted job ends the stream here

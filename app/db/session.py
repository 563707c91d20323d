"""Engine and sessions, built once per process from the settings.

SQLite (the embedded default) is shared by the API and the worker processes, so it runs in
WAL mode with a busy timeout: readers never block the writer and writers wait their turn.

How a request gets its database connection. Sync routes and dependencies run in a pool of 40
threads; connections come from a pool of ``POOL_SIZE + MAX_OVERFLOW``. If a request could hold a
connection while it waits for a thread (between its dependencies, its route and its response's
serialisation, each a separate trip to the thread pool), every thread could end up waiting for
a connection that only a thread-less request could give back: the two pools starve each other
and the API stalls (issue 12). So there are two kinds of connection users, and neither can
wait on the other for good:

- a request's session (``get_session``) is *admitted* before the route runs: at most
  ``ADMITTED`` requests hold one at a time (others wait on the event loop, holding nothing),
  so admitted requests never exhaust the pool. Each gives its connection back as soon as its
  route's answer is built, before the answer is sent (a long download holds none);
- everything else (authentication, idempotency records, event streams, the background threads)
  uses ``session_scope`` or ``read_scope`` inside one call on one thread and never waits for a
  thread while it holds a connection. ``RESERVED`` connections are theirs alone, so whatever the admitted
  requests hold, one of these is always running and will give its connection back.
"""

from __future__ import annotations

import asyncio
import time
import weakref
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from functools import lru_cache

import anyio
from fastapi import Depends
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.exc import DisconnectionError
from sqlalchemy.orm import Session, sessionmaker

from app.config import get_settings

POOL_SIZE = 5
MAX_OVERFLOW = 10
RESERVED = 3
ADMITTED = POOL_SIZE + MAX_OVERFLOW - RESERVED
PING_AFTER_IDLE_S = 10.0


def make_engine(url: str) -> Engine:
    pool = {"pool_size": POOL_SIZE, "max_overflow": MAX_OVERFLOW}
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30}, **pool)

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection, _record):  # pragma: no cover - trivial
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()

        return engine
    engine = create_engine(url, **pool)
    _ping_when_idle(engine)
    return engine


def _ping_when_idle(engine: Engine) -> None:
    """A connection idle for a while is pinged before use, and replaced if the server has gone
    away meanwhile (a restart, an idle timeout). ``pool_pre_ping`` does this on every checkout,
    a round trip per request on a busy server, where connections are seldom idle long."""

    @event.listens_for(engine, "checkin")
    def _checked_in(_dbapi_connection, record):
        record.info["checked_in"] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _checked_out(dbapi_connection, record, _proxy):
        if time.monotonic() - record.info.get("checked_in", time.monotonic()) > PING_AFTER_IDLE_S:
            try:
                engine.dialect.do_ping(dbapi_connection)
            except Exception as exc:  # any driver error: the pool tries a fresh connection
                raise DisconnectionError(f"idle connection is gone: {exc}") from exc


@lru_cache
def get_engine() -> Engine:
    settings = get_settings()
    if settings.database_url is None:
        settings.var_dir.mkdir(parents=True, exist_ok=True)
    return make_engine(settings.resolved_database_url)


@lru_cache
def get_sessionmaker() -> sessionmaker[Session]:
    return sessionmaker(bind=get_engine(), expire_on_commit=False)


@lru_cache
def _autocommit_sessionmaker() -> sessionmaker[Session]:
    return sessionmaker(bind=get_engine().execution_options(isolation_level="AUTOCOMMIT"),
                        expire_on_commit=False)


@contextmanager
def read_scope() -> Iterator[Session]:
    """A session for a few reads outside a request's route (authentication, event streams), on
    an autocommit connection: no BEGIN and no COMMIT round trips. Never for writes."""
    session = _autocommit_sessionmaker()()
    try:
        yield session
    finally:
        session.close()


@contextmanager
def session_scope() -> Iterator[Session]:
    """A session for code outside a request's route (the worker, authentication, background
    threads): commit on success, roll back on error. Use it within one thread call."""
    session = get_sessionmaker()()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


# One gate per event loop (the server has one; each test client runs its own).
_gates: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Semaphore] = weakref.WeakKeyDictionary()


@asynccontextmanager
async def admitted() -> AsyncIterator[None]:
    """Wait (on the event loop, holding no thread or connection) for one of ``ADMITTED`` places."""
    loop = asyncio.get_running_loop()
    gate = _gates.get(loop)
    if gate is None:
        gate = _gates[loop] = asyncio.Semaphore(ADMITTED)
    async with gate:
        yield


async def _request_session() -> AsyncIterator[Session]:
    async with admitted():
        session = get_sessionmaker()()
        try:
            yield session
        finally:
            if session.in_transaction():
                # Giving the connection back rolls it back: a round trip, so not on the event
                # loop, and on a thread of its own rather than one of the 40 (whose queue this
                # connection must not wait in).
                await anyio.to_thread.run_sync(session.close, limiter=anyio.CapacityLimiter(1))
            else:
                session.close()


async def get_session(session: Session = Depends(_request_session, scope="function")) -> Session:
    """FastAPI dependency: the request's session, admitted as described above; services commit
    explicitly. It is closed once the route's answer is built ("function" scope), before the
    answer is sent."""
    return session

"""The FastAPI application.

``uvicorn app.main:app`` serves it; ``create_app()`` builds a fresh one (tests use it).
"""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI

from app.api import datasets, events, health, jobs, keys, models, uploads
from app.config import get_settings
from app.errors import install_error_handlers
from app.idempotency import IdempotencyMiddleware
from app.limits import BodySizeLimit
from app.observability import RequestContext, configure_logging
from app.webhooks import Dispatcher

log = logging.getLogger("squeeze.api")

JSON_BODY_LIMIT = 1024 * 1024


def _body_limit(path: str) -> int:
    settings = get_settings()
    prefix = settings.api_prefix
    if path.startswith(f"{prefix}/models"):
        return settings.max_upload_bytes + JSON_BODY_LIMIT  # room for multipart framing
    if path.startswith(f"{prefix}/datasets"):
        return settings.max_dataset_bytes + JSON_BODY_LIMIT
    if path.startswith(f"{prefix}/uploads/") and "/parts/" in path:
        return settings.upload_part_max_bytes
    return JSON_BODY_LIMIT


@asynccontextmanager
async def lifespan(_: FastAPI):
    # Jobs accepted while the broker was down are delivered now.
    from app.db.session import session_scope
    from app.services.jobs import resend_unsent

    try:
        with session_scope() as session:
            sent = resend_unsent(session)
        if sent:
            log.info("re-sent %d queued jobs to the broker", sent)
    except Exception:  # startup must not fail because the broker or database is still coming up
        log.exception("could not re-send queued jobs at startup")
    dispatcher = Dispatcher() if get_settings().webhook_dispatcher else None
    if dispatcher:
        dispatcher.start()
    yield
    if dispatcher:
        dispatcher.stop()


def create_app() -> FastAPI:
    settings = get_settings()
    configure_logging(settings.log_level)
    app = FastAPI(
        title="Squeeze",
        version="0.1.0",
        summary="Compress generative Transformer language models: prune, distill, quantize.",
        lifespan=lifespan,
    )
    install_error_handlers(app)
    # Last added runs first: oversized bodies are refused before anything else reads them,
    # and every request, refused or not, gets an id, a log line and a latency observation.
    app.add_middleware(IdempotencyMiddleware)
    app.add_middleware(BodySizeLimit, limit_for_path=_body_limit)
    app.add_middleware(RequestContext)
    for router in (models.router, datasets.router, jobs.router, events.router, keys.router, uploads.router):
        app.include_router(router, prefix=settings.api_prefix)
    app.include_router(health.router)
    return app


app = create_app()

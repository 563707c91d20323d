"""The FastAPI application.

``uvicorn app.main:app`` serves it; ``create_app()`` builds a fresh one (tests use it).
"""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI

from app.api import datasets, events, health, jobs, keys, models, uploads
from app.api import web
from app.config import get_settings
from app.errors import install_error_handlers
from app.idempotency import IdempotencyMiddleware, document_idempotency
from app.limits import BodySizeLimit, StorageQuotaPrecheck, tenant_storage
from app.observability import RequestContext, configure_logging
from app.security_headers import SecurityHeaders
from app.maintenance import Reconciler
from app.ratelimit import RateLimit, document_rate_limits
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
    # Background threads: the reconciler (lost workers, jobs accepted while the broker was
    # down: its first round runs at once) and the webhook dispatcher.
    threads = [Reconciler()] + ([Dispatcher()] if get_settings().webhook_dispatcher else [])
    for thread in threads:
        thread.start()
    yield
    for thread in threads:
        thread.stop()


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
    # A one-request upload that cannot fit in its tenant's storage is refused before spooling.
    app.add_middleware(StorageQuotaPrecheck, tenant_storage=tenant_storage,
                       paths={f"{settings.api_prefix}/models": "files", f"{settings.api_prefix}/datasets": "file"})
    app.add_middleware(BodySizeLimit, limit_for_path=_body_limit, idle_timeout_s=settings.body_idle_timeout_s)
    app.add_middleware(RateLimit)  # per API key, before any work is done for the request
    app.add_middleware(RequestContext)
    # Outermost: every answer, the refused ones included, carries the browser headers.
    app.add_middleware(SecurityHeaders)
    for router in (models.router, datasets.router, jobs.router, events.router, keys.router, uploads.router):
        app.include_router(router, prefix=settings.api_prefix)
    app.include_router(health.router)
    app.include_router(web.router)  # the browser client at /ui/ (not in the OpenAPI schema)
    document_idempotency(app)  # the 403/409 a replay may answer, on every POST
    document_rate_limits(app)
    return app


app = create_app()

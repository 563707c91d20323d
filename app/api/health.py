"""Liveness and readiness probes for load balancers and orchestrators."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse, Response
from sqlalchemy import text

from app.auth import operator_principal
from app.db.session import get_engine
from app.errors import error_responses

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz() -> dict:
    """The process is up."""
    return {"status": "ok"}


@router.get("/metrics", response_class=Response, dependencies=[Depends(operator_principal)],
            responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text format"},
                       **error_responses(401, 403)})
def metrics() -> Response:
    """Prometheus metrics: request latency, jobs by status, queue depth, job duration by method.
    They count every tenant's jobs, so they need an operator key (a tenant key gets 403): give
    Prometheus one with ``authorization: {credentials_file: ...}`` in its scrape config."""
    from app.observability import metrics_payload

    body, content_type = metrics_payload()
    return Response(body, media_type=content_type)


@router.get("/readyz", responses={503: {"description": "the database or the broker is unreachable"}})
def readyz():
    """The database and the broker answer."""
    from worker.celery_app import broker_reachable

    checks = {}
    try:
        with get_engine().connect() as connection:
            connection.execute(text("SELECT 1"))
        checks["database"] = "ok"
    except Exception as exc:  # any driver error means "not ready"
        checks["database"] = f"error: {type(exc).__name__}"
    checks["broker"] = "ok" if broker_reachable() else "error: unreachable"
    ready = all(value == "ok" for value in checks.values())
    return JSONResponse({"status": "ok" if ready else "unavailable", "checks": checks}, status_code=200 if ready else 503)

"""Logs and metrics.

- Every log line is one JSON object carrying ``request_id`` (from ``X-Request-ID`` or made up,
  and echoed back in the response) and, in the worker, ``job_id``.
- ``/metrics`` (Prometheus): request latency histograms per route, and, read from the database
  at scrape time so that every API replica reports the same truth, jobs by status, queue depth
  and job durations by method. They describe every tenant, so the route needs an operator key
  (``app/api/health.py``).
"""

from __future__ import annotations

import contextvars
import json
import logging
import time
import uuid
from datetime import datetime, timezone

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily
from starlette.types import ASGIApp, Message, Receive, Scope, Send

request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)
job_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("job_id", default=None)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name, var in (("request_id", request_id_var), ("job_id", job_id_var)):
            value = getattr(record, name, None) or var.get()
            if value:
                entry[name] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def configure_logging(level: str = "INFO") -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access", "celery"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True


# -- metrics ----------------------------------------------------------------------------------

REGISTRY = CollectorRegistry()
REQUEST_LATENCY = Histogram(
    "squeeze_http_request_duration_seconds", "HTTP request latency", ["method", "route", "status"],
    registry=REGISTRY, buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
JOB_DURATION_BUCKETS = (1, 5, 15, 60, 300, 900, 3600, 4 * 3600, 12 * 3600)


class DatabaseCollector:
    """Job gauges and the duration histogram, computed from the jobs table at scrape time."""

    def collect(self):
        from sqlalchemy import func, select

        from app.db.models import Job
        from app.db.session import session_scope

        with session_scope() as session:
            by_status = dict(session.execute(select(Job.status, func.count()).group_by(Job.status)).all())
            finished = session.execute(
                select(Job.spec, Job.started_at, Job.finished_at)
                .where(Job.status == "succeeded", Job.started_at.is_not(None), Job.finished_at.is_not(None))
                .order_by(Job.finished_at.desc()).limit(10000)
            ).all()
        jobs = GaugeMetricFamily("squeeze_jobs", "Jobs by status", labels=["status"])
        for status in ("queued", "running", "succeeded", "failed", "cancelled"):
            jobs.add_metric([status], by_status.get(status, 0))
        yield jobs
        depth = GaugeMetricFamily("squeeze_queue_depth", "Jobs waiting for a worker")
        depth.add_metric([], by_status.get("queued", 0))
        yield depth

        durations: dict[str, list[float]] = {}
        for spec, started, finished_at in finished:
            for stage in spec.get("stages", []):  # a pipeline counts under each of its methods
                method = f"{stage.get('type')}.{stage.get('method')}"
                durations.setdefault(method, []).append((finished_at - started).total_seconds())
        histogram = HistogramMetricFamily("squeeze_job_duration_seconds", "Succeeded job wall time by method",
                                          labels=["method"])
        for method, values in sorted(durations.items()):
            buckets = [(str(b), sum(v <= b for v in values)) for b in JOB_DURATION_BUCKETS]
            buckets.append(("+Inf", len(values)))
            histogram.add_metric([method], buckets, sum(values))
        yield histogram


REGISTRY.register(DatabaseCollector())


def metrics_payload() -> tuple[bytes, str]:
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST


def _route_template(scope: Scope) -> str:
    """``/v1/jobs/{job_id}`` rather than the concrete path, so labels stay few."""
    if scope.get("route") is None:
        return "unmatched"
    values = {str(v): k for k, v in (scope.get("path_params") or {}).items()}
    return "/".join(f"{{{values[part]}}}" if part in values else part for part in scope["path"].split("/"))


class RequestContext:
    """Request id in and out, and one latency observation per request, by route template."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = dict(scope.get("headers") or []).get(b"x-request-id", b"").decode(errors="replace")
        request_id = incoming[:100] if incoming else uuid.uuid4().hex
        token = request_id_var.set(request_id)
        started = time.perf_counter()
        status = {"code": 500}

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                message = {**message, "headers": [*message.get("headers", []), (b"x-request-id", request_id.encode())]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            template = _route_template(scope)
            REQUEST_LATENCY.labels(scope["method"], template, str(status["code"])).observe(time.perf_counter() - started)
            logging.getLogger("squeeze.access").info(
                "%s %s %s %.1fms", scope["method"], scope["path"], status["code"], 1000 * (time.perf_counter() - started)
            )
            request_id_var.reset(token)

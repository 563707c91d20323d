"""/v1/jobs/{id}/events: the job's log, as pages or as a Server-Sent Events stream."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

from fastapi import APIRouter, Depends, Header, Query
from fastapi.responses import StreamingResponse
from sqlalchemy.orm import Session

from app.auth import Principal, current_principal
from app.db.models import Job, JobStatus
from app.db.session import get_session, session_scope
from app.errors import error_responses
from app.schemas import JobEventOut, Page, WebhookDeliveryOut
from app.services import events as service
from app.services.jobs import get_job
from app.webhooks import deliveries_for

router = APIRouter(prefix="/jobs", tags=["jobs"], responses=error_responses(401, 404))

POLL_S = 0.5
KEEPALIVE_S = 15.0
MAX_STREAM_S = 6 * 3600


@router.get("/{job_id}/events", response_model=Page[JobEventOut], responses=error_responses(422))
def list_events(
    job_id: str,
    after: int | None = Query(default=None, ge=0, description="id of the last event already seen"),
    limit: int = Query(default=100, ge=1, le=1000),
    principal: Principal = Depends(current_principal),
    session: Session = Depends(get_session),
):
    """The job's log, oldest first: status changes, stages, progress, metrics, warnings, errors."""
    get_job(session, principal.tenant_id, job_id)
    rows, has_more = service.page(session, job_id, after=after, limit=limit)
    return {"data": [service.as_dict(e) for e in rows], "has_more": has_more}


@router.get(
    "/{job_id}/events/stream",
    response_class=StreamingResponse,
    responses={200: {"content": {"text/event-stream": {}},
                     "description": "`id:`, `event:` (the event type) and `data:` (the event as JSON) "
                                    "per event; the stream ends after the job's final status."},
               **error_responses(422)},
)
def stream_events(
    job_id: str,
    after: int | None = Query(default=None, ge=0, description="resume after this event id"),
    last_event_id: str | None = Header(default=None, description="set by EventSource on reconnect"),
    principal: Principal = Depends(current_principal),
    session: Session = Depends(get_session),
):
    """Server-Sent Events until the job ends. Reconnecting with ``Last-Event-ID`` resumes."""
    get_job(session, principal.tenant_id, job_id)
    cursor = after if after is not None else (int(last_event_id) if (last_event_id or "").isdigit() else None)
    return StreamingResponse(_events(job_id, cursor), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


@router.get("/{job_id}/webhook-deliveries", response_model=Page[WebhookDeliveryOut])
def list_webhook_deliveries(
    job_id: str, principal: Principal = Depends(current_principal), session: Session = Depends(get_session)
):
    """Every webhook delivery of the job, with each attempt's status code or error."""
    get_job(session, principal.tenant_id, job_id)
    return {"data": deliveries_for(session, job_id), "has_more": False}


def _events(job_id: str, cursor: int | None) -> Iterator[str]:
    started = last_sent = time.monotonic()
    while time.monotonic() - started < MAX_STREAM_S:
        with session_scope() as session:
            rows, has_more = service.page(session, job_id, after=cursor, limit=200)
            job = session.get(Job, job_id)
            finished = job is None or JobStatus(job.status).is_terminal
            payloads = [(e.id, e.type, json.dumps(service.as_dict(e))) for e in rows]
        for event_id, event_type, data in payloads:
            yield f"id: {event_id}\nevent: {event_type}\ndata: {data}\n\n"
            cursor = event_id
            last_sent = time.monotonic()
        if finished and not has_more:
            return  # the final status event was committed with the status: it has been sent
        if time.monotonic() - last_sent > KEEPALIVE_S:
            yield ": keep-alive\n\n"
            last_sent = time.monotonic()
        if not has_more:
            time.sleep(POLL_S)

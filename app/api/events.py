"""/v1/jobs/{id}/events: the job's log, as pages or as a Server-Sent Events stream."""

from __future__ import annotations

from collections.abc import AsyncIterator

from fastapi import APIRouter, Depends, Header, Query
from fastapi.responses import StreamingResponse
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from app.auth import Principal, current_principal
from app.config import get_settings
from app.db.session import get_session, read_scope
from app.errors import error_responses
from app.schemas import JobEventOut, Page, WebhookDeliveryOut
from app.services import event_streams as streams
from app.services import events as service
from app.services.jobs import get_job
from app.webhooks import deliveries_for

router = APIRouter(prefix="/jobs", tags=["jobs"], responses=error_responses(401, 404))


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


async def stream_slot(principal: Principal = Depends(current_principal)) -> AsyncIterator[Principal]:
    """One of the caller's open-stream places, held until the response has been sent."""
    streams.slots().take(principal)
    try:
        yield principal
    finally:
        streams.slots().give_back(principal)


def _check_job(tenant_id: str, job_id: str) -> None:
    with read_scope() as session:
        get_job(session, tenant_id, job_id)  # 404 for a job of another tenant


@router.get(
    "/{job_id}/events/stream",
    response_class=StreamingResponse,
    responses={200: {"content": {"text/event-stream": {}},
                     "description": "`id:`, `event:` (the event type) and `data:` (the event as JSON) "
                                    "per event, a `: keep-alive` comment when nothing happened for a while; "
                                    "the stream ends after the job's final status, or after "
                                    "`SQUEEZE_EVENT_STREAM_MAX_S` (reopen it with `Last-Event-ID`)."},
               429: {**error_responses(429)[429],
                     "description": "The key or its tenant has as many event streams open as it may.",
                     "headers": {"Retry-After": {"description": "Seconds to wait before asking again.",
                                                 "schema": {"type": "integer"}}}},
               **error_responses(422)},
)
async def stream_events(
    job_id: str,
    after: int | None = Query(default=None, ge=0, description="resume after this event id"),
    last_event_id: str | None = Header(default=None, description="set by EventSource on reconnect"),
    principal: Principal = Depends(stream_slot),
):
    """Server-Sent Events until the job ends. Reconnecting with ``Last-Event-ID`` resumes.

    A waiting stream holds no server thread; each key and each tenant may hold only so many
    open (``SQUEEZE_EVENT_STREAMS_PER_KEY``, ``SQUEEZE_EVENT_STREAMS_PER_TENANT``)."""
    await run_in_threadpool(_check_job, principal.tenant_id, job_id)
    cursor = after if after is not None else (int(last_event_id) if (last_event_id or "").isdigit() else None)
    return StreamingResponse(streams.follow(job_id, cursor, get_settings().event_stream_max_s),
                             media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


@router.get("/{job_id}/webhook-deliveries", response_model=Page[WebhookDeliveryOut])
def list_webhook_deliveries(
    job_id: str, principal: Principal = Depends(current_principal), session: Session = Depends(get_session)
):
    """Every webhook delivery of the job, with each attempt's status code or error."""
    get_job(session, principal.tenant_id, job_id)
    return {"data": deliveries_for(session, job_id), "has_more": False}

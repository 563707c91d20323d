"""/v1/jobs: submit, watch, cancel, download."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Depends, Request
from fastapi.responses import FileResponse, Response
from sqlalchemy.orm import Session

from app.api.common import ListQuery, list_query
from app.auth import Principal, current_principal
from app.db import repositories
from app.db.models import Job, JobStatus
from app.db.session import get_session
from app.errors import Conflict, NotFound, error_responses
from app.schemas import JobOut, Page
from app.services import jobs as service
from app.specs import JobSpec
from app.config import get_settings
from app.storage import Storage, get_store
from app.storage.http import object_response

router = APIRouter(prefix="/jobs", tags=["jobs"], responses=error_responses(401))


def job_out(job: Job, request: Request) -> dict:
    artifact = None
    if job.status == JobStatus.SUCCEEDED.value and job.artifact_sha256:
        artifact = {
            "format": job.artifact_format,
            "size_bytes": job.artifact_size_bytes,
            "sha256": job.artifact_sha256,
            "url": str(request.url_for("download_artifact", job_id=job.id)),
        }
    error = {"type": job.error_type, "message": job.error_message or ""} if job.error_type else None
    return {
        "id": job.id, "model_id": job.model_id, "status": job.status, "stage": job.stage_name,
        "stage_index": job.stage_index, "progress": job.progress,
        "cancel_requested": job.cancel_requested, "attempts": job.attempts, "spec": job.spec,
        "error": error, "metrics": job.metrics, "estimate": job.estimate, "artifact": artifact,
        "metadata": job.metadata_ or {},
        "created_at": job.created_at, "started_at": job.started_at, "finished_at": job.finished_at,
    }


@router.post("", status_code=201, response_model=JobOut, responses=error_responses(400, 404, 409, 422, 429))
def create_job(
    spec: JobSpec,
    request: Request,
    principal: Principal = Depends(current_principal),
    session: Session = Depends(get_session),
):
    """Queue a compression job. Stages run in order; see ``JobSpec`` for every method."""
    return job_out(service.create_job(session, principal.tenant_id, spec), request)


@router.get("", response_model=Page[JobOut], responses=error_responses(422))
def list_jobs(
    request: Request,
    query: ListQuery = Depends(list_query),
    status: Literal["queued", "running", "succeeded", "failed", "cancelled"] | None = None,
    model_id: str | None = None,
    principal: Principal = Depends(current_principal),
    session: Session = Depends(get_session),
):
    rows, has_more = repositories.page(
        session, Job, tenant_id=principal.tenant_id, status=status, model_id=model_id, **query.filters()
    )
    return {"data": [job_out(job, request) for job in rows], "has_more": has_more}


@router.get("/{job_id}", response_model=JobOut, responses=error_responses(404))
def get_job(
    job_id: str,
    request: Request,
    principal: Principal = Depends(current_principal),
    session: Session = Depends(get_session),
):
    return job_out(service.get_job(session, principal.tenant_id, job_id), request)


@router.post("/{job_id}/cancel", response_model=JobOut, responses=error_responses(404, 409, 422))
def cancel_job(
    job_id: str,
    request: Request,
    principal: Principal = Depends(current_principal),
    session: Session = Depends(get_session),
):
    """Queued: cancelled at once. Running: stops at the next layer or step. Finished: 409."""
    return job_out(service.cancel_job(session, principal.tenant_id, job_id), request)


ARTIFACT_RESPONSES = {
    200: {
        "content": {"application/x-tar": {}},
        "description": "A tar of the compressed model's `save_pretrained` folder. Headers: "
        "`Content-Length`, `X-Checksum-SHA256` (hex), `ETag`, `Accept-Ranges`.",
    },
    206: {"content": {"application/x-tar": {}}, "description": "The requested byte range."},
    304: {"description": "`If-None-Match` matched the ETag."},
    307: {"description": "With `SQUEEZE_STORAGE_PRESIGN_DOWNLOADS` and an object store: a presigned URL of the "
          "artifact in the store (`Location`), valid `SQUEEZE_STORAGE_PRESIGN_TTL_S` seconds; the checksum "
          "headers come with it."},
    416: {"description": "The range starts past the end of the file."},
    **error_responses(404, 409),
}


@router.get(
    "/{job_id}/artifact",
    operation_id="download_artifact",
    response_class=FileResponse,
    responses=ARTIFACT_RESPONSES,
)
def download_artifact(
    job_id: str,
    request: Request,
    principal: Principal = Depends(current_principal),
    session: Session = Depends(get_session),
    store: Storage = Depends(get_store),
):
    """Download the artifact; supports ``HEAD``, ``Range`` and ``If-None-Match``."""
    job = service.get_job(session, principal.tenant_id, job_id)
    if job.status != JobStatus.SUCCEEDED.value or not job.artifact_key:
        raise Conflict(f"job {job_id!r} is {job.status}; its artifact exists once it succeeded", param="job_id")
    etag = f'"{job.artifact_sha256}"'
    if etag in [tag.strip() for tag in request.headers.get("if-none-match", "").split(",")]:
        return Response(status_code=304, headers={"ETag": etag})
    settings = get_settings()
    try:
        return object_response(
            store, f"artifacts/{job.artifact_key}", request, filename=f"{job_id}.tar", media_type="application/x-tar",
            headers={"X-Checksum-SHA256": job.artifact_sha256 or "", "ETag": etag}, etag=etag,
            presign_ttl_s=settings.storage_presign_ttl_s if settings.storage_presign_downloads else None,
        )
    except FileNotFoundError:
        raise NotFound(f"artifact of job {job_id!r} is missing from storage", param="job_id") from None


# HEAD answers the same headers without the body (size and checksum before a download).
router.add_api_route("/{job_id}/artifact", download_artifact, methods=["HEAD"], operation_id="head_artifact",
                     response_class=FileResponse, responses=ARTIFACT_RESPONSES)

"""/v1/uploads: resumable uploads of large checkpoints and datasets."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from fastapi import APIRouter, Depends, Path, Request
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from app.api.common import NAME_PATTERN
from app.auth import Principal, current_principal
from app.db.models import Upload
from app.db.session import get_session, session_scope
from app.errors import error_responses
from app.services import uploads as service
from app.specs import Metadata, RequestModel
from app.storage import Storage, get_store

router = APIRouter(prefix="/uploads", tags=["uploads"], responses=error_responses(401))


class UploadCreate(RequestModel):

    filename: str = Field(min_length=1, max_length=255, description="model.tar.gz, or data.jsonl for a dataset")
    size_bytes: int = Field(ge=1, description="the whole file's size")
    purpose: Literal["model", "dataset"]
    part_size: int = Field(default=8 * 1024 * 1024, ge=1024, description="bytes per part, except the last")


class UploadComplete(RequestModel):

    sha256: str = Field(pattern=r"^[0-9a-fA-F]{64}$", description="of the whole file; verified before use")
    name: str | None = Field(default=None, max_length=200, pattern=NAME_PATTERN,
                             description="the model's or dataset's name, as in POST /v1/models")
    metadata: Metadata = Field(default_factory=dict)


class PartOut(BaseModel):
    part_number: int
    size_bytes: int
    sha256: str


class UploadOut(BaseModel):
    id: str
    object: Literal["upload"] = "upload"
    filename: str
    purpose: Literal["model", "dataset"]
    size_bytes: int
    part_size: int
    parts_expected: int
    status: Literal["pending", "completing", "completed", "aborted", "expired"]
    parts: list[PartOut]
    model_id: str | None = None
    dataset_id: str | None = None
    created_at: datetime
    expires_at: datetime


def upload_out(session: Session, upload: Upload) -> dict:
    result_field = "model_id" if upload.purpose == "model" else "dataset_id"
    return {
        "id": upload.id, "filename": upload.filename, "purpose": upload.purpose, "size_bytes": upload.size_bytes,
        "part_size": upload.part_size, "parts_expected": service.expected_parts(upload), "status": upload.status,
        "parts": [{"part_number": p.part_number, "size_bytes": p.size_bytes, "sha256": p.sha256}
                  for p in service.parts_of(session, upload.id)],
        result_field: upload.result_id, "created_at": upload.created_at, "expires_at": upload.expires_at,
    }


@router.post("", status_code=201, response_model=UploadOut, responses=error_responses(400, 409, 413, 422, 429))
def create_upload(body: UploadCreate, principal: Principal = Depends(current_principal),
                  session: Session = Depends(get_session), store: Storage = Depends(get_store)):
    """Start a resumable upload; then PUT its parts and complete it.

    From now until it is completed, aborted or expired, its ``size_bytes`` counts against the
    tenant's storage limit (413 when it cannot fit), and a tenant has at most
    ``SQUEEZE_MAX_PENDING_UPLOADS_PER_TENANT`` pending uploads (429 past that)."""
    upload = service.create_upload(session, store, principal.tenant_id, body.filename, body.size_bytes,
                                   body.purpose, body.part_size)
    return upload_out(session, upload)


@router.get("/{upload_id}", response_model=UploadOut, responses=error_responses(404))
def get_upload(upload_id: str, principal: Principal = Depends(current_principal),
               session: Session = Depends(get_session)):
    """Which parts have arrived: a client resuming after a crash sends the others."""
    return upload_out(session, service.get_upload(session, principal.tenant_id, upload_id))


@router.put(
    "/{upload_id}/parts/{part_number}", response_model=PartOut,
    responses=error_responses(400, 404, 409, 413, 422),
    openapi_extra={"requestBody": {"required": True, "content": {"application/octet-stream": {
        "schema": {"type": "string", "format": "binary"}}}}},
)
async def put_part(request: Request, upload_id: str, part_number: int = Path(ge=1, le=service.MAX_PARTS),
                   principal: Principal = Depends(current_principal), store: Storage = Depends(get_store)):
    """Send part ``part_number`` (1-based) as the raw request body. Sending it again replaces it."""
    with session_scope() as session:
        upload = service.get_upload(session, principal.tenant_id, upload_id)
        writer = service.PartWriter(store, upload, part_number)
    try:
        # Chunk by chunk to disk, the file work in a thread: the event loop never blocks.
        async for chunk in request.stream():
            await run_in_threadpool(writer.write, chunk)
        temporary, size, sha256 = await run_in_threadpool(writer.finish)
    except BaseException:
        writer.discard()
        raise
    return await run_in_threadpool(_save, principal.tenant_id, upload_id, store, part_number, temporary, size, sha256)


def _save(tenant_id, upload_id, store, part_number, temporary, size, sha256) -> dict:
    with session_scope() as session:
        upload = service.get_upload(session, tenant_id, upload_id)
        part = service.save_part(session, store, upload, part_number, temporary, size, sha256)
        return {"part_number": part.part_number, "size_bytes": part.size_bytes, "sha256": part.sha256}


@router.post("/{upload_id}/complete", status_code=201, response_model=UploadOut,
             responses=error_responses(400, 404, 409, 413, 422))
def complete_upload(upload_id: str, body: UploadComplete, principal: Principal = Depends(current_principal),
                    session: Session = Depends(get_session), store: Storage = Depends(get_store)):
    """Assemble the parts, check the sha256, and validate the file as a model or dataset upload."""
    upload = service.get_upload(session, principal.tenant_id, upload_id)
    upload = service.complete_upload(session, store, upload, body.sha256, body.name, body.metadata)
    return upload_out(session, upload)


@router.delete("/{upload_id}", response_model=UploadOut, responses=error_responses(404, 409))
def abort_upload(upload_id: str, principal: Principal = Depends(current_principal),
                 session: Session = Depends(get_session), store: Storage = Depends(get_store)):
    upload = service.get_upload(session, principal.tenant_id, upload_id)
    return upload_out(session, service.abort_upload(session, store, upload))

"""/v1/datasets: text for calibration, evaluation and distillation."""

from __future__ import annotations

from fastapi import APIRouter, Depends, File, Form, UploadFile
from sqlalchemy.orm import Session

from app.api.common import NAME_PATTERN, ListQuery, list_query, parse_metadata_form
from app.auth import Principal, current_principal
from app.db import repositories
from app.db.models import Dataset
from app.db.session import get_session
from app.errors import error_responses
from app.schemas import DatasetOut, Deleted, Page
from app.services import datasets as service
from app.storage import Storage, get_store

router = APIRouter(prefix="/datasets", tags=["datasets"], responses=error_responses(401))


@router.post("", status_code=201, response_model=DatasetOut, responses=error_responses(400, 409, 413, 422))
def upload_dataset(
    file: UploadFile = File(description='a UTF-8 .txt file, or .jsonl with {"text": ...} per line'),
    name: str | None = Form(default=None, max_length=200, pattern=NAME_PATTERN),
    metadata: str | None = Form(default=None, description="JSON object of strings"),
    principal: Principal = Depends(current_principal),
    session: Session = Depends(get_session),
    store: Storage = Depends(get_store),
) -> Dataset:
    """``curl -H "Authorization: Bearer $KEY" -F file=@wiki.txt .../v1/datasets``"""
    tags = parse_metadata_form(metadata)
    return service.create_dataset(session, store, principal.tenant_id, file.filename, file.file, name, tags)


@router.get("", response_model=Page[DatasetOut], responses=error_responses(422))
def list_datasets(
    query: ListQuery = Depends(list_query),
    principal: Principal = Depends(current_principal),
    session: Session = Depends(get_session),
):
    rows, has_more = repositories.page(session, Dataset, tenant_id=principal.tenant_id, **query.filters())
    return {"data": rows, "has_more": has_more}


@router.get("/{dataset_id}", response_model=DatasetOut, responses=error_responses(404))
def get_dataset(
    dataset_id: str, principal: Principal = Depends(current_principal), session: Session = Depends(get_session)
) -> Dataset:
    return service.get_dataset(session, principal.tenant_id, dataset_id)


@router.delete("/{dataset_id}", response_model=Deleted, responses=error_responses(404, 409))
def delete_dataset(
    dataset_id: str,
    principal: Principal = Depends(current_principal),
    session: Session = Depends(get_session),
    store: Storage = Depends(get_store),
):
    service.delete_dataset(session, store, principal.tenant_id, dataset_id)
    return {"id": dataset_id, "object": "dataset"}

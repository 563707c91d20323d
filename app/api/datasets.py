"""/v1/datasets: text for calibration and evaluation."""

from __future__ import annotations

from fastapi import APIRouter, Depends, File, Form, Query, UploadFile
from sqlalchemy.orm import Session

from app.db import repositories
from app.db.models import Dataset
from app.db.session import get_session
from app.errors import error_responses
from app.schemas import DatasetOut, Deleted, Page
from app.services import datasets as service
from app.storage import LocalStore, get_store

router = APIRouter(prefix="/datasets", tags=["datasets"])


@router.post("", status_code=201, response_model=DatasetOut, responses=error_responses(400, 413, 422))
def upload_dataset(
    file: UploadFile = File(description='a UTF-8 .txt file, or .jsonl with {"text": ...} per line'),
    name: str | None = Form(default=None, max_length=200),
    session: Session = Depends(get_session),
    store: LocalStore = Depends(get_store),
) -> Dataset:
    """``curl -F file=@wiki.txt .../v1/datasets``"""
    return service.create_dataset(session, store, file.filename, file.file, name)


@router.get("", response_model=Page[DatasetOut], responses=error_responses(422))
def list_datasets(
    limit: int = Query(default=20, ge=1, le=100),
    after: str | None = Query(default=None, description="id of the last item of the previous page"),
    session: Session = Depends(get_session),
):
    rows, has_more = repositories.page(session, Dataset, limit=limit, after=after)
    return {"data": rows, "has_more": has_more}


@router.get("/{dataset_id}", response_model=DatasetOut, responses=error_responses(404))
def get_dataset(dataset_id: str, session: Session = Depends(get_session)) -> Dataset:
    return service.get_dataset(session, dataset_id)


@router.delete("/{dataset_id}", response_model=Deleted, responses=error_responses(404, 409))
def delete_dataset(
    dataset_id: str, session: Session = Depends(get_session), store: LocalStore = Depends(get_store)
):
    service.delete_dataset(session, store, dataset_id)
    return {"id": dataset_id, "object": "dataset"}

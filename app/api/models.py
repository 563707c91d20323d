"""/v1/models: upload, list, read and delete checkpoints."""

from __future__ import annotations

from fastapi import APIRouter, Depends, File, Form, UploadFile
from sqlalchemy.orm import Session

from app.api.common import NAME_PATTERN, ListQuery, list_query, parse_metadata_form
from app.auth import Principal, current_principal
from app.db import repositories
from app.db.models import Model
from app.db.session import get_session
from app.errors import error_responses
from app.schemas import Deleted, ModelOut, Page
from app.services import models as service
from app.storage import Storage, get_store

router = APIRouter(prefix="/models", tags=["models"], responses=error_responses(401))


@router.post("", status_code=201, response_model=ModelOut, responses=error_responses(400, 409, 413, 422))
def upload_model(
    files: list[UploadFile] = File(
        description="The files `save_pretrained` writes (config.json, *.safetensors, tokenizer "
        "files), or one .zip / .tar / .tar.gz holding them"
    ),
    name: str | None = Form(default=None, max_length=200, pattern=NAME_PATTERN),
    metadata: str | None = Form(default=None, description='JSON object of strings, e.g. {"team": "search"}'),
    principal: Principal = Depends(current_principal),
    session: Session = Depends(get_session),
    store: Storage = Depends(get_store),
) -> Model:
    """Upload a Hugging Face checkpoint. It is validated before it is accepted: safetensors
    weights only (pickle files are refused), no code, no ``auto_map``, a supported causal LM
    whose tensors match its config.

    ``curl -H "Authorization: Bearer $KEY" -F files=@config.json -F files=@model.safetensors .../v1/models``
    """
    tags = parse_metadata_form(metadata)
    uploads = [(f.filename or "", f.file) for f in files]
    return service.create_model(session, store, principal.tenant_id, uploads, name, tags)


@router.get("", response_model=Page[ModelOut], responses=error_responses(422))
def list_models(
    query: ListQuery = Depends(list_query),
    principal: Principal = Depends(current_principal),
    session: Session = Depends(get_session),
):
    rows, has_more = repositories.page(session, Model, tenant_id=principal.tenant_id, **query.filters())
    return {"data": rows, "has_more": has_more}


@router.get("/{model_id}", response_model=ModelOut, responses=error_responses(404))
def get_model(
    model_id: str, principal: Principal = Depends(current_principal), session: Session = Depends(get_session)
) -> Model:
    return service.get_model(session, principal.tenant_id, model_id)


@router.delete("/{model_id}", response_model=Deleted, responses=error_responses(404, 409))
def delete_model(
    model_id: str,
    principal: Principal = Depends(current_principal),
    session: Session = Depends(get_session),
    store: Storage = Depends(get_store),
):
    service.delete_model(session, store, principal.tenant_id, model_id)
    return {"id": model_id, "object": "model"}

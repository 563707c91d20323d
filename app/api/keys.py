"""/v1/api-keys: admins create, list and revoke keys. The first admin key comes from the CLI
(``python -m app.admin create-key --admin``)."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.auth import Principal, admin_principal
from app.db.models import ApiKey
from app.db.session import get_session
from app.errors import error_responses
from app.schemas import ApiKeyCreate, ApiKeyCreated, ApiKeyOut, Page
from app.services import keys as service

router = APIRouter(prefix="/api-keys", tags=["api-keys"], responses=error_responses(401, 403))


@router.post("", status_code=201, response_model=ApiKeyCreated, responses=error_responses(409, 422))
def create_key(
    body: ApiKeyCreate, _: Principal = Depends(admin_principal), session: Session = Depends(get_session)
):
    """Create a key for a tenant (the tenant is created if new). The secret is in this answer
    only."""
    key, secret = service.create_key(session, body.tenant, body.name, body.admin)
    return {**ApiKeyOut.model_validate(key).model_dump(), "key": secret}


@router.get("", response_model=Page[ApiKeyOut])
def list_keys(_: Principal = Depends(admin_principal), session: Session = Depends(get_session)):
    keys = session.scalars(select(ApiKey).order_by(ApiKey.created_at.desc())).all()
    return {"data": keys, "has_more": False}


@router.delete("/{key_id}", response_model=ApiKeyOut, responses=error_responses(404, 409))
def revoke_key(key_id: str, _: Principal = Depends(admin_principal), session: Session = Depends(get_session)):
    """Revoke a key: it stops working at once. The record stays, for audit."""
    return service.revoke_key(session, key_id)

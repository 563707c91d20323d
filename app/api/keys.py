"""/v1/api-keys: an admin key manages its own tenant's keys; an operator key manages every
tenant's. Tenants and their first key come from the CLI on the server
(``python -m app.admin create-key --tenant acme --scope admin``)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Response
from sqlalchemy.orm import Session

from app.auth import Principal, admin_principal
from app.db.session import get_session
from app.errors import error_responses
from app.schemas import ApiKeyCreate, ApiKeyCreated, ApiKeyOut, Page
from app.services import keys as service

router = APIRouter(prefix="/api-keys", tags=["api-keys"], responses=error_responses(401, 403))


@router.post("", status_code=201, response_model=ApiKeyCreated, responses=error_responses(409, 422))
def create_key(body: ApiKeyCreate, response: Response, caller: Principal = Depends(admin_principal),
               session: Session = Depends(get_session)):
    """Create a key, for the caller's own tenant unless the caller is an operator (403 when an
    admin names another tenant). The secret is in this answer only: it is sent with
    ``Cache-Control: no-store``, and a retry with the same ``Idempotency-Key`` gets a 409 naming
    the key that was made, never the secret again."""
    key, secret = service.create_key_as(session, caller, body.tenant, body.name, body.scope)
    response.headers["Cache-Control"] = "no-store"  # also tells the idempotency layer not to keep it
    return {**ApiKeyOut.model_validate(key).model_dump(), "key": secret}


@router.get("", response_model=Page[ApiKeyOut])
def list_keys(caller: Principal = Depends(admin_principal), session: Session = Depends(get_session)):
    """The caller's tenant's keys (an operator's: every tenant's), newest first, without secrets."""
    return {"data": service.list_keys(session, caller), "has_more": False}


@router.delete("/{key_id}", response_model=ApiKeyOut, responses=error_responses(404, 409))
def revoke_key(key_id: str, caller: Principal = Depends(admin_principal), session: Session = Depends(get_session)):
    """Revoke a key: it stops working at once. The record stays, for audit. Another tenant's
    key is 404 to a tenant admin, as if it did not exist; an operator key is revoked by an
    operator only (403)."""
    return service.revoke_key(session, caller, key_id)

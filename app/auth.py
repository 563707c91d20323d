"""API keys: ``Authorization: Bearer sqz_...``. Each key acts for one tenant; every object is
looked up within that tenant, so another tenant's id is simply not found (404, never 403).

A key has one scope:

- ``member``: the tenant's models, datasets, uploads and jobs;
- ``admin``: also the tenant's own keys at ``/v1/api-keys`` (never another tenant's);
- ``operator``: every tenant's keys (and so new tenants) and ``/metrics``. Only the server-side
  CLI grants it; no request to the API can mint an operator key.

A tenant and its first key come from the CLI, run by the operator on the server::

    python -m app.admin create-key --tenant acme --name ops --scope admin
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass

from fastapi import Depends, Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.db.models import ApiKey
from app.db.session import read_scope
from app.errors import APIError

KEY_PREFIX = "sqz_"
SCOPES = ("member", "admin", "operator")  # each allows all that the ones before it do


class Unauthenticated(APIError):
    status_code = 401
    error_type = "authentication_error"


class Forbidden(APIError):
    status_code = 403
    error_type = "permission_error"


@dataclass(frozen=True)
class Principal:
    """Who is calling: the tenant every query is scoped to, and what its key's scope allows."""

    tenant_id: str
    key_id: str
    scope: str = "member"

    @property
    def is_admin(self) -> bool:
        return self.scope in ("admin", "operator")

    @property
    def is_operator(self) -> bool:
        return self.scope == "operator"


def new_secret() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def principal_for(session: Session, authorization: str | None) -> Principal:
    if not authorization:
        raise Unauthenticated("missing API key: send 'Authorization: Bearer <key>'")
    scheme, _, secret = authorization.partition(" ")
    if scheme.lower() != "bearer" or not secret.startswith(KEY_PREFIX):
        raise Unauthenticated("malformed Authorization header: expected 'Bearer sqz_...'")
    key = session.scalar(select(ApiKey).where(ApiKey.secret_sha256 == hash_secret(secret.strip())))
    if key is None or key.revoked_at is not None:
        raise Unauthenticated("invalid or revoked API key")
    return Principal(tenant_id=key.tenant_id, key_id=key.id, scope=key.scope)


# Declares the scheme in the OpenAPI document; the check itself is ours (clear 401 envelopes).
bearer = HTTPBearer(auto_error=False, description="an API key: `Authorization: Bearer sqz_...`")


def current_principal(
    request: Request, _credentials: HTTPAuthorizationCredentials | None = Security(bearer)
) -> Principal:
    # A session of its own, closed before the route runs: the lookup never holds a connection
    # while the request waits for a thread (see app/db/session.py).
    with read_scope() as session:
        principal = principal_for(session, request.headers.get("authorization"))
    request.state.principal = principal  # for logs and idempotency
    return principal


def admin_principal(principal: Principal = Depends(current_principal)) -> Principal:
    if not principal.is_admin:
        raise Forbidden("this needs an admin key")
    return principal


def operator_principal(principal: Principal = Depends(current_principal)) -> Principal:
    if not principal.is_operator:
        raise Forbidden("this needs an operator key (python -m app.admin create-key --scope operator)")
    return principal

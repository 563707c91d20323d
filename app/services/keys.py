"""API keys and the tenants they belong to.

Who may do what (the scopes are in ``app/auth.py``):

- the operator (the CLI on the server, or an operator key) creates tenants and keys for any of
  them, lists and revokes any key;
- a tenant admin creates, lists and revokes its own tenant's keys only. Another tenant's key
  is "not found" to it (404, as for any object of another tenant), never "forbidden", so that
  an id does not tell whether it exists.
"""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.auth import Forbidden, Principal, hash_secret, new_secret
from app.db.models import ApiKey, Tenant, new_id, utcnow
from app.errors import Conflict, NotFound


def tenant_named(session: Session, name: str) -> Tenant:
    """The tenant called ``name``, created on first use."""
    tenant = session.scalar(select(Tenant).where(Tenant.name == name))
    if tenant is None:
        tenant = Tenant(id=new_id("ten"), name=name)
        session.add(tenant)
        session.flush()
    return tenant


def create_key(session: Session, tenant_name: str, name: str, scope: str) -> tuple[ApiKey, str]:
    """The operator's way (no check here: the CLI runs on the server). Returns the stored key
    and its secret; the secret is never retrievable again."""
    tenant = tenant_named(session, tenant_name)
    secret = new_secret()
    key = ApiKey(id=new_id("key"), tenant_id=tenant.id, name=name, prefix=secret[:12],
                 secret_sha256=hash_secret(secret), scope=scope)
    session.add(key)
    session.commit()
    return key, secret


def create_key_as(session: Session, caller: Principal, tenant_name: str | None, name: str,
                  scope: str) -> tuple[ApiKey, str]:
    """A key made through the API. A tenant admin names no tenant, or its own; the check comes
    before ``tenant_named``, which would otherwise create the tenant it names. The answer is the
    same whether the other tenant exists or not."""
    if scope == "operator":  # the request schema refuses it too; this is the rule, not the form
        raise Forbidden("operator keys are created on the server: python -m app.admin", param="scope")
    if tenant_name is None:
        tenant_name = session.get(Tenant, caller.tenant_id).name
    elif not caller.is_operator:
        own = session.get(Tenant, caller.tenant_id)
        if own is None or own.name != tenant_name:
            raise Forbidden("an admin key creates keys for its own tenant only; leave 'tenant' out",
                            param="tenant")
    return create_key(session, tenant_name, name, scope)


def list_keys(session: Session, caller: Principal) -> list[ApiKey]:
    query = select(ApiKey).order_by(ApiKey.created_at.desc())
    if not caller.is_operator:
        query = query.where(ApiKey.tenant_id == caller.tenant_id)
    return list(session.scalars(query))


def revoke_key(session: Session, caller: Principal, key_id: str) -> ApiKey:
    key = session.get(ApiKey, key_id) if "\x00" not in key_id else None
    if key is None or (not caller.is_operator and key.tenant_id != caller.tenant_id):
        raise NotFound(f"no API key {key_id!r}", param="key_id")
    if key.scope == "operator" and not caller.is_operator:
        # Seen in its tenant's listing, so no secret is kept by hiding it: a plain 403.
        raise Forbidden("an operator key is revoked by an operator", param="key_id")
    if key.revoked_at is not None:
        raise Conflict(f"API key {key_id!r} is already revoked", param="key_id")
    key.revoked_at = utcnow()
    session.commit()
    return key

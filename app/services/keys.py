"""API keys and the tenants they belong to."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.auth import hash_secret, new_secret
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


def create_key(session: Session, tenant_name: str, name: str, admin: bool) -> tuple[ApiKey, str]:
    """Returns the stored key and its secret; the secret is never retrievable again."""
    tenant = tenant_named(session, tenant_name)
    secret = new_secret()
    key = ApiKey(id=new_id("key"), tenant_id=tenant.id, name=name, prefix=secret[:12],
                 secret_sha256=hash_secret(secret), is_admin=admin)
    session.add(key)
    session.commit()
    return key, secret


def revoke_key(session: Session, key_id: str) -> ApiKey:
    key = session.get(ApiKey, key_id) if "\x00" not in key_id else None
    if key is None:
        raise NotFound(f"no API key {key_id!r}", param="key_id")
    if key.revoked_at is not None:
        raise Conflict(f"API key {key_id!r} is already revoked", param="key_id")
    key.revoked_at = utcnow()
    session.commit()
    return key

"""Per-tenant limits, checked before anything is written."""

from __future__ import annotations

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.config import get_settings
from app.db.models import Dataset, Job, Model, Upload, utcnow
from app.errors import PayloadTooLarge


def storage_used(session: Session, tenant_id: str) -> int:
    """What the tenant stores, and what it has reserved: a pending resumable upload counts its
    declared size from the moment it is created, so parts cannot pile up past the limit."""
    total = 0
    for column, table in ((Model.size_bytes, Model), (Dataset.size_bytes, Dataset),
                          (Job.artifact_size_bytes, Job)):
        total += session.scalar(select(func.coalesce(func.sum(column), 0)).where(table.tenant_id == tenant_id)) or 0
    total += session.scalar(select(func.coalesce(func.sum(Upload.size_bytes), 0)).where(
        Upload.tenant_id == tenant_id, Upload.status == "pending", Upload.expires_at > utcnow())) or 0
    return int(total)


def check_storage(session: Session, tenant_id: str, incoming_bytes: int, param: str = "files") -> None:
    """413 when ``incoming_bytes`` more would take the tenant past its storage limit."""
    limit = get_settings().max_tenant_storage_bytes
    used = storage_used(session, tenant_id)
    if used + incoming_bytes > limit:
        raise PayloadTooLarge(
            f"tenant storage limit reached: {used} of {limit} bytes used or reserved by pending uploads, "
            f"{incoming_bytes} more requested; delete models, datasets or jobs, or abort uploads, first",
            param=param)

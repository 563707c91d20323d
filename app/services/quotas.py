"""Per-tenant limits, checked before anything is written."""

from __future__ import annotations

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.config import get_settings
from app.db.models import Dataset, Job, Model
from app.errors import PayloadTooLarge


def storage_used(session: Session, tenant_id: str) -> int:
    total = 0
    for column, table in ((Model.size_bytes, Model), (Dataset.size_bytes, Dataset),
                          (Job.artifact_size_bytes, Job)):
        total += session.scalar(select(func.coalesce(func.sum(column), 0)).where(table.tenant_id == tenant_id)) or 0
    return int(total)


def check_storage(session: Session, tenant_id: str, incoming_bytes: int, param: str = "files") -> None:
    """413 when ``incoming_bytes`` more would take the tenant past its storage limit."""
    limit = get_settings().max_tenant_storage_bytes
    used = storage_used(session, tenant_id)
    if used + incoming_bytes > limit:
        raise PayloadTooLarge(
            f"tenant storage limit reached: {used} of {limit} bytes used, {incoming_bytes} more requested; "
            "delete models, datasets or jobs first", param=param)

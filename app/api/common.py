"""What the list routes and upload routes share: paging, filters, metadata, the caller."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime

from fastapi import Query, Request
from pydantic import TypeAdapter, ValidationError

from app.errors import APIError
from app.specs import Metadata

_metadata_adapter = TypeAdapter(Metadata)

# A display name: any text but NUL and other control characters.
NAME_PATTERN = r"^[^\x00-\x1f\x7f]*$"


@dataclass
class ListQuery:
    limit: int
    after: str | None
    created_after: datetime | None
    created_before: datetime | None
    metadata: dict[str, str] = field(default_factory=dict)

    def filters(self) -> dict:
        return {"limit": self.limit, "after": self.after, "created_after": self.created_after,
                "created_before": self.created_before, "metadata": self.metadata}


def list_query(
    request: Request,
    limit: int = Query(default=20, ge=1, le=100, description="items per page"),
    after: str | None = Query(default=None, description="the last id of the previous page"),
    created_after: datetime | None = Query(default=None, description="created at or after (ISO 8601)"),
    created_before: datetime | None = Query(default=None, description="created before (ISO 8601)"),
) -> ListQuery:
    """Paging and filters. Metadata filters are ``metadata[key]=value`` query parameters."""
    metadata = {
        key[len("metadata["):-1]: value
        for key, value in request.query_params.multi_items()
        if key.startswith("metadata[") and key.endswith("]")
    }
    # PostgreSQL cannot compare text holding a NUL: refused here, with the parameter at fault.
    for name, value in [("after", after or ""), *((f"metadata[{k}]", k + v) for k, v in metadata.items())]:
        if "\x00" in value:
            raise APIError("query parameters must not contain NUL bytes", param=name, status_code=422)
    return ListQuery(limit, after, created_after, created_before, metadata)


def parse_metadata_form(raw: str | None) -> dict[str, str]:
    """Uploads are multipart, so metadata travels as one JSON-encoded form field."""
    if raw is None or raw == "":
        return {}
    try:
        return _metadata_adapter.validate_python(json.loads(raw))
    except (json.JSONDecodeError, ValidationError) as exc:
        raise APIError(f"metadata must be a JSON object of strings: {exc}", param="metadata", status_code=422) from exc

"""Resumable uploads for checkpoints of many GB.

    POST   /v1/uploads                      {"filename", "size_bytes", "purpose", "part_size"}
    PUT    /v1/uploads/{id}/parts/{n}       raw bytes of part n (1-based), any order, re-sendable
    POST   /v1/uploads/{id}/complete        {"sha256"}: assemble, verify, then ingest as a model
                                            (an archive) or a dataset (a .txt/.jsonl file)

Parts are streamed to disk as they arrive and assembled by streaming too: no part is ever held
in memory. Sizes are checked on arrival (every part but the last is exactly ``part_size``).
Where the parts go is the store's business (``Storage.parts_*``): files in the local folder, or
the parts of one S3 multipart upload, so any API replica can take any part.
"""

from __future__ import annotations

import hashlib
import math
import os
from datetime import timedelta
from pathlib import Path
from typing import BinaryIO

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from app.checkpoints import ARCHIVE_SUFFIXES, CheckpointError, plain_file_name
from app.config import get_settings
from app.db import repositories
from app.db.models import Upload, UploadPart, new_id, utcnow
from app.errors import APIError, Conflict, NotFound, PayloadTooLarge, TooManyRequests
from app.services import datasets as dataset_service
from app.services import models as model_service
from app.services.quotas import check_storage
from app.storage import Storage

MAX_PARTS = 10_000


def parts_dir(store: Storage, upload_id: str) -> Path:
    """Where this host receives a part before handing it to the store."""
    return store.parts_dir(upload_id)


def expected_parts(upload: Upload) -> int:
    return max(1, math.ceil(upload.size_bytes / upload.part_size))


def expected_part_size(upload: Upload, number: int) -> int:
    if number < expected_parts(upload):
        return upload.part_size
    return upload.size_bytes - upload.part_size * (expected_parts(upload) - 1)


def create_upload(session: Session, store: Storage, tenant_id: str, filename: str, size_bytes: int,
                  purpose: str, part_size: int) -> Upload:
    settings = get_settings()
    try:
        filename = plain_file_name(filename)
    except CheckpointError as exc:
        raise APIError(exc.message, param="filename") from exc
    allowed = ARCHIVE_SUFFIXES if purpose == "model" else tuple(dataset_service.FORMATS)
    if not filename.lower().endswith(allowed):
        raise APIError(f"a {purpose} upload is one file ending in {', '.join(allowed)}", param="filename")
    limit = settings.max_upload_bytes if purpose == "model" else settings.max_dataset_bytes
    if size_bytes > limit:
        raise PayloadTooLarge(f"a {purpose} upload is limited to {limit} bytes", param="size_bytes")
    if part_size > settings.upload_part_max_bytes:
        raise APIError(f"part_size is at most {settings.upload_part_max_bytes}", param="part_size", status_code=422)
    if size_bytes > part_size and part_size < store.min_part_bytes:
        raise APIError(f"part_size is at least {store.min_part_bytes} bytes with this storage (or send one part)",
                       param="part_size", status_code=422)
    if math.ceil(size_bytes / part_size) > MAX_PARTS:
        raise APIError(f"at most {MAX_PARTS} parts: raise part_size", param="part_size", status_code=422)
    # One decision at a time per tenant: two creations cannot both take the last place or bytes.
    repositories.lock_tenant(session, tenant_id)
    pending = repositories.pending_upload_count(session, tenant_id, utcnow())
    if pending >= settings.max_pending_uploads_per_tenant:
        session.rollback()
        raise TooManyRequests(
            f"this tenant has {pending} pending uploads, the most allowed "
            f"(SQUEEZE_MAX_PENDING_UPLOADS_PER_TENANT); complete or abort one (DELETE /v1/uploads/{{id}}) first")
    try:
        check_storage(session, tenant_id, size_bytes, param="size_bytes")
    except PayloadTooLarge:
        session.rollback()
        raise
    upload = Upload(id=new_id("upl"), tenant_id=tenant_id, filename=filename, purpose=purpose,
                    size_bytes=size_bytes, part_size=part_size, status="pending",
                    expires_at=utcnow() + timedelta(seconds=settings.upload_ttl_s))
    store.parts_begin(upload.id)
    session.add(upload)
    session.commit()
    return upload


def get_upload(session: Session, tenant_id: str, upload_id: str) -> Upload:
    upload = repositories.get(session, Upload, upload_id, tenant_id)
    if upload is None:
        raise NotFound(f"no upload {upload_id!r}", param="upload_id")
    return upload


def parts_of(session: Session, upload_id: str) -> list[UploadPart]:
    return list(session.scalars(select(UploadPart).where(UploadPart.upload_id == upload_id).order_by(UploadPart.part_number)))


def _pending(upload: Upload) -> None:
    if upload.status != "pending":
        raise Conflict(f"upload {upload.id!r} is {upload.status}", param="upload_id")
    if upload.expires_at.replace(tzinfo=upload.expires_at.tzinfo or utcnow().tzinfo) < utcnow():
        raise Conflict(f"upload {upload.id!r} expired; start a new one", param="upload_id")


class PartWriter:
    """Streams one part to a temporary file, checking its size as it comes; ``finish`` returns
    (temporary path, size, sha256) for ``save_part`` to publish. ``discard`` on any failure."""

    def __init__(self, store: Storage, upload: Upload, number: int):
        _pending(upload)
        if not 1 <= number <= expected_parts(upload):
            raise APIError(f"part number must be 1..{expected_parts(upload)}", param="part_number", status_code=422)
        self.number, self.expected = number, expected_part_size(upload, number)
        self.path = parts_dir(store, upload.id) / f".part-{number:05d}-{os.urandom(4).hex()}"
        self.path.parent.mkdir(parents=True, exist_ok=True)  # another API replica may have begun it
        self.file = self.path.open("wb")
        self.digest, self.size = hashlib.sha256(), 0

    def write(self, chunk: bytes) -> None:
        self.size += len(chunk)
        if self.size > self.expected:
            raise APIError(f"part {self.number} must be {self.expected} bytes", param="part_number")
        self.digest.update(chunk)
        self.file.write(chunk)

    def finish(self) -> tuple[Path, int, str]:
        self.file.close()
        if self.size != self.expected:
            raise APIError(f"part {self.number} must be {self.expected} bytes, got {self.size}", param="part_number")
        return self.path, self.size, self.digest.hexdigest()

    def discard(self) -> None:
        self.file.close()
        self.path.unlink(missing_ok=True)


def save_part(session: Session, store: Storage, upload: Upload, number: int, temporary: Path,
              size: int, sha256: str) -> UploadPart:
    # A re-sent part replaces the old one whole; the row follows it.
    store.parts_put(upload.id, number, temporary)
    part = session.scalar(select(UploadPart).where(UploadPart.upload_id == upload.id, UploadPart.part_number == number))
    if part is None:
        part = UploadPart(upload_id=upload.id, part_number=number)
        session.add(part)
    part.size_bytes, part.sha256, part.received_at = size, sha256, utcnow()
    session.commit()
    return part


def complete_upload(session: Session, store: Storage, upload: Upload, sha256: str,
                    name: str | None, metadata: dict[str, str]) -> Upload:
    _pending(upload)
    received = {p.part_number for p in parts_of(session, upload.id)}
    missing = [n for n in range(1, expected_parts(upload) + 1) if n not in received]
    if missing:
        raise Conflict(f"parts missing: {missing[:20]}", param="parts")
    digest = store.parts_assemble(upload.id, expected_parts(upload))
    if digest != sha256.lower():
        if store.parts_unassemble(upload.id):
            raise APIError(f"sha256 mismatch: the parts assemble to {digest}; re-send the parts "
                           "that differ and complete again", param="sha256")
        session.execute(delete(UploadPart).where(UploadPart.upload_id == upload.id))
        session.commit()
        raise APIError(f"sha256 mismatch: the parts assemble to {digest}; the parts were discarded, "
                       "send them all again and complete again", param="sha256")
    # While the file is validated the upload is "completing": its reservation no longer counts
    # (the model or dataset it becomes is checked against the quota at its real size), and a
    # second complete is a 409. Refused, it is pending again, its parts kept for a retry.
    upload.status = "completing"
    session.commit()
    try:
        with store.parts_open(upload.id) as stream:
            result = _ingest(session, store, upload, stream, name, metadata)
    except BaseException:
        session.rollback()
        upload.status = "pending"
        session.commit()
        raise
    upload.status, upload.result_id = "completed", result
    session.commit()
    store.parts_discard(upload.id)
    return upload


def _ingest(session, store, upload: Upload, stream: BinaryIO, name, metadata) -> str:
    if upload.purpose == "model":
        model = model_service.create_model(session, store, upload.tenant_id, [(upload.filename, stream)], name, metadata)
        return model.id
    dataset = dataset_service.create_dataset(session, store, upload.tenant_id, upload.filename, stream, name, metadata)
    return dataset.id


def abort_upload(session: Session, store: Storage, upload: Upload) -> Upload:
    _pending(upload)
    upload.status = "aborted"
    session.commit()
    store.parts_discard(upload.id)
    return upload

"""Uploaded text for calibration and evaluation: a UTF-8 ``.txt`` document, or ``.jsonl``
with one ``{"text": ...}`` object per line."""

from __future__ import annotations

import codecs
import hashlib
import json
from typing import BinaryIO

from sqlalchemy.orm import Session

from app.checkpoints import CheckpointError, plain_file_name
from app.config import get_settings
from app.db import repositories
from app.db.models import Dataset, new_id
from app.errors import APIError, Conflict, NotFound, PayloadTooLarge
from app.services.quotas import check_storage
from app.services.references import refuse_while_referenced
from app.storage import CHUNK, Storage

FORMATS = {".txt": "text", ".text": "text", ".jsonl": "jsonl"}


def _format_for(filename: str | None) -> str:
    for suffix, fmt in FORMATS.items():
        if (filename or "").lower().endswith(suffix):
            return fmt
    raise APIError("dataset must be a .txt or .jsonl file", param="file")


def create_dataset(
    session: Session,
    store: Storage,
    tenant_id: str,
    filename: str | None,
    stream: BinaryIO,
    name: str | None,
    metadata: dict[str, str] | None = None,
) -> Dataset:
    fmt = _format_for(filename)
    limit = get_settings().max_dataset_bytes
    staging = store.staging_dir()
    final = None
    stored_name = "data.txt" if fmt == "text" else "data.jsonl"
    try:
        digest, size, records = hashlib.sha256(), 0, 0
        decoder = codecs.getincrementaldecoder("utf-8")()
        pending = ""  # the JSONL line still being read
        with (staging / stored_name).open("wb") as out:
            while chunk := stream.read(CHUNK):
                size += len(chunk)
                if size > limit:
                    raise PayloadTooLarge(f"dataset is larger than {limit} bytes", param="file")
                try:
                    text = decoder.decode(chunk)
                except UnicodeDecodeError as exc:
                    raise APIError(f"dataset is not UTF-8 text (byte {size - len(chunk) + exc.start})", param="file") from exc
                if "\x00" in text:
                    raise APIError("dataset contains NUL bytes; is it a binary file?", param="file")
                if fmt == "jsonl":
                    pending += text
                    *lines, pending = pending.split("\n")
                    records += sum(_check_jsonl_line(line, records + i + 1) for i, line in enumerate(lines))
                digest.update(chunk)
                out.write(chunk)
            try:
                decoder.decode(b"", final=True)
            except UnicodeDecodeError as exc:
                raise APIError("dataset ends in the middle of a UTF-8 character", param="file") from exc
        if fmt == "jsonl":
            records += _check_jsonl_line(pending, records + 1)
        else:
            records = 1
        if size == 0 or records == 0:
            raise APIError("dataset is empty", param="file")
        check_storage(session, tenant_id, size, param="file")
        dataset = Dataset(
            id=new_id("ds"), tenant_id=tenant_id, metadata_=metadata or {}, name=(name or _default_name(filename, stored_name))[:200], format=fmt,
            filename=stored_name, num_records=records, size_bytes=size, sha256=digest.hexdigest(),
        )
        store.commit_dir(staging, "datasets", dataset.id)
        final = dataset.id
        session.add(dataset)
        session.commit()
        return dataset
    except BaseException:
        session.rollback()
        if final is not None:
            store.delete("datasets", final)
        raise
    finally:
        store.discard(staging)


def _default_name(filename: str | None, stored_name: str) -> str:
    """The client's file name when it is a plain one; one with folders, '..', NUL or control
    characters is never kept (PostgreSQL cannot even store a NUL): the server's name is used."""
    try:
        return plain_file_name(filename)
    except CheckpointError:
        return stored_name


def _check_jsonl_line(line: str, number: int) -> int:
    """1 for a record, 0 for a blank line; a clear error for anything else."""
    if not line.strip():
        return 0
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise APIError(f"line {number} is not valid JSON: {exc.msg}", param="file") from exc
    if not isinstance(record, dict) or not isinstance(record.get("text"), str):
        raise APIError(f'line {number} must be an object with a string "text" field', param="file")
    return 1


def get_dataset(session: Session, tenant_id: str, dataset_id: str, param: str = "dataset_id",
                lock: str | None = None) -> Dataset:
    dataset = repositories.get(session, Dataset, dataset_id, tenant_id, lock=lock)
    if dataset is None:
        raise NotFound(f"no dataset {dataset_id!r}", param=param)
    return dataset


def delete_dataset(session: Session, store: Storage, tenant_id: str, dataset_id: str) -> None:
    """Refused (409) while a queued or running job names the dataset anywhere in its spec."""
    # Locked: a submission naming the dataset waits for the deletion, or the deletion for it.
    dataset = get_dataset(session, tenant_id, dataset_id, lock="update")
    try:
        refuse_while_referenced(session, tenant_id, "dataset", dataset_id, param="dataset_id")
    except Conflict:
        session.rollback()  # let go of the lock
        raise
    session.delete(dataset)
    session.commit()
    store.delete("datasets", dataset_id)

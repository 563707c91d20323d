"""Uploaded checkpoints: accept only what passes validation, store it atomically, never
leave half of an upload behind."""

from __future__ import annotations

from typing import BinaryIO

from sqlalchemy.orm import Session

from app.checkpoints import CheckpointError, UploadLimits, inspect_checkpoint, stage_upload
from app.config import get_settings
from app.db import repositories
from app.db.models import Model, new_id
from app.errors import APIError, Conflict, NotFound, PayloadTooLarge
from app.services.quotas import check_storage
from app.services.references import refuse_while_referenced
from app.storage import Storage


def create_model(
    session: Session,
    store: Storage,
    tenant_id: str,
    files: list[tuple[str, BinaryIO]],
    name: str | None,
    metadata: dict[str, str] | None = None,
) -> Model:
    """Validate the uploaded files (or one archive) and record the model.

    The files are streamed into a private staging folder, inspected there without running or
    unpickling anything, and only then renamed into ``models/<id>``.
    """
    if not files:
        raise APIError("upload at least config.json and one .safetensors file", param="files")
    limits = UploadLimits.from_settings(get_settings())
    staging = store.staging_dir()
    final = None
    try:
        stage_upload(files, staging, limits)
        info = inspect_checkpoint(staging, limits)
        check_storage(session, tenant_id, info.size_bytes)
        model = Model(
            id=new_id("mdl"),
            tenant_id=tenant_id,
            metadata_=metadata or {},
            name=(name or info.architecture)[:200],
            architecture=info.architecture,
            model_type=info.model_type,
            num_parameters=info.num_parameters,
            size_bytes=info.size_bytes,
            sha256=info.sha256,
            files=info.files,
            has_tokenizer=info.has_tokenizer,
            context_length=info.context_length,
            dtype=info.dtype,
        )
        store.commit_dir(staging, "models", model.id)
        final = model.id
        session.add(model)
        session.commit()
        return model
    except CheckpointError as exc:
        # A size limit is a 413 with the same error type as every other 413.
        error = PayloadTooLarge if exc.status_code == 413 else APIError
        raise error(exc.message, param=exc.param, status_code=exc.status_code) from exc
    except BaseException:
        session.rollback()
        if final is not None:
            store.delete("models", final)
        raise
    finally:
        store.discard(staging)


def get_model(session: Session, tenant_id: str, model_id: str, param: str = "model_id",
              lock: str | None = None) -> Model:
    model = repositories.get(session, Model, model_id, tenant_id, lock=lock)
    if model is None:
        raise NotFound(f"no model {model_id!r}", param=param)
    return model


def delete_model(session: Session, store: Storage, tenant_id: str, model_id: str) -> None:
    """Refused (409) while a queued or running job names the model anywhere in its spec (as a
    distillation teacher, say), and while any job has it as its input model."""
    # Locked: a submission naming the model waits for the deletion, or the deletion for it.
    model = get_model(session, tenant_id, model_id, lock="update")
    try:
        refuse_while_referenced(session, tenant_id, "model", model_id, param="model_id")
        if repositories.jobs_using_model(session, model_id):
            raise Conflict(
                f"model {model_id!r} has jobs; delete is refused so their records stay complete",
                param="model_id",
            )
    except Conflict:
        session.rollback()  # let go of the lock
        raise
    session.delete(model)
    session.commit()
    store.delete("models", model_id)

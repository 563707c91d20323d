"""Which unfinished jobs name an object: a dataset or model is not deleted from under them.

A job names objects in its spec's ``DatasetRef`` / ``ModelRef`` fields (``app/specs.py``), not
only in ``model_id``: a model that is just a queued job's distillation teacher counts too.
"""

from __future__ import annotations

import logging

from pydantic import ValidationError
from sqlalchemy.orm import Session

from app.db import repositories
from app.errors import Conflict
from app.specs import JobSpec, reference_fields

log = logging.getLogger("squeeze.references")


def refuse_while_referenced(session: Session, tenant_id: str, kind: str, object_id: str, param: str) -> None:
    """409 naming the first queued or running job whose spec names ``object_id`` as a ``kind``
    (``"dataset"`` or ``"model"``), and the field that does::

        refuse_while_referenced(session, tenant_id, "model", "mdl_...", param="model_id")
    """
    for job in repositories.active_jobs(session, tenant_id):
        try:
            spec = JobSpec.model_validate(job.spec or {})
        except ValidationError as exc:  # a spec stored by an older version: the worker refuses it too
            log.warning("job %s: stored spec no longer validates, its references are not checked: %s", job.id, exc)
            continue
        for ref in reference_fields(spec):
            if ref.kind == kind and ref.id == object_id:
                raise Conflict(
                    f"{kind} {object_id!r} is {ref.path} of job {job.id!r}, which is {job.status}; "
                    "delete it when the job has finished or is cancelled",
                    param=param,
                )

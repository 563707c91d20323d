"""The services on a real SQLite database with the migrations applied, in-process: no API, no
worker, no broker. Each test gets a fresh copy of a database migrated once per session.

>>> def test_something(db):
...     tenant = db.tenant()
...     model = db.model(tenant)                       # a row; no files are needed to decide
...     job = db.job(tenant, model, stages=[{"type": "quantize", "method": "rtn"}])
...     create_job(db.session, tenant, JobSpec.model_validate({...}))
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from alembic.config import Config
from sqlalchemy.orm import Session

from app.config import get_settings
from app.db import session as db_session
from app.db.models import Dataset, Job, JobStatus, Model, Tenant, new_id
from app.storage import LocalStore
ROOT = Path(__file__).resolve().parents[3]


def _use_database(monkeypatch: pytest.MonkeyPatch, url: str) -> None:
    """Point the settings, and the engine and sessions built from them, at ``url``."""
    monkeypatch.setenv("SQUEEZE_DATABASE_URL", url)
    for cached in (get_settings, db_session.get_engine, db_session.get_sessionmaker):
        cached.cache_clear()


def _forget_database() -> None:
    db_session.get_engine().dispose()
    for cached in (get_settings, db_session.get_engine, db_session.get_sessionmaker):
        cached.cache_clear()


@pytest.fixture(scope="session")
def migrated_database(tmp_path_factory) -> Path:
    """A SQLite file with every alembic migration applied, as ``make run`` would leave it."""
    path = tmp_path_factory.mktemp("services-db") / "template.db"
    with pytest.MonkeyPatch.context() as monkeypatch:
        _use_database(monkeypatch, f"sqlite:///{path}")
        config = Config(str(ROOT / "alembic.ini"))
        config.attributes["configure_logger"] = False
        command.upgrade(config, "head")
        _forget_database()
    return path


@dataclass
class Database:
    """A session on a fresh database, and factories for the rows the services read."""

    session: Session
    store: LocalStore
    sent: list[str] = field(default_factory=list)  # job ids handed to the broker

    def tenant(self, name: str | None = None) -> str:
        tenant = Tenant(id=new_id("ten"), name=name or new_id("tenant"))
        self.session.add(tenant)
        self.session.commit()
        return tenant.id

    def model(self, tenant_id: str, has_tokenizer: bool = True) -> Model:
        model = Model(id=new_id("mdl"), tenant_id=tenant_id, name="tiny", architecture="GPT2LMHeadModel",
                      model_type="gpt2", num_parameters=1000, size_bytes=4000, sha256="0" * 64, files=[],
                      has_tokenizer=has_tokenizer, context_length=128, dtype="float32")
        self.session.add(model)
        self.session.commit()
        (self.store.path("models", model.id)).mkdir(parents=True)
        return model

    def dataset(self, tenant_id: str) -> Dataset:
        dataset = Dataset(id=new_id("ds"), tenant_id=tenant_id, name="corpus", format="text",
                          filename="data.txt", num_records=1, size_bytes=10, sha256="0" * 64)
        self.session.add(dataset)
        self.session.commit()
        (self.store.path("datasets", dataset.id)).mkdir(parents=True)
        return dataset

    def job(self, tenant_id: str, model: Model, status: JobStatus = JobStatus.QUEUED, **spec: Any) -> Job:
        """A job row as ``create_job`` leaves it (no checks): ``spec`` is the rest of the JobSpec."""
        job = Job(id=new_id("job"), tenant_id=tenant_id, model_id=model.id, metadata_={},
                  spec={"model_id": model.id, **spec}, status=status.value, progress=0.0,
                  cancel_requested=False, attempts=0)
        self.session.add(job)
        self.session.commit()
        return job


@pytest.fixture
def db(migrated_database, tmp_path, monkeypatch) -> Database:
    path = tmp_path / "squeeze.db"
    shutil.copyfile(migrated_database, path)
    _use_database(monkeypatch, f"sqlite:///{path}")
    monkeypatch.setenv("SQUEEZE_STORAGE_ROOT", str(tmp_path / "store"))
    get_settings.cache_clear()
    database = Database(db_session.get_sessionmaker()(), LocalStore(tmp_path / "store"))
    # The broker is not under test here: record what would be sent.
    monkeypatch.setattr("worker.celery_app.send_run_job", database.sent.append)
    yield database
    database.session.close()
    _forget_database()

"""The services on real databases with the migrations applied, in-process: no API, no worker, no
broker. Each test runs twice: on SQLite (a fresh copy of a file migrated once per session) and on
PostgreSQL (one database migrated once per session; every test makes its own tenants, so rows
never mix), which is where row locks are real.

>>> def test_something(db):
...     tenant = db.tenant()
...     model = db.model(tenant)                       # a row; no files are needed to decide
...     job = db.job(tenant, model, stages=[{"type": "quantize", "method": "rtn"}])
...     create_job(db.session, tenant, JobSpec.model_validate({...}))
"""

from __future__ import annotations

import secrets
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
from tests.e2e.stack import PG_ADMIN_URL, PG_HOST_URL
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


def _migrate(url: str) -> None:
    with pytest.MonkeyPatch.context() as monkeypatch:
        _use_database(monkeypatch, url)
        config = Config(str(ROOT / "alembic.ini"))
        config.attributes["configure_logger"] = False
        command.upgrade(config, "head")
        _forget_database()


@pytest.fixture(scope="session")
def migrated_sqlite(tmp_path_factory) -> Path:
    """A SQLite file with every alembic migration applied, as ``make run`` would leave it."""
    path = tmp_path_factory.mktemp("services-db") / "template.db"
    _migrate(f"sqlite:///{path}")
    return path


@pytest.fixture(scope="session")
def migrated_postgres() -> str:
    """The URL of a fresh PostgreSQL database with every migration applied (dropped at the end)."""
    import psycopg

    name = f"squeeze_services_{secrets.token_hex(4)}"
    try:
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
            admin.execute(f'CREATE DATABASE "{name}"')
    except psycopg.OperationalError as exc:
        pytest.skip(f"no PostgreSQL at {PG_ADMIN_URL} (SQUEEZE_TEST_PG_ADMIN): {exc}")
    url = f"{PG_HOST_URL.replace('postgresql://', 'postgresql+psycopg://')}/{name}"
    _migrate(url)
    yield url
    # A new connection: one held for the whole session would not survive the fault tests'
    # PostgreSQL restart.
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@dataclass
class Database:
    """A session on a fresh database, and factories for the rows the services read."""

    session: Session
    store: LocalStore
    dialect: str  # "sqlite" | "postgresql"
    sent: list[str] = field(default_factory=list)  # job ids handed to the broker

    def new_session(self) -> Session:
        """Another connection to the same database, as a second request would have."""
        return db_session.get_sessionmaker()()

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


@pytest.fixture(params=["sqlite", "postgresql"])
def db(request, tmp_path, monkeypatch) -> Database:
    if request.param == "sqlite":
        path = tmp_path / "squeeze.db"
        shutil.copyfile(request.getfixturevalue("migrated_sqlite"), path)
        url = f"sqlite:///{path}"
    else:
        url = request.getfixturevalue("migrated_postgres")
    _use_database(monkeypatch, url)
    monkeypatch.setenv("SQUEEZE_STORAGE_ROOT", str(tmp_path / "store"))
    get_settings.cache_clear()
    database = Database(db_session.get_sessionmaker()(), LocalStore(tmp_path / "store"), request.param)
    # The broker is not under test here: record what would be sent.
    monkeypatch.setattr("worker.celery_app.send_run_job", database.sent.append)
    yield database
    database.session.close()
    _forget_database()

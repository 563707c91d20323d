"""Migration 0009 on SQLite and PostgreSQL: secrets stored in clear before it are encrypted by
it (and the dispatcher can sign with them), and a downgrade writes them back as they were."""

from __future__ import annotations

import base64
import secrets

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.config import Config

from app import crypto
from app.config import get_settings
from app.db import session as db_session
from app.webhooks import SECRET_CONTEXT
from tests.e2e.stack import PG_ADMIN_URL, PG_HOST_URL
from tests.app.services.conftest import ROOT, _forget_database, _use_database

SECRET = "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request, tmp_path, monkeypatch):
    monkeypatch.setenv("SQUEEZE_VAR_DIR", str(tmp_path / "var"))  # the key file goes there
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'squeeze.db'}"
        _use_database(monkeypatch, url)
        yield url
    else:
        import psycopg

        name = f"squeeze_migration_{secrets.token_hex(4)}"
        try:
            with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
                admin.execute(f'CREATE DATABASE "{name}"')
        except psycopg.OperationalError as exc:
            pytest.skip(f"no PostgreSQL at {PG_ADMIN_URL}: {exc}")
        url = f"{PG_HOST_URL.replace('postgresql://', 'postgresql+psycopg://')}/{name}"
        _use_database(monkeypatch, url)
        yield url
        _forget_database()
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    _forget_database()


def _alembic(action, revision: str) -> None:
    config = Config(str(ROOT / "alembic.ini"))
    config.attributes["configure_logger"] = False
    action(config, revision)


def _stored_secret(job_id: str) -> str:
    with db_session.get_engine().connect() as conn:
        return conn.execute(sa.text("SELECT webhook_secret FROM jobs WHERE id = :id"), {"id": job_id}).scalar_one()


def test_secrets_stored_in_clear_are_encrypted_and_a_downgrade_restores_them(database_url):
    _alembic(command.upgrade, "0008")
    with db_session.get_engine().begin() as conn:
        conn.execute(sa.text("INSERT INTO tenants (id, name, created_at) VALUES ('ten_m', 'm', CURRENT_TIMESTAMP)"))
        conn.execute(sa.text(
            "INSERT INTO models (id, tenant_id, name, architecture, model_type, num_parameters, size_bytes, sha256,"
            " files, has_tokenizer, dtype, metadata, created_at) VALUES ('mdl_m', 'ten_m', 'm', 'GPT2LMHeadModel',"
            " 'gpt2', 1, 1, :sha, '[]', true, 'float32', '{}', CURRENT_TIMESTAMP)"), {"sha": "0" * 64})
        for job_id, secret in (("job_with", SECRET), ("job_without", None)):
            conn.execute(sa.text(
                "INSERT INTO jobs (id, tenant_id, model_id, spec, metadata, status, progress, cancel_requested,"
                " attempts, created_at, webhook_url, webhook_secret) VALUES (:id, 'ten_m', 'mdl_m', '{}', '{}',"
                " 'queued', 0, false, 0, CURRENT_TIMESTAMP, 'https://hooks.example.com/', :secret)"),
                {"id": job_id, "secret": secret})

    _alembic(command.upgrade, "0009")
    stored = _stored_secret("job_with")
    assert stored.startswith("v1:") and SECRET.removeprefix("whsec_") not in stored
    assert crypto.decrypt(stored, context=SECRET_CONTEXT) == base64.b64decode(SECRET.removeprefix("whsec_"))
    assert _stored_secret("job_without") is None

    _alembic(command.downgrade, "0008")
    assert _stored_secret("job_with") == SECRET
    get_settings.cache_clear()

"""The reconciler on an object store: expired uploads lose their multipart upload, and a
multipart upload no pending upload owns is aborted; a pending upload's is kept. PostgreSQL and
SQLite, and a real S3-protocol server on loopback."""

from __future__ import annotations

import uuid
from datetime import timedelta

import pytest

from app.db.models import Upload, new_id, utcnow
from app.maintenance import abort_orphan_parts, expire_uploads
from app.storage.s3 import S3Store
from tests.app.services.conftest import db, migrated_postgres, migrated_sqlite  # noqa: F401
from tests.s3_server import s3_server


@pytest.fixture(scope="module")
def s3_env():
    with s3_server() as env:
        yield env


@pytest.fixture
def store(s3_env, tmp_path, monkeypatch):
    for name, value in s3_env.items():
        monkeypatch.setenv(name, value)
    return S3Store(f"{s3_env['SQUEEZE_STORAGE_URL']}/{uuid.uuid4().hex}", tmp_path / "scratch", cache_max_bytes=0)


def _upload(db, tenant, store, expires_in_s: float) -> str:
    upload = Upload(id=new_id("upl"), tenant_id=tenant, filename="c.txt", purpose="dataset", size_bytes=10,
                    part_size=10, status="pending", expires_at=utcnow() + timedelta(seconds=expires_in_s))
    db.session.add(upload)
    db.session.commit()
    store.parts_begin(upload.id)
    return upload.id


def test_expired_and_orphan_multipart_uploads_are_aborted(db, store):
    tenant = db.tenant()
    live = _upload(db, tenant, store, expires_in_s=3600)
    expired = _upload(db, tenant, store, expires_in_s=-1)
    store.parts_begin("upl_orphan")  # its API process died before the row was written

    assert expire_uploads(store) == 1
    assert db.new_session().get(Upload, expired).status == "expired"
    assert store._multipart_ids(expired) == []

    # (moto dates every multipart upload in 2010: all are "old"; the row decides.)
    assert abort_orphan_parts(store, max_idle_s=3600) == 1
    assert store._multipart_ids("upl_orphan") == []
    assert len(store._multipart_ids(live)) == 1
    assert abort_orphan_parts(store, max_idle_s=3600) == 0

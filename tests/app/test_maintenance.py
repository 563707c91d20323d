"""The sweep of abandoned temporary files: what an API process killed mid-request leaves."""

from __future__ import annotations

import os
import time
import uuid

from app.maintenance import sweep_temporary
from app.storage import LocalStore


def _age(path, seconds: float) -> None:
    old = time.time() - seconds
    for item in [path, *path.rglob("*")] if path.is_dir() else [path]:
        os.utime(item, (old, old))


def test_only_idle_abandoned_upload_files_are_swept(tmp_path):
    store = LocalStore(tmp_path)
    tmp = tmp_path / "tmp"
    abandoned = tmp / f"staging-{uuid.uuid4().hex}"   # an upload whose API process died
    (abandoned / "model.safetensors").parent.mkdir()
    (abandoned / "model.safetensors").write_bytes(b"x" * 100)
    busy = store.staging_dir()                          # this process is still validating it
    (busy / "config.json").write_text("{}")
    recent = tmp / f"staging-{uuid.uuid4().hex}"        # another replica's, still being written
    recent.mkdir()
    job = store.staging_dir(owner="job_0123")           # a job's: the worker's to clean
    trash = tmp / f"deleted-{uuid.uuid4().hex}"          # a delete cut off before its rmtree
    trash.mkdir()
    parts = tmp / "upload-upl_1"
    parts.mkdir()
    (parts / "part-00001").write_bytes(b"p" * 10)       # a received part: kept, whatever its age
    (parts / ".part-00002-abcd").write_bytes(b"half")   # a part cut off mid-body
    for path in (abandoned, busy, job, trash, parts):
        _age(path, 120)

    assert sweep_temporary(tmp, max_idle_s=60) == 3
    assert sorted(p.name for p in tmp.iterdir()) == sorted([busy.name, recent.name, job.name, parts.name])
    assert [p.name for p in parts.iterdir()] == ["part-00001"]
    # Once its request is over the live folder is released; aged, it would go like the others.
    store.discard(busy)
    assert not busy.exists()
    assert sweep_temporary(tmp, max_idle_s=60) == 0

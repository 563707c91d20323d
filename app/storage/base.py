"""The storage interface both backends implement, and the local work folder they share.

Objects are addressed by key: ``models/<id>/<file>``, ``datasets/<id>/<file>``,
``artifacts/<job>-attempt<n>.tar``. What a process writes before publishing (an upload being
validated, a job's output) lives in its own local folder (``root/tmp``), never in the store:
the store only ever holds complete objects, so a reader never sees half a file or half a folder.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import uuid
from collections.abc import Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol

CHUNK = 1024 * 1024
KINDS = ("models", "datasets", "artifacts")
_UPLOAD_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")

# The staging folders this process is still using (an upload being validated may not write for
# a while): the sweep of abandoned staging never takes them, whatever their age.
LIVE_STAGING: set[Path] = set()


@dataclass(frozen=True)
class ObjectInfo:
    """What ``head`` tells about a stored object: its size, the store's ETag (quoted), and the
    sha256 recorded when it was written (None when the writer gave none)."""

    size: int
    etag: str
    sha256: str | None


def object_key(kind: str, object_id: str, name: str = "") -> str:
    """``kind/object_id[/name]``, refusing anything that could leave its folder."""
    parts = [object_id, *name.split("/")] if name else [object_id]
    if kind not in KINDS or any(p in ("", ".", "..") or "\\" in p for p in parts) or "/" in object_id:
        raise ValueError(f"bad storage key {kind}/{object_id}/{name}")
    return "/".join([kind, *parts])


class Storage(Protocol):
    """Where models, datasets and artifacts live (``get_store()`` picks the backend).

    ``root`` is this process's local folder: staging, resumable upload parts and, on a worker
    with an object store, the scratch cache of recently used models."""

    root: Path

    # -- local staging, published whole --
    def staging_dir(self, owner: str = "") -> Path: ...
    def discard_staging(self, owner: str) -> int: ...
    def discard(self, path: Path) -> None: ...
    def commit_dir(self, staging: Path, kind: str, object_id: str) -> None: ...
    def delete(self, kind: str, object_id: str) -> None: ...

    # -- objects by key --
    def put_file(self, key: str, path: Path, sha256: str | None = None, move: bool = False) -> None: ...
    def put_stream(self, key: str, stream: BinaryIO, sha256: str | None = None) -> None: ...
    def head(self, key: str) -> ObjectInfo | None: ...
    def open_range(self, key: str, start: int = 0, end: int | None = None) -> Iterator[bytes]: ...
    def read_bytes(self, key: str) -> bytes: ...
    def list(self, prefix: str) -> list[str]: ...
    def delete_key(self, key: str) -> None: ...
    def delete_prefix(self, prefix: str) -> int: ...
    def presign(self, key: str, expires_s: int, filename: str) -> str | None: ...
    def local_file(self, key: str) -> Path | None: ...

    # -- a folder of the store on this host, for as long as the block runs (the worker) --
    def checkout(self, kind: str, object_id: str) -> AbstractContextManager[Path]: ...

    # -- resumable uploads: parts in any order, re-sendable, assembled once all are there --
    min_part_bytes: int  # every part but the last is at least this (S3's multipart rule)
    def parts_begin(self, upload_id: str) -> None: ...
    def parts_put(self, upload_id: str, number: int, path: Path) -> None: ...
    def parts_assemble(self, upload_id: str, count: int) -> str: ...
    def parts_open(self, upload_id: str) -> AbstractContextManager[BinaryIO]: ...
    def parts_unassemble(self, upload_id: str) -> bool: ...
    def parts_discard(self, upload_id: str) -> None: ...
    def parts_stale(self, max_idle_s: float) -> list[str]: ...


class LocalWork:
    """The local ``tmp/`` folder of a backend: staging written here, then published."""

    root: Path

    def parts_dir(self, upload_id: str) -> Path:
        """Where a resumable upload's parts arrive on this host (and, locally, stay)."""
        if not _UPLOAD_ID.fullmatch(upload_id):
            raise ValueError(f"bad upload id {upload_id!r}")
        return self.root / "tmp" / f"upload-{upload_id}"

    def _make_work_dirs(self) -> None:
        (self.root / "tmp").mkdir(parents=True, exist_ok=True)

    def staging_dir(self, owner: str = "") -> Path:
        """A fresh private folder; ``owner`` (a job id) lets ``discard_staging`` find it later."""
        path = self.root / "tmp" / f"staging-{owner + '-' if owner else ''}{uuid.uuid4().hex}"
        path.mkdir()
        LIVE_STAGING.add(path)
        return path

    def discard_staging(self, owner: str) -> int:
        """Remove the staging folders of ``owner``: what a killed worker could not clean up."""
        stale = list((self.root / "tmp").glob(f"staging-{owner}-*"))
        for path in stale:
            shutil.rmtree(path, ignore_errors=True)
        return len(stale)

    @staticmethod
    def discard(path: Path) -> None:
        shutil.rmtree(path, ignore_errors=True)
        LIVE_STAGING.discard(path)


def sha256_file(path: Path) -> str:
    """Hex sha256 of the file at ``path``, read in chunks (never whole into memory)."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()

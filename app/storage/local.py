"""The local folder backend (the embedded default): every object is a file under ``root``.

A network-mounted folder (NFS, EFS) shared by the API and the workers works too; with workers
on other hosts and no shared folder, use the S3 backend (``app/storage/s3.py``).

>>> store = LocalStore(Path("/tmp/squeeze-doc"))
>>> staging = store.staging_dir()          # write an upload here ...
>>> store.commit_dir(staging, "models", "mdl_123")   # ... then publish it atomically
"""

from __future__ import annotations

import hashlib
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from app.storage.base import CHUNK, KINDS, LIVE_STAGING, LocalWork, ObjectInfo, object_key, sha256_file


class LocalStore(LocalWork):
    """Objects in a local (or network-mounted) folder; publishing is a rename, so atomic."""

    def __init__(self, root: Path):
        self.root = root
        for sub in (*KINDS, "tmp", "meta"):
            (root / sub).mkdir(parents=True, exist_ok=True)

    def path(self, kind: str, object_id: str) -> Path:
        return self.root / object_key(kind, object_id)

    def _file(self, key: str) -> Path:
        kind, _, rest = key.partition("/")
        object_id, _, name = rest.partition("/")
        return self.root / object_key(kind, object_id, name)

    # The sha256 given at write time, beside the tree (a models/ folder holds only the model).
    def _meta(self, key: str) -> Path:
        return self.root / "meta" / f"{key}.sha256"

    def commit_dir(self, staging: Path, kind: str, object_id: str) -> None:
        """Publish a fully written staging folder under its final name in one rename."""
        os.replace(staging, self.path(kind, object_id))
        LIVE_STAGING.discard(staging)

    def delete(self, kind: str, object_id: str) -> None:
        # Rename out of sight first so a concurrent reader sees all or nothing.
        target = self.path(kind, object_id)
        if not target.exists():
            return
        trash = self.root / "tmp" / f"deleted-{uuid.uuid4().hex}"
        os.replace(target, trash)
        shutil.rmtree(trash, ignore_errors=True)
        shutil.rmtree(self.root / "meta" / kind / object_id, ignore_errors=True)

    def put_file(self, key: str, path: Path, sha256: str | None = None, move: bool = False) -> None:
        target = self._file(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.root / "tmp" / f"put-{uuid.uuid4().hex}"
        if move:
            os.replace(path, temporary)
        else:
            shutil.copyfile(path, temporary)
        self._write_meta(key, sha256)
        os.replace(temporary, target)

    def put_stream(self, key: str, stream: BinaryIO, sha256: str | None = None) -> None:
        temporary = self.root / "tmp" / f"put-{uuid.uuid4().hex}"
        try:
            with temporary.open("wb") as out:
                shutil.copyfileobj(stream, out, CHUNK)
            self.put_file(key, temporary, sha256, move=True)
        finally:
            temporary.unlink(missing_ok=True)

    def _write_meta(self, key: str, sha256: str | None) -> None:
        meta = self._meta(key)
        if sha256:
            meta.parent.mkdir(parents=True, exist_ok=True)
            meta.write_text(sha256)
        else:
            meta.unlink(missing_ok=True)

    def head(self, key: str) -> ObjectInfo | None:
        try:
            stat = self._file(key).stat()
        except (FileNotFoundError, NotADirectoryError):
            return None
        if not self._file(key).is_file():
            return None
        try:
            sha256 = self._meta(key).read_text().strip()
        except FileNotFoundError:
            sha256 = None
        return ObjectInfo(size=stat.st_size, etag=f'"{sha256 or f"{stat.st_mtime_ns:x}-{stat.st_size:x}"}"',
                          sha256=sha256)

    def open_range(self, key: str, start: int = 0, end: int | None = None) -> Iterator[bytes]:
        """The bytes ``start..end`` (inclusive, like HTTP) of the object, in chunks."""
        with self._file(key).open("rb") as handle:
            handle.seek(start)
            left = None if end is None else end - start + 1
            while left is None or left > 0:
                chunk = handle.read(CHUNK if left is None else min(CHUNK, left))
                if not chunk:
                    return
                if left is not None:
                    left -= len(chunk)
                yield chunk

    def read_bytes(self, key: str) -> bytes:
        return self._file(key).read_bytes()

    def list(self, prefix: str) -> list[str]:
        """Keys starting with ``prefix`` (a whole folder, or the start of a name in one)."""
        folder = prefix.rpartition("/")[0]
        # Only the objects' folders: tmp/ and meta/ are this backend's own.
        bases = [self.root / folder] if folder else [self.root / kind for kind in KINDS]
        return sorted(key for base in bases if base.is_dir() and base.resolve().is_relative_to(self.root.resolve())
                      for key in (p.relative_to(self.root).as_posix() for p in base.rglob("*") if p.is_file())
                      if key.startswith(prefix) and key.split("/", 1)[0] in KINDS)

    def delete_key(self, key: str) -> None:
        self._file(key).unlink(missing_ok=True)
        self._meta(key).unlink(missing_ok=True)

    def delete_prefix(self, prefix: str) -> int:
        keys = self.list(prefix)
        for key in keys:
            self.delete_key(key)
        return len(keys)

    def presign(self, key: str, expires_s: int, filename: str) -> str | None:
        return None  # a folder has no URL of its own: the API streams it

    def local_file(self, key: str) -> Path | None:
        path = self._file(key)
        return path if path.is_file() else None

    @contextmanager
    def checkout(self, kind: str, object_id: str) -> Iterator[Path]:
        path = self.path(kind, object_id)
        if not path.is_dir():
            raise FileNotFoundError(f"{kind}/{object_id} is missing from storage")
        yield path

    # -- resumable uploads: the parts are files in tmp/upload-<id>/, concatenated at the end --

    min_part_bytes = 1

    def parts_begin(self, upload_id: str) -> None:
        self.parts_dir(upload_id).mkdir(parents=True)

    def parts_put(self, upload_id: str, number: int, path: Path) -> None:
        # The rename makes a re-sent part replace the old one whole.
        os.replace(path, self.parts_dir(upload_id) / f"part-{number:05d}")

    def parts_assemble(self, upload_id: str, count: int) -> str:
        """Concatenate parts 1..count into one file, streaming; returns its sha256."""
        folder = self.parts_dir(upload_id)
        digest = hashlib.sha256()
        with (folder / "assembled").open("wb") as out:
            for number in range(1, count + 1):
                with (folder / f"part-{number:05d}").open("rb") as part:
                    while chunk := part.read(CHUNK):
                        digest.update(chunk)
                        out.write(chunk)
        return digest.hexdigest()

    @contextmanager
    def parts_open(self, upload_id: str) -> Iterator[BinaryIO]:
        # Refused or not, the assembled copy is done with once read: the parts stay for a retry.
        assembled = self.parts_dir(upload_id) / "assembled"
        try:
            with assembled.open("rb") as stream:
                yield stream
        finally:
            assembled.unlink(missing_ok=True)

    def parts_unassemble(self, upload_id: str) -> bool:
        (self.parts_dir(upload_id) / "assembled").unlink(missing_ok=True)
        return True  # the parts are kept: the client re-sends only those that differ

    def parts_discard(self, upload_id: str) -> None:
        shutil.rmtree(self.parts_dir(upload_id), ignore_errors=True)

    def parts_stale(self, max_idle_s: float) -> list[str]:
        return []  # the folders of expired uploads go with their expiry (app/maintenance.py)

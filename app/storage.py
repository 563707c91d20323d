"""Where files live: uploaded checkpoints, datasets and job artifacts.

The interface is small so that a shared-filesystem folder (embedded default, NFS/EFS volume in
production) and an object store can sit behind it. Everything is written to a temporary name
first and renamed into place, so a reader never sees half a file or half a folder.

>>> store = LocalStore(Path("/tmp/squeeze-doc"))
>>> staging = store.staging_dir()          # write an upload here ...
>>> final = store.commit_dir(staging, "models", "mdl_123")   # ... then publish it atomically
"""

from __future__ import annotations

import hashlib
import os
import shutil
import uuid
from pathlib import Path

from app.config import get_settings

CHUNK = 1024 * 1024

# The staging folders this process is still using (an upload being validated may not write for
# a while): the sweep of abandoned staging never takes them, whatever their age.
LIVE_STAGING: set[Path] = set()


class LocalStore:
    """Artifacts in a local (or network-mounted) folder shared by the API and the workers."""

    def __init__(self, root: Path):
        self.root = root
        for sub in ("models", "datasets", "artifacts", "tmp"):
            (root / sub).mkdir(parents=True, exist_ok=True)

    # Temporary space on the same filesystem as the final paths, so rename is atomic.
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

    def path(self, kind: str, object_id: str) -> Path:
        if kind not in ("models", "datasets", "artifacts") or "/" in object_id or ".." in object_id:
            raise ValueError(f"bad storage key {kind}/{object_id}")
        return self.root / kind / object_id

    def commit_dir(self, staging: Path, kind: str, object_id: str) -> Path:
        """Publish a fully written staging folder under its final name in one rename."""
        final = self.path(kind, object_id)
        os.replace(staging, final)
        LIVE_STAGING.discard(staging)
        return final

    def delete(self, kind: str, object_id: str) -> None:
        # Rename out of sight first so a concurrent reader sees all or nothing.
        target = self.path(kind, object_id)
        if not target.exists():
            return
        trash = self.root / "tmp" / f"deleted-{uuid.uuid4().hex}"
        os.replace(target, trash)
        shutil.rmtree(trash, ignore_errors=True)

    @staticmethod
    def discard(path: Path) -> None:
        shutil.rmtree(path, ignore_errors=True)
        LIVE_STAGING.discard(path)


def sha256_file(path: Path) -> str:
    """Hex sha256 of the file at ``path``, read in chunks (never whole into memory)."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def get_store() -> LocalStore:
    return LocalStore(get_settings().resolved_storage_root)

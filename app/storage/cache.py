"""A worker's scratch cache: the models and datasets it used recently, bounded in size.

With an object store a worker keeps nothing of its own but this folder. A job checks its
inputs out (``use``): a cached copy is reused, a missing one downloaded into a private temporary
folder and renamed into place whole. After a download the least recently used entries go until
the total fits ``max_bytes``; an entry a job is using (a shared ``flock`` held for the job's
duration, which the kernel drops if the process dies) is never evicted, so the bound can be
exceeded while the jobs running need more than it.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


class ScratchCache:
    def __init__(self, root: Path, max_bytes: int):
        self.root, self.max_bytes = root, max_bytes
        root.mkdir(parents=True, exist_ok=True)

    def _entry(self, kind: str, object_id: str) -> Path:
        return self.root / f"{kind}-{object_id}"

    @contextmanager
    def use(self, kind: str, object_id: str, download: Callable[[Path], None]) -> Iterator[Path]:
        entry = self._entry(kind, object_id)
        with open(entry.with_name(entry.name + ".lock"), "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_SH)  # held until the job is done with the files
            if not entry.is_dir():
                temporary = self.root / f".download-{uuid.uuid4().hex}"
                temporary.mkdir()
                try:
                    download(temporary)
                    os.replace(temporary, entry)
                except OSError:
                    if not entry.is_dir():  # another process may have won the race: use theirs
                        raise
                finally:
                    shutil.rmtree(temporary, ignore_errors=True)
                self.evict()  # the new entry is held (ours), so the older ones make room
            os.utime(entry)  # most recently used
            yield entry

    def entries(self) -> list[tuple[float, int, Path]]:
        """(last use, bytes, folder) of every cached entry, oldest first."""
        found = []
        for entry in self.root.iterdir():
            if entry.is_dir() and not entry.name.startswith("."):
                size = sum(p.stat().st_size for p in entry.rglob("*") if p.is_file())
                found.append((entry.stat().st_mtime, size, entry))
        return sorted(found)

    def evict(self) -> int:
        """Remove least recently used entries nobody holds until the total fits; returns how many."""
        entries = self.entries()
        total, removed = sum(size for _, size, _ in entries), 0
        for _, size, entry in entries:
            if total <= self.max_bytes:
                break
            with open(entry.with_name(entry.name + ".lock"), "a+") as lock:
                try:
                    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # a job is using it
                shutil.rmtree(entry, ignore_errors=True)
            total, removed = total - size, removed + 1
        return removed

    def forget(self, kind: str, object_id: str) -> None:
        """Drop a deleted object's copy (on this host; other hosts' copies age out)."""
        shutil.rmtree(self._entry(kind, object_id), ignore_errors=True)

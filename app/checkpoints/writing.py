"""Writing uploaded bytes to disk: every byte counted against the limits, every file sniffed.

Both the files of a multi-file upload and the members of an archive are written by
:func:`copy_stream`, through one :class:`ByteMeter` per upload.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import BinaryIO

from app.checkpoints.errors import CheckpointError, UploadLimits, over_upload_limit
from app.checkpoints.sniffing import refuse_disguised_formats

CHUNK_BYTES = 1024 * 1024


class ByteMeter:
    """Counts bytes written; raises 413 past the upload limit or, for archives, past the ratio."""

    def __init__(self, limits: UploadLimits, archive_size: int | None = None) -> None:
        self.limits = limits
        self.archive_size = archive_size
        self.total = 0

    def add(self, count: int) -> None:
        self.total += count
        if self.total > self.limits.max_total_bytes:
            raise over_upload_limit(self.limits)
        if self.archive_size is not None:
            ceiling = self.limits.max_compression_ratio * max(self.archive_size, 1)
            if self.total > ceiling:
                raise CheckpointError(
                    f"the archive expands to more than {self.limits.max_compression_ratio:g} "
                    "times its size, which real checkpoints never do (zip bomb?); upload the "
                    "files uncompressed or as a plain .tar.",
                    status_code=413,
                )


def copy_stream(
    source: BinaryIO, target: Path, name: str, meter: ByteMeter, *, sniff: bool = True
) -> None:
    # O_EXCL: never overwrite or follow anything already there (a link planted by an earlier
    # member); O_NOFOLLOW for the same reason where the platform has it.
    flags = (
        os.O_WRONLY
        | os.O_CREAT
        | os.O_EXCL
        | getattr(os, "O_NOFOLLOW", 0)
        | getattr(os, "O_CLOEXEC", 0)
    )
    with os.fdopen(os.open(target, flags, 0o644), "wb") as out:
        first = True
        while True:
            chunk = source.read(CHUNK_BYTES)
            if not chunk:
                break
            if first and sniff:
                refuse_disguised_formats(name, chunk[:64], None, None)
            first = False
            meter.add(len(chunk))
            out.write(chunk)

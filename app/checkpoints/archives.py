"""Archives: extract an uploaded zip or tar(.gz) member by member, with every byte counted.

A hostile archive is refused before it costs memory or disk: the zip directory and tar
metadata are bounded before the standard library reads them, links and special files are
refused, names go through :class:`~app.checkpoints.names.NamePlanner`, and the decompressed
bytes are capped by the upload limit and the compression ratio (zip bombs)::

    extract_archive("gpt2.tar.gz", upload_stream, dest, limits)   # dest: an empty folder
"""

from __future__ import annotations

import gzip
import stat
import tarfile
import zipfile
import zlib
from pathlib import Path
from typing import BinaryIO

from app.checkpoints.errors import CheckpointError, UploadLimits, human_bytes, over_upload_limit
from app.checkpoints.names import NamePlanner, path_parts
from app.checkpoints.writing import ByteMeter, copy_stream


def extract_archive(
    archive_name: str, source: BinaryIO, dest: Path, limits: UploadLimits
) -> None:
    """Extract the archive uploaded as ``archive_name`` (*.zip, *.tar, *.tar.gz, *.tgz) into
    ``dest``; members may sit in one common top-level folder, which is stripped."""
    # The archive itself is kept inside dest so nothing is written elsewhere; no member can have this name, since
    # members must be checkpoint files.
    archive = dest / ".squeeze-upload-archive"
    copy_stream(source, archive, archive_name, ByteMeter(limits), sniff=False)
    try:
        lower = archive_name.lower()
        if lower.endswith(".zip"):
            _extract_zip(archive, dest, limits)
        else:
            _extract_tar(archive, dest, limits, compressed=not lower.endswith(".tar"))
    finally:
        archive.unlink(missing_ok=True)


# ---- zip

# A central-directory record is 46 bytes plus name, extra field and comment; checkpoint members
# have short names, so 2 KiB each is generous. Bounds what zipfile reads into memory.
_ZIP_DIRECTORY_BYTES_PER_MEMBER = 2048


def _extract_zip(archive: Path, dest: Path, limits: UploadLimits) -> None:
    _check_zip_directory(archive, limits)
    try:
        with zipfile.ZipFile(archive) as zf:
            members = zf.infolist()
            _check_member_count(len(members), limits)
            planner = NamePlanner()
            plan: list[tuple[zipfile.ZipInfo, str]] = []
            for info in members:
                # orig_filename is the name as stored; zipfile cuts .filename at a NUL.
                parts_name = info.orig_filename
                path_parts(parts_name)
                if info.is_dir():
                    continue
                kind = stat.S_IFMT(info.external_attr >> 16)
                if kind and kind != stat.S_IFREG:
                    raise _link_or_special_error(parts_name, is_link=kind == stat.S_IFLNK)
                if info.flag_bits & 0x1:
                    raise CheckpointError(
                        f"{parts_name!r} is encrypted; upload an archive without a password."
                    )
                target = planner.place(parts_name)
                if target is not None:
                    plan.append((info, target))
            meter = ByteMeter(limits, archive_size=archive.stat().st_size)
            for info, target in plan:
                with zf.open(info) as source:
                    copy_stream(source, dest / target, target, meter)
    except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, RuntimeError) as exc:
        raise CheckpointError(
            f"the zip archive is damaged or uses unsupported features ({exc}); re-create it "
            "with a standard zip tool."
        ) from None


def _check_zip_directory(archive: Path, limits: UploadLimits) -> None:
    """Read the zip's end record and refuse before zipfile loads an oversized directory.

    zipfile parses the whole central directory into memory whatever the member count says,
    so both the count and the directory's byte size are bounded here.
    """
    size = archive.stat().st_size
    with open(archive, "rb") as f:
        tail_size = min(size, 22 + 65535 + 20)  # end record + longest comment + zip64 locator
        f.seek(size - tail_size)
        tail = f.read(tail_size)
        # Like zipfile: the record normally ends the file; only search when there is a comment.
        at = len(tail) - 22 if tail[-22:-18] == b"PK\x05\x06" else tail.rfind(b"PK\x05\x06")
        if at < 0 or len(tail) - at < 22:
            raise CheckpointError(
                "the file is not a zip archive; re-create it with a standard zip tool."
            )
        count = int.from_bytes(tail[at + 10 : at + 12], "little")
        directory_size = int.from_bytes(tail[at + 12 : at + 16], "little")
        locator = tail[at - 20 : at] if at >= 20 else b""
        if locator.startswith(b"PK\x06\x07"):  # zip64: the real numbers are in another record
            f.seek(int.from_bytes(locator[8:16], "little"))
            record = f.read(56)
            if record.startswith(b"PK\x06\x06") and len(record) == 56:
                count = int.from_bytes(record[32:40], "little")
                directory_size = int.from_bytes(record[40:48], "little")
    _check_member_count(count, limits)
    if directory_size > limits.max_archive_members * _ZIP_DIRECTORY_BYTES_PER_MEMBER + 65536:
        raise CheckpointError(
            f"the zip directory is {human_bytes(directory_size)}, far more than "
            f"{limits.max_archive_members} checkpoint files need; re-create the archive.",
            status_code=413,
        )


# ---- tar

# Long-name and pax records are read whole into memory by tarfile; real ones are tiny.
_MAX_TAR_METADATA_BYTES = 1024 * 1024
_TAR_METADATA_TYPES = frozenset(
    {
        tarfile.GNUTYPE_LONGNAME,
        tarfile.GNUTYPE_LONGLINK,
        tarfile.XHDTYPE,
        tarfile.XGLTYPE,
        tarfile.SOLARIS_XHDTYPE,
    }
)


class _GuardedTarInfo(tarfile.TarInfo):
    """Sees every raw tar header (frombuf is the public hook) and refuses oversized metadata."""

    @classmethod
    def frombuf(cls, buf, encoding, errors):
        info = super().frombuf(buf, encoding, errors)
        if info.type in _TAR_METADATA_TYPES and info.size > _MAX_TAR_METADATA_BYTES:
            raise CheckpointError(
                f"the tar archive has a {info.size}-byte extended header, which no checkpoint "
                "needs; re-create the archive with a standard tar tool."
            )
        return info


class _CappedReader:
    """A read-only stream that fails once more than ``cap`` bytes have come out of it.

    Wraps the decompressed tar stream, so a bomb is stopped however tarfile spends the bytes
    (member data, skipped data or headers).
    """

    def __init__(self, stream: BinaryIO, cap: float) -> None:
        self._stream = stream
        self._cap = cap
        self._count = 0

    def read(self, size: int = -1) -> bytes:
        data = self._stream.read(size)
        self._count += len(data)
        if self._count > self._cap:
            raise CheckpointError(
                "the archive expands far beyond its size or the upload limit (zip bomb?); "
                "upload the files uncompressed or as a plain .tar.",
                status_code=413,
            )
        return data


def _extract_tar(archive: Path, dest: Path, limits: UploadLimits, *, compressed: bool) -> None:
    archive_size = archive.stat().st_size
    meter = ByteMeter(limits, archive_size=archive_size)
    # Headers and padding add to the member data; allow for them on top of the byte limits.
    slack = 1024 * 1024 + 1024 * limits.max_archive_members
    cap = min(limits.max_total_bytes, limits.max_compression_ratio * max(archive_size, 1)) + slack
    planner = NamePlanner()
    try:
        with open(archive, "rb") as raw:
            stream = gzip.GzipFile(fileobj=raw, mode="rb") if compressed else raw
            # "r|": a single forward pass; we decompress ourselves so that every byte is capped.
            with tarfile.open(
                fileobj=_CappedReader(stream, cap), mode="r|", tarinfo=_GuardedTarInfo
            ) as tf:
                for count, member in enumerate(tf, start=1):
                    _check_member_count(count, limits)
                    path_parts(member.name)
                    if member.isdir():
                        continue
                    if member.issym() or member.islnk():
                        raise _link_or_special_error(member.name, is_link=True)
                    if not member.isreg() or member.issparse():
                        raise _link_or_special_error(member.name, is_link=False)
                    target = planner.place(member.name)
                    if target is None:
                        continue
                    # The header's size only lets us refuse early; the copy counts for real.
                    if meter.total + member.size > limits.max_total_bytes:
                        raise over_upload_limit(limits)
                    source = tf.extractfile(member)
                    copy_stream(source, dest / target, target, meter)
    except (tarfile.TarError, gzip.BadGzipFile, EOFError, zlib.error) as exc:
        raise CheckpointError(
            f"the tar archive is damaged or not a tar archive ({exc}); re-create it with "
            "'tar czf checkpoint.tar.gz folder/'."
        ) from None


def _check_member_count(count: int, limits: UploadLimits) -> None:
    if count > limits.max_archive_members:
        raise CheckpointError(
            f"the archive has more than {limits.max_archive_members} members; a checkpoint "
            "needs far fewer. Archive only the checkpoint folder.",
            status_code=413,
        )


def _link_or_special_error(name: str, *, is_link: bool) -> CheckpointError:
    what = "a link" if is_link else "not a regular file (device, fifo or sparse file)"
    return CheckpointError(
        f"archive member {name!r} is {what}; archives may only hold regular files. "
        "Copy the real files into the folder and archive it again."
    )

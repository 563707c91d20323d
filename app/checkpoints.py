"""Receive an uploaded Hugging Face checkpoint and check it before anything runs on it.

A checkpoint is the folder ``save_pretrained`` writes: ``config.json``, safetensors weights and
optionally tokenizer files. It arrives either as several files or as one archive (zip, tar,
tar.gz). Two steps, used by the upload endpoint::

    from app.checkpoints import CheckpointError, UploadLimits, inspect_checkpoint, stage_upload
    from app.config import get_settings

    limits = UploadLimits.from_settings(get_settings())
    try:
        stage_upload([(f.filename, f.file) for f in uploads], dest, limits)  # dest: an empty folder
        info = inspect_checkpoint(dest, limits)
    except CheckpointError as exc:
        ...  # answer exc.status_code (400 or 413) with exc.message, blaming exc.param
    info.architecture, info.num_parameters, info.sha256   # ("GPT2LMHeadModel", 124439808, "9f…")

Nothing uploaded is ever executed, unpickled or imported, and no real weights are allocated:
names are checked before anything is written, archives are extracted member by member with
every byte counted, JSON is parsed strictly, safetensors headers are checked by hand
(:mod:`app.safetensors_header`), and the architecture is built on the ``meta`` device only to
learn which tensors and shapes ``config.json`` implies.
"""

from __future__ import annotations

import gzip
import hashlib
import math
import os
import re
import shutil
import stat
import tarfile
import zipfile
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from app.safetensors_header import (
    TORCH_DTYPE_NAMES,
    SafetensorsHeaderError,
    TensorEntry,
    loads_strict_json,
    read_header,
)

# Checking a tokenizer goes through transformers/huggingface_hub, which would otherwise try to
# reach the Hub for files a checkpoint lacks. An upload is judged on what it contains.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# Model families Squeeze compresses. Each must also be a causal LM in the installed transformers.
SUPPORTED_MODEL_TYPES: frozenset[str] = frozenset(
    {"gpt2", "gpt_bigcode", "llama", "mistral", "qwen2", "opt"}
)

CHUNK_BYTES = 1024 * 1024

CONVERT_HINT = (
    "Convert the weights to safetensors, e.g. "
    "model.save_pretrained(dir, safe_serialization=True), and upload that folder."
)


class CheckpointError(Exception):
    """A bad upload.

    ``status_code`` is 400, or 413 when a size limit was hit; ``message`` says what is wrong
    and what to do; ``param`` names the request field at fault.
    """

    def __init__(self, message: str, *, param: str = "files", status_code: int = 400) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.status_code = status_code


@dataclass
class UploadLimits:
    """The size limits an upload is held to (see the ``max_*`` fields of ``Settings``)."""

    max_total_bytes: int
    max_archive_members: int
    max_compression_ratio: float
    max_header_bytes: int
    max_parameters: int

    @classmethod
    def from_settings(cls, settings) -> UploadLimits:
        return cls(
            max_total_bytes=settings.max_upload_bytes,
            max_archive_members=settings.max_archive_members,
            max_compression_ratio=settings.max_compression_ratio,
            max_header_bytes=settings.max_safetensors_header_bytes,
            max_parameters=settings.max_model_parameters,
        )


@dataclass
class CheckpointInfo:
    architecture: str  # e.g. "GPT2LMHeadModel"
    model_type: str  # e.g. "gpt2"
    num_parameters: int  # parameters of the architecture, tied ones counted once
    size_bytes: int  # all files in the folder
    sha256: str  # of the sha256sum-style manifest of all files, see _manifest_sha256
    files: list[dict]  # [{"name", "size_bytes", "sha256"}] sorted by name
    has_tokenizer: bool
    context_length: int | None
    dtype: str  # dominant dtype of the weights, e.g. "float32"


# --------------------------------------------------------------------------------------------
# File names: which are safe, and which belong in a checkpoint.

CONFIG_FILE = "config.json"
INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_FILES = frozenset(
    {
        "tokenizer.json",
        "tokenizer_config.json",
        "vocab.json",
        "merges.txt",
        "special_tokens_map.json",
        "added_tokens.json",
        "tokenizer.model",
        "spiece.model",
        "vocab.txt",
        "chat_template.jinja",
    }
)
# The tokenizer files that hold a vocabulary; the others only configure one.
VOCABULARY_FILES = frozenset(
    {"tokenizer.json", "vocab.json", "merges.txt", "tokenizer.model", "spiece.model", "vocab.txt"}
)
ALLOWED_NAMES = frozenset(
    {CONFIG_FILE, INDEX_FILE, "generation_config.json", "README.md", "LICENSE", ".gitattributes"}
    | TOKENIZER_FILES
)
_SAFETENSORS_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,200}\.safetensors")

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib")
CODE_SUFFIXES = (".py", ".pyc", ".so", ".sh")
OTHER_WEIGHT_SUFFIXES = (".h5", ".msgpack", ".onnx", ".gguf", ".npz", ".npy")
ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz")

# Clutter that macOS puts in zips; never extracted, never an error.
_JUNK_FOLDERS = frozenset({"__MACOSX"})
_JUNK_NAMES = frozenset({".DS_Store"})


def check_file_name(name: str) -> None:
    """Refuse ``name`` (a bare file name) unless it is a file a checkpoint may contain.

    >>> check_file_name("model-00001-of-00002.safetensors")
    >>> check_file_name("pytorch_model.bin")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    app.checkpoints.CheckpointError: pytorch_model.bin is a pickle-based weights file, ...
    """
    lower = name.lower()
    if lower.endswith(PICKLE_SUFFIXES):
        raise CheckpointError(
            f"{name} is a pickle-based weights file, and pickles can run code when loaded, so "
            f"Squeeze never opens them. {CONVERT_HINT}"
        )
    if lower.endswith(CODE_SUFFIXES):
        raise CheckpointError(
            f"{name} is code; uploaded code is never run. Upload a checkpoint whose "
            "architecture is built into transformers (no custom modeling files)."
        )
    if lower.endswith(OTHER_WEIGHT_SUFFIXES):
        raise CheckpointError(
            f"{name} is not a safetensors file; weights must be safetensors. {CONVERT_HINT}"
        )
    if lower.endswith(ARCHIVE_SUFFIXES):
        raise CheckpointError(
            f"{name} is an archive; upload an archive on its own, not alongside other files "
            "or inside another archive."
        )
    if name in ALLOWED_NAMES or _SAFETENSORS_NAME.fullmatch(name):
        return
    raise CheckpointError(
        f"{name} is not a file a checkpoint may contain. Allowed: config.json, *.safetensors, "
        f"{INDEX_FILE}, generation_config.json, tokenizer files "
        f"({', '.join(sorted(TOKENIZER_FILES))}), README.md, LICENSE and .gitattributes. "
        "Remove the other files and upload again."
    )


def plain_file_name(raw: object) -> str:
    """``raw`` if it is one plain file name (no folders, NUL, control characters, ``..``)."""
    parts = _path_parts(raw)
    if len(parts) != 1:
        raise CheckpointError(f"{raw!r} must be a plain file name, without folders")
    return parts[0]


def _path_parts(raw: object) -> list[str]:
    """Split a client-supplied path into its components, refusing anything that could escape.

    ``"./gpt2/config.json"`` gives ``["gpt2", "config.json"]``. The caller decides what
    depth is acceptable; this only guarantees each part is a plain name.
    """
    if not isinstance(raw, str) or not raw:
        raise CheckpointError("a file has an empty name; give every file its name.")
    if "\x00" in raw:
        raise CheckpointError(f"the file name {raw!r} contains a NUL byte; rename the file.")
    if any(ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0 for c in raw):
        raise CheckpointError(
            f"the file name {raw!r} contains control characters; rename the file."
        )
    if "\\" in raw:
        raise CheckpointError(
            f"the file name {raw!r} contains a backslash; use plain names such as config.json."
        )
    if raw.startswith("/") or re.match(r"[A-Za-z]:", raw):
        raise CheckpointError(
            f"the file name {raw!r} is an absolute path; archive the checkpoint folder with "
            "relative names."
        )
    parts = [part for part in raw.split("/") if part not in ("", ".")]
    if ".." in parts:
        raise CheckpointError(
            f"the file name {raw!r} contains '..'; names may not point outside the checkpoint."
        )
    return parts


class _NamePlanner:
    """Turns the paths of an upload into flat file names, one at a time.

    Files may all sit at the top level, or all inside one common folder (the folder an
    archive was made from), which is stripped. Anything deeper, a mix of the two, or two
    files with the same final name is refused.
    """

    _UNDECIDED = object()

    def __init__(self) -> None:
        self._folder: object = self._UNDECIDED
        self._names: set[str] = set()

    def place(self, raw: str) -> str | None:
        """The name to store ``raw`` under, or None for clutter that is skipped."""
        parts = _path_parts(raw)
        if not parts:
            raise CheckpointError(f"the file name {raw!r} names no file; give every file its name.")
        if parts[0] in _JUNK_FOLDERS or parts[-1] in _JUNK_NAMES:
            return None
        if len(parts) > 2:
            raise CheckpointError(
                f"{raw!r} is in a nested folder; put all checkpoint files in one folder "
                "(the one save_pretrained wrote) and upload or archive that."
            )
        folder = parts[0] if len(parts) == 2 else None
        if self._folder is self._UNDECIDED:
            self._folder = folder
        elif folder != self._folder:
            raise CheckpointError(
                f"{raw!r} is not in the same folder as the other files; all files must be at "
                "the top level or all inside one common folder."
            )
        name = parts[-1]
        check_file_name(name)
        if name in self._names:
            raise CheckpointError(f"{name} appears twice in the upload; send each file once.")
        self._names.add(name)
        return name


# --------------------------------------------------------------------------------------------
# Content sniffing: formats that can run code, whatever their name says.


def _refuse_disguised_formats(
    name: str, head: bytes, file_size: int | None, path: Path | None
) -> None:
    """Refuse pickles and torch zips by content.

    ``head`` is the first bytes (at least 64 when the file has them). A pickle of protocol 2+
    starts with 0x80 and the protocol number; a torch.save file is a zip holding data.pkl.
    """
    if (
        len(head) >= 2
        and head[0] == 0x80
        and 2 <= head[1] <= 5
        and not _looks_like_safetensors(head, file_size)
    ):
        raise CheckpointError(
            f"{name} is a Python pickle, whatever its name says; pickles can run code when "
            f"loaded, so Squeeze never opens them. {CONVERT_HINT}"
        )
    if head.startswith(b"PK\x03\x04"):
        if _zip_holds_pickle(head, path):
            raise CheckpointError(
                f"{name} is a PyTorch torch.save file (a zip of pickles), whatever its name "
                f"says; Squeeze never unpickles uploads. {CONVERT_HINT}"
            )
        raise CheckpointError(
            f"{name} is a zip archive, not a {name.rsplit('.', 1)[-1]} file; upload the "
            "checkpoint files themselves, or one archive on its own."
        )


def _looks_like_safetensors(head: bytes, file_size: int | None) -> bool:
    # A safetensors length prefix can begin with the bytes 0x80 0x02 (a 640-byte header);
    # what follows it is "{", which no pickle has at byte 8 after six zero bytes.
    if len(head) < 9 or head[8:9] != b"{":
        return False
    header_size = int.from_bytes(head[:8], "little")
    return file_size is None or 8 + header_size <= file_size


def _zip_holds_pickle(head: bytes, path: Path | None) -> bool:
    if path is not None:
        try:
            with zipfile.ZipFile(path) as zf:
                return any(n == "data.pkl" or n.endswith("/data.pkl") for n in zf.namelist())
        except (zipfile.BadZipFile, OSError, ValueError):
            pass
    # Without the whole file, look at the first member's name: torch writes data.pkl first.
    name_length = int.from_bytes(head[26:28], "little")
    return head[30 : 30 + name_length].endswith(b"data.pkl")


# --------------------------------------------------------------------------------------------
# Staging: write the upload into an empty folder, counting every byte.


def stage_upload(files: list[tuple[str, BinaryIO]], dest: Path, limits: UploadLimits) -> None:
    """Store an upload in the empty folder ``dest``, streaming in chunks.

    ``files`` are (client file name, readable binary file) pairs. One file named *.zip,
    *.tar, *.tar.gz or *.tgz is an archive and is extracted into ``dest`` (members may sit in
    one common top-level folder, which is stripped); otherwise each file is stored under its
    base name. Names are checked before anything is written. On any error ``dest`` is left
    empty and :class:`CheckpointError` is raised (413 for size limits).

    >>> stage_upload([("config.json", open("config.json", "rb")),           # doctest: +SKIP
    ...               ("model.safetensors", open("model.safetensors", "rb"))], dest, limits)
    >>> stage_upload([("gpt2.tar.gz", open("gpt2.tar.gz", "rb"))], dest, limits)  # doctest: +SKIP
    """
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    if any(dest.iterdir()):
        raise ValueError(f"stage_upload needs an empty folder, and {dest} is not empty")
    if not files:
        raise CheckpointError("no files were uploaded; send the checkpoint files or one archive.")
    try:
        archive_name = _path_parts(files[0][0])[-1:] if len(files) == 1 else []
        if archive_name and archive_name[0].lower().endswith(ARCHIVE_SUFFIXES):
            _stage_archive(archive_name[0], files[0][1], dest, limits)
        else:
            _stage_files(files, dest, limits)
    except BaseException:
        # Leave nothing half-written behind: a partial upload is never a checkpoint.
        _empty_folder(dest)
        raise


def _stage_files(files: list[tuple[str, BinaryIO]], dest: Path, limits: UploadLimits) -> None:
    planner = _NamePlanner()
    targets = [planner.place(raw) for raw, _ in files]  # every name checked before any write
    meter = _ByteMeter(limits)
    for target, (_, source) in zip(targets, files, strict=True):
        if target is not None:
            _copy_stream(source, dest / target, target, meter)


def _stage_archive(archive_name: str, source: BinaryIO, dest: Path, limits: UploadLimits) -> None:
    # Kept inside dest so nothing is written elsewhere; no member can have this name, since
    # members must be checkpoint files.
    archive = dest / ".squeeze-upload-archive"
    _copy_stream(source, archive, archive_name, _ByteMeter(limits), sniff=False)
    try:
        lower = archive_name.lower()
        if lower.endswith(".zip"):
            _extract_zip(archive, dest, limits)
        else:
            _extract_tar(archive, dest, limits, compressed=not lower.endswith(".tar"))
    finally:
        archive.unlink(missing_ok=True)


class _ByteMeter:
    """Counts bytes written; raises 413 past the upload limit or, for archives, past the ratio."""

    def __init__(self, limits: UploadLimits, archive_size: int | None = None) -> None:
        self.limits = limits
        self.archive_size = archive_size
        self.total = 0

    def add(self, count: int) -> None:
        self.total += count
        if self.total > self.limits.max_total_bytes:
            raise _over_upload_limit(self.limits)
        if self.archive_size is not None:
            ceiling = self.limits.max_compression_ratio * max(self.archive_size, 1)
            if self.total > ceiling:
                raise CheckpointError(
                    f"the archive expands to more than {self.limits.max_compression_ratio:g} "
                    "times its size, which real checkpoints never do (zip bomb?); upload the "
                    "files uncompressed or as a plain .tar.",
                    status_code=413,
                )


def _over_upload_limit(limits: UploadLimits) -> CheckpointError:
    return CheckpointError(
        f"the upload is over the limit of {_human_bytes(limits.max_total_bytes)}; "
        "upload a smaller checkpoint.",
        status_code=413,
    )


def _copy_stream(
    source: BinaryIO, target: Path, name: str, meter: _ByteMeter, *, sniff: bool = True
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
                _refuse_disguised_formats(name, chunk[:64], None, None)
            first = False
            meter.add(len(chunk))
            out.write(chunk)


def _empty_folder(folder: Path) -> None:
    for entry in os.scandir(folder):
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path, ignore_errors=True)
        else:
            try:
                os.unlink(entry.path)
            except FileNotFoundError:
                pass


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
            planner = _NamePlanner()
            plan: list[tuple[zipfile.ZipInfo, str]] = []
            for info in members:
                # orig_filename is the name as stored; zipfile cuts .filename at a NUL.
                parts_name = info.orig_filename
                _path_parts(parts_name)
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
            meter = _ByteMeter(limits, archive_size=archive.stat().st_size)
            for info, target in plan:
                with zf.open(info) as source:
                    _copy_stream(source, dest / target, target, meter)
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
            f"the zip directory is {_human_bytes(directory_size)}, far more than "
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
    meter = _ByteMeter(limits, archive_size=archive_size)
    # Headers and padding add to the member data; allow for them on top of the byte limits.
    slack = 1024 * 1024 + 1024 * limits.max_archive_members
    cap = min(limits.max_total_bytes, limits.max_compression_ratio * max(archive_size, 1)) + slack
    planner = _NamePlanner()
    try:
        with open(archive, "rb") as raw:
            stream = gzip.GzipFile(fileobj=raw, mode="rb") if compressed else raw
            # "r|": a single forward pass; we decompress ourselves so that every byte is capped.
            with tarfile.open(
                fileobj=_CappedReader(stream, cap), mode="r|", tarinfo=_GuardedTarInfo
            ) as tf:
                for count, member in enumerate(tf, start=1):
                    _check_member_count(count, limits)
                    _path_parts(member.name)
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
                        raise _over_upload_limit(limits)
                    source = tf.extractfile(member)
                    _copy_stream(source, dest / target, target, meter)
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


# --------------------------------------------------------------------------------------------
# Inspection: check a staged folder and describe it.

# JSON files are read whole; the largest real ones (big tokenizer.json) are tens of MB.
MAX_JSON_BYTES = 64 * 1024 * 1024

# Bounds on config.json, checked before any object is built from it.
MAX_LAYERS = 1024
MAX_HIDDEN = 65536
MAX_VOCAB = 2_000_000
MAX_INTERMEDIATE = 1 << 20
MAX_POSITIONS = 1 << 24
MAX_HEAD_DIM = 4096
_CONFIG_BOUNDS: dict[str, tuple[int, str]] = {
    "n_layer": (MAX_LAYERS, "layers"),
    "num_hidden_layers": (MAX_LAYERS, "layers"),
    "num_layers": (MAX_LAYERS, "layers"),
    "n_embd": (MAX_HIDDEN, "hidden size"),
    "hidden_size": (MAX_HIDDEN, "hidden size"),
    "d_model": (MAX_HIDDEN, "hidden size"),
    "word_embed_proj_dim": (MAX_HIDDEN, "embedding size"),
    "n_head": (MAX_HIDDEN, "attention heads"),
    "num_attention_heads": (MAX_HIDDEN, "attention heads"),
    "num_key_value_heads": (MAX_HIDDEN, "key/value heads"),
    "vocab_size": (MAX_VOCAB, "vocabulary size"),
    "n_inner": (MAX_INTERMEDIATE, "MLP size"),
    "intermediate_size": (MAX_INTERMEDIATE, "MLP size"),
    "ffn_dim": (MAX_INTERMEDIATE, "MLP size"),
    "n_positions": (MAX_POSITIONS, "positions"),
    "n_ctx": (MAX_POSITIONS, "positions"),
    "max_position_embeddings": (MAX_POSITIONS, "positions"),
    "head_dim": (MAX_HEAD_DIM, "head size"),
}
# Families whose position embeddings are a learned table (so count towards parameters).
_LEARNED_POSITIONS = frozenset({"gpt2", "gpt_bigcode", "opt"})
# Where trust_remote_code / auto_map could hide. Data maps (vocabularies, the index) are not
# searched: a token may legitimately be called "auto_map".
_SETTINGS_JSON = (
    "config.json",
    "generation_config.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
)


def inspect_checkpoint(folder: Path, limits: UploadLimits) -> CheckpointInfo:
    """Check the staged checkpoint in ``folder`` and describe it.

    Cheap checks run first (names, sizes, content sniffing, JSON, config bounds, safetensors
    headers), then the architecture is built on the meta device to compare tensor names and
    shapes, then any tokenizer is loaded, and finally every file is hashed. Raises
    :class:`CheckpointError` (400, or 413 for size limits) on the first problem.

    >>> info = inspect_checkpoint(dest, limits)                        # doctest: +SKIP
    >>> info.architecture, info.num_parameters, info.context_length    # doctest: +SKIP
    ('GPT2LMHeadModel', 124439808, 1024)
    """
    folder = Path(folder)
    sizes = _list_files(folder, limits)
    if CONFIG_FILE not in sizes:
        raise CheckpointError(
            "config.json is missing; upload the whole folder that save_pretrained wrote."
        )
    weight_files = sorted(name for name in sizes if name.endswith(".safetensors"))
    if not weight_files:
        raise CheckpointError(f"there are no .safetensors weights in the upload. {CONVERT_HINT}")

    documents = {
        name: _read_json_object(folder / name, name) for name in sizes if name.endswith(".json")
    }
    _refuse_remote_code(documents)
    config_doc = documents[CONFIG_FILE]
    model_type, architecture = _model_type_and_architecture(config_doc)
    _check_config_bounds(config_doc)
    config = _build_config(model_type, config_doc)
    _check_config_size(model_type, config, config_doc, limits)

    tensors = _read_weight_headers(folder, weight_files, documents.get(INDEX_FILE), limits)
    stored = sum(entry.num_elements for entry in tensors.values())
    if stored > limits.max_parameters:  # before building even the meta model
        raise CheckpointError(_too_many_parameters(stored, limits, what="the weight files hold"))
    num_parameters, dtype = _match_architecture(config, architecture, tensors)
    if num_parameters > limits.max_parameters:
        raise CheckpointError(_too_many_parameters(num_parameters, limits))

    has_tokenizer = _check_tokenizer(folder, set(sizes))
    files = [
        {"name": name, "size_bytes": sizes[name], "sha256": _sha256_file(folder / name)}
        for name in sorted(sizes)
    ]
    return CheckpointInfo(
        architecture=architecture,
        model_type=model_type,
        num_parameters=num_parameters,
        size_bytes=sum(sizes.values()),
        sha256=_manifest_sha256(files),
        files=files,
        has_tokenizer=has_tokenizer,
        context_length=_context_length(config),
        dtype=dtype,
    )


def _list_files(folder: Path, limits: UploadLimits) -> dict[str, int]:
    """Name -> size of every file, after checking names, file types, total size and content."""
    sizes: dict[str, int] = {}
    with os.scandir(folder) as entries:
        for entry in entries:
            if _path_parts(entry.name) != [entry.name]:
                raise CheckpointError(f"{entry.name!r} is not a plain file name.")
            if entry.is_symlink():
                raise CheckpointError(f"{entry.name} is a link; only regular files are accepted.")
            if not entry.is_file(follow_symlinks=False):
                raise CheckpointError(
                    f"{entry.name} is a folder or special file; put all checkpoint files in one "
                    "flat folder."
                )
            check_file_name(entry.name)
            sizes[entry.name] = entry.stat(follow_symlinks=False).st_size
    total = sum(sizes.values())
    if total > limits.max_total_bytes:
        raise CheckpointError(
            f"the checkpoint is {_human_bytes(total)}, over the limit of "
            f"{_human_bytes(limits.max_total_bytes)}.",
            status_code=413,
        )
    for name, size in sizes.items():
        with open(folder / name, "rb") as f:
            head = f.read(64)
        _refuse_disguised_formats(name, head, size, folder / name)
    return sizes


def _read_json_object(path: Path, name: str) -> dict:
    size = path.stat().st_size
    if size > MAX_JSON_BYTES:
        raise CheckpointError(
            f"{name} is {_human_bytes(size)}; JSON files over {_human_bytes(MAX_JSON_BYTES)} "
            "are not accepted.",
            status_code=413,
        )
    try:
        document = loads_strict_json(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise CheckpointError(f"{name} is not valid JSON ({exc}); fix or re-save it.") from None
    if not isinstance(document, dict):
        raise CheckpointError(
            f"{name} must hold a JSON object ({{...}}), not {type(document).__name__}."
        )
    return document


def _refuse_remote_code(documents: dict[str, dict]) -> None:
    """Refuse configs that ask transformers to import code shipped with the checkpoint."""
    for name in _SETTINGS_JSON:
        if name in documents:
            found = _find_keys(documents[name], {"auto_map", "trust_remote_code"})
            if found:
                raise CheckpointError(
                    f"{name} contains {found!r}, which asks to run code shipped with the "
                    "model; uploaded code is never run. Remove it and use an architecture "
                    f"built into transformers ({', '.join(sorted(SUPPORTED_MODEL_TYPES))})."
                )


def _find_keys(value: object, keys: set[str]) -> str | None:
    if isinstance(value, dict):
        for key, item in value.items():
            if key in keys:
                return key
            found = _find_keys(item, keys)
            if found:
                return found
    elif isinstance(value, list):
        for item in value:
            found = _find_keys(item, keys)
            if found:
                return found
    return None


def _model_type_and_architecture(config_doc: dict) -> tuple[str, str]:
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_MAPPING_NAMES,
    )

    supported = ", ".join(sorted(SUPPORTED_MODEL_TYPES))
    model_type = config_doc.get("model_type")
    if not isinstance(model_type, str):
        raise CheckpointError(
            f"config.json has no model_type; re-save the model with save_pretrained. "
            f"Supported types: {supported}."
        )
    if (
        model_type not in SUPPORTED_MODEL_TYPES
        or model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    ):
        raise CheckpointError(
            f"model_type {model_type!r} is not supported; Squeeze compresses causal language "
            f"models of these types: {supported}."
        )
    causal = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type]
    architectures = config_doc.get("architectures")
    if architectures is None or architectures == []:
        return model_type, causal
    if not isinstance(architectures, list) or not all(isinstance(a, str) for a in architectures):
        raise CheckpointError("config.json: architectures must be a list of class names.")
    # A base-model checkpoint (e.g. GPT2Model) loads as the causal LM when its head is tied.
    if architectures[0] == MODEL_MAPPING_NAMES.get(model_type):
        return model_type, causal
    if architectures[0] != causal:
        raise CheckpointError(
            f"config.json says the architecture is {architectures[0]}, which is not a causal "
            f"language model; for model_type {model_type!r} Squeeze expects {causal}."
        )
    return model_type, causal


def _check_config_bounds(config_doc: dict) -> None:
    """Refuse absurd sizes in config.json before any object is built from it.

    Config classes can allocate per layer (e.g. a layer_types list), so a config with 10**12
    layers must not reach them.
    """
    for key, (maximum, what) in _CONFIG_BOUNDS.items():
        if key not in config_doc or config_doc[key] is None:
            continue
        value = config_doc[key]
        if isinstance(value, bool) or not isinstance(value, int):
            raise CheckpointError(f"config.json: {key} must be an integer, not {value!r}.")
        if not 1 <= value <= maximum:
            raise CheckpointError(
                f"config.json: {key} = {value} is out of range for the {what} "
                f"(1 to {maximum}); check the config."
            )


def _build_config(model_type: str, config_doc: dict):
    from transformers import AutoConfig

    fields = {key: value for key, value in config_doc.items() if key != "model_type"}
    try:
        return AutoConfig.for_model(model_type, **fields)
    except Exception as exc:  # transformers raises many types for bad fields
        raise CheckpointError(
            f"config.json is not a valid {model_type} configuration ({exc}); re-save it with "
            "save_pretrained."
        ) from None


def _check_config_size(model_type: str, config, config_doc: dict, limits: UploadLimits) -> None:
    """Check the built config (defaults included) and estimate its size; allocates nothing."""
    values = {}
    for attribute, (maximum, what) in {
        "num_hidden_layers": (MAX_LAYERS, "layers"),
        "hidden_size": (MAX_HIDDEN, "hidden size"),
        "num_attention_heads": (MAX_HIDDEN, "attention heads"),
        "vocab_size": (MAX_VOCAB, "vocabulary size"),
    }.items():
        value = getattr(config, attribute, None)
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= maximum:
            raise CheckpointError(
                f"config.json: the {what} ({attribute} = {value!r}) must be an integer from 1 to "
                f"{maximum}."
            )
        values[attribute] = value
    hidden, heads = values["hidden_size"], values["num_attention_heads"]
    head_dim = config_doc.get("head_dim")
    if head_dim is None and hidden % heads:
        raise CheckpointError(
            f"config.json: the hidden size {hidden} is not divisible by the {heads} attention "
            "heads."
        )
    kv_heads = getattr(config, "num_key_value_heads", None)
    if isinstance(kv_heads, int) and (kv_heads < 1 or heads % kv_heads):
        raise CheckpointError(
            f"config.json: the {heads} attention heads are not divisible by the {kv_heads} "
            "key/value heads."
        )

    # A lower bound on the parameter count: embeddings, the query and output projections and
    # two MLP matrices per layer. Enough to refuse a giant before building even its skeleton.
    sizes = (getattr(config, key, None) for key in ("intermediate_size", "n_inner", "ffn_dim"))
    mlp = next((size for size in sizes if isinstance(size, int)), 4 * hidden)  # GPT-2: 4 x hidden
    query = heads * (head_dim or hidden // heads)
    # OPT can embed tokens in a narrower space than the hidden size.
    embedding = getattr(config, "word_embed_proj_dim", None) or hidden
    layers, vocab = values["num_hidden_layers"], values["vocab_size"]
    estimate = vocab * min(embedding, hidden) + layers * 2 * hidden * (query + mlp)
    if model_type in _LEARNED_POSITIONS:
        positions = getattr(config, "max_position_embeddings", None)
        estimate += hidden * positions if isinstance(positions, int) else 0
    if estimate > limits.max_parameters:
        raise CheckpointError(_too_many_parameters(estimate, limits, at_least=True))


def _read_weight_headers(
    folder: Path, weight_files: list[str], index: dict | None, limits: UploadLimits
) -> dict[str, TensorEntry]:
    """All tensors of all weight files by name, after checking each header and the index."""
    if index is None:
        if weight_files != ["model.safetensors"]:
            raise CheckpointError(
                f"without {INDEX_FILE} the weights must be one file named model.safetensors "
                f"(found: {', '.join(weight_files)}); upload the index save_pretrained wrote."
            )
        weight_map = None
    else:
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
        ):
            raise CheckpointError(f"{INDEX_FILE}: weight_map must map tensor names to file names.")
        listed = set(weight_map.values())
        absent = sorted(listed - set(weight_files))
        if absent:
            raise CheckpointError(
                f"{INDEX_FILE} refers to {', '.join(absent)}, which is not in the upload; "
                "upload every shard."
            )
        unlisted = sorted(set(weight_files) - listed)
        if unlisted:
            raise CheckpointError(
                f"{', '.join(unlisted)} is not listed in {INDEX_FILE}; remove it or upload "
                "the matching index."
            )

    tensors: dict[str, TensorEntry] = {}
    shard_of: dict[str, str] = {}
    for shard in weight_files:
        try:
            header = read_header(folder / shard, max_header_bytes=limits.max_header_bytes)
        except SafetensorsHeaderError as exc:
            raise CheckpointError(
                f"{shard} is not a valid safetensors file: {exc}. Re-save the weights with "
                "save_pretrained.",
                status_code=413 if exc.too_large else 400,
            ) from None
        for name, entry in header.tensors.items():
            if name in tensors:
                raise CheckpointError(
                    f"tensor {name!r} is stored in both {shard_of[name]} and {shard}; each "
                    "tensor must be stored once."
                )
            tensors[name], shard_of[name] = entry, shard

    if weight_map is not None:
        for name, shard in weight_map.items():
            if shard_of.get(name) != shard:
                raise CheckpointError(
                    f"{INDEX_FILE} places tensor {name!r} in {shard}, but it is not there; "
                    "re-save the checkpoint so index and shards agree."
                )
        unindexed = sorted(set(tensors) - set(weight_map))
        if unindexed:
            raise CheckpointError(
                f"tensor {unindexed[0]!r} is not listed in {INDEX_FILE}; re-save the checkpoint "
                "so index and shards agree."
            )
    return tensors


def _match_architecture(
    config, architecture: str, tensors: dict[str, TensorEntry]
) -> tuple[int, str]:
    """Compare the stored tensors with what the architecture needs; return (parameters, dtype).

    The model is built on the meta device: shapes only, no memory. Every parameter must be
    stored with its shape. Tied parameters (one tensor under several names, like an LM head
    tied to the embeddings) need only one of their names; buffers are optional (transformers
    recomputes them); extra tensors (e.g. old GPT-2 attention-mask buffers) are ignored, as
    from_pretrained ignores them. Names without the base-model prefix ("h.0..." for
    "transformer.h.0...") are accepted, as in old GPT-2 checkpoints.
    """
    import torch
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(
                config, trust_remote_code=False, attn_implementation="eager"
            )
    except Exception as exc:  # a config that passes AutoConfig can still fail to build
        raise CheckpointError(
            f"config.json does not build a {architecture} ({exc}); check the config."
        ) from None

    expected = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    # Group parameter names by the tensor they share; each group needs one stored name.
    groups: dict[int, list[str]] = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(parameter), []).append(name)
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    groups = _merge_tied_groups(list(groups.values()), tied)

    prefix = f"{model.base_model_prefix}." if model.base_model_prefix else ""
    stored_as: dict[str, str] = {}  # model name -> stored name
    for stored in tensors:
        name = stored if stored in expected else prefix + stored
        if name not in expected:
            continue
        if name in stored_as:
            raise CheckpointError(
                f"tensors {stored_as[name]!r} and {stored!r} are the same weight stored twice; "
                "keep one."
            )
        stored_as[name] = stored

    wrong_shape = [  # in the model's order, so the first reported is the first that differs
        f"{stored_as[name]} is {list(tensors[stored_as[name]].shape)} but config.json implies "
        f"{list(shape)}"
        for name, shape in expected.items()
        if name in stored_as and tensors[stored_as[name]].shape != shape
    ]
    if wrong_shape:
        raise CheckpointError(
            f"{len(wrong_shape)} tensors do not have the shapes config.json describes: "
            f"{_first_few(wrong_shape)}. The weights and config.json belong to different models; "
            "upload the pair save_pretrained wrote."
        )
    missing = [group[0] for group in groups if not any(name in stored_as for name in group)]
    if missing:
        raise CheckpointError(
            f"the weights lack {len(missing)} tensors that {architecture} needs: "
            f"{_first_few(missing)}. The weights and config.json belong to different models, "
            "or the checkpoint is incomplete; upload the folder save_pretrained wrote."
        )

    num_parameters = sum(math.prod(expected[group[0]]) for group in groups)
    by_dtype: dict[str, int] = {}
    for stored in stored_as.values():
        entry = tensors[stored]
        by_dtype[entry.dtype] = by_dtype.get(entry.dtype, 0) + entry.num_elements
    dtype = max(by_dtype, key=by_dtype.get) if by_dtype else "F32"
    return num_parameters, TORCH_DTYPE_NAMES[dtype]


def _merge_tied_groups(groups: list[list[str]], tied: dict[str, str]) -> list[list[str]]:
    # On the meta device tying normally shares the Parameter object already; transformers' own
    # {tied name: source name} map covers the case where it does not.
    for target, source in tied.items():
        target_group = next((g for g in groups if target in g), None)
        source_group = next((g for g in groups if source in g), None)
        if (
            target_group is not None
            and source_group is not None
            and target_group is not source_group
        ):
            source_group.extend(target_group)
            groups.remove(target_group)
    return groups


def _check_tokenizer(folder: Path, names: set[str]) -> bool:
    """Load the tokenizer if the upload has one; True when it did."""
    present = sorted(names & TOKENIZER_FILES)
    if not present:
        return False
    if not names & VOCABULARY_FILES:
        raise CheckpointError(
            f"{', '.join(present)} is present but no vocabulary file "
            f"({', '.join(sorted(VOCABULARY_FILES))}); upload the whole tokenizer "
            "(tokenizer.save_pretrained) or remove those files."
        )
    from transformers import AutoTokenizer

    try:
        AutoTokenizer.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False)
    except BaseException as exc:  # the Rust tokenizers library panics with a BaseException
        if isinstance(exc, (KeyboardInterrupt, SystemExit, GeneratorExit)):
            raise
        raise CheckpointError(
            f"the tokenizer files do not load ({type(exc).__name__}: {exc}); re-save them with "
            "tokenizer.save_pretrained, or remove them to upload the model without a tokenizer."
        ) from None
    return True


def _context_length(config) -> int | None:
    value = getattr(config, "max_position_embeddings", None)  # gpt2 maps this to n_positions
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def _manifest_sha256(files: Iterable[dict]) -> str:
    """sha256 of the folder's manifest: ``sha256sum``-style lines ``"<sha256>  <name>\\n"``,
    sorted by name. It changes when any file's name or content does, and only then.
    """
    manifest = "".join(
        f"{f['sha256']}  {f['name']}\n" for f in sorted(files, key=lambda f: f["name"])
    )
    return hashlib.sha256(manifest.encode("utf-8")).hexdigest()


def _too_many_parameters(
    count: int, limits: UploadLimits, *, at_least: bool = False, what: str = "the model has"
) -> str:
    amount = f"at least {count:,}" if at_least else f"{count:,}"
    return (
        f"{what} {amount} parameters, over this server's limit of "
        f"{limits.max_parameters:,}; upload a smaller model."
    )


def _first_few(items: list[str], count: int = 5) -> str:
    shown = "; ".join(items[:count])
    return shown if len(items) <= count else f"{shown} (and {len(items) - count} more)"


def _human_bytes(count: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "bytes" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} GiB"

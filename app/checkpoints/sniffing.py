"""Content sniffing: formats that can run code when loaded, whatever their name says.

A name check alone is not enough: a pickle renamed ``model.safetensors`` or ``config.json``
passes it. Every uploaded file's first bytes are looked at as it is written
(:mod:`app.checkpoints.writing`) and again, with the whole file at hand, when the staged
folder is inspected.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

from app.checkpoints.errors import CONVERT_HINT, CheckpointError


def refuse_disguised_formats(
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


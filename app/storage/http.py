"""Serving a stored object over HTTP: ``Range``, ``If-Range``, ``HEAD``, or a presigned redirect.

A file of the local backend goes out as a ``FileResponse`` (sendfile, every Range form); an
object of the S3 backend is streamed from the store with one ranged GET, chunk by chunk, so the
API's memory stays flat whatever the artifact's size. A ``Range`` naming several ranges, or one
that does not parse, is answered with the whole object (RFC 9110 lets a server ignore it).
"""

from __future__ import annotations

import re

from fastapi import Request
from fastapi.responses import FileResponse, RedirectResponse, Response, StreamingResponse

from app.storage.base import Storage

_RANGE = re.compile(r"bytes=(\d*)-(\d*)")


def parse_range(header: str, size: int) -> tuple[int, int] | None | str:
    """``(start, end)`` inclusive for one satisfiable range; ``None`` to send the whole object;
    ``"unsatisfiable"`` when the range lies past the end."""
    match = _RANGE.fullmatch(header.replace(" ", ""))
    if not match or match.groups() == ("", ""):
        return None
    first, last = match.groups()
    if first == "":  # the last N bytes
        length = int(last)
        return "unsatisfiable" if length == 0 or size == 0 else (max(0, size - length), size - 1)
    start = int(first)
    end = size - 1 if last == "" else min(int(last), size - 1)
    if last != "" and int(last) < start:
        return None  # invalid: ignored
    return "unsatisfiable" if start >= size else (start, end)


def object_response(store: Storage, key: str, request: Request, *, filename: str, media_type: str,
                    headers: dict[str, str], etag: str, presign_ttl_s: int | None = None) -> Response:
    """The response for GET or HEAD of ``key``; ``headers`` (checksum, ETag) go on every answer.
    With ``presign_ttl_s`` and a backend that can sign URLs, a 307 to the store itself."""
    path = store.local_file(key)
    if path is not None:
        return FileResponse(path, media_type=media_type, filename=filename, headers=headers)
    if presign_ttl_s and request.method == "GET" and (url := store.presign(key, presign_ttl_s, filename)):
        return RedirectResponse(url, status_code=307, headers=headers)
    info = store.head(key)
    if info is None:
        raise FileNotFoundError(key)
    headers = {**headers, "Accept-Ranges": "bytes",
               "Content-Disposition": f'attachment; filename="{filename}"'}
    wanted = request.headers.get("range")
    if_range = request.headers.get("if-range")
    chosen = parse_range(wanted, info.size) if wanted and (if_range is None or if_range == etag) else None
    if chosen == "unsatisfiable":
        return Response(status_code=416, headers={**headers, "Content-Range": f"bytes */{info.size}"})
    start, end, status = (0, info.size - 1, 200) if chosen is None else (*chosen, 206)
    headers["Content-Length"] = str(end - start + 1)
    if status == 206:
        headers["Content-Range"] = f"bytes {start}-{end}/{info.size}"
    if request.method == "HEAD" or info.size == 0:
        return Response(status_code=status, headers=headers, media_type=media_type)
    return StreamingResponse(store.open_range(key, start, end), status_code=status, headers=headers,
                             media_type=media_type)

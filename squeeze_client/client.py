"""``SqueezeClient``: the Squeeze REST API from Python, with safe retries.

Quick tour::

    from squeeze_client import SqueezeClient, SqueezeError

    client = SqueezeClient()   # base_url from SQUEEZE_URL (default http://127.0.0.1:8000),
                               # api_key from SQUEEZE_API_KEY
    model = client.upload_model("var/tiny-gpt2", name="tiny", metadata={"team": "search"})
    dataset = client.upload_dataset("var/corpus.txt")
    job = client.create_job({
        "model_id": model["id"],
        "stages": [{"type": "prune", "method": "magnitude", "sparsity": 0.5},
                   {"type": "quantize", "method": "rtn", "bits": 8}],
        "evaluation": {"dataset_id": dataset["id"], "seq_len": 64},
    })
    job = client.wait(job["id"], on_event=lambda e: print(e["type"], e["message"]))
    if job["status"] == "succeeded":
        result = client.download_artifact(job["id"], "compressed.tar")   # sha256 verified
    for j in client.list_jobs(status="failed"):                           # every page, lazily
        print(j["id"], j["error"])

Every POST carries an ``Idempotency-Key`` (one per call, reused by its retries), so a request
retried after a dropped connection or a 5xx never creates a second model, dataset or job.
GETs, part PUTs and the event stream are retried too. Errors the server answers with its error
envelope raise ``SqueezeError(status, type, message, param)``.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import random
import re
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, BinaryIO

import httpx

DEFAULT_URL = "http://127.0.0.1:8000"
MiB = 1024 * 1024
ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz")
DATASET_SUFFIXES = (".txt", ".jsonl")
TERMINAL_STATUSES = ("succeeded", "failed", "cancelled")
RETRY_STATUSES = (429, 500, 502, 503, 504)
CHUNK = 1 * MiB
SEND_CHUNK = 256 * 1024
MAX_PARTS = 10_000

JSON = dict[str, Any]
Progress = Callable[[int, "int | None"], None]
"""``progress(done_bytes, total_bytes_or_None)``, called as bytes move."""


class SqueezeError(Exception):
    """An error answered by the server (its ``{"error": {...}}`` envelope), or a check the
    client makes (``type`` ``checksum_mismatch``, ``status`` then the HTTP status or 0).

    >>> try:
    ...     client.get_job("job_missing")
    ... except SqueezeError as exc:
    ...     exc.status, exc.type, exc.param      # (404, 'not_found', 'job_id')
    """

    def __init__(self, status: int, type: str, message: str, param: str | None = None, *,
                 body: Any = None, request_id: str | None = None):
        super().__init__(message)
        self.status = status
        self.type = type
        self.message = message
        self.param = param
        self.body = body
        self.request_id = request_id

    def __str__(self) -> str:
        text = f"{self.status} {self.type}: {self.message}"
        return f"{text} (param: {self.param})" if self.param else text

    def __repr__(self) -> str:
        return (f"SqueezeError(status={self.status!r}, type={self.type!r}, message={self.message!r}, "
                f"param={self.param!r})")

    @classmethod
    def from_response(cls, response: httpx.Response) -> "SqueezeError":
        request_id = response.headers.get("x-request-id")
        try:
            body = response.json()
        except (ValueError, httpx.ResponseNotRead):
            body = None
        error = body.get("error") if isinstance(body, dict) else None
        if isinstance(error, dict) and "message" in error:
            return cls(response.status_code, str(error.get("type") or "api_error"), str(error["message"]),
                       error.get("param"), body=body, request_id=request_id)
        try:
            text = response.text.strip()[:300]
        except httpx.ResponseNotRead:
            text = ""
        return cls(response.status_code, "api_error", text or response.reason_phrase or "error",
                   body=body, request_id=request_id)


@dataclass(frozen=True)
class DownloadResult:
    path: Path
    sha256: str
    size_bytes: int


class _UploadsUnavailable(Exception):
    """The server has no /v1/uploads route (an older server): fall back to one multipart POST."""


class _Counter:
    """Bytes sent so far across several files, reported to a ``progress`` callback."""

    def __init__(self, total: int | None, progress: Progress | None):
        self.total, self.progress, self.done = total, progress, 0

    def add(self, n: int) -> None:
        self.done += n
        if self.progress and n:
            self.progress(max(0, self.done), self.total)


class _CountingFile(io.RawIOBase):
    """A file handle that reports what httpx reads of it; a rewind (a retried request) takes
    its bytes back off the count."""

    def __init__(self, handle: BinaryIO, counter: _Counter):
        self.handle, self.counter, self.read_so_far = handle, counter, 0

    def read(self, size: int = -1) -> bytes:
        data = self.handle.read(size)
        self.read_so_far += len(data)
        self.counter.add(len(data))
        return data

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        position = self.handle.seek(offset, whence)
        self.counter.add(position - self.read_so_far)
        self.read_so_far = position
        return position

    def tell(self) -> int:
        return self.handle.tell()

    def fileno(self) -> int:
        return self.handle.fileno()

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def close(self) -> None:
        self.handle.close()
        super().close()


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _query(filters: dict[str, Any]) -> dict[str, Any]:
    """List filters as query parameters: ``metadata={"team": "x"}`` becomes ``metadata[team]=x``,
    datetimes become ISO 8601, None is dropped."""
    params: dict[str, Any] = {}
    for key, value in filters.items():
        if value is None:
            continue
        if key == "metadata":
            params.update({f"metadata[{k}]": v for k, v in dict(value).items()})
        elif isinstance(value, datetime):
            params[key] = value.isoformat()
        else:
            params[key] = value
    return params


def parse_sse(lines: Iterable[str]) -> Iterator[tuple[str | None, str | None, str]]:
    """``(id, event, data)`` per Server-Sent Event; comment lines (keep-alives) are skipped."""
    event_id = event_type = None
    data: list[str] = []
    for line in lines:
        line = line.rstrip("\r\n")
        if not line:
            if data:
                yield event_id, event_type, "\n".join(data)
            event_id, event_type, data = None, None, []
            continue
        if line.startswith(":"):
            continue
        field, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if field == "id":
            event_id = value
        elif field == "event":
            event_type = value
        elif field == "data":
            data.append(value)
    if data:
        yield event_id, event_type, "\n".join(data)


class SqueezeClient:
    """A client for one Squeeze server and one API key.

    >>> client = SqueezeClient("http://127.0.0.1:8000", api_key="sk_...")
    >>> with SqueezeClient() as client:          # closes its connections at the end
    ...     print([m["name"] for m in client.list_models()])

    ``max_retries`` is how many times a failed request (connection error, timeout, 429, 5xx)
    is tried again, with exponential backoff. Archives and datasets larger than
    ``resumable_threshold`` bytes go through ``/v1/uploads`` in parts of ``part_size`` bytes.
    ``transport`` is an optional ``httpx.BaseTransport`` (tests, proxies); the underlying
    ``httpx.Client`` is ``client.http``.
    """

    def __init__(self, base_url: str | None = None, api_key: str | None = None, *, timeout: float = 60.0,
                 max_retries: int = 4, part_size: int = 8 * MiB, resumable_threshold: int = 64 * MiB,
                 transport: httpx.BaseTransport | None = None):
        base_url = base_url or os.environ.get("SQUEEZE_URL") or DEFAULT_URL
        api_key = api_key or os.environ.get("SQUEEZE_API_KEY")
        if not api_key:
            raise ValueError("no API key: pass api_key= or set SQUEEZE_API_KEY")
        self.base_url = base_url.rstrip("/")
        self.max_retries = max_retries
        self.part_size = part_size
        self.resumable_threshold = resumable_threshold
        self.timeout = timeout
        self.http = httpx.Client(
            base_url=self.base_url, transport=transport,
            headers={"Authorization": f"Bearer {api_key}", "User-Agent": "squeeze-client/0.1"},
            timeout=httpx.Timeout(timeout, connect=min(10.0, timeout)),
        )
        self._sleep = time.sleep
        self._openapi: JSON | None = None

    def _direct(self) -> httpx.Client:
        """A client without the API key, for presigned URLs of the object store."""
        if getattr(self, "_direct_client", None) is None:
            self._direct_client = httpx.Client(headers={"User-Agent": "squeeze-client/0.1"},
                                               timeout=httpx.Timeout(self.timeout, connect=10.0))
        return self._direct_client

    def close(self) -> None:
        self.http.close()
        if getattr(self, "_direct_client", None) is not None:
            self._direct_client.close()

    def __enter__(self) -> "SqueezeClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- plumbing ---------------------------------------------------------------------------

    def _backoff(self, attempt: int, response: httpx.Response | None = None) -> None:
        delay = min(8.0, 0.5 * 2 ** attempt) * (0.5 + random.random() / 2)
        retry_after = response.headers.get("retry-after") if response is not None else None
        if retry_after and retry_after.isdigit():
            delay = min(60.0, float(retry_after))
        self._sleep(delay)

    @staticmethod
    def _retryable(response: httpx.Response) -> bool:
        if response.status_code in RETRY_STATUSES:
            return True
        # Our own earlier attempt is still running under the same Idempotency-Key.
        return response.status_code == 409 and b"still in progress" in response.content

    def _request(self, method: str, path: str, *, expect: tuple[int, ...] = (200, 201),
                 idempotency_key: str | None = None, **kwargs: Any) -> httpx.Response:
        """Send with retries. POSTs get an ``Idempotency-Key``, the same on every attempt; a
        multipart body is rendered afresh each time from its rewound files."""
        headers = dict(kwargs.pop("headers", None) or {})
        if method == "POST":
            headers["Idempotency-Key"] = idempotency_key or str(uuid.uuid4())
        attempt = 0
        while True:
            try:
                response = self.http.request(method, path, headers=headers, **kwargs)
            except httpx.TransportError:
                if attempt >= self.max_retries:
                    raise
                self._backoff(attempt)
                attempt += 1
                continue
            if response.status_code in expect:
                return response
            if self._retryable(response) and attempt < self.max_retries:
                self._backoff(attempt, response)
                attempt += 1
                continue
            raise SqueezeError.from_response(response)

    def _json(self, method: str, path: str, **kwargs: Any) -> JSON:
        return self._request(method, path, **kwargs).json()

    def _paginate(self, path: str, filters: dict[str, Any]) -> Iterator[JSON]:
        filters = dict(filters)
        page_size = filters.pop("page_size", None) or filters.pop("limit", None) or 100
        params = _query(filters)
        after = params.pop("after", None)
        while True:
            page = self._json("GET", path, params={**params, "limit": page_size, **({"after": after} if after else {})})
            yield from page["data"]
            if not page.get("has_more") or not page["data"]:
                return
            after = page["data"][-1]["id"]

    # -- models and datasets ------------------------------------------------------------------

    def upload_model(self, path: str | os.PathLike, name: str | None = None, metadata: dict[str, str] | None = None,
                     progress: Progress | None = None, *, resumable: bool | None = None,
                     idempotency_key: str | None = None) -> JSON:
        """Upload a checkpoint; returns the model object (``id``, ``architecture``, ...).

        ``path`` is a folder as ``save_pretrained`` writes it (its files are sent as one
        multipart request) or one ``.zip`` / ``.tar`` / ``.tar.gz`` / ``.tgz`` file. An archive
        larger than ``resumable_threshold`` is sent in parts through ``/v1/uploads``, each part
        retried on its own; ``resumable=True`` / ``False`` forces the choice.

        >>> model = client.upload_model("gpt2-folder", name="gpt2", metadata={"team": "search"})
        >>> model = client.upload_model("llama.tar.gz", progress=lambda done, total: print(done, total))
        """
        source = Path(path)
        if source.is_dir():
            files = sorted(p for p in source.iterdir() if p.is_file() and not p.name.startswith("."))
            if not files:
                raise ValueError(f"{source} holds no files")
            return self._multipart("/v1/models", "files", files, name, metadata, progress, idempotency_key)
        if not source.is_file():
            raise FileNotFoundError(source)
        if not source.name.lower().endswith(ARCHIVE_SUFFIXES):
            raise ValueError(f"{source.name}: a model is a folder or one {', '.join(ARCHIVE_SUFFIXES)} file")
        return self._upload_file(source, "model", name, metadata, progress, resumable, idempotency_key)

    def upload_dataset(self, path: str | os.PathLike, name: str | None = None, metadata: dict[str, str] | None = None,
                       progress: Progress | None = None, *, resumable: bool | None = None,
                       idempotency_key: str | None = None) -> JSON:
        """Upload a UTF-8 ``.txt`` file or a ``.jsonl`` file with one ``{"text": ...}`` per line;
        returns the dataset object. Large files go in parts, as in ``upload_model``.

        >>> dataset = client.upload_dataset("wiki.txt", name="wiki")
        """
        source = Path(path)
        if not source.is_file():
            raise FileNotFoundError(source)
        return self._upload_file(source, "dataset", name, metadata, progress, resumable, idempotency_key)

    def _upload_file(self, source: Path, purpose: str, name, metadata, progress, resumable, idempotency_key) -> JSON:
        if resumable or (resumable is None and source.stat().st_size > self.resumable_threshold):
            try:
                upload = self.upload_resumable(source, purpose, name=name, metadata=metadata, progress=progress)
            except _UploadsUnavailable:
                if resumable:
                    raise SqueezeError(404, "not_found", "this server has no /v1/uploads endpoint") from None
            else:
                return self.get_model(upload["model_id"]) if purpose == "model" else self.get_dataset(upload["dataset_id"])
        path, field = ("/v1/models", "files") if purpose == "model" else ("/v1/datasets", "file")
        return self._multipart(path, field, [source], name, metadata, progress, idempotency_key)

    def _multipart(self, path: str, field: str, files: list[Path], name, metadata, progress, idempotency_key) -> JSON:
        counter = _Counter(sum(f.stat().st_size for f in files), progress)
        handles = [_CountingFile(f.open("rb"), counter) for f in files]
        form = {k: v for k, v in {"name": name, "metadata": json.dumps(metadata) if metadata else None}.items() if v}
        try:
            # httpx rewinds each file before it renders the body, so a retry resends it whole.
            return self._json(
                "POST", path, idempotency_key=idempotency_key, data=form,
                files=[(field, (f.name, h, "application/octet-stream")) for f, h in zip(files, handles)],
                timeout=httpx.Timeout(max(self.timeout, 600.0), connect=10.0),
            )
        finally:
            for handle in handles:
                handle.close()

    def upload_resumable(self, path: str | os.PathLike, purpose: str, *, name: str | None = None,
                         metadata: dict[str, str] | None = None, progress: Progress | None = None,
                         part_size: int | None = None, upload_id: str | None = None,
                         part_order: Callable[[list[int]], Iterable[int]] | None = None) -> JSON:
        """Send one file through ``/v1/uploads`` in parts and complete it; returns the completed
        upload object, whose ``model_id`` or ``dataset_id`` names what was made.

        Each part is retried on its own (its sha256 is compared with the server's). If the call
        fails anyway the exception carries ``upload_id``: pass it back to resume, and only the
        parts the server lacks (or holds with other bytes) are sent again::

            try:
                client.upload_resumable("big.tar", "model")
            except Exception as exc:
                client.upload_resumable("big.tar", "model", upload_id=exc.upload_id)

        ``part_order`` rearranges the part numbers before sending (any order is allowed, and a
        number given twice is sent twice); it exists for tests.
        """
        source = Path(path)
        size = source.stat().st_size
        if upload_id is None:
            # At most MAX_PARTS parts: a huge file gets larger parts (whole MiB).
            part_size = part_size or self.part_size
            if math.ceil(size / part_size) > MAX_PARTS:
                part_size = math.ceil(size / MAX_PARTS / MiB) * MiB
            try:
                upload = self._json("POST", "/v1/uploads", json={
                    "filename": source.name, "size_bytes": size, "purpose": purpose, "part_size": part_size})
            except SqueezeError as exc:
                if exc.status in (404, 405) and exc.param is None:
                    raise _UploadsUnavailable() from exc
                raise
        else:
            upload = self.get_upload(upload_id)
            if upload["status"] != "pending" or upload["size_bytes"] != size:
                raise ValueError(f"upload {upload_id} is {upload['status']} for {upload['size_bytes']} bytes; "
                                 f"{source} has {size}")
        upload_id = upload["id"]
        try:
            return self._send_parts(source, upload, name, metadata, progress, part_order)
        except BaseException as exc:
            exc.upload_id = upload_id  # type: ignore[attr-defined]
            if hasattr(exc, "add_note"):
                exc.add_note(f"resume with upload_id={upload_id!r}")
            raise

    def _send_parts(self, source: Path, upload: JSON, name, metadata, progress, part_order) -> JSON:
        size, part_size = upload["size_bytes"], upload["part_size"]
        count = upload.get("parts_expected") or max(1, math.ceil(size / part_size))
        numbers = list(range(1, count + 1))
        order = part_order(numbers) if part_order else numbers
        held = {p["part_number"]: p["sha256"] for p in upload.get("parts", [])}
        confirmed: set[int] = set()
        counter = _Counter(size, progress)
        whole = None if part_order else hashlib.sha256()  # in order: hashed on the way
        with source.open("rb") as handle:
            for number in order:
                handle.seek((number - 1) * part_size)
                data = handle.read(min(part_size, size - (number - 1) * part_size))
                digest = hashlib.sha256(data).hexdigest()
                if whole is not None:
                    whole.update(data)
                if held.pop(number, None) == digest:  # resuming: the server has this part already
                    if number not in confirmed:
                        confirmed.add(number)
                        counter.add(len(data))
                    continue
                self._put_part(upload["id"], number, data, digest, counter, count_it=number not in confirmed)
                confirmed.add(number)
        sha256 = whole.hexdigest() if whole is not None else _sha256_file(source)
        body: JSON = {"sha256": sha256}
        if name:
            body["name"] = name
        if metadata:
            body["metadata"] = metadata
        return self._json("POST", f"/v1/uploads/{upload['id']}/complete", json=body,
                          timeout=httpx.Timeout(max(self.timeout, 600.0), connect=10.0))

    def _put_part(self, upload_id: str, number: int, data: bytes, digest: str, counter: _Counter,
                  count_it: bool) -> None:
        view = memoryview(data)
        attempt = 0
        while True:
            sent = 0

            def chunks() -> Iterator[bytes]:
                nonlocal sent
                for start in range(0, len(view), SEND_CHUNK):
                    piece = bytes(view[start:start + SEND_CHUNK])
                    yield piece
                    if count_it:
                        sent += len(piece)
                        counter.add(len(piece))

            error: SqueezeError | None = None
            response = None
            try:
                response = self.http.put(
                    f"/v1/uploads/{upload_id}/parts/{number}", content=chunks(),
                    headers={"Content-Length": str(len(data)), "Content-Type": "application/octet-stream"})
            except httpx.TransportError:
                if attempt >= self.max_retries:
                    raise
            else:
                if response.status_code == 200:
                    echoed = response.json().get("sha256")
                    if echoed in (None, digest):
                        return
                    error = SqueezeError(200, "checksum_mismatch",
                                         f"part {number}: the server stored sha256 {echoed}, sent {digest}")
                elif not self._retryable(response):
                    raise SqueezeError.from_response(response)
                else:
                    error = SqueezeError.from_response(response)
                if attempt >= self.max_retries:
                    raise error
            counter.add(-sent)  # the part is sent again from its start
            self._backoff(attempt, response)
            attempt += 1

    def get_upload(self, upload_id: str) -> JSON:
        """A resumable upload's status and the parts the server holds."""
        return self._json("GET", f"/v1/uploads/{upload_id}")

    def abort_upload(self, upload_id: str) -> JSON:
        return self._json("DELETE", f"/v1/uploads/{upload_id}")

    def list_models(self, **filters: Any) -> Iterator[JSON]:
        """Every model, newest first, fetched a page at a time as you iterate.

        Filters: ``created_after`` / ``created_before`` (datetime or ISO 8601 text),
        ``metadata={"team": "search"}``, ``page_size`` (1..100).

        >>> for model in client.list_models(metadata={"team": "search"}):
        ...     print(model["id"], model["name"])
        >>> newest = next(client.list_models(), None)
        """
        return self._paginate("/v1/models", filters)

    def list_datasets(self, **filters: Any) -> Iterator[JSON]:
        """Every dataset, newest first (filters as ``list_models``)."""
        return self._paginate("/v1/datasets", filters)

    def list_jobs(self, **filters: Any) -> Iterator[JSON]:
        """Every job, newest first. Filters as ``list_models`` plus ``status`` and ``model_id``.

        >>> running = list(client.list_jobs(status="running"))
        """
        return self._paginate("/v1/jobs", filters)

    def get_model(self, model_id: str) -> JSON:
        return self._json("GET", f"/v1/models/{model_id}")

    def get_dataset(self, dataset_id: str) -> JSON:
        return self._json("GET", f"/v1/datasets/{dataset_id}")

    def delete_model(self, model_id: str) -> JSON:
        return self._json("DELETE", f"/v1/models/{model_id}")

    def delete_dataset(self, dataset_id: str) -> JSON:
        return self._json("DELETE", f"/v1/datasets/{dataset_id}")

    # -- jobs ---------------------------------------------------------------------------------

    def openapi(self) -> JSON:
        """The server's OpenAPI document (read once per client): the job spec's schema, with
        ``x-squeeze-ref`` on the fields that name a model or a dataset."""
        if self._openapi is None:
            self._openapi = self._json("GET", "/openapi.json")
        return self._openapi

    def create_job(self, spec: JSON, *, idempotency_key: str | None = None) -> JSON:
        """Submit a job spec (see the README); returns the job (``status`` ``queued``).

        >>> job = client.create_job({"model_id": model_id,
        ...                          "stages": [{"type": "quantize", "method": "rtn", "bits": 8}]})
        """
        return self._json("POST", "/v1/jobs", json=spec, idempotency_key=idempotency_key)

    def get_job(self, job_id: str) -> JSON:
        return self._json("GET", f"/v1/jobs/{job_id}")

    def cancel_job(self, job_id: str) -> JSON:
        """Queued: cancelled at once. Running: stops at the next layer. Finished: SqueezeError 409."""
        return self._json("POST", f"/v1/jobs/{job_id}/cancel")

    def events(self, job_id: str, after: int | None = None) -> Iterator[JSON]:
        """The job's events as they happen (Server-Sent Events), oldest first, from the one
        after ``after``; the generator ends after the job's final status event.

        Each event is ``{"id", "type", "message", "data", "created_at", ...}``: ``type``
        ``status`` has ``data["status"]``, ``progress`` has ``data["progress"]`` (0..1),
        ``stage`` has ``data["stage"]``. A dropped connection is reopened with
        ``Last-Event-ID``, so no event is lost or repeated.

        >>> for event in client.events(job["id"]):
        ...     print(event["type"], event["message"])
        """
        return self._event_stream(job_id, after, None)

    def _event_stream(self, job_id: str, after: int | None, deadline: float | None,
                      read_timeout: float = 60.0) -> Iterator[JSON]:
        last = after
        failures = 0
        while True:
            timeout = read_timeout
            if deadline is not None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"job {job_id} did not finish in time")
                timeout = max(0.5, min(read_timeout, remaining))
            headers = {"Accept": "text/event-stream"}
            if last is not None:
                headers["Last-Event-ID"] = str(last)
            try:
                with self.http.stream("GET", f"/v1/jobs/{job_id}/events/stream", headers=headers,
                                      timeout=httpx.Timeout(timeout, connect=10.0)) as response:
                    if response.status_code != 200:
                        response.read()
                        if not self._retryable(response) or failures >= self.max_retries:
                            raise SqueezeError.from_response(response)
                        self._backoff(failures, response)
                        failures += 1
                        continue
                    for event_id, event_type, data in parse_sse(self._lines(response, deadline, job_id)):
                        event = self._event(event_id, event_type, data)
                        if event.get("id") is not None:
                            last = event["id"]
                        failures = 0
                        yield event
                        if event.get("type") == "status" and event.get("data", {}).get("status") in TERMINAL_STATUSES:
                            return
            except httpx.TransportError:
                if deadline is not None and time.monotonic() >= deadline:
                    raise TimeoutError(f"job {job_id} did not finish in time") from None
                if failures >= self.max_retries * 5:
                    raise
                self._backoff(min(failures, 4))
                failures += 1
                continue
            # The stream ended without a final status (a proxy, the server's time limit, or
            # ``after`` already past it): done if the job is over and no event is left to see.
            if self.get_job(job_id)["status"] in TERMINAL_STATUSES:
                params: dict[str, Any] = {"limit": 1, **({"after": last} if last is not None else {})}
                if not self._json("GET", f"/v1/jobs/{job_id}/events", params=params)["data"]:
                    return
            self._backoff(min(failures, 4))
            failures += 1

    @staticmethod
    def _lines(response: httpx.Response, deadline: float | None, job_id: str) -> Iterator[str]:
        # Keep-alive comments arrive every few seconds: the deadline is checked on each line.
        for line in response.iter_lines():
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"job {job_id} did not finish in time")
            yield line

    @staticmethod
    def _event(event_id: str | None, event_type: str | None, data: str) -> JSON:
        try:
            event = json.loads(data)
        except ValueError:
            event = {"message": data, "data": {}}
        if not isinstance(event, dict):
            event = {"message": str(event), "data": {}}
        event.setdefault("type", event_type)
        event.setdefault("data", {})
        if "id" not in event and event_id and event_id.isdigit():
            event["id"] = int(event_id)
        return event

    def wait(self, job_id: str, on_event: Callable[[JSON], None] | None = None,
             timeout: float | None = None) -> JSON:
        """Follow the job's event stream until it succeeds, fails or is cancelled; returns the
        final job. ``on_event`` sees every event (from the first); ``TimeoutError`` after
        ``timeout`` seconds.

        >>> job = client.wait(job_id, on_event=lambda e: print(f"{e['type']:8} {e['message']}"))
        >>> job["status"], job["metrics"]["after"]["perplexity"]
        """
        deadline = time.monotonic() + timeout if timeout is not None else None
        for event in self._event_stream(job_id, None, deadline):
            if on_event:
                on_event(event)
        return self.get_job(job_id)

    def download_artifact(self, job_id: str, dest: str | os.PathLike | None = None,
                          progress: Progress | None = None, *, resume: bool = True) -> DownloadResult:
        """Download a succeeded job's artifact (a ``.tar`` of the compressed model).

        ``dest`` is a file name or a folder (``<folder>/<job id>.tar``; default: the current
        folder). Bytes go to ``<dest>.part`` first; an interrupted transfer continues from
        where it stopped with a ``Range`` request (also across calls, with ``resume=True``),
        the whole file's sha256 is checked against ``X-Checksum-SHA256``, and only then is
        the file renamed to ``dest``.

        >>> result = client.download_artifact(job_id, "out/", progress=lambda d, t: print(d, t))
        >>> result.path, result.sha256, result.size_bytes
        """
        target = Path(dest) if dest is not None else Path.cwd()
        if target.is_dir():
            target = target / f"{job_id}.tar"
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(target.name + ".part")
        if not resume:
            partial.unlink(missing_ok=True)
        url = f"/v1/jobs/{job_id}/artifact"
        # With presigned downloads the API answers 307 to the object store: the bytes come from
        # there, without our API key, and the checksum from the API's answer.
        source, announced = url, None
        etag: str | None = None
        attempt = 0
        restarted = False
        while True:
            offset = partial.stat().st_size if partial.exists() else 0
            headers: dict[str, str] = {}
            if offset:
                headers["Range"] = f"bytes={offset}-"
                if etag:
                    headers["If-Range"] = etag
            expected = total = None
            try:
                http = self.http if source == url else self._direct()
                with http.stream("GET", source, headers=headers,
                                 timeout=httpx.Timeout(self.timeout, connect=10.0)) as response:
                    if response.status_code == 307 and source == url and response.headers.get("location"):
                        source, announced = response.headers["location"], response.headers.get("x-checksum-sha256")
                        etag = None  # the store's ETag is not the API's
                        continue
                    if response.status_code == 416:  # the partial file is not a prefix of this one
                        partial.unlink(missing_ok=True)
                        if attempt >= self.max_retries:
                            raise SqueezeError(416, "range_not_satisfiable", "could not resume the download")
                        attempt += 1
                        continue
                    if response.status_code not in (200, 206):
                        response.read()
                        if source != url and attempt < self.max_retries:  # e.g. the URL expired: ask again
                            source, etag = url, None
                            attempt += 1
                            continue
                        if not self._retryable(response) or attempt >= self.max_retries:
                            raise SqueezeError.from_response(response)
                        self._backoff(attempt, response)
                        attempt += 1
                        continue
                    expected = (response.headers.get("x-checksum-sha256") or announced or "").lower() or None
                    etag = response.headers.get("etag") or etag
                    digest = hashlib.sha256()
                    if response.status_code == 206:
                        match = re.match(r"bytes (\d+)-\d+/(\d+|\*)", response.headers.get("content-range", ""))
                        if not match or int(match[1]) != offset:
                            partial.unlink(missing_ok=True)
                            continue
                        total = int(match[2]) if match[2] != "*" else None
                        mode = "ab"
                        with partial.open("rb") as existing:
                            while chunk := existing.read(CHUNK):
                                digest.update(chunk)
                    else:
                        length = response.headers.get("content-length")
                        total = int(length) if length and length.isdigit() else None
                        mode, offset = "wb", 0
                    done = offset
                    if progress:
                        progress(done, total)
                    with partial.open(mode) as out:
                        try:
                            for chunk in response.iter_bytes():  # as it arrives: a drop loses nothing
                                out.write(chunk)
                                digest.update(chunk)
                                done += len(chunk)
                                if done > offset:
                                    attempt = 0  # bytes are moving: a later failure starts a fresh count
                                if progress:
                                    progress(done, total)
                        finally:
                            out.flush()
                            os.fsync(out.fileno())
            except httpx.TransportError:
                if attempt >= self.max_retries:
                    raise
                self._backoff(attempt)
                attempt += 1
                continue
            size = partial.stat().st_size
            if total is not None and size < total:  # the connection closed early: resume
                if attempt >= self.max_retries:
                    raise SqueezeError(response.status_code, "incomplete_download",
                                       f"got {size} of {total} bytes")
                attempt += 1
                continue
            sha256 = digest.hexdigest()
            if expected and sha256 != expected:
                partial.unlink(missing_ok=True)
                if offset and not restarted:  # a stale .part from another file: start over once
                    restarted = True
                    continue
                raise SqueezeError(response.status_code, "checksum_mismatch",
                                   f"downloaded sha256 {sha256}, the server announced {expected}")
            os.replace(partial, target)
            return DownloadResult(target, sha256, size)

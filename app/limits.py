"""Refuse oversized request bodies with 413 before they reach the disk.

Starlette spools multipart uploads to temporary files before a route runs, so the limit has to
be enforced here, on the raw byte stream: first on the declared Content-Length, then by
counting what actually arrives (a chunked upload declares nothing). ``StorageQuotaPrecheck``
does the same with the tenant's remaining storage for the one-request uploads.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable

from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send


class BodyTooLarge(HTTPException):
    """An HTTPException so that FastAPI's body parsing lets it through as a 413."""

    def __init__(self, limit: int):
        super().__init__(413, f"request body is larger than {limit} bytes")


class BodyTimeout(HTTPException):
    """A client that stops sending its body mid-way (slowloris, a dead link) is cut off."""

    def __init__(self, seconds: float):
        super().__init__(408, f"no request body bytes for {seconds:g} s; the upload was abandoned")


class BodySizeLimit:
    """Also bounds the wait for each chunk of a body: ``idle_timeout_s`` without a byte ends
    the request with 408, and what the route had staged is cleaned up like any failed upload."""

    def __init__(self, app: ASGIApp, limit_for_path: Callable[[str], int], idle_timeout_s: float = 60.0):
        self.app = app
        self.limit_for_path = limit_for_path
        self.idle_timeout_s = idle_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit_for_path(scope["path"])
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await _reject(send, limit)
            return

        received = 0
        response_started = False

        body_complete = False

        async def counting_receive() -> Message:
            nonlocal received, body_complete
            if body_complete:
                # After the body, receive() only waits for the client to disconnect (a
                # streaming response listens for that): no timeout applies there.
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), timeout=self.idle_timeout_s)
            except asyncio.TimeoutError:
                raise BodyTimeout(self.idle_timeout_s) from None
            if message["type"] != "http.request" or not message.get("more_body", False):
                body_complete = True
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(limit)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal response_started
            response_started = response_started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except BodyTooLarge:
            if not response_started:
                await _reject(send, limit)


# Multipart framing around the files (boundaries, part headers, the name and metadata fields):
# a body may declare this much more than the files it carries.
MULTIPART_FRAMING_BYTES = 64 * 1024


class StorageQuotaPrecheck:
    """A one-request upload (``POST /v1/models``, ``POST /v1/datasets``) whose declared
    Content-Length cannot fit in what remains of its tenant's storage is refused with 413,
    naming the numbers, before a byte of the body is read: nothing is spooled to disk for an
    upload that would be refused after it. (The route checks again with the stored size.)

    ``tenant_storage(authorization)`` returns the caller's ``(used, limit)``, or None for a
    request without a valid key (the route answers that one with 401)."""

    def __init__(self, app: ASGIApp, paths: dict[str, str],
                 tenant_storage: Callable[[str], tuple[int, int] | None]):
        self.app, self.paths, self.tenant_storage = app, paths, tenant_storage

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        param = self.paths.get(scope["path"].rstrip("/")) if scope["type"] == "http" and scope["method"] == "POST" else None
        headers = dict(scope.get("headers") or []) if param else {}
        declared, authorization = headers.get(b"content-length", b""), headers.get(b"authorization")
        if param and declared.isdigit() and authorization:
            storage = await run_in_threadpool(self.tenant_storage, authorization.decode("latin-1"))
            if storage is not None:
                used, limit = storage
                room = max(0, limit - used)
                if int(declared) - MULTIPART_FRAMING_BYTES > room:
                    await _send_413(send, (
                        f"tenant storage limit: this upload declares {int(declared)} bytes (Content-Length) but "
                        f"only {room} of the tenant's {limit} bytes remain ({used} used or reserved by pending "
                        "uploads); delete models, datasets or jobs, or abort uploads, first"), param)
                    return
        await self.app(scope, receive, send)


def tenant_storage(authorization: str) -> tuple[int, int] | None:
    """``(bytes used or reserved, limit)`` of the tenant the key acts for; None if no valid key."""
    from app.auth import Unauthenticated, principal_for
    from app.config import get_settings
    from app.db.session import session_scope
    from app.services.quotas import storage_used

    with session_scope() as session:
        try:
            principal = principal_for(session, authorization)
        except Unauthenticated:
            return None
        return storage_used(session, principal.tenant_id), get_settings().max_tenant_storage_bytes


async def _reject(send: Send, limit: int) -> None:
    await _send_413(send, f"request body is larger than {limit} bytes", None)


async def _send_413(send: Send, message: str, param: str | None) -> None:
    body = json.dumps({"error": {"type": "payload_too_large", "message": message, "param": param}}).encode()
    await send({"type": "http.response.start", "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})

"""Refuse oversized request bodies with 413 before they reach the disk.

Starlette spools multipart uploads to temporary files before a route runs, so the limit has to
be enforced here, on the raw byte stream: first on the declared Content-Length, then by
counting what actually arrives (a chunked upload declares nothing).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable

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


async def _reject(send: Send, limit: int) -> None:
    body = json.dumps(
        {"error": {"type": "payload_too_large", "message": f"request body is larger than {limit} bytes", "param": None}}
    ).encode()
    await send({"type": "http.response.start", "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})

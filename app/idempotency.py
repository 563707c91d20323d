"""``Idempotency-Key`` on every POST, as Stripe does it.

The first request with a key runs and its answer is stored; a retry with the same key and the
same body gets that stored answer (and no second job, model or key); the same key with a
different body is a 409. A request still running under the key is a 409 too. Answers of 5xx,
and requests whose body was not read to the end, are not stored, so the client may retry.

The body is hashed as it streams to the route, never buffered: uploads of many GB work. A
multipart body is hashed without its boundary, which clients pick at random per attempt; a
JSON body is hashed in canonical form, so key order and spacing do not matter.
"""

from __future__ import annotations

import hashlib
import json
from datetime import timedelta

from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError
from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.auth import principal_for
from app.db.models import IdempotencyKey, utcnow
from app.db.session import session_scope
from app.errors import APIError

MAX_STORED_RESPONSE = 1024 * 1024
KEY_TTL = timedelta(hours=24)


class BodyHasher:
    """SHA-256 of a request body, blind to the multipart boundary and to JSON formatting."""

    def __init__(self, content_type: str, method: str, path: str):
        self.digest = hashlib.sha256(f"{method} {path}\n".encode())
        self.is_json = content_type.startswith("application/json")
        self.json_parts: list[bytes] = []
        boundary = content_type.partition("boundary=")[2].split(";")[0].strip('"')
        self.boundary = boundary.encode() if content_type.startswith("multipart/") and boundary else b""
        self.carry = b""

    def update(self, chunk: bytes) -> None:
        if self.is_json:
            self.json_parts.append(chunk)  # JSON bodies are limited to 1 MiB upstream
            return
        if not self.boundary:
            self.digest.update(chunk)
            return
        # Keep the tail that could be the start of a boundary split across chunks.
        data = (self.carry + chunk).replace(self.boundary, b"")
        keep = len(self.boundary) - 1
        self.carry, ready = data[-keep:] if keep else b"", data[:-keep] if keep else data
        self.digest.update(ready)

    def hexdigest(self) -> str:
        if self.is_json:
            raw = b"".join(self.json_parts)
            try:
                raw = json.dumps(json.loads(raw), sort_keys=True, separators=(",", ":")).encode()
            except ValueError:
                pass  # not valid JSON: the route answers 422; hash the bytes as they are
            self.digest.update(raw)
        else:
            self.digest.update(self.carry.replace(self.boundary, b"") if self.boundary else self.carry)
        return self.digest.hexdigest()


def _claim(tenant_id: str, key: str) -> IdempotencyKey | None:
    """Insert an in-progress row for the key; if one exists, return it instead."""
    with session_scope() as session:
        session.execute(delete(IdempotencyKey).where(IdempotencyKey.created_at < utcnow() - KEY_TTL))
    try:
        with session_scope() as session:
            session.add(IdempotencyKey(tenant_id=tenant_id, key=key, status="in_progress"))
        return None
    except IntegrityError:
        with session_scope() as session:
            return session.scalar(
                select(IdempotencyKey).where(IdempotencyKey.tenant_id == tenant_id, IdempotencyKey.key == key)
            )


def _finish(tenant_id: str, key: str, request_sha256: str, status: int, headers, body: bytes) -> None:
    with session_scope() as session:
        row = session.scalar(
            select(IdempotencyKey).where(IdempotencyKey.tenant_id == tenant_id, IdempotencyKey.key == key)
        )
        row.status, row.request_sha256 = "done", request_sha256
        row.response_status, row.response_headers, row.response_body = status, headers, body


def _forget(tenant_id: str, key: str) -> None:
    with session_scope() as session:
        session.execute(
            delete(IdempotencyKey).where(IdempotencyKey.tenant_id == tenant_id, IdempotencyKey.key == key)
        )


async def _error(send: Send, status: int, message: str) -> None:
    body = json.dumps({"error": {"type": "idempotency_error", "message": message, "param": "Idempotency-Key"}}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


class IdempotencyMiddleware:
    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = dict(scope.get("headers") or [])
        key = headers.get(b"idempotency-key", b"").decode(errors="replace").strip()
        if scope["type"] != "http" or scope["method"] != "POST" or not key:
            await self.app(scope, receive, send)
            return
        if len(key) > 255:
            await _error(send, 400, "Idempotency-Key is longer than 255 characters")
            return
        try:
            principal = await run_in_threadpool(self._principal, headers.get(b"authorization"))
        except APIError:
            await self.app(scope, receive, send)  # the route answers 401
            return
        tenant = principal.tenant_id
        hasher = BodyHasher(headers.get(b"content-type", b"").decode(errors="replace"), "POST", scope["path"])

        existing = await run_in_threadpool(_claim, tenant, key)
        if existing is not None:
            await self._replay(existing, hasher, receive, send)
            return

        body_done = False
        response: dict = {"status": None, "headers": [], "body": bytearray(), "too_big": False}

        async def hashing_receive() -> Message:
            nonlocal body_done
            message = await receive()
            if message["type"] == "http.request":
                hasher.update(message.get("body", b""))
                body_done = body_done or not message.get("more_body", False)
            return message

        settled = False

        async def settle() -> None:
            # Store (or forget) the answer BEFORE its last byte reaches the client: a client
            # that retries the moment it has the answer must find it stored, not in progress.
            nonlocal settled
            settled = True
            storable = (body_done and response["status"] is not None and response["status"] < 500
                        and not response["too_big"])
            if storable:
                await run_in_threadpool(_finish, tenant, key, hasher.hexdigest(), response["status"],
                                        response["headers"], bytes(response["body"]))
            else:
                await run_in_threadpool(_forget, tenant, key)

        async def capturing_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                response["status"] = message["status"]
                response["headers"] = [[k.decode(), v.decode()] for k, v in message.get("headers", [])]
            elif message["type"] == "http.response.body":
                response["body"] += message.get("body", b"")
                response["too_big"] = response["too_big"] or len(response["body"]) > MAX_STORED_RESPONSE
                if not message.get("more_body", False):
                    await settle()
            await send(message)

        try:
            await self.app(scope, hashing_receive, capturing_send)
        finally:
            if not settled:
                await run_in_threadpool(_forget, tenant, key)

    @staticmethod
    def _principal(authorization: bytes | None):
        with session_scope() as session:
            return principal_for(session, authorization.decode(errors="replace") if authorization else None)

    @staticmethod
    async def _replay(existing: IdempotencyKey, hasher: BodyHasher, receive: Receive, send: Send) -> None:
        if existing.status != "done":
            await _error(send, 409, "a request with this Idempotency-Key is still in progress; retry later")
            return
        while True:  # read (and hash) the retried body to compare it with the first one
            message = await receive()
            if message["type"] != "http.request":
                return
            hasher.update(message.get("body", b""))
            if not message.get("more_body", False):
                break
        if hasher.hexdigest() != existing.request_sha256:
            await _error(send, 409, "this Idempotency-Key was used with a different request body")
            return
        stored_headers = [(k.encode(), v.encode()) for k, v in existing.response_headers or []]
        await send({"type": "http.response.start", "status": existing.response_status,
                    "headers": stored_headers + [(b"idempotent-replayed", b"true")]})
        await send({"type": "http.response.body", "body": existing.response_body or b""})

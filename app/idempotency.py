"""``Idempotency-Key`` on every POST, as Stripe does it.

The first request with a key runs and its answer is stored; a retry with the same key and the
same body gets that stored answer (and no second job, model or key); the same key with a
different body is a 409. A request still running under the key is a 409 too. Answers of 5xx,
and requests whose body was not read to the end, are not stored, so the client may retry.

A stored answer belongs to the API key that made the request: another key (even of the same
tenant) with the same ``Idempotency-Key`` has its own, separate record. A replay goes to a key
that still works (a revoked key gets the route's 401) and still holds the scope it had when the
answer was stored (a key demoted since gets 403).

An answer sent with ``Cache-Control: no-store`` (a new API key, whose secret is shown once) is
never stored. A retry gets a 409 that names the object the first request made instead. Storing
the secret encrypted was the other choice; it would keep the secret retrievable for a day by
whoever holds the caller's key and the Idempotency-Key, and "shown once" would no longer be
true. A client that lost that answer revokes the key it names and creates another.

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

from app.auth import SCOPES, Principal, principal_for
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


def _record(principal: Principal, key: str):
    return select(IdempotencyKey).where(IdempotencyKey.api_key_id == principal.key_id, IdempotencyKey.key == key)


def _claim(principal: Principal, key: str) -> IdempotencyKey | None:
    """Insert an in-progress row for the key; if one exists, return it instead."""
    with session_scope() as session:
        session.execute(delete(IdempotencyKey).where(IdempotencyKey.created_at < utcnow() - KEY_TTL))
    try:
        with session_scope() as session:
            session.add(IdempotencyKey(tenant_id=principal.tenant_id, api_key_id=principal.key_id,
                                       scope=principal.scope, key=key, status="in_progress"))
        return None
    except IntegrityError:
        with session_scope() as session:
            return session.scalar(_record(principal, key))


def _finish(principal: Principal, key: str, request_sha256: str, status: int, headers, body: bytes) -> None:
    with session_scope() as session:
        row = session.scalar(_record(principal, key))
        row.status, row.request_sha256 = "done", request_sha256
        row.response_status, row.response_headers, row.response_body = status, headers, body


def _forget(principal: Principal, key: str) -> None:
    with session_scope() as session:
        session.execute(delete(IdempotencyKey).where(IdempotencyKey.api_key_id == principal.key_id,
                                                     IdempotencyKey.key == key))


def _error_body(message: str, error_type: str = "idempotency_error", param: str | None = "Idempotency-Key") -> bytes:
    return json.dumps({"error": {"type": error_type, "message": message, "param": param}}).encode()


def _json_headers(body: bytes) -> list[tuple[bytes, bytes]]:
    return [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]


async def _error(send: Send, status: int, message: str, **kwargs) -> None:
    body = _error_body(message, **kwargs)
    await send({"type": "http.response.start", "status": status, "headers": _json_headers(body)})
    await send({"type": "http.response.body", "body": body})


def _not_kept(body: bytes) -> tuple[int, list[list[str]], bytes]:
    """What a retry of a ``no-store`` answer gets: a 409 that names what the first request made
    (its id and kind, read from the answer), and nothing else of it."""
    try:
        made = json.loads(body)
        made = f"{made['object']} {made['id']}" if isinstance(made, dict) and "id" in made else "an object"
    except (ValueError, KeyError, TypeError):
        made = "an object"
    stored = _error_body(f"this request already ran and made {made}; its answer held a secret that is "
                         "shown once and was not kept, so it is not replayed. Revoke what it made if "
                         "the answer was lost, and create another")
    return 409, [[k.decode(), v.decode()] for k, v in _json_headers(stored)], stored


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
        hasher = BodyHasher(headers.get(b"content-type", b"").decode(errors="replace"), "POST", scope["path"])

        existing = await run_in_threadpool(_claim, principal, key)
        if existing is not None:
            await self._replay(existing, principal, hasher, receive, send)
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
                status, stored_headers, body = response["status"], response["headers"], bytes(response["body"])
                if any(k.lower() == "cache-control" and "no-store" in v.lower() for k, v in stored_headers):
                    status, stored_headers, body = _not_kept(body)
                await run_in_threadpool(_finish, principal, key, hasher.hexdigest(), status, stored_headers, body)
            else:
                await run_in_threadpool(_forget, principal, key)

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
                await run_in_threadpool(_forget, principal, key)

    @staticmethod
    def _principal(authorization: bytes | None):
        with session_scope() as session:
            return principal_for(session, authorization.decode(errors="replace") if authorization else None)

    @staticmethod
    async def _replay(existing: IdempotencyKey, principal: Principal, hasher: BodyHasher, receive: Receive,
                      send: Send) -> None:
        # The caller's key was read afresh above (a revoked one never gets here); it must still
        # hold the scope it answered under, or the replay would hand a demoted key what it may
        # no longer do.
        if SCOPES.index(principal.scope) < SCOPES.index(existing.scope or "member"):
            await _error(send, 403, f"this key's scope is now {principal.scope!r}; the request stored under "
                         f"this Idempotency-Key was made with scope {existing.scope!r}",
                         error_type="permission_error", param=None)
            return
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


def document_idempotency(app) -> None:
    """What the middleware may answer on any POST, said in the OpenAPI document: 409 (in
    progress, another body, or a stored secret that is not replayed) and 403 (a replay to a key
    demoted since)."""
    build = app.openapi
    notes = {"403": "or a replay under this Idempotency-Key to a key whose scope was lowered since",
             "409": "or the request under this Idempotency-Key is still running, or its answer held a "
                    "secret that is not kept"}

    def openapi() -> dict:
        if app.openapi_schema:
            return app.openapi_schema
        schema = build()
        for path in schema.get("paths", {}).values():
            operation = path.get("post")
            if not isinstance(operation, dict) or not operation.get("security"):
                continue
            responses = operation.setdefault("responses", {})
            for code, note in notes.items():
                if code in responses:
                    responses[code]["description"] = responses[code]["description"].rstrip(".") + "; " + note + "."
                else:
                    responses[code] = {"description": note[3].upper() + note[4:] + ".", "content": {
                        "application/json": {"schema": {"$ref": "#/components/schemas/ErrorEnvelope"}}}}
        app.openapi_schema = schema
        return schema

    app.openapi = openapi

"""Per-key request rate limits: a token bucket for each API key.

A key may send ``SQUEEZE_RATE_LIMIT_BURST`` requests at once and ``SQUEEZE_RATE_LIMIT_PER_S``
a second on average. Every answer to a request that carries a key says where its bucket stands,
in the IETF draft's headers (draft-ietf-httpapi-ratelimit-headers)::

    RateLimit-Limit: 200          the bucket's size
    RateLimit-Remaining: 187      requests that may be sent now
    RateLimit-Reset: 1            seconds until the bucket is full again
    RateLimit-Policy: 200;w=2     the same, as a policy: 200 requests per 2-second window

and a request past it is answered ``429`` with ``Retry-After`` (seconds until one more request
is allowed) before anything else runs. The buckets live in Redis when the broker is Redis (or
``SQUEEZE_RATE_LIMIT_REDIS_URL`` names one), so every API replica draws from the same bucket;
in process memory for the embedded default. If Redis cannot be reached, each replica falls back
to its own buckets rather than refusing or admitting everything.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.config import Settings, get_settings

log = logging.getLogger("squeeze.ratelimit")


@dataclass(frozen=True)
class Decision:
    allowed: bool
    tokens: float  # left in the bucket after this request
    rate: float
    burst: int

    def headers(self) -> list[tuple[bytes, bytes]]:
        reset = math.ceil(max(0.0, self.burst - self.tokens) / self.rate)
        window = math.ceil(self.burst / self.rate)
        headers = [(b"ratelimit-limit", str(self.burst).encode()),
                   (b"ratelimit-remaining", str(max(0, math.floor(self.tokens))).encode()),
                   (b"ratelimit-reset", str(reset).encode()),
                   (b"ratelimit-policy", f"{self.burst};w={window}".encode())]
        if not self.allowed:
            headers.append((b"retry-after", str(max(1, math.ceil((1 - self.tokens) / self.rate))).encode()))
        return headers


def refill(tokens: float, elapsed_s: float, rate: float, burst: int) -> float:
    return min(float(burst), tokens + max(0.0, elapsed_s) * rate)


class MemoryBuckets:
    """This process's buckets. At most ``max_keys`` are kept: the least recently used go first
    (a forgotten bucket starts full again, which only ever favours the client)."""

    def __init__(self, rate: float, burst: int, max_keys: int = 100_000):
        self.rate, self.burst, self.max_keys = rate, burst, max_keys
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()
        self._lock = threading.Lock()

    async def take(self, key: str) -> Decision:
        return self.take_now(key, time.monotonic())

    def take_now(self, key: str, now: float) -> Decision:
        with self._lock:
            tokens, then = self._buckets.pop(key, (float(self.burst), now))
            tokens = refill(tokens, now - then, self.rate, self.burst)
            allowed = tokens >= 1
            if allowed:
                tokens -= 1
            self._buckets[key] = (tokens, now)
            while len(self._buckets) > self.max_keys:
                self._buckets.popitem(last=False)
        return Decision(allowed, tokens, self.rate, self.burst)


# One round trip, atomic: Redis runs a script alone, on its own clock, so replicas whose clocks
# differ still agree. The bucket expires once it would be full again anyway.
_TAKE = """
local rate, burst = tonumber(ARGV[1]), tonumber(ARGV[2])
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
local state = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens, at = tonumber(state[1]), tonumber(state[2])
if tokens == nil or at == nil then tokens, at = burst, now end
tokens = math.min(burst, tokens + math.max(0, now - at) * rate)
local allowed = 0
if tokens >= 1 then tokens, allowed = tokens - 1, 1 end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'at', tostring(now))
redis.call('PEXPIRE', KEYS[1], math.ceil(burst / rate * 1000) + 1000)
return {allowed, tostring(tokens)}
"""


class RedisBuckets:
    """Buckets shared by every API replica, in Redis."""

    def __init__(self, url: str, rate: float, burst: int):
        import redis.asyncio as redis

        self.rate, self.burst = rate, burst
        self.client = redis.Redis.from_url(url, socket_timeout=1.0, socket_connect_timeout=1.0)
        self.script = self.client.register_script(_TAKE)
        self.fallback = MemoryBuckets(rate, burst)
        self._warned_at = 0.0

    async def take(self, key: str) -> Decision:
        try:
            allowed, tokens = await self.script(keys=[f"squeeze:ratelimit:{key}"], args=[self.rate, self.burst])
        except Exception as exc:  # redis-py raises many types; all mean "not answered"
            if time.monotonic() - self._warned_at > 60:
                self._warned_at = time.monotonic()
                log.warning("rate limits: Redis unavailable (%s); this replica counts alone", type(exc).__name__)
            return await self.fallback.take(key)
        return Decision(bool(int(allowed)), float(tokens), self.rate, self.burst)


def buckets_for(settings: Settings) -> MemoryBuckets | RedisBuckets | None:
    """The buckets the settings ask for, or None when rate limits are off."""
    if settings.rate_limit_per_s <= 0:
        return None
    url = settings.rate_limit_redis_url or (
        settings.broker_url if settings.broker_url.startswith(("redis://", "rediss://")) else None)
    if url:
        return RedisBuckets(url, settings.rate_limit_per_s, settings.rate_limit_burst)
    return MemoryBuckets(settings.rate_limit_per_s, settings.rate_limit_burst)


def bucket_key(scope: Scope) -> str | None:
    """The bucket of the request's API key, or None when it carries none. A digest of the
    secret (never the secret, nor the digest stored to authenticate it), so that limiting
    costs no database lookup: a made-up key is limited like any other."""
    for name, value in scope.get("headers") or []:
        if name == b"authorization":
            scheme, _, secret = value.partition(b" ")
            if scheme.lower() == b"bearer" and secret.strip():
                return hashlib.sha256(b"squeeze-ratelimit:" + secret.strip()).hexdigest()[:32]
    return None


class RateLimit:
    """ASGI middleware: takes a token for the request's key, answers 429 when there is none,
    and adds the ``RateLimit-*`` headers to every answer to a keyed request."""

    def __init__(self, app: ASGIApp, buckets: MemoryBuckets | RedisBuckets | None = None):
        self.app = app
        self.buckets = buckets if buckets is not None else buckets_for(get_settings())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        key = bucket_key(scope) if scope["type"] == "http" and self.buckets is not None else None
        if key is None:
            await self.app(scope, receive, send)
            return
        decision = await self.buckets.take(key)
        if not decision.allowed:
            await _refuse(send, decision)
            return

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *decision.headers()]}
            await send(message)

        await self.app(scope, receive, with_headers)


async def _refuse(send: Send, decision: Decision) -> None:
    retry = dict(decision.headers())[b"retry-after"].decode()
    body = json.dumps({"error": {
        "type": "rate_limit_error", "param": None,
        "message": f"too many requests for this API key: at most {decision.burst} at once and "
                   f"{decision.rate:g} a second; retry after {retry} s"}}).encode()
    await send({"type": "http.response.start", "status": 429,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *decision.headers()]})
    await send({"type": "http.response.body", "body": body})


_HEADER_DOCS = {
    "RateLimit-Limit": "Requests the key's bucket holds (`SQUEEZE_RATE_LIMIT_BURST`).",
    "RateLimit-Remaining": "Requests the key may send now.",
    "RateLimit-Reset": "Seconds until the bucket is full again.",
    "Retry-After": "Seconds until the key may send one more request.",
}


def document_rate_limits(app: Any) -> None:
    """Every operation that takes an API key may answer 429: say so in the OpenAPI document,
    with the headers that come with it."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = build()
        for path in schema.get("paths", {}).values():
            for operation in path.values():
                if not isinstance(operation, dict) or not operation.get("security"):
                    continue
                answer = operation.setdefault("responses", {}).setdefault("429", {
                    "description": "Too many requests.",
                    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorEnvelope"}}}})
                answer["description"] = (answer["description"].rstrip(".") +
                                         "; or this API key sent more requests than its rate limit allows.")
                answer["headers"] = {name: {"description": text, "schema": {"type": "integer"}}
                                     for name, text in _HEADER_DOCS.items()}
        app.openapi_schema = schema
        return schema

    app.openapi = openapi

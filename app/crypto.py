"""Secrets at rest: what the server must keep to use later (a webhook's signing key) is stored
encrypted, so a copy of the database or a backup does not give it away.

>>> token = encrypt(b"the signing key", context="webhook_secret")
>>> token.startswith("v1:")
True
>>> decrypt(token, context="webhook_secret")
b'the signing key'

AES-256-GCM; a token is ``v1:<key id>:<base64url(nonce | ciphertext | tag)>``. ``context`` is
bound to the token (associated data): a token copied into another column does not decrypt
there. The key comes from ``SQUEEZE_SECRET_KEY`` (base64 of 32 bytes; make one with
``python -m app.crypto``). Without it, the embedded default generates one into
``<var_dir>/secret.key`` on first use and keeps it: every process that shares that folder
shares the key. Several machines must share ``SQUEEZE_SECRET_KEY``. To rotate, set the new key
and list the old ones in ``SQUEEZE_PREVIOUS_SECRET_KEYS``: tokens name their key by id, so old
ones still decrypt and new ones use the new key.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import secrets
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from app.config import get_settings

KEY_BYTES = 32
NONCE_BYTES = 12
VERSION = "v1"


class DecryptionError(Exception):
    """The token is malformed, names an unknown key, or was altered."""


def parse_key(text: str) -> bytes:
    """A key as written in the settings: base64 (standard or URL-safe) of 32 bytes."""
    text = text.strip()
    try:
        padded = text.replace("+", "-").replace("/", "_") + "=" * (-len(text) % 4)
        key = base64.b64decode(padded, altchars=b"-_", validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("a secret key is the base64 of 32 random bytes (python -m app.crypto makes one)") from None
    if len(key) != KEY_BYTES:
        raise ValueError(f"a secret key is the base64 of {KEY_BYTES} bytes, this one has {len(key)}")
    return key


def key_id(key: bytes) -> str:
    """A short public name for a key (a hash, so it tells nothing about the key)."""
    return hashlib.sha256(b"squeeze key id\x00" + key).hexdigest()[:8]


@dataclass(frozen=True)
class Keyring:
    """The key new tokens use, and every key a token may name."""

    current: bytes
    previous: tuple[bytes, ...] = ()

    def encrypt(self, plaintext: bytes, context: str = "") -> str:
        nonce = secrets.token_bytes(NONCE_BYTES)
        sealed = AESGCM(self.current).encrypt(nonce, plaintext, context.encode())
        return f"{VERSION}:{key_id(self.current)}:{base64.urlsafe_b64encode(nonce + sealed).decode().rstrip('=')}"

    def decrypt(self, token: str, context: str = "") -> bytes:
        version, kid, body = (token.split(":") + ["", ""])[:3]
        key = next((k for k in (self.current, *self.previous) if key_id(k) == kid), None)
        if version != VERSION or key is None:
            raise DecryptionError(f"not a {VERSION} token of a known key (key id {kid!r})")
        try:
            raw = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
            return AESGCM(key).decrypt(raw[:NONCE_BYTES], raw[NONCE_BYTES:], context.encode())
        except (binascii.Error, ValueError, InvalidTag):
            raise DecryptionError("the token was altered or is not for this context") from None


def encrypt(plaintext: bytes, context: str = "") -> str:
    return keyring().encrypt(plaintext, context)


def decrypt(token: str, context: str = "") -> bytes:
    return keyring().decrypt(token, context)


def keyring() -> Keyring:
    """The keys the current settings name (cached per settings, so tests that change them get
    the matching keys)."""
    settings = get_settings()
    secret_key = settings.secret_key.get_secret_value() if settings.secret_key else None
    previous = settings.previous_secret_keys.get_secret_value() if settings.previous_secret_keys else ""
    return _keyring(secret_key, previous, settings.var_dir.resolve())


@lru_cache(maxsize=8)
def _keyring(secret_key: str | None, previous: str, var_dir: Path) -> Keyring:
    current = parse_key(secret_key) if secret_key else _key_file(var_dir / "secret.key")
    return Keyring(current, tuple(parse_key(k) for k in previous.split(",") if k.strip()))


def _key_file(path: Path) -> bytes:
    """The embedded default's key: read, or made once. Processes starting together (API and
    worker) agree on one: the file appears whole (a hard link of a finished file) or not at all."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        staged = path.with_name(f".{path.name}.{secrets.token_hex(6)}")
        fd = os.open(staged, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(new_key() + "\n")
        try:
            os.link(staged, path)
        except FileExistsError:
            pass  # another process made it first: theirs is the key
        finally:
            staged.unlink()
    return parse_key(path.read_text())


def new_key() -> str:
    return base64.urlsafe_b64encode(secrets.token_bytes(KEY_BYTES)).decode()


if __name__ == "__main__":
    print(new_key())  # a value for SQUEEZE_SECRET_KEY

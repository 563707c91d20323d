"""Secrets at rest: tokens decrypt only with their key and their context, keys rotate, and the
embedded default's key file is made once and shared."""

from __future__ import annotations

import os
import stat
import threading

import pytest
from pydantic import ValidationError

from app import crypto
from app.config import Settings, get_settings


@pytest.fixture
def settings_env(tmp_path, monkeypatch):
    """Settings read from the environment, as a process would; the var folder is this test's."""
    monkeypatch.setenv("SQUEEZE_VAR_DIR", str(tmp_path / "var"))
    monkeypatch.delenv("SQUEEZE_SECRET_KEY", raising=False)
    monkeypatch.delenv("SQUEEZE_PREVIOUS_SECRET_KEYS", raising=False)

    def use(**values: str) -> None:
        for name, value in values.items():
            monkeypatch.setenv(f"SQUEEZE_{name.upper()}", value)
        get_settings.cache_clear()

    use()
    yield use
    get_settings.cache_clear()


def test_a_token_round_trips_and_hides_the_plaintext():
    ring = crypto.Keyring(os.urandom(32))
    token = ring.encrypt(b"signing key bytes", context="webhook_secret")
    assert b"signing key bytes" not in token.encode() and token.startswith("v1:")
    assert ring.decrypt(token, context="webhook_secret") == b"signing key bytes"
    assert ring.encrypt(b"same", "c") != ring.encrypt(b"same", "c")  # a fresh nonce each time


def test_a_token_is_bound_to_its_context_and_refuses_any_change():
    ring = crypto.Keyring(os.urandom(32))
    token = ring.encrypt(b"secret", context="webhook_secret")
    with pytest.raises(crypto.DecryptionError):
        ring.decrypt(token, context="tenant_credentials")
    flipped = token[:-2] + ("A" if token[-2] != "A" else "B") + token[-1]
    for bad in (flipped, token.replace("v1:", "v2:"), "v1:" + "0" * 8 + ":" + token.split(":")[2], "garbage", ""):
        with pytest.raises(crypto.DecryptionError):
            ring.decrypt(bad, context="webhook_secret")
    with pytest.raises(crypto.DecryptionError):
        crypto.Keyring(os.urandom(32)).decrypt(token, context="webhook_secret")  # another key


def test_a_rotated_key_still_decrypts_old_tokens_and_new_ones_use_the_new_key(settings_env):
    old, new = crypto.new_key(), crypto.new_key()
    settings_env(secret_key=old)
    old_token = crypto.encrypt(b"kept", context="x")
    settings_env(secret_key=new, previous_secret_keys=old)
    assert crypto.decrypt(old_token, context="x") == b"kept"
    new_token = crypto.encrypt(b"kept", context="x")
    assert new_token.split(":")[1] == crypto.key_id(crypto.parse_key(new)) != old_token.split(":")[1]
    settings_env(secret_key=new, previous_secret_keys="")
    with pytest.raises(crypto.DecryptionError):
        crypto.decrypt(old_token, context="x")


def test_without_a_setting_the_key_file_is_made_once_private_and_reused(settings_env, tmp_path):
    token = crypto.encrypt(b"kept")
    path = tmp_path / "var" / "secret.key"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    crypto._keyring.cache_clear()  # as a new process would start
    assert crypto.decrypt(token) == b"kept"
    assert [p.name for p in path.parent.iterdir()] == ["secret.key"]  # no staging file left


def test_processes_starting_together_agree_on_one_key_file(tmp_path):
    path = tmp_path / "secret.key"
    keys: list[bytes] = []
    start = threading.Barrier(8)

    def make():
        start.wait()
        keys.append(crypto._key_file(path))

    threads = [threading.Thread(target=make) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(keys) == 8 and len(set(keys)) == 1 and keys[0] == crypto.parse_key(path.read_text())


@pytest.mark.parametrize("bad", ["short", "A" * 40, crypto.new_key()[:-4], "not base64!" * 4])
def test_a_malformed_key_fails_at_start(bad):
    with pytest.raises(ValidationError, match="secret_key"):
        Settings(secret_key=bad)
    with pytest.raises(ValidationError, match="previous_secret_keys"):
        Settings(previous_secret_keys=f"{crypto.new_key()},{bad}")

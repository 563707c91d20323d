"""Hostile requests through HTTP: each gets a clear 4xx, and nothing is stored."""

from __future__ import annotations

import socket
import time

import pytest

from tests.factories import CORPUS


def _stored(stack) -> tuple:
    client = stack.client
    root = stack.storage_root

    def names(folder):
        return sorted(p.name for p in folder.iterdir()) if folder.exists() else []

    return (len(client.get("/v1/models", params={"limit": 100}).json()["data"]),
            len(client.get("/v1/datasets", params={"limit": 100}).json()["data"]),
            names(root / "models"), names(root / "datasets"),
            [n for n in names(root / "tmp") if not n.startswith("upload-")])


def _raw(stack, head: bytes, body_parts: list[bytes], pause: float = 0.0, read: bool = True) -> bytes:
    with socket.create_connection(("127.0.0.1", stack.port), timeout=30) as sock:
        sock.sendall(head)
        for part in body_parts:
            sock.sendall(part)
            time.sleep(pause)
        if not read:
            return b""
        return _read_response(sock)


def _read_response(sock) -> bytes:
    """Headers and the whole body (by Content-Length), however the segments arrive."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                   if line.lower().startswith(b"content-length:")), 0)
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return head + b"\r\n\r\n" + body


def _multipart_head(stack, path: str, length: int, boundary: str = "xyz") -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {stack.admin_key}\r\n"
            f"Content-Type: multipart/form-data; boundary={boundary}\r\nContent-Length: {length}\r\n\r\n").encode()


def test_oversized_body_is_413_before_it_is_read(stack):
    before = _stored(stack)
    answer = _raw(stack, _multipart_head(stack, "/v1/datasets", 10 * 1024**3), [])
    assert answer.startswith(b"HTTP/1.1 413")
    # Streamed without a length: counted as it arrives, refused past the dataset limit (4 MiB here).
    big = CORPUS.encode() * 2000
    response = stack.client.post("/v1/datasets", files={"file": ("big.txt", big)})
    assert response.status_code == 413 and response.json()["error"]["type"] == "payload_too_large"
    assert _stored(stack) == before


def test_thousands_of_multipart_parts_are_refused(stack):
    before = _stored(stack)
    files = [("files", (f"f{i}.json", b"{}")) for i in range(1500)]
    response = stack.client.post("/v1/models", files=files)
    assert 400 <= response.status_code < 500
    assert "error" in response.json()
    assert _stored(stack) == before


def test_a_stalled_upload_times_out_and_leaves_nothing(stack):
    before = _stored(stack)
    body = b"--xyz\r\nContent-Disposition: form-data; name=\"file\"; filename=\"d.txt\"\r\n\r\nsome text"
    answer = _raw(stack, _multipart_head(stack, "/v1/datasets", len(body) + 1000), [body])  # never finishes
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert b"abandoned" in answer
    assert _stored(stack) == before


def test_a_client_that_disconnects_mid_upload_leaves_nothing(stack):
    before = _stored(stack)
    body = b"--xyz\r\nContent-Disposition: form-data; name=\"file\"; filename=\"d.txt\"\r\n\r\n" + b"a" * 100_000
    _raw(stack, _multipart_head(stack, "/v1/datasets", len(body) + 100_000), [body], read=False)
    time.sleep(1.0)
    assert _stored(stack) == before


@pytest.mark.parametrize("spec, param", [
    ({"stages": [{"type": "prune", "method": "magnitude", "sparsity": 1.0}]}, "stages.0.sparsity"),
    ({"stages": [{"type": "quantize", "method": "rtn"}], "calibration": {"dataset_id": "ds", "samples": 10**9}},
     "calibration.samples"),
    ({"stages": [{"type": "distill", "method": "kd", "dataset_id": "ds", "steps": -5}]}, "stages.0.steps"),
    ({"stages": []}, "stages"),
])
def test_absurd_spec_values_are_rejected_at_validation(stack, spec, param):
    response = stack.client.post("/v1/jobs", json={"model_id": "mdl_x", **spec})
    assert response.status_code == 422 and response.json()["error"]["param"] == param

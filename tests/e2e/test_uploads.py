"""Resumable uploads: parts in any order, a retried part replaces, sha256 verified on completion."""

from __future__ import annotations

import hashlib
import http.client
import io
import json
import tarfile

import pytest

from tests.e2e.client import upload_dataset
from tests.factories import make_checkpoint

PART = 64 * 1024


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> bytes:
    folder = make_checkpoint(tmp_path_factory.mktemp("m") / "tiny-gpt2")
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        tar.add(folder, arcname="tiny-gpt2")
    return buffer.getvalue()


def _start(client, data: bytes, **extra):
    body = {"filename": "tiny-gpt2.tar.gz", "size_bytes": len(data), "purpose": "model", "part_size": PART, **extra}
    response = client.post("/v1/uploads", json=body)
    assert response.status_code == 201, response.text
    return response.json()


def test_parts_out_of_order_with_a_retry_assemble_to_a_model(pg_stack, archive):
    client = pg_stack.client
    upload = _start(client, archive)
    parts = [archive[i:i + PART] for i in range(0, len(archive), PART)]
    assert upload["parts_expected"] == len(parts) >= 3
    order = list(range(len(parts)))[::-1]  # last part first
    for index in order:
        data = parts[index]
        if index == 1:  # a first attempt that got corrupted in transit, then re-sent
            corrupted = bytes([data[0] ^ 0xFF]) + data[1:]
            assert client.put(f"/v1/uploads/{upload['id']}/parts/2", content=corrupted).status_code == 200
        response = client.put(f"/v1/uploads/{upload['id']}/parts/{index + 1}", content=data)
        assert response.status_code == 200, response.text
        assert response.json()["sha256"] == hashlib.sha256(data).hexdigest()
    state = client.get(f"/v1/uploads/{upload['id']}").json()
    assert [p["part_number"] for p in state["parts"]] == list(range(1, len(parts) + 1))

    done = client.post(f"/v1/uploads/{upload['id']}/complete",
                       json={"sha256": hashlib.sha256(archive).hexdigest(), "name": "resumed"})
    assert done.status_code == 201, done.text
    model = client.get(f"/v1/models/{done.json()['model_id']}").json()
    assert model["name"] == "resumed" and model["architecture"] == "GPT2LMHeadModel"
    assert client.post(f"/v1/uploads/{upload['id']}/complete",
                       json={"sha256": hashlib.sha256(archive).hexdigest()}).status_code == 409


@pytest.mark.parametrize("name", ["a\nforged log line", "\x1b[31mred", "x" * 201])
def test_a_bad_name_on_complete_is_422_naming_it(pg_stack, archive, name):
    # The same rule as the name of POST /v1/models: no control characters, 200 at most.
    upload = _start(pg_stack.client, archive)
    response = pg_stack.client.post(f"/v1/uploads/{upload['id']}/complete", json={"sha256": "0" * 64, "name": name})
    assert response.status_code == 422 and response.json()["error"]["param"] == "name", response.text


def test_wrong_sha_missing_parts_and_bad_sizes_are_refused(pg_stack, archive):
    client = pg_stack.client
    upload = _start(client, archive)
    parts = [archive[i:i + PART] for i in range(0, len(archive), PART)]
    url = f"/v1/uploads/{upload['id']}"
    assert client.put(f"{url}/parts/1", content=parts[0] + b"x").status_code == 400
    assert client.put(f"{url}/parts/1", content=parts[0][:-1]).status_code == 400
    assert client.put(f"{url}/parts/{len(parts) + 1}", content=b"x").status_code == 422
    client.put(f"{url}/parts/1", content=parts[0])
    missing = client.post(f"{url}/complete", json={"sha256": "0" * 64})
    assert missing.status_code == 409 and missing.json()["error"]["param"] == "parts"
    for number, data in enumerate(parts[1:], start=2):
        client.put(f"{url}/parts/{number}", content=data)
    wrong = client.post(f"{url}/complete", json={"sha256": "0" * 64})
    assert wrong.status_code == 400 and wrong.json()["error"]["param"] == "sha256"
    assert client.delete(url).json()["status"] == "aborted"
    assert client.put(f"{url}/parts/1", content=parts[0]).status_code == 409


def test_limits_answer_413(pg_stack):
    client = pg_stack.client
    too_big = client.post("/v1/uploads", json={"filename": "x.tar.gz", "size_bytes": 10**13, "purpose": "model"})
    assert too_big.status_code == 413 and too_big.json()["error"]["param"] == "size_bytes"
    # Under the per-file limit, over the tenant's storage limit (200 MiB in the test stacks).
    over_quota = client.post("/v1/uploads", json={"filename": "m.tar.gz", "size_bytes": 300 * 1024 * 1024,
                                                   "purpose": "model"})
    assert over_quota.status_code == 413 and "storage limit" in over_quota.json()["error"]["message"]
    bad_name = client.post("/v1/uploads", json={"filename": "../x.tar.gz", "size_bytes": 10, "purpose": "model"})
    assert bad_name.status_code == 400 and bad_name.json()["error"]["param"] == "filename"
    other = pg_stack.client_for(pg_stack.create_key("tenant-uploads"))
    upload = client.post("/v1/uploads", json={"filename": "d.txt", "size_bytes": 10, "purpose": "dataset"}).json()
    assert other.get(f"/v1/uploads/{upload['id']}").status_code == 404
    assert other.put(f"/v1/uploads/{upload['id']}/parts/1", content=b"0123456789").status_code == 404


MiB = 1024 * 1024
LIMIT = 200 * MiB  # the test stacks' tenant storage limit


def test_pending_uploads_reserve_their_size_and_are_capped(pg_stack):
    client = pg_stack.client_for(pg_stack.create_key("tenant-reserving"))
    big = client.post("/v1/uploads", json={"filename": "m.tar.gz", "size_bytes": 150 * MiB, "purpose": "model"})
    assert big.status_code == 201, big.text
    # Nothing is stored yet, but the 150 MiB are reserved: 60 MiB more cannot fit in 200.
    over = client.post("/v1/uploads", json={"filename": "n.tar.gz", "size_bytes": 60 * MiB, "purpose": "model"})
    assert over.status_code == 413 and over.json()["error"]["param"] == "size_bytes"
    assert f"{150 * MiB} of {LIMIT} bytes used or reserved" in over.json()["error"]["message"]
    # Aborting gives the reservation back.
    assert client.delete(f"/v1/uploads/{big.json()['id']}").json()["status"] == "aborted"
    assert client.post("/v1/uploads", json={"filename": "n.tar.gz", "size_bytes": 60 * MiB,
                                            "purpose": "model"}).status_code == 201
    # At most SQUEEZE_MAX_PENDING_UPLOADS_PER_TENANT (10) pending at once: the 60 MiB one and 9 more.
    for n in range(9):
        assert client.post("/v1/uploads", json={"filename": f"d{n}.txt", "size_bytes": 10,
                                                "purpose": "dataset"}).status_code == 201
    capped = client.post("/v1/uploads", json={"filename": "d.txt", "size_bytes": 10, "purpose": "dataset"})
    assert capped.status_code == 429 and "10 pending uploads" in capped.json()["error"]["message"]


def test_completing_an_upload_does_not_count_its_own_reservation(pg_stack, archive):
    # The model the archive becomes fits beside the filler only if the upload's own reservation
    # is not counted too (by half the archive's size either way).
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        unpacked = sum(member.size for member in tar.getmembers() if member.isfile())
    client = pg_stack.client_for(pg_stack.create_key("tenant-completing"))
    filler = client.post("/v1/uploads", json={"filename": "f.tar.gz", "size_bytes": LIMIT - unpacked - len(archive) // 2,
                                              "purpose": "model"})
    assert filler.status_code == 201, filler.text
    upload = _start(client, archive)
    for number, start in enumerate(range(0, len(archive), PART), start=1):
        assert client.put(f"/v1/uploads/{upload['id']}/parts/{number}", content=archive[start:start + PART]).status_code == 200
    done = client.post(f"/v1/uploads/{upload['id']}/complete", json={"sha256": hashlib.sha256(archive).hexdigest()})
    assert done.status_code == 201 and done.json()["status"] == "completed", done.text


def _declare_only(stack, key: str, path: str, declared: int) -> tuple[int, dict]:
    """Send the headers of a one-request upload that declares ``declared`` bytes, and not one byte
    of its body: the answer can only come from the declaration."""
    connection = http.client.HTTPConnection("127.0.0.1", stack.port, timeout=30)
    try:
        connection.putrequest("POST", path)
        connection.putheader("Authorization", f"Bearer {key}")
        connection.putheader("Content-Type", "multipart/form-data; boundary=squeeze")
        connection.putheader("Content-Length", str(declared))
        connection.endheaders()
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


def test_a_one_request_upload_that_cannot_fit_is_refused_before_its_body(pg_stack):
    key = pg_stack.create_key("tenant-declaring")
    client = pg_stack.client_for(key)
    assert client.post("/v1/uploads", json={"filename": "m.tar.gz", "size_bytes": 198 * MiB,
                                            "purpose": "model"}).status_code == 201
    status, body = _declare_only(pg_stack, key, "/v1/models", 50 * MiB)
    assert status == 413 and body["error"]["param"] == "files", body
    message = body["error"]["message"]
    assert str(50 * MiB) in message and f"only {2 * MiB} of the tenant's {LIMIT} bytes remain" in message
    status, body = _declare_only(pg_stack, key, "/v1/datasets", 3 * MiB)  # under the 4 MiB dataset limit
    assert status == 413 and body["error"]["param"] == "file"
    # What fits is read and stored as usual.
    assert upload_dataset(client)["num_records"] > 0

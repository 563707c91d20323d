"""The storage contract: the local folder and the S3 backend (against a real S3-protocol server
on loopback, tests/s3_server.py) pass the same tests."""

from __future__ import annotations

import hashlib
import io
import os
import uuid

import httpx
import pytest

from app.storage import LocalStore, object_key
from app.storage.cache import ScratchCache
from app.storage.http import parse_range
from app.storage.s3 import PART_BYTES, S3Store, parse_url
from tests.s3_server import s3_server


@pytest.fixture(scope="module")
def s3_env():
    with s3_server() as env:
        yield env


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path, monkeypatch):
    if request.param == "local":
        return LocalStore(tmp_path / "store")
    env = request.getfixturevalue("s3_env")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    # A fresh prefix per test: the tests share the server and its bucket.
    return S3Store(f"{env['SQUEEZE_STORAGE_URL']}/{uuid.uuid4().hex}", tmp_path / "scratch", cache_max_bytes=10**9)


def test_put_head_read_ranges_list_delete(store, tmp_path):
    data = bytes(range(256)) * 40
    source = tmp_path / "source.bin"
    source.write_bytes(data)
    digest = hashlib.sha256(data).hexdigest()
    store.put_file("artifacts/job_1-attempt1.tar", source, sha256=digest)
    assert source.exists()  # copied, not moved

    info = store.head("artifacts/job_1-attempt1.tar")
    assert (info.size, info.sha256) == (len(data), digest)
    assert info.etag.startswith('"') and info.etag.endswith('"')
    assert store.head("artifacts/job_1-attempt9.tar") is None
    assert store.read_bytes("artifacts/job_1-attempt1.tar") == data
    assert b"".join(store.open_range("artifacts/job_1-attempt1.tar", 10, 19)) == data[10:20]
    assert b"".join(store.open_range("artifacts/job_1-attempt1.tar", 10_000)) == data[10_000:]

    store.put_file("artifacts/job_1-attempt2.tar", source, move=True)
    assert not source.exists()
    assert store.head("artifacts/job_1-attempt2.tar").sha256 is None
    store.put_stream("artifacts/job_2-attempt1.tar", io.BytesIO(b"other"))
    assert store.list("artifacts/job_1-attempt") == ["artifacts/job_1-attempt1.tar", "artifacts/job_1-attempt2.tar"]

    assert store.list("") == store.list("artifacts/")  # every object, nothing of the backend's own
    store.delete_key("artifacts/job_1-attempt1.tar")
    assert store.head("artifacts/job_1-attempt1.tar") is None
    assert store.list("artifacts/") == ["artifacts/job_1-attempt2.tar", "artifacts/job_2-attempt1.tar"]
    assert store.delete_prefix("artifacts/") == 2 and store.list("artifacts/") == []


def test_a_stream_larger_than_a_part_is_stored_whole(store):
    # 2.5 parts: on S3 a multipart upload of three parts (its ETag says so), read back intact.
    data = os.urandom(PART_BYTES * 2 + PART_BYTES // 2)
    digest = hashlib.sha256(data).hexdigest()
    store.put_stream("datasets/ds_1/big.txt", io.BytesIO(data), sha256=digest)
    info = store.head("datasets/ds_1/big.txt")
    assert (info.size, info.sha256) == (len(data), digest)
    if isinstance(store, S3Store):
        assert info.etag.endswith('-3"')
    streamed = hashlib.sha256()
    for chunk in store.open_range("datasets/ds_1/big.txt"):
        streamed.update(chunk)
    assert streamed.hexdigest() == digest


def test_a_committed_folder_is_checked_out_whole_and_deleted_whole(store):
    staging = store.staging_dir()
    (staging / "config.json").write_text('{"model_type": "gpt2"}')
    (staging / "tokenizer").mkdir()
    (staging / "tokenizer" / "vocab.json").write_text("{}")
    store.commit_dir(staging, "models", "mdl_1")
    assert not staging.exists()
    assert store.list("models/mdl_1/") == ["models/mdl_1/config.json", "models/mdl_1/tokenizer/vocab.json"]
    assert store.read_bytes("models/mdl_1/config.json") == b'{"model_type": "gpt2"}'

    with store.checkout("models", "mdl_1") as folder:
        assert (folder / "config.json").read_text() == '{"model_type": "gpt2"}'
        assert (folder / "tokenizer" / "vocab.json").read_text() == "{}"

    store.delete("models", "mdl_1")
    assert store.list("models/mdl_1/") == []
    with pytest.raises(FileNotFoundError):
        with store.checkout("models", "mdl_1"):
            pass


def test_a_job_staging_is_local_and_discarded_by_owner(store):
    mine = store.staging_dir(owner="job_7")
    other = store.staging_dir()
    assert mine.is_relative_to(store.root) and other.is_relative_to(store.root)
    assert store.discard_staging("job_7") == 1
    assert not mine.exists() and other.exists()
    store.discard(other)
    assert not other.exists()


def test_presign(store, tmp_path):
    (tmp_path / "a.tar").write_bytes(b"tar bytes")
    store.put_file("artifacts/job_3-attempt1.tar", tmp_path / "a.tar")
    url = store.presign("artifacts/job_3-attempt1.tar", 300, "job_3.tar")
    if isinstance(store, LocalStore):
        assert url is None  # streamed by the API instead
        return
    assert url.startswith(os.environ["AWS_ENDPOINT_URL"])
    answer = httpx.get(url)
    assert answer.status_code == 200 and answer.content == b"tar bytes"
    assert 'filename="job_3.tar"' in answer.headers["content-disposition"]


@pytest.mark.parametrize("key", ["models/../x", "models/a/../../b", "secrets/x", "models//x", "models/a\\b"])
def test_keys_cannot_leave_their_folder(store, key):
    with pytest.raises(ValueError):
        store.head(key)


def test_object_key_and_url_parsing():
    assert object_key("models", "mdl_1", "sub/config.json") == "models/mdl_1/sub/config.json"
    assert parse_url("s3://bucket/a/b/") == ("bucket", "a/b/")
    assert parse_url("s3://bucket") == ("bucket", "")
    with pytest.raises(ValueError):
        parse_url("https://bucket/a")


@pytest.mark.parametrize(("header", "size", "expected"), [
    ("bytes=0-9", 100, (0, 9)), ("bytes=90-", 100, (90, 99)), ("bytes=-10", 100, (90, 99)),
    ("bytes=50-500", 100, (50, 99)), ("bytes=100-", 100, "unsatisfiable"), ("bytes=-0", 100, "unsatisfiable"),
    ("bytes=9-3", 100, None), ("bytes=0-1,5-6", 100, None), ("items=0-1", 100, None), ("bytes=-", 100, None),
])
def test_parse_range(header, size, expected):
    assert parse_range(header, size) == expected


def test_scratch_cache_evicts_least_recently_used_but_never_one_in_use(tmp_path):
    cache = ScratchCache(tmp_path / "cache", max_bytes=250)
    downloads = []

    def filler(name):
        def download(into):
            downloads.append(name)
            (into / "weights").write_bytes(b"w" * 100)
        return download

    with cache.use("models", "a", filler("a")):
        pass
    with cache.use("models", "b", filler("b")) as b_folder:
        with cache.use("models", "a", filler("a")):  # cached: no second download; now the newest
            pass
        os.utime(tmp_path / "cache" / "models-a", (1, 1))  # a is the oldest again
        with cache.use("models", "c", filler("c")):      # 300 bytes > 250: one must go
            pass
        assert (b_folder / "weights").exists()           # b is in use: kept although older than c
    assert downloads == ["a", "b", "c"]
    assert sorted(p.name for p in (tmp_path / "cache").iterdir() if p.is_dir()) == ["models-b", "models-c"]
    # b released: the next download can take it.
    os.utime(tmp_path / "cache" / "models-b", (2, 2))
    with cache.use("models", "d", filler("d")):
        pass
    assert sorted(p.name for p in (tmp_path / "cache").iterdir() if p.is_dir()) == ["models-c", "models-d"]


def _send_part(store, upload_id, number, data, tmp_path):
    received = store.parts_dir(upload_id) / f".part-{number}-incoming"
    received.parent.mkdir(parents=True, exist_ok=True)
    received.write_bytes(data)
    store.parts_put(upload_id, number, received)
    assert not received.exists()  # handed over to the store


def test_resumable_parts_any_order_resent_assembled_streamed(store, tmp_path):
    size = store.min_part_bytes if isinstance(store, S3Store) else 1000
    chunks = [os.urandom(size), os.urandom(size), os.urandom(size // 3)]
    whole = b"".join(chunks)
    store.parts_begin("upl_1")
    _send_part(store, "upl_1", 3, chunks[2], tmp_path)
    _send_part(store, "upl_1", 1, b"x" * size, tmp_path)      # wrong, then re-sent: replaced
    _send_part(store, "upl_1", 2, chunks[1], tmp_path)
    _send_part(store, "upl_1", 1, chunks[0], tmp_path)
    assert store.parts_assemble("upl_1", 3) == hashlib.sha256(whole).hexdigest()
    with store.parts_open("upl_1") as stream:
        read = b""
        while chunk := stream.read(65536):
            read += chunk
    assert read == whole
    # Assembling again (a completion retried after its file was refused) gives the same whole.
    assert store.parts_assemble("upl_1", 3) == hashlib.sha256(whole).hexdigest()
    store.parts_discard("upl_1")
    assert store.list("") == [] and not store.parts_dir("upl_1").exists()
    if isinstance(store, S3Store):
        assert store._multipart_ids("upl_1") == []


def test_a_mismatch_keeps_the_parts_locally_and_restarts_the_multipart_upload(store, tmp_path):
    store.parts_begin("upl_2")
    _send_part(store, "upl_2", 1, b"only part", tmp_path)
    store.parts_assemble("upl_2", 1)
    kept = store.parts_unassemble("upl_2")
    assert kept == isinstance(store, LocalStore)
    if not kept:  # S3: a fresh multipart upload takes the parts sent again
        assert len(store._multipart_ids("upl_2")) == 1
        _send_part(store, "upl_2", 1, b"only part", tmp_path)
    assert store.parts_assemble("upl_2", 1) == hashlib.sha256(b"only part").hexdigest()
    store.parts_discard("upl_2")


def test_stale_multipart_uploads_are_listed(store):
    store.parts_begin("upl_3")
    if isinstance(store, LocalStore):
        assert store.parts_stale(max_idle_s=3600) == []
    # (moto reports every multipart upload as started in 2010, so its age cannot be tested
    # there; a real store reports the true time.)
    # Locally the folders go with expiry; in S3 every multipart upload older than the idle time.
    assert store.parts_stale(max_idle_s=-60) == ([] if isinstance(store, LocalStore) else ["upl_3"])
    store.parts_discard("upl_3")
    assert store.parts_stale(max_idle_s=-60) == []
    with pytest.raises(ValueError):
        store.parts_dir("../etc")

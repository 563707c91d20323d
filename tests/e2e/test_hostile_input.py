"""Every hostile file and request of issue 5, sent through the real HTTP API of a live stack.

Each case is refused with its exact 4xx, the error envelope ``{"error": {"type", "message",
"param"}}`` with a message that names the problem, and leaves storage and database exactly as
they were: every file under the storage root (relative path and size), nothing new beside it,
and the row count of every table in the stack's PostgreSQL database.

Checkpoints go to ``POST /v1/models`` as multipart files or as one .zip / .tar.gz; text goes to
``POST /v1/datasets``; the pickle and archive cases also take the resumable path
(``/v1/uploads`` -> parts -> complete). The stack keeps the default limits for archives and
headers (see ``app.config.Settings``); each case is built to pass them cheaply.

Hostile requests (at the end): bodies over the limits, thousands of multipart parts, a stalled
body, a client gone mid-upload, absurd spec values; each checked the same way.

This is the one home of hostile input over HTTP; the functions that refuse it are tested case
by case, without a server, in tests/app/test_checkpoints.py.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import pickle
import socket
import stat
import tarfile
import time
import warnings
import zipfile
from pathlib import Path

import pytest
import torch
from sqlalchemy import create_engine, inspect, text

from app.config import Settings
from tests.app.test_checkpoints import raw_safetensors, tar_bytes, zip_bytes
from tests.factories import checkpoint_files, make_checkpoint

DEFAULTS = Settings()
MEMBERS = DEFAULTS.max_archive_members  # 64
HEADER_LIMIT = DEFAULTS.max_safetensors_header_bytes  # 64 MiB
UPLOAD_LIMIT = DEFAULTS.max_upload_bytes  # 20 GiB
# A distinctive name for files that try to escape: it must never appear anywhere.
ESCAPE = "squeeze-hostile-escape"


# --- what "unchanged" means -------------------------------------------------------------------


@pytest.fixture(scope="module")
def stack(pg_stack):
    # The cases rely on the default archive/header/upload limits; the stack must not lower them.
    for name in ("MAX_ARCHIVE_MEMBERS", "MAX_COMPRESSION_RATIO", "MAX_SAFETENSORS_HEADER_BYTES",
                 "MAX_UPLOAD_BYTES", "MAX_MODEL_PARAMETERS"):
        assert f"SQUEEZE_{name}" not in pg_stack.env
    return pg_stack


@pytest.fixture(scope="module")
def engine(stack):
    engine = create_engine(stack.env["SQUEEZE_DATABASE_URL"])
    # Jobs left running by earlier modules would add events and artifacts while a case runs;
    # wait until none is active so that any change is the case's own.
    deadline = time.monotonic() + 120
    with engine.connect() as conn:
        while conn.execute(text("SELECT count(*) FROM jobs WHERE status IN ('queued', 'running')")).scalar():
            assert time.monotonic() < deadline, "jobs of earlier tests are still active"
            time.sleep(0.5)
            conn.rollback()
    yield engine
    engine.dispose()


def _files_under(root: Path, skip: Path | None = None) -> dict[str, int]:
    """Relative path -> size of every file (folders as -1, so an empty leftover shows too)."""
    found = {}
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        if skip is not None and here == skip:
            dirnames[:] = []
            continue
        for name in dirnames:
            found[str((here / name).relative_to(root))] = -1
        for name in filenames:
            path = here / name
            if path.suffix == ".log" and here == root:
                continue  # the stack's process logs grow with every request
            found[str(path.relative_to(root))] = path.lstat().st_size
    return found


class State:
    """Storage, what lies beside it, and the database of the stack, as one comparable value."""

    def __init__(self, stack, engine):
        self.stack, self.engine = stack, engine

    def take(self) -> dict:
        root = self.stack.storage_root
        with self.engine.connect() as conn:
            # Every table. idempotency_keys would change per request only for requests that send
            # an Idempotency-Key header; none here does, so it is compared too.
            rows = {table: conn.execute(text(f'SELECT count(*) FROM "{table}"')).scalar()
                    for table in inspect(conn).get_table_names()}
        return {
            "storage": _files_under(root),
            # The stack's folder around the storage root: nothing may be written beside it.
            "outside": _files_under(self.stack.workdir, skip=root),
            "rows": rows,
        }

    def assert_unchanged(self, before: dict) -> None:
        after = self.take()
        assert after["storage"] == before["storage"], _diff(before["storage"], after["storage"])
        assert after["outside"] == before["outside"], _diff(before["outside"], after["outside"])
        assert after["rows"] == before["rows"]
        assert not any(ESCAPE in path for path in after["storage"])
        assert not Path(f"/tmp/{ESCAPE}.json").exists() and not Path(f"/{ESCAPE}.json").exists()


def _diff(before: dict, after: dict) -> str:
    added = sorted(set(after) - set(before))
    removed = sorted(set(before) - set(after))
    changed = sorted(k for k in set(after) & set(before) if after[k] != before[k])
    return f"added {added}, removed {removed}, changed {changed}"


@pytest.fixture
def state(stack, engine) -> State:
    state = State(stack, engine)
    snapshot = state.take()  # a snapshot that sees nothing would prove nothing
    assert {"models", "datasets", "uploads", "upload_parts", "jobs", "api_keys"} <= set(snapshot["rows"])
    assert {"models", "datasets", "tmp"} <= set(snapshot["storage"])
    return state


def assert_refused(response, status: int, phrase: str, param: str | None = "files") -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) >= {"type", "message", "param"}, body
    error = body["error"]
    expected_type = "payload_too_large" if status == 413 else "invalid_request_error"
    assert error["type"] == expected_type, error
    assert error["param"] == param, error
    assert phrase.lower() in error["message"].lower(), error["message"]


# --- building hostile files -------------------------------------------------------------------


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> dict[str, bytes]:
    """A valid tiny GPT-2 with tokenizer: name -> bytes. Each case breaks one thing."""
    return dict(checkpoint_files(make_checkpoint(tmp_path_factory.mktemp("good"))))


def torch_pickle() -> bytes:
    buffer = io.BytesIO()
    torch.save({"weight": torch.zeros(2)}, buffer)  # a zip holding data.pkl
    return buffer.getvalue()


def plain_pickle() -> bytes:
    return pickle.dumps({"weight": [0.0, 1.0]}, protocol=4)


def without_weights(good: dict[str, bytes], **extra: bytes) -> dict[str, bytes]:
    return {**{n: d for n, d in good.items() if not n.endswith(".safetensors")}, **extra}


def with_weights(good: dict[str, bytes], data: bytes) -> dict[str, bytes]:
    return {**good, "model.safetensors": data}


def with_json(good: dict[str, bytes], name: str, **changes) -> dict[str, bytes]:
    return {**good, name: json.dumps({**json.loads(good[name]), **changes}).encode()}


def as_files(members: dict[str, bytes]) -> dict:
    return {"files": [("files", (name, data)) for name, data in members.items()]}


def as_archive(name: str, data: bytes) -> dict:
    return {"files": [("files", (name, data))]}


def raw_multipart(names_and_data: list[tuple[bytes, bytes]], field: bytes = b"files") -> dict:
    """A multipart body written by hand: httpx would percent-escape NUL and control bytes in a
    file name, and the point is to send them raw."""
    boundary = b"squeeze-hostile-boundary"
    body = b"".join(
        b"--" + boundary + b"\r\nContent-Disposition: form-data; name=\"" + field + b"\"; filename=\""
        + name + b"\"\r\nContent-Type: application/octet-stream\r\n\r\n" + data + b"\r\n"
        for name, data in names_and_data
    ) + b"--" + boundary + b"--\r\n"
    return {"content": body, "headers": {"Content-Type": f"multipart/form-data; boundary={boundary.decode()}"}}


def zip_with_mode(name: str, data: bytes, mode: int) -> bytes:
    """A one-member zip whose Unix mode (external attributes) marks a link or a device."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        info = zipfile.ZipInfo(name)
        info.create_system = 3  # Unix, so the mode is meaningful
        info.external_attr = mode << 16
        zf.writestr(info, data)
    return buffer.getvalue()


def zip_duplicate(members: dict[str, bytes], twice: str) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns about the duplicate it is told to write
        for name, data in members.items():
            zf.writestr(name, data)
        zf.writestr(twice, members[twice])
    return buffer.getvalue()


def tar_special(name: str, kind: bytes, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, linkname
    if kind in (tarfile.CHRTYPE, tarfile.BLKTYPE):
        info.devmajor, info.devminor = 1, 3  # /dev/null
    return info


def tar_claiming(name: str, size: int) -> bytes:
    """A .tar.gz whose one member's header claims ``size`` bytes; the data is not there (it is
    refused on the header, before any of it would be read)."""
    info = tarfile.TarInfo(name)
    info.size = size
    header = info.tobuf(format=tarfile.GNU_FORMAT)  # base-256 size field: over 8 GiB fits
    buffer = io.BytesIO()
    with gzip.GzipFile(fileobj=buffer, mode="wb") as gz:
        gz.write(header + bytes(4096))
    return buffer.getvalue()


# 8 MiB of zeros deflates to about 8 KiB: a ratio near 1000, over the default limit of 200.
BOMB = bytes(8 * 1024 * 1024)


def safetensors_case(header: dict, data: bytes, **kwargs):
    return lambda good: as_files(with_weights(good, raw_safetensors(header, data, **kwargs)))


F32x2 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}


# --- POST /v1/models -------------------------------------------------------------------------
#
# (id, build(good) -> httpx keyword arguments, status, phrase in the message)

MODEL_CASES = [
    # Pickles under any extension, beside an otherwise valid checkpoint.
    *[pytest.param(lambda good, n=name: as_files(without_weights(good, **{n: torch_pickle()})), 400,
                   f"{name} is a pickle-based weights file", id=f"pickle-{name}")
      for name in ("pytorch_model.bin", "model.pt", "weights.pkl", "model.ckpt", "model.pth")],
    pytest.param(lambda good: as_files(with_weights(good, plain_pickle())), 400,
                 "model.safetensors is a Python pickle, whatever its name says", id="pickle-named-safetensors"),
    pytest.param(lambda good: as_files(with_weights(good, torch_pickle())), 400,
                 "model.safetensors is a PyTorch torch.save file", id="torch-zip-named-safetensors"),
    pytest.param(lambda good: as_files({**good, "config.json": plain_pickle()}), 400,
                 "config.json is a Python pickle", id="pickle-named-config-json"),
    pytest.param(lambda good: as_archive("model.zip", zip_bytes(without_weights(good, **{"pytorch_model.bin": torch_pickle()}))),
                 400, "pytorch_model.bin is a pickle-based weights file", id="pickle-bin-in-zip"),
    pytest.param(lambda good: as_archive("model.tar.gz", tar_bytes(list(with_weights(good, plain_pickle()).items()))),
                 400, "model.safetensors is a Python pickle", id="pickle-named-safetensors-in-tar-gz"),
    pytest.param(lambda good: as_archive("model.zip", torch_pickle()), 400, "data.pkl is a pickle-based",
                 id="torch-save-file-named-zip"),
    pytest.param(lambda good: as_archive("model.tar.gz", plain_pickle()), 400, "the tar archive is damaged",
                 id="pickle-named-tar-gz"),

    # Safetensors headers that lie (with the valid config.json, so the header is what is judged).
    pytest.param(safetensors_case({}, b"", header_length=10**5), 400, "runs past the end of the file",
                 id="safetensors-header-beyond-file"),
    pytest.param(safetensors_case({"a": F32x2, "b": {**F32x2, "data_offsets": [4, 12]}}, bytes(12)), 400,
                 "overlap", id="safetensors-overlapping-offsets"),
    pytest.param(safetensors_case({"a": F32x2}, bytes(4)), 400, "outside the data section",
                 id="safetensors-offsets-out-of-range"),
    # The limit is 64 MiB; a header that claims more is refused on its length alone, before a
    # byte of it is read, so the file itself can stay small.
    pytest.param(safetensors_case({}, b"", header_length=HEADER_LIMIT + 1), 413,
                 f"over the limit of {HEADER_LIMIT}", id="safetensors-huge-header"),

    # Archives that try to escape, link, or hold what is not a file.
    pytest.param(lambda good: as_archive("model.zip", zip_bytes({**good, f"/tmp/{ESCAPE}.json": b"{}"})),
                 400, "is an absolute path", id="zip-absolute-path"),
    pytest.param(lambda good: as_archive("model.tar.gz", tar_bytes([*good.items(), (f"/tmp/{ESCAPE}.json", b"{}")])),
                 400, "is an absolute path", id="tar-gz-absolute-path"),
    pytest.param(lambda good: as_archive("model.zip", zip_bytes({**good, f"../{ESCAPE}.json": b"{}"})),
                 400, "contains '..'", id="zip-dotdot"),
    pytest.param(lambda good: as_archive("model.tar.gz", tar_bytes([*good.items(), (f"m/../../{ESCAPE}.json", b"{}")])),
                 400, "contains '..'", id="tar-gz-dotdot"),
    pytest.param(lambda good: as_archive("model.zip", zip_with_mode("README.md", b"/etc/passwd", stat.S_IFLNK | 0o777)),
                 400, "'README.md' is a link", id="zip-symlink"),
    pytest.param(lambda good: as_archive("model.zip", zip_with_mode("README.md", b"", stat.S_IFCHR | 0o666)),
                 400, "not a regular file", id="zip-device"),
    pytest.param(lambda good: as_archive("model.tar.gz", tar_bytes([tar_special("README.md", tarfile.SYMTYPE, "/etc/passwd")])),
                 400, "'README.md' is a link", id="tar-gz-symlink"),
    pytest.param(lambda good: as_archive("model.tar.gz", tar_bytes([*good.items(), tar_special("README.md", tarfile.LNKTYPE, "config.json")])),
                 400, "'README.md' is a link", id="tar-gz-hardlink"),
    pytest.param(lambda good: as_archive("model.tar.gz", tar_bytes([tar_special("README.md", tarfile.CHRTYPE)])),
                 400, "not a regular file (device", id="tar-gz-char-device"),
    pytest.param(lambda good: as_archive("model.tar", tar_bytes([tar_special("README.md", tarfile.BLKTYPE)], mode="w")),
                 400, "not a regular file (device", id="tar-block-device"),
    pytest.param(lambda good: as_archive("model.zip", zip_duplicate(good, "config.json")), 400,
                 "config.json appears twice", id="zip-duplicate-names"),
    pytest.param(lambda good: as_archive("model.tar.gz", tar_bytes([*good.items(), ("config.json", good["config.json"])])),
                 400, "config.json appears twice", id="tar-gz-duplicate-names"),
    pytest.param(lambda good: as_files({**good, "./config.json": good["config.json"]}), 400,
                 "config.json appears twice", id="files-duplicate-names"),

    # Limits: member count, uncompressed bytes, compression ratio (all at their defaults).
    pytest.param(lambda good: as_archive("model.zip", zip_bytes({f"shard-{i}.safetensors": b"x" for i in range(MEMBERS + 1)})),
                 413, f"more than {MEMBERS} members", id="zip-too-many-members"),
    pytest.param(lambda good: as_archive("model.tar.gz", tar_bytes([(f"shard-{i}.safetensors", b"x") for i in range(MEMBERS + 1)])),
                 413, f"more than {MEMBERS} members", id="tar-gz-too-many-members"),
    # 20 GiB of real bytes is impractical in a test; a member whose header declares more than
    # the limit is refused on that header, before its data is read. (A zip declares nothing
    # binding: it is counted byte by byte, and a zip that expands past the limit trips the
    # ratio first, as the bomb cases below show.)
    pytest.param(lambda good: as_archive("model.tar.gz", tar_claiming("model.safetensors", UPLOAD_LIMIT + 1)),
                 413, "over the limit of 20.0 GiB", id="tar-gz-over-upload-bytes"),
    pytest.param(lambda good: as_archive("bomb.zip", zip_bytes({"config.json": good["config.json"], "model.safetensors": BOMB})),
                 413, "zip bomb", id="zip-bomb"),
    pytest.param(lambda good: as_archive("bomb.tar.gz", tar_bytes([("config.json", good["config.json"]), ("model.safetensors", BOMB)])),
                 413, "zip bomb", id="tar-gz-bomb"),

    # Code, or configs that ask transformers to import code.
    pytest.param(lambda good: as_files({**good, "modeling_gpt2.py": b"import os\nos.system('id')\n"}), 400,
                 "modeling_gpt2.py is code; uploaded code is never run", id="python-file"),
    pytest.param(lambda good: as_archive("model.zip", zip_bytes({**good, "modeling_gpt2.py": b"import os\n"})), 400,
                 "modeling_gpt2.py is code", id="python-file-in-zip"),
    pytest.param(lambda good: as_files(with_json(good, "config.json", auto_map={"AutoModelForCausalLM": "modeling.Evil"})),
                 400, "config.json contains 'auto_map'", id="config-auto-map"),
    pytest.param(lambda good: as_files(with_json(good, "config.json", trust_remote_code=True)),
                 400, "config.json contains 'trust_remote_code'", id="config-trust-remote-code"),
    pytest.param(lambda good: as_files(with_json(good, "tokenizer_config.json", auto_map={"AutoTokenizer": ["tok.Evil", None]})),
                 400, "tokenizer_config.json contains 'auto_map'", id="tokenizer-config-auto-map"),

    # Absurd sizes in config.json (the 10**12-parameter one has its own timed test below).
    pytest.param(lambda good: as_files(with_json(good, "config.json", n_layer=10**6)), 400,
                 "n_layer = 1000000 is out of range", id="config-million-layers"),
    pytest.param(lambda good: as_files(with_json(good, "config.json", vocab_size=10**12)), 400,
                 "vocab_size = 1000000000000 is out of range", id="config-trillion-vocab"),

    # File names with NUL, control characters, '..' or an absolute path: refused by name,
    # before anything is written (never stored under the client's name).
    pytest.param(lambda good: raw_multipart([(b"conf\x00ig.json", good["config.json"])]), 400, "NUL byte",
                 id="name-nul"),
    pytest.param(lambda good: raw_multipart([(b"config\x1b[2J.json", good["config.json"])]), 400,
                 "control characters", id="name-control-char"),
    pytest.param(lambda good: raw_multipart([(b"config\x7f.json", good["config.json"])]), 400,
                 "control characters", id="name-del-char"),
    pytest.param(lambda good: raw_multipart([(f"../{ESCAPE}.json".encode(), b"{}")]), 400, "contains '..'",
                 id="name-dotdot"),
    pytest.param(lambda good: raw_multipart([(f"/tmp/{ESCAPE}.json".encode(), b"{}")]), 400, "absolute path",
                 id="name-absolute"),
]


@pytest.mark.parametrize("build, status, phrase", MODEL_CASES)
def test_hostile_model_upload_is_refused(stack, state, good, build, status, phrase):
    request = build(good)
    before = state.take()
    response = stack.client.post("/v1/models", **request)
    assert_refused(response, status, phrase)
    state.assert_unchanged(before)


def test_trillion_parameter_config_is_refused_without_allocating(stack, state, good):
    # Within every per-field bound, but about 2.8 * 10**12 parameters: over the default limit
    # of 2 * 10**11. Building even its meta skeleton would take minutes; it must not be tried.
    files = as_files(with_json(good, "config.json", n_layer=1024, n_embd=16384, n_head=128,
                               vocab_size=1_000_000))
    before = state.take()
    started = time.monotonic()
    response = stack.client.post("/v1/models", **files)
    elapsed = time.monotonic() - started
    assert_refused(response, 400, "at least 2,")
    assert "parameters, over this server's limit of 200,000,000,000" in response.json()["error"]["message"]
    # Building it takes minutes; the refusal is arithmetic on the config. The bound leaves a
    # loaded machine ample room and still tells the two apart.
    assert elapsed < 30, f"took {elapsed:.1f}s: the model was built or allocated"
    state.assert_unchanged(before)


# --- POST /v1/datasets -----------------------------------------------------------------------

DATASET_CASES = [
    pytest.param(lambda: ("data.txt", plain_pickle()), 400, "not UTF-8", id="pickle-named-txt"),
    pytest.param(lambda: ("data.jsonl", torch_pickle()), 400, "not UTF-8", id="torch-zip-named-jsonl"),
    pytest.param(lambda: ("data.pkl", plain_pickle()), 400, ".txt or .jsonl", id="pickle-pkl"),
    pytest.param(lambda: ("bomb.zip", zip_bytes({"data.txt": BOMB})), 400, ".txt or .jsonl", id="zip"),
    pytest.param(lambda: ("evil.py", b"import os\n"), 400, ".txt or .jsonl", id="python-file"),
]


@pytest.mark.parametrize("build, status, phrase", DATASET_CASES)
def test_hostile_dataset_upload_is_refused(stack, state, build, status, phrase):
    name, data = build()
    before = state.take()
    response = stack.client.post("/v1/datasets", files={"file": (name, data)})
    assert_refused(response, status, phrase, param="file")
    state.assert_unchanged(before)


# --- the resumable path: /v1/uploads -> parts -> complete ------------------------------------

PART = 64 * 1024


def _resumable(client, filename: str, data: bytes, purpose: str) -> str:
    """Create an upload and send all its parts; returns its id."""
    created = client.post("/v1/uploads", json={"filename": filename, "size_bytes": len(data),
                                               "purpose": purpose, "part_size": PART})
    assert created.status_code == 201, created.text
    upload_id = created.json()["id"]
    for number, start in enumerate(range(0, len(data), PART), start=1):
        put = client.put(f"/v1/uploads/{upload_id}/parts/{number}", content=data[start:start + PART])
        assert put.status_code == 200, put.text
    return upload_id


RESUMABLE_CASES = [
    pytest.param(lambda good: ("model.tar.gz", tar_bytes(list(with_weights(good, plain_pickle()).items()))),
                 "model", 400, "model.safetensors is a Python pickle", id="pickle-named-safetensors-in-tar-gz"),
    pytest.param(lambda good: ("model.zip", zip_bytes(without_weights(good, **{"model.pt": torch_pickle()}))),
                 "model", 400, "model.pt is a pickle-based weights file", id="pickle-pt-in-zip"),
    pytest.param(lambda good: ("model.zip", torch_pickle()), "model", 400, "data.pkl is a pickle-based",
                 id="torch-save-file-named-zip"),
    pytest.param(lambda good: ("model.tar.gz", plain_pickle()), "model", 400, "the tar archive is damaged",
                 id="pickle-named-tar-gz"),
    pytest.param(lambda good: ("model.zip", zip_bytes({**good, f"../{ESCAPE}.json": b"{}"})), "model", 400,
                 "contains '..'", id="zip-dotdot"),
    pytest.param(lambda good: ("model.tar.gz", tar_bytes([tar_special("README.md", tarfile.SYMTYPE, "/etc/passwd")])),
                 "model", 400, "is a link", id="tar-gz-symlink"),
    pytest.param(lambda good: ("model.zip", zip_duplicate(good, "config.json")), "model", 400, "appears twice",
                 id="zip-duplicate-names"),
    pytest.param(lambda good: ("model.zip", zip_bytes({f"shard-{i}.safetensors": b"x" for i in range(MEMBERS + 1)})),
                 "model", 413, f"more than {MEMBERS} members", id="zip-too-many-members"),
    pytest.param(lambda good: ("bomb.zip", zip_bytes({"config.json": good["config.json"], "model.safetensors": BOMB})),
                 "model", 413, "zip bomb", id="zip-bomb"),
    pytest.param(lambda good: ("bomb.tar.gz", tar_bytes([("config.json", good["config.json"]), ("model.safetensors", BOMB)])),
                 "model", 413, "zip bomb", id="tar-gz-bomb"),
    pytest.param(lambda good: ("data.txt", plain_pickle()), "dataset", 400, "not UTF-8", id="dataset-pickle-named-txt"),
]


@pytest.mark.parametrize("build, purpose, status, phrase", RESUMABLE_CASES)
def test_hostile_resumable_upload_is_refused_on_complete(stack, state, engine, good, build, purpose, status, phrase):
    filename, data = build(good)
    client = stack.client
    upload_id = _resumable(client, filename, data, purpose)
    # The upload row, its part rows and its part files legitimately exist from here on;
    # completing must add nothing to them and nothing anywhere else.
    before = state.take()
    response = client.post(f"/v1/uploads/{upload_id}/complete",
                           json={"sha256": hashlib.sha256(data).hexdigest(), "name": "hostile"})
    assert_refused(response, status, phrase, param="files" if purpose == "model" else "file")
    state.assert_unchanged(before)
    upload = client.get(f"/v1/uploads/{upload_id}").json()
    assert upload["status"] == "pending" and upload.get(f"{purpose}_id") is None, upload
    # Clean up: aborting removes the parts (and checks the upload was still abortable).
    assert client.delete(f"/v1/uploads/{upload_id}").json()["status"] == "aborted"


@pytest.mark.parametrize("filename, phrase", [
    pytest.param(f"model\x00{ESCAPE}.tar.gz", "NUL byte", id="nul"),
    pytest.param("model\x1b[2J.tar.gz", "control characters", id="control-char"),
    pytest.param(f"../{ESCAPE}.tar.gz", "contains '..'", id="dotdot"),
    pytest.param(f"/tmp/{ESCAPE}.tar.gz", "is an absolute path", id="absolute"),
    pytest.param(f"models/{ESCAPE}.tar.gz", "must be a plain file name", id="folder"),
    pytest.param("pytorch_model.bin", "a model upload is one file ending in", id="pickle-name"),
    pytest.param("modeling_gpt2.py", "a model upload is one file ending in", id="python-name"),
])
def test_hostile_resumable_file_name_is_refused_on_create(stack, state, filename, phrase):
    before = state.take()
    response = stack.client.post("/v1/uploads", json={"filename": filename, "size_bytes": 1024,
                                                      "purpose": "model"})
    # A NUL is refused by the body's validation, before the name's own checks: a 422.
    assert_refused(response, 422 if "\x00" in filename else 400, phrase, param="filename")
    state.assert_unchanged(before)


# --- hostile names on a dataset: stored under a server-generated name ------------------------
#
# A dataset's file is always stored as data.txt / data.jsonl, whatever the client calls it; the
# client's name only becomes the dataset's label, and only when it is a plain file name.


@pytest.mark.parametrize("name", [
    pytest.param(f"../../{ESCAPE}.txt".encode(), id="dotdot"),
    pytest.param(f"/tmp/{ESCAPE}.txt".encode(), id="absolute"),
    pytest.param(f"corpus\x00{ESCAPE}.txt".encode(), id="nul"),
    pytest.param(b"corpus\x1b[2J.txt", id="control-char"),
])
def test_hostile_dataset_file_name_is_replaced_by_the_servers(stack, state, name):
    before = state.take()
    response = stack.client.post("/v1/datasets", **raw_multipart([(name, b"some text\n")], field=b"file"))
    assert response.status_code == 201, response.text
    dataset = response.json()
    assert dataset["name"] == "data.txt", dataset
    after = state.take()
    folder = f"datasets/{dataset['id']}"
    assert _diff(before["storage"], after["storage"]) == f"added {[folder, folder + '/data.txt']}, removed [], changed []"
    assert after["outside"] == before["outside"]
    assert after["rows"] == {**before["rows"], "datasets": before["rows"]["datasets"] + 1}
    assert not Path(f"/tmp/{ESCAPE}.txt").exists()
    # Deleting it restores storage and database exactly.
    assert stack.client.delete(f"/v1/datasets/{dataset['id']}").status_code == 200
    state.assert_unchanged(before)


# --- hostile requests -------------------------------------------------------------------------


def _raw(stack, head: bytes, body_parts: list[bytes], pause: float = 0.0, read: bool = True) -> tuple[int, dict]:
    """Send a request by hand (a declared length the body never reaches, a stall, a hang-up):
    returns the status and the JSON body of the answer, or (0, {}) when not read."""
    with socket.create_connection(("127.0.0.1", stack.port), timeout=30) as sock:
        sock.sendall(head)
        for part in body_parts:
            sock.sendall(part)
            time.sleep(pause)
        if not read:
            return 0, {}
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            assert chunk, f"connection closed without an answer: {data!r}"
            data += chunk
        head_bytes, _, body = data.partition(b"\r\n\r\n")
        lines = head_bytes.split(b"\r\n")
        length = next(int(line.split(b":")[1]) for line in lines if line.lower().startswith(b"content-length:"))
        while len(body) < length:
            chunk = sock.recv(65536)
            if not chunk:
                break
            body += chunk
        return int(lines[0].split()[1]), json.loads(body)


def _multipart_head(stack, path: str, length: int, boundary: str = "xyz") -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {stack.admin_key}\r\n"
            f"Content-Type: multipart/form-data; boundary={boundary}\r\nContent-Length: {length}\r\n\r\n").encode()


class _Answer:
    """A hand-read answer with the shape of an httpx response, for ``assert_refused``."""

    def __init__(self, status: int, body: dict):
        self.status_code, self._body = status, body
        self.text = json.dumps(body)

    def json(self) -> dict:
        return self._body


def test_declared_oversized_body_is_413_before_it_is_read(stack, state):
    before = state.take()
    answer = _Answer(*_raw(stack, _multipart_head(stack, "/v1/datasets", 10 * 1024**3), []))
    assert_refused(answer, 413, "larger than", param=None)
    state.assert_unchanged(before)


def test_streamed_oversized_body_is_413_at_the_limit(stack, state):
    # No length declared up front: counted as it arrives, refused past the dataset limit (4 MiB).
    before = state.take()
    big = b"All the world's a stage.\n" * 200_000
    response = stack.client.post("/v1/datasets", files={"file": ("big.txt", big)})
    assert_refused(response, 413, "larger than", param="file")
    state.assert_unchanged(before)


def test_thousands_of_multipart_parts_are_refused(stack, state):
    before = state.take()
    response = stack.client.post("/v1/models", files=[("files", (f"f{i}.json", b"{}")) for i in range(1500)])
    # Refused by the multipart parser, before any field is read: no field to blame.
    assert_refused(response, 400, "too many", param=None)
    state.assert_unchanged(before)


def test_a_stalled_upload_times_out_and_leaves_nothing(stack, state):
    before = state.take()
    body = b"--xyz\r\nContent-Disposition: form-data; name=\"file\"; filename=\"d.txt\"\r\n\r\nsome text"
    status, answer = _raw(stack, _multipart_head(stack, "/v1/datasets", len(body) + 1000), [body])  # never ends
    assert status == 408 and answer["error"]["type"] == "request_timeout", answer
    assert "abandoned" in answer["error"]["message"]
    state.assert_unchanged(before)


def test_a_client_that_disconnects_mid_upload_leaves_nothing(stack, state):
    before = state.take()
    body = b"--xyz\r\nContent-Disposition: form-data; name=\"file\"; filename=\"d.txt\"\r\n\r\n" + b"a" * 100_000
    _raw(stack, _multipart_head(stack, "/v1/datasets", len(body) + 100_000), [body], read=False)
    # The server notices the hang-up on its own time (a loaded machine may take a while):
    # wait until it has cleaned up, and fail only if it never does.
    deadline = time.monotonic() + 60
    while True:
        try:
            state.assert_unchanged(before)
            return
        except AssertionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


@pytest.mark.parametrize("spec, param, phrase", [
    ({"stages": [{"type": "prune", "method": "magnitude", "sparsity": 1.0}]}, "stages.0.sparsity", "less than 1"),
    ({"stages": [{"type": "quantize", "method": "rtn"}], "calibration": {"dataset_id": "ds", "samples": 10**9}},
     "calibration.samples", "less than or equal to 4096"),
    ({"stages": [{"type": "distill", "method": "kd", "dataset_id": "ds", "steps": -5}]}, "stages.0.steps",
     "greater than or equal to 1"),
    ({"stages": []}, "stages", "at least 1"),
], ids=["sparsity-1.0", "calibration-1e9-samples", "negative-steps", "no-stages"])
def test_absurd_spec_values_are_rejected_at_validation(stack, state, spec, param, phrase):
    before = state.take()
    response = stack.client.post("/v1/jobs", json={"model_id": "mdl_x", **spec})
    assert_refused(response, 422, phrase, param=param)
    state.assert_unchanged(before)

"""The whole service on an object store: PostgreSQL + Redis + a real S3-protocol server on
loopback (tests/s3_server.py), the API and the Celery worker each with its own local folder.
Models, datasets and the artifact go to the bucket; the download streams from it (Range, ETag,
sha256) or redirects to a presigned URL; neither local folder ever holds an artifact."""

from __future__ import annotations

import hashlib

import boto3
import httpx
import pytest

from squeeze_client.client import SqueezeClient
from tests.e2e.client import upload_dataset, upload_model, wait_for
from tests.e2e.stack import ServiceStack
from tests.factories import CORPUS, make_checkpoint
from tests.s3_server import s3_server


@pytest.fixture
def s3_stack(tmp_path, monkeypatch):
    with s3_server() as env:
        for name, value in env.items():
            if name.startswith("AWS_"):
                monkeypatch.setenv(name, value)  # the stack's processes inherit them
        stack = ServiceStack.postgres_redis(tmp_path / "stack", storage_url=env["SQUEEZE_STORAGE_URL"],
                                            storage_root=str(tmp_path / "api-local"), max_dataset_bytes=str(16 * 1024**2),
                                            worker_settings={"storage_root": str(tmp_path / "worker-local")})
        with stack:
            yield stack, env


def _bucket_keys(env) -> dict[str, dict]:
    bucket, _, prefix = env["SQUEEZE_STORAGE_URL"].removeprefix("s3://").partition("/")
    s3 = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"])
    listed = s3.list_objects_v2(Bucket=bucket, Prefix=prefix + "/").get("Contents", [])
    return {item["Key"].removeprefix(prefix + "/"): s3.head_object(Bucket=bucket, Key=item["Key"]) for item in listed}


def _files(folder) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


MiB = 1024 * 1024


def _resumable_dataset(client: httpx.Client) -> dict:
    """6 MiB in two parts (S3's smallest part is 5 MiB), sent last part first."""
    data = (CORPUS.encode() * (6 * MiB // len(CORPUS.encode()) + 1))[:6 * MiB]
    part = 5 * MiB
    small = client.post("/v1/uploads", json={"filename": "corpus.txt", "size_bytes": len(data),
                                             "purpose": "dataset", "part_size": MiB})
    assert small.status_code == 422 and small.json()["error"]["param"] == "part_size", small.text
    upload = client.post("/v1/uploads", json={"filename": "corpus.txt", "size_bytes": len(data),
                                              "purpose": "dataset", "part_size": part}).json()
    for number, start in reversed(list(enumerate(range(0, len(data), part), 1))):  # any order
        assert client.put(f"/v1/uploads/{upload['id']}/parts/{number}", content=data[start:start + part]).status_code == 200
    done = client.post(f"/v1/uploads/{upload['id']}/complete", json={"sha256": hashlib.sha256(data).hexdigest()})
    assert done.status_code == 201, done.text
    return client.get(f"/v1/datasets/{done.json()['dataset_id']}").json()


def test_job_flow_on_an_object_store(s3_stack, tmp_path):
    stack, env = s3_stack
    client = stack.client
    model = upload_model(client, make_checkpoint(tmp_path / "upload"))   # one request
    dataset = upload_dataset(client)
    big = _resumable_dataset(client)                                     # resumable: S3 multipart
    keys = _bucket_keys(env)
    assert f"models/{model['id']}/config.json" in keys
    assert [k for k in keys if k.startswith(f"datasets/{dataset['id']}/")]
    assert [k for k in keys if k.startswith(f"datasets/{big['id']}/")]
    assert not [k for k in keys if k.startswith("uploads/")]  # the assembled upload went once ingested
    # The tenant's quota counts what is in the store.
    too_big = client.post("/v1/uploads", json={"filename": "x.tar", "size_bytes": 300 * MiB, "purpose": "model",
                                               "part_size": 8 * MiB})
    assert too_big.status_code == 413 and too_big.json()["error"]["param"] == "size_bytes", too_big.text
    assert "storage" in too_big.json()["error"]["message"]

    created = client.post("/v1/jobs", json={
        "model_id": model["id"], "stages": [{"type": "quantize", "method": "rtn", "bits": 8}],
        "evaluation": {"dataset_id": dataset["id"], "seq_len": 64, "stride": 32}})
    assert created.status_code == 201, created.text
    job = wait_for(client, created.json()["id"])
    assert job["status"] == "succeeded", (job, stack.logs())
    artifact = job["artifact"]

    # In the bucket, with the sha256 the job reports recorded beside it.
    stored = _bucket_keys(env)[f"artifacts/{job['id']}-attempt1.tar"]
    assert stored["ContentLength"] == artifact["size_bytes"]
    assert stored["Metadata"]["sha256"] == artifact["sha256"]

    # Streamed from the store: whole, a range, HEAD, a conditional GET.
    whole = client.get(artifact["url"])
    assert whole.status_code == 200 and len(whole.content) == artifact["size_bytes"]
    assert hashlib.sha256(whole.content).hexdigest() == whole.headers["x-checksum-sha256"] == artifact["sha256"]
    assert whole.headers["etag"] == f'"{artifact["sha256"]}"' and whole.headers["accept-ranges"] == "bytes"
    part = client.get(artifact["url"], headers={"Range": "bytes=100-1123"})
    assert part.status_code == 206 and part.content == whole.content[100:1124]
    assert part.headers["content-range"] == f"bytes 100-1123/{artifact['size_bytes']}"
    assert part.headers["x-checksum-sha256"] == artifact["sha256"]
    tail = client.get(artifact["url"], headers={"Range": "bytes=-10"})
    assert tail.status_code == 206 and tail.content == whole.content[-10:]
    past = client.get(artifact["url"], headers={"Range": f"bytes={artifact['size_bytes']}-"})
    assert past.status_code == 416 and past.headers["content-range"] == f"bytes */{artifact['size_bytes']}"
    head = client.head(artifact["url"])
    assert head.status_code == 200 and int(head.headers["content-length"]) == artifact["size_bytes"]
    assert client.get(artifact["url"], headers={"If-None-Match": whole.headers["etag"]}).status_code == 304

    # Nothing of the artifact on either host: the API keeps only staging, the worker its cache.
    api_files, worker_files = _files(tmp_path / "api-local"), _files(tmp_path / "worker-local")
    assert not [f for f in api_files + worker_files if f.endswith(".tar") or f.startswith(("artifacts", "models"))]
    assert not [f for f in api_files if not f.startswith("tmp/")] and not _files(tmp_path / "api-local" / "tmp")
    assert f"cache/models-{model['id']}/config.json" in worker_files
    assert [f for f in worker_files if f.startswith(f"cache/datasets-{dataset['id']}/")]
    assert not _files(tmp_path / "worker-local" / "tmp")  # the job's staging went with the job

    # Deleting a dataset deletes its objects.
    assert client.delete(f"/v1/datasets/{big['id']}").status_code == 200
    assert not [k for k in _bucket_keys(env) if k.startswith(f"datasets/{big['id']}/")]

    # The operator's option: a redirect to the store itself, which serves the same bytes.
    stack.kill("api")
    stack.env["SQUEEZE_STORAGE_PRESIGN_DOWNLOADS"] = "true"
    stack.start_api(wait=True)
    redirect = client.get(artifact["url"])
    assert redirect.status_code == 307 and redirect.headers["x-checksum-sha256"] == artifact["sha256"]
    assert redirect.headers["location"].startswith(env["AWS_ENDPOINT_URL"] + "/")
    direct = httpx.get(redirect.headers["location"])
    assert direct.status_code == 200 and hashlib.sha256(direct.content).hexdigest() == artifact["sha256"]
    # The Python client follows it (its API key stays with the API) and checks the sha256.
    with SqueezeClient(stack.url, stack.admin_key) as squeeze:
        result = squeeze.download_artifact(job["id"], tmp_path / "via-client.tar")
    assert result.sha256 == artifact["sha256"] and result.path.read_bytes() == whole.content

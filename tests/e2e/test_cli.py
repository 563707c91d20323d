"""The ``squeeze`` CLI and the ``SqueezeClient`` against a real API and worker (PostgreSQL + Redis).

The CLI runs as a subprocess, as a user runs it: upload a model folder and a dataset, submit
``examples/prune-quantize.yaml`` and watch it succeed, list, download and check the sha256.
The client is tested directly for what a shell cannot easily show: resumable uploads sent out
of order (and resumed after a failure), a download resumed with ``Range``, and its errors.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import httpx
import pytest

from squeeze_client import SqueezeClient, SqueezeError
from tests.e2e.stack import ROOT
from tests.factories import CORPUS, make_checkpoint

EXAMPLE = ROOT / "examples" / "prune-quantize.yaml"


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def squeeze(stack, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "SQUEEZE_URL": stack.url, "SQUEEZE_API_KEY": stack.cli_key}
    result = subprocess.run([sys.executable, "-m", "squeeze_client.cli", *args], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=timeout)
    if check:
        assert result.returncode == 0, f"squeeze {' '.join(args)} -> {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result


@pytest.fixture(scope="module")
def cli_stack(pg_stack):
    """The session's PostgreSQL stack, with a tenant of this module's own: its lists hold only what these
    tests made, and other tests' lists are not crowded by them."""
    pg_stack.cli_key = pg_stack.create_key("tenant-cli")
    return pg_stack


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("cli") / "tiny-gpt2")


@pytest.fixture(scope="module")
def walkthrough(cli_stack, checkpoint, tmp_path_factory) -> dict:
    """The README walkthrough, by the CLI: upload, upload, submit --watch."""
    corpus = tmp_path_factory.mktemp("cli-data") / "corpus.txt"
    corpus.write_text(CORPUS)
    model = squeeze(cli_stack, "models", "upload", str(checkpoint), "--name", "tiny-cli", "--metadata", "team=cli")
    dataset = squeeze(cli_stack, "datasets", "upload", str(corpus))
    model_id, dataset_id = model.stdout.strip(), dataset.stdout.strip()
    submit = squeeze(cli_stack, "jobs", "submit", str(EXAMPLE), "--model", model_id, "--dataset", dataset_id,
                     "--watch", "--timeout", "120", check=False, timeout=150)
    return {"model": model, "dataset": dataset, "model_id": model_id, "dataset_id": dataset_id,
            "submit": submit, "job_id": submit.stdout.strip().splitlines()[0] if submit.stdout.strip() else None}


@pytest.fixture
def client(cli_stack):
    with SqueezeClient(cli_stack.url, cli_stack.cli_key, max_retries=2) as client:
        yield client


def test_cli_upload_submit_watch_list_download(cli_stack, walkthrough, tmp_path):
    api = cli_stack.client_for(cli_stack.cli_key)
    assert walkthrough["model_id"].startswith("mdl_"), walkthrough["model"].stderr
    assert walkthrough["dataset_id"].startswith("ds_"), walkthrough["dataset"].stderr
    submit = walkthrough["submit"]
    assert submit.returncode == 0, f"{submit.stdout}\n{submit.stderr}\n{cli_stack.logs()}"
    job_id = walkthrough["job_id"]
    assert job_id.startswith("job_") and f"job {job_id} succeeded" in submit.stderr
    assert "stage   prune.magnitude" in submit.stderr and "stage   quantize.rtn" in submit.stderr
    assert "perplexity" in submit.stderr  # the summary line: the spec evaluates on the dataset

    job = api.get(f"/v1/jobs/{job_id}").json()
    assert job["status"] == "succeeded" and job["model_id"] == walkthrough["model_id"]
    assert job["spec"]["evaluation"]["dataset_id"] == walkthrough["dataset_id"]
    assert job["metadata"] == {"example": "prune-quantize"}
    model = api.get(f"/v1/models/{walkthrough['model_id']}").json()
    assert model["name"] == "tiny-cli" and model["metadata"] == {"team": "cli"}

    listed = json.loads(squeeze(cli_stack, "jobs", "list", "--status", "succeeded", "--json").stdout)
    assert job_id in [j["id"] for j in listed] and all(j["status"] == "succeeded" for j in listed)
    table = squeeze(cli_stack, "jobs", "list").stdout.splitlines()
    assert table[0].split()[:3] == ["ID", "STATUS", "STAGE"] and any(line.startswith(job_id) for line in table)
    models = json.loads(squeeze(cli_stack, "models", "list", "--json", "--metadata", "team=cli").stdout)
    assert [m["id"] for m in models] == [walkthrough["model_id"]]
    assert walkthrough["dataset_id"] in squeeze(cli_stack, "datasets", "list").stdout
    assert json.loads(squeeze(cli_stack, "jobs", "get", job_id, "--json").stdout)["id"] == job_id

    out = tmp_path / "compressed.tar"
    download = squeeze(cli_stack, "jobs", "download", job_id, "-o", str(out))
    assert download.stdout.strip() == str(out) and "verified" in download.stderr
    assert sha256_of(out) == job["artifact"]["sha256"]
    assert not out.with_name(out.name + ".part").exists()
    with tarfile.open(out) as tar:
        assert any(name.endswith("config.json") for name in tar.getnames())


def test_cli_watch_exits_1_when_cancelled_and_reports_errors(cli_stack, walkthrough, tmp_path):
    api = cli_stack.client_for(cli_stack.cli_key)
    model_id = walkthrough["model_id"]
    spec = ["jobs", "submit", str(EXAMPLE), "--model", model_id, "--dataset", walkthrough["dataset_id"]]
    first = squeeze(cli_stack, *spec).stdout.strip()
    # A job that cannot finish first, whether the cancel finds it queued behind the first one
    # or already running (a fast worker): a million distillation steps, stopped at the next.
    endless = tmp_path / "endless.yaml"
    endless.write_text("stages:\n  - {type: distill, method: kd, steps: 1000000, batch_size: 2, seq_len: 32}\n")
    second = squeeze(cli_stack, "jobs", "submit", str(endless), "--model", model_id,
                     "--dataset", walkthrough["dataset_id"]).stdout.strip()
    cancel = squeeze(cli_stack, "jobs", "cancel", second)
    assert cancel.stdout.startswith(second)
    watched = squeeze(cli_stack, "jobs", "watch", second, "--timeout", "60", check=False)
    assert watched.returncode == 1 and f"job {second} cancelled" in watched.stderr, watched.stderr
    # The first is running (cancelled at its next layer) or, on a fast machine, already done.
    squeeze(cli_stack, "jobs", "cancel", first, check=False)
    final = squeeze(cli_stack, "jobs", "watch", first, "--timeout", "90", check=False)
    status = api.get(f"/v1/jobs/{first}").json()["status"]
    assert (final.returncode, status) in ((0, "succeeded"), (1, "cancelled")), final.stderr

    missing = squeeze(cli_stack, "jobs", "get", "job_missing", check=False)
    assert missing.returncode == 1 and "404 not_found" in missing.stderr and "param: job_id" in missing.stderr
    no_model = squeeze(cli_stack, "jobs", "submit", str(EXAMPLE), check=False)
    assert no_model.returncode == 2 and "--model" in no_model.stderr
    no_dataset = squeeze(cli_stack, "jobs", "submit", str(EXAMPLE), "--model", model_id, check=False)
    assert no_dataset.returncode == 2 and "--dataset" in no_dataset.stderr


def test_client_errors_carry_the_envelope(client):
    with pytest.raises(SqueezeError) as caught:
        client.get_job("job_missing")
    error = caught.value
    assert (error.status, error.type, error.param) == (404, "not_found", "job_id")
    assert "job_missing" in error.message and error.request_id
    with pytest.raises(SqueezeError) as caught:
        client.create_job({"model_id": "mdl_x", "stages": [{"type": "prune", "method": "magnitude", "sparsity": 2}]})
    assert caught.value.status == 422 and caught.value.param == "stages.0.sparsity"


def _archive(checkpoint: Path, dest: Path) -> Path:
    with tarfile.open(dest, "w:gz") as tar:
        for path in sorted(checkpoint.iterdir()):
            tar.add(path, arcname=path.name)
    return dest


def _record_puts(client: SqueezeClient) -> list[int]:
    numbers: list[int] = []

    def hook(request: httpx.Request) -> None:
        if request.method == "PUT" and "/parts/" in request.url.path:
            numbers.append(int(request.url.path.rsplit("/", 1)[1]))

    client.http.event_hooks["request"].append(hook)
    return numbers


def _require_uploads(client: SqueezeClient) -> None:
    response = client.http.get("/v1/uploads/upl_probe")
    if response.status_code == 404 and response.json()["error"].get("param") is None:
        pytest.skip("the server has no /v1/uploads endpoint yet (resumable uploads are being written)")


def test_resumable_upload_out_of_order_with_a_part_twice_then_resumed(client, checkpoint, tmp_path):
    _require_uploads(client)
    archive = _archive(checkpoint, tmp_path / "tiny-gpt2.tar.gz")
    part_size = 64 * 1024
    count = -(-archive.stat().st_size // part_size)
    assert count >= 4, "the archive should make several parts"

    sent = _record_puts(client)
    seen: list[tuple[int, int]] = []
    reversed_with_a_repeat = lambda numbers: [numbers[1], *reversed(numbers)]  # noqa: E731
    upload = client.upload_resumable(archive, "model", name="tiny-resumable", metadata={"via": "parts"},
                                     part_size=part_size, part_order=reversed_with_a_repeat,
                                     progress=lambda done, total: seen.append((done, total)))
    assert sent == [2, *range(count, 0, -1)]
    assert upload["status"] == "completed" and upload["part_size"] == part_size
    assert seen[-1] == (archive.stat().st_size, archive.stat().st_size)
    assert all(done <= total for done, total in seen)  # the repeated part is not counted twice
    model = client.get_model(upload["model_id"])
    assert model["name"] == "tiny-resumable" and model["metadata"] == {"via": "parts"}
    assert model["architecture"] == "GPT2LMHeadModel"

    # Interrupted after three parts: the error names the upload; resuming sends only the rest.
    def three_then_fail(numbers):
        yield from numbers[:3]
        raise ConnectionError("network gone")

    sent.clear()
    with pytest.raises(ConnectionError) as caught:
        client.upload_resumable(archive, "model", part_size=part_size, part_order=three_then_fail)
    upload_id = caught.value.upload_id
    assert sent == [1, 2, 3]
    assert [p["part_number"] for p in client.get_upload(upload_id)["parts"]] == [1, 2, 3]
    sent.clear()
    resumed = client.upload_resumable(archive, "model", upload_id=upload_id, name="tiny-resumed")
    assert sent == list(range(4, count + 1)) and resumed["status"] == "completed"
    assert client.get_model(resumed["model_id"])["name"] == "tiny-resumed"

    # upload_model picks the resumable path for an archive over the threshold.
    small = SqueezeClient(client.base_url, client.http.headers["Authorization"].split()[1],
                          part_size=part_size, resumable_threshold=part_size)
    with small:
        sent_by_small = _record_puts(small)
        model = small.upload_model(archive, name="tiny-auto")
    assert model["id"].startswith("mdl_") and sorted(sent_by_small) == list(range(1, count + 1))


def test_download_resumes_with_range_and_verifies(client, walkthrough, tmp_path):
    job_id = walkthrough["job_id"]
    assert job_id, walkthrough["submit"].stderr
    artifact = client.get_job(job_id)["artifact"]
    dest = tmp_path / "model.tar"
    partial = dest.with_name("model.tar.part")
    half = artifact["size_bytes"] // 2
    first = client.http.get(f"/v1/jobs/{job_id}/artifact", headers={"Range": f"bytes=0-{half - 1}"})
    assert first.status_code == 206 and len(first.content) == half
    partial.write_bytes(first.content)

    ranges: list[str | None] = []
    client.http.event_hooks["request"].append(lambda request: ranges.append(request.headers.get("range")))
    progress: list[tuple[int, int | None]] = []
    result = client.download_artifact(job_id, dest, progress=lambda done, total: progress.append((done, total)))
    assert ranges == [f"bytes={half}-"]
    assert progress[0] == (half, artifact["size_bytes"]) and progress[-1] == (artifact["size_bytes"],) * 2
    assert result.path == dest and result.sha256 == artifact["sha256"] == sha256_of(dest)
    assert result.size_bytes == artifact["size_bytes"] and not partial.exists()

    # A stale .part of other bytes fails the checksum: the download starts over, once.
    dest.with_name(f"{job_id}.tar.part").write_bytes(b"\0" * half)
    ranges.clear()
    again = client.download_artifact(job_id, tmp_path)
    assert ranges == [f"bytes={half}-", None]
    assert again.path == tmp_path / f"{job_id}.tar" and sha256_of(again.path) == artifact["sha256"]


def test_events_and_wait_follow_a_finished_job(client, walkthrough):
    job_id = walkthrough["job_id"]
    events = list(client.events(job_id))
    assert events[-1]["type"] == "status" and events[-1]["data"]["status"] == "succeeded"
    assert [e["data"]["status"] for e in events if e["type"] == "status"] == ["queued", "running", "succeeded"]
    assert any(e["type"] == "progress" for e in events)
    # From the last event on there is nothing left: the generator ends instead of waiting.
    assert list(client.events(job_id, after=events[-1]["id"])) == []
    seen: list[dict] = []
    assert client.wait(job_id, on_event=seen.append, timeout=30)["status"] == "succeeded"
    assert [e["id"] for e in seen] == [e["id"] for e in events]
    assert next(client.list_jobs(model_id=walkthrough["model_id"], page_size=1))["model_id"] == walkthrough["model_id"]


# -- dropped connections, simulated: a real server does not drop them on cue ----------------


class _Dropping(httpx.SyncByteStream):
    """A response body that sends ``data`` and then loses the connection."""

    def __init__(self, data: bytes):
        self.data = data

    def __iter__(self):
        yield self.data
        raise httpx.ReadError("connection reset by peer")


def _offline_client(handler) -> SqueezeClient:
    client = SqueezeClient("http://squeeze.test", "sk_test", transport=httpx.MockTransport(handler))
    client._sleep = lambda seconds: None
    return client


def _sse(*events: dict) -> bytes:
    return b"".join(f"id: {e['id']}\nevent: {e['type']}\ndata: {json.dumps(e)}\n\n".encode() for e in events)


def test_event_stream_reconnects_with_last_event_id():
    events = [{"id": 1, "type": "status", "message": "job queued", "data": {"status": "queued"}},
              {"id": 2, "type": "progress", "message": "50% done", "data": {"progress": 0.5}},
              {"id": 3, "type": "status", "message": "job succeeded", "data": {"status": "succeeded"}}]
    seen_headers: list[str | None] = []

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/events/stream"):
            last = request.headers.get("last-event-id")
            seen_headers.append(last)
            if last is None:  # two events, a keep-alive, then the connection drops
                return httpx.Response(200, stream=_Dropping(_sse(*events[:2]) + b": keep-alive\n\n"))
            return httpx.Response(200, content=_sse(*[e for e in events if e["id"] > int(last)]))
        return httpx.Response(200, json={"id": "job_1", "status": "succeeded"})

    with _offline_client(handler) as client:
        got: list[dict] = []
        assert client.wait("job_1", on_event=got.append)["status"] == "succeeded"
    assert [e["id"] for e in got] == [1, 2, 3] and seen_headers == [None, "2"]


def test_download_resumes_after_a_dropped_connection(tmp_path):
    body = os.urandom(300_000)
    digest = hashlib.sha256(body).hexdigest()
    ranges: list[str | None] = []

    def handler(request: httpx.Request) -> httpx.Response:
        headers = {"X-Checksum-SHA256": digest, "ETag": f'"{digest}"'}
        ranges.append(request.headers.get("range"))
        if request.headers.get("range"):
            start = int(request.headers["range"].split("=")[1].rstrip("-"))
            assert request.headers.get("if-range") == f'"{digest}"'
            return httpx.Response(206, content=body[start:], headers={
                **headers, "Content-Range": f"bytes {start}-{len(body) - 1}/{len(body)}"})
        return httpx.Response(200, stream=_Dropping(body[:100_000]),
                              headers={**headers, "Content-Length": str(len(body))})

    with _offline_client(handler) as client:
        result = client.download_artifact("job_1", tmp_path / "a.tar")
    assert ranges == [None, "bytes=100000-"]
    assert result.sha256 == digest and (tmp_path / "a.tar").read_bytes() == body

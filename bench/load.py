"""How the API holds many clients (issue 12): one server on PostgreSQL + Redis, measured side by
side in one run against baselines taken in the same run::

    nice -n 19 python -m bench.load                       # 64 and 256 connections, 500 streams, 256 MiB
    nice -n 19 python -m bench.load --seconds 5 --file-mib 64
    python -m bench.load --quick                         # seconds of everything (the smoke test)

1. **Reads.** For ``--seconds`` each, ``--connections`` clients (keep-alive, each sending its
   next request when the last one is answered) on ``/healthz`` (no database, no key: the
   no-op baseline), ``GET /v1/jobs/{id}`` (authentication and one row) and ``GET /v1/jobs``
   (a page of 20). Requests per second and latency percentiles; any answer but 200, and any
   broken connection, counts as an error.
2. **Streams.** ``--probe-connections`` clients read ``/healthz`` and then the job, first with
   no stream open (the baseline), then with ``--streams`` event streams held open on the
   (queued) job: the p99 latency of each, beside the baseline.
3. **Transfers.** A random bf16 GPT-2 checkpoint of about ``--file-mib`` MiB, as one tar,
   goes up through the resumable upload API (parts of 64 MiB) and, after a worker has run an
   RTN int8 job on it, its artifact comes down; each against ``cp`` of the same file on the same
   disk, and the API process's peak RSS (sampled every 20 ms) beside its RSS before.

The server is one uvicorn process started as the end-to-end tests start it (no worker until the
transfer phase, so the job stays queued and its streams stay open), with per-key rate limits
off and stream caps above ``--streams``. The load generator is a small HTTP/1.1 client on raw
asyncio streams in this process: cheaper per request than an HTTP library, so the numbers are
more the server's than the client's; on a 2-core machine they share the cores all the same.

Targets: status reads >= 50 % of the no-op's requests per second, p99 < 50 ms; with 500 streams
open, /healthz p99 < 100 ms and the job's p99 < 200 ms; upload and download >= 50 % of cp's
speed with the server's memory flat (its growth a small fraction of the file).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import httpx  # noqa: E402

from tests.e2e.stack import ServiceStack  # noqa: E402

PART = 64 << 20
CHUNK = 1 << 20


# ---------------------------------------------------------------------------------------------
# A minimal HTTP/1.1 keep-alive client


class Connection:
    def __init__(self, host: str, port: int):
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def open(self) -> None:
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port, limit=1 << 20)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.reader = self.writer = None

    async def head(self) -> tuple[int, dict[str, str]]:
        raw = await self.reader.readuntil(b"\r\n\r\n")
        lines = raw.decode("latin-1").split("\r\n")
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            if name:
                headers[name.strip().lower()] = value.strip()
        return int(lines[0].split(" ", 2)[1]), headers

    async def body(self, headers: dict[str, str], sink=None) -> int:
        """Reads the body (to ``sink(chunk)`` if given); its length."""
        if "content-length" in headers:
            left = total = int(headers["content-length"])
            while left:
                chunk = await self.reader.read(min(left, CHUNK))
                if not chunk:
                    raise asyncio.IncompleteReadError(b"", left)
                left -= len(chunk)
                if sink:
                    sink(chunk)
            return total
        total = 0  # chunked
        while True:
            size = int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                await self.reader.readuntil(b"\r\n")
                return total
            chunk = await self.reader.readexactly(size + 2)
            total += size
            if sink:
                sink(chunk[:-2])

    async def request(self, raw: bytes, body_file: Path | None = None, offset: int = 0, length: int = 0,
                      sink=None) -> tuple[int, dict[str, str], int]:
        if self.writer is None:
            await self.open()
        self.writer.write(raw)
        if body_file is not None:
            with body_file.open("rb") as file:
                file.seek(offset)
                left = length
                while left:
                    chunk = file.read(min(CHUNK, left))
                    left -= len(chunk)
                    self.writer.write(chunk)
                    await self.writer.drain()
        status, headers = await self.head()
        size = await self.body(headers, sink)
        if headers.get("connection", "").lower() == "close":
            self.close()
        return status, headers, size


def request_bytes(method: str, path: str, key: str | None = None, extra: dict[str, str] | None = None) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1"]
    if key:
        lines.append(f"Authorization: Bearer {key}")
    lines += [f"{name}: {value}" for name, value in (extra or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


# ---------------------------------------------------------------------------------------------
# Measurements


@dataclass
class Run:
    name: str
    connections: int
    seconds: float
    ok: int = 0
    errors: Counter = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)

    @property
    def per_s(self) -> float:
        return self.ok / self.seconds

    def percentile(self, q: float) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000 if ordered else float("nan")

    def summary(self) -> dict:
        return {"name": self.name, "connections": self.connections, "per_s": self.per_s,
                "p50_ms": self.percentile(0.50), "p99_ms": self.percentile(0.99), "ok": self.ok,
                "errors": dict(self.errors)}


async def hammer(url: str, name: str, raw: bytes, connections: int, seconds: float, warmup: float = 0.5) -> Run:
    """``connections`` clients send ``raw`` back to back for ``seconds`` (after ``warmup``)."""
    host, port = url.removeprefix("http://").split(":")
    run = Run(name, connections, seconds)
    start = time.monotonic() + warmup
    stop = start + seconds

    async def client() -> None:
        connection = Connection(host, int(port))
        while (now := time.monotonic()) < stop:
            began = time.perf_counter()
            try:
                status, _, _ = await connection.request(raw)
            except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
                connection.close()
                if now >= start:
                    run.errors[type(exc).__name__] += 1
                continue
            if now < start:
                continue
            if status == 200:
                run.ok += 1
                run.latencies.append(time.perf_counter() - began)
            else:
                run.errors[f"http {status}"] += 1
        connection.close()

    await asyncio.gather(*(client() for _ in range(connections)))
    return run


async def hold_streams(url: str, raw: bytes, count: int, opened: asyncio.Event, release: asyncio.Event,
                       statuses: Counter) -> None:
    host, port = url.removeprefix("http://").split(":")
    gate = asyncio.Semaphore(50)  # open them 50 at a time rather than as one burst of SYNs

    async def one() -> None:
        connection = Connection(host, int(port))
        try:
            async with gate:
                await connection.open()
                connection.writer.write(raw)
                status, _ = await connection.head()
            statuses[status] += 1
            if sum(statuses.values()) == count:
                opened.set()
            while not release.is_set():
                reading = asyncio.ensure_future(connection.reader.read(65536))
                done, _ = await asyncio.wait({reading, asyncio.ensure_future(release.wait())},
                                             return_when=asyncio.FIRST_COMPLETED)
                if reading in done and not reading.result():
                    statuses["ended early"] += 1
                    return
                if reading not in done:
                    reading.cancel()
        except (OSError, asyncio.IncompleteReadError) as exc:
            statuses[type(exc).__name__] += 1
            if sum(statuses.values()) == count:
                opened.set()
        finally:
            connection.close()

    await asyncio.gather(*(one() for _ in range(count)))


class PeakRss:
    """The peak resident set of a process, sampled every 20 ms in a thread."""

    def __init__(self, pid: int):
        import psutil

        self.process = psutil.Process(pid)
        self.before = self.peak = self.process.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self.process.memory_info().rss)

    def __enter__(self) -> "PeakRss":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def cp_seconds(source: Path, folder: Path) -> float:
    target = folder / f"cp-{source.name}"
    began = time.perf_counter()
    subprocess.run(["cp", str(source), str(target)], check=True)
    seconds = time.perf_counter() - began
    target.unlink()
    return seconds


# ---------------------------------------------------------------------------------------------
# The checkpoint for the transfers


def make_checkpoint(folder: Path, mib: float) -> Path:
    """A random bf16 GPT-2 of about ``mib`` MiB (hidden 1024; layers to fit), as one tar."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from tests.factories import tokenizer

    vocab = len(tokenizer())
    hidden = 1024 if mib >= 32 else 64
    layers = max(1, round((mib * 2**20 / 2 - vocab * hidden) / (12 * hidden * hidden)))
    torch.manual_seed(0)
    end = tokenizer().eos_token_id
    config = GPT2Config(vocab_size=vocab, n_positions=128, n_embd=hidden, n_layer=layers, n_head=hidden // 64,
                        bos_token_id=end, eos_token_id=end)
    model = GPT2LMHeadModel(config).to(torch.bfloat16)
    checkpoint = folder / "checkpoint"
    model.save_pretrained(checkpoint, safe_serialization=True)
    tokenizer().save_pretrained(checkpoint)
    archive = folder / "model.tar"
    with tarfile.open(archive, "w") as tar:
        for path in sorted(checkpoint.iterdir()):
            tar.add(path, arcname=path.name)
    return archive


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(CHUNK * 8):
            digest.update(chunk)
    return digest.hexdigest()


async def upload(stack: ServiceStack, archive: Path) -> tuple[str, float]:
    """The archive up through the resumable upload API; (upload id, seconds of the PUTs)."""
    size = archive.stat().st_size
    created = stack.client.post("/v1/uploads", json={"filename": archive.name, "size_bytes": size,
                                                     "purpose": "model", "part_size": PART})
    assert created.status_code == 201, created.text
    upload_id = created.json()["id"]
    host, port = stack.url.removeprefix("http://").split(":")
    connection = Connection(host, int(port))
    began = time.perf_counter()
    for number, offset in enumerate(range(0, size, PART), start=1):
        length = min(PART, size - offset)
        raw = request_bytes("PUT", f"/v1/uploads/{upload_id}/parts/{number}", stack.admin_key,
                            {"Content-Type": "application/octet-stream", "Content-Length": str(length)})
        status, _, _ = await connection.request(raw, archive, offset, length)
        assert status == 200, f"part {number}: http {status}"
    seconds = time.perf_counter() - began
    connection.close()
    return upload_id, seconds


async def download(stack: ServiceStack, job_id: str, target: Path) -> float:
    host, port = stack.url.removeprefix("http://").split(":")
    connection = Connection(host, int(port))
    with target.open("wb") as file:
        began = time.perf_counter()
        status, _, _ = await connection.request(request_bytes("GET", f"/v1/jobs/{job_id}/artifact", stack.admin_key),
                                                sink=file.write)
        seconds = time.perf_counter() - began
    connection.close()
    assert status == 200, f"download: http {status}"
    return seconds


# ---------------------------------------------------------------------------------------------
# The run


def _api_pid(stack: ServiceStack) -> int:
    return next(proc.pid for name, proc in stack.processes if name == "api")


async def measure_reads(stack: ServiceStack, job_id: str, args) -> list[dict]:
    key = stack.admin_key
    paths = [("no-op /healthz", request_bytes("GET", "/healthz")),
             ("status GET /v1/jobs/{id}", request_bytes("GET", f"/v1/jobs/{job_id}", key)),
             ("list GET /v1/jobs?limit=20", request_bytes("GET", "/v1/jobs?limit=20", key))]
    runs = []
    for connections in args.connections:
        for name, raw in paths:
            run = await hammer(stack.url, name, raw, connections, args.seconds)
            runs.append(run.summary())
            print(f"  {name} @ {connections}: {run.per_s:.0f}/s p99 {run.percentile(0.99):.1f} ms "
                  f"errors {dict(run.errors)}", flush=True)
    return runs


async def measure_streams(stack: ServiceStack, job_id: str, args) -> dict:
    key = stack.admin_key
    health, job = request_bytes("GET", "/healthz"), request_bytes("GET", f"/v1/jobs/{job_id}", key)
    quiet = [await hammer(stack.url, "healthz", health, args.probe_connections, args.seconds),
             await hammer(stack.url, "job", job, args.probe_connections, args.seconds)]
    opened, release, statuses = asyncio.Event(), asyncio.Event(), Counter()
    holder = asyncio.ensure_future(hold_streams(stack.url, request_bytes(
        "GET", f"/v1/jobs/{job_id}/events/stream", key, {"Accept": "text/event-stream"}),
        args.streams, opened, release, statuses))
    await asyncio.wait_for(opened.wait(), 600)
    busy = [await hammer(stack.url, "healthz", health, args.probe_connections, args.seconds),
            await hammer(stack.url, "job", job, args.probe_connections, args.seconds)]
    release.set()
    await holder
    print(f"  streams: {dict(statuses)}", flush=True)
    return {"streams": args.streams, "stream_statuses": dict(statuses),
            "quiet": [run.summary() for run in quiet], "busy": [run.summary() for run in busy]}


async def measure_transfers(stack: ServiceStack, workdir: Path, args) -> dict:
    archive = make_checkpoint(workdir, args.file_mib)
    size = archive.stat().st_size
    cp_up = cp_seconds(archive, workdir)
    with PeakRss(_api_pid(stack)) as up_rss:
        upload_id, up_s = await upload(stack, archive)
    completed = stack.client.post(f"/v1/uploads/{upload_id}/complete", json={"sha256": sha256_of(archive)},
                                  timeout=600)
    assert completed.status_code == 201, completed.text
    model_id = completed.json()["model_id"]

    for queued in stack.client.get("/v1/jobs", params={"status": "queued", "limit": 100}).json()["data"]:
        stack.client.post(f"/v1/jobs/{queued['id']}/cancel")  # the reads' jobs: the worker runs only this one
    stack.start_worker()
    job = stack.client.post("/v1/jobs", json={"model_id": model_id,
                                              "stages": [{"type": "quantize", "method": "rtn", "bits": 8}]}).json()
    deadline = time.monotonic() + 1800
    while (state := stack.client.get(f"/v1/jobs/{job['id']}").json())["status"] not in ("succeeded", "failed"):
        assert time.monotonic() < deadline, "the transfer job did not finish in 30 min"
        await asyncio.sleep(1)
    assert state["status"] == "succeeded", state
    artifact_size = state["artifact"]["size_bytes"]
    stored = next(p for p in stack.storage_root.rglob("*") if p.is_file() and p.stat().st_size == artifact_size)
    cp_down = cp_seconds(stored, workdir)
    with PeakRss(_api_pid(stack)) as down_rss:
        down_s = await download(stack, job["id"], workdir / "artifact.tar")
    assert (workdir / "artifact.tar").stat().st_size == artifact_size
    return {"upload_bytes": size, "upload_s": up_s, "cp_upload_s": cp_up,
            "upload_rss_before": up_rss.before, "upload_rss_peak": up_rss.peak,
            "download_bytes": artifact_size, "download_s": down_s, "cp_download_s": cp_down,
            "download_rss_before": down_rss.before, "download_rss_peak": down_rss.peak}


def report_table(report: dict) -> str:
    mib = 1 << 20
    rows = ["| measurement | squeeze | baseline (same run) | ratio | target | met |",
            "|---|---|---|---|---|---|"]
    reads = report["reads"]
    for connections in sorted({r["connections"] for r in reads}):
        at = {r["name"].split(" ")[0]: r for r in reads if r["connections"] == connections}
        noop = at["no-op"]
        for kind in ("status", "list"):
            run = at[kind]
            ratio = run["per_s"] / noop["per_s"] if noop["per_s"] else float("nan")
            met = ratio >= 0.5 and run["p99_ms"] < 50 and not run["errors"]
            target = ">= 0.5 x, p99 < 50 ms, no errors" if kind == "status" else "(none; reported)"
            rows.append(f"| {kind} reads @ {connections} conn: req/s, p99 | {run['per_s']:.0f}/s, "
                        f"{run['p99_ms']:.1f} ms{_errors(run)} | /healthz {noop['per_s']:.0f}/s, "
                        f"{noop['p99_ms']:.1f} ms{_errors(noop)} | {ratio:.2f} | {target} | "
                        f"{('yes' if met else 'no') if kind == 'status' else '-'} |")
    streams = report["streams"]
    for index, (name, limit) in enumerate((("/healthz", 100), ("GET /v1/jobs/{id}", 200))):
        quiet, busy = streams["quiet"][index], streams["busy"][index]
        ratio = busy["p99_ms"] / quiet["p99_ms"] if quiet["p99_ms"] else float("nan")
        met = busy["p99_ms"] < limit and not busy["errors"] and streams["stream_statuses"] == {200: streams["streams"]}
        rows.append(f"| {name} p99, {streams['streams']} streams open | {busy['p99_ms']:.1f} ms{_errors(busy)} | "
                    f"{quiet['p99_ms']:.1f} ms with none | {ratio:.2f} | < {limit} ms | {'yes' if met else 'no'} |")
    transfers = report.get("transfers")
    if transfers:
        for direction in ("upload", "download"):
            size = transfers[f"{direction}_bytes"]
            speed, cp_speed = size / transfers[f"{direction}_s"] / mib, size / transfers[f"cp_{direction}_s"] / mib
            growth = (transfers[f"{direction}_rss_peak"] - transfers[f"{direction}_rss_before"]) / mib
            rows.append(f"| {direction} {size / mib:.0f} MiB: MiB/s | {speed:.0f} MiB/s | cp {cp_speed:.0f} MiB/s | "
                        f"{speed / cp_speed:.2f} | >= 0.5 x | {'yes' if speed / cp_speed >= 0.5 else 'no'} |")
            rows.append(f"| API peak RSS during the {direction} | "
                        f"{transfers[f'{direction}_rss_peak'] / mib:.0f} MiB (+{growth:.0f}) | "
                        f"{transfers[f'{direction}_rss_before'] / mib:.0f} MiB before | "
                        f"{growth / (size / mib):.2f} of the file | flat | "
                        f"{'yes' if growth < 0.1 * size / mib + 16 else 'no'} |")
    return "\n".join(rows)


def _errors(run: dict) -> str:
    return f" ({sum(run['errors'].values())} errors)" if run["errors"] else ""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.load", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--connections", default="64,256", help="comma-separated client counts for the reads")
    parser.add_argument("--seconds", type=float, default=10.0, help="per measurement")
    parser.add_argument("--streams", type=int, default=500)
    parser.add_argument("--probe-connections", type=int, default=4, help="clients probing while streams are open")
    parser.add_argument("--file-mib", type=float, default=256.0)
    parser.add_argument("--no-transfers", action="store_true")
    parser.add_argument("--quick", action="store_true", help="a second per measurement, 8 connections, "
                        "20 streams, a tiny checkpoint: checks that everything runs")
    parser.add_argument("--json", type=Path, help="also write every number here")
    args = parser.parse_args(argv)
    if args.quick:
        args.connections, args.seconds, args.streams, args.probe_connections, args.file_mib = "8", 1.0, 20, 2, 1
    args.connections = [int(n) for n in str(args.connections).split(",")]
    return args


async def _measure(stack: ServiceStack, workdir: Path, args) -> dict:
    from tests.e2e.client import submit_job

    job_id = submit_job(stack.client, workdir / "small-model")["id"]
    for _ in range(25):  # a full page for the list reads
        stack.client.post("/v1/jobs", json={"model_id": stack.client.get(f"/v1/jobs/{job_id}").json()["model_id"],
                                            "stages": [{"type": "quantize", "method": "rtn", "bits": 8}]})
    print("reads", flush=True)
    report: dict = {"reads": await measure_reads(stack, job_id, args)}
    print("streams", flush=True)
    report["streams"] = await measure_streams(stack, job_id, args)
    if not args.no_transfers:
        print("transfers", flush=True)
        report["transfers"] = await measure_transfers(stack, workdir, args)
    return report


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="squeeze-load-"))
    caps = str(args.streams + 16)
    stack = ServiceStack.postgres_redis(workdir, rate_limit_per_s="0", event_streams_per_key=caps,
                                        event_streams_per_tenant=caps, max_active_jobs_per_tenant="1000",
                                        max_tenant_storage_bytes=str(64 << 30), upload_part_max_bytes=str(PART))
    try:
        stack.start(with_worker=False)
        if sys.platform == "linux":
            try:
                import uvloop

                asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
            except ImportError:
                pass
        report = asyncio.run(_measure(stack, workdir, args))
    except BaseException:
        print(stack.logs()[-4000:], file=sys.stderr)
        raise
    finally:
        stack.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    report["args"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    print(report_table(report), flush=True)
    return report


if __name__ == "__main__":
    main()

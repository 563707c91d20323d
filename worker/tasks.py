"""``run_job(job_id)``: the plumbing around the compression engine.

The task receives only an id. It claims the job in the database (a duplicate message finds it
no longer queued and stops), re-reads the spec, runs the engine, and publishes the artifact by
an atomic rename before the job is marked succeeded, so a client never sees a job that
succeeded without its artifact, nor half an artifact.
"""

from __future__ import annotations

import errno
import gc
import logging
import os
import socket
import tarfile
import time
import uuid
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from celery.exceptions import SoftTimeLimitExceeded
from sqlalchemy import update
from sqlalchemy.exc import DBAPIError, OperationalError

from app.background import PeriodicThread
from app.config import get_settings
from app.db import repositories
from app.db.models import Dataset, Job, JobStatus, Model, utcnow
from app.db.session import session_scope
from app.observability import job_id_var
from app.services import events
from app.services.estimate import declared_limits, gib
from app.services.leases import make_worker_id
from app.specs import JobSpec, reference_fields
from app.storage import get_store, sha256_file
from worker.celery_app import RUN_JOB, app

log = logging.getLogger("squeeze.worker")


@app.task(name=RUN_JOB, bind=True)
def run_job(task, job_id: str) -> None:
    job_id_var.set(job_id)  # every log line of this job carries its id
    settings = get_settings()
    # The Celery node name leads the id: the reconciler asks that node whether it still runs
    # the job before it hands the job to another worker (app/services/leases.py).
    node = task.request.hostname or socket.gethostname()
    worker_id = make_worker_id(node, os.getpid(), uuid.uuid4().hex[:8])

    def claim() -> str:
        with session_scope() as session:
            cap = settings.max_running_jobs_per_tenant
            running = repositories.tenant_at_capacity(session, job_id, cap) if cap else None
            if running is not None:
                return "waiting" if note_waiting(session, job_id, running, cap) else "gone"
            if not repositories.claim_job(session, job_id, utcnow(), worker_id, settings.job_lease_s):
                return "gone"
            job = session.get(Job, job_id)
            events.record(session, job, "status", f"job running (attempt {job.attempts})",
                          status=JobStatus.RUNNING.value, attempt=job.attempts)
            return "claimed"

    outcome = retry_database(claim)
    if outcome == "waiting":
        defer(task, job_id, settings.fair_share_retry_s)
        return
    if outcome == "gone":
        log.info("job %s is not queued any more (cancelled or already taken); message dropped", job_id)
        return
    heartbeat = Heartbeat(job_id, worker_id, settings.job_lease_s)
    runner = JobRunner(job_id, worker_id=worker_id, heartbeat=heartbeat)
    heartbeat.start()
    try:
        with memory_budget(job_memory_limit(settings)):
            runner.run()
    except SoftTimeLimitExceeded:
        # The limit strikes wherever the job is: run() records it for the work itself, this
        # for the statements around it (cleanup, lifting the memory budget).
        runner.fail_time_limit()
    finally:
        heartbeat.stop()


def note_waiting(session, job_id: str, running: int, cap: int) -> bool:
    """The job's tenant runs ``cap`` jobs already: say so in the job's log (once per wait, not
    per retry) and keep it queued. False if the job is not waiting any more (cancelled, or
    taken by another delivery)."""
    job = session.get(Job, job_id)
    if job is None or job.status != JobStatus.QUEUED.value or job.cancel_requested:
        return False
    message = f"waiting: tenant has {running} running jobs (at most {cap} at once)"
    if repositories.last_event_message(session, job_id) != message:
        events.record(session, job, "status", message, status=JobStatus.QUEUED.value,
                      waiting="tenant_running_jobs", running=running)
    return True


def defer(task, job_id: str, countdown_s: float) -> None:
    """Send the job again, due in ``countdown_s``: the worker goes on with the next message
    (another tenant's job) meanwhile. Without a broker the job is marked unsent instead, and
    the reconciler sends it again."""
    try:
        task.apply_async(args=[job_id], countdown=countdown_s, queue=get_settings().queue_name)
    except Exception as exc:  # kombu raises many types; every one means "not sent"
        log.warning("broker unavailable, job %s left for the reconciler to re-send: %s", job_id, exc)

        def unsent() -> None:
            with session_scope() as session:
                session.execute(update(Job).where(Job.id == job_id, Job.status == JobStatus.QUEUED.value)
                                .values(enqueued_at=None))

        retry_database(unsent)


def retry_database(work, patience_s: float = 300.0):
    """Run ``work`` (one transaction), retrying while the database is unreachable (restarting,
    failing over). A write that decides a job's fate must not be lost to a blip."""
    delay, deadline = 0.5, time.monotonic() + patience_s
    while True:
        try:
            return work()
        except DBAPIError as exc:
            if not exc.connection_invalidated and not isinstance(exc, OperationalError) or time.monotonic() > deadline:
                raise
            log.warning("database unavailable (%s); retrying in %.1f s", type(exc.orig).__name__, delay)
            time.sleep(delay)
            delay = min(delay * 2, 10.0)


def best_effort(work) -> None:
    """Progress, log lines and cancel checks: skipped, not fatal, while the database is away."""
    try:
        work()
    except DBAPIError as exc:
        log.warning("database unavailable (%s); progress not recorded", type(exc.orig).__name__)


@contextmanager
def memory_budget(limit: int | None):
    """While a job runs, its worker process may map at most ``limit`` bytes more than it had
    when the job started (RLIMIT_AS, soft limit only): past that, allocations fail with a
    MemoryError the job reports as ``out_of_memory``, instead of the kernel's OOM killer taking
    the whole worker. The limit is lifted again afterwards, for the next job in this process."""
    size = _address_space_bytes() if limit else None
    if size is None:
        yield
        return
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    # Never above a limit the operator already set on the process.
    ceiling = min([size + limit] + [v for v in (soft, hard) if v != resource.RLIM_INFINITY])
    resource.setrlimit(resource.RLIMIT_AS, (ceiling, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def job_memory_limit(settings) -> int | None:
    """The ``memory_budget`` of one job: ``SQUEEZE_JOB_MEMORY_LIMIT_BYTES`` when the operator
    set it; otherwise, by default, what the worker declares it gives one job
    (``SQUEEZE_WORKER_MEMORY_BYTES``) or else its machine's physical memory, so that a job that
    runs away fails ``out_of_memory`` instead of the OOM killer taking the worker. No default
    on a GPU worker: RLIMIT_AS counts the device driver's address-space reservations, which
    are far larger than any memory."""
    if settings.job_memory_limit_bytes is not None:
        return settings.job_memory_limit_bytes
    if _runs_on_gpu(settings.device):
        return None
    return settings.worker_memory_bytes or _physical_memory_bytes()


def _runs_on_gpu(device: str) -> bool:
    if device == "auto":
        import torch

        return torch.cuda.is_available()
    return device != "cpu"


def _physical_memory_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):  # not on every platform
        return None


def _peak_rss_bytes() -> int:
    """This process's lifetime peak resident memory (ru_maxrss, KiB on Linux): this job's, or
    an earlier job's in the same worker process if that one used more."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _address_space_bytes() -> int | None:
    """This process's mapped address space (VmSize), or None where /proc is not there."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmSize:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


class ExceedsWorkerMemory(Exception):
    """The job's pre-flight estimate is more than this worker declares it gives one job."""


def check_worker_memory(estimate: dict | None, settings) -> None:
    """Refuse, before anything is loaded, a job whose recorded estimate exceeds the memory this
    worker declares (``SQUEEZE_WORKER_MEMORY_BYTES``, ``SQUEEZE_WORKER_DEVICE_MEMORY_BYTES``,
    as this process sees them): it fails with the numbers instead of being OOM-killed."""
    for where, key, limit, setting in declared_limits(settings):
        needed = (estimate or {}).get(key)
        if limit is not None and needed is not None and needed > limit:
            raise ExceedsWorkerMemory(
                f"this job needs an estimated {gib(needed)} of {where} memory at its peak, more "
                f"than the {gib(limit)} this worker gives one job ({setting}); it was not started")


def describe_failure(exc: BaseException, settings) -> tuple[str, str]:
    """The (type, message) a failed job reports. Running out of memory or of disk gets a name
    of its own and says which limit was hit, so a client knows what to change."""
    text = str(exc)[:2000] or repr(exc)
    out_of_memory = isinstance(exc, MemoryError) or (
        isinstance(exc, RuntimeError) and any(s in text for s in ("allocate memory", "out of memory", "not enough memory")))
    if isinstance(exc, ExceedsWorkerMemory):
        return "exceeds_worker_memory", text
    from worker.engine.registry import DeviceOutOfMemory  # the engine loads with the job

    if isinstance(exc, DeviceOutOfMemory):  # its text names the block and the GPU's numbers
        return "out_of_memory", text
    if out_of_memory:
        limit = settings.job_memory_limit_bytes
        budget = (f" (a job may use {limit / 2**20:.0f} MiB: SQUEEZE_JOB_MEMORY_LIMIT_BYTES)" if limit else "")
        return "out_of_memory", f"the job ran out of memory{budget}: {text}"
    # safetensors' writer reports the OS error as text ("... (os error 28)"), not as an OSError.
    if (isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)) or "No space left on device" in text:
        return "disk_full", f"no space left on the artifact storage while the job wrote its files: {text}"
    return type(exc).__name__, text


class Heartbeat(PeriodicThread):
    """Renews the job's lease a few times per lease period, from a thread, so that a long
    layer or training step never looks like a dead worker. ``lost`` turns true when the lease
    was taken over (this worker was presumed dead): the job must then stop without writing.
    A failed renewal (the database restarting) is logged and tried again next round."""

    def __init__(self, job_id: str, worker_id: str, lease_s: float):
        self.job_id, self.worker_id = job_id, worker_id
        self.lost = False
        super().__init__("heartbeat", lease_s / 4, self._renew)
        self.lease_s = lease_s

    def _renew(self) -> None:
        if self.lost:
            return
        with session_scope() as session:
            if not repositories.renew_lease(session, self.job_id, self.worker_id, utcnow(), self.lease_s):
                self.lost = True


@dataclass
class JobRunner:
    job_id: str
    worker_id: str | None = None
    heartbeat: Heartbeat | None = None
    settings: object = field(default_factory=get_settings)
    _last_progress_write: float = 0.0
    _last_cancel_check: float = 0.0
    _cancel_seen: bool = False
    _last_logged_tenth: int = 0

    # -- lifecycle ------------------------------------------------------------------------

    def run(self) -> None:
        from worker.engine.registry import JobCancelled

        store = get_store()
        staging = store.staging_dir(owner=self.job_id)
        failure = None
        try:
            metrics, artifact = self._execute(staging)
            if self._finish(JobStatus.SUCCEEDED, metrics=metrics, **artifact):
                self._remove_other_artifacts(store, keep=artifact["artifact_key"])
            else:  # no longer ours (presumed dead, or cancelled meanwhile): leave no file behind
                store.delete_key(f"artifacts/{artifact['artifact_key']}")
        except JobCancelled:
            if self.heartbeat is not None and self.heartbeat.lost:
                log.warning("job %s was handed to another worker; this attempt stops", self.job_id)
                return
            self._finish(JobStatus.CANCELLED)
        except SoftTimeLimitExceeded:
            self.fail_time_limit()
        except Exception as exc:  # every failure ends as a failed job with its reason
            log.exception("job %s failed", self.job_id)
            failure = describe_failure(exc, self.settings)
        finally:
            store.discard(staging)
        if failure:
            # Recorded outside the except block: the traceback's frames (and the tensors they
            # hold) are gone by now, which matters when the failure was running out of memory.
            gc.collect()
            self._finish(JobStatus.FAILED, error=failure)

    def fail_time_limit(self) -> None:
        # Conditional like every finish: a second call, or one after the job ended, is a no-op.
        self._finish(JobStatus.FAILED, error=("time_limit_exceeded",
                     f"the job ran longer than {self.settings.job_soft_time_limit_s} s"))

    def _remove_other_artifacts(self, store, keep: str) -> None:
        # Attempts write under their own name; once one has won, the others' files go.
        for key in store.list(f"artifacts/{self.job_id}-attempt"):
            if key != f"artifacts/{keep}":
                store.delete_key(key)

    def _finish(self, status: JobStatus, *, metrics=None, error=None, **artifact) -> bool:
        values = {"status": status.value, "finished_at": utcnow(), "metrics": metrics,
                  "lease_expires_at": None}
        if status is JobStatus.SUCCEEDED:
            values.update(progress=1.0, stage_name=None, stage_index=None, **artifact)
        if error:
            values.update(error_type=error[0], error_message=error[1])

        def write() -> bool:
            with session_scope() as session:
                # Only the lease holder may finish the job: a worker presumed dead that wakes
                # up later cannot overwrite the result of the attempt that replaced it.
                owner = Job.worker_id == self.worker_id if self.worker_id else True
                result = session.execute(
                    update(Job).where(Job.id == self.job_id, Job.status == JobStatus.RUNNING.value, owner)
                    .values(**values)
                )
                if result.rowcount:  # the status event commits with the status itself
                    job = session.get(Job, self.job_id)
                    if error:
                        events.record(session, job, "error", error[1], error_type=error[0])
                    events.record(session, job, "status", f"job {status.value}", status=status.value)
                return bool(result.rowcount)

        return retry_database(write)

    # -- the work -------------------------------------------------------------------------

    def _execute(self, staging: Path) -> tuple[dict, dict]:
        # Imported when a job runs, not with the task module: the engine brings torch.
        from worker.engine.compress import compress

        store = get_store()
        with session_scope() as session:
            job = session.get(Job, self.job_id)
            model_row = session.get(Model, job.model_id)
            spec = JobSpec.model_validate(job.spec)
            estimate = job.estimate
            named = self._resolve_references(session, spec)
        check_worker_memory(estimate, self.settings)  # before anything is loaded
        started = time.monotonic()
        # The inputs as folders on this host: the store's own (local backend) or copies in the
        # worker's scratch cache (object store), held for the whole job.
        with ExitStack() as inputs:
            model_dir = inputs.enter_context(store.checkout("models", model_row.id))
            files = {(kind, id_): inputs.enter_context(store.checkout(f"{kind}s", id_)) / filename
                     for (kind, id_), filename in named.items()}
            out_dir, metrics = compress(model_dir, spec, staging,
                                        device=self.settings.device, hooks=_TaskHooks(self, files))

        tar_path = staging / "artifact.tar"
        with tarfile.open(tar_path, "w") as tar:
            for path in sorted(out_dir.iterdir()):
                tar.add(path, arcname=path.name, recursive=False)
        digest = sha256_file(tar_path)
        metrics["after"]["artifact_bytes"] = tar_path.stat().st_size
        metrics["estimate"] = estimate
        metrics["peak_rss_bytes"] = _peak_rss_bytes()

        def read_attempt() -> int:
            with session_scope() as session:
                return session.get(Job, self.job_id).attempts

        attempt = retry_database(read_attempt)
        # Each attempt publishes under its own name, and only the attempt that finishes the job
        # is recorded (and keeps its file): a presumed-dead worker that wakes up late cannot
        # replace the artifact that the job's sha256 describes.
        key = f"{self.job_id}-attempt{attempt}.tar"
        store.put_file(f"artifacts/{key}", tar_path, sha256=digest, move=True)  # multipart to a bucket

        metrics["wall_time_s"] = round(time.monotonic() - started, 3)  # publishing included
        artifact = {"artifact_key": key, "artifact_size_bytes": metrics["after"]["artifact_bytes"],
                    "artifact_sha256": digest, "artifact_format": metrics["export"]["format"]}
        return metrics, artifact

    # -- helpers ----------------------------------------------------------------------------

    @staticmethod
    def _resolve_references(session, spec: JobSpec) -> dict[tuple[str, str], str]:
        """Every object the spec names (``app.specs.reference_fields``), as the file to use in its
        folder: ``{("dataset", id): its text file, ("model", id): "" (the folder)}``. One the job
        cannot find fails it here, naming the field, before any work."""
        rows = {"dataset": Dataset, "model": Model}
        files: dict[tuple[str, str], str] = {}
        for ref in reference_fields(spec):
            row = session.get(rows[ref.kind], ref.id)
            if row is None:
                raise LookupError(f"{ref.path}: {ref.kind} {ref.id!r} was deleted before the job ran")
            files[ref.kind, ref.id] = row.filename if ref.kind == "dataset" else ""
        return files

    def _write_progress(self, name, stage_index, progress, keep_stage: bool = False) -> None:
        self._last_progress_write = time.monotonic()
        values = {"progress": round(progress, 4)}
        if not keep_stage:
            values.update(stage_name=name, stage_index=stage_index)

        def write() -> None:
            with session_scope() as session:
                session.execute(update(Job).where(Job.id == self.job_id).values(**values))
                # The log gets a progress line per tenth, not per write.
                if int(progress * 10) > self._last_logged_tenth:
                    events.record(session, session.get(Job, self.job_id), "progress",
                                  f"{progress:.0%} done", progress=round(progress, 4))
            self._last_logged_tenth = max(self._last_logged_tenth, int(progress * 10))

        best_effort(write)

    def _event(self, type: str, message: str, **data) -> None:
        def write() -> None:
            with session_scope() as session:
                events.record(session, session.get(Job, self.job_id), type, message, **data)

        best_effort(write)

    def _should_cancel(self) -> bool:
        # A lost lease stops the job like a cancel, but _finish then writes nothing.
        if self.heartbeat is not None and self.heartbeat.lost:
            return True
        # One small query a second at most: cancel takes effect within seconds, not per layer.
        now = time.monotonic()
        if not self._cancel_seen and now - self._last_cancel_check >= 1.0:
            self._last_cancel_check = now

            def read() -> None:
                with session_scope() as session:
                    job = session.get(Job, self.job_id)
                    self._cancel_seen = bool(job is None or job.cancel_requested)

            best_effort(read)
        return self._cancel_seen


class _TaskHooks:
    """The engine's ``JobHooks`` (worker/engine/compress.py) for a job the task runs: progress,
    events and cancel checks go through the database, dataset and model ids become folders of
    the store."""

    def __init__(self, runner: JobRunner, files: dict[tuple[str, str], Path]):
        self.runner, self.files = runner, files

    def phase_started(self, name: str, stage_index: int | None, progress: float) -> None:
        self.runner._write_progress(name, stage_index, progress)
        self.runner._event("stage", f"{name} started", stage=name, stage_index=stage_index)

    def progress(self, fraction: float) -> None:
        if time.monotonic() - self.runner._last_progress_write >= self.runner.settings.progress_interval_s:
            self.runner._write_progress(None, None, fraction, keep_stage=True)

    def event(self, type: str, message: str, **data) -> None:
        self.runner._event(type, message, **data)

    def should_cancel(self) -> bool:
        return self.runner._should_cancel()

    # The spec's references were resolved when the job started; the engine asks for no other.
    def dataset_file(self, dataset_id: str) -> Path:
        return self.files["dataset", dataset_id]

    def model_dir(self, model_id: str) -> Path:
        return self.files["model", model_id]

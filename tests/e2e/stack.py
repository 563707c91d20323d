"""Start Squeeze as real processes for end-to-end tests: the API under uvicorn and a Celery
worker (prefork, not eager), against PostgreSQL + Redis or the embedded default.

>>> with ServiceStack.postgres_redis(tmp) as stack:
...     httpx.get(stack.url + "/healthz")
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]
PG_ADMIN_URL = os.environ.get("SQUEEZE_TEST_PG_ADMIN", "postgresql://postgres@127.0.0.1:5432/postgres")
PG_HOST_URL = PG_ADMIN_URL.rsplit("/", 1)[0]
REDIS_URL = os.environ.get("SQUEEZE_TEST_REDIS", "redis://127.0.0.1:6379/0")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServiceStack:
    def __init__(self, workdir: Path, env: dict[str, str], embedded_launcher: bool = False):
        self.workdir = workdir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
                    # One torch thread per process: the suite runs several processes on a small
                    # machine, and two threads contending for a loaded core run many times slower.
                    "OMP_NUM_THREADS": "1",
                    "SQUEEZE_PORT": str(self.port),
                    # Webhook retries in fractions of a second, so tests see several attempts.
                    "SQUEEZE_WEBHOOK_BACKOFF_S": "[0.3, 0.3, 0.3]",
                    # Small enough that a test can reach it, large enough for the suite's models.
                    "SQUEEZE_MAX_TENANT_STORAGE_BYTES": str(200 * 1024 * 1024),
                    "SQUEEZE_MAX_DATASET_BYTES": str(4 * 1024 * 1024),
                    # Short enough for the stalled-body test, long enough that a loaded machine
                    # never stalls a live upload this long.
                    "SQUEEZE_BODY_IDLE_TIMEOUT_S": "10", **env}
        self.embedded_launcher = embedded_launcher
        self.worker_env: dict[str, str] = {}  # for the workers only (what each declares), see start_worker
        self.processes: list[tuple[str, subprocess.Popen]] = []
        self.storage_root = Path(env.get("SQUEEZE_STORAGE_ROOT", workdir / "var" / "storage"))
        self._dropdb: str | None = None
        self._operator_key: str | None = None

    # -- constructors ---------------------------------------------------------------------

    @classmethod
    def postgres_redis(cls, workdir: Path, broker_url: str = REDIS_URL, worker_settings: dict[str, str] | None = None,
                       **settings: str) -> "ServiceStack":
        """PostgreSQL (a fresh database) and Redis; ``settings`` are extra SQUEEZE_* values,
        ``worker_settings`` SQUEEZE_* values the workers see and the API does not."""
        import psycopg

        database = f"squeeze_test_{secrets.token_hex(4)}"
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{database}"')
        stack = cls(workdir, {
            "SQUEEZE_DATABASE_URL": f"{PG_HOST_URL.replace('postgresql://', 'postgresql+psycopg://')}/{database}",
            "SQUEEZE_BROKER_URL": broker_url,
            "SQUEEZE_QUEUE_NAME": f"squeeze-test-{secrets.token_hex(4)}",
            "SQUEEZE_STORAGE_ROOT": str(workdir / "artifacts"),
            "SQUEEZE_VAR_DIR": str(workdir / "var"),
            **{f"SQUEEZE_{key.upper()}": value for key, value in settings.items()},
        })
        stack._dropdb = database
        stack.worker_env = {f"SQUEEZE_{key.upper()}": value for key, value in (worker_settings or {}).items()}
        return stack

    @classmethod
    def embedded(cls, workdir: Path, **settings: str) -> "ServiceStack":
        """Nothing configured but the folder: SQLite, filesystem broker, local artifacts,
        started by the same launcher as ``make run``; ``settings`` are extra SQUEEZE_* values."""
        return cls(workdir, {"SQUEEZE_VAR_DIR": str(workdir / "var"),
                             **{f"SQUEEZE_{key.upper()}": value for key, value in settings.items()}},
                   embedded_launcher=True)

    # -- processes ------------------------------------------------------------------------

    def _spawn(self, name: str, args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
        log = (self.workdir / f"{name}.log").open("ab")  # a restarted process adds to its log
        proc = subprocess.Popen(args, cwd=ROOT, env=env or self.env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        self.processes.append((name, proc))
        return proc

    def start_worker(self, name: str = "worker", concurrency: int = 1, **settings: str) -> subprocess.Popen:
        """A Celery worker running ``concurrency`` jobs at once; ``settings`` are SQUEEZE_*
        values for it alone (over ``worker_env``), e.g. ``start_worker(worker_memory_bytes="1000")``."""
        env = {**self.env, **self.worker_env, **{f"SQUEEZE_{key.upper()}": value for key, value in settings.items()}}
        return self._spawn(name, [sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker",
                                  "--loglevel=INFO", f"--concurrency={concurrency}", "--pool=prefork",
                                  "-Q", self.env.get("SQUEEZE_QUEUE_NAME", "squeeze-jobs"),
                                  "--hostname", f"{name}-{secrets.token_hex(3)}@%h"], env=env)

    def job_process(self) -> int:
        """The pid of the process that runs jobs: the worker's prefork child (concurrency 1),
        the deepest Celery process under this stack's processes."""
        import psutil

        for _, proc in self.processes:
            if proc.poll() is not None:
                continue
            celery = [p for p in psutil.Process(proc.pid).children(recursive=True) + [psutil.Process(proc.pid)]
                      if "celery" in " ".join(p.cmdline())]
            children = [p for p in celery if p.parent() is not None and p.parent().pid in {c.pid for c in celery}]
            if children:
                return children[0].pid
        raise AssertionError("no worker child process found")

    def start_api(self, wait: bool = False) -> subprocess.Popen:
        proc = self._spawn("api", [sys.executable, "-m", "uvicorn", "app.main:app",
                                   "--host", "127.0.0.1", "--port", str(self.port)])
        if wait:
            self._wait_healthy()
        return proc

    def kill(self, name: str) -> None:
        """SIGKILL a process and its children, as a crashed machine would stop them."""
        for entry in list(self.processes):
            process_name, proc = entry
            if process_name == name and proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)
                self.processes.remove(entry)  # gone on purpose: not an early exit

    def start(self, with_worker: bool = True) -> "ServiceStack":
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self.embedded_launcher:
            self._spawn("serve", [sys.executable, "-m", "app.serve"])
        else:
            subprocess.run([sys.executable, "-m", "alembic", "upgrade", "head"], cwd=ROOT,
                           env=self.env, check=True, capture_output=True)
            if with_worker:
                self.start_worker()
            self.start_api()
        self._wait_healthy()
        self.admin_key = self.create_key("tenant-a", admin=True)
        self.client = self.client_for(self.admin_key)
        return self

    def create_key(self, tenant: str, admin: bool = False, scope: str | None = None) -> str:
        """A key made the way an operator makes the first one: the admin CLI. ``scope`` is
        member, admin or operator (``admin=True`` is scope admin)."""
        scope = scope or ("admin" if admin else "member")
        return self.admin_cli("create-key", "--tenant", tenant, "--name", "test", "--scope", scope)

    def admin_cli(self, *args: str) -> str:
        """Runs ``python -m app.admin ARGS`` against this stack's database; its last line."""
        result = subprocess.run([sys.executable, "-m", "app.admin", *args], cwd=ROOT, env=self.env,
                                check=True, capture_output=True, text=True)
        return result.stdout.strip().splitlines()[-1]

    def operator_client(self) -> httpx.Client:
        """A client with an operator key (made once), for /metrics and every tenant's keys."""
        if self._operator_key is None:
            self._operator_key = self.create_key("operators", scope="operator")
        return self.client_for(self._operator_key)

    def client_for(self, key: str) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {key}"}, timeout=60)

    def _wait_healthy(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, proc in self.processes:
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited early:\n{self.logs()}")
            try:
                if httpx.get(self.url + "/healthz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise RuntimeError(f"API did not become healthy:\n{self.logs()}")

    def logs(self) -> str:
        return "\n".join(
            f"--- {path.name}\n{path.read_text(errors='replace')[-6000:]}" for path in sorted(self.workdir.glob("*.log"))
        )

    def stop(self) -> None:
        for _, proc in reversed(self.processes):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for _, proc in self.processes:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        if self._dropdb:
            import psycopg

            with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{self._dropdb}" WITH (FORCE)')

    def __enter__(self) -> "ServiceStack":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

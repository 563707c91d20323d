"""The one settings object. Every knob comes from the environment with the prefix ``SQUEEZE_``.

With nothing set, Squeeze runs embedded: a SQLite file, a filesystem Celery broker and the
artifact folder, all under ``./var``. Production sets, for example::

    SQUEEZE_DATABASE_URL=postgresql+psycopg://squeeze:secret@db:5432/squeeze
    SQUEEZE_BROKER_URL=redis://redis:6379/0
    SQUEEZE_STORAGE_ROOT=/mnt/artifacts

>>> from app.config import get_settings
>>> get_settings().api_prefix
'/v1'
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

MiB = 1024 * 1024
GiB = 1024 * MiB


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SQUEEZE_", extra="ignore")

    # Where the embedded default keeps everything; the other paths default to folders in it.
    var_dir: Path = Path("var")
    database_url: str | None = Field(
        default=None, description="SQLAlchemy URL; default sqlite:///<var_dir>/squeeze.db"
    )
    broker_url: str = Field(
        default="filesystem://",
        description="Celery broker; filesystem:// is the embedded broker under <var_dir>/broker",
    )
    queue_name: str = "squeeze-jobs"
    storage_root: Path | None = Field(
        default=None, description="artifact folder (shared between API and workers)"
    )

    api_prefix: str = "/v1"
    log_level: str = "INFO"
    host: str = "127.0.0.1"
    port: int = 8000

    # Upload limits. Checked while streaming, so a client cannot fill the disk past them.
    max_upload_bytes: int = 20 * GiB
    max_dataset_bytes: int = 2 * GiB
    body_idle_timeout_s: float = 60.0  # a request body that stalls this long is abandoned (408)
    max_archive_members: int = 64
    max_compression_ratio: float = 200.0
    max_safetensors_header_bytes: int = 64 * MiB
    max_model_parameters: int = 200_000_000_000
    max_tenant_storage_bytes: int = 1024 * GiB  # models + datasets + artifacts of one tenant
    upload_part_max_bytes: int = 64 * MiB
    upload_ttl_s: int = 7 * 24 * 3600
    # Staging files nobody has written to for this long belong to a request that died with its
    # API process (every live body writes at least once per body_idle_timeout_s): swept.
    staging_max_idle_s: float = 3600.0

    # Worker behaviour for long jobs.
    worker_concurrency: int = 1
    job_time_limit_s: int = 6 * 3600
    job_soft_time_limit_s: int = 6 * 3600 - 60
    device: str = Field(default="auto", description="auto | cpu | cuda | cuda:N")
    progress_interval_s: float = 0.5
    job_lease_s: float = 60.0  # a worker silent this long is presumed dead and its job retried
    job_max_attempts: int = 3
    # Before a job with an expired lease is handed on, its worker is asked (broker control
    # channel) whether it still runs it; a node silent this long is taken for gone.
    worker_ping_timeout_s: float = 5.0
    job_memory_limit_bytes: int | None = None  # memory a job may map beyond its worker's idle footprint
    # What one job may use on a worker, declared by the operator. The API refuses (422) a job
    # whose pre-flight estimate exceeds them; a worker fails such a job before loading anything
    # (exceeds_worker_memory). None: unknown, nothing is refused.
    worker_memory_bytes: int | None = Field(default=None, description="host memory a worker gives one job")
    worker_device_memory_bytes: int | None = Field(default=None, description="device memory a worker gives one job")
    # The worker process's own footprint (Python, torch, transformers), a term of every estimate.
    worker_process_bytes: int = 1 * GiB
    reconcile_interval_s: float = 10.0
    max_active_jobs_per_tenant: int = 20  # queued + running; more answers 429

    # Webhooks: seconds to wait before each retry; after the last one the delivery is failed.
    webhook_backoff_s: list[float] = [5, 30, 120, 600, 1800, 3600, 3 * 3600, 6 * 3600]
    webhook_timeout_s: float = 10.0
    webhook_dispatcher: bool = Field(default=True, description="run the delivery thread in the API process")

    @property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.var_dir / 'squeeze.db').resolve()}"

    @property
    def resolved_storage_root(self) -> Path:
        return (self.storage_root or self.var_dir / "storage").resolve()

    @property
    def broker_folder(self) -> Path:
        return (self.var_dir / "broker").resolve()


@lru_cache
def get_settings() -> Settings:
    return Settings()

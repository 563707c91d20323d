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

from pydantic import Field, SecretStr, field_validator, model_validator
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
        default=None, description="artifact folder (shared between API and workers); with "
        "storage_url set, this process's own scratch folder (staging, a worker's model cache)"
    )
    # Object storage (app/storage/): unset keeps everything in storage_root; s3://bucket/prefix
    # puts models, datasets and artifacts in any S3-compatible store (endpoint and credentials
    # from the standard AWS_* settings, never from SQUEEZE_*).
    storage_url: str | None = Field(default=None, pattern=r"^s3://[^/]+(/.*)?$")
    storage_presign_downloads: bool = False  # artifact downloads redirect (307) to a presigned URL
    storage_presign_ttl_s: int = Field(default=900, ge=60, le=7 * 24 * 3600)
    scratch_cache_max_bytes: int = Field(default=50 * GiB, ge=0)  # a worker's cache of recent models

    api_prefix: str = "/v1"
    log_level: str = "INFO"
    host: str = "127.0.0.1"
    port: int = 8000
    # `make run` (app/serve.py) stopping: open connections get this long to finish and the
    # worker this long for its warm shutdown; then they are cut off (the worker's processes by
    # SIGKILL; a job it was running is queued again like any lost worker's).
    shutdown_timeout_s: float = Field(default=10.0, gt=0, le=3600)

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

    # Event streams (GET /v1/jobs/{id}/events/stream), counted per API process: past a cap a new
    # one is a 429 with Retry-After. A stream ends after event_stream_max_s even if its job goes
    # on; clients reopen it with Last-Event-ID and miss nothing.
    event_streams_per_key: int = Field(default=20, ge=1)
    event_streams_per_tenant: int = Field(default=100, ge=1)
    event_stream_max_s: float = Field(default=3600.0, gt=0)

    # Fair share, rate limits, retention (issue 12). A worker starts at most this many jobs of
    # one tenant at once; another of its jobs waits in the queue (re-sent every
    # fair_share_retry_s, no attempt used), so one tenant's backlog never starves another's job.
    max_running_jobs_per_tenant: int | None = Field(default=4, ge=1, description="None: no cap")
    fair_share_retry_s: float = Field(default=5.0, gt=0)
    # Per API key, a token bucket: rate_limit_per_s requests a second on average, bursts of
    # rate_limit_burst. Shared by every API replica through Redis when the broker is Redis
    # (or rate_limit_redis_url), in process memory otherwise. 0 turns it off.
    rate_limit_per_s: float = Field(default=100.0, ge=0)
    rate_limit_burst: int = Field(default=200, ge=1)
    rate_limit_redis_url: str | None = None
    # What a job may ask of a worker's time: calibration samples x seq_len, evaluation forward
    # tokens (both passes, given the stride) and distillation training tokens, summed. A spec
    # past it is a 422 at submission. None: unbounded.
    max_job_tokens: int | None = Field(default=1_000_000_000, ge=1)
    # Resumable uploads reserve their declared size from creation; at most this many pending.
    max_pending_uploads_per_tenant: int = Field(default=10, ge=1)
    # Finished jobs' events, settled webhook deliveries and idempotency records older than this
    # are pruned by the reconciler.
    event_retention_days: float = Field(default=30.0, gt=0)
    webhook_delivery_retention_days: float = Field(default=30.0, gt=0)
    idempotency_retention_days: float = Field(default=1.0, gt=0)

    # Webhooks: seconds to wait before each retry; after the last one the delivery is failed.
    webhook_backoff_s: list[float] = [5, 30, 120, 600, 1800, 3600, 3 * 3600, 6 * 3600]
    # One attempt, whole (lookup, connect, TLS, sending, the answer's status line), ends by
    # then; it must end well before the claim lease does, after which another dispatcher retries.
    webhook_timeout_s: float = 10.0
    webhook_lease_s: float = 60.0
    webhook_dispatcher: bool = Field(default=True, description="run the delivery thread in the API process")
    webhook_workers: int = Field(default=8, ge=1, description="deliveries in flight per API process")
    webhook_per_tenant: int = Field(default=2, ge=1, description="of which at most this many for one tenant")
    # Deliveries reach only globally routable addresses, plus these networks (comma-separated
    # CIDRs, e.g. "10.20.0.0/16,fd00::/8") for receivers inside the operator's network.
    webhook_allowed_networks: str = ""
    # Secrets kept to be used later (webhook signing keys) are encrypted with this key (base64 of
    # 32 bytes, `python -m app.crypto` makes one); unset, the embedded default keeps a generated
    # one in <var_dir>/secret.key. Retired keys, comma-separated, still decrypt (rotation).
    secret_key: SecretStr | None = None
    previous_secret_keys: SecretStr | None = None

    @field_validator("webhook_allowed_networks")
    @classmethod
    def _networks_parse(cls, value: str) -> str:
        from app.netguard import AddressPolicy

        AddressPolicy.from_setting(value)  # a typo fails at start, not at the first delivery
        return value

    @field_validator("secret_key", "previous_secret_keys")
    @classmethod
    def _keys_parse(cls, value: SecretStr | None) -> SecretStr | None:
        from app.crypto import parse_key

        for key in (value.get_secret_value().split(",") if value else []):
            parse_key(key)
        return value

    @model_validator(mode="after")
    def _attempt_within_lease(self) -> "Settings":
        if self.webhook_timeout_s * 2 > self.webhook_lease_s:
            raise ValueError("webhook_timeout_s must be at most half of webhook_lease_s: an attempt still "
                             "running when its claim runs out would be made twice")
        return self

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

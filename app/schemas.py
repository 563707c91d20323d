"""What the API answers with. Request bodies are in ``app/specs.py`` (the job spec)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Generic, Literal, TypeVar

from pydantic import AliasChoices, BaseModel, ConfigDict, Field

from app.specs import RequestModel

T = TypeVar("T")


class FileOut(BaseModel):
    name: str
    size_bytes: int
    sha256: str


class ModelOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    object: Literal["model"] = "model"
    name: str
    architecture: str = Field(description="e.g. GPT2LMHeadModel")
    model_type: str = Field(description="e.g. gpt2")
    num_parameters: int
    size_bytes: int = Field(description="all stored files")
    sha256: str = Field(description="sha256 of the manifest `<file sha256>  <name>` lines, sorted")
    files: list[FileOut]
    has_tokenizer: bool
    context_length: int | None
    dtype: str
    metadata: dict[str, str] = Field(validation_alias=AliasChoices("metadata_", "metadata"))
    created_at: datetime


class DatasetOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    object: Literal["dataset"] = "dataset"
    name: str
    format: Literal["text", "jsonl"]
    num_records: int = Field(description="1 for a text file; lines for JSONL")
    size_bytes: int
    sha256: str
    metadata: dict[str, str] = Field(validation_alias=AliasChoices("metadata_", "metadata"))
    created_at: datetime


class JobError(BaseModel):
    type: str
    message: str


class ArtifactOut(BaseModel):
    format: str = Field(description="dense | compressed-tensors")
    size_bytes: int
    sha256: str
    url: str


class JobOut(BaseModel):
    id: str
    object: Literal["job"] = "job"
    model_id: str
    status: Literal["queued", "running", "succeeded", "failed", "cancelled"]
    stage: str | None = Field(description="what is running now, e.g. prune.magnitude")
    stage_index: int | None
    progress: float = Field(ge=0, le=1)
    cancel_requested: bool
    attempts: int
    spec: dict[str, Any]
    error: JobError | None
    metrics: dict[str, Any] | None = Field(
        description="before/after size, parameters, sparsity, bits per weight, perplexity, "
        "latency, and wall time per stage; see the README"
    )
    estimate: dict[str, Any] | None = Field(
        default=None,
        description="the pre-flight estimate made at submission: host_bytes, device_bytes and disk_bytes "
        "at the job's peak, each with its terms (what holds the bytes); see the README",
    )
    artifact: ArtifactOut | None
    metadata: dict[str, str]
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None


class Page(BaseModel, Generic[T]):
    """A page of a list, newest first. Pass the last id as ``after`` to get the next page."""

    object: Literal["list"] = "list"
    data: list[T]
    has_more: bool


class Deleted(BaseModel):
    id: str
    object: str
    deleted: Literal[True] = True


class ApiKeyCreate(RequestModel):
    """``{"name": "ci"}``: a member key for the caller's own tenant. Only an operator key may
    name another tenant (created if new); the operator scope itself is granted by the CLI only."""

    tenant: str | None = Field(default=None, min_length=1, max_length=100,
                               description="tenant name; the caller's own if left out. Another "
                                           "tenant (created if new) needs an operator key")
    name: str = Field(min_length=1, max_length=100)
    scope: Literal["member", "admin"] = Field(
        default="member", description="admin keys also manage their tenant's keys")


class ApiKeyOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    object: Literal["api_key"] = "api_key"
    tenant_id: str
    name: str
    prefix: str = Field(description="the first characters of the secret, to tell keys apart")
    scope: Literal["member", "admin", "operator"]
    is_admin: bool = Field(description="scope is admin or operator")
    created_at: datetime
    revoked_at: datetime | None


class ApiKeyCreated(ApiKeyOut):
    key: str = Field(description="the secret: shown once, store it now")


class WebhookAttemptOut(BaseModel):
    attempted_at: datetime
    status_code: int | None = Field(description="the receiver's answer; null when it could not be reached")
    error: str | None = Field(description="why the attempt failed, in generic words only: \"http <code>\", "
                              "\"timeout\", \"connection failed\", \"refused: address not allowed\" or "
                              "\"internal error\"; null when delivered")
    duration_ms: float


class WebhookDeliveryOut(BaseModel):
    id: str = Field(description="the webhook-id header, the same on every retry")
    object: Literal["webhook.delivery"] = "webhook.delivery"
    event_id: int
    event_type: str
    url: str
    status: Literal["pending", "delivered", "failed"]
    attempts: int
    next_attempt_at: datetime | None
    created_at: datetime
    delivered_at: datetime | None
    attempt_log: list[WebhookAttemptOut]


class JobEventOut(BaseModel):
    id: int = Field(description="increasing; use as the cursor")
    object: Literal["job.event"] = "job.event"
    job_id: str
    type: Literal["status", "stage", "progress", "metric", "warning", "error"]
    message: str
    data: dict[str, Any]
    created_at: datetime

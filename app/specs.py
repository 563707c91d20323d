"""The job spec: defined once, used by the route that validates it, the task that runs it and
the OpenAPI schema that clients build forms from.

A stage is chosen by the pair ``(type, method)``; each pair has its own config model, so a
method's fields and limits are written in exactly one place. A job that prunes half of every
layer's weights by magnitude, then stores them as int8::

    {"model_id": "mdl_0123...",
     "stages": [{"type": "prune", "method": "magnitude", "sparsity": 0.5},
                {"type": "quantize", "method": "rtn", "bits": 8}],
     "evaluation": {"dataset_id": "ds_0123..."}}

Adding a method: write its config class here and add it to ``STAGE_CONFIGS``; its handler is
one new file under ``worker/engine/<family>/`` (``@register(TheConfig)``), found by discovery.

A field that names another object is typed ``DatasetRef`` or ``ModelRef``: that one annotation
is what the submission check, deletion, the worker, the CLI and the web client's pickers read
(``references(spec)`` here, ``"x-squeeze-ref"`` in the JSON schema).
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from typing import Annotated, Any, ClassVar, Literal, Union, get_args

from pydantic import (AfterValidator, AnyHttpUrl, BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationInfo,
                      field_validator, model_validator)
from pydantic.fields import FieldInfo


def has_nul(value: Any) -> bool:
    """True if a NUL is in ``value`` or in any string inside it (keys included)."""
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any(has_nul(k) or has_nul(v) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return any(has_nul(v) for v in value)
    return False


class RequestModel(BaseModel):
    """Base of every request body. A misspelt field is an error, not a silently ignored
    default; a NUL in any text is refused with its field (PostgreSQL can neither store nor even
    compare such text, and no name, id or label needs one)."""

    model_config = ConfigDict(extra="forbid")

    @field_validator("*", mode="before")
    @classmethod
    def _no_nul(cls, value: Any) -> Any:
        if has_nul(value):
            raise ValueError("text must not contain NUL bytes")
        return value



# ---------------------------------------------------------------------------------------------
# References to other objects


REFERENCE_KEY = "x-squeeze-ref"  # the JSON schema extension: its value is the kind of object named
REFERENCE_KINDS = ("dataset", "model")

# An uploaded dataset's id (``ds_...``); in the JSON schema ``{"type": "string", "x-squeeze-ref": "dataset"}``.
DatasetRef = Annotated[str, Field(min_length=1, max_length=64, json_schema_extra={REFERENCE_KEY: "dataset"})]
# An uploaded model's id (``mdl_...``); in the JSON schema ``{"type": "string", "x-squeeze-ref": "model"}``.
ModelRef = Annotated[str, Field(min_length=1, max_length=64, json_schema_extra={REFERENCE_KEY: "model"})]


def _declared_kind(field: FieldInfo) -> str | None:
    """``"dataset"`` for a field typed ``DatasetRef`` (or ``DatasetRef | None``, or a list of
    them), None for a field that names nothing."""
    extra = field.json_schema_extra
    if isinstance(extra, dict) and extra.get(REFERENCE_KEY):
        return str(extra[REFERENCE_KEY])
    pending = [field.annotation]
    while pending:  # Optional and list keep the Annotated marker inside their arguments
        annotation = pending.pop()
        for marker in getattr(annotation, "__metadata__", ()):
            if isinstance(marker, FieldInfo) and (kind := _declared_kind(marker)):
                return kind
        pending.extend(get_args(annotation))
    return None


@cache
def _reference_fields(model: type[BaseModel]) -> dict[str, str]:
    """Field name -> kind, for the fields of ``model`` that name another object."""
    kinds = {name: _declared_kind(field) for name, field in model.model_fields.items()}
    return {name: kind for name, kind in kinds.items() if kind}


@dataclass(frozen=True)
class Reference:
    """One field of a spec that names another object: ``Reference("stages.1.teacher_model_id",
    "model", "mdl_...")``. ``path`` is the dotted field path an error's ``param`` uses."""

    path: str
    kind: str
    id: str


def reference_fields(spec: BaseModel) -> Iterator[Reference]:
    """Every reference in a validated spec, in field order (``model_id`` first)::

        for ref in reference_fields(JobSpec.model_validate(body)):
            print(ref.path, ref.kind, ref.id)   # model_id model mdl_...; evaluation.dataset_id dataset ds_...
    """
    yield from _walk(spec, ())


def _walk(value: Any, path: tuple[str, ...]) -> Iterator[Reference]:
    if isinstance(value, BaseModel):
        kinds = _reference_fields(type(value))
        for name in type(value).model_fields:
            item, where = getattr(value, name), (*path, name)
            if name not in kinds:
                yield from _walk(item, where)
            elif isinstance(item, str):
                yield Reference(".".join(where), kinds[name], item)
            elif isinstance(item, (list, tuple)):
                yield from (Reference(".".join((*where, str(i))), kinds[name], one) for i, one in enumerate(item))
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            yield from _walk(item, (*path, str(index)))


def references(spec: BaseModel) -> dict[str, set[str]]:
    """The ids a validated spec names, by kind: ``{"dataset": {"ds_..."}, "model": {"mdl_...", ...}}``
    (every kind is a key, empty when the spec names none)."""
    found: dict[str, set[str]] = {kind: set() for kind in REFERENCE_KINDS}
    for ref in reference_fields(spec):
        found.setdefault(ref.kind, set()).add(ref.id)
    return found


def _type_and_method_required(schema: dict[str, Any]) -> None:
    # Defaults make Python construction short (PruneMagnitude(sparsity=0.5)); on the wire the
    # pair selects the method, so the JSON schema requires both.
    schema["required"] = sorted({*schema.get("required", []), "type", "method"})


class _StageConfig(RequestModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra=_type_and_method_required)
    # Data-aware methods look at activations: the job must then carry a calibration section.
    requires_calibration: ClassVar[bool] = False


_NM = re.compile(r"^([1-9][0-9]?):([1-9][0-9]?)$")


class _Unstructured(_StageConfig):
    """Shared by the unstructured pruning methods: a fraction of weights, or an N:M pattern
    (N weights kept in every M consecutive inputs, e.g. ``"2:4"``, which sparse tensor cores
    run fast). With a pattern the sparsity follows from it and may be left out."""

    sparsity: float | None = Field(default=None, gt=0.0, lt=1.0, description="fraction of weights set to zero")
    pattern: str = Field(default="unstructured", pattern=r"^(unstructured|[1-9][0-9]?:[1-9][0-9]?)$",
                         description='"unstructured", or N:M such as "2:4" or "4:8"')

    @model_validator(mode="after")
    def _sparsity_matches_pattern(self):
        if self.pattern == "unstructured":
            if self.sparsity is None:
                raise ValueError("sparsity is required for unstructured pruning")
            return self
        match = _NM.match(self.pattern)
        if not match or int(match[1]) >= int(match[2]):
            raise ValueError('pattern must be "unstructured" or N:M with N < M, e.g. "2:4"')
        implied = 1 - int(match[1]) / int(match[2])
        if self.sparsity is not None and abs(self.sparsity - implied) > 1e-9:
            raise ValueError(f"pattern {self.pattern} means sparsity {implied:g}; leave sparsity out")
        self.sparsity = implied
        return self

    @property
    def n_m(self) -> tuple[int, int] | None:
        """``(2, 4)`` for ``"2:4"``; None for unstructured."""
        match = _NM.match(self.pattern)
        return (int(match[1]), int(match[2])) if match else None


# ---------------------------------------------------------------------------------------------
# Stages


class PruneRandom(_Unstructured):
    """Zero a random ``sparsity`` fraction of each layer's weights: the baseline every other
    pruning method must beat. ``{"type": "prune", "method": "random", "sparsity": 0.5, "seed": 0}``"""

    type: Literal["prune"] = "prune"
    method: Literal["random"] = "random"
    seed: int = Field(default=0, ge=0, description="makes the choice of weights reproducible")


class PruneMagnitude(_Unstructured):
    """Zero the weights of smallest absolute value. With ``scope="layer"`` every layer gets
    exactly ``sparsity`` (rounded to a whole weight); with ``"global"`` one threshold is shared
    by all layers (unstructured only). ``{"type": "prune", "method": "magnitude", "sparsity": 0.5}``"""

    type: Literal["prune"] = "prune"
    method: Literal["magnitude"] = "magnitude"
    scope: Literal["layer", "global"] = Field(
        default="layer", description="rank weights within each layer, or across all layers"
    )

    @model_validator(mode="after")
    def _global_is_unstructured(self):
        if self.scope == "global" and self.pattern != "unstructured":
            raise ValueError("scope global applies to unstructured pruning only")
        return self


class PruneWanda(_Unstructured):
    """Wanda (Sun et al. 2023): drop the weights with the smallest ``|W| * ||x||``, the input
    activation norm measured on calibration data, compared within each output row.
    ``{"type": "prune", "method": "wanda", "sparsity": 0.5}`` or ``{"..., "pattern": "2:4"}``"""

    requires_calibration: ClassVar[bool] = True
    type: Literal["prune"] = "prune"
    method: Literal["wanda"] = "wanda"


class PruneSparseGPT(_Unstructured):
    """SparseGPT (Frantar & Alistarh 2023): one-shot pruning that updates the remaining
    weights with the inverse Hessian of the layer's calibration inputs, layer by layer.
    ``{"type": "prune", "method": "sparsegpt", "sparsity": 0.5, "block_size": 128}``"""

    requires_calibration: ClassVar[bool] = True
    type: Literal["prune"] = "prune"
    method: Literal["sparsegpt"] = "sparsegpt"
    block_size: int = Field(default=128, ge=1, le=4096, description="columns solved together")
    dampening: float = Field(default=0.01, gt=0.0, le=1.0, description="fraction of the mean Hessian diagonal added to it")


class PruneStructured(_StageConfig):
    """Remove whole attention heads, MLP neurons or decoder blocks ranked by importance on
    calibration data, and rewrite the config: the result is a smaller dense model, faster per
    token. ``{"type": "prune", "method": "structured", "sparsity": 0.25}`` removes a quarter of
    the heads and of the neurons of every block; ``"targets": ["layers"]`` a quarter of the
    blocks instead (the cut GPT-2 and OPT can express beyond neurons)."""

    requires_calibration: ClassVar[bool] = True
    type: Literal["prune"] = "prune"
    method: Literal["structured"] = "structured"
    sparsity: float = Field(gt=0.0, le=0.9, description="fraction of each target removed: of the heads and of the "
                                                        "MLP neurons of every block, of the blocks")
    targets: list[Literal["heads", "neurons", "layers"]] = Field(
        default_factory=lambda: ["heads", "neurons"], min_length=1,
        description="what may be removed: attention heads, MLP neurons, whole decoder blocks (layers)"
    )

    @field_validator("targets")
    @classmethod
    def _distinct_targets(cls, targets: list[str]) -> list[str]:
        if len(set(targets)) != len(targets):
            raise ValueError("targets must not repeat")
        return targets


class QuantizeRTN(_StageConfig):
    """Round-to-nearest weight-only quantization. ``group_size=None`` gives one scale per output
    channel; otherwise each row is split into groups of that many inputs (a partial last group
    is allowed). ``{"type": "quantize", "method": "rtn", "bits": 8}``"""

    type: Literal["quantize"] = "quantize"
    method: Literal["rtn"] = "rtn"
    bits: Literal[4, 8] = Field(default=8, description="bits per stored weight")
    group_size: int | None = Field(
        default=None, ge=8, le=65536, description="inputs per scale; null = per output channel"
    )
    symmetric: bool = Field(default=True, description="false adds a zero point per group")


class QuantizeGPTQ(_StageConfig):
    """GPTQ (Frantar et al. 2022): quantize column by column, spreading each rounding error
    over the columns not yet quantized with the inverse Hessian of the calibration inputs.
    ``{"type": "quantize", "method": "gptq", "bits": 4, "group_size": 128}``"""

    requires_calibration: ClassVar[bool] = True
    type: Literal["quantize"] = "quantize"
    method: Literal["gptq"] = "gptq"
    bits: Literal[4, 8] = Field(default=4, description="bits per stored weight")
    group_size: int | None = Field(default=128, ge=8, le=65536, description="inputs per scale; null = per output channel")
    symmetric: bool = True
    dampening: float = Field(default=0.01, gt=0.0, le=1.0, description="fraction of the mean Hessian diagonal added to it")
    act_order: bool = Field(default=False, description="quantize columns in order of decreasing Hessian diagonal")
    block_size: int = Field(default=128, ge=1, le=4096, description="columns updated together")


class QuantizeDynamicInt8(_StageConfig):
    """int8 weights (per output channel) and int8 activations quantized on the fly per token,
    for CPU serving (PyTorch's dynamic quantization).
    ``{"type": "quantize", "method": "dynamic_int8"}``"""

    type: Literal["quantize"] = "quantize"
    method: Literal["dynamic_int8"] = "dynamic_int8"


class DistillKD(_StageConfig):
    """Knowledge distillation: train a student to match the teacher's temperature-softened
    next-token distribution (KL, scaled by T^2), mixed with the language-model loss on the
    dataset by ``alpha``; optionally match hidden states too.

    The teacher is the job's input model (or ``teacher_model_id``). The student is the model
    as the earlier stages left it (recovery after pruning), or ``student_model_id``, or the
    teacher with only ``keep_layers`` (``"every_other"`` is DistilGPT2's recipe)::

        {"type": "distill", "method": "kd", "dataset_id": "ds_...", "keep_layers": "every_other",
         "steps": 500, "temperature": 2.0, "alpha": 0.5}
    """

    type: Literal["distill"] = "distill"
    method: Literal["kd"] = "kd"
    dataset_id: DatasetRef = Field(description="training text")
    teacher_model_id: ModelRef | None = Field(default=None, description="default: the job's input model")
    student_model_id: ModelRef | None = Field(default=None, description="an uploaded student")
    keep_layers: Literal["every_other", "first_half"] | list[int] | None = Field(
        default=None, description="make the student from the current model's layers"
    )
    temperature: float = Field(default=2.0, gt=0.0, le=100.0)
    alpha: float = Field(default=0.5, ge=0.0, le=1.0, description="weight of the KL term; 1 - alpha for the LM loss")
    hidden_loss_weight: float = Field(default=0.0, ge=0.0, le=100.0, description="weight of the matched hidden-state MSE")
    steps: int = Field(default=200, ge=1, le=1_000_000)
    batch_size: int = Field(default=8, ge=1, le=1024)
    seq_len: int = Field(default=128, ge=8, le=8192)
    learning_rate: float = Field(default=5e-4, gt=0.0, le=1.0)
    weight_decay: float = Field(default=0.01, ge=0.0, le=1.0)
    warmup_steps: int = Field(default=20, ge=0, le=1_000_000)
    max_grad_norm: float = Field(default=1.0, gt=0.0, le=1000.0)
    eval_every: int = Field(default=50, ge=1, le=1_000_000, description="evaluate, keep the best student")
    seed: int = Field(default=0, ge=0)

    @model_validator(mode="after")
    def _one_student(self):
        if self.student_model_id is not None and self.keep_layers is not None:
            raise ValueError("give student_model_id or keep_layers, not both")
        if isinstance(self.keep_layers, list) and (not self.keep_layers or min(self.keep_layers) < 0
                                                   or len(set(self.keep_layers)) != len(self.keep_layers)):
            raise ValueError("keep_layers must be distinct non-negative layer indices")
        return self


STAGE_CONFIGS: tuple[type[_StageConfig], ...] = (
    PruneRandom, PruneMagnitude, PruneWanda, PruneSparseGPT, PruneStructured,
    DistillKD,
    QuantizeRTN, QuantizeGPTQ, QuantizeDynamicInt8,
)


def stage_name(stage: BaseModel) -> str:
    """``"prune.magnitude"`` for a PruneMagnitude config: the name used in progress and metrics."""
    return f"{stage.type}.{stage.method}"  # type: ignore[attr-defined]


STAGE_TAGS: frozenset[str] = frozenset(
    f"{c.model_fields['type'].default}.{c.model_fields['method'].default}" for c in STAGE_CONFIGS
)


def _stage_tag(value: Any) -> str | None:
    if isinstance(value, dict):
        return f"{value.get('type')}.{value.get('method')}"
    if isinstance(value, BaseModel):
        return stage_name(value)
    return None


Stage = Annotated[
    Union[tuple(Annotated[c, Tag(f"{c.model_fields['type'].default}.{c.model_fields['method'].default}")] for c in STAGE_CONFIGS)],  # noqa: E501
    Discriminator(
        _stage_tag,
        custom_error_type="unknown_stage",
        custom_error_message=(
            "unknown stage: 'type' and 'method' must be one of " + ", ".join(sorted(STAGE_TAGS))
        ),
    ),
]


# ---------------------------------------------------------------------------------------------
# The job


def _check_metadata(value: dict[str, str]) -> dict[str, str]:
    if len(value) > 50:
        raise ValueError("at most 50 metadata keys")
    for key, item in value.items():
        if not key or len(key) > 40 or len(item) > 500:
            raise ValueError("metadata keys are 1-40 characters, values at most 500")
        if has_nul(key) or has_nul(item):
            raise ValueError("metadata must not contain NUL bytes")
    return value


# A free map of the client's own labels, filterable in lists (Stripe's convention).
Metadata = Annotated[dict[str, str], AfterValidator(_check_metadata)]


class CalibrationSpec(RequestModel):
    """Text the data-aware methods look at. Sampling is deterministic given ``seed``."""

    dataset_id: DatasetRef
    samples: int = Field(default=128, ge=1, le=4096, description="number of sequences")
    seq_len: int = Field(default=512, ge=8, le=8192, description="tokens per sequence")
    seed: int = Field(default=0, ge=0)


class EvaluationSpec(RequestModel):
    """Perplexity before and after, by a sliding window over the dataset's text."""

    dataset_id: DatasetRef
    seq_len: int | None = Field(
        default=None, ge=8, le=8192, description="window; default the model's context, at most 1024"
    )
    stride: int | None = Field(
        default=None, ge=1, le=8192, description="tokens the window moves; default seq_len / 2"
    )
    max_tokens: int = Field(
        default=65536, ge=16, le=10_000_000, description="evaluate at most this many tokens"
    )

    @model_validator(mode="after")
    def _stride_within_window(self) -> "EvaluationSpec":
        if self.stride is not None and self.seq_len is not None and self.stride > self.seq_len:
            raise ValueError("stride must not exceed seq_len")
        return self


class OutputSpec(RequestModel):
    """How the artifact is written. ``auto``: compressed-tensors when a stage quantized the
    weights (the artifact is really smaller), dense safetensors otherwise."""

    format: Literal["auto", "dense", "compressed-tensors"] = "auto"
    max_shard_size: str = Field(
        "5GB", pattern=r"^\d+(\.\d+)?\s*(B|KB|MB|GB|TB|KiB|MiB|GiB|TiB)$",
        description="largest weights file of the artifact (e.g. \"5GB\", \"500MiB\"); a larger model "
                    "is written as several shards with a model.safetensors.index.json")

    @property
    def max_shard_bytes(self) -> int:
        number, unit = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(\w+)", self.max_shard_size).groups()
        return int(float(number) * _BYTE_UNITS[unit])


_BYTE_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40}


WEBHOOK_EVENTS = ("job.queued", "job.running", "job.succeeded", "job.failed", "job.cancelled",
                  "job.stage", "job.progress", "job.metric", "job.warning", "job.error")


WEBHOOK_URL_MAX_CHARS = 2000  # the column's size
WEBHOOK_SECRET_MIN_BYTES, WEBHOOK_SECRET_MAX_BYTES = 16, 64


def _webhook_url_allowed(url: AnyHttpUrl) -> AnyHttpUrl:
    # The URL as stored (normalised: punycode, percent-escapes), which can be longer than typed.
    if len(str(url)) > WEBHOOK_URL_MAX_CHARS:
        raise ValueError(f"URL must be at most {WEBHOOK_URL_MAX_CHARS} characters")
    from app.webhooks import check_submitted_url  # the dispatcher's own rule, checked at every attempt too

    check_submitted_url(url)
    return url


def _webhook_secret_decodes(secret: str) -> str:
    try:
        key = base64.b64decode(secret.removeprefix("whsec_"), validate=True)
    except binascii.Error:
        raise ValueError("secret must be whsec_ followed by valid base64") from None
    if not WEBHOOK_SECRET_MIN_BYTES <= len(key) <= WEBHOOK_SECRET_MAX_BYTES:
        raise ValueError(f"secret must encode {WEBHOOK_SECRET_MIN_BYTES} to {WEBHOOK_SECRET_MAX_BYTES} "
                         f"bytes, this one encodes {len(key)}")
    return secret


class WebhookSpec(RequestModel):
    """Where to announce the job's events, signed the Standard Webhooks way: headers
    ``webhook-id``, ``webhook-timestamp`` and ``webhook-signature: v1,<base64 HMAC-SHA256 of
    "{id}.{timestamp}.{body}" keyed by the base64-decoded part of the secret after "whsec_">``.
    The secret is yours; it is stored to sign and never shown again."""

    url: Annotated[AnyHttpUrl, AfterValidator(_webhook_url_allowed)] = Field(
        description="http(s) URL of a receiver on a public address (an operator may allow "
                    "listed private networks); at most 2000 characters")
    events: list[Literal[WEBHOOK_EVENTS]] = Field(  # type: ignore[valid-type]
        default_factory=lambda: ["job.succeeded", "job.failed", "job.cancelled"], min_length=1
    )
    secret: Annotated[str, AfterValidator(_webhook_secret_decodes)] = Field(
        max_length=6 + 4 * (WEBHOOK_SECRET_MAX_BYTES + 2) // 3,
        pattern=r"^whsec_[A-Za-z0-9+/]+={0,2}$",
        description=f"whsec_ + base64 of {WEBHOOK_SECRET_MIN_BYTES} to {WEBHOOK_SECRET_MAX_BYTES} random bytes")


class JobSpec(RequestModel):
    """What a client posts to ``POST /v1/jobs``."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "model_id": "mdl_0123456789abcdef0123456789abcdef",
                    "stages": [
                        {"type": "prune", "method": "magnitude", "sparsity": 0.5},
                        {"type": "quantize", "method": "rtn", "bits": 8},
                    ],
                    "evaluation": {"dataset_id": "ds_0123456789abcdef0123456789abcdef"},
                }
            ]
        },
    )

    model_id: ModelRef
    stages: list[Stage] = Field(min_length=1, max_length=16)
    calibration: CalibrationSpec | None = Field(default=None, validate_default=True)
    evaluation: EvaluationSpec | None = None
    output: OutputSpec = Field(default_factory=OutputSpec)
    webhook: WebhookSpec | None = None
    metadata: Metadata = Field(default_factory=dict, description="your own labels, e.g. {\"team\": \"search\"}")

    @field_validator("output", mode="after")
    @classmethod
    def _compressed_needs_quantization(cls, output: OutputSpec, info: ValidationInfo) -> OutputSpec:
        # Current transformers reads compressed-tensors' integer layers, but loads its sparse
        # layouts with random weights: a pruned-only artifact is written dense instead.
        stages = info.data.get("stages", [])
        if output.format == "compressed-tensors" and not any(s.type == "quantize" for s in stages):
            raise ValueError("compressed-tensors output needs a quantize stage; pruned-only models are "
                             "written dense (use format auto or dense)")
        return output

    @field_validator("calibration", mode="after")
    @classmethod
    def _calibration_when_needed(cls, calibration, info: ValidationInfo):
        # A field validator (not a model one) so that the error names the field: calibration.
        if calibration is None:
            needing = [stage_name(s) for s in info.data.get("stages", []) if s.requires_calibration]
            if needing:
                raise ValueError(f"{', '.join(needing)} needs calibration data: add a calibration section")
        return calibration

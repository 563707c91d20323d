"""The job spec: defined once, used by the route that validates it, the task that runs it and
the OpenAPI schema that clients build forms from.

A stage is chosen by the pair ``(type, method)``; each pair has its own config model, so a
method's fields and limits are written in exactly one place. A job that prunes half of every
layer's weights by magnitude, then stores them as int8::

    {"model_id": "mdl_0123...",
     "stages": [{"type": "prune", "method": "magnitude", "sparsity": 0.5},
                {"type": "quantize", "method": "rtn", "bits": 8}],
     "evaluation": {"dataset_id": "ds_0123..."}}

Adding a method: write its config class here, add it to ``STAGE_CONFIGS``, and register a
handler for it in ``worker/engine``.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, model_validator


class _Strict(BaseModel):
    # A misspelt field is an error, not a silently ignored default.
    model_config = ConfigDict(extra="forbid")


# ---------------------------------------------------------------------------------------------
# Stages


class PruneRandom(_Strict):
    """Zero a random ``sparsity`` fraction of each layer's weights: the baseline every other
    pruning method must beat. ``{"type": "prune", "method": "random", "sparsity": 0.5, "seed": 0}``"""

    type: Literal["prune"] = "prune"
    method: Literal["random"] = "random"
    sparsity: float = Field(gt=0.0, lt=1.0, description="fraction of weights set to zero")
    seed: int = Field(default=0, ge=0, description="makes the choice of weights reproducible")


class PruneMagnitude(_Strict):
    """Zero the weights of smallest absolute value. With ``scope="layer"`` every layer gets
    exactly ``sparsity`` (rounded to a whole weight); with ``"global"`` one threshold is shared
    by all layers. ``{"type": "prune", "method": "magnitude", "sparsity": 0.5}``"""

    type: Literal["prune"] = "prune"
    method: Literal["magnitude"] = "magnitude"
    sparsity: float = Field(gt=0.0, lt=1.0, description="fraction of weights set to zero")
    scope: Literal["layer", "global"] = Field(
        default="layer", description="rank weights within each layer, or across all layers"
    )


class QuantizeRTN(_Strict):
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


STAGE_CONFIGS: tuple[type[_Strict], ...] = (PruneRandom, PruneMagnitude, QuantizeRTN)


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


class CalibrationSpec(_Strict):
    """Text the data-aware methods look at. Sampling is deterministic given ``seed``."""

    dataset_id: str
    samples: int = Field(default=128, ge=1, le=4096, description="number of sequences")
    seq_len: int = Field(default=512, ge=8, le=8192, description="tokens per sequence")
    seed: int = Field(default=0, ge=0)


class EvaluationSpec(_Strict):
    """Perplexity before and after, by a sliding window over the dataset's text."""

    dataset_id: str
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


class OutputSpec(_Strict):
    """How the artifact is written. ``auto``: compressed-tensors when a stage quantized the
    weights (the artifact is really smaller), dense safetensors otherwise."""

    format: Literal["auto", "dense", "compressed-tensors"] = "auto"


class JobSpec(_Strict):
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

    model_id: str = Field(min_length=1, max_length=64)
    stages: list[Stage] = Field(min_length=1, max_length=16)
    calibration: CalibrationSpec | None = None
    evaluation: EvaluationSpec | None = None
    output: OutputSpec = Field(default_factory=OutputSpec)


def parse_stages(raw: list[dict[str, Any]]) -> list[BaseModel]:
    """Re-read stored stages into their config models (the worker's side of the spec)."""
    return JobSpec.model_validate({"model_id": "x", "stages": raw}).stages

"""The per-job compute budget: how many tokens a job's spec makes a worker push through the
model, bounded by ``SQUEEZE_MAX_JOB_TOKENS`` so that no single spec can pin a worker for hours.

Each field a client can raise within its own limits (4096 calibration samples of 8192 tokens,
an evaluation stride of 1 over 10 M tokens, a million distillation steps) is harmless alone on a
tiny model and ruinous together on a large one; the operator bounds their sum::

    calibration   samples x seq_len, once per data-aware stage
    evaluation    windows (max_tokens / stride) x seq_len, before and after compression
    distillation  steps x batch_size x seq_len, per distillation stage

>>> job_tokens(JobSpec.model_validate({..., "evaluation": {"dataset_id": "ds_...", "stride": 1,
...     "max_tokens": 10_000_000}}), context_length=1024)["evaluation"]
20480000000
"""

from __future__ import annotations

import math

from app.errors import APIError
from app.specs import DistillKD, EvaluationSpec, JobSpec

# The engine's defaults for an evaluation window (worker/engine/compress.py).
DEFAULT_EVALUATION_WINDOW = 1024


def evaluation_window(evaluation: EvaluationSpec, context_length: int | None) -> tuple[int, int]:
    """``(seq_len, stride)`` as the engine resolves them: the model's context up to 1024
    tokens, and half a window."""
    seq_len = evaluation.seq_len or min(context_length or DEFAULT_EVALUATION_WINDOW, DEFAULT_EVALUATION_WINDOW)
    return seq_len, evaluation.stride or max(1, seq_len // 2)


def job_tokens(spec: JobSpec, context_length: int | None) -> dict[str, int]:
    """The tokens each part of the job runs through a model, by the spec field that sets them
    (``calibration``, ``evaluation``, ``stages.N``). An upper bound: texts may be shorter."""
    terms: dict[str, int] = {}
    calibrated = sum(1 for stage in spec.stages if stage.requires_calibration)
    if spec.calibration is not None:
        terms["calibration"] = spec.calibration.samples * spec.calibration.seq_len * max(1, calibrated)
    if spec.evaluation is not None:
        seq_len, stride = evaluation_window(spec.evaluation, context_length)
        windows = math.ceil(spec.evaluation.max_tokens / stride)
        terms["evaluation"] = 2 * windows * seq_len  # before and after
    for index, stage in enumerate(spec.stages):
        if isinstance(stage, DistillKD):
            terms[f"stages.{index}"] = stage.steps * stage.batch_size * stage.seq_len
    return terms


# The field a client lowers to shrink each term.
def _param(term: str, spec: JobSpec) -> str:
    if term == "calibration":
        return "calibration.samples"
    if term == "evaluation":
        return "evaluation.stride" if spec.evaluation.stride is not None else "evaluation.max_tokens"
    return f"{term}.steps"


def check_compute_budget(spec: JobSpec, context_length: int | None, max_tokens: int | None) -> None:
    """A 422 naming the largest term's field when the job's tokens exceed ``max_tokens``."""
    terms = job_tokens(spec, context_length)
    total = sum(terms.values())
    if max_tokens is None or total <= max_tokens:
        return
    term, size = max(terms.items(), key=lambda item: item[1])
    parts = ", ".join(f"{name} {count:,}" for name, count in terms.items())
    raise APIError(
        f"this job would run {total:,} tokens through the model ({parts}), more than the {max_tokens:,} "
        f"one job may (SQUEEZE_MAX_JOB_TOKENS); the largest part is {term} ({size:,}): lower {_param(term, spec)}",
        param=_param(term, spec), status_code=422)

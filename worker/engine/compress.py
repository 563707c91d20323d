"""The engine's one entry point: a checkpoint folder and a job spec in, an artifact folder and
the job's metrics out. The Celery task and the benchmark both call it::

    artifact_dir, metrics = compress(Path("models/mdl_1"), spec, Path("staging"), hooks=hooks)
    # artifact_dir: staging/model, a folder transformers loads
    # metrics: {"before": {...}, "after": {...}, "stages": [...], "evaluation": {...} or None,
    #           "export": {"format": "compressed-tensors", ...}, "device": "cpu", "wall_time_s": 9.1}

It runs these phases, each named in the job's progress: ``load``, ``evaluate.before``, one per
stage (``prune.magnitude``...), ``export``, ``evaluate.after`` (the two ``evaluate`` phases only
when the spec has an ``evaluation`` section). It knows nothing of databases or brokers: what it
reports and what it needs from outside (cancel requests, uploaded datasets and models) goes
through ``JobHooks``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from transformers import AutoConfig, AutoTokenizer

from app.specs import JobSpec, stage_name
from worker import evaluate
from worker.engine import calibration as calib
from worker.engine.blockwise import Measure, blockwise_refusal, compress_blockwise
from worker.engine.export import resolve_format, write_checkpoint
from worker.engine.loading import load_model
from worker.engine.pipeline import run_pipeline
from worker.engine.registry import EngineContext
from worker.engine.streaming import compress_streaming, streaming_refusal


class JobHooks(Protocol):
    """What ``compress`` tells its caller and asks of it. These defaults report nothing, never
    cancel and know no dataset or model: a benchmark subclasses it and overrides what it needs;
    the task implements it all (``worker/tasks.py``, without importing this module)."""

    def phase_started(self, name: str, stage_index: int | None, progress: float) -> None:
        """Phase ``name`` starts (``stage_index``: its place in ``spec.stages``, for a stage);
        ``progress`` is the job's overall fraction done."""

    def progress(self, fraction: float) -> None:
        """The job's overall fraction done, often (every layer): throttle what you store."""

    def event(self, type: str, message: str, **data: Any) -> None:
        """A line for the job's log, e.g. ``("metric", "perplexity before: 31.2", perplexity_before=31.2)``."""

    def should_cancel(self) -> bool:
        """Asked between layers and steps: True stops the job with ``JobCancelled``."""
        return False

    def dataset_file(self, dataset_id: str) -> Path:
        """The text file of an uploaded dataset (calibration, evaluation, distillation)."""
        raise LookupError(f"dataset {dataset_id!r} is unknown")

    def model_dir(self, model_id: str) -> Path:
        """The checkpoint folder of an uploaded model (a teacher or a student)."""
        raise LookupError(f"model {model_id!r} is unknown")


class _NoHooks(JobHooks):
    pass


@dataclass(frozen=True)
class Phase:
    name: str
    stage_index: int | None = None  # for a stage: its place in spec.stages (names may repeat)


class Phases:
    """The job's phases in order, for one overall progress figure."""

    def __init__(self, spec: JobSpec):
        evaluated = spec.evaluation is not None
        self.order = (
            [Phase("load")]
            + ([Phase("evaluate.before")] if evaluated else [])
            + [Phase(stage_name(stage), index) for index, stage in enumerate(spec.stages)]
            + [Phase("export")]
            + ([Phase("evaluate.after")] if evaluated else [])
        )
        self.current = 0

    def enter(self, name: str, stage_index: int | None = None) -> float:
        """Make phase ``name`` the current one; return the overall fraction done at its start."""
        self.current = self.order.index(Phase(name, stage_index))
        return self.fraction(0.0)

    def fraction(self, within: float) -> float:
        """The overall fraction done when the current phase is ``within`` done."""
        return min(1.0, (self.current + max(0.0, min(1.0, within))) / len(self.order))


def compress(
    source_dir: Path,
    spec: JobSpec,
    work_dir: Path,
    *,
    device: torch.device | str = "auto",
    hooks: JobHooks | None = None,
) -> tuple[Path, dict[str, Any]]:
    """Run ``spec``'s stages on the checkpoint in ``source_dir`` and write the artifact to
    ``work_dir / "model"``; return that folder and the metrics. Raises ``JobCancelled`` when
    ``hooks.should_cancel()`` turns true. ``device="auto"``: the GPU if there is one; on a GPU
    the metrics hold ``device_peak_bytes`` and a device out of memory raises
    ``DeviceOutOfMemory`` naming the block."""
    hooks = hooks or _NoHooks()
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type != "cuda":
        return _compress(Path(source_dir), spec, Path(work_dir), device, hooks)
    torch.cuda.reset_peak_memory_stats(device)
    try:
        artifact_dir, metrics = _compress(Path(source_dir), spec, Path(work_dir), device, hooks)
        metrics["device_peak_bytes"] = torch.cuda.max_memory_allocated(device)
        return artifact_dir, metrics
    finally:
        # The next job on this worker starts with the device as empty as this one found it.
        torch.cuda.empty_cache()


def _compress(source_dir: Path, spec: JobSpec, work_dir: Path, device: torch.device,
              hooks: JobHooks) -> tuple[Path, dict[str, Any]]:
    phases = Phases(spec)
    started = time.monotonic()

    def enter(name: str, stage_index: int | None = None) -> None:
        hooks.phase_started(name, stage_index, phases.enter(name, stage_index))

    # Resolved first: a dataset deleted since the job was accepted fails it before any work.
    calibration_file = hooks.dataset_file(spec.calibration.dataset_id) if spec.calibration else None
    evaluation = spec.evaluation
    evaluation_file = hooks.dataset_file(evaluation.dataset_id) if evaluation else None

    enter("load")
    needs_text = bool(spec.calibration or evaluation) or any(getattr(s, "dataset_id", None) for s in spec.stages)
    tokenizer = (AutoTokenizer.from_pretrained(source_dir, local_files_only=True, trust_remote_code=False)
                 if needs_text else None)
    config = AutoConfig.from_pretrained(source_dir, local_files_only=True, trust_remote_code=False)
    context = getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", 1024)
    latency_len = min(128, context)
    eval_ids = eval_window = stride = None
    if evaluation:
        eval_ids = calib.token_stream(tokenizer, calib.read_texts(evaluation_file), max_tokens=evaluation.max_tokens)
        eval_window = evaluation.seq_len or min(context, 1024)
        stride = evaluation.stride or max(1, eval_window // 2)
    batches = None
    if spec.calibration:
        batches = calib.calibration_batches(tokenizer, calib.read_texts(calibration_file), spec.calibration.samples,
                                            spec.calibration.seq_len, spec.calibration.seed)
    ctx = EngineContext(device=device, calibration=batches,
                        on_progress=lambda within: hooks.progress(phases.fraction(within)),
                        should_cancel=hooks.should_cancel, tokenizer=tokenizer,
                        resolve_dataset=hooks.dataset_file, resolve_model=hooks.model_dir,
                        source_model_dir=source_dir)
    evaluation_info = ({"dataset_id": evaluation.dataset_id, "tokens": int(eval_ids.numel()),
                        "seq_len": eval_window, "stride": stride} if evaluation else None)
    artifact_dir = work_dir / "model"

    whole_model_reason = blockwise_refusal(source_dir, spec)
    if whole_model_reason is None:
        # One decoder block in memory at a time: stages, export and measurements in one pass.
        if evaluation:
            enter("evaluate.before")
        result = compress_blockwise(
            source_dir, spec, artifact_dir, ctx,
            measure=Measure(eval_ids, eval_window or 0, stride or 0, latency_len),
            on_stage_start=lambda index, name: enter(name, index))
        before = {**evaluate.checkpoint_stats(source_dir), **result.before}
        after = {**evaluate.checkpoint_stats(artifact_dir), **result.after}
        if evaluation:
            hooks.event("metric", f"perplexity before: {before['perplexity']:.4g}", perplexity_before=before["perplexity"])
        hooks.event("metric", "stages finished", stages=result.stage_metrics)
        enter("export")
        if evaluation:
            enter("evaluate.after")
            hooks.event("metric", f"perplexity after: {after['perplexity']:.4g}", perplexity_after=after["perplexity"])
        ctx.check_cancelled()
        return artifact_dir, {
            "before": before, "after": after, "stages": result.stage_metrics, "evaluation": evaluation_info,
            "export": result.export_info, "device": str(device), "onloading": "block",
            "wall_time_s": round(time.monotonic() - started, 3)}

    hooks.event("warning", f"the model is held whole: {whole_model_reason}", onloading="whole")
    model = load_model(source_dir, device)
    before = {**evaluate.checkpoint_stats(source_dir), **_measure(model, latency_len, device)}

    if evaluation:
        enter("evaluate.before")
        before["perplexity"] = evaluate.perplexity(model, eval_ids, eval_window, stride, device)
        hooks.event("metric", f"perplexity before: {before['perplexity']:.4g}", perplexity_before=before["perplexity"])

    if streaming_refusal(source_dir, spec) is None:
        # Data-free stages only: one read of the checkpoint and one write of the artifact,
        # tensor by tensor, stages and export in one pass (streaming.py); no model needed.
        del model
        stage_metrics, export_info = compress_streaming(source_dir, spec, artifact_dir, ctx,
                                                        on_stage_start=lambda index, name: enter(name, index))
        hooks.event("metric", "stages finished", stages=stage_metrics)
        enter("export")
    else:
        stage_metrics = run_pipeline(model, spec.stages, ctx,
                                     on_stage_start=lambda index, name: enter(name, index))
        hooks.event("metric", "stages finished", stages=stage_metrics)

        enter("export")
        fmt = resolve_format(spec.output.format, ctx)
        export_info = write_checkpoint(ctx.model, ctx, artifact_dir, fmt, source_dir,
                                       max_shard_bytes=spec.output.max_shard_bytes)
        del model
        ctx.model = None  # the artifact is what gets measured from here on

    if evaluation:
        enter("evaluate.after")
    artifact = load_model(artifact_dir, device)
    after = {**evaluate.checkpoint_stats(artifact_dir), **_measure(artifact, latency_len, device)}
    if evaluation:
        after["perplexity"] = evaluate.perplexity(artifact, eval_ids, eval_window, stride, device)
        hooks.event("metric", f"perplexity after: {after['perplexity']:.4g}", perplexity_after=after["perplexity"])
    ctx.check_cancelled()

    metrics = {
        "before": before,
        "after": after,
        "stages": stage_metrics,
        "evaluation": evaluation_info,
        "export": export_info,
        "device": str(device),
        "onloading": "whole",
        "whole_model_reason": whole_model_reason,
        "wall_time_s": round(time.monotonic() - started, 3),
    }
    return artifact_dir, metrics


def _measure(model, latency_len: int, device: torch.device) -> dict[str, Any]:
    return {**evaluate.weight_stats(model),
            "latency_ms_per_token": evaluate.latency_ms_per_token(model, latency_len, model.config.vocab_size, device)}

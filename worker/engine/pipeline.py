"""Runs a job's stages in order over one model in memory.

Each stage's handler is looked up by its config class in the registry (``registry.py``), so
adding a method never touches this file::

    ctx = EngineContext(device=torch.device("cpu"), on_progress=report, should_cancel=cancelled)
    metrics = run_pipeline(model, [PruneMagnitude(sparsity=0.5), QuantizeRTN(bits=8)], ctx)
    # [{"name": "prune.magnitude", "layers": 48, "sparsity": 0.5, "wall_time_s": 0.8},
    #  {"name": "quantize.rtn", "layers": 48, "bits": 8, ..., "wall_time_s": 1.9}]
"""

from __future__ import annotations

import time
from typing import Any, Callable

import torch
from pydantic import BaseModel
from torch import nn

from app.specs import stage_name
from worker.engine.registry import EngineContext, handler_for


def run_pipeline(
    model: nn.Module,
    stages: list[BaseModel],
    ctx: EngineContext,
    on_stage_start: Callable[[int, str], None] | None = None,
) -> list[dict[str, Any]]:
    """Run ``stages`` in order on ``model`` (changed in place); return each stage's metrics with
    its ``name`` and ``wall_time_s``. Raises ``JobCancelled`` if the job is cancelled.

    The model at the end is ``ctx.model``: the same object unless a stage replaced it."""
    handlers = [handler_for(stage) for stage in stages]  # fail before any work is done
    ctx.model = model
    results = []
    for index, (stage, handler) in enumerate(zip(stages, handlers)):
        name = stage_name(stage)
        if on_stage_start is not None:
            on_stage_start(index, name)
        ctx.check_cancelled()
        started = time.perf_counter()
        with torch.no_grad():  # a training stage turns gradients back on for itself
            metrics = handler(ctx.model, stage, ctx)
        ctx.on_progress(1.0)
        results.append({"name": name, **metrics, "wall_time_s": time.perf_counter() - started})
    return results

"""Runs a job's stages in order over one model in memory.

Each method registers a handler for its config class (from ``app/specs.py``); the pipeline
looks the handler up by ``type(config)``, so adding a method never touches this file::

    ctx = EngineContext(device=torch.device("cpu"), on_progress=report, should_cancel=cancelled)
    metrics = run_pipeline(model, [PruneMagnitude(sparsity=0.5), QuantizeRTN(bits=8)], ctx)
    # [{"name": "prune.magnitude", "layers": 48, "sparsity": 0.5, "wall_time_s": 0.8},
    #  {"name": "quantize.rtn", "layers": 48, "bits": 8, ..., "wall_time_s": 1.9}]

A handler is ``handler(model, config, ctx) -> dict`` and returns its stage's metrics. State
that later stages or the export need travels in the context: the keep-masks written by pruning
(so quantization keeps the zeros) and the quantized weights (so the export can pack them).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch
from pydantic import BaseModel
from torch import nn

from app.specs import stage_name

if TYPE_CHECKING:
    from worker.engine.quantize.rtn import QuantizedWeight


class JobCancelled(Exception):
    """Raised between layers when ``should_cancel()`` says the job was cancelled."""


def _ignore_progress(fraction: float) -> None:
    pass


def _never_cancel() -> bool:
    return False


@dataclass
class EngineContext:
    """What the stages share: where to compute, the calibration text, the hooks back to the
    task, and what earlier stages left behind."""

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    calibration: list[torch.Tensor] | None = None  # token ids, each [1, seq_len]
    on_progress: Callable[[float], None] = _ignore_progress  # fraction of the current stage
    should_cancel: Callable[[], bool] = _never_cancel
    masks: dict[str, torch.Tensor] = field(default_factory=dict)  # layer name -> keep-mask
    quantized: dict[str, "QuantizedWeight"] = field(default_factory=dict)  # layer name -> q
    # The model the stages work on. A stage that builds a new one (a distilled student, a
    # structurally pruned copy) assigns it here; the next stage and the export take it.
    model: nn.Module | None = None
    # What distillation needs beyond the model: text and other uploaded models.
    tokenizer: Any = None
    resolve_dataset: Callable[[str], Path] | None = None  # dataset id -> its text file
    resolve_model: Callable[[str], Path] | None = None  # model id -> its checkpoint folder
    source_model_dir: Path | None = None  # the job's input model (the default teacher)

    def check_cancelled(self) -> None:
        if self.should_cancel():
            raise JobCancelled()

    def step(self, done: int, total: int) -> None:
        """Call before each of ``total`` units of work (usually layers): reports ``done/total``
        of the stage and stops the job there if it was cancelled."""
        self.on_progress(done / total if total else 1.0)
        self.check_cancelled()


Handler = Callable[[nn.Module, Any, EngineContext], dict[str, Any]]
_HANDLERS: dict[type, Handler] = {}


def register(config_type: type[BaseModel]) -> Callable[[Handler], Handler]:
    """Make ``handler`` the one that runs stages configured by ``config_type``::

        @register(PruneMagnitude)
        def prune_magnitude(model, config, ctx) -> dict: ...
    """

    def decorate(handler: Handler) -> Handler:
        if config_type in _HANDLERS:
            raise ValueError(f"{config_type.__name__} already has a handler")
        _HANDLERS[config_type] = handler
        return handler

    return decorate


def handler_for(config: BaseModel) -> Handler:
    try:
        return _HANDLERS[type(config)]
    except KeyError:
        known = ", ".join(sorted(c.__name__ for c in _HANDLERS))
        raise TypeError(f"no engine handler for {type(config).__name__} (known: {known})") from None


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


# The method modules register their handlers when imported. They import `register` and
# `EngineContext` from this module, defined above, so the import cycle resolves whichever side
# is imported first (tests/worker/engine/test_pipeline.py checks each).
from worker.engine.prune import magnitude as _magnitude  # noqa: E402, F401
from worker.engine.prune import random as _random  # noqa: E402, F401
from worker.engine.quantize import rtn as _rtn  # noqa: E402, F401
from worker.engine.prune import structured as _structured  # noqa: E402, F401
from worker.engine.distill import train as _distill  # noqa: E402, F401
from worker.engine.quantize import dynamic as _dynamic  # noqa: E402, F401
from worker.engine.prune import wanda as _wanda  # noqa: E402, F401
from worker.engine.prune import sparsegpt as _sparsegpt  # noqa: E402, F401
from worker.engine.quantize import gptq as _gptq  # noqa: E402, F401

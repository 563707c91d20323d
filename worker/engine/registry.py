"""Stage handlers by config class: the table, how a method joins it, and what handlers share.

This module imports no method. Each method module registers its own handler::

    @register(PruneMagnitude)
    def prune_magnitude(model, config, ctx) -> dict: ...

and is found by discovery: the first lookup imports every module of every family package
(``prune/``, ``quantize/``, ``distill/``, ...) under each of ``METHOD_PACKAGES``, so that their
``@register`` lines run (llm-compressor's ``ModifierFactory`` walks its package the same way).
Adding a method is its config class in ``app/specs.py`` and one file in a family package.

A handler is ``handler(model, config, ctx) -> dict`` and returns its stage's metrics. State
that later stages or the export need travels in the context: the keep-masks written by pruning
(so quantization keeps the zeros) and the quantized weights (so the export can pack them).
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Protocol

import torch
from pydantic import BaseModel
from torch import nn

if TYPE_CHECKING:
    from worker.engine.quantize.rtn import QuantizedWeight


class JobCancelled(Exception):
    """Raised between layers when ``should_cancel()`` says the job was cancelled."""


class DeviceOutOfMemory(MemoryError):
    """The compute device (a GPU) ran out of memory; the message names the block being worked
    on and the device's numbers, so that the job's error says what did not fit where."""


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


class LayerStep(Protocol):
    """One stage's work on the layers of one decoder block, for the engine that holds one block
    at a time (``blockwise.py``). A data-aware method's statistic is filled from a layer's
    inputs while its block runs on the calibration batches (``capture.py``)::

        step = factory(config, ctx)
        for layer in block_layers:                     # every block in turn
            step.compress(layer, statistics[layer.name])
        metrics = step.metrics()                       # as the stage's handler reports them

    A step keeps its metrics as counts: nothing of a block is kept once the block is written."""

    needs_calibration: bool

    def statistic(self, layer: Any) -> Any:
        """The empty statistic of ``layer`` (only when ``needs_calibration``)."""

    def compress(self, layer: Any, statistic: Any) -> None:
        """Change ``layer``'s weight (``statistic`` is None for a data-free step)."""

    def metrics(self) -> dict[str, Any]:
        """The stage's metrics over every layer compressed so far."""


StepFactory = Callable[[Any, EngineContext], "LayerStep | None"]
_STEPS: dict[type, StepFactory] = {}


def register_step(config_type: type[BaseModel]) -> Callable[[StepFactory], StepFactory]:
    """Make ``factory(config, ctx)`` the layer step of stages configured by ``config_type``
    (None from it: this configuration needs the whole model, e.g. a global threshold)."""
    return _registrar(_STEPS, config_type, "a layer step")


def layer_step(config: BaseModel, ctx: EngineContext) -> LayerStep | None:
    """The layer step of a stage, or None when its method works only on the whole model."""
    discover()
    factory = _STEPS.get(type(config))
    return factory(config, ctx) if factory is not None else None

# Packages whose family subpackages hold the methods. A test adds its own toy package here.
METHOD_PACKAGES: list[str] = ["worker.engine"]
_DISCOVERED: set[str] = set()


def register(config_type: type[BaseModel]) -> Callable[[Handler], Handler]:
    """Make ``handler`` the one that runs stages configured by ``config_type``::

        @register(PruneMagnitude)
        def prune_magnitude(model, config, ctx) -> dict: ...
    """

    return _registrar(_HANDLERS, config_type, "a handler")


def _registrar(table: dict[type, Any], config_type: type, what: str) -> Callable[[Any], Any]:
    """A decorator putting its function in ``table`` under ``config_type``, once."""

    def decorate(function: Any) -> Any:
        if config_type in table:
            raise ValueError(f"{config_type.__name__} already has {what}")
        table[config_type] = function
        return function

    return decorate


def discover() -> None:
    """Import every module of the family packages (the subpackages of each of
    ``METHOD_PACKAGES``) not imported yet, so that their ``@register`` decorators have run."""
    for root_name in METHOD_PACKAGES:
        if root_name in _DISCOVERED:
            continue
        root = importlib.import_module(root_name)
        for family in pkgutil.iter_modules(root.__path__, prefix=f"{root_name}."):
            if not family.ispkg:
                continue  # the engine's own modules (pipeline, export...): no methods there
            package = importlib.import_module(family.name)
            for module in pkgutil.walk_packages(package.__path__, prefix=f"{family.name}."):
                importlib.import_module(module.name)
        _DISCOVERED.add(root_name)


def handlers() -> dict[type, Handler]:
    """Every registered handler by its config class (discovered first)."""
    discover()
    return dict(_HANDLERS)


def handler_for(config: BaseModel) -> Handler:
    known = handlers()
    try:
        return known[type(config)]
    except KeyError:
        names = ", ".join(sorted(c.__name__ for c in known))
        raise TypeError(f"no engine handler for {type(config).__name__} (known: {names})") from None

"""A job with one decoder block in memory: every stage, the export and the before/after
measurements in one pass over the blocks.

For jobs whose stages all work layer by layer (``registry.LayerStep``: Wanda, SparseGPT, GPTQ,
and the data-free methods but a global magnitude threshold), the model is never whole
anywhere. ``onload.OnloadedModel`` keeps the model on ``meta`` but for what lies outside the
blocks; then, block after block::

    onload block i (read from the checkpoint, its dtype)
      ├─ measure it as uploaded: weights, latency, the evaluation windows through it ("before")
      ├─ each stage in turn: calibrate on the block's inputs, compress its layers
      ├─ write its tensors to the artifact's shards
      ├─ measure it as compressed: weights, latency, the evaluation windows ("after")
      └─ advance the calibration inputs through it; offload it

Host memory is one block, the parts outside the blocks, and the hidden states at one block
boundary (calibration batches, evaluation windows twice). Each stage calibrates block i on the
outputs of blocks 0..i-1 as the *whole* pipeline left them, which is what the final model will
see (llm-compressor's sequential pipeline does the same with several modifiers in one recipe).

The perplexities come from the windows' final hidden states through the model's own last norm
and ``lm_head`` (``_replayed``); the latency is the sum of each block's forward time plus the
parts outside the blocks, timed as ``evaluate.latency_ms_per_token`` times a whole model, on
the first and the last block only (``TIMED_BLOCKS``) and counted for every block: the blocks of
a decoder have one shape and every layer-by-layer method treats them alike, and timing all of
them would cost a job as much compute as its compression (four forward passes per block and
side, 0.7 TFLOP for a 0.72 B model). The
"after" figures are those of the weights written: the artifact loaded with ``transformers``
gives them (tests check it)::

    result = compress_blockwise(source_dir, spec, out_dir, ctx, measure=Measure(eval_ids, 1024, 512, 128))
    result.before, result.after    # {"parameters", ..., "latency_ms_per_token", "perplexity"}
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn
from transformers import GPT2LMHeadModel

from app.specs import JobSpec, PruneMagnitude, stage_name
from worker import evaluate
from worker.engine import export
from worker.engine.gpt_bigcode import BigCodeTwin
from worker.engine.capture import block_statistics, first_block_inputs
from worker.engine.modules import WeightLayer
from worker.engine.onload import OnloadedModel
from worker.engine.registry import DeviceOutOfMemory, EngineContext, LayerStep, layer_step
from worker.engine.shards import ShardWriter
from worker.engine.streaming import (DATA_FREE, CheckpointSource, data_free_step, planned_format,
                                     planned_scheme)


# The blocks whose forward pass is timed for the latency: the first and the last.
TIMED_BLOCKS = 2


def _timed(index: int, blocks: int) -> bool:
    return index == 0 or index == blocks - 1


@dataclass
class Measure:
    """What to measure before and after: perplexity over ``eval_ids`` (None: none) in windows of
    ``seq_len`` moving by ``stride``, and latency over ``latency_len`` tokens (0: none)."""

    eval_ids: torch.Tensor | None = None
    seq_len: int = 1024
    stride: int = 512
    latency_len: int = 128
    repeats: int = 3


@dataclass
class BlockwiseResult:
    stage_metrics: list[dict[str, Any]]
    export_info: dict[str, Any]
    before: dict[str, Any] = field(default_factory=dict)
    after: dict[str, Any] = field(default_factory=dict)
    peak_blocks: int = 0  # the most decoder blocks ever materialised at once


def blockwise_refusal(source_dir: Path, spec: JobSpec) -> str | None:
    """Why ``spec`` cannot run block by block on the checkpoint in ``source_dir``; None if it can."""
    for stage in spec.stages:
        if _step(stage, EngineContext()) is None:
            return f"{stage_name(stage)} needs the whole model"
    try:
        with CheckpointSource(Path(source_dir)) as source:
            return source.refusal(planned_format(spec), converts_gpt2=True)
    except Exception as error:  # no safetensors, a config transformers does not know...
        return f"the checkpoint cannot be read block by block: {error}"


def _step(stage: Any, ctx: EngineContext) -> LayerStep | None:
    step = layer_step(stage, ctx)
    if step is None and isinstance(stage, DATA_FREE):
        if isinstance(stage, PruneMagnitude) and stage.scope == "global":
            return None  # its threshold needs every weight first
        return _DataFree(data_free_step(stage, 0, {}), ctx)
    return step


class _DataFree:
    """A data-free method's per-layer step (``streaming.py``'s) as a ``LayerStep``."""

    needs_calibration = False

    def __init__(self, inner: Any, ctx: EngineContext):
        self.inner, self.ctx, self.layers = inner, ctx, 0

    def statistic(self, layer: WeightLayer) -> None:
        return None

    def compress(self, layer: WeightLayer, statistic: None) -> None:
        self.inner.apply(layer, self.ctx)
        self.layers += 1

    def metrics(self) -> dict[str, Any]:
        return self.inner.metrics(self.layers)


@torch.no_grad()
def compress_blockwise(
    source_dir: Path,
    spec: JobSpec,
    out_dir: Path,
    ctx: EngineContext,
    measure: Measure | None = None,
    on_stage_start: Callable[[int, str], None] | None = None,
    on_block: Callable[[OnloadedModel, int], None] | None = None,
) -> BlockwiseResult:
    """Run ``spec``'s stages on the checkpoint in ``source_dir`` block by block and write the
    artifact to ``out_dir`` (see the module docstring). ``ctx`` brings the device, the
    calibration batches and the progress and cancel hooks; ``on_block`` is told each time a
    block is onloaded (tests count them). Raises ``JobCancelled``."""
    measure = measure or Measure(latency_len=0)
    on_stage_start = on_stage_start or (lambda index, name: None)
    device = ctx.device
    store = torch.device("cpu") if device.type == "cuda" else None
    steps = [_step(stage, ctx) for stage in spec.stages]
    if any(step is None for step in steps):
        raise ValueError(blockwise_refusal(source_dir, spec))
    fmt = planned_format(spec)
    seconds = [0.0] * len(steps)
    with OnloadedModel(Path(source_dir), device) as onloaded:
        source, model, blocks = onloaded.source, onloaded.model, onloaded.blocks
        refusal = source.refusal(fmt, converts_gpt2=True)
        if refusal:
            raise ValueError(refusal)
        # compressed-tensors knows only nn.Linear: a GPT-2 is written as its GPTBigCode twin,
        # converted a tensor at a time.
        twin = (BigCodeTwin(model) if fmt == "compressed-tensors" and isinstance(model, GPT2LMHeadModel)
                else None)
        convert = twin.tensor if twin is not None else (lambda name, tensor: tensor)
        on_stage_start(0, stage_name(spec.stages[0]))
        if any(step.needs_calibration for step in steps) and not ctx.calibration:
            raise ValueError("this method needs calibration data (the job's calibration section)")
        calibration = (first_block_inputs(model, ctx.calibration, device, store)
                       if any(step.needs_calibration for step in steps) else None)
        windows, before_windows = [], None
        if measure.eval_ids is not None:
            eval_ids = measure.eval_ids.reshape(-1)
            windows = evaluate.windows(eval_ids.numel(), measure.seq_len, measure.stride)
            before_windows = first_block_inputs(
                model, [eval_ids[w.begin:w.end].unsqueeze(0) for w in windows], device, store)
        after_windows = before_windows.copy() if before_windows is not None else None
        latency_ids = None
        if measure.latency_len:
            generator = torch.Generator().manual_seed(0)  # evaluate.latency_ms_per_token's tokens
            latency_ids = torch.randint(0, model.config.vocab_size, (1, measure.latency_len), generator=generator)
            latency_inputs = first_block_inputs(model, [latency_ids], device)
        before, after = evaluate.WeightCount(), evaluate.WeightCount()
        outside = _outside_parameters(onloaded)
        before.add(outside, []), after.add(outside, [])
        block_seconds = {"before": 0.0, "after": 0.0}

        scheme = planned_scheme(spec.stages, source.layers) if fmt == "compressed-tensors" else None
        layout = source.layout() if scheme is None else None
        out_dir = Path(out_dir)
        total = len(blocks) * len(steps)
        working_on = ["the parts outside the decoder blocks"]  # for a GPU's out-of-memory error
        with _device_memory_named(device, working_on), \
                ShardWriter(out_dir, spec.output.max_shard_bytes, layout=layout) as writer:
            inside = f"{onloaded.prefix}."
            for name, tensor in model.state_dict().items():
                if not name.startswith(inside) and name in source.expected:
                    writer.add(name, convert(name, tensor))
            for index in range(len(blocks)):
                ctx.step(index * len(steps), total)
                working_on[0] = f"{onloaded.prefix}.{index} (block {index + 1} of {len(blocks)})"
                block = onloaded.onload(index)
                if on_block is not None:
                    on_block(onloaded, index)
                layers = [layer for layer in source.layers if layer.name.startswith(f"{onloaded.prefix}.{index}.")]
                before.add(list(block.parameters()), layers)
                timed = latency_ids is not None and _timed(index, len(blocks))
                if timed:
                    block_seconds["before"] += evaluate.median_seconds(lambda: list(latency_inputs.outputs(block)), measure.repeats, device)
                if before_windows is not None:
                    before_windows.advance(block)
                for position, step in enumerate(steps):
                    ctx.step(index * len(steps) + position, total)
                    started = time.perf_counter()
                    found = (block_statistics(block, layers, calibration, step.statistic)
                             if step.needs_calibration else {})
                    for layer in layers:
                        ctx.check_cancelled()
                        step.compress(layer, found.pop(layer.name, None))
                    seconds[position] += time.perf_counter() - started
                _write_block(writer, block, f"{onloaded.prefix}.{index}", layers, ctx, scheme, twin)
                after.add(list(block.parameters()), layers)
                if timed:
                    block_seconds["after"] += evaluate.median_seconds(lambda: list(latency_inputs.outputs(block)), measure.repeats, device)
                if after_windows is not None:
                    after_windows.advance(block)
                if calibration is not None and index + 1 < len(blocks):
                    calibration.advance(block)
                for layer in layers:  # nothing of a block is kept past it
                    ctx.masks.pop(layer.name, None)
                    ctx.quantized.pop(layer.name, None)
                onloaded.offload(index)
        ctx.on_progress(1.0)
        for index in range(1, len(spec.stages)):
            on_stage_start(index, stage_name(spec.stages[index]))
        architecture = source.write_config(out_dir, fmt, scheme, twin)
        export.copy_tokenizer_files(source.folder, out_dir)

        result = BlockwiseResult(
            stage_metrics=[{"name": stage_name(stage), **step.metrics(), "wall_time_s": spent}
                           for stage, step, spent in zip(spec.stages, steps, seconds)],
            export_info=export.export_summary(out_dir, fmt, architecture),
            before=before.stats(), after=after.stats(), peak_blocks=onloaded.peak_onloaded)
        if latency_ids is not None:
            with _replayed(onloaded, [latency_inputs.hidden_states[0]]) as replay:
                outside_seconds = evaluate.median_seconds(lambda: replay(0, latency_ids.to(device)), measure.repeats, device)
            timed_blocks = min(TIMED_BLOCKS, len(blocks))
            for side, figures in (("before", result.before), ("after", result.after)):
                every_block = block_seconds[side] * len(blocks) / timed_blocks
                figures["latency_ms_per_token"] = 1000 * (outside_seconds + every_block) / measure.latency_len
        if windows:
            for figures, final in ((result.before, before_windows), (result.after, after_windows)):
                nll = evaluate.NegativeLogLikelihood()
                with _replayed(onloaded, final.hidden_states) as replay:
                    for number, window in enumerate(windows):
                        ids = eval_ids[window.begin:window.end].to(device)
                        nll.add(replay(number, ids.unsqueeze(0)).logits[0], ids, window)
                figures["perplexity"] = nll.perplexity()
    return result


@contextmanager
def _device_memory_named(device: torch.device, where: list[str]) -> Iterator[None]:
    """The allocator's out-of-memory error becomes ``DeviceOutOfMemory`` naming what was being
    worked on (``where[0]``, kept current by the caller) and, on a GPU, the device's numbers
    (allocated, reserved, capacity)."""
    try:
        yield
    except torch.OutOfMemoryError as error:
        numbers = ""
        if device.type == "cuda":
            allocated, reserved = torch.cuda.memory_allocated(device), torch.cuda.memory_reserved(device)
            capacity = torch.cuda.get_device_properties(device).total_memory
            numbers = (f": {allocated / 2**30:.2f} GiB allocated, {reserved / 2**30:.2f} GiB reserved "
                       f"of {capacity / 2**30:.2f} GiB")
        raise DeviceOutOfMemory(f"{device} ran out of memory in {where[0]}{numbers}; {error}") from error


def _write_block(writer: ShardWriter, block: nn.Module, prefix: str, layers: list[WeightLayer],
                 ctx: EngineContext, scheme: Any, twin: BigCodeTwin | None) -> None:
    """The block's tensors into the artifact: a quantized layer's weight as its integers and
    scales (compressed-tensors), everything else as the block holds it (as ``twin`` stores
    it, for a GPT-2 written as GPTBigCode)."""
    quantized_weights = {f"{layer.name}.weight": layer for layer in layers} if scheme is not None else {}
    for local, tensor in block.state_dict().items():
        name = f"{prefix}.{local}"
        layer = quantized_weights.get(name)
        if layer is None:
            writer.add(name, twin.tensor(name, tensor) if twin is not None else tensor)
            continue
        quantized = ctx.quantized[layer.name]
        if twin is not None:
            quantized = twin.quantized(layer.name, quantized)
        for key, value in export.layer_tensors(layer.name, quantized, scheme.weights).items():
            writer.add(key, value)


def _outside_parameters(onloaded: OnloadedModel) -> list[torch.Tensor]:
    """The parameters outside the blocks, a tied one once (as ``model.parameters()`` gives it)."""
    inside = {id(p) for p in onloaded.blocks.parameters()}
    return [p for p in onloaded.model.parameters() if id(p) not in inside]


class _Replay(nn.Module):
    """Stands in for a decoder block: passes its input on, or, as the last block, returns the
    hidden states the real blocks computed for the current window."""

    def __init__(self, final: Callable[[], torch.Tensor] | None = None):
        super().__init__()
        self.final = final

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return hidden_states if self.final is None else self.final().to(hidden_states.device)


@contextmanager
def _replayed(onloaded: OnloadedModel, finals: list[torch.Tensor]) -> Iterator[Callable[[int, torch.Tensor], Any]]:
    """The model with its blocks replaced by ``_Replay``: ``replay(i, ids)`` runs the model on
    ``ids`` as if the blocks had produced ``finals[i]``, so the model's own final norm and
    ``lm_head`` turn them into logits."""
    parent_name, _, attribute = onloaded.prefix.rpartition(".")
    parent = onloaded.model.get_submodule(parent_name)
    current = {"index": 0}
    count = len(onloaded.blocks)
    stand_ins = nn.ModuleList([_Replay() for _ in range(count - 1)] + [_Replay(lambda: finals[current["index"]])])
    setattr(parent, attribute, stand_ins)

    def replay(index: int, ids: torch.Tensor) -> Any:
        current["index"] = index
        return onloaded.model(ids, use_cache=False)

    try:
        yield replay
    finally:
        setattr(parent, attribute, onloaded.blocks)

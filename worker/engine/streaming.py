"""Data-free jobs as one read and one write of the weights.

Random and magnitude pruning, RTN and dynamic int8 need nothing but each weight itself, so a
job made only of them never builds the model: the checkpoint's safetensors are read one tensor
at a time (at the offsets their headers give, in the checkpoint's dtype), each compressible
weight goes through every stage in turn, and the result is written as it comes, in shards
(``shards.ShardWriter``): host memory is one layer, as read and as written::

    reason = streaming_refusal(source_dir, spec)          # None: the job can stream
    stage_metrics, export_info = compress_streaming(source_dir, spec, out_dir, ctx)
    # the artifact compress() would write, tensor for tensor, and the same metrics

Nothing about a method is decided here. Which weights are compressed comes from
``modules.compressible_layers`` on the model built on the ``meta`` device (names, types and
shapes, no memory); each layer's step is the method's own (``layer_keep_mask``,
``GlobalThreshold``, ``quantize_layer``), run on that ``WeightLayer`` with the checkpoint's
tensor as its parameter, so the float32 arithmetic and the rounding back to the layer's dtype
are those of a model in memory; the artifact's config and tensors come from ``export.py``.
A global magnitude threshold needs every weight first: two histogram passes read them
(``GlobalThreshold.find``) before the writing pass.

A job streams when every stage is one of ``DATA_FREE`` and the checkpoint stores exactly the
model's tensors under their names; a compressed GPT-2 does not, since it is written as its
GPTBigCode twin (``gpt_bigcode.py``), which converts the whole model. ``streaming_refusal``
says why a job does not.
"""

from __future__ import annotations

import json
import os
import time
from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator

import torch
from pydantic import BaseModel
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, GPT2LMHeadModel, PreTrainedModel

from app.checkpoints.names import INDEX_FILE
from app.safetensors_header import TORCH_DTYPE_NAMES, TensorEntry, read_header
from app.specs import JobSpec, PruneMagnitude, PruneRandom, QuantizeDynamicInt8, QuantizeRTN, stage_name
from worker.engine import export
from worker.engine.loading import checkpoint_dtype
from worker.engine.modules import WeightLayer, compressible_layers
from worker.engine.prune import magnitude, random
from worker.engine.prune.masking import SparsityCount, apply_keep_mask, sparsity_metrics
from worker.engine.quantize import dynamic
from worker.engine.quantize.rtn import QuantizedWeight, quantize_layer, rtn_metrics
from worker.engine.registry import EngineContext
from worker.engine.shards import ShardWriter

DATA_FREE = (PruneRandom, PruneMagnitude, QuantizeRTN, QuantizeDynamicInt8)


def streaming_refusal(source_dir: Path, spec: JobSpec) -> str | None:
    """Why the job in ``spec`` cannot stream the checkpoint in ``source_dir``; None when it can."""
    needing = [stage_name(stage) for stage in spec.stages if not isinstance(stage, DATA_FREE)]
    if needing:
        return f"{', '.join(needing)} needs the model in memory"
    try:
        with CheckpointSource(Path(source_dir)) as source:
            return source.refusal(planned_format(spec))
    except Exception as error:  # no safetensors, a config transformers does not know...
        return f"the checkpoint cannot be read tensor by tensor: {error}"


def compress_streaming(
    source_dir: Path,
    spec: JobSpec,
    out_dir: Path,
    ctx: EngineContext,
    on_stage_start: Callable[[int, str], None] | None = None,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Run ``spec``'s stages (all ``DATA_FREE``) on the checkpoint in ``source_dir`` and write
    the artifact to ``out_dir``; return the stages' metrics (as ``run_pipeline`` gives them)
    and the export's (as ``export.write_checkpoint`` gives them).

    ``ctx`` brings the progress and cancel hooks. All stages run in one pass, so the first
    stage's phase covers it and the others start when it ends. Raises ``JobCancelled``."""
    on_stage_start = on_stage_start or (lambda index, name: None)
    fmt = planned_format(spec)
    with CheckpointSource(Path(source_dir)) as source:
        refusal = source.refusal(fmt)
        if refusal:
            raise ValueError(refusal)
        on_stage_start(0, stage_name(spec.stages[0]))
        thresholds: dict[int, magnitude.GlobalThreshold] = {}
        seconds = [0.0] * len(spec.stages)
        for index, stage in enumerate(spec.stages):
            if isinstance(stage, PruneMagnitude) and stage.scope == "global":
                started = time.perf_counter()
                thresholds[index] = magnitude.GlobalThreshold.find(
                    lambda: source.weights_after(spec.stages[:index], thresholds, ctx), stage.sparsity)
                seconds[index] += time.perf_counter() - started

        steps = [data_free_step(stage, index, thresholds) for index, stage in enumerate(spec.stages)]
        scheme = planned_scheme(spec.stages, source.layers) if fmt == "compressed-tensors" else None
        out_dir = Path(out_dir)
        # A dense artifact holds the checkpoint's tensors: laid out as the checkpoint stores
        # them, its header is the checkpoint's (no larger), whatever order they are computed in.
        layout = source.layout() if scheme is None else None
        with ShardWriter(out_dir, spec.output.max_shard_bytes, layout=layout) as writer:
            for name, layer in source.tensors(ctx):
                if layer is None:
                    writer.add(name, source.read(name))
                    continue
                source.onload(layer)
                for index, step in enumerate(steps):
                    started = time.perf_counter()
                    step.apply(layer, ctx)
                    seconds[index] += time.perf_counter() - started
                if scheme is None:
                    writer.add(name, layer.module.weight.data)
                else:
                    quantized = ctx.quantized[layer.name]
                    for key, tensor in export.layer_tensors(layer.name, quantized, scheme.weights).items():
                        writer.add(key, tensor)
                source.offload(layer)
                ctx.masks.pop(layer.name, None)
                ctx.quantized.pop(layer.name, None)
        ctx.on_progress(1.0)
        for index in range(1, len(spec.stages)):
            on_stage_start(index, stage_name(spec.stages[index]))

        architecture = source.write_config(out_dir, fmt, scheme)
        export.copy_tokenizer_files(source.folder, out_dir)
    stage_metrics = [
        {"name": stage_name(stage), **step.metrics(len(source.layers)), "wall_time_s": spent}
        for stage, step, spent in zip(spec.stages, steps, seconds)
    ]
    return stage_metrics, export.export_summary(out_dir, fmt, architecture)


def planned_format(spec: JobSpec) -> export.Format:
    # resolve_format asks whether the stages left quantized layers: these stages quantize all.
    quantizes = any(getattr(stage, "type", None) == "quantize" for stage in spec.stages)
    planned = EngineContext(quantized={"every compressible layer": None} if quantizes else {})
    return export.resolve_format(spec.output.format, planned)


# ---------------------------------------------------------------------------------------------
# The checkpoint, tensor by tensor, and the model's shape on the meta device


class CheckpointSource:
    """A checkpoint folder opened for reading one tensor at a time, with its model built on the
    ``meta`` device (in the dtype ``load_model`` would give it) for names, types and shapes."""

    def __init__(self, folder: Path):
        self.folder = folder
        self._files = ExitStack()
        index_file = folder / INDEX_FILE
        if index_file.is_file():
            files = sorted(set(json.loads(index_file.read_text())["weight_map"].values()))
        elif (folder / "model.safetensors").is_file():
            files = ["model.safetensors"]
        else:
            raise ValueError("no model.safetensors or model.safetensors.index.json")
        # Where each tensor's bytes are: its file, the entry (dtype, shape, offsets in the data).
        self._where: dict[str, tuple[BinaryIO, int, TensorEntry]] = {}
        self._file_order: dict[BinaryIO, int] = {}
        for file in files:
            path = folder / file
            header = read_header(path, max_header_bytes=path.stat().st_size)
            handle = self._files.enter_context(open(path, "rb", buffering=0))
            self._file_order[handle] = len(self._file_order)
            for name, entry in header.tensors.items():
                self._where[name] = (handle, 8 + header.header_size, entry)
        self.dtype = checkpoint_dtype(folder)
        config = AutoConfig.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
        with torch.device("meta"):
            self.model: PreTrainedModel = AutoModelForCausalLM.from_config(
                config, dtype=self.dtype, trust_remote_code=False)
        self.layers = compressible_layers(self.model)
        self._layer_of = {f"{layer.name}.weight": layer for layer in self.layers}
        self._meta_weights = {layer.name: layer.module.weight for layer in self.layers}
        # The tensors a checkpoint of this model stores: the state dict, tied tensors once.
        seen: set[int] = set()
        self.expected: dict[str, torch.Tensor] = {}
        for name, tensor in self.model.state_dict(keep_vars=True).items():
            if id(tensor) not in seen:
                seen.add(id(tensor))
                self.expected[name] = tensor

    def __enter__(self) -> CheckpointSource:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._files.close()

    def refusal(self, fmt: export.Format, converts_gpt2: bool = False) -> str | None:
        """Why this checkpoint cannot be written in ``fmt`` tensor by tensor (``converts_gpt2``:
        the caller writes a compressed GPT-2 as its GPTBigCode twin)."""
        if fmt == "compressed-tensors" and isinstance(self.model, GPT2LMHeadModel) and not converts_gpt2:
            return "a compressed GPT-2 is written as its GPTBigCode twin, converted in memory"
        if fmt == "compressed-tensors" and not self.layers:
            return "no layer to quantize"
        if set(self._where) != set(self.expected):
            return "the checkpoint's tensor names are not the model's"
        for name, tensor in self.expected.items():
            stored = self._where[name][2].shape
            if list(stored) != list(tensor.shape):
                return f"{name} is stored as {list(stored)}, the model has {list(tensor.shape)}"
        return None

    def layout(self) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
        """Every tensor as the checkpoint stores them, file after file in data order, with the
        dtype ``read`` gives it."""
        stored = sorted(self._where.items(), key=lambda item: (self._file_order[item[1][0]], item[1][2].begin))
        return [(name, self.expected[name].dtype, entry.shape) for name, (_, _, entry) in stored]

    def read(self, name: str, pin: bool = False) -> torch.Tensor:
        """The stored tensor, in the dtype the model in memory would hold it (``pin``: in
        page-locked host memory, for a fast asynchronous copy to a GPU).

        Read with plain positioned reads into a tensor of its own rather than through
        ``safe_open``'s memory map: a mapped page once touched stays in the process's resident
        memory until the file is closed, so mapping would make the whole checkpoint resident
        by the end of the pass."""
        handle, data_start, entry = self._where[name]
        raw = torch.empty(entry.end - entry.begin, dtype=torch.uint8, pin_memory=pin)
        buffer, done = raw.numpy(), 0
        while done < len(buffer):  # one read() returns at most ~2 GiB
            got = os.preadv(handle.fileno(), [buffer[done:]], data_start + entry.begin + done)
            if got <= 0:
                raise OSError(f"{name}: the checkpoint ends inside the tensor")
            done += got
        stored = getattr(torch, TORCH_DTYPE_NAMES[entry.dtype])
        tensor = raw.view(stored).reshape(entry.shape)
        wanted = self.expected[name].dtype
        return tensor.to(wanted) if tensor.is_floating_point() and tensor.dtype != wanted else tensor

    def tensors(self, ctx: EngineContext) -> Iterator[tuple[str, WeightLayer | None]]:
        """Every tensor name in the model's order, with its layer when it is a compressible
        weight; progress and cancellation are checked before each layer."""
        done = 0
        for name in self.expected:
            layer = self._layer_of.get(name)
            if layer is not None:
                ctx.step(done, len(self.layers))
                done += 1
            yield name, layer

    def onload(self, layer: WeightLayer) -> None:
        """Give ``layer`` its stored weight (its methods then work on it as on a loaded model)."""
        layer.module.weight = nn.Parameter(self.read(f"{layer.name}.weight"), requires_grad=False)

    def offload(self, layer: WeightLayer) -> None:
        layer.module.weight = self._meta_weights[layer.name]

    def weights_after(self, stages: list[BaseModel], thresholds: dict[int, magnitude.GlobalThreshold],
                      ctx: EngineContext) -> Iterator[torch.Tensor]:
        """The compressible weights, one at a time, as ``stages`` leave them (a pass of its own:
        a global threshold needs every weight before any is written)."""
        steps = [data_free_step(stage, index, thresholds) for index, stage in enumerate(stages)]
        scratch = EngineContext()
        for layer in self.layers:
            ctx.check_cancelled()
            self.onload(layer)
            for step in steps:
                step.apply(layer, scratch)
            yield layer.weight()
            self.offload(layer)
            scratch.masks.clear()
            scratch.quantized.clear()

    def write_config(self, out_dir: Path, fmt: export.Format, scheme: Any, twin: Any = None) -> str:
        """``config.json`` (and ``generation_config.json``) as the in-memory export writes them
        (``twin``: a GPT-2 written as its ``gpt_bigcode.BigCodeTwin``); returns the architecture."""
        if fmt == "dense":
            # What save_pretrained writes for a model of this dtype.
            self.model.config.architectures = [type(self.model).__name__]
            self.model.config.save_pretrained(out_dir)
            if self.model.can_generate():
                self.model.generation_config.save_pretrained(out_dir)
            return type(self.model).__name__
        config = twin.config() if twin is not None else export.saved_config(self.model)
        config["dtype"] = str(self.model.dtype).removeprefix("torch.")  # of the tensors left in float
        quantized_names = [layer.name for layer in self.layers]
        config["quantization_config"] = export.quantization_config(
            scheme, quantized_names, export.linear_names(self.model))
        export.write_config(out_dir, config)
        return config["architectures"][0]


# ---------------------------------------------------------------------------------------------
# One stage, layer after layer


class _Prune:
    """A pruning stage: the method's keep-mask for each layer, combined with the earlier ones."""

    def __init__(self, keep_mask: Callable[[torch.Tensor], torch.Tensor]):
        self.keep_mask, self.count = keep_mask, SparsityCount()

    def apply(self, layer: WeightLayer, ctx: EngineContext) -> None:
        apply_keep_mask(layer, self.keep_mask(layer.weight()), ctx)
        self.count.add(ctx.masks[layer.name])

    def metrics(self, layers: int) -> dict[str, Any]:
        return sparsity_metrics(layers, self.count.pruned, self.count.total)


class _Quantize:
    """An RTN quantization of each layer (``dynamic_int8``: int8 per channel, inputs marked)."""

    def __init__(self, config: QuantizeRTN, dynamic_inputs: bool):
        self.config, self.dynamic_inputs = config, dynamic_inputs
        self.max_abs_error = 0.0

    def apply(self, layer: WeightLayer, ctx: EngineContext) -> None:
        self.max_abs_error = max(self.max_abs_error, quantize_layer(layer, self.config, ctx))
        if self.dynamic_inputs:
            dynamic.quantize_inputs(layer.module)

    def metrics(self, layers: int) -> dict[str, Any]:
        weights = rtn_metrics(self.config, layers, self.max_abs_error)
        return dynamic.dynamic_int8_metrics(weights) if self.dynamic_inputs else weights


def data_free_step(stage: BaseModel, index: int, thresholds: dict[int, magnitude.GlobalThreshold]) -> _Prune | _Quantize:
    """A fresh step for ``stage`` (the ``index``-th): state drawn layer after layer (a random
    generator, the ties left at a global threshold) starts anew with each pass."""
    if isinstance(stage, PruneRandom):
        generator = torch.Generator().manual_seed(stage.seed)
        return _Prune(lambda weight: random.layer_keep_mask(weight, stage, generator))
    if isinstance(stage, PruneMagnitude) and stage.scope == "global":
        threshold = replace(thresholds[index])
        return _Prune(threshold.keep_mask)
    if isinstance(stage, PruneMagnitude):
        return _Prune(lambda weight: magnitude.layer_keep_mask(weight, stage))
    if isinstance(stage, QuantizeDynamicInt8):
        return _Quantize(dynamic.WEIGHTS, dynamic_inputs=True)
    if isinstance(stage, QuantizeRTN):
        return _Quantize(stage, dynamic_inputs=False)
    raise TypeError(f"{stage_name(stage)} does not stream")


def planned_scheme(stages: list[BaseModel], layers: list[WeightLayer]) -> Any:
    """The compressed-tensors scheme, needed before the first layer is written: from the
    integers each layer will hold (the last quantization stage's, shaped as the layer) and
    whether a dynamic int8 stage quantizes the inputs."""
    # The last quantization stage's integers are the ones stored (RTN, GPTQ: bits, group size,
    # symmetry in their config; dynamic int8: its fixed weights).
    last = [stage for stage in stages if getattr(stage, "type", None) == "quantize"][-1]
    weights = dynamic.WEIGHTS if isinstance(last, QuantizeDynamicInt8) else last
    inputs = dynamic.INPUT_BITS if any(isinstance(stage, QuantizeDynamicInt8) for stage in stages) else None
    planned = {
        layer.name: QuantizedWeight(
            q=torch.empty(layer.out_features, layer.in_features, dtype=torch.int8, device="meta"),
            scale=torch.empty(0, device="meta"),
            zero_point=None if weights.symmetric else torch.empty(0, device="meta"),
            bits=weights.bits, group_size=weights.group_size)
        for layer in layers
    }
    return export.quantization_scheme(planned, dict.fromkeys(planned, inputs))

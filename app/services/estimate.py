"""The pre-flight estimate: how much host memory, device memory and disk a job will need at
its peak, computed at submission from the model's config.json, its checkpoint's size and the
spec, before anything is loaded. It is an upper bound on what the engine uses *as it is today*
(``worker/engine``): each term below says what it counts, and the constants that follow the
engine's choices are named, so that a change of the engine is a change of one number here.

A GPTQ job on a 0.72 B-parameter bfloat16 Llama (hidden 2048, 16 layers, MLP 5632) runs one
decoder block at a time::

    facts = ModelFacts(num_parameters=720_000_000, size_bytes=1_440_000_000, dtype="bfloat16",
                       config={"model_type": "llama", "hidden_size": 2048, "num_hidden_layers": 16,
                               "intermediate_size": 5632, "num_attention_heads": 32,
                               "num_key_value_heads": 4, "vocab_size": 32000})
    spec = JobSpec.model_validate({"model_id": "mdl_1", "stages": [{"type": "quantize", "method": "gptq"}],
                                   "calibration": {"dataset_id": "ds_1", "samples": 16, "seq_len": 256}})
    estimate = estimate_job(spec, {"mdl_1": facts}, {"ds_1": 50_000_000})
    estimate.onloading                                                  # "block"
    estimate.host_bytes, estimate.device_bytes, estimate.disk_bytes     # about 4.0 GB, 2.6 GB, 0.8 GB
    estimate.as_json()["host"]      # {"phase": "block", "largest_stage": 0, "terms": {"process": 1073741824,
                                    #  "outside_blocks": 131072000, "block": 88132608, "block_written": 88132608,
                                    #  "compression_state": 45760512, "calibration": 17825792,
                                    #  "block_arguments": 1115136, "latency": 1048576, "token_ids": 67109888,
                                    #  "block_fragments": 846073036, "stage": 1269825536,
                                    #  "allocator_slack": 383414353}}

The host figure assumes the job runs on the CPU (everything on the host), which also bounds a
GPU worker's host memory (there each tensor is read into pinned host memory on its way to the
device: no more than the CPU figure counts for it); the device figure is what a GPU worker
needs on its device. The peak is the largest of the job's phases, each a sum of the terms
alive in it.

Which path a job takes is the engine's choice (``worker/engine/compress.py``), made again here
by ``whole_model_reason``: a job whose stages all work layer by layer (``BLOCKWISE_STAGES``)
runs **block by block**; any other job holds the model **whole**. ``onloading`` says which
(``"block"`` / ``"whole"``, as the job's metrics do).

Block by block (``worker/engine/blockwise.py``), the phases are ``read`` (the datasets read and
tokenized) and ``block`` (one pass over the decoder blocks); the model is never loaded whole,
nor the checkpoint mapped (its tensors are read with positioned reads), nor the artifact read
back. The terms are:

- ``process``: the worker process itself (Python, torch, transformers), ``process_bytes``.
- ``text``: a dataset read and tokenized (its text, several bytes per character, the ids, and
  the tokenizer's work on one 64 Ki-character piece), for the largest dataset the job reads
  (``read`` only: it is freed before the pass).
- ``token_ids``: the ids kept of each dataset tokenized (the evaluation's and the calibration's
  tokenized prefixes, of which their ids are views) and the latency input's.
- ``outside_blocks``: what lies outside the decoder blocks (embeddings, ``lm_head`` unless
  tied, the final norm) in the checkpoint's dtype: the parameters not in the blocks' layers.
- ``block``: one decoder block's weights as read from the checkpoint, in its dtype.
- ``block_written``: the block's tensors again, as they pass through the shard writer (host
  copies, packed integers and scales).
- ``compression_state``: one block's keep-masks and quantized integers with their scales (the
  engine drops them once the block is written).
- ``calibration``: the calibration batches' hidden states at one block boundary
  (``samples x seq_len x hidden`` in the checkpoint's dtype, one more while a batch is replaced).
- ``evaluation``: the evaluation windows' hidden states at one block boundary, twice (the
  model as uploaded and as compressed advance separately): ``windows x window x hidden``.
- ``block_arguments``: what every batch and window passes a block beside its hidden states
  (position ids, rotary tables), kept for the whole pass.
- ``latency``: the latency input's hidden states (``1 x 128 x hidden``) and its output.
- ``block_fragments``: what each block passed leaves resident (memory it freed that the
  allocator keeps in pieces), ``BLOCK_PASS_LEFT_PER_BLOCK_PERCENT`` of a block per block
  (measured, host only).
- ``stage``: the stage that needs the most on one block (``largest_stage``): the float32 work
  of compressing the largest layer (for GPTQ and SparseGPT the inverse-Hessian sweep of the
  widest input), the block's statistics (Hessians, ``in_features^2`` float32 per distinct
  input; Wanda's input norms) and one calibration batch through the block.
- ``forward``: one evaluation window (or the latency input) through a block, or through the
  parts outside the blocks with its logits (``window x vocab`` float32, with the log-softmax's
  temporaries).
- ``allocator_slack``, ``device_runtime``: as below.

Of ``stage`` and ``forward``, which follow one another, only the larger counts.

With the model held whole, the phases are ``load``, ``work`` and ``reload``, and the terms:

- ``process``: as above.
- ``checkpoint_mapped``: the checkpoint's files, memory-mapped while the model lives.
- ``weights``: the model as the engine holds it, ``num_parameters x weight_bytes_per_parameter``.
- ``load_copy``: a second copy of the weights while they are converted to the engine's dtype.
- ``student_weights``: an uploaded student (``student_model_id``), beside the job's model.
- ``compression_state``: what stages leave for later ones and the export: keep-masks (a byte
  per weight of the decoder blocks' layers) and quantized integers with their scales.
- ``evaluation_tokens``: the evaluation's token ids, kept from ``before`` to ``after``.
- ``text``: as above.
- ``evaluation`` / ``forward``: one evaluation window's / the latency measurement's forward
  pass (eager attention scores, MLP intermediates, the logits and their log-softmax).
- ``stage``: the stage that needs the most (``largest_stage``): the float32 temporaries of
  compressing the largest layer; for GPTQ and SparseGPT the inverse-Hessian work of the widest
  input; with calibration, every sample's activations at one block boundary, one block's
  Hessians and one sample's forward pass; for distillation the teacher (its file mapped while
  it loads), gradients, AdamW's two moments, two kept copies of the student, activations for
  ``batch_size x seq_len`` through every layer and the logits with their loss temporaries.
- ``export``: the artifact's tensors converted and serialized before they are written.
- ``artifact_mapped`` / ``artifact_weights``: the artifact read back, for the ``after`` numbers.

Of ``text``, ``evaluation``, ``forward``, ``stage`` and ``export``, which follow one another,
only the largest counts. On either path:

- ``allocator_slack``: memory freed but kept by the allocator, ``ALLOCATOR_SLACK_PERCENT`` of
  the phase's other terms but the process (host only).
- ``device_runtime``: the CUDA context and library workspaces (device only).

Disk: the artifact folder (weights, config, tokenizer files) and its tar.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping

from app.specs import CalibrationSpec, DistillKD, EvaluationSpec, JobSpec, QuantizeDynamicInt8, stage_name

GiB = 1024**3
MiB = 1024**2

# -- What the engine does today: each constant names one of its choices. -------------------

# worker/engine/loading.py loads a checkpoint in its own dtype: a weight costs its dtype's
# size, or at least this many bytes (4 when loading made every model float32, as it once did).
ENGINE_LOAD_DTYPE_BYTES = 0
# from_pretrained converting the dtype holds the converted tensors beside the source ones.
LOAD_COPIES = 1.0
# Activations, Hessians and the per-layer work are float32.
FLOAT32 = 4
# Temporaries per weight of the layer being compressed (float32 copies, sort values and int64
# indices, masks, the dequantized copy): the largest of the methods' needs, generously.
LAYER_WORK_BYTES_PER_WEIGHT = 24
# GPTQ / SparseGPT: the Hessian copy, its Cholesky factor, the inverse, its factor, the working
# factor and a spare, each ``inputs x inputs`` float32.
SWEEP_SQUARE_MATRICES = 6
# Bytes per stored quantized weight and per group of them (float32 scale + int8 zero point).
QUANTIZED_BYTES_PER_WEIGHT = 1  # the integers are kept as int8 until the export packs them
QUANTIZED_BYTES_PER_GROUP = FLOAT32 + 1
# A dataset in memory, per byte of its file: the bytes read, the decoded text (up to four bytes
# a character) and the joined copy that is tokenized.
TEXT_BYTES_PER_FILE_BYTE = 9
# Per token tokenized: its piece's int64 ids and the joined stream's (calibration._encode).
TOKENIZED_BYTES_PER_TOKEN = 16
# calibration._encode tokenizes 64 Ki characters at a time; a fast tokenizer keeps ~700 bytes
# per token of a call (strings, offsets, masks), and a piece has at most a token a character.
TOKENIZER_PIECE_BYTES = (1 << 16) * 700
# Distillation: floats per token of each layer kept for the backward pass, as multiples of the
# hidden and MLP widths (norms, projections, residuals, the MLP's intermediate tensors).
TRAINING_HIDDEN_FLOATS = 16
TRAINING_MLP_FLOATS = 8
# Distillation trains the student in float32 (worker/engine/distill/train.py): float32 copies
# of its weights held during training: the weights themselves, gradients, AdamW's two moments,
# the best student kept on the host, and the next best while it replaces it.
TRAINING_STUDENT_COPIES = 6
# Tensors the size of the logits alive during a distillation step (student and teacher logits,
# their float32 tempered copies, log-probabilities, the KL, the gradient, the LM loss's own).
TRAINING_LOGIT_COPIES = 12
# Tensors the size of the logits in an evaluation window (logits, float copy, log-softmax).
EVALUATION_LOGIT_COPIES = 3
# Memory the job freed that the process has not given back (glibc keeps freed chunks in its
# arenas; fragmentation), as a share of each phase's bytes beyond the process itself. Measured
# peaks of GPTQ on a 0.4 B bf16 Llama came within 7 % of the other terms' sum.
ALLOCATOR_SLACK_PERCENT = 15
# Block by block, the process's resident memory creeps up with every block passed, beyond what
# one block holds: memory the earlier blocks freed and the allocator keeps in pieces (or that
# something keeps: the engine's to explain). Measured with bench/scale.py --params 2e8 (11
# blocks of 33 MB, bf16): about 13 MB (40 % of a block) a block, for magnitude and GPTQ alike.
BLOCK_PASS_LEFT_PER_BLOCK_PERCENT = 60
# CUDA context, cuBLAS workspaces, allocator slack: on the device only.
DEVICE_RUNTIME_BYTES = 1 * GiB
# Tokens calibration and distillation read at least (worker/engine/calibration.py, distill/train.py).
CALIBRATION_TOKENS_PER_WINDOW = 16
MIN_TOKENS_READ = 1 << 20
# calibration.token_stream tokenizes a prefix of the documents about this many characters per
# wanted token long, and the ids it returns are a view of that prefix's: all of them stay.
TOKENIZED_PREFIX_PER_TOKEN = 8
# The latency measurement's input (evaluate.latency_ms_per_token, blockwise.Measure).
LATENCY_TOKENS = 128
# Artifact files beside the weights (config.json, the safetensors headers and index).
ARTIFACT_SLACK_BYTES = 1 * MiB
TAR_SLACK_BYTES = 1 * MiB  # a tar's member headers, padding and end blocks

DTYPE_BYTES = {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2, "int8": 1, "uint8": 1,
               "float8_e4m3fn": 1, "float8_e5m2": 1, "int32": 4, "int64": 8}


def weight_bytes_per_parameter(dtype: str) -> int:
    """What one weight costs in the engine's memory: the checkpoint's dtype, widened to the
    dtype the engine loads in (``ENGINE_LOAD_DTYPE_BYTES``). ``"bfloat16"`` gives 2 today."""
    return max(DTYPE_BYTES.get(dtype, 4), ENGINE_LOAD_DTYPE_BYTES)


@dataclass(frozen=True)
class ModelFacts:
    """What the estimate reads of a model: its row's numbers and its parsed config.json (an
    empty dict when it is unknown: the shape is then assumed from the parameter count)."""

    num_parameters: int
    size_bytes: int
    dtype: str
    config: Mapping[str, Any] = field(default_factory=dict)
    other_files_bytes: int = 0  # tokenizer and config files, copied into the artifact

    @classmethod
    def from_row(cls, model, config: Mapping[str, Any] | None) -> "ModelFacts":
        """From an ``app.db.models.Model`` row and its config.json."""
        other = sum(int(f.get("size_bytes", 0)) for f in (model.files or [])
                    if not str(f.get("name", "")).endswith(".safetensors"))
        return cls(model.num_parameters, model.size_bytes, model.dtype, dict(config or {}), other)


@dataclass(frozen=True)
class Shape:
    """The sizes of a decoder that the memory depends on."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    context: int
    mlp_matrices: int  # 3 for a gated MLP (Llama), 2 otherwise
    assumed: bool  # True when config.json gave no sizes

    @property
    def query_width(self) -> int:
        return self.heads * self.head_dim

    @property
    def attention_weights_per_layer(self) -> int:
        return self.hidden * (self.query_width + 2 * self.kv_heads * self.head_dim) + self.query_width * self.hidden

    @property
    def largest_layer_weights(self) -> int:
        # GPT-2 fuses q, k and v in one layer: counted fused, which bounds the separate ones.
        return max(self.hidden * (self.query_width + 2 * self.kv_heads * self.head_dim),
                   self.hidden * self.intermediate, self.query_width * self.hidden)

    @property
    def block_vector_parameters(self) -> int:
        """A block's parameters beside its linear weights, at most: two norms with biases and a
        bias on every layer's outputs."""
        return (4 * self.hidden + self.query_width + 2 * self.kv_heads * self.head_dim + self.hidden
                + (self.mlp_matrices - 1) * self.intermediate + self.hidden)

    @property
    def widest_input(self) -> int:
        return max(self.hidden, self.intermediate, self.query_width)

    def block_linear_parameters(self, num_parameters: int) -> int:
        """Weights of the layers inside the decoder blocks (the ones stages compress)."""
        per_layer = self.attention_weights_per_layer + self.mlp_matrices * self.hidden * self.intermediate
        return min(num_parameters, self.layers * per_layer)


_GATED_MLP = frozenset({"llama", "mistral", "qwen2"})


def model_shape(facts: ModelFacts) -> Shape:
    """The sizes in config.json, under any of the names GPT-2, Llama and OPT give them."""
    config = facts.config

    def first(*keys: str) -> int | None:
        for key in keys:
            value = config.get(key)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
        return None

    hidden = first("hidden_size", "n_embd", "d_model")
    if hidden is None:  # no config: a square-ish model of this many parameters
        hidden = max(64, math.isqrt(max(facts.num_parameters, 1)))
        heads = max(1, hidden // 64)
        return Shape(hidden=hidden, layers=max(1, facts.num_parameters // (12 * hidden * hidden)), heads=heads,
                     kv_heads=heads, head_dim=hidden // heads, intermediate=4 * hidden,
                     vocab=max(1, facts.num_parameters // hidden), context=2048, mlp_matrices=3, assumed=True)
    heads = first("num_attention_heads", "n_head") or max(1, hidden // 64)
    head_dim = first("head_dim") or max(1, hidden // heads)
    kv_heads = 1 if config.get("multi_query") else (first("num_key_value_heads") or heads)
    return Shape(
        hidden=hidden,
        layers=first("num_hidden_layers", "n_layer", "num_layers") or 1,
        heads=heads, kv_heads=kv_heads, head_dim=head_dim,
        intermediate=first("intermediate_size", "n_inner", "ffn_dim") or 4 * hidden,
        vocab=first("vocab_size") or 50257,
        context=first("max_position_embeddings", "n_positions", "n_ctx") or 2048,
        mlp_matrices=3 if config.get("model_type") in _GATED_MLP else 2,
        assumed=False,
    )


# -- Which path the engine takes: worker/engine/compress.py runs a job block by block when
# ``blockwise.blockwise_refusal`` gives no reason, and holds the model whole otherwise. ------

# Stages the engine runs one decoder block at a time (a layer step, or a data-free method that
# needs no more than the layer: a magnitude threshold per layer, not a global one). Every
# artifact format is written block by block (a compressed GPT-2 as its GPTBigCode twin, a
# tensor at a time).
BLOCKWISE_STAGES = frozenset({"prune.random", "prune.magnitude", "prune.wanda", "prune.sparsegpt",
                              "quantize.rtn", "quantize.gptq", "quantize.dynamic_int8"})


def whole_model_reason(spec: JobSpec) -> str | None:
    """Why the engine will hold ``spec``'s model whole; None when it runs block by block::

        whole_model_reason(JobSpec.model_validate({"model_id": "mdl_1", "stages": [
            {"type": "prune", "method": "magnitude", "sparsity": 0.5, "scope": "global"}]}))
        # "prune.magnitude needs the whole model"

    The engine also holds whole a checkpoint that stores tensors under other names than the
    model's (old GPT-2 files without the ``transformer.`` prefix, or with its attention-mask
    buffers), which a model's recorded facts do not tell: such a job is estimated block by
    block, below what it will use."""
    for stage in spec.stages:
        name = stage_name(stage)
        if name not in BLOCKWISE_STAGES or getattr(stage, "scope", "layer") == "global":
            return f"{name} needs the whole model"
    return None


@dataclass(frozen=True)
class Term:
    name: str
    bytes: int
    on_device: bool  # also resident on the compute device when that is a GPU


@dataclass
class JobEstimate:
    """The estimate of one job: the peaks, and every term with the phase it belongs to."""

    host_bytes: int
    device_bytes: int
    disk_bytes: int
    host_phase: str  # the phase whose sum is the host peak
    largest_stage: int  # the index in spec.stages of the stage that needs the most (the ``stage`` term)
    phases: dict[str, list[Term]]
    disk_terms: dict[str, int]
    assumptions: dict[str, Any]
    onloading: str = "whole"  # "block": one decoder block at a time; "whole": the model held whole

    def host_terms(self) -> dict[str, int]:
        return {term.name: term.bytes for term in self.phases[self.host_phase]}

    def device_terms(self) -> dict[str, int]:
        phase = max(self.phases, key=lambda name: _device_sum(self.phases[name]))
        return {term.name: term.bytes for term in self.phases[phase] if term.on_device} | {
            "device_runtime": DEVICE_RUNTIME_BYTES}

    def dominant(self, where: str = "host") -> tuple[str, int]:
        """The largest term of the host (or device) peak: ``("weights", 2_880_000_000)``."""
        terms = self.host_terms() if where == "host" else self.device_terms()
        return max(terms.items(), key=lambda item: item[1])

    def as_json(self) -> dict[str, Any]:
        """What the job records (``job.estimate``) and its report repeats."""
        return {
            "host_bytes": self.host_bytes,
            "device_bytes": self.device_bytes,
            "disk_bytes": self.disk_bytes,
            "onloading": self.onloading,
            "host": {"phase": self.host_phase, "terms": self.host_terms(), "largest_stage": self.largest_stage},
            "device": {"terms": self.device_terms()},
            "disk": {"terms": dict(self.disk_terms)},
            "assumptions": dict(self.assumptions),
        }


def _device_sum(terms: list[Term]) -> int:
    return sum(term.bytes for term in terms if term.on_device)


def estimate_job(
    spec: JobSpec,
    models: Mapping[str, ModelFacts],
    dataset_bytes: Mapping[str, int] | None = None,
    *,
    process_bytes: int = GiB,
) -> JobEstimate:
    """The peak host memory, device memory and disk of running ``spec``.

    ``models`` holds the facts of every model the spec names (the job's model, a teacher, a
    student) by id; ``dataset_bytes`` the size of each dataset file it names (a dataset left
    out counts its tokens only); ``process_bytes`` is the worker process's own footprint.
    """
    dataset_bytes = dataset_bytes or {}
    facts = models[spec.model_id]
    shape = model_shape(facts)
    distills = [s for s in spec.stages if isinstance(s, DistillKD)]

    # The model that comes out: an uploaded student replaces the job's model.
    out_facts = next((models[s.student_model_id] for s in distills if s.student_model_id), facts)
    out_shape = model_shape(out_facts)
    out_params = out_facts.num_parameters
    out_weight_bytes = weight_bytes_per_parameter(out_facts.dtype)
    artifact = _artifact_weights_bytes(spec, out_params, out_shape.block_linear_parameters(out_params),
                                       out_weight_bytes, out_shape)

    texts = [_text_bytes(dataset_bytes.get(spec.evaluation.dataset_id), spec.evaluation.max_tokens)
             if spec.evaluation else 0]
    if spec.calibration:
        texts.append(_text_bytes(dataset_bytes.get(spec.calibration.dataset_id),
                                 _calibration_tokens_read(spec.calibration)))
    for stage in distills:
        wanted = math.ceil(max(2 * stage.steps * stage.batch_size * stage.seq_len, MIN_TOKENS_READ) / 0.9)
        texts.append(_text_bytes(dataset_bytes.get(stage.dataset_id), wanted))

    reason = whole_model_reason(spec)
    if reason is None:
        phases, largest_stage = _block_phases(spec, facts, shape, max(texts), dataset_bytes, process_bytes)
    else:
        phases, largest_stage = _whole_model_phases(spec, models, facts, shape, out_facts, artifact, max(texts),
                                                    process_bytes)
    phases = {name: [term for term in terms if term.bytes] for name, terms in phases.items()}
    for terms in phases.values():
        own = sum(term.bytes for term in terms if term.name != "process")
        terms.append(Term("allocator_slack", own * ALLOCATOR_SLACK_PERCENT // 100, False))
    host_phase = max(phases, key=lambda name: sum(term.bytes for term in phases[name]))
    device = max(_device_sum(terms) for terms in phases.values())

    artifact_folder = artifact + out_facts.other_files_bytes + ARTIFACT_SLACK_BYTES
    disk_terms = {"artifact": artifact_folder, "artifact_tar": artifact_folder + TAR_SLACK_BYTES}
    assumptions: dict[str, Any] = {"weight_bytes_per_parameter": weight_bytes_per_parameter(facts.dtype),
                                   "config_read": not shape.assumed, "process_bytes": process_bytes}
    if reason is not None:
        assumptions["whole_model_reason"] = reason
    return JobEstimate(
        host_bytes=sum(term.bytes for term in phases[host_phase]),
        device_bytes=device + DEVICE_RUNTIME_BYTES,
        disk_bytes=sum(disk_terms.values()),
        host_phase=host_phase,
        largest_stage=largest_stage,
        phases=phases,
        disk_terms=disk_terms,
        assumptions=assumptions,
        onloading="whole" if reason else "block",
    )


def _whole_model_phases(spec: JobSpec, models: Mapping[str, ModelFacts], facts: ModelFacts, shape: Shape,
                        out_facts: ModelFacts, artifact: int, text: int,
                        process_bytes: int) -> tuple[dict[str, list[Term]], int]:
    """The model held whole: loaded, worked on, exported, its artifact read back."""
    params = facts.num_parameters
    weight_bytes = weight_bytes_per_parameter(facts.dtype)
    linear = shape.block_linear_parameters(params)
    prunes = [s for s in spec.stages if s.type == "prune"]
    quantizes = [s for s in spec.stages if s.type == "quantize"]
    distills = [s for s in spec.stages if isinstance(s, DistillKD)]
    out_params = out_facts.num_parameters
    out_weight_bytes = weight_bytes_per_parameter(out_facts.dtype)

    state = 0
    if prunes:
        state += linear  # one bool per weight: the keep-masks
    if quantizes:
        group = min(getattr(s, "group_size", None) or shape.hidden for s in quantizes)
        state += linear * QUANTIZED_BYTES_PER_WEIGHT + math.ceil(linear / group) * QUANTIZED_BYTES_PER_GROUP

    evaluation_bytes = 0  # one window's forward pass; the token ids are a term of their own
    if spec.evaluation:
        evaluation_bytes = _forward_bytes(shape, 1, _evaluation_window(spec.evaluation, shape))
    latency = _forward_bytes(shape, 1, min(LATENCY_TOKENS, shape.context))

    # One stage runs at a time: the largest stage's needs (on the device, but for a teacher's
    # file mapped while it loads: counted there too, which only over-states the device).
    stage_works = [_stage_bytes(stage, spec.calibration, facts, shape, models) for stage in spec.stages]
    stage_work = max(stage_works)
    export = artifact + out_params * out_weight_bytes
    evaluation_tokens = spec.evaluation.max_tokens * 8 if spec.evaluation else 0
    student_weights = sum(models[s.student_model_id].num_parameters * weight_bytes_per_parameter(
        models[s.student_model_id].dtype) for s in distills if s.student_model_id)
    reloaded = out_params * out_weight_bytes  # read back dequantized, loaded as any checkpoint is

    phases = {
        "load": [Term("process", process_bytes, False),
                 Term("checkpoint_mapped", facts.size_bytes, False),
                 Term("weights", params * weight_bytes, True),
                 Term("load_copy", int(LOAD_COPIES * params * weight_bytes), False)],
        "work": [Term("process", process_bytes, False),
                 # Loaded in its dtype, a weight is a view of the mapped file: its pages stay
                 # resident while the model lives, beside the copies the stages write.
                 Term("checkpoint_mapped", facts.size_bytes, False),
                 Term("weights", params * weight_bytes, True),
                 Term("student_weights", student_weights, True),
                 Term("compression_state", state, True),
                 Term("evaluation_tokens", evaluation_tokens, False),
                 # These follow one another: only the largest counts.
                 _largest([Term("text", text, False),
                           Term("evaluation", evaluation_bytes, True),
                           Term("forward", latency, True),
                           Term("stage", stage_work, True),
                           Term("export", export, False)])],
        "reload": [Term("process", process_bytes, False),
                   Term("compression_state", state, True),
                   Term("artifact_mapped", artifact, False),
                   Term("artifact_weights", reloaded, True),
                   Term("load_copy", int(LOAD_COPIES * reloaded), False),
                   Term("evaluation_tokens", evaluation_tokens, False),
                   Term("forward", max(evaluation_bytes, latency), True)],
    }
    return phases, stage_works.index(stage_work)


def _block_phases(spec: JobSpec, facts: ModelFacts, shape: Shape, text: int, dataset_bytes: Mapping[str, int],
                  process_bytes: int) -> tuple[dict[str, list[Term]], int]:
    """One decoder block at a time (``worker/engine/blockwise.py``): the datasets are read and
    tokenized first (``read``), then one pass over the blocks holds what ``block`` sums."""
    params = facts.num_parameters
    weight_bytes = weight_bytes_per_parameter(facts.dtype)  # the blocks compute in it too
    linear = shape.block_linear_parameters(params)
    block_linear = math.ceil(linear / shape.layers)
    quantizes = [s for s in spec.stages if s.type == "quantize"]

    state = 0  # of one block: nothing of a block is kept past its writing
    if any(s.type == "prune" for s in spec.stages):
        state += block_linear
    if quantizes:
        group = min(getattr(s, "group_size", None) or shape.hidden for s in quantizes)
        state += block_linear * QUANTIZED_BYTES_PER_WEIGHT + math.ceil(block_linear / group) * QUANTIZED_BYTES_PER_GROUP

    latency_tokens = min(LATENCY_TOKENS, shape.context)
    calibration = evaluation = 0
    arguments = _block_call_bytes(shape, latency_tokens, weight_bytes)
    calibrated = spec.calibration is not None and any(s.requires_calibration for s in spec.stages)
    if calibrated:
        samples, tokens = spec.calibration.samples, spec.calibration.seq_len
        calibration = (samples + 1) * tokens * shape.hidden * weight_bytes
        arguments += samples * _block_call_bytes(shape, tokens, weight_bytes)
    window = 0
    if spec.evaluation:
        window = _evaluation_window(spec.evaluation, shape)
        tokens = _evaluation_tokens(spec.evaluation, dataset_bytes.get(spec.evaluation.dataset_id))
        stride = spec.evaluation.stride or max(1, window // 2)
        windows = 1 if tokens <= window else math.ceil((tokens - window) / stride) + 1
        window = min(window, tokens)
        evaluation = 2 * (windows + 1) * window * shape.hidden * weight_bytes  # before and after
        arguments += windows * _block_call_bytes(shape, window, weight_bytes)
    token_ids = 8 * latency_tokens
    if spec.evaluation:
        token_ids += 8 * _kept_tokens(dataset_bytes.get(spec.evaluation.dataset_id), spec.evaluation.max_tokens)
    if spec.calibration:  # tokenized whenever there is a calibration section
        token_ids += 8 * _kept_tokens(dataset_bytes.get(spec.calibration.dataset_id),
                                      _calibration_tokens_read(spec.calibration))

    stage_works = [_block_stage_bytes(stage, spec.calibration if calibrated else None, shape) for stage in spec.stages]
    stage_work = max(stage_works)
    block = (block_linear + shape.block_vector_parameters) * weight_bytes
    # At least the embedding (and an untied lm_head), whatever the parameter count says.
    embeddings = (1 if facts.config.get("tie_word_embeddings", True) else 2) * shape.vocab * shape.hidden
    phases = {
        "read": [Term("process", process_bytes, False),
                 Term("text", text, False),
                 Term("token_ids", token_ids, False)],
        "block": [Term("process", process_bytes, False),
                  Term("outside_blocks", max(params - linear, embeddings) * weight_bytes, True),
                  Term("block", block, True),
                  Term("block_written", block, False),
                  Term("compression_state", state, True),
                  Term("calibration", calibration, False),
                  Term("evaluation", evaluation, False),
                  Term("block_arguments", arguments, True),
                  Term("latency", 2 * latency_tokens * shape.hidden * weight_bytes, True),
                  Term("token_ids", token_ids, False),
                  Term("block_fragments", BLOCK_PASS_LEFT_PER_BLOCK_PERCENT * block * shape.layers // 100, False),
                  # These follow one another: only the largest counts.
                  _largest([Term("stage", stage_work, True),
                            Term("forward", _forward_bytes(shape, 1, max(window, latency_tokens)), True)])],
    }
    return phases, stage_works.index(stage_work)


def _stage_bytes(stage, calibration: CalibrationSpec | None, facts: ModelFacts, shape: Shape,
                 models: Mapping[str, ModelFacts]) -> int:
    """What one stage needs while it runs, beyond the model and the compression state."""
    if isinstance(stage, DistillKD):
        return _distillation_bytes(stage, facts, models)
    work = shape.largest_layer_weights * LAYER_WORK_BYTES_PER_WEIGHT
    if stage.method in ("gptq", "sparsegpt"):
        work += SWEEP_SQUARE_MATRICES * shape.widest_input**2 * FLOAT32
    if stage.requires_calibration:
        work += _calibration_bytes(calibration, shape, stage.method)
    return work


def _block_stage_bytes(stage, calibration: CalibrationSpec | None, shape: Shape) -> int:
    """One stage on one block: the float32 work of compressing its largest layer (GPTQ and
    SparseGPT: the inverse-Hessian sweep of the widest input) beside the block's statistics
    (one per distinct input: q, k and v share theirs, so do a gated MLP's gate and up; GPT-2
    and OPT read the same four widths), and one calibration batch through the block while
    they are filled."""
    work = shape.largest_layer_weights * LAYER_WORK_BYTES_PER_WEIGHT
    if stage.method in ("gptq", "sparsegpt"):
        work += SWEEP_SQUARE_MATRICES * shape.widest_input**2 * FLOAT32
    if calibration is not None and stage.requires_calibration:
        inputs = (shape.hidden, shape.query_width, shape.hidden, shape.intermediate)  # attention, output, MLP, down
        if stage.method in ("gptq", "sparsegpt"):
            work += sum(width * width for width in inputs) * FLOAT32
        elif stage.method == "wanda":
            work += sum(inputs) * FLOAT32
        work += _forward_bytes(shape, 1, calibration.seq_len, logits=False)
    return work


def _block_call_bytes(shape: Shape, tokens: int, weight_bytes: int) -> int:
    """What a batch passes a block beside its hidden states, kept for every block: position ids
    and the rotary tables (no ``[T, T]`` mask: attention is ``sdpa``, causal by itself)."""
    return tokens * 8 + 2 * tokens * shape.head_dim * weight_bytes


def _evaluation_window(evaluation: EvaluationSpec, shape: Shape) -> int:
    return evaluation.seq_len or min(shape.context, 1024)


def _evaluation_tokens(evaluation: EvaluationSpec, file_bytes: int | None) -> int:
    """The tokens evaluated: ``max_tokens``, or fewer in a smaller dataset (a token is at least
    a byte of its file)."""
    return max(2, min(evaluation.max_tokens, file_bytes if file_bytes is not None else evaluation.max_tokens))


def _calibration_tokens_read(calibration: CalibrationSpec) -> int:
    return max(CALIBRATION_TOKENS_PER_WINDOW * calibration.samples * calibration.seq_len, MIN_TOKENS_READ)


def _kept_tokens(file_bytes: int | None, tokens_wanted: int) -> int:
    """The token ids kept of a dataset tokenized for ``tokens_wanted``: the whole tokenized
    prefix (``TOKENIZED_PREFIX_PER_TOKEN``), never more tokens than the file has bytes."""
    prefix = TOKENIZED_PREFIX_PER_TOKEN * tokens_wanted
    return prefix if file_bytes is None else min(prefix, file_bytes)


def _largest(terms: list[Term]) -> Term:
    return max(terms, key=lambda term: term.bytes)


def _artifact_weights_bytes(spec: JobSpec, params: int, linear: int, weight_bytes: int, shape: Shape) -> int:
    """The artifact's weights: dense in the engine's dtype, or the decoder layers' integers
    (int8, or int4 packed) with their scales and the rest dense (compressed-tensors)."""
    quantizes = [s for s in spec.stages if s.type == "quantize"]
    dense = params * weight_bytes + ARTIFACT_SLACK_BYTES
    if not quantizes or spec.output.format == "dense":
        return dense
    bits = max(8 if isinstance(s, QuantizeDynamicInt8) else s.bits for s in quantizes)
    group = min(getattr(s, "group_size", None) or shape.hidden for s in quantizes)
    quantized = math.ceil(linear * bits / 8) + math.ceil(linear / group) * QUANTIZED_BYTES_PER_GROUP
    return min(dense, quantized + (params - linear) * weight_bytes + ARTIFACT_SLACK_BYTES)


def _forward_bytes(shape: Shape, batch: int, tokens: int, logits: bool = True) -> int:
    """One forward pass without gradients: a block's transient tensors (eager attention scores
    and probabilities, the MLP's intermediates, the projections) and the logits."""
    per_token = (6 * shape.hidden + 3 * shape.intermediate
                 + 3 * (shape.query_width + 2 * shape.kv_heads * shape.head_dim)) * FLOAT32
    attention = 2 * shape.heads * tokens * tokens * FLOAT32
    head = EVALUATION_LOGIT_COPIES * tokens * shape.vocab * FLOAT32 if logits else 0
    return batch * (tokens * per_token + attention + head)


def _calibration_bytes(calibration: CalibrationSpec | None, shape: Shape, method: str) -> int:
    """Block-by-block calibration: every sample's hidden states at one block boundary (plus
    one replaced at a time), each sample's call arguments (a [T, T] mask, rotary tables), one
    block's Hessians, one sample through the block. Structured pruning runs the whole model
    per sample instead (logits included)."""
    if calibration is None:
        return 0
    samples, tokens = calibration.samples, calibration.seq_len
    boundary = (samples + 1) * tokens * shape.hidden * FLOAT32
    arguments = samples * (tokens * tokens * FLOAT32 + 2 * tokens * shape.head_dim * FLOAT32 + tokens * 8)
    ids = samples * tokens * 8
    hessians = 0
    if method in ("gptq", "sparsegpt"):
        hessians = (3 * shape.hidden**2 + shape.query_width**2 + shape.intermediate**2) * FLOAT32
    elif method == "wanda":
        hessians = (3 * shape.hidden + shape.query_width + shape.intermediate) * FLOAT32
    return boundary + arguments + ids + hessians + _forward_bytes(shape, 1, tokens, logits=method == "structured")


def _distillation_bytes(stage: DistillKD, facts: ModelFacts, models: Mapping[str, ModelFacts]) -> int:
    """A distillation step: the teacher (loaded fresh, its file mapped while it loads), the
    student's gradients, AdamW's two moments and two kept copies (the best student, and the
    next best while it replaces it), activations through every layer for the backward pass,
    and the logits of both models with their loss temporaries."""
    teacher = models[stage.teacher_model_id] if stage.teacher_model_id else facts
    student = models[stage.student_model_id] if stage.student_model_id else facts
    teacher_shape, student_shape = model_shape(teacher), model_shape(student)
    student_bytes = student.num_parameters * FLOAT32  # trained in float32, whatever its dtype
    teacher_bytes = teacher.num_parameters * weight_bytes_per_parameter(teacher.dtype)
    tokens = stage.batch_size * stage.seq_len
    per_layer = ((TRAINING_HIDDEN_FLOATS * student_shape.hidden + TRAINING_MLP_FLOATS * student_shape.intermediate)
                 * FLOAT32 + 2 * student_shape.heads * stage.seq_len * FLOAT32)
    activations = tokens * per_layer * student_shape.layers
    logits = TRAINING_LOGIT_COPIES * tokens * max(student_shape.vocab, teacher_shape.vocab) * FLOAT32
    hidden_states = 0
    if stage.hidden_loss_weight > 0:
        hidden_states = 2 * tokens * FLOAT32 * ((student_shape.layers + 1) * student_shape.hidden
                                                + (teacher_shape.layers + 1) * teacher_shape.hidden)
    teacher_forward = _forward_bytes(teacher_shape, stage.batch_size, stage.seq_len, logits=False)
    return (teacher.size_bytes + teacher_bytes + TRAINING_STUDENT_COPIES * student_bytes + activations + logits
            + hidden_states + teacher_forward)


def _text_bytes(file_bytes: int | None, tokens_wanted: int) -> int:
    """A dataset read whole and tokenized, piece by piece, for ``tokens_wanted`` (a file of
    unknown size is taken to be the prefix that is tokenized)."""
    if file_bytes is None:
        file_bytes = TOKENIZED_PREFIX_PER_TOKEN * tokens_wanted
    return (TEXT_BYTES_PER_FILE_BYTE * file_bytes + _kept_tokens(file_bytes, tokens_wanted) * TOKENIZED_BYTES_PER_TOKEN
            + TOKENIZER_PIECE_BYTES)


def declared_limits(settings) -> tuple[tuple[str, str, int | None, str], ...]:
    """What a worker declares it gives one job, as ``(where, estimate field, bytes or None,
    setting)``: the API refuses a job past it (422), a worker refuses one it receives anyway."""
    return (("host", "host_bytes", settings.worker_memory_bytes, "SQUEEZE_WORKER_MEMORY_BYTES"),
            ("device", "device_bytes", settings.worker_device_memory_bytes, "SQUEEZE_WORKER_DEVICE_MEMORY_BYTES"))


def gib(count: int) -> str:
    """``"9.61 GiB"``: how estimates and limits are written in messages."""
    return f"{count / 2**30:.2f} GiB"

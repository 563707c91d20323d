"""The artifact folder a client downloads, and how it loads it.

Two formats (``OutputSpec.format``):

- ``"dense"``: ``save_pretrained`` safetensors; pruned zeros and dequantized weights are
  stored as plain floats, so any ``transformers`` loads it.
- ``"compressed-tensors"``: the quantized layers stored as integers (int8 as is, int4 packed
  eight to an int32) with their scales, described by a ``quantization_config`` in
  ``config.json`` (https://github.com/neuralmagic/compressed-tensors). The weights file is
  really 4x / 8x smaller. A W8A8 layer (``dynamic_int8``) also declares its per-token dynamic
  int8 input activations. A job that pruned and did not quantize gets its pruned layers in the
  ``sparse-bitmask`` layout instead: the nonzero values, a bitmask (1 bit per weight) and row
  offsets, so the file shrinks with sparsity (50% of float32: about 0.53x).

``resolve_format`` picks one for ``"auto"``. A client loads either the way ``load_model`` does::

    model = load_model(Path("artifact"), torch.device("cpu"))

``sparse-bitmask`` is a legacy compressed-tensors format: compressed-tensors 0.20 still names it
(``BitmaskConfig``) but no longer has its compressor, and ``from_pretrained`` in transformers 5
silently leaves those layers randomly initialised (its load report lists them MISSING). Only
``load_model`` (and the older compressed-tensors / transformers 4 stacks that wrote the format)
read it back, so ``"auto"`` never chooses it. Pruned *and* quantized layers are stored quantized
only (their zeros as integers): the sparse + quantized formats (``sparse-24-bitmask``,
``marlin-24``) were removed as well.

GPT-2 is special: compressed-tensors only knows ``nn.Linear`` layers, and GPT-2's projections
are ``Conv1D``. GPTBigCode with ``multi_query=False`` is GPT-2 with ``nn.Linear`` layers (the
logits are bit-identical), so a compressed GPT-2 is written as a GPTBigCode model.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

# No code path here may reach the Hub; `local_files_only` below is the real guarantee, this
# catches anything (a tokenizer, a config fetch) that forgets it.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import compressed_tensors  # noqa: E402
import torch  # noqa: E402
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32  # noqa: E402
from compressed_tensors.config import BitmaskConfig, CompressionFormat  # noqa: E402
from compressed_tensors.quantization import (  # noqa: E402
    QuantizationArgs,
    QuantizationConfig,
    QuantizationScheme,
)
from compressed_tensors.utils import match_named_modules, pack_bitmasks, unpack_bitmasks  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from torch import nn  # noqa: E402
from transformers import (  # noqa: E402
    MODEL_FOR_CAUSAL_LM_MAPPING,
    AutoConfig,
    AutoModelForCausalLM,
    CompressedTensorsConfig,
    GPT2LMHeadModel,
    GPTBigCodeConfig,
    PreTrainedModel,
)
from transformers.pytorch_utils import Conv1D  # noqa: E402

from worker.engine.modules import WEIGHT_MODULE_TYPES  # noqa: E402
from app.checkpoints import TOKENIZER_FILES as UPLOAD_TOKENIZER_FILES  # noqa: E402
from worker.engine.pipeline import EngineContext  # noqa: E402
# The module, not its names: the two may import each other through the pipeline in any order.
from worker.engine.quantize import dynamic  # noqa: E402
from worker.engine.quantize.rtn import QuantizedWeight  # noqa: E402

# Files a client needs besides the weights and config.json, copied from the source checkpoint:
# every tokenizer file an upload may carry (one list, kept by the upload validation).
TOKENIZER_FILES = tuple(sorted(UPLOAD_TOKENIZER_FILES)) + ("generation_config.json",)

Format = Literal["dense", "compressed-tensors"]


def load_model(folder: Path, device: torch.device) -> PreTrainedModel:
    """Load a checkpoint (an upload or an artifact) as a float32 model in eval mode.

    Only safetensors, only local files, never remote code. A compressed-tensors artifact is
    dequantized while loading (``dequantize=True``), which gives exactly the weights the engine
    evaluated for every format written here. The default load path, which keeps the weights
    compressed, fails on CPU with transformers 5.24 / compressed-tensors 0.20 for int4 GPTBigCode
    (its weight init touches the removed ``weight``) and for asymmetric int4 channel / group
    weights on any model (the zero point is created unpacked, the checkpoint's is packed).

    ``dequantize=True`` also drops the activation quantization a scheme declares; the default
    path keeps it. So the layers declared to quantize their inputs per token to int8 (W8A8,
    ``dynamic_int8``) get that fake quantization back here, computed as compressed-tensors does:
    the model gives the logits a client's ``from_pretrained`` gives, int8 activations included.
    A ``sparse-bitmask`` checkpoint, which transformers 5 cannot read, is decompressed here.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    folder = Path(folder)
    compression = _compression_config(folder)
    if compression is None:
        model = _from_pretrained(folder)
    elif _sparsity_format(compression) == CompressionFormat.sparse_bitmask:
        model = _load_sparse_bitmask(folder)
    else:
        model = _from_pretrained(folder, quantization_config=CompressedTensorsConfig(dequantize=True))
        _quantize_inputs_as_declared(model, compression)
    return model.to(device).eval()


def _from_pretrained(folder: Path, **options: Any) -> PreTrainedModel:
    with warnings.catch_warnings():
        # transformers warns that the artifact's own quantization_config wins over the one
        # passed: intended, only the loading option `dequantize` is taken from ours.
        warnings.filterwarnings("ignore", message=".*already has a `quantization_config`")
        return AutoModelForCausalLM.from_pretrained(
            folder,
            dtype=torch.float32,
            local_files_only=True,
            use_safetensors=True,
            trust_remote_code=False,
            **options,
        )


def _compression_config(folder: Path) -> dict[str, Any] | None:
    """The ``quantization_config`` of a compressed-tensors checkpoint; None for any other."""
    if not (folder / "config.json").is_file():
        return None  # from_pretrained reports the missing config
    config = json.loads((folder / "config.json").read_text())
    quantization = config.get("quantization_config") or {}
    return quantization if quantization.get("quant_method") == "compressed-tensors" else None


def _sparsity_format(compression: dict[str, Any]) -> CompressionFormat:
    """``dense`` (no sparsity compression) or ``sparse-bitmask`` over float weights; any other
    sparse layout fails here rather than load with random weights, as from_pretrained does."""
    sparsity = compression.get("sparsity_config") or {}
    fmt = CompressionFormat(sparsity.get("format") or CompressionFormat.dense.value)
    if fmt == CompressionFormat.dense or (
        fmt == CompressionFormat.sparse_bitmask and not compression.get("config_groups")
    ):
        return fmt
    raise ValueError(
        f"a {fmt.value!r} checkpoint{' with quantized layers' if compression.get('config_groups') else ''} "
        f"cannot be loaded: compressed-tensors {compressed_tensors.__version__} removed that format"
    )


def _quantize_inputs_as_declared(model: nn.Module, compression: dict[str, Any]) -> None:
    for group in (compression.get("config_groups") or {}).values():
        inputs = group.get("input_activations") if isinstance(group, dict) else None
        if not inputs:
            continue
        args = QuantizationArgs.model_validate(inputs)
        if not _is_dynamic_per_token_int(args):
            # e.g. an uploaded FP8 or static-int8 W8A8 model: its activations run in float here.
            warnings.warn(f"input activations {args.type}{args.num_bits} {args.strategy} are not simulated")
            continue
        for _, module in match_named_modules(model, group.get("targets"), compression.get("ignore")):
            dynamic.quantize_inputs(module, args.num_bits)


def _load_sparse_bitmask(folder: Path) -> PreTrainedModel:
    config = AutoConfig.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
    del config.quantization_config  # the weights are handed over dense: nothing to decompress
    tensors: dict[str, torch.Tensor] = {}
    for path in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(path))
    # The architecture's own class (not the Auto one, which insists on a path) builds the model
    # from the config and takes the weights as a state dict, ties and dtype handled as usual.
    model, info = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)].from_pretrained(
        None,
        config=config,
        state_dict=_bitmask_decompress(tensors),
        dtype=torch.float32,
        output_loading_info=True,
    )
    if info["missing_keys"]:  # never leave a layer randomly initialised
        raise ValueError(f"{folder}: weights missing from the checkpoint: {sorted(info['missing_keys'])}")
    return model


def resolve_format(requested: str, ctx: EngineContext) -> Format:
    """The format an ``OutputSpec.format`` means for a job whose stages left ``ctx``.

    ``"auto"``: compressed-tensors when a stage quantized (integers, 4x / 8x smaller), dense
    otherwise. A job that only pruned gets dense, not sparse-bitmask: transformers 5 with
    compressed-tensors 0.20 loads sparse-bitmask with random weights (see the module docstring).
    """
    if requested == "auto":
        return "compressed-tensors" if ctx.quantized else "dense"
    if requested not in ("dense", "compressed-tensors"):
        raise ValueError(f"unknown checkpoint format {requested!r}")
    return requested  # type: ignore[return-value]


def write_checkpoint(
    model: PreTrainedModel, ctx: EngineContext, out_dir: Path, fmt: Format, source_dir: Path
) -> dict[str, Any]:
    """Write ``model`` (as the stages left it) to ``out_dir`` with the tokenizer files of
    ``source_dir``. Returns ``{"format", "architecture", "weights_bytes"}``.

    ``"compressed-tensors"`` needs a quantization stage (``ctx.quantized``: integer layers) or
    a pruning stage (``ctx.masks``: sparse-bitmask layers, see the module docstring).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if fmt == "dense":
        model.save_pretrained(out_dir)  # safetensors, the only format transformers 5 writes
        architecture = type(model).__name__
    elif fmt == "compressed-tensors":
        architecture = _write_compressed(model, ctx, out_dir)
    else:
        raise ValueError(f"unknown checkpoint format {fmt!r}")
    for name in TOKENIZER_FILES:
        if (Path(source_dir) / name).is_file():
            shutil.copyfile(Path(source_dir) / name, out_dir / name)
    weights_bytes = sum(path.stat().st_size for path in out_dir.glob("*.safetensors"))
    return {"format": fmt, "architecture": architecture, "weights_bytes": weights_bytes}


# ---------------------------------------------------------------------------------------------
# compressed-tensors


def _write_compressed(model: PreTrainedModel, ctx: EngineContext, out_dir: Path) -> str:
    quantized = ctx.quantized
    if not quantized and not ctx.masks:
        raise ValueError("the compressed-tensors format needs a quantization or a pruning stage")
    if isinstance(model, GPT2LMHeadModel):
        config, tensors, quantized = _as_gpt_bigcode(model, quantized)
    else:
        config, tensors = model.config.to_diff_dict(), _unique_tensors(model)
        config["architectures"] = [type(model).__name__]  # as save_pretrained writes it
    config["dtype"] = str(model.dtype).removeprefix("torch.")  # of the tensors left in float
    linear_names = _linear_names(model)
    if quantized:
        # The layers that quantize their inputs at run time (W8A8) are marked on the model.
        input_bits = {name: dynamic.input_bits(model.get_submodule(name)) for name in quantized}
        config["quantization_config"] = _compress_quantized(tensors, quantized, input_bits, linear_names)
    else:
        sparse = [name for name in linear_names if name in ctx.masks]
        config["quantization_config"] = _compress_sparse(tensors, sparse, linear_names, model)
    tensors = {key: value.detach().to("cpu").contiguous() for key, value in tensors.items()}
    save_file(tensors, out_dir / "model.safetensors", metadata={"format": "pt"})
    (out_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return config["architectures"][0]


def _compress_quantized(
    tensors: dict[str, torch.Tensor],
    quantized: dict[str, QuantizedWeight],
    input_bits: dict[str, int | None],
    linear_names: list[str],
) -> dict[str, Any]:
    """Replace the quantized layers' weights in ``tensors`` by their integers and scales; return
    the ``quantization_config``."""
    scheme = _scheme(quantized, input_bits)
    for name, weight in quantized.items():
        del tensors[f"{name}.weight"]
        tensors.update(_compressed_tensors(name, weight, scheme.weights))
    # Every Linear not quantized (lm_head, and e.g. OPT's project_in/out) is listed by name, so
    # that a loader does not expect a scale for it.
    ignore = sorted(set(linear_names) - set(quantized))
    return QuantizationConfig(
        config_groups={"group_0": scheme},
        format=scheme.format,
        quantization_status="compressed",
        ignore=ignore,
    ).model_dump()


def _scheme(
    quantized: dict[str, QuantizedWeight], input_bits: dict[str, int | None]
) -> QuantizationScheme:
    """The one compressed-tensors scheme that describes every quantized layer (and, with
    ``input_bits`` of a layer not None, its inputs quantized per token at run time).

    transformers dequantizes all dense layers with a single scheme, so the layers must share
    one. A row whose length is not a multiple of ``group_size`` (a partial last group) cannot
    be described by the ``"group"`` strategy, which requires whole groups; the ``"block"``
    strategy with ``[1, group_size]`` blocks pads the last block and describes it exactly
    (transformers loads it; serving engines may support only ``"group"``).
    """
    kinds = {
        (q.bits, q.group_size, q.zero_point is None, input_bits.get(name))
        for name, q in quantized.items()
    }
    if len(kinds) != 1:
        raise ValueError(
            f"the quantized layers differ in bits / group size / symmetry / input bits: {kinds}"
        )
    bits, group_size, symmetric, input_bits = kinds.pop()
    if group_size is None:
        args = QuantizationArgs(num_bits=bits, type="int", symmetric=symmetric, strategy="channel")
    elif all(q.q.shape[1] % group_size == 0 for q in quantized.values()):
        args = QuantizationArgs(
            num_bits=bits, type="int", symmetric=symmetric, strategy="group", group_size=group_size
        )
    else:
        args = QuantizationArgs(
            num_bits=bits,
            type="int",
            symmetric=symmetric,
            strategy="block",
            block_structure=[1, group_size],
        )
    inputs = None
    if input_bits is not None:
        # W8A8 dynamic: each token's input quantized when the layer runs, no stored scale.
        inputs = QuantizationArgs(
            num_bits=input_bits, type="int", symmetric=True, strategy="token", dynamic=True
        )
    # int8 values are stored as they are; narrower ones are packed into int32 words.
    fmt = "int-quantized" if bits == 8 else "pack-quantized"
    return QuantizationScheme(targets=["Linear"], weights=args, input_activations=inputs, format=fmt)


def _is_dynamic_per_token_int(args: QuantizationArgs) -> bool:
    """Whether activation ``args`` are what ``_scheme`` writes for W8A8 (and load_model
    simulates): symmetric integers, one scale per token computed at run time."""
    return args.type == "int" and args.symmetric and args.strategy == "token" and args.dynamic is True


def _compressed_tensors(
    name: str, weight: QuantizedWeight, args: QuantizationArgs
) -> dict[str, torch.Tensor]:
    """The tensors compressed-tensors stores for one layer, named as its compressors name them."""
    tensors = {f"{name}.weight_scale": weight.scale.float()}
    zero_point = weight.zero_point
    if weight.bits == 8:
        tensors[f"{name}.weight"] = weight.q
    else:
        tensors[f"{name}.weight_packed"] = pack_to_int32(weight.q.contiguous(), weight.bits)
        tensors[f"{name}.weight_shape"] = torch.tensor(list(weight.q.shape))
        # The pack-quantized compressor packs zero points (along the output dim) for the
        # channel and group strategies only; for "block" it keeps them as int8.
        if zero_point is not None and args.strategy in ("channel", "group"):
            zero_point = pack_to_int32(zero_point.contiguous(), weight.bits, packed_dim=0)
    if zero_point is not None:
        tensors[f"{name}.weight_zero_point"] = zero_point
    return tensors


def _compress_sparse(
    tensors: dict[str, torch.Tensor], names: list[str], linear_names: list[str], model: nn.Module
) -> dict[str, Any]:
    """Replace the weights of the pruned layers ``names`` in ``tensors`` by their sparse-bitmask
    form; return the ``quantization_config`` that describes it (no quantization, a
    ``sparsity_config``)."""
    structures = set()
    for name in names:
        weight = tensors.pop(f"{name}.weight")
        structures.add("2:4" if _is_two_four(weight) else "unstructured")
        tensors.update(_bitmask_compress(name, weight))
    # As llm-compressor records it: the zero fraction of all the model's parameters.
    parameters = list(model.parameters())
    zeros = sum(int((p == 0).sum()) for p in parameters)
    sparsity = BitmaskConfig(
        targets=["Linear"],
        ignore=sorted(set(linear_names) - set(names)),
        global_sparsity=zeros / sum(p.numel() for p in parameters),
        sparsity_structure=structures.pop() if len(structures) == 1 else "unstructured",
    )
    return {
        "quant_method": "compressed-tensors",
        "version": compressed_tensors.__version__,
        "sparsity_config": sparsity.model_dump(),
    }


def _is_two_four(weight: torch.Tensor) -> bool:
    """At most two nonzeros in every four consecutive inputs of a row (what sparse tensor cores
    and vLLM's 2:4 kernels need)."""
    rows, columns = weight.shape
    return columns % 4 == 0 and bool(((weight != 0).reshape(rows, -1, 4).sum(-1) <= 2).all())


# The legacy compressed-tensors BitmaskCompressor layout, for one layer named ``name``:
#   name.compressed   the nonzero values, row by row (1-D, the weight's dtype)
#   name.bitmask      uint8 [rows, ceil(columns / 8)], bit j % 8 of byte j // 8 (little-endian)
#                     set where column j is nonzero
#   name.row_offsets  int64 [rows], where each row starts in `compressed`
#   name.shape        int64 [2], the dense shape
# Lossless: zeros that pruning did not make are simply not stored either.


def _bitmask_compress(name: str, weight: torch.Tensor) -> dict[str, torch.Tensor]:
    weight = weight.detach().cpu()
    nonzero = weight != 0
    row_counts = nonzero.sum(dim=-1)
    return {
        f"{name}.compressed": weight[nonzero],
        f"{name}.bitmask": pack_bitmasks(nonzero),
        f"{name}.row_offsets": torch.cumsum(row_counts, 0) - row_counts,
        f"{name}.shape": torch.tensor(list(weight.shape)),
    }


def _bitmask_decompress(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``tensors`` with every sparse-bitmask layer turned back into its dense ``.weight``."""
    dense = dict(tensors)
    for key in tensors:
        if not key.endswith(".compressed"):
            continue
        name = key.removesuffix(".compressed")
        values = dense.pop(key)
        shape = dense.pop(f"{name}.shape").tolist()
        nonzero = unpack_bitmasks(dense.pop(f"{name}.bitmask"), shape)
        dense.pop(f"{name}.row_offsets")
        weight = torch.zeros(shape, dtype=values.dtype)
        weight[nonzero] = values
        dense[f"{name}.weight"] = weight
    return dense


def _unique_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict with tied tensors (lm_head = embedding) written once, under the first
    name: safetensors refuses shared storage, and ``tie_word_embeddings`` restores the tie."""
    seen: set[tuple[int, int]] = set()
    tensors = {}
    for key, value in model.state_dict().items():
        identity = (value.untyped_storage().data_ptr(), value.storage_offset())
        if identity in seen:
            continue
        seen.add(identity)
        tensors[key] = value
    return tensors


def _linear_names(model: nn.Module) -> list[str]:
    """The names of the ``nn.Linear`` layers of the model as written: GPT-2's Conv1D layers are
    written as Linear layers of GPTBigCode."""
    return [
        name for name, module in model.named_modules() if isinstance(module, WEIGHT_MODULE_TYPES)
    ]


def _as_gpt_bigcode(
    model: GPT2LMHeadModel, quantized: dict[str, QuantizedWeight]
) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, QuantizedWeight]]:
    """GPT-2 rewritten as the GPTBigCode model (``multi_query=False``) that computes the same
    logits: same module names, Linear weights ``[out, in]`` instead of Conv1D ``[in, out]``, and
    the fused ``c_attn`` output reordered from GPT-2's ``[q | k | v]`` (each all heads) to
    GPTBigCode's per-head ``[q_h | k_h | v_h]``. Returns its config, its tensors and the
    quantized weights in the same layout."""
    source = model.config
    if getattr(source, "scale_attn_by_inverse_layer_idx", False) or getattr(
        source, "reorder_and_upcast_attn", False
    ):
        raise ValueError("GPT-2 with layer-scaled or upcast attention has no GPTBigCode twin")
    heads, width = source.n_head, source.n_embd

    def per_head(tensor: torch.Tensor) -> torch.Tensor:
        # rows [3 * width, ...] ordered (q|k|v, head, dim) -> (head, q|k|v, dim)
        rest = tensor.shape[1:]
        grouped = tensor.reshape(3, heads, width // heads, *rest)
        return grouped.transpose(0, 1).reshape(3 * width, *rest)

    config = GPTBigCodeConfig(
        vocab_size=source.vocab_size,
        n_positions=source.n_positions,
        n_embd=width,
        n_layer=source.n_layer,
        n_head=heads,
        n_inner=source.n_inner,
        activation_function=source.activation_function,
        resid_pdrop=source.resid_pdrop,
        embd_pdrop=source.embd_pdrop,
        attn_pdrop=source.attn_pdrop,
        layer_norm_epsilon=source.layer_norm_epsilon,
        initializer_range=source.initializer_range,
        scale_attn_weights=source.scale_attn_weights,
        bos_token_id=source.bos_token_id,
        eos_token_id=source.eos_token_id,
        pad_token_id=getattr(source, "pad_token_id", None),
        tie_word_embeddings=getattr(source, "tie_word_embeddings", True),
        multi_query=False,
        architectures=["GPTBigCodeForCausalLM"],
    ).to_diff_dict()

    tensors = _unique_tensors(model)
    converted = dict(quantized)
    for name, module in model.named_modules():
        if not isinstance(module, Conv1D):
            continue
        weight = tensors[f"{name}.weight"].t()  # Conv1D [in, out] -> Linear [out, in]
        if name.endswith(".attn.c_attn"):
            weight = per_head(weight)
            tensors[f"{name}.bias"] = per_head(tensors[f"{name}.bias"])
            if name in quantized:
                q = quantized[name]
                converted[name] = replace(
                    q,
                    q=per_head(q.q),
                    scale=per_head(q.scale),
                    zero_point=None if q.zero_point is None else per_head(q.zero_point),
                )
        tensors[f"{name}.weight"] = weight
    return config, tensors, converted

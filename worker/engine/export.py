"""The artifact folder a client downloads.

Two formats (``OutputSpec.format``):

- ``"dense"``: ``save_pretrained`` safetensors; pruned zeros and dequantized weights are
  stored as plain floats, so any ``transformers`` loads it.
- ``"compressed-tensors"``: the quantized layers stored as integers (int8 as is, int4 packed
  eight to an int32) with their scales, described by a ``quantization_config`` in
  ``config.json`` (https://github.com/neuralmagic/compressed-tensors). The weights file is
  really 4x / 8x smaller. A W8A8 layer (``dynamic_int8``) also declares its per-token dynamic
  int8 input activations. Pruned *and* quantized layers are stored quantized only (their zeros
  as integers): the pinned compressed-tensors has no sparse layout that transformers loads, so
  a job that only pruned is written dense (``app/specs.py`` refuses compressed-tensors for it).

``resolve_format`` picks one for ``"auto"``; ``loading.load_model`` reads either back. A GPT-2
is written as its GPTBigCode twin (``gpt_bigcode.py``): compressed-tensors needs ``nn.Linear``.

Every tensor not quantized (embeddings, norms, ``lm_head``, pruned dense weights) is written
in the model's dtype, the checkpoint's own (``loading.checkpoint_dtype``), and so are the
scales, as compressed-tensors creates them for that model: a bfloat16 upload gives a bfloat16
artifact. Either format is cut into shards of at most ``max_shard_bytes`` (a tensor larger than
that is a shard of its own) named as ``transformers`` names them, with a
``model.safetensors.index.json`` when there are several::

    write_checkpoint(model, ctx, Path("out"), "compressed-tensors", source, max_shard_bytes=5 * 10**9)
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Literal

import torch
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme
from torch import nn
from transformers import GPT2LMHeadModel, PreTrainedModel

from app.checkpoints import TOKENIZER_FILES as UPLOAD_TOKENIZER_FILES
from worker.engine.gpt_bigcode import as_gpt_bigcode
from worker.engine.modules import WEIGHT_MODULE_TYPES, unique_tensors
from worker.engine.quantize.dynamic import input_bits as layer_input_bits
from worker.engine.quantize.rtn import QuantizedWeight
from worker.engine.registry import EngineContext
from worker.engine.shards import ShardWriter

# Files a client needs besides the weights and config.json, copied from the source checkpoint:
# every tokenizer file an upload may carry (one list, kept by the upload validation).
TOKENIZER_FILES = tuple(sorted(UPLOAD_TOKENIZER_FILES)) + ("generation_config.json",)

Format = Literal["dense", "compressed-tensors"]


def resolve_format(requested: str, ctx: EngineContext) -> Format:
    """The format an ``OutputSpec.format`` means for a job whose stages left ``ctx``.

    ``"auto"``: compressed-tensors when a stage quantized (integers, 4x / 8x smaller), dense
    otherwise.
    """
    if requested == "auto":
        return "compressed-tensors" if ctx.quantized else "dense"
    if requested not in ("dense", "compressed-tensors"):
        raise ValueError(f"unknown checkpoint format {requested!r}")
    return requested  # type: ignore[return-value]


# What ``OutputSpec.max_shard_size`` defaults to.
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9


def write_checkpoint(
    model: PreTrainedModel,
    ctx: EngineContext,
    out_dir: Path,
    fmt: Format,
    source_dir: Path,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> dict[str, Any]:
    """Write ``model`` (as the stages left it) to ``out_dir`` with the tokenizer files of
    ``source_dir``, in weights files of at most ``max_shard_bytes``. Returns ``{"format",
    "architecture", "weights_bytes", "shards"}``.

    ``"compressed-tensors"`` needs a quantization stage (``ctx.quantized``: integer layers).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if fmt == "dense":
        # safetensors, the only format transformers writes, in the parameters' dtype.
        model.save_pretrained(out_dir, max_shard_size=max_shard_bytes)
        architecture = type(model).__name__
    elif fmt == "compressed-tensors":
        architecture = _write_compressed(model, ctx.quantized, out_dir, max_shard_bytes)
    else:
        raise ValueError(f"unknown checkpoint format {fmt!r}")
    copy_tokenizer_files(source_dir, out_dir)
    return export_summary(out_dir, fmt, architecture)


def copy_tokenizer_files(source_dir: Path, out_dir: Path) -> None:
    for name in TOKENIZER_FILES:
        if (Path(source_dir) / name).is_file():
            shutil.copyfile(Path(source_dir) / name, out_dir / name)


def export_summary(out_dir: Path, fmt: Format, architecture: str) -> dict[str, Any]:
    """What ``write_checkpoint`` returns about the artifact in ``out_dir``."""
    weights = sorted(Path(out_dir).glob("*.safetensors"))
    return {"format": fmt, "architecture": architecture,
            "weights_bytes": sum(path.stat().st_size for path in weights), "shards": len(weights)}


def write_shards(tensors: dict[str, torch.Tensor], out_dir: Path, max_shard_bytes: int) -> list[Path]:
    """Write ``tensors`` as safetensors files of at most ``max_shard_bytes`` each, in order, a
    tensor larger than that alone in its file: ``model.safetensors`` if one file is enough,
    else ``model-00001-of-0000N.safetensors``... and the index ``model.safetensors.index.json``,
    the layout ``from_pretrained`` reads (``shards.ShardWriter``). Only one shard's tensors are
    copied to the host (made contiguous) at a time. Returns the files written."""
    with ShardWriter(out_dir, max_shard_bytes) as writer:
        for name, tensor in tensors.items():
            writer.add(name, tensor)
    return writer.files


def _write_compressed(
    model: PreTrainedModel, quantized: dict[str, QuantizedWeight], out_dir: Path, max_shard_bytes: int
) -> str:
    if not quantized:
        raise ValueError("the compressed-tensors format needs a quantization stage")
    # The layers that quantize their inputs at run time (W8A8) are marked on the model.
    input_bits = {name: layer_input_bits(model.get_submodule(name)) for name in quantized}
    if isinstance(model, GPT2LMHeadModel):
        config, tensors, quantized = as_gpt_bigcode(model, quantized)
    else:
        config, tensors = saved_config(model), unique_tensors(model)
    config["dtype"] = str(model.dtype).removeprefix("torch.")  # of the tensors left in float
    config["quantization_config"] = _compress_quantized(tensors, quantized, input_bits, linear_names(model))
    write_shards(tensors, out_dir, max_shard_bytes)
    write_config(out_dir, config)
    return config["architectures"][0]


def saved_config(model: PreTrainedModel) -> dict[str, Any]:
    """``model``'s config as a dict, with ``architectures`` as ``save_pretrained`` writes it."""
    config = model.config.to_diff_dict()
    config["architectures"] = [type(model).__name__]
    return config


def write_config(out_dir: Path, config: dict[str, Any]) -> None:
    (Path(out_dir) / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _compress_quantized(
    tensors: dict[str, torch.Tensor],
    quantized: dict[str, QuantizedWeight],
    input_bits: dict[str, int | None],
    linear_names: list[str],
) -> dict[str, Any]:
    """Replace the quantized layers' weights in ``tensors`` by their integers and scales; return
    the ``quantization_config``."""
    scheme = quantization_scheme(quantized, input_bits)
    for name, weight in quantized.items():
        del tensors[f"{name}.weight"]
        tensors.update(layer_tensors(name, weight, scheme.weights))
    return quantization_config(scheme, list(quantized), linear_names)


def quantization_config(
    scheme: QuantizationScheme, quantized_names: list[str], linear_names: list[str]
) -> dict[str, Any]:
    """The ``quantization_config`` of ``config.json``: layers ``quantized_names`` by ``scheme``."""
    # Every Linear not quantized (lm_head, and e.g. OPT's project_in/out) is listed by name, so
    # that a loader does not expect a scale for it.
    ignore = sorted(set(linear_names) - set(quantized_names))
    return QuantizationConfig(
        config_groups={"group_0": scheme},
        format=scheme.format,
        quantization_status="compressed",
        ignore=ignore,
    ).model_dump()


def quantization_scheme(
    quantized: dict[str, QuantizedWeight], input_bits: dict[str, int | None]
) -> QuantizationScheme:
    """The one compressed-tensors scheme that describes every quantized layer (and, with
    ``input_bits`` of a layer not None, its inputs quantized per token at run time).

    transformers dequantizes all dense layers with a single scheme, so the layers must share
    one. A row whose length is not a multiple of ``group_size`` (a partial last group) cannot
    be described by the ``"group"`` strategy, which requires whole groups; the ``"block"``
    strategy with ``[1, group_size]`` blocks pads the last block and describes it exactly
    (transformers loads it; serving engines may support only ``"group"``).

    Only the integers' shape, ``bits``, ``group_size`` and whether there is a zero point are
    read: a streamed export passes weights whose tensors are on the ``meta`` device.
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


def layer_tensors(
    name: str, weight: QuantizedWeight, args: QuantizationArgs
) -> dict[str, torch.Tensor]:
    """The tensors compressed-tensors stores for one layer, named as its compressors name them."""
    # The scale in its own dtype, the model's (quantize_rtn): what compressed-tensors expects.
    tensors = {f"{name}.weight_scale": weight.scale}
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


def linear_names(model: nn.Module) -> list[str]:
    """The names of the ``nn.Linear`` layers of the model as written: GPT-2's Conv1D layers are
    written as Linear layers of GPTBigCode."""
    return [
        name for name, module in model.named_modules() if isinstance(module, WEIGHT_MODULE_TYPES)
    ]


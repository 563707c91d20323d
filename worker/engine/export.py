"""The artifact folder a client downloads, and how it loads it.

Two formats (``OutputSpec.format``):

- ``"dense"``: ``save_pretrained`` safetensors; pruned zeros and dequantized weights are
  stored as plain floats, so any ``transformers`` loads it.
- ``"compressed-tensors"``: the quantized layers stored as integers (int8 as is, int4 packed
  eight to an int32) with their scales, described by a ``quantization_config`` in
  ``config.json`` (https://github.com/neuralmagic/compressed-tensors). The weights file is
  really 4x / 8x smaller.

A client loads either the way ``load_model`` does::

    model = load_model(Path("artifact"), torch.device("cpu"))

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

import torch  # noqa: E402
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32  # noqa: E402
from compressed_tensors.quantization import (  # noqa: E402
    QuantizationArgs,
    QuantizationConfig,
    QuantizationScheme,
)
from safetensors.torch import save_file  # noqa: E402
from torch import nn  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    CompressedTensorsConfig,
    GPT2LMHeadModel,
    GPTBigCodeConfig,
    PreTrainedModel,
)
from transformers.pytorch_utils import Conv1D  # noqa: E402

from worker.engine.modules import WEIGHT_MODULE_TYPES  # noqa: E402
from worker.engine.pipeline import EngineContext  # noqa: E402
from worker.engine.quantize.rtn import QuantizedWeight  # noqa: E402

# Files a client needs besides the weights and config.json, copied from the source checkpoint.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "merges.txt",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "generation_config.json",
)

Format = Literal["dense", "compressed-tensors"]


def load_model(folder: Path, device: torch.device) -> PreTrainedModel:
    """Load a checkpoint (an upload or an artifact) as a float32 model in eval mode.

    Only safetensors, only local files, never remote code. A compressed-tensors artifact is
    dequantized while loading (``dequantize=True``), which gives exactly the weights the engine
    evaluated for every format written here. The default load path, which keeps the weights
    compressed, fails on CPU with transformers 5.24 / compressed-tensors 0.20 for int4 GPTBigCode
    (its weight init touches the removed ``weight``) and for asymmetric int4 channel / group
    weights on any model (the zero point is created unpacked, the checkpoint's is packed).
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    options: dict[str, Any] = {}
    if _is_compressed_tensors(Path(folder)):
        options["quantization_config"] = CompressedTensorsConfig(dequantize=True)
    with warnings.catch_warnings():
        # transformers warns that the artifact's own quantization_config wins over the one
        # passed: intended, only the loading option `dequantize` is taken from ours.
        warnings.filterwarnings("ignore", message=".*already has a `quantization_config`")
        model = AutoModelForCausalLM.from_pretrained(
            folder,
            dtype=torch.float32,
            local_files_only=True,
            use_safetensors=True,
            trust_remote_code=False,
            **options,
        )
    return model.to(device).eval()


def _is_compressed_tensors(folder: Path) -> bool:
    if not (folder / "config.json").is_file():
        return False  # from_pretrained reports the missing config
    config = json.loads((folder / "config.json").read_text())
    quantization = config.get("quantization_config") or {}
    return quantization.get("quant_method") == "compressed-tensors"


def write_checkpoint(
    model: PreTrainedModel, ctx: EngineContext, out_dir: Path, fmt: Format, source_dir: Path
) -> dict[str, Any]:
    """Write ``model`` (as the stages left it) to ``out_dir`` with the tokenizer files of
    ``source_dir``. Returns ``{"format", "architecture", "weights_bytes"}``.

    ``"compressed-tensors"`` needs a quantization stage (``ctx.quantized``); the caller picks
    ``"dense"`` for a job that only pruned.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if fmt == "dense":
        model.save_pretrained(out_dir)  # safetensors, the only format transformers 5 writes
        architecture = type(model).__name__
    elif fmt == "compressed-tensors":
        architecture = _write_compressed(model, ctx.quantized, out_dir)
    else:
        raise ValueError(f"unknown checkpoint format {fmt!r}")
    for name in TOKENIZER_FILES:
        if (Path(source_dir) / name).is_file():
            shutil.copyfile(Path(source_dir) / name, out_dir / name)
    weights_bytes = sum(path.stat().st_size for path in out_dir.glob("*.safetensors"))
    return {"format": fmt, "architecture": architecture, "weights_bytes": weights_bytes}


# ---------------------------------------------------------------------------------------------
# compressed-tensors


def _write_compressed(
    model: PreTrainedModel, quantized: dict[str, QuantizedWeight], out_dir: Path
) -> str:
    if not quantized:
        raise ValueError("the compressed-tensors format needs a quantization stage")
    if isinstance(model, GPT2LMHeadModel):
        config, tensors, quantized = _as_gpt_bigcode(model, quantized)
    else:
        config, tensors = model.config.to_diff_dict(), _unique_tensors(model)
        config["architectures"] = [type(model).__name__]  # as save_pretrained writes it
    config["dtype"] = str(model.dtype).removeprefix("torch.")  # of the tensors left in float
    linear_names = _linear_names(model)
    scheme = _scheme(quantized)

    for name, weight in quantized.items():
        del tensors[f"{name}.weight"]
        tensors.update(_compressed_tensors(name, weight, scheme.weights))

    # Every Linear not quantized (lm_head, and e.g. OPT's project_in/out) is listed by name, so
    # that a loader does not expect a scale for it.
    ignore = sorted(set(linear_names) - set(quantized))
    config["quantization_config"] = QuantizationConfig(
        config_groups={"group_0": scheme},
        format=scheme.format,
        quantization_status="compressed",
        ignore=ignore,
    ).model_dump()
    tensors = {key: value.detach().to("cpu").contiguous() for key, value in tensors.items()}
    save_file(tensors, out_dir / "model.safetensors", metadata={"format": "pt"})
    (out_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return config["architectures"][0]


def _scheme(quantized: dict[str, QuantizedWeight]) -> QuantizationScheme:
    """The one compressed-tensors scheme that describes every quantized layer.

    transformers dequantizes all dense layers with a single scheme, so the layers must share
    one. A row whose length is not a multiple of ``group_size`` (a partial last group) cannot
    be described by the ``"group"`` strategy, which requires whole groups; the ``"block"``
    strategy with ``[1, group_size]`` blocks pads the last block and describes it exactly
    (transformers loads it; serving engines may support only ``"group"``).
    """
    kinds = {(q.bits, q.group_size, q.zero_point is None) for q in quantized.values()}
    if len(kinds) != 1:
        raise ValueError(f"the quantized layers differ in bits / group size / symmetry: {kinds}")
    bits, group_size, symmetric = kinds.pop()
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
    # int8 values are stored as they are; narrower ones are packed into int32 words.
    fmt = "int-quantized" if bits == 8 else "pack-quantized"
    return QuantizationScheme(targets=["Linear"], weights=args, format=fmt)


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

"""Loading a checkpoint (an upload or an artifact) as the model the engine and the evaluation
work on, the way a client's ``transformers`` would load it::

    model = load_model(Path("artifact"), torch.device("cpu"))
    model.dtype          # the checkpoint's own: a bfloat16 upload loads as bfloat16

The model keeps the dtype its checkpoint stores (``checkpoint_dtype``): a float32 copy of a
bfloat16 model would take twice its memory and come back as an artifact twice its size. The
methods do their precision-sensitive arithmetic in float32 one layer at a time, and write the
result back in the layer's dtype (``modules.WeightLayer.set_weight``).
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

# No code path here may reach the Hub; `local_files_only` below is the real guarantee, this
# catches anything (a tokenizer, a config fetch) that forgets it.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import compressed_tensors  # noqa: E402
import torch  # noqa: E402
from compressed_tensors.config import CompressionFormat  # noqa: E402
from compressed_tensors.quantization import QuantizationArgs  # noqa: E402
from compressed_tensors.utils import match_named_modules  # noqa: E402
from torch import nn  # noqa: E402
from transformers import AutoModelForCausalLM, CompressedTensorsConfig, PreTrainedModel  # noqa: E402

from app.safetensors_header import TORCH_DTYPE_NAMES, read_header  # noqa: E402
from worker.engine.quantize.dynamic import quantize_inputs  # noqa: E402

# The floating-point dtypes a model is kept in; any other (float64, float8) loads as float32.
MODEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def load_model(folder: Path, device: torch.device, dtype: torch.dtype | None = None) -> PreTrainedModel:
    """Load a checkpoint as a model in eval mode, in ``dtype`` (default: the checkpoint's own,
    ``checkpoint_dtype``).

    Only safetensors, only local files, never remote code. A compressed-tensors artifact is
    dequantized while loading (``dequantize=True``), which gives exactly the weights the engine
    evaluated for every format written here. The default load path, which keeps the weights
    compressed, fails on CPU with the pinned transformers / compressed-tensors for int4
    GPTBigCode (its weight init touches the removed ``weight``) and for asymmetric int4 channel
    / group weights on any model (the zero point is created unpacked, the checkpoint's is packed).

    ``dequantize=True`` also drops the activation quantization a scheme declares; the default
    path keeps it. So the layers declared to quantize their inputs per token to int8 (W8A8,
    ``dynamic_int8``) get that fake quantization back here, computed as compressed-tensors does:
    the model gives the logits a client's ``from_pretrained`` gives, int8 activations included.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    folder = Path(folder)
    dtype = dtype or checkpoint_dtype(folder)
    compression = _compression_config(folder)
    if compression is None:
        model = _from_pretrained(folder, dtype)
    else:
        _refuse_sparse_layouts(compression)
        model = _from_pretrained(folder, dtype, quantization_config=CompressedTensorsConfig(dequantize=True))
        _quantize_inputs_as_declared(model, compression)
    return model.to(device).eval()


def checkpoint_dtype(folder: Path) -> torch.dtype:
    """The dtype a checkpoint's floating-point weights are stored in: of the float32 / bfloat16
    / float16 tensors in its safetensors headers, the dtype holding the most elements (in a
    compressed-tensors artifact these are the tensors left unquantized and the scales). A
    checkpoint without such tensors: its ``config.json``'s ``dtype`` (``torch_dtype`` in older
    configs), else float32.

    The headers, not the config, decide: they say what is stored, and an upload's config may
    name another dtype or none.
    """
    folder = Path(folder)
    elements: dict[torch.dtype, int] = {}
    for path in sorted(folder.glob("*.safetensors")):
        header = read_header(path, max_header_bytes=path.stat().st_size)
        for entry in header.tensors.values():
            dtype = getattr(torch, TORCH_DTYPE_NAMES[entry.dtype])
            if dtype in MODEL_DTYPES:
                elements[dtype] = elements.get(dtype, 0) + entry.num_elements
    if elements:
        return max(elements, key=elements.__getitem__)
    config_file = folder / "config.json"
    config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    named = config.get("dtype") or config.get("torch_dtype")
    dtype = getattr(torch, named, None) if isinstance(named, str) else None
    return dtype if dtype in MODEL_DTYPES else torch.float32


def _from_pretrained(folder: Path, dtype: torch.dtype, **options: Any) -> PreTrainedModel:
    """Every option that decides what code runs is ours, passed explicitly, never left to
    config.json or a transformers default: local safetensors only, no remote code, PyTorch's
    own scaled-dot-product attention (a config's ``attn_implementation`` could name a kernel
    fetched as code; uploads carrying one are refused, artifacts are ours), no Hub kernels, no
    device map or parallel plan."""
    with warnings.catch_warnings():
        # transformers warns that the artifact's own quantization_config wins over the one
        # passed: intended, only the loading option `dequantize` is taken from ours.
        warnings.filterwarnings("ignore", message=".*already has a `quantization_config`")
        return AutoModelForCausalLM.from_pretrained(
            folder,
            dtype=dtype,
            local_files_only=True,
            use_safetensors=True,
            trust_remote_code=False,
            attn_implementation="sdpa",
            use_kernels=False,
            device_map=None,
            tp_plan=None,
            **options,
        )


def _compression_config(folder: Path) -> dict[str, Any] | None:
    """The ``quantization_config`` of a compressed-tensors checkpoint; None for any other."""
    if not (folder / "config.json").is_file():
        return None  # from_pretrained reports the missing config
    config = json.loads((folder / "config.json").read_text())
    quantization = config.get("quantization_config") or {}
    return quantization if quantization.get("quant_method") == "compressed-tensors" else None


def _refuse_sparse_layouts(compression: dict[str, Any]) -> None:
    """The pinned compressed-tensors has no decompressor for its sparse layouts
    (``sparse-bitmask``, ``sparse-24-bitmask``, ``marlin-24``), and ``from_pretrained`` then
    leaves those layers randomly initialised: fail instead."""
    sparsity = compression.get("sparsity_config") or {}
    fmt = CompressionFormat(sparsity.get("format") or CompressionFormat.dense.value)
    if fmt != CompressionFormat.dense:
        raise ValueError(
            f"a {fmt.value!r} checkpoint cannot be loaded: compressed-tensors "
            f"{compressed_tensors.__version__} removed that format"
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
            quantize_inputs(module, args.num_bits)


def _is_dynamic_per_token_int(args: QuantizationArgs) -> bool:
    """Whether activation ``args`` are what the export writes for W8A8 (and this module
    simulates): symmetric integers, one scale per token computed at run time."""
    return args.type == "int" and args.symmetric and args.strategy == "token" and args.dynamic is True

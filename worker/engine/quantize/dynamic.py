"""Dynamic int8 quantization (W8A8): int8 weights, and int8 activations quantized on the fly.

``{"type": "quantize", "method": "dynamic_int8"}`` stores each weight as a symmetric int8 with one
scale per output channel (``quantize_rtn(bits=8)``), and quantizes each layer's input per token
at run time: every token's input vector gets its own scale, computed from that vector when the
layer runs, so nothing needs calibrating. This is the "W8A8 dynamic" scheme that vLLM serves
with int8 kernels; on a CPU, ``to_cpu_serving`` runs it with PyTorch's int8 matmul::

    q, scale = quantize_per_token(x)             # x: [..., in] -> int8 q, scale [..., 1]
    x_hat = fake_quantize_per_token(x)           # = q * scale, |x - x_hat| <= scale / 2
    quantize_inputs(linear)                      # the layer now sees x_hat instead of x
    model = to_cpu_serving(load_model(artifact, torch.device("cpu")))   # int8 matmuls

The stage leaves the model computing what the artifact computes: weights dequantized from their
integers, inputs fake-quantized per token. The artifact is compressed-tensors with
``input_activations: {num_bits: 8, type: int, symmetric: true, strategy: token, dynamic: true}``;
``from_pretrained`` applies that activation quantization (compressed-tensors' forward wrapper)
and so does ``load_model``, so the perplexity the job reports includes int8 activations.

The scale is ``absmax / 127.5`` with values clamped to ``[-128, 127]``, compressed-tensors'
convention (its symmetric range is ``(q_max - q_min) / 2``), so a client loading the artifact
with ``transformers`` gets exactly the logits the job measured. vLLM's kernels use
``absmax / 127``, a scale 0.4% larger.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from app.specs import QuantizeDynamicInt8, QuantizeRTN
from worker.engine.modules import WeightLayer, compressible_layers
from worker.engine.quantize.rtn import QuantizedWeight, quantize_rtn, quantize_rtn_stage
from worker.engine.registry import EngineContext, register

INPUT_BITS = 8


# ---------------------------------------------------------------------------------------------
# Activations: tensor in, tensor out


def quantize_per_token(x: torch.Tensor, bits: int = INPUT_BITS) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``x`` (``[..., features]``) to signed ``bits``-bit integers with one scale per
    token (per vector along the last dimension): ``scale = absmax / ((2^bits - 1) / 2)``.

    Returns ``(q, scale)``: ``q`` int8 shaped like ``x``, ``scale`` float shaped ``[..., 1]``.
    """
    q_min, q_max = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    absmax = x.abs().amax(dim=-1, keepdim=True)
    scale = absmax / ((q_max - q_min) / 2)
    # An all-zero token: any positive scale stores it exactly. compressed-tensors' choice, eps,
    # and only for a scale of exactly 0 (a float16 scale may be subnormal): the same logits.
    scale = torch.where(scale > 0, scale, torch.finfo(x.dtype).eps)
    q = torch.clamp(torch.round(x / scale), q_min, q_max)
    return q.to(torch.int8), scale


def fake_quantize_per_token(x: torch.Tensor, bits: int = INPUT_BITS) -> torch.Tensor:
    """``x`` rounded to its per-token int grid, in ``x``'s dtype: what an int8 kernel sees."""
    q, scale = quantize_per_token(x, bits)
    rounded = q.to(x.dtype) * scale
    if x.requires_grad:
        # Rounding has no gradient: a stage that trains after this one (distillation) gets the
        # straight-through estimate instead of zero gradients before every layer.
        return x + (rounded - x).detach()
    return rounded


# ---------------------------------------------------------------------------------------------
# Layers whose inputs are fake-quantized (evaluation, and the artifact as load_model loads it).
# The model itself says which: the export declares input quantization for exactly these layers.

_HOOK_ATTRIBUTE = "_squeeze_input_quantization"  # (bits, hook handle)


def quantize_inputs(module: nn.Module, bits: int = INPUT_BITS) -> None:
    """Make ``module`` (a Linear or Conv1D) see its input fake-quantized per token from now on.
    Idempotent; ``stop_quantizing_inputs`` undoes it."""
    if input_bits(module) is not None:
        return

    def fake_quantize_input(_module: nn.Module, args: tuple) -> tuple:
        return (fake_quantize_per_token(args[0], bits), *args[1:])

    setattr(module, _HOOK_ATTRIBUTE, (bits, module.register_forward_pre_hook(fake_quantize_input)))


def input_bits(module: nn.Module) -> int | None:
    """The bits ``module``'s inputs are quantized to, None when they stay float."""
    marker = getattr(module, _HOOK_ATTRIBUTE, None)
    return None if marker is None else marker[0]


def quantizes_inputs(module: nn.Module) -> bool:
    return input_bits(module) is not None


def stop_quantizing_inputs(module: nn.Module) -> None:
    marker = getattr(module, _HOOK_ATTRIBUTE, None)
    if marker is not None:
        marker[1].remove()
        delattr(module, _HOOK_ATTRIBUTE)


# ---------------------------------------------------------------------------------------------
# The stage


@register(QuantizeDynamicInt8)
def quantize_dynamic_int8(
    model: nn.Module, config: QuantizeDynamicInt8, ctx: EngineContext
) -> dict[str, Any]:
    # The weights are exactly RTN int8 per channel (masks kept, progress reported per layer):
    # the RTN stage does it, this one adds the activations.
    weights = quantize_rtn_stage(model, WEIGHTS, ctx)
    for layer in compressible_layers(model):
        quantize_inputs(layer.module)
    return dynamic_int8_metrics(weights)


# The weights of a dynamic int8 layer: RTN, symmetric int8, one scale per output channel.
WEIGHTS = QuantizeRTN(bits=8, group_size=None, symmetric=True)


def dynamic_int8_metrics(weights: dict[str, Any]) -> dict[str, Any]:
    """The stage's metrics from those of its RTN ``WEIGHTS`` quantization."""
    return {
        "layers": weights["layers"],
        "bits": 8,
        "activation_bits": INPUT_BITS,
        "activation_strategy": "token",
        "max_abs_error": weights["max_abs_error"],
    }


# ---------------------------------------------------------------------------------------------
# CPU serving: real int8 matmuls


class Int8DynamicLinear(nn.Module):
    """``y = x W^T + b`` as one int8 x int8 -> int32 matmul (``torch._int_mm``): ``W`` int8 with a
    scale per output channel, ``x`` quantized per token when the layer runs. Computes what the
    fake-quantized layer computes, up to float rounding (the int32 sum is exact).

    PyTorch's own dynamic ``Linear`` (``torch.ao.nn.quantized.dynamic``, fbgemm) quantizes the
    activations per tensor, to 7 bits on x86, and rests on quantized tensors that torch 2.13
    deprecates; this module keeps the artifact's per-token scheme with a non-deprecated op.
    """

    def __init__(self, quantized: QuantizedWeight, bias: torch.Tensor | None):
        super().__init__()
        if quantized.bits != 8 or quantized.group_size is not None or quantized.zero_point is not None:
            raise ValueError("int8 serving needs symmetric int8 weights with one scale per output channel")
        self.out_features, self.in_features = quantized.q.shape
        self.register_buffer("weight_int8", quantized.q.contiguous())  # [out, in]
        self.register_buffer("weight_scale", quantized.scale.reshape(1, -1).float())  # [1, out]
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())

    @classmethod
    def from_layer(cls, layer: WeightLayer) -> Int8DynamicLinear:
        # Weights already on the int8 grid (a loaded artifact) re-quantize to the same integers.
        return cls(quantize_rtn(layer.weight(), bits=8), getattr(layer.module, "bias", None))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, scale = quantize_per_token(x.reshape(-1, self.in_features).float())
        # The [out, in] weight as a transposed view: faster in _int_mm than a contiguous copy.
        # In place from here: at one token per call, each extra op costs as much as the matmul.
        y = torch._int_mm(q, self.weight_int8.t()).float().mul_(scale).mul_(self.weight_scale)
        if self.bias is not None:
            y.add_(self.bias)
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-token inputs"


def to_cpu_serving(model: nn.Module) -> nn.Module:
    """Replace every compressible layer (the decoder blocks' Linear / Conv1D) by an
    ``Int8DynamicLinear``, in place, and return the model. The embeddings and ``lm_head`` stay
    float, as in the artifact. On a CPU, a 48M-parameter Llama ran a 128-token forward about
    twice as fast as in float32, a one-token forward 1.2-2x as fast::

        model = to_cpu_serving(load_model(Path("artifact"), torch.device("cpu")))

    Meant for a W8A8 artifact, whose weights are already int8 per channel; any other model is
    quantized that way first (RTN), which changes its outputs.
    """
    if any(p.device.type != "cpu" for p in model.parameters()):
        raise ValueError("to_cpu_serving needs a model on the CPU")
    for layer in compressible_layers(model):
        parent_name, _, child = layer.name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, Int8DynamicLinear.from_layer(layer))
    return model

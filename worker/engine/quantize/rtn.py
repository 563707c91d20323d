"""Round-to-nearest weight quantization.

``{"type": "quantize", "method": "rtn", "bits": 4, "group_size": 128}`` stores each weight as a
4-bit integer with one float scale per 128 inputs of a row. The model keeps running in float:
each layer gets the dequantized weight, which is exactly what a client loading the artifact
computes, so the evaluation measures what will be shipped::

    qw = quantize_rtn(w, bits=4, group_size=128)   # w: [out, in]
    w_hat = dequantize(qw)                          # |w - w_hat| <= scale / 2, element-wise

The scales are stored in the weight's dtype (bfloat16 for a bfloat16 model), as
compressed-tensors creates them and llm-compressor writes them; the integers are rounded with
the scale as stored, so ``dequantize`` (float32, exact) rounded to the model's dtype is
bit for bit what compressed-tensors computes in that dtype when it loads the artifact.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from app.specs import QuantizeRTN
from worker.engine.modules import WeightLayer, compressible_layers
from worker.engine.registry import EngineContext, register


@dataclass
class QuantizedWeight:
    """An ``[out, in]`` weight as integers plus, per row and group of ``group_size`` inputs, a
    scale (and a zero point when asymmetric). ``group_size=None``: one group per row.

    The value of an element is ``(q - zero_point) * scale``, the compressed-tensors convention.
    """

    q: torch.Tensor  # int8 [out, in], values within the signed ``bits`` range
    scale: torch.Tensor  # [out, n_groups], in the dtype the artifact stores (the model's)
    zero_point: torch.Tensor | None  # int8 [out, n_groups]; None when symmetric
    bits: int
    group_size: int | None

    def per_element(self, per_group: torch.Tensor) -> torch.Tensor:
        """Spread an ``[out, n_groups]`` tensor over ``[out, in]``; a partial last group is
        cut to the row's length."""
        if self.group_size is None:
            return per_group.expand(self.q.shape)
        return per_group.repeat_interleave(self.group_size, dim=1)[:, : self.q.shape[1]]

    def masked(self, keep: torch.Tensor) -> QuantizedWeight:
        """The same weight with the elements outside the keep-mask set to the integer that
        dequantizes to exactly 0."""
        zero = 0 if self.zero_point is None else self.per_element(self.zero_point)
        return replace(self, q=torch.where(keep.to(self.q.device), self.q, zero).to(torch.int8))


def quantize_rtn(
    weight: torch.Tensor,
    bits: int,
    group_size: int | None = None,
    symmetric: bool = True,
    scale_dtype: torch.dtype | None = None,
) -> QuantizedWeight:
    """Quantize an ``[out, in]`` weight to ``bits``-bit signed integers, rounding to nearest.

    Symmetric: ``scale = absmax / (2^(bits-1) - 1)``, no zero point. Asymmetric: the group's
    ``[min, max]`` range, widened to contain 0, is mapped onto the whole integer range with an
    integer zero point; since 0 is in the range, a weight of 0 stays exactly 0 (pruned weights
    stay pruned). A row of length not divisible by ``group_size`` gets a shorter last group.

    The arithmetic is float32; the scale is rounded to ``scale_dtype`` (default: the weight's
    dtype, float32 for a non-float weight) before the weights are rounded with it.
    """
    scale_dtype = scale_dtype or (weight.dtype if weight.is_floating_point() else torch.float32)
    weight = weight.detach().float()
    rows, columns = weight.shape
    size = group_size or columns
    n_groups = math.ceil(columns / size)
    # Padding with zeros changes neither a group's absmax nor its 0-containing range.
    padding = n_groups * size - columns
    groups = (F.pad(weight, (0, padding)) if padding else weight).reshape(rows, n_groups, size)
    q_min, q_max = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1

    # Both ends of each group, without an |w| temporary (amin and amax are cheap, a weight-sized
    # allocation is not: the temporaries below are updated in place).
    low, high = groups.amin(dim=-1), groups.amax(dim=-1)
    if symmetric:
        scale = _stored(torch.maximum(-low, high) / q_max, scale_dtype)  # the absmax
        zero_point = None
    else:
        low, high = low.clamp(max=0.0), high.clamp(min=0.0)
        scale = _stored((high - low) / (q_max - q_min), scale_dtype)
        zero_point = torch.round(q_min - low / scale).clamp(q_min, q_max)

    shifted = (groups / scale.unsqueeze(-1)).round_()
    if zero_point is not None:
        shifted += zero_point.unsqueeze(-1)
    q = shifted.clamp_(q_min, q_max).view(rows, n_groups * size)[:, :columns]
    return QuantizedWeight(
        q=q.to(torch.int8).contiguous(),
        scale=scale.to(scale_dtype),
        zero_point=None if zero_point is None else zero_point.to(torch.int8),
        bits=bits,
        group_size=group_size,
    )


def _stored(scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The float32 ``scale`` as ``dtype`` will store it (rounded), never 0: an all-zero group
    (or a scale below ``dtype``'s range) gets 1, which stores it exactly and avoids 0 / 0."""
    scale = scale.to(dtype).float()
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def dequantize(quantized: QuantizedWeight) -> torch.Tensor:
    """The float32 ``[out, in]`` weight ``(q - zero_point) * scale``, computed in the same order
    as compressed-tensors so that a client loading the artifact gets identical values (exact in
    float32: a 9-bit integer times a bfloat16 or float16 scale; rounded once, to the model's
    dtype, when it becomes the layer's weight, as compressed-tensors rounds its product)."""
    values = quantized.q.to(torch.float32)  # a new tensor: updated in place below
    if quantized.zero_point is not None:
        values -= quantized.per_element(quantized.zero_point).to(torch.float32)
    return values.mul_(quantized.per_element(quantized.scale.float()))


@register(QuantizeRTN)
def quantize_rtn_stage(model: nn.Module, config: QuantizeRTN, ctx: EngineContext) -> dict[str, Any]:
    layers = compressible_layers(model)
    max_abs_error = 0.0
    for index, layer in enumerate(layers):
        ctx.step(index, len(layers))
        max_abs_error = max(max_abs_error, quantize_layer(layer, config, ctx))
    return rtn_metrics(config, len(layers), max_abs_error)


def quantize_layer(layer: WeightLayer, config: QuantizeRTN, ctx: EngineContext) -> float:
    """Quantize one layer: its weight becomes the dequantized one, its integers go to
    ``ctx.quantized`` (its zeros kept, as ``ctx.masks`` says). Returns the largest ``|w - w_hat|``."""
    weight = layer.weight()
    quantized = quantize_rtn(weight, config.bits, config.group_size, config.symmetric)
    keep = ctx.masks.get(layer.name)
    if keep is not None:
        # Zeros already quantize to exactly 0; this makes it certain for any later method.
        quantized = quantized.masked(keep)
    dequantized = dequantize(quantized)
    error = weight.to(torch.float32, copy=True).sub_(dequantized)  # one temporary, not two
    max_abs_error = max(0.0, -float(error.min()), float(error.max()))  # |error|.max(), no |error|
    layer.set_weight(dequantized)
    ctx.quantized[layer.name] = quantized
    return max_abs_error


def rtn_metrics(config: QuantizeRTN, layers: int, max_abs_error: float) -> dict[str, Any]:
    return {
        "layers": layers,
        "bits": config.bits,
        "group_size": config.group_size,
        "symmetric": config.symmetric,
        "max_abs_error": max_abs_error,
    }

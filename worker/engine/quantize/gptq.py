"""GPTQ (Frantar et al. 2022, https://arxiv.org/abs/2210.17323): round the weights to the
integer grid column by column, and spread each column's rounding error over the columns not yet
rounded with the inverse Hessian of the layer's calibration inputs (``hessian.py``)::

    {"type": "quantize", "method": "gptq", "bits": 4, "group_size": 128}
    {"type": "quantize", "method": "gptq", "bits": 4, "group_size": 128, "act_order": true}

The result is stored exactly like RTN's (``QuantizedWeight``: integers, a scale per row and
group of inputs, a zero point when asymmetric), so the compressed-tensors export packs it the
same way. The grids are RTN's: a group's scale and zero point are ``quantize_rtn``'s for the
group's weights, taken when the sweep reaches the group (so they fit the weights as updated by
the columns before). With ``act_order`` the columns are visited by decreasing Hessian
diagonal, and the groups' grids are taken up front from the weight in its own order ("static
groups"), so the stored layout stays plain group-wise, with no column permutation (g_idx).

Pruned weights stay exactly 0: masked before, and rounded to the integer that means 0.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from app.specs import QuantizeGPTQ
from worker.engine.capture import layer_method
from worker.engine.hessian import ColumnRule, InputHessian, sweep_columns
from worker.engine.modules import WeightLayer
from worker.engine.quantize.rtn import QuantizedWeight, dequantize, quantize_rtn
from worker.engine.registry import EngineContext


def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    bits: int,
    group_size: int | None = 128,
    symmetric: bool = True,
    dampening: float = 0.01,
    act_order: bool = False,
    block_size: int = 128,
    keep: torch.Tensor | None = None,
) -> QuantizedWeight:
    """Quantize the ``[out, in]`` weight given the ``[in, in]`` Hessian of its inputs::

        quantized = gptq_quantize(w, hessian.hessian(), bits=4, group_size=128)
        layer.set_weight(dequantize(quantized))

    ``group_size=None``: one scale per row. A row not a multiple of ``group_size`` long gets a
    shorter last group. ``keep``, a pruning mask, is kept: those weights dequantize to 0.
    """
    rows, columns = weight.shape
    scale_dtype = weight.dtype  # the sweep runs in float32; the scales are stored as the weight
    size = group_size or columns
    q_min, q_max = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    if keep is not None:
        keep = keep.to(device=weight.device, dtype=torch.bool)
        weight = weight * keep
    order = (torch.argsort(hessian.diagonal(), descending=True, stable=True) if act_order
             else torch.arange(columns, device=weight.device))
    order_list = order.tolist()
    n_groups = math.ceil(columns / size)
    q = torch.zeros(rows, columns, dtype=torch.int8, device=weight.device)
    scale = torch.ones(rows, n_groups, dtype=torch.float32, device=weight.device)
    zero_point = torch.zeros(rows, n_groups, dtype=torch.float32, device=weight.device)

    def start_segment(
        start: int, current: torch.Tensor, factor_diagonal: torch.Tensor
    ) -> ColumnRule:
        if act_order:
            # One segment, the whole row, before any update: every group's grid, in the
            # original column order.
            grid = quantize_rtn(current[:, torch.argsort(order)], bits, group_size, symmetric, scale_dtype)
            scale[:] = grid.scale
            if grid.zero_point is not None:
                zero_point[:] = grid.zero_point
        else:
            if keep is not None:  # pruned weights will be 0: they must not widen the grid
                current = current * keep[:, start:start + current.shape[1]]
            grid = quantize_rtn(current, bits, None, symmetric, scale_dtype)
            scale[:, start // size] = grid.scale[:, 0]
            if grid.zero_point is not None:
                zero_point[:, start // size] = grid.zero_point[:, 0]
        return round_column

    def round_column(column: int, values: torch.Tensor) -> torch.Tensor:
        original = order_list[column]
        group_scale, group_zero = scale[:, original // size], zero_point[:, original // size]
        # quantize_rtn's rounding, with the grid fixed when the group started.
        integers = (torch.round(values / group_scale) + group_zero).clamp(q_min, q_max)
        if keep is not None:
            integers = torch.where(keep[:, original], integers, group_zero)
        q[:, original] = integers.to(torch.int8)
        # The float value dequantize() gives for these integers, computed the same way.
        return (integers - group_zero) * group_scale

    if act_order:
        weight, hessian = weight[:, order], hessian[order][:, order]
    sweep_columns(weight, hessian, dampening, block_size,
                  segment_size=columns if act_order else size, start_segment=start_segment)
    return QuantizedWeight(
        q=q, scale=scale.to(scale_dtype), zero_point=None if symmetric else zero_point.to(torch.int8),
        bits=bits, group_size=group_size,
    )


@layer_method(QuantizeGPTQ)
class GPTQStep:
    """GPTQ on one layer at a time (``registry.LayerStep``)."""

    needs_calibration = True

    def __init__(self, config: QuantizeGPTQ, ctx: EngineContext):
        self.config, self.ctx = config, ctx
        self.layers, self.max_abs_error = 0, 0.0

    def statistic(self, layer: WeightLayer) -> InputHessian:
        return InputHessian(layer.in_features, self.ctx.device)

    def compress(self, layer: WeightLayer, hessian: InputHessian) -> None:
        config, weight = self.config, layer.weight()
        quantized = gptq_quantize(
            weight, hessian.hessian(), config.bits, config.group_size, config.symmetric,
            config.dampening, config.act_order, config.block_size, keep=self.ctx.masks.get(layer.name),
        )
        dequantized = dequantize(quantized)
        self.max_abs_error = max(self.max_abs_error, float((weight.float() - dequantized).abs().max()))
        layer.set_weight(dequantized)
        self.ctx.quantized[layer.name] = quantized
        self.layers += 1

    def metrics(self) -> dict[str, Any]:
        config = self.config
        return {
            "layers": self.layers,
            "bits": config.bits,
            "group_size": config.group_size,
            "symmetric": config.symmetric,
            "act_order": config.act_order,
            "max_abs_error": self.max_abs_error,
        }

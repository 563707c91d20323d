"""SparseGPT (Frantar & Alistarh 2023, https://arxiv.org/abs/2301.00774): prune, then move the
weights that stay so that the layer's output on the calibration inputs barely changes.

The columns of a weight are visited from left to right; a pruned weight's error is spread
over the columns not yet visited with the inverse Hessian of the layer's inputs (the same
sweep as GPTQ, ``hessian.py``). Which weights to prune is decided per block of columns, by
``w^2 / [H^-1]_jj^2``, the output error pruning that weight alone would cause::

    {"type": "prune", "method": "sparsegpt", "sparsity": 0.5, "block_size": 128}
    {"type": "prune", "method": "sparsegpt", "pattern": "2:4"}

Unlike the paper's threshold per block, the count pruned per block is exact, so each layer
loses exactly ``round(sparsity * weights)``; the choice is still made over the whole block,
so rows that tolerate it lose more than others.
"""

from __future__ import annotations

from typing import Any

import torch

from app.specs import PruneSparseGPT
from worker.engine.capture import layer_method
from worker.engine.hessian import ColumnRule, InputHessian, sweep_columns
from worker.engine.modules import WeightLayer
from worker.engine.prune.masking import SparsityCount, apply_keep_mask
from worker.engine.prune.nm import nm_mask
from worker.engine.prune.wanda import drop_lowest
from worker.engine.registry import EngineContext


def sparsegpt_prune(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    sparsity: float,
    n_m: tuple[int, int] | None = None,
    block_size: int = 128,
    dampening: float = 0.01,
    keep: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prune the ``[out, in]`` weight given the ``[in, in]`` Hessian of its inputs; return the
    new float32 weight and its keep-mask::

        new_weight, keep = sparsegpt_prune(w, hessian.hessian(), sparsity=0.5)
        # exactly round(0.5 * w.numel()) entries of keep are False, and new_weight is 0 there

    With ``n_m=(2, 4)`` the 2 lowest of every 4 consecutive inputs are pruned instead
    (``sparsity`` is then ignored). ``keep``, an earlier stage's mask, is honoured: those
    weights are pruned first and count towards the target.
    """
    rows, columns = weight.shape
    if n_m is not None and columns % n_m[1]:
        raise ValueError(
            f"an N:M pattern needs rows of a multiple of {n_m[1]} inputs, got {columns}"
        )
    pruned = torch.zeros(rows, columns, dtype=torch.bool, device=weight.device)
    forced = None if keep is None else ~keep.to(device=weight.device, dtype=torch.bool)
    pruned_so_far = 0

    def start_segment(
        start: int, current: torch.Tensor, factor_diagonal: torch.Tensor
    ) -> ColumnRule:
        nonlocal pruned_so_far
        end = start + current.shape[1]
        scores = current.pow(2) / factor_diagonal.pow(2).unsqueeze(0)
        if forced is not None:
            scores = scores.masked_fill(forced[:, start:end], float("-inf"))
        if n_m is not None:
            segment_keep = nm_mask(scores, *n_m)
        else:
            # As many as keeps the layer's running total at round(sparsity * columns seen), so
            # the total over the layer is exact whatever the block size.
            count = round(sparsity * rows * end) - pruned_so_far
            if forced is not None:
                count = max(count, int(forced[:, start:end].sum()))
            segment_keep = drop_lowest(scores.reshape(1, -1), min(count, scores.numel()))
            segment_keep = segment_keep.view(scores.shape)
        pruned[:, start:end] = ~segment_keep
        pruned_so_far += int((~segment_keep).sum())
        return lambda column, values: values.masked_fill(pruned[:, column], 0.0)

    segment_size = n_m[1] if n_m is not None else block_size
    new_weight = sweep_columns(weight, hessian, dampening, block_size, segment_size, start_segment)
    return new_weight, ~pruned


QUANTIZED_FIRST = "sparsegpt changes the weights it keeps: put it before quantization"


@layer_method(PruneSparseGPT)
class SparseGPTStep:
    """SparseGPT on one layer at a time (``registry.LayerStep``)."""

    needs_calibration = True

    def __init__(self, config: PruneSparseGPT, ctx: EngineContext):
        if ctx.quantized:  # a whole model an earlier stage quantized: fail before calibrating
            raise ValueError(QUANTIZED_FIRST)
        self.config, self.ctx, self.count = config, ctx, SparsityCount()

    def statistic(self, layer: WeightLayer) -> InputHessian:
        return InputHessian(layer.in_features, self.ctx.device)

    def compress(self, layer: WeightLayer, hessian: InputHessian) -> None:
        if layer.name in self.ctx.quantized:
            # The weights kept are changed, so the integers an earlier quantization stored
            # would no longer describe them.
            raise ValueError(QUANTIZED_FIRST)
        config = self.config
        new_weight, keep = sparsegpt_prune(
            layer.weight(), hessian.hessian(), config.sparsity, config.n_m,
            config.block_size, config.dampening, keep=self.ctx.masks.get(layer.name),
        )
        layer.set_weight(new_weight)
        apply_keep_mask(layer, keep, self.ctx)
        self.count.add(self.ctx.masks[layer.name])

    def metrics(self) -> dict[str, Any]:
        return self.count.metrics()

"""What every pruning method does once it has chosen which weights to keep.

A keep-mask is a bool tensor shaped like the ``[out, in]`` weight, ``True`` where the weight
stays. Masks compose: a layer pruned twice keeps only what both stages kept, and the mask is
left in ``ctx.masks`` so that later stages (quantization) keep the zeros.
"""

from __future__ import annotations

from typing import Any

import torch

from worker.engine.modules import WeightLayer
from worker.engine.registry import EngineContext


def apply_keep_mask(layer: WeightLayer, keep: torch.Tensor, ctx: EngineContext) -> None:
    """Zero ``layer``'s weights outside ``keep`` (and outside any earlier mask); record the
    combined mask in ``ctx.masks``."""
    keep = keep.to(device=layer.weight().device, dtype=torch.bool)
    earlier = ctx.masks.get(layer.name)
    if earlier is not None:
        keep = keep & earlier
    layer.set_weight(layer.weight() * keep)
    ctx.masks[layer.name] = keep
    # A layer quantized by an earlier stage: keep its stored integers in step with the model.
    if layer.name in ctx.quantized:
        ctx.quantized[layer.name] = ctx.quantized[layer.name].masked(keep)


def pruning_metrics(layers: list[WeightLayer], ctx: EngineContext) -> dict[str, Any]:
    """``{"layers": n, "sparsity": f}``: f is the fraction of the compressible weights that the
    masks remove, all pruning stages so far included."""
    total = sum(layer.weight().numel() for layer in layers)
    pruned = sum(int((~ctx.masks[layer.name]).sum()) for layer in layers if layer.name in ctx.masks)
    return sparsity_metrics(len(layers), pruned, total)


def sparsity_metrics(layers: int, pruned: int, total: int) -> dict[str, Any]:
    """``pruning_metrics`` from counts: ``pruned`` of the ``total`` weights of ``layers`` layers."""
    return {"layers": layers, "sparsity": pruned / total if total else 0.0}


class SparsityCount:
    """``sparsity_metrics`` kept as counts, layer after layer: ``add`` each layer's combined
    keep-mask once it is final (a block-by-block job keeps no mask past its block)."""

    def __init__(self) -> None:
        self.layers = self.pruned = self.total = 0

    def add(self, keep: torch.Tensor) -> None:
        self.layers += 1
        self.pruned += keep.numel() - int(keep.sum())
        self.total += keep.numel()

    def metrics(self) -> dict[str, Any]:
        return sparsity_metrics(self.layers, self.pruned, self.total)

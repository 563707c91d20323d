"""Magnitude pruning: zero the weights of smallest absolute value.

``{"type": "prune", "method": "magnitude", "sparsity": 0.5}`` zeros exactly half of each
layer; with ``"scope": "global"`` one threshold is shared by all layers, so layers with many
small weights lose more of them while the total is still exactly half. With
``"pattern": "2:4"`` the two smallest of every four consecutive inputs are zeroed.
"""

from __future__ import annotations

import struct
from typing import Any

import torch
from torch import nn

from app.specs import PruneMagnitude
from worker.engine.modules import compressible_layers
from worker.engine.registry import EngineContext, register
from worker.engine.prune.masking import apply_keep_mask, pruning_metrics
from worker.engine.prune.nm import nm_mask


def magnitude_mask(weight: torch.Tensor, sparsity: float) -> torch.Tensor:
    """A keep-mask that drops exactly ``round(sparsity * numel)`` weights of smallest ``|w|``."""
    return magnitude_masks([weight], sparsity)[0]


def magnitude_nm_mask(weight: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """A keep-mask keeping the ``n`` largest ``|w|`` of every ``m`` consecutive inputs."""
    return nm_mask(_magnitude(weight), n, m)


def magnitude_masks(weights: list[torch.Tensor], sparsity: float) -> list[torch.Tensor]:
    """Keep-masks, one per weight, that together drop exactly ``round(sparsity * total)`` of the
    smallest ``|w|`` across all of them (one global threshold).

    Ties at the threshold are broken by position: the earliest tensor in the list, then the
    lowest flat index, is dropped first, so the result never depends on sort internals.
    """
    total = sum(w.numel() for w in weights)
    to_prune = round(sparsity * total)
    if to_prune == 0:
        return [torch.ones_like(w, dtype=torch.bool) for w in weights]
    threshold = _kth_smallest_magnitude(weights, to_prune)

    keeps = [_magnitude(w) > threshold for w in weights]
    below = sum(int((_magnitude(w) < threshold).sum()) for w in weights)
    ties_to_prune = to_prune - below  # the rest of the ties at the threshold are kept
    for weight, keep in zip(weights, keeps):
        ties = (_magnitude(weight) == threshold).flatten().nonzero().squeeze(1)
        pruned_here = min(ties_to_prune, ties.numel())
        keep.view(-1)[ties[pruned_here:]] = True
        ties_to_prune -= pruned_here
    return keeps


def _kth_smallest_magnitude(weights: list[torch.Tensor], k: int) -> float:
    """The k-th smallest ``|w|`` (1-based) over all the tensors, without concatenating them.

    The bit patterns of non-negative float32 values sort like the values, so a binary search
    over the 31 bits finds the exact k-th value in 31 counting passes, using no memory beyond
    one layer's temporary; ``torch.cat`` + ``kthvalue`` would copy every weight of the model.
    """
    low, high = 0, 0x7F800000  # the bit patterns of 0.0 and +inf
    while low < high:
        middle = (low + high) // 2
        value = _float32_from_bits(middle)
        at_most = sum(int((_magnitude(w) <= value).sum()) for w in weights)
        if at_most >= k:
            high = middle
        else:
            low = middle + 1
    return _float32_from_bits(low)


def _magnitude(weight: torch.Tensor) -> torch.Tensor:
    # float32 so that the threshold, a float32 value, compares exactly whatever the weight dtype;
    # contiguous so that masks built from it can be indexed flat (Conv1D weights are transposed).
    return weight.detach().abs().float().contiguous()


def _float32_from_bits(bits: int) -> float:
    return struct.unpack("<f", struct.pack("<i", bits))[0]


@register(PruneMagnitude)
def prune_magnitude(model: nn.Module, config: PruneMagnitude, ctx: EngineContext) -> dict[str, Any]:
    layers = compressible_layers(model)
    global_keeps = None
    if config.scope == "global":
        ctx.check_cancelled()
        global_keeps = magnitude_masks([layer.weight() for layer in layers], config.sparsity)
    for index, layer in enumerate(layers):
        ctx.step(index, len(layers))
        if global_keeps is not None:
            keep = global_keeps[index]
        elif config.n_m is not None:
            keep = magnitude_nm_mask(layer.weight(), *config.n_m)
        else:
            keep = magnitude_mask(layer.weight(), config.sparsity)
        apply_keep_mask(layer, keep, ctx)
    return pruning_metrics(layers, ctx)

"""Magnitude pruning: zero the weights of smallest absolute value.

``{"type": "prune", "method": "magnitude", "sparsity": 0.5}`` zeros exactly half of each
layer; with ``"scope": "global"`` one threshold is shared by all layers, so layers with many
small weights lose more of them while the total is still exactly half. With
``"pattern": "2:4"`` the two smallest of every four consecutive inputs are zeroed.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any, Callable, Iterable

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
    threshold = GlobalThreshold.find(lambda: iter(weights), sparsity)
    return [threshold.keep_mask(weight) for weight in weights]


@dataclass
class GlobalThreshold:
    """One magnitude threshold over many weights, found from passes that read them one at a time
    (``weights`` is called once per pass), so a model streamed from its checkpoint needs no more
    memory than one layer::

        threshold = GlobalThreshold.find(lambda: (read(name) for name in names), 0.5)
        keeps = [threshold.keep_mask(read(name)) for name in names]   # same order, once each

    ``keep_mask`` keeps what is above the threshold and, of the ties at it, drops the first
    ``ties_to_prune`` met (in the order the weights are given).
    """

    threshold: float
    ties_to_prune: int

    @classmethod
    def find(cls, weights: Callable[[], Iterable[torch.Tensor]], sparsity: float) -> GlobalThreshold:
        histogram, total = _magnitude_histogram(weights(), None)
        to_prune = round(sparsity * total)
        if to_prune == 0:
            return cls(threshold=-1.0, ties_to_prune=0)  # every |w| is above it
        threshold, below = _kth_smallest_magnitude(weights, histogram, to_prune)
        return cls(threshold=threshold, ties_to_prune=to_prune - below)

    def keep_mask(self, weight: torch.Tensor) -> torch.Tensor:
        magnitude = _magnitude(weight)
        keep = magnitude > self.threshold
        ties = (magnitude == self.threshold).flatten().nonzero().squeeze(1)
        pruned_here = min(self.ties_to_prune, ties.numel())
        keep.view(-1)[ties[pruned_here:]] = True  # the rest of the ties at the threshold are kept
        self.ties_to_prune -= pruned_here
        return keep


# The bit patterns of non-negative float32 values sort like the values: the high 16 bits give a
# coarse histogram, the low 16 bits of the values in one coarse bin a fine one.


def _kth_smallest_magnitude(
    weights: Callable[[], Iterable[torch.Tensor]], coarse: torch.Tensor, k: int
) -> tuple[float, int]:
    """The k-th smallest ``|w|`` (1-based) over all the tensors and how many are smaller than
    it, without concatenating them: two histogram passes (the coarse one given) over the bit
    patterns; ``torch.cat`` + ``kthvalue`` would copy every weight of the model."""
    cumulative = coarse.cumsum(0)
    high = int(torch.searchsorted(cumulative, k))  # the first coarse bin holding k values
    before_high = int(cumulative[high - 1]) if high else 0
    fine, _ = _magnitude_histogram(weights(), high)
    cumulative = fine.cumsum(0)
    low = int(torch.searchsorted(cumulative, k - before_high))
    below = before_high + (int(cumulative[low - 1]) if low else 0)
    return _float32_from_bits((high << 16) | low), below


def _magnitude_histogram(weights: Iterable[torch.Tensor], high: int | None) -> tuple[torch.Tensor, int]:
    """Counts of the float32 bit patterns of ``|w|``: by their high 16 bits (``high=None``), or
    by their low 16 bits among those whose high bits are ``high``. Also the number of weights."""
    counts = torch.zeros(1 << 16, dtype=torch.int64)
    total = 0
    for weight in weights:
        bits = _magnitude(weight).view(torch.int32).flatten()
        total += bits.numel()
        if high is not None:
            bits = bits[(bits >> 16) == high] & 0xFFFF
        else:
            bits = bits >> 16  # at most 0x7FFF: |w| has no sign bit
        counts += torch.bincount(bits.cpu(), minlength=1 << 16)
    return counts, total


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
        keep = global_keeps[index] if global_keeps is not None else layer_keep_mask(layer.weight(), config)
        apply_keep_mask(layer, keep, ctx)
    return pruning_metrics(layers, ctx)


def layer_keep_mask(weight: torch.Tensor, config: PruneMagnitude) -> torch.Tensor:
    """The keep-mask of one layer for ``scope="layer"`` (``GlobalThreshold`` for ``"global"``)."""
    if config.n_m is not None:
        return magnitude_nm_mask(weight, *config.n_m)
    return magnitude_mask(weight, config.sparsity)

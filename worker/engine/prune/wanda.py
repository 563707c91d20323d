"""Wanda (Sun et al. 2023, https://arxiv.org/abs/2306.11695): prune by weight times activation.

A weight's importance is ``|W_ij| * ||x_j||``, its magnitude times the norm of the input it
multiplies over the calibration tokens: a small weight on a large input matters. The weights
are compared within each output row, and nothing else is updated::

    {"type": "prune", "method": "wanda", "sparsity": 0.5}     # half of every row
    {"type": "prune", "method": "wanda", "pattern": "2:4"}    # 2 kept in every 4 inputs

The input norms come from the calibration text, block by block (``capture.py``): each block
is calibrated on the outputs of the blocks already pruned.
"""

from __future__ import annotations

from typing import Any

import torch

from app.specs import PruneWanda
from worker.engine.capture import layer_method
from worker.engine.modules import WeightLayer
from worker.engine.prune.masking import SparsityCount, apply_keep_mask
from worker.engine.registry import EngineContext
from worker.engine.prune.nm import nm_mask


class InputNormSquared:
    """``sum x_j^2`` over every token the layer saw, for each input ``j`` (float32). ``add`` is
    the calibration hook's statistic."""

    def __init__(self, in_features: int, device: torch.device | str = "cpu"):
        self._sum = torch.zeros(in_features, dtype=torch.float32, device=device)
        self._count = 0

    def add(self, inputs: torch.Tensor) -> None:
        rows = inputs.detach().reshape(-1, inputs.shape[-1]).to(self._sum.device, torch.float32)
        self._sum += rows.pow(2).sum(dim=0)
        self._count += rows.shape[0]

    def norm_squared(self) -> torch.Tensor:
        """The sums; all ones (pruning by magnitude) if the layer never saw an input."""
        return self._sum if self._count else torch.ones_like(self._sum)


def wanda_scores(weight: torch.Tensor, input_norm_squared: torch.Tensor) -> torch.Tensor:
    """``|W| * ||x||``: the ``[out, in]`` importance of each weight, given each input's squared
    norm over the calibration tokens (``[in]``)."""
    return weight.detach().float().abs() * input_norm_squared.float().sqrt().unsqueeze(0)


def wanda_mask(
    weight: torch.Tensor,
    input_norm_squared: torch.Tensor,
    sparsity: float,
    n_m: tuple[int, int] | None = None,
) -> torch.Tensor:
    """A keep-mask for the ``[out, in]`` weight: in each row the ``round(sparsity * in)``
    lowest scores are dropped; with ``n_m=(2, 4)`` instead the 2 lowest of every 4 consecutive
    inputs (``sparsity`` is then ignored)::

        keep = wanda_mask(layer.weight(), norms.norm_squared(), 0.5)
    """
    scores = wanda_scores(weight, input_norm_squared)
    if n_m is not None:
        return nm_mask(scores, *n_m)
    return drop_lowest(scores, round(sparsity * scores.shape[1]))


def drop_lowest(scores: torch.Tensor, count: int) -> torch.Tensor:
    """A keep-mask shaped like the 2-D ``scores`` with the ``count`` lowest of each row
    dropped. Ties are broken by position, the earlier one dropped first (as ``nm_mask``).
    SparseGPT uses it on a block flattened to one row."""
    lowest_first = torch.sort(scores, dim=1, stable=True).indices
    keep = torch.ones_like(scores, dtype=torch.bool)
    keep.scatter_(1, lowest_first[:, :count], False)
    return keep


@layer_method(PruneWanda)
class WandaStep:
    """Wanda on one layer at a time (``registry.LayerStep``)."""

    needs_calibration = True

    def __init__(self, config: PruneWanda, ctx: EngineContext):
        self.config, self.ctx, self.count = config, ctx, SparsityCount()

    def statistic(self, layer: WeightLayer) -> InputNormSquared:
        return InputNormSquared(layer.in_features, self.ctx.device)

    def compress(self, layer: WeightLayer, norms: InputNormSquared) -> None:
        # Weights an earlier stage pruned are 0, score 0 and are the first dropped again.
        keep = wanda_mask(layer.weight(), norms.norm_squared(), self.config.sparsity, self.config.n_m)
        apply_keep_mask(layer, keep, self.ctx)
        self.count.add(self.ctx.masks[layer.name])

    def metrics(self) -> dict[str, Any]:
        return self.count.metrics()

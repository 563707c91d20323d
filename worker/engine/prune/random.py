"""Random pruning: the baseline every other pruning method must beat.

``{"type": "prune", "method": "random", "sparsity": 0.5, "seed": 0}`` zeros exactly half of
each layer's weights, chosen uniformly at random; the same seed chooses the same weights.
With ``"pattern": "2:4"`` two random weights of every four consecutive inputs are zeroed.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from app.specs import PruneRandom
from worker.engine.modules import compressible_layers
from worker.engine.registry import EngineContext, register
from worker.engine.prune.masking import apply_keep_mask, pruning_metrics
from worker.engine.prune.nm import nm_mask


def random_mask(weight: torch.Tensor, sparsity: float, generator: torch.Generator) -> torch.Tensor:
    """A keep-mask shaped like ``weight`` with exactly ``round(sparsity * numel)`` entries False::

        keep = random_mask(w, 0.5, torch.Generator().manual_seed(0))
    """
    numel = weight.numel()
    pruned = round(sparsity * numel)
    # randperm on the generator's device (CPU), so a seed gives the same mask on any device.
    order = torch.randperm(numel, generator=generator, device=generator.device)
    keep = torch.ones(numel, dtype=torch.bool, device=generator.device)
    keep[order[:pruned]] = False
    return keep.view(weight.shape).to(weight.device)


def random_nm_mask(
    weight: torch.Tensor, n: int, m: int, generator: torch.Generator
) -> torch.Tensor:
    """A keep-mask keeping ``n`` weights, chosen at random, of every ``m`` consecutive inputs."""
    scores = torch.rand(weight.shape, generator=generator, device=generator.device)
    return nm_mask(scores, n, m).to(weight.device)


@register(PruneRandom)
def prune_random(model: nn.Module, config: PruneRandom, ctx: EngineContext) -> dict[str, Any]:
    layers = compressible_layers(model)
    # One generator drawn layer after layer: the masks depend only on the seed and the model.
    generator = torch.Generator().manual_seed(config.seed)
    for index, layer in enumerate(layers):
        ctx.step(index, len(layers))
        apply_keep_mask(layer, layer_keep_mask(layer.weight(), config, generator), ctx)
    return pruning_metrics(layers, ctx)


def layer_keep_mask(weight: torch.Tensor, config: PruneRandom, generator: torch.Generator) -> torch.Tensor:
    """The keep-mask of one layer, drawn from ``generator`` (seeded once per stage, then drawn
    layer after layer in ``compressible_layers`` order)."""
    if config.n_m is None:
        return random_mask(weight, config.sparsity, generator)
    return random_nm_mask(weight, *config.n_m, generator)

"""Structured pruning: remove whole MLP neurons and attention heads, leaving a smaller dense
model (fewer FLOPs per token on any hardware) whose config describes its new sizes.

``{"type": "prune", "method": "structured", "sparsity": 0.25}`` removes a quarter of the
neurons of every MLP and a quarter of the heads of every attention layer (where the
architecture's config can describe fewer heads: see ``structured_layout``). With
``"targets": ["layers"]`` it removes a quarter of the decoder blocks instead (``depth``); with
all three, the blocks go first and the heads and neurons of those that stay after. The stage
needs calibration text, and must come before any quantization stage.

Importance, from calibration activations (the activation-aware family of LLM-Pruner, FLAP,
Minitron): a unit (a neuron, or a head group) writes ``W_u z_u`` into the residual stream,
where ``z_u`` is its slice of the output projection's input and ``W_u`` the matching columns
of that projection. Removing the unit removes that term, so it is scored by the root mean
square of its size over the calibration tokens::

    importance_u = sqrt(E ||W_u z_u||^2) = sqrt(trace(W_u^T W_u E[z_u z_u^T]))

For a neuron (``z_u`` a scalar) this is ``rms(activation) * ||output column||``, Wanda's
score for a whole column; for a head it also counts how the head's dimensions correlate.
Units are ranked within each block, and every block keeps the same number, because a config
has one MLP width and one head count::

    plan = plan_structured(model, PruneStructured(sparsity=0.25), ctx)   # runs calibration
    apply_plan(model, plan, ctx.masks)                                   # slices, rewrites config
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from app.specs import PruneStructured
from worker.engine.capture import run_calibration
from worker.engine.distill.student import keep_decoder_blocks, renumber_masks
from worker.engine.modules import WeightLayer, decoder_blocks
from worker.engine.registry import EngineContext, register
from worker.engine.prune.depth import block_influence, blocks_to_keep, blocks_to_remove
from worker.engine.prune.structured_layout import (Layout, allowed_head_groups, config_accepts,
                                                   heads_per_group, key_value_groups, keep_units,
                                                   layout_for, resize_config, to_carrier)

# ---------------------------------------------------------------------------------------------
# The arithmetic: tensors in, tensors out.


def accumulate_second_moment(total: torch.Tensor | None, inputs: torch.Tensor, units: int) -> torch.Tensor:
    """Add ``sum_t z_u z_u^T`` over the tokens of ``inputs`` (``[..., features]``, the
    features split into ``units`` equal contiguous slices) to ``total`` (``[units, w, w]``)."""
    features = inputs.shape[-1]
    z = inputs.detach().reshape(-1, units, features // units).float()
    moment = torch.einsum("tui,tuj->uij", z, z)
    return moment if total is None else total.add_(moment)


def unit_importance(second_moment: torch.Tensor, out_weight: torch.Tensor) -> torch.Tensor:
    """``sqrt(E ||W_u z_u||^2)`` for each unit: ``second_moment`` is ``E[z_u z_u^T]``
    (``[units, w, w]``), ``out_weight`` the ``[out, units * w]`` weight that reads the units.

    >>> unit_importance(torch.tensor([[[4.0]], [[1.0]]]), torch.tensor([[0.1, 1.0]]))
    tensor([0.2000, 1.0000])
    """
    units, width, _ = second_moment.shape
    weight = out_weight.detach().float().reshape(out_weight.shape[0], units, width)
    weight_gram = torch.einsum("oui,ouj->uij", weight, weight)  # W_u^T W_u
    energy = (weight_gram * second_moment.to(weight_gram.device)).sum(dim=(1, 2))
    return energy.clamp_min(0).sqrt()  # rounding can make a zero energy slightly negative


def most_important(importance: torch.Tensor, keep: int) -> torch.Tensor:
    """The ``keep`` most important units, ascending by index. Ties keep the lower index, so
    the choice never depends on sort internals."""
    order = torch.sort(importance.cpu(), descending=True, stable=True).indices
    return order[:keep].sort().values


def units_to_keep(units: int, sparsity: float) -> int:
    """Units a block keeps: ``round(sparsity * units)`` removed, at least one kept."""
    return max(1, units - round(sparsity * units))


def head_groups_to_keep(groups: int, sparsity: float, allowed: list[int]) -> int:
    """Head groups each block keeps: of the ``allowed`` counts, the nearest to
    ``units_to_keep(groups, sparsity)``; between two equally near, the larger (the smaller loss)."""
    wanted = units_to_keep(groups, sparsity)
    return min(allowed, key=lambda kept: (abs(kept - wanted), -kept))


# ---------------------------------------------------------------------------------------------
# Calibration: hooks on the projections that read the units.


def second_moments(
    model: nn.Module, readers: dict[str, tuple[nn.Module, int]], ctx: EngineContext
) -> dict[str, torch.Tensor]:
    """Run the calibration batches through ``model`` and return, for each
    ``name -> (module, units)`` in ``readers``, ``E[z_u z_u^T]`` of the module's input split
    into ``units`` slices (``[units, w, w]``), averaged over all calibration tokens.

    The hooks are removed whatever happens, cancellation included."""
    sums: dict[str, torch.Tensor | None] = dict.fromkeys(readers)

    def hook_for(name: str, units: int):
        def hook(module: nn.Module, args: tuple) -> None:
            sums[name] = accumulate_second_moment(sums[name], args[0], units)

        return hook

    tokens = run_calibration(model, ctx, [module.register_forward_pre_hook(hook_for(name, units))
                                          for name, (module, units) in readers.items()])
    missing = [name for name, total in sums.items() if total is None]
    if missing:
        raise RuntimeError(f"calibration never reached {missing[0]}")
    return {name: total / tokens for name, total in sums.items()}


# ---------------------------------------------------------------------------------------------
# The plan, and carrying it out.


@dataclass
class StructuredPlan:
    """What every decoder block keeps: ascending indices into its original units, one tensor
    per block, or None where that kind of unit is left alone. Heads are counted in key/value
    groups (one group per head without grouped-query attention)."""

    neurons: int  # per block, before
    head_groups: int  # per block, before
    heads_per_group: int
    kept_neurons: list[torch.Tensor] | None = None
    kept_head_groups: list[torch.Tensor] | None = None
    notes: list[str] = field(default_factory=list)

    def removed_heads(self) -> list[list[int]]:
        """Per block, the original indices of the (query) heads removed."""
        if self.kept_head_groups is None:
            return []
        removed = []
        for kept in self.kept_head_groups:
            gone = sorted(set(range(self.head_groups)) - set(kept.tolist()))
            removed.append([g * self.heads_per_group + h for g in gone for h in range(self.heads_per_group)])
        return removed


def plan_structured(model: nn.Module, config: PruneStructured, ctx: EngineContext,
                    allow_nothing: bool = False) -> StructuredPlan:
    """Decide which heads and neurons each block keeps, from ``ctx.calibration``; the model is
    unchanged (``config.targets`` other than those two are ignored).

    Raises ``ValueError`` without calibration data, or when the targets leave nothing that this
    architecture can remove (GPT-2 with ``targets=["heads"]``), unless ``allow_nothing``: then
    the plan keeps every unit and its notes say why."""
    if not ctx.calibration:
        raise ValueError("structured pruning needs calibration data: add a calibration section")
    layout = layout_for(model)
    prefix, blocks = decoder_blocks(model)
    plan = StructuredPlan(
        neurons=_reader(blocks[0], layout.neuron_consumer).in_features,
        head_groups=key_value_groups(model.config),
        heads_per_group=heads_per_group(model.config),
    )

    keep_neurons = keep_groups = None
    if "neurons" in config.targets:
        keep_neurons = units_to_keep(plan.neurons, config.sparsity)
        if keep_neurons == plan.neurons:
            plan.notes.append(f"sparsity {config.sparsity} of {plan.neurons} neurons rounds to none")
            keep_neurons = None
    if "heads" in config.targets:
        keep_groups = _plan_head_groups(model.config, layout, config.sparsity, plan)
    if keep_neurons is None and keep_groups is None:
        if allow_nothing:
            return plan
        raise ValueError("structured pruning has nothing to remove: " + "; ".join(plan.notes))

    readers: dict[str, tuple[nn.Module, int]] = {}
    for index, block in enumerate(blocks):
        if keep_neurons is not None:
            readers[f"{prefix}.{index}.{layout.neuron_consumer}"] = (
                block.get_submodule(layout.neuron_consumer), plan.neurons)
        if keep_groups is not None:
            readers[f"{prefix}.{index}.{layout.head_consumer}"] = (
                block.get_submodule(layout.head_consumer), plan.head_groups)
    moments = second_moments(model, readers, ctx)

    def choose(path: str, keep: int) -> list[torch.Tensor]:
        kept = []
        for index, block in enumerate(blocks):
            moment = moments[f"{prefix}.{index}.{path}"]
            kept.append(most_important(unit_importance(moment, _reader(block, path).weight()), keep))
        return kept

    if keep_neurons is not None:
        plan.kept_neurons = choose(layout.neuron_consumer, keep_neurons)
    if keep_groups is not None:
        plan.kept_head_groups = choose(layout.head_consumer, keep_groups)
    return plan


def _plan_head_groups(model_config, layout: Layout, sparsity: float, plan: StructuredPlan) -> int | None:
    """The head groups each block keeps, or None (with a note in ``plan``) when none go."""
    if not layout.removes_heads:
        plan.notes.append(layout.heads_not_removable())
        return None
    groups, per_group = plan.head_groups, plan.heads_per_group
    allowed = allowed_head_groups(model_config, layout)
    kept = head_groups_to_keep(groups, sparsity, allowed)
    wanted = units_to_keep(groups, sparsity)
    if kept != wanted:
        grouping = f"heads go in key/value groups of {per_group}, and " if per_group > 1 else ""
        plan.notes.append(
            f"{(groups - wanted) * per_group} of {groups * per_group} heads per layer asked for, "
            f"{(groups - kept) * per_group} removed: {type(model_config).__name__} (or Mistral, which "
            f"computes the same) accepts {[g * per_group for g in allowed]} heads ({grouping}the config requires "
            f"hidden_size to be a multiple of the head count)"
        )
    elif kept == groups:
        plan.notes.append(f"sparsity {sparsity} of {groups} key/value head groups rounds to none")
    return None if kept == groups else kept


def apply_plan(model: nn.Module, plan: StructuredPlan, masks: dict[str, torch.Tensor]) -> None:
    """Slice every block as ``plan`` says and write the new sizes into ``model.config``.
    Keep-masks in ``masks`` (earlier pruning stages) are sliced to match."""
    layout = layout_for(model)
    prefix, blocks = decoder_blocks(model)
    for index, block in enumerate(blocks):
        keep_units(
            block, f"{prefix}.{index}", layout,
            None if plan.kept_neurons is None else plan.kept_neurons[index],
            None if plan.kept_head_groups is None else plan.kept_head_groups[index],
            plan.head_groups, masks,
        )
    resize_config(
        model.config, layout,
        neurons=None if plan.kept_neurons is None else len(plan.kept_neurons[0]),
        head_groups=None if plan.kept_head_groups is None else len(plan.kept_head_groups[0]),
    )


def _reader(block: nn.Module, path: str) -> WeightLayer:
    return WeightLayer(path, block.get_submodule(path))


def parameter_count(model: nn.Module) -> int:
    """Parameters, tied ones counted once."""
    return sum(parameter.numel() for parameter in model.parameters())


@register(PruneStructured)
def prune_structured(model: nn.Module, config: PruneStructured, ctx: EngineContext) -> dict[str, Any]:
    """The stage: blocks first (``targets`` with ``"layers"``, see ``depth``), then heads and
    neurons of the blocks that stay, each planned on the calibration data and then sliced.
    Cancelling during calibration leaves the model as it was; the slicing itself is never
    interrupted, so model and config always agree."""
    if ctx.quantized:
        raise ValueError("structured pruning must run before quantization")
    parameters_before = parameter_count(model)
    heads_before = model.config.num_attention_heads
    notes: list[str] = []
    removed_layers = _remove_blocks(model, config, ctx, notes) if "layers" in config.targets else []

    unit_targets = [target for target in config.targets if target != "layers"]
    plan = None
    if unit_targets:
        plan = plan_structured(model, config.model_copy(update={"targets": unit_targets}), ctx,
                               allow_nothing=bool(removed_layers))
        ctx.check_cancelled()
        apply_plan(model, plan, ctx.masks)
        notes += plan.notes
    elif not removed_layers:
        raise ValueError("structured pruning has nothing to remove: " + "; ".join(notes))
    if not config_accepts(model.config):
        # A head count LlamaConfig refuses: the same model, written as Mistral.
        architecture = type(model).__name__
        model = ctx.model = to_carrier(model)
        notes.append(f"{architecture} with {model.config.num_attention_heads} heads of {model.config.head_dim} "
                     f"and hidden size {model.config.hidden_size} is written as {type(model).__name__}, "
                     "the same computation under a config that accepts that head count")

    if plan is None:  # only blocks went: every one still has its MLP width
        neurons_before = _reader(decoder_blocks(model)[1][0], layout_for(model).neuron_consumer).in_features
    else:
        neurons_before = plan.neurons
    neurons_removed = 0 if plan is None or plan.kept_neurons is None else plan.neurons - len(plan.kept_neurons[0])
    removed_heads = [] if plan is None else plan.removed_heads()
    heads_removed = len(removed_heads[0]) if removed_heads else 0
    layers = len(decoder_blocks(model)[1])
    return {
        "layers": layers,
        "layers_removed": removed_layers,
        "heads_removed_per_layer": heads_removed,
        "neurons_removed_per_layer": neurons_removed,
        "heads_removed": heads_removed * layers,
        "neurons_removed": neurons_removed * layers,
        "heads_per_layer": heads_before - heads_removed,
        "intermediate_size": neurons_before - neurons_removed,
        "removed_heads": removed_heads,
        "parameters_before": parameters_before,
        "parameters_after": parameter_count(model),
        "note": "; ".join(notes) or None,
    }


def _remove_blocks(model: nn.Module, config: PruneStructured, ctx: EngineContext, notes: list[str]) -> list[int]:
    """Remove the blocks of lowest influence (``depth``); return their original indices."""
    layers = len(decoder_blocks(model)[1])
    remove = blocks_to_remove(layers, config.sparsity)
    if remove == 0:
        notes.append(f"sparsity {config.sparsity} of {layers} layers rounds to none")
        return []
    keep = blocks_to_keep(block_influence(model, ctx), remove)
    ctx.check_cancelled()
    ctx.masks = renumber_masks(ctx.masks, model, keep)  # named as the blocks are before the cut
    keep_decoder_blocks(model, keep)
    return sorted(set(range(layers)) - set(keep))

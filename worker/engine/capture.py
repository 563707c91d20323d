"""Calibration one decoder block at a time, for the methods that look at a layer's inputs
(Wanda, SparseGPT, GPTQ).

Memory stays bounded by one block: only the hidden states entering the current block are kept
(one tensor per calibration batch), and only that block's layers hold statistics. The blocks
are compressed in order, and each block is calibrated on the outputs of the blocks before it
*as compressed*, so later layers learn to compensate for the earlier layers' error (the
"sequential" approach of GPTQ, SparseGPT and llm-compressor)::

    layers = compress_block_by_block(
        model, ctx,
        statistic=lambda layer: InputHessian(layer.in_features, ctx.device),
        compress=lambda layer, hessian: prune(layer, hessian.hessian()),
    )

For each block: hooks on its layers feed their inputs to the statistics, the block runs on
every calibration batch, the hooks come off (always, in ``finally``), each layer is compressed,
and the compressed block runs again to produce the next block's inputs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterator, Protocol

import torch
from torch import nn

from worker.engine.modules import WeightLayer, compressible_layers, decoder_blocks
from worker.engine.registry import EngineContext, register, register_step


class InputStatistic(Protocol):
    """What a method accumulates from a layer's inputs (a Hessian, a norm per input)."""

    def add(self, inputs: torch.Tensor) -> None:
        """Take one batch of the layer's inputs, ``[..., in_features]``."""


@dataclass
class BlockInputs:
    """What each calibration batch passes to a decoder block: the hidden states, and the rest
    of the call as the model made it to block 0 (attention mask, position ids, Llama's rotary
    position embeddings...), reused for every block. That holds for GPT-2, Llama, OPT and
    most decoders; a model that gives its layers different masks (Gemma's alternating sliding
    windows) would need the call of each block."""

    hidden_states: list[torch.Tensor]
    calls: list[tuple[tuple[Any, ...], dict[str, Any]]]  # (other positional args, kwargs)
    # Where the hidden states wait between blocks: the host when the blocks run on a GPU, so
    # that the device holds one block and one batch (None: where the block computed them).
    store: torch.device | None = None

    def outputs(self, block: nn.Module) -> Iterator[torch.Tensor]:
        """The block's output hidden states, batch after batch."""
        device = next(block.parameters()).device
        for hidden_states, (args, kwargs) in zip(self.hidden_states, self.calls):
            output = block(hidden_states.to(device), *args, **kwargs)
            # Blocks return a tensor; older transformers returned a tuple, hidden states first.
            yield output[0] if isinstance(output, tuple) else output

    def advance(self, block: nn.Module) -> None:
        """Become the inputs of the next block: each batch's hidden states are replaced by the
        block's output as soon as it is computed, so only one set is ever held."""
        for index, output in enumerate(self.outputs(block)):
            self.hidden_states[index] = output if self.store is None else output.to(self.store)

    def copy(self) -> BlockInputs:
        """Another set of the same inputs, to advance through other blocks (the tensors are
        shared until one side advances)."""
        return BlockInputs(list(self.hidden_states), list(self.calls), self.store)


class _FirstBlockReached(Exception):
    """Carries the first block's call out of the model's forward: nothing after it runs."""

    def __init__(self, args: tuple[Any, ...], kwargs: dict[str, Any]):
        super().__init__()
        self.args, self.kwargs = args, kwargs


@torch.no_grad()
def first_block_inputs(
    model: nn.Module, calibration: list[torch.Tensor], device: torch.device,
    store: torch.device | None = None,
) -> BlockInputs:
    """Run each batch of token ids through the model up to its first decoder block and keep
    what the block would have received. The model computes its embeddings, masks and position
    embeddings itself, so any architecture works; a pre-hook on block 0 stops the forward
    there by raising."""
    _, blocks = decoder_blocks(model)

    def catch(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        raise _FirstBlockReached(args, dict(kwargs))

    inputs = BlockInputs(hidden_states=[], calls=[], store=store)
    handle = blocks[0].register_forward_pre_hook(catch, with_kwargs=True)
    try:
        for token_ids in calibration:
            try:
                model(token_ids.to(device), use_cache=False)
            except _FirstBlockReached as caught:
                args, kwargs = caught.args, caught.kwargs
                # GPT-2 passes the hidden states positionally, most models by keyword.
                hidden_states = args[0] if args else kwargs.pop("hidden_states")
                inputs.hidden_states.append(hidden_states if store is None else hidden_states.to(store))
                inputs.calls.append((tuple(args[1:]), kwargs))
            else:
                raise RuntimeError(f"{type(model).__name__} never called its first decoder block")
    finally:
        handle.remove()
    return inputs


@torch.no_grad()
def run_calibration(model: nn.Module, ctx: EngineContext, hooks: list[torch.utils.hooks.RemovableHandle]) -> int:
    """Run every calibration batch through the whole ``model`` (``ctx.step`` before each, so
    progress is reported and a cancelled job stops), then remove ``hooks``, the caller's
    collectors, whatever happens; return the number of tokens the model saw."""
    batches = ctx.calibration or []
    tokens = 0
    try:
        for index, ids in enumerate(batches):
            ctx.step(index, len(batches))
            model(input_ids=ids.to(ctx.device), use_cache=False)
            tokens += ids.numel()
    finally:
        for hook in hooks:
            hook.remove()
    return tokens


@torch.no_grad()
def compress_block_by_block(
    model: nn.Module,
    ctx: EngineContext,
    statistic: Callable[[WeightLayer], InputStatistic],
    compress: Callable[[WeightLayer, InputStatistic], None],
) -> list[WeightLayer]:
    """Calibrate and compress every compressible layer, block after block, on
    ``ctx.calibration``; return the layers (for the stage's metrics).

    ``statistic(layer)`` makes the empty statistic of a layer, filled from its inputs while its
    block runs; ``compress(layer, statistic)`` then changes the layer's weight. The model is
    moved to ``ctx.device`` and put in eval mode. Cancelling is checked before each block and
    each layer (``ctx.step``).
    """
    if not ctx.calibration:
        raise ValueError("this method needs calibration data (the job's calibration section)")
    model.to(ctx.device).eval()
    prefix, blocks = decoder_blocks(model)
    layers = compressible_layers(model)
    done = 0
    ctx.step(done, len(layers))
    inputs = first_block_inputs(model, ctx.calibration, ctx.device)
    for index, block in enumerate(blocks):
        block_layers = [layer for layer in layers if layer.name.startswith(f"{prefix}.{index}.")]
        ctx.step(done, len(layers))
        statistics = block_statistics(block, block_layers, inputs, statistic)
        for layer in block_layers:
            ctx.step(done, len(layers))
            compress(layer, statistics.pop(layer.name))  # pop: freed once the layer is done
            done += 1
        if index + 1 < len(blocks):  # the last block's outputs are not needed
            inputs.advance(block)
    return layers


def block_statistics(
    block: nn.Module,
    layers: list[WeightLayer],
    inputs: BlockInputs,
    statistic: Callable[[WeightLayer], InputStatistic],
) -> dict[str, InputStatistic]:
    """Run the block on every batch with each layer's inputs fed to its statistic.

    Layers that read the very same tensor (Llama's q, k and v projections; its gate and up
    projections) share one statistic, accumulated once: a statistic depends on the inputs
    alone, and a Hessian update is the costliest part of calibration."""
    statistics: dict[str, InputStatistic] = {}
    followers: set[str] = set()  # layers reading another layer's input: nothing to add
    this_batch: list[tuple[torch.Tensor, str]] = []  # (input, layer) seen in the current batch

    def feeder(layer: WeightLayer) -> Callable[..., None]:
        def feed(module: nn.Module, args: tuple[Any, ...]) -> None:
            if layer.name in followers:
                return
            if layer.name not in statistics:  # the first batch decides who shares with whom
                owner = next((name for seen, name in this_batch if seen is args[0]), None)
                if owner is not None:
                    statistics[layer.name] = statistics[owner]
                    followers.add(layer.name)
                    return
                statistics[layer.name] = statistic(layer)
            this_batch.append((args[0], layer.name))
            statistics[layer.name].add(args[0])
        return feed

    handles = [layer.module.register_forward_pre_hook(feeder(layer)) for layer in layers]
    try:
        for _ in inputs.outputs(block):  # only the statistics are wanted
            this_batch.clear()
    finally:
        for handle in handles:
            handle.remove()
    for layer in layers:  # a layer the calibration never reached gets an empty statistic
        if layer.name not in statistics:
            statistics[layer.name] = statistic(layer)
    return statistics


def layer_method(config_type: type) -> Callable[[type], type]:
    """Class decorator for a data-aware method's ``LayerStep``: registers it as the method's step
    for the block-by-block engine and, run over the whole model by ``compress_block_by_block``,
    as its stage handler::

        @layer_method(PruneWanda)
        class WandaStep: ...   # needs_calibration, statistic(layer), compress(layer, s), metrics()
    """

    def decorate(step_class: type) -> type:
        register_step(config_type)(step_class)

        @register(config_type)
        def handler(model: nn.Module, config: Any, ctx: EngineContext) -> dict[str, Any]:
            step = step_class(config, ctx)
            compress_block_by_block(model, ctx, statistic=step.statistic, compress=step.compress)
            return step.metrics()

        return step_class

    return decorate

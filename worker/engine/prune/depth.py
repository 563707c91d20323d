"""Depth pruning: remove whole decoder blocks, the ones that change the hidden state least.

The one structured cut every architecture can express: a config always has a layer count,
while GPT-2 and OPT cannot describe fewer heads (``structured_layout``). A removed block takes
its attention and its MLP with it, so the time per token falls with the share of blocks gone.

Importance is ShortGPT's Block Influence (Men et al. 2024, "ShortGPT: Layers in Large Language
Models are More Redundant Than You Expect"): block ``i`` maps the residual stream ``x_i`` to
``x_{i+1}``, and a block whose output points where its input did has little to lose::

    BI_i = 1 - E_t[cos(x_i,t, x_{i+1},t)]        over the calibration tokens t

``{"type": "prune", "method": "structured", "sparsity": 0.25, "targets": ["layers"]}`` removes
the ``round(0.25 x layers)`` blocks of lowest influence (at least one block stays)::

    influence = block_influence(model, ctx)         # one calibration pass, [layers]
    keep = blocks_to_keep(influence, remove=2)      # ascending indices of the blocks that stay

Depth pruning costs more quality per parameter than removing heads and neurons; a
``distill`` stage after it (teacher: the job's input model) wins most of it back.
"""

from __future__ import annotations

import torch
from torch import nn

from worker.engine.capture import run_calibration
from worker.engine.modules import decoder_blocks
from worker.engine.registry import EngineContext

# ---------------------------------------------------------------------------------------------
# The arithmetic: tensors in, tensors out.


def cosine_total(inputs: torch.Tensor, outputs: torch.Tensor) -> torch.Tensor:
    """The sum over tokens of ``cos(input, output)``: both ``[..., hidden]``, one vector per
    token. A token whose input or output is all zeros counts as unchanged (cosine 1).

    >>> cosine_total(torch.tensor([[1.0, 0.0], [1.0, 0.0]]), torch.tensor([[2.0, 0.0], [0.0, 3.0]]))
    tensor(1.)
    """
    x = inputs.detach().reshape(-1, inputs.shape[-1]).float()
    y = outputs.detach().reshape(-1, outputs.shape[-1]).float()
    norms = x.norm(dim=-1) * y.norm(dim=-1)
    cosine = torch.where(norms > 0, (x * y).sum(dim=-1) / norms.clamp_min(1e-30), torch.ones_like(norms))
    return cosine.sum()


def blocks_to_keep(influence: torch.Tensor, remove: int) -> list[int]:
    """Ascending indices of the blocks that stay when the ``remove`` of lowest influence go.
    Ties remove the later block (the earlier one feeds more of the model); one block always
    stays.

    >>> blocks_to_keep(torch.tensor([0.5, 0.1, 0.3, 0.1]), remove=2)
    [0, 2]
    """
    layers = influence.numel()
    if not 0 <= remove < layers:
        raise ValueError(f"cannot remove {remove} of {layers} blocks: at least one must stay")
    # Stable sort on (influence, -index): the lowest influence first, the later block first.
    order = sorted(range(layers), key=lambda index: (float(influence[index]), -index))
    return sorted(set(range(layers)) - set(order[:remove]))


def blocks_to_remove(layers: int, sparsity: float) -> int:
    """``round(sparsity x layers)``, leaving at least one block."""
    return min(round(sparsity * layers), layers - 1)


# ---------------------------------------------------------------------------------------------
# Calibration: the hidden state entering and leaving every block.


def block_influence(model: nn.Module, ctx: EngineContext) -> torch.Tensor:
    """``BI_i`` of every decoder block of ``model`` (``[layers]``) over ``ctx.calibration``.
    The model is unchanged; the hooks are removed whatever happens, cancellation included."""
    if not ctx.calibration:
        raise ValueError("structured pruning needs calibration data: add a calibration section")
    _, blocks = decoder_blocks(model)
    totals = torch.zeros(len(blocks), dtype=torch.float64)

    def hook_for(index: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict, output) -> None:
            hidden_in = args[0] if args else kwargs["hidden_states"]
            hidden_out = output[0] if isinstance(output, (tuple, list)) else output
            totals[index] += float(cosine_total(hidden_in, hidden_out))

        return hook

    tokens = run_calibration(model, ctx, [block.register_forward_hook(hook_for(index), with_kwargs=True)
                                          for index, block in enumerate(blocks)])
    return 1 - totals / tokens

"""One view of "a weight matrix" over the layer types the engine compresses.

GPT-2 stores its projections as ``transformers.pytorch_utils.Conv1D`` with the weight laid out
``[in, out]``; Llama, OPT and most others use ``nn.Linear`` with ``[out, in]``. Every method
works on ``[out, in]`` (a row per output channel), so the transpose is handled here, once::

    for layer in compressible_layers(model):
        w = layer.weight()                       # [out, in], shares storage with the model
        layer.set_weight(w * keep_mask)          # becomes the parameter's data
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

WEIGHT_MODULE_TYPES = (nn.Linear, Conv1D)


@dataclass
class WeightLayer:
    """A Linear or Conv1D inside a decoder block, named as in ``model.named_modules()``."""

    name: str
    module: nn.Module

    @property
    def is_conv1d(self) -> bool:
        return isinstance(self.module, Conv1D)

    def weight(self) -> torch.Tensor:
        """The weight as ``[out, in]``: a view of the parameter (transposed for Conv1D), detached
        from autograd, so reading it copies nothing."""
        weight = self.module.weight.detach()
        return weight.t() if self.is_conv1d else weight

    def set_weight(self, weight: torch.Tensor) -> None:
        """Make an ``[out, in]`` weight the module's parameter data (same Parameter object;
        dtype and device of the parameter are kept). ``weight`` becomes the data where its
        layout allows, so the caller must not change it afterwards."""
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise ValueError(
                f"{self.name}: expected a [{self.out_features}, {self.in_features}] weight, "
                f"got {list(weight.shape)}"
            )
        parameter = self.module.weight
        stored = weight.detach().to(dtype=parameter.dtype, device=parameter.device)
        # Swapped in rather than copied into: a checkpoint's weights are memory-mapped, and
        # writing into them faults in a private copy of every page (most of an RTN stage's time).
        parameter.data = (stored.t() if self.is_conv1d else stored).contiguous()

    @property
    def in_features(self) -> int:
        return self.weight().shape[1]

    @property
    def out_features(self) -> int:
        return self.weight().shape[0]


def decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The ``nn.ModuleList`` of decoder blocks (``transformer.h``, ``model.layers``,
    ``model.decoder.layers``...) and its name.

    Found by shape rather than by name, so new architectures need no entry here: it is the
    ModuleList holding the most parameters.
    """
    best: tuple[str, nn.ModuleList] | None = None
    best_count = 0
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList):
            count = sum(p.numel() for p in module.parameters())
            if count > best_count:
                best, best_count = (name, module), count
    if best is None:
        raise ValueError(f"{type(model).__name__} has no list of decoder blocks")
    return best


def compressible_layers(model: nn.Module) -> list[WeightLayer]:
    """Every Linear / Conv1D inside the decoder blocks, block by block.

    Within a block the order is the modules' definition order, which in GPT-2, Llama and OPT
    puts the attention projections before the output projection, and attention before the MLP
    (OPT defines k, v, q, but those three read the same input). The embeddings and ``lm_head``
    sit outside the blocks and are never returned.
    """
    prefix, blocks = decoder_blocks(model)
    return [
        WeightLayer(f"{prefix}.{name}", module)
        for name, module in blocks.named_modules()
        if isinstance(module, WEIGHT_MODULE_TYPES)
    ]


def unique_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict with tied tensors (lm_head = embedding) once, under the first name: what
    a checkpoint stores, since safetensors refuses shared storage and ``tie_word_embeddings``
    restores the tie."""
    seen: set[tuple[int, int]] = set()
    tensors = {}
    for key, value in model.state_dict().items():
        identity = (value.untyped_storage().data_ptr(), value.storage_offset())
        if identity in seen:
            continue
        seen.add(identity)
        tensors[key] = value
    return tensors

"""A student made of some of a model's decoder blocks (layer-drop initialisation).

``"keep_layers": "every_other"`` keeps blocks 0, 2, 4, ... of the model: the student starts
from the teacher's own weights (the embeddings, the final norm and the head unchanged), which
trains far faster than a random init (Sanh et al. 2019, DistilBERT / DistilGPT2)::

    keep = kept_layer_indices("every_other", num_layers=12)    # [0, 2, 4, 6, 8, 10]
    masks = renumber_masks(ctx.masks, model, keep)              # before the blocks go
    student = keep_decoder_blocks(model, keep)                  # 6 blocks, config rewritten
    student.save_pretrained(folder)                             # loads back as a 6-layer model
"""

from __future__ import annotations

import re
from typing import Literal

import torch
from torch import nn

from worker.engine.modules import decoder_blocks

KeepLayers = Literal["every_other", "first_half"] | list[int]


def kept_layer_indices(keep_layers: KeepLayers, num_layers: int) -> list[int]:
    """The indices of the blocks a student keeps, in increasing order.

    ``"every_other"``: 0, 2, 4, ...; ``"first_half"``: the first ``num_layers // 2`` (at least
    one); a list: those indices, sorted, since a block only makes sense after the ones that
    preceded it in the teacher."""
    if keep_layers == "every_other":
        return list(range(0, num_layers, 2))
    if keep_layers == "first_half":
        return list(range(max(1, num_layers // 2)))
    if isinstance(keep_layers, str):
        raise ValueError(f'keep_layers must be "every_other", "first_half" or a list, not {keep_layers!r}')
    indices = sorted(keep_layers)
    if not indices or len(set(indices)) != len(indices):
        raise ValueError("keep_layers must be distinct layer indices")
    if indices[0] < 0 or indices[-1] >= num_layers:
        raise ValueError(f"keep_layers {indices} out of range: the model has {num_layers} layers (0..{num_layers - 1})")
    return indices


def keep_decoder_blocks(model: nn.Module, keep: list[int]) -> nn.Module:
    """Remove every decoder block of ``model`` not in ``keep`` (sorted indices), in place, and
    return the model.

    The kept blocks are renumbered 0..len(keep)-1 (every ``layer_idx`` attribute, which the KV
    cache is indexed by) and the config says the new depth, so that ``save_pretrained`` /
    ``from_pretrained`` rebuild exactly this model and ``generate`` works. A per-layer
    ``layer_types`` list in the config (sliding / full attention) keeps the kept blocks' types.
    """
    config = model.config
    if getattr(config, "scale_attn_by_inverse_layer_idx", False):
        # The attention of such a GPT-2 is scaled by 1 / (layer_idx + 1), fixed at init: after
        # renumbering, a reloaded student would compute something else than the trained one.
        raise ValueError("keep_layers cannot renumber a GPT-2 with scale_attn_by_inverse_layer_idx")
    prefix, blocks = decoder_blocks(model)
    if not keep or sorted(set(keep)) != list(keep) or keep[0] < 0 or keep[-1] >= len(blocks):
        raise ValueError(f"keep must be increasing indices below {len(blocks)}, got {keep}")

    kept = nn.ModuleList(blocks[index] for index in keep)
    for new_index, block in enumerate(kept):
        for module in block.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = new_index
    parent_name, _, attribute = prefix.rpartition(".")
    setattr(model.get_submodule(parent_name), attribute, kept)

    layer_types = getattr(config, "layer_types", None)
    if isinstance(layer_types, (list, tuple)) and len(layer_types) == len(blocks):
        config.layer_types = [layer_types[index] for index in keep]
    config.num_hidden_layers = len(keep)  # GPT-2's attribute_map writes it to n_layer
    return model


def renumber_masks(
    masks: dict[str, torch.Tensor], model: nn.Module, keep: list[int]
) -> dict[str, torch.Tensor]:
    """The keep-masks of earlier pruning stages, named as in the student: a mask of block
    ``keep[j]`` moves to block ``j``; the masks of dropped blocks are left out.

    Call it with the model before ``keep_decoder_blocks`` (the names are those of its blocks).
    """
    prefix, _ = decoder_blocks(model)
    new_index = {old: new for new, old in enumerate(keep)}
    pattern = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.(.+)$")
    renumbered = {}
    for name, mask in masks.items():
        match = pattern.match(name)
        if match is None:
            renumbered[name] = mask  # not inside a block: unaffected by the drop
        elif int(match[1]) in new_index:
            renumbered[f"{prefix}.{new_index[int(match[1])]}.{match[2]}"] = mask
    return renumbered

"""Weights: the safetensors headers of all shards, and whether they are what config.json implies.

Only headers are read (:mod:`app.safetensors_header`); the architecture is built on the meta
device, so no tensor is ever allocated::

    tensors = read_weight_headers(folder, ["model.safetensors"], None, limits)
    num_parameters, dtype = match_architecture(config, "GPT2LMHeadModel", tensors)
"""

from __future__ import annotations

import math
from pathlib import Path

from app.checkpoints.errors import CheckpointError, UploadLimits
from app.checkpoints.names import INDEX_FILE
from app.safetensors_header import (
    TORCH_DTYPE_NAMES,
    SafetensorsHeaderError,
    TensorEntry,
    read_header,
)


def read_weight_headers(
    folder: Path, weight_files: list[str], index: dict | None, limits: UploadLimits
) -> dict[str, TensorEntry]:
    """All tensors of all weight files by name, after checking each header and the index."""
    if index is None:
        if weight_files != ["model.safetensors"]:
            raise CheckpointError(
                f"without {INDEX_FILE} the weights must be one file named model.safetensors "
                f"(found: {', '.join(weight_files)}); upload the index save_pretrained wrote."
            )
        weight_map = None
    else:
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
        ):
            raise CheckpointError(f"{INDEX_FILE}: weight_map must map tensor names to file names.")
        listed = set(weight_map.values())
        absent = sorted(listed - set(weight_files))
        if absent:
            raise CheckpointError(
                f"{INDEX_FILE} refers to {', '.join(absent)}, which is not in the upload; "
                "upload every shard."
            )
        unlisted = sorted(set(weight_files) - listed)
        if unlisted:
            raise CheckpointError(
                f"{', '.join(unlisted)} is not listed in {INDEX_FILE}; remove it or upload "
                "the matching index."
            )

    tensors: dict[str, TensorEntry] = {}
    shard_of: dict[str, str] = {}
    for shard in weight_files:
        try:
            header = read_header(folder / shard, max_header_bytes=limits.max_header_bytes)
        except SafetensorsHeaderError as exc:
            raise CheckpointError(
                f"{shard} is not a valid safetensors file: {exc}. Re-save the weights with "
                "save_pretrained.",
                status_code=413 if exc.too_large else 400,
            ) from None
        for name, entry in header.tensors.items():
            if name in tensors:
                raise CheckpointError(
                    f"tensor {name!r} is stored in both {shard_of[name]} and {shard}; each "
                    "tensor must be stored once."
                )
            tensors[name], shard_of[name] = entry, shard

    if weight_map is not None:
        for name, shard in weight_map.items():
            if shard_of.get(name) != shard:
                raise CheckpointError(
                    f"{INDEX_FILE} places tensor {name!r} in {shard}, but it is not there; "
                    "re-save the checkpoint so index and shards agree."
                )
        unindexed = sorted(set(tensors) - set(weight_map))
        if unindexed:
            raise CheckpointError(
                f"tensor {unindexed[0]!r} is not listed in {INDEX_FILE}; re-save the checkpoint "
                "so index and shards agree."
            )
    return tensors


def match_architecture(
    config, architecture: str, tensors: dict[str, TensorEntry]
) -> tuple[int, str]:
    """Compare the stored tensors with what the architecture needs; return (parameters, dtype).

    The model is built on the meta device: shapes only, no memory. Every parameter must be
    stored with its shape. Tied parameters (one tensor under several names, like an LM head
    tied to the embeddings) need only one of their names; buffers are optional (transformers
    recomputes them); extra tensors (e.g. old GPT-2 attention-mask buffers) are ignored, as
    from_pretrained ignores them. Names without the base-model prefix ("h.0..." for
    "transformer.h.0...") are accepted, as in old GPT-2 checkpoints.
    """
    import torch
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(
                config, trust_remote_code=False, attn_implementation="eager"
            )
    except Exception as exc:  # a config that passes AutoConfig can still fail to build
        raise CheckpointError(
            f"config.json does not build a {architecture} ({exc}); check the config."
        ) from None

    expected = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    # Group parameter names by the tensor they share; each group needs one stored name.
    groups: dict[int, list[str]] = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(parameter), []).append(name)
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    groups = _merge_tied_groups(list(groups.values()), tied)

    prefix = f"{model.base_model_prefix}." if model.base_model_prefix else ""
    stored_as: dict[str, str] = {}  # model name -> stored name
    for stored in tensors:
        name = stored if stored in expected else prefix + stored
        if name not in expected:
            continue
        if name in stored_as:
            raise CheckpointError(
                f"tensors {stored_as[name]!r} and {stored!r} are the same weight stored twice; "
                "keep one."
            )
        stored_as[name] = stored

    wrong_shape = [  # in the model's order, so the first reported is the first that differs
        f"{stored_as[name]} is {list(tensors[stored_as[name]].shape)} but config.json implies "
        f"{list(shape)}"
        for name, shape in expected.items()
        if name in stored_as and tensors[stored_as[name]].shape != shape
    ]
    if wrong_shape:
        raise CheckpointError(
            f"{len(wrong_shape)} tensors do not have the shapes config.json describes: "
            f"{_first_few(wrong_shape)}. The weights and config.json belong to different models; "
            "upload the pair save_pretrained wrote."
        )
    missing = [group[0] for group in groups if not any(name in stored_as for name in group)]
    if missing:
        raise CheckpointError(
            f"the weights lack {len(missing)} tensors that {architecture} needs: "
            f"{_first_few(missing)}. The weights and config.json belong to different models, "
            "or the checkpoint is incomplete; upload the folder save_pretrained wrote."
        )

    num_parameters = sum(math.prod(expected[group[0]]) for group in groups)
    by_dtype: dict[str, int] = {}
    for stored in stored_as.values():
        entry = tensors[stored]
        by_dtype[entry.dtype] = by_dtype.get(entry.dtype, 0) + entry.num_elements
    dtype = max(by_dtype, key=by_dtype.get) if by_dtype else "F32"
    return num_parameters, TORCH_DTYPE_NAMES[dtype]


def _merge_tied_groups(groups: list[list[str]], tied: dict[str, str]) -> list[list[str]]:
    # On the meta device tying normally shares the Parameter object already; transformers' own
    # {tied name: source name} map covers the case where it does not.
    for target, source in tied.items():
        target_group = next((g for g in groups if target in g), None)
        source_group = next((g for g in groups if source in g), None)
        if (
            target_group is not None
            and source_group is not None
            and target_group is not source_group
        ):
            source_group.extend(target_group)
            groups.remove(target_group)
    return groups


def _first_few(items: list[str], count: int = 5) -> str:
    shown = "; ".join(items[:count])
    return shown if len(items) <= count else f"{shown} (and {len(items) - count} more)"


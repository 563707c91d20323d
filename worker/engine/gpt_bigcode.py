"""GPT-2 written as the GPTBigCode model that computes the same logits.

compressed-tensors only knows ``nn.Linear`` layers, and GPT-2's projections are ``Conv1D``
(weights ``[in, out]``). GPTBigCode with ``multi_query=False`` is GPT-2 with ``nn.Linear``
layers (the logits are bit-identical), so the export writes a compressed GPT-2 as a GPTBigCode
model, and the benchmark hands llm-compressor (whose modifiers skip ``Conv1D``) the same
rewrite::

    config, tensors, quantized = as_gpt_bigcode(gpt2_model, ctx.quantized)
    # config: GPTBigCodeForCausalLM's config.json; tensors: its state dict, ready for save_file
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
from transformers import GPT2LMHeadModel, GPTBigCodeConfig
from transformers.pytorch_utils import Conv1D

from worker.engine.modules import unique_tensors
from worker.engine.quantize.rtn import QuantizedWeight


def as_gpt_bigcode(
    model: GPT2LMHeadModel, quantized: dict[str, QuantizedWeight] | None = None
) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, QuantizedWeight]]:
    """The GPTBigCode twin of ``model``: its config (a dict, as ``config.json`` holds it), its
    tensors and the ``quantized`` weights in its layout.

    Same module names; Linear weights ``[out, in]`` instead of Conv1D ``[in, out]``; the fused
    ``c_attn`` output reordered from GPT-2's ``[q | k | v]`` (each all heads) to GPTBigCode's
    per-head ``[q_h | k_h | v_h]``.
    """
    quantized = quantized or {}
    source = model.config
    if getattr(source, "scale_attn_by_inverse_layer_idx", False) or getattr(
        source, "reorder_and_upcast_attn", False
    ):
        raise ValueError("GPT-2 with layer-scaled or upcast attention has no GPTBigCode twin")
    heads, width = source.n_head, source.n_embd

    def per_head(tensor: torch.Tensor) -> torch.Tensor:
        # rows [3 * width, ...] ordered (q|k|v, head, dim) -> (head, q|k|v, dim)
        rest = tensor.shape[1:]
        grouped = tensor.reshape(3, heads, width // heads, *rest)
        return grouped.transpose(0, 1).reshape(3 * width, *rest)

    config = GPTBigCodeConfig(
        vocab_size=source.vocab_size,
        n_positions=source.n_positions,
        n_embd=width,
        n_layer=source.n_layer,
        n_head=heads,
        n_inner=source.n_inner,
        activation_function=source.activation_function,
        resid_pdrop=source.resid_pdrop,
        embd_pdrop=source.embd_pdrop,
        attn_pdrop=source.attn_pdrop,
        layer_norm_epsilon=source.layer_norm_epsilon,
        initializer_range=source.initializer_range,
        scale_attn_weights=source.scale_attn_weights,
        bos_token_id=source.bos_token_id,
        eos_token_id=source.eos_token_id,
        pad_token_id=getattr(source, "pad_token_id", None),
        tie_word_embeddings=getattr(source, "tie_word_embeddings", True),
        multi_query=False,
        architectures=["GPTBigCodeForCausalLM"],
    ).to_diff_dict()

    tensors = unique_tensors(model)
    converted = dict(quantized)
    for name, module in model.named_modules():
        if not isinstance(module, Conv1D):
            continue
        weight = tensors[f"{name}.weight"].t()  # Conv1D [in, out] -> Linear [out, in]
        if name.endswith(".attn.c_attn"):
            weight = per_head(weight)
            tensors[f"{name}.bias"] = per_head(tensors[f"{name}.bias"])
            if name in quantized:
                q = quantized[name]
                converted[name] = replace(
                    q,
                    q=per_head(q.q),
                    scale=per_head(q.scale),
                    zero_point=None if q.zero_point is None else per_head(q.zero_point),
                )
        tensors[f"{name}.weight"] = weight
    return config, tensors, converted

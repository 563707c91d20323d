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
    tensors and the ``quantized`` weights in its layout (``BigCodeTwin``, tensor by tensor)."""
    twin = BigCodeTwin(model)
    tensors = {name: twin.tensor(name, tensor) for name, tensor in unique_tensors(model).items()}
    converted = {name: twin.quantized(name, q) for name, q in (quantized or {}).items()}
    return twin.config(), tensors, converted


class BigCodeTwin:
    """GPT-2's tensors as its GPTBigCode twin stores them, one at a time (the block-by-block
    export converts each block as it writes it).

    Same module names; Linear weights ``[out, in]`` instead of Conv1D ``[in, out]``; the fused
    ``c_attn`` output reordered from GPT-2's ``[q | k | v]`` (each all heads) to GPTBigCode's
    per-head ``[q_h | k_h | v_h]``. ``model`` may live on the ``meta`` device: only its config
    and module types are read.
    """

    def __init__(self, model: GPT2LMHeadModel):
        source = model.config
        if getattr(source, "scale_attn_by_inverse_layer_idx", False) or getattr(
            source, "reorder_and_upcast_attn", False
        ):
            raise ValueError("GPT-2 with layer-scaled or upcast attention has no GPTBigCode twin")
        self.source = source
        self.heads, self.width = source.n_head, source.n_embd
        self.conv1d = {name for name, module in model.named_modules() if isinstance(module, Conv1D)}

    def config(self) -> dict[str, Any]:
        source = self.source
        return GPTBigCodeConfig(
            vocab_size=source.vocab_size,
            n_positions=source.n_positions,
            n_embd=self.width,
            n_layer=source.n_layer,
            n_head=self.heads,
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

    def per_head(self, tensor: torch.Tensor) -> torch.Tensor:
        """Rows ``[3 * width, ...]`` ordered (q|k|v, head, dim) -> (head, q|k|v, dim)."""
        rest = tensor.shape[1:]
        grouped = tensor.reshape(3, self.heads, self.width // self.heads, *rest)
        return grouped.transpose(0, 1).reshape(3 * self.width, *rest)

    def tensor(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """The twin's tensor called ``name`` from GPT-2's."""
        module, _, kind = name.rpartition(".")
        if module not in self.conv1d:
            return tensor
        if kind == "weight":
            tensor = tensor.t()  # Conv1D [in, out] -> Linear [out, in]
        return self.per_head(tensor) if module.endswith(".attn.c_attn") else tensor

    def quantized(self, name: str, q: QuantizedWeight) -> QuantizedWeight:
        """A quantized layer's integers and scales in the twin's row order (already ``[out, in]``)."""
        if not name.endswith(".attn.c_attn"):
            return q
        return replace(q, q=self.per_head(q.q), scale=self.per_head(q.scale),
                       zero_point=None if q.zero_point is None else self.per_head(q.zero_point))

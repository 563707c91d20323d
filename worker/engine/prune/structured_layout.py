"""Where each architecture keeps its attention heads and MLP neurons, and how to cut them out.

Structured pruning removes whole units, so the result must still be a model that its own
config describes: ``AutoModelForCausalLM.from_pretrained`` rebuilds every layer from the
config and only then loads the weights. A unit is therefore removed only where the config can
say so, and the same number of units leaves every block (a config has one MLP width and one
head count)::

    layout = layout_for(model)                  # LAYOUTS["llama"]
    keep_units(block, "model.layers.0", layout, kept_neurons, kept_head_groups, 2, ctx.masks)
    resize_config(model.config, layout, neurons=96, head_groups=1)

What the pinned transformers (pyproject.toml) can express:

- MLP neurons: every architecture here (GPT-2 ``n_inner``, Llama ``intermediate_size``,
  OPT ``ffn_dim``).
- Heads: Llama only. Its config has an explicit ``head_dim``, so fewer heads keep their size;
  with grouped-query attention heads go in whole key/value groups (one k/v head and the query
  heads that share it), which keeps ``num_attention_heads / num_key_value_heads`` unchanged.
  ``LlamaConfig`` still insists that ``hidden_size`` be a multiple of ``num_attention_heads``
  even when ``head_dim`` is given (huggingface/transformers#46082), which rules out most
  head counts (Llama-3-8B: 4096 is no multiple of 24). A Llama without biases is then written
  as ``MistralForCausalLM``: the same modules, names, weights and computation (no sliding
  window), under a config that accepts any head count (``to_carrier``). Mistral models are
  pruned the same way.
- GPT-2 and OPT derive the head size as ``hidden_size // num_heads`` and transformers
  dropped ``prune_heads`` / ``config.pruned_heads``: fewer heads cannot be described, so their
  heads stay (the stage says so in its metrics).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
import transformers
from huggingface_hub.errors import StrictDataclassError
from torch import nn

from worker.engine.modules import WeightLayer

_HEADS_FIXED = (
    "{arch} heads were not removed: transformers {version} derives the head size as "
    "hidden_size // number of heads and has no prune_heads / config.pruned_heads, so the "
    "config cannot describe fewer heads; only MLP neurons can be removed"
)


@dataclass(frozen=True)
class Layout:
    """Module paths inside one decoder block (as in ``block.named_modules()``).

    Neurons are the output features of ``neuron_producers`` and the input features of
    ``neuron_consumer``. Head groups are contiguous, equal slices of the output features of
    ``head_producers`` (q, k, v) and of the input features of ``head_consumer``.
    """

    name: str
    neuron_producers: tuple[str, ...]
    neuron_consumer: str
    intermediate_size_key: str  # the config attribute holding the MLP width
    # Modules that cache the MLP width as an attribute (path -> attribute name).
    width_attributes: dict[str, str] = field(default_factory=dict)
    head_producers: tuple[str, ...] = ()
    head_consumer: str | None = None

    @property
    def removes_heads(self) -> bool:
        return self.head_consumer is not None

    def heads_not_removable(self) -> str:
        """Why this architecture keeps its heads (for the stage's metrics)."""
        return _HEADS_FIXED.format(arch=self.name, version=transformers.__version__)


# Llama and Mistral blocks: the same module names (which is why one can carry the other).
_LLAMA_FAMILY = dict(
    neuron_producers=("mlp.gate_proj", "mlp.up_proj"),
    neuron_consumer="mlp.down_proj",
    intermediate_size_key="intermediate_size",
    width_attributes={"mlp": "intermediate_size"},
    head_producers=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    head_consumer="self_attn.o_proj",
)

LAYOUTS: dict[str, Layout] = {
    "gpt2": Layout(
        name="GPT-2",
        neuron_producers=("mlp.c_fc",),
        neuron_consumer="mlp.c_proj",
        intermediate_size_key="n_inner",
    ),
    "llama": Layout(name="Llama", **_LLAMA_FAMILY),
    "mistral": Layout(name="Mistral", **_LLAMA_FAMILY),
    "opt": Layout(
        name="OPT",
        neuron_producers=("fc1",),
        neuron_consumer="fc2",
        intermediate_size_key="ffn_dim",
    ),
}


def layout_for(model: nn.Module) -> Layout:
    """The layout of ``model``'s architecture, by ``config.model_type``."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    try:
        return LAYOUTS[model_type]
    except KeyError:
        known = ", ".join(sorted(LAYOUTS))
        raise ValueError(f"structured pruning supports {known}; this model is {model_type!r}") from None


def key_value_groups(config) -> int:
    """Key/value groups per block: ``num_key_value_heads`` (equal to the head count without
    grouped-query attention)."""
    return getattr(config, "num_key_value_heads", None) or config.num_attention_heads


def heads_per_group(config) -> int:
    return config.num_attention_heads // key_value_groups(config)


def allowed_head_groups(config, layout: Layout) -> list[int]:
    """The numbers of key/value groups a block may keep (ascending) that the config class
    accepts. Asked of the config class itself, so that a transformers release relaxing its
    checks widens the choice without a change here."""
    if not layout.removes_heads:
        return [key_value_groups(config)]
    allowed = []
    for groups in range(1, key_value_groups(config) + 1):
        candidate = copy.deepcopy(config)
        resize_config(candidate, layout, neurons=None, head_groups=groups)
        if config_accepts(candidate) or carrier_config(candidate) is not None:
            allowed.append(groups)
    return allowed


def config_accepts(config) -> bool:
    """Whether ``config``'s own class accepts its sizes (strict huggingface_hub validation)."""
    try:
        if hasattr(config, "validate"):
            config.validate()
    except (ValueError, TypeError, StrictDataclassError):
        return False
    return True


def carrier_config(config) -> transformers.PretrainedConfig | None:
    """The ``MistralConfig`` that describes the same model as the Llama ``config`` (already
    resized), or None when there is none: not a Llama, biases Mistral lacks, or sizes that
    Mistral refuses as well."""
    if config.model_type != "llama" or getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False) \
            or getattr(config, "pretraining_tp", 1) not in (None, 1):
        return None
    known = set(transformers.MistralConfig().to_dict())
    values = {k: v for k, v in config.to_dict().items()
              if k in known and k not in ("architectures", "model_type", "transformers_version")}
    try:
        carrier = transformers.MistralConfig(**{**values, "sliding_window": None})
    except (ValueError, TypeError, StrictDataclassError):
        return None
    return carrier if config_accepts(carrier) else None


def to_carrier(model: nn.Module) -> nn.Module:
    """``model`` (a Llama whose config its class refuses) as the equivalent
    ``MistralForCausalLM``, sharing its tensors: same module names, so masks still apply."""
    config = carrier_config(model.config)
    if config is None:
        raise ValueError(f"no config describes this {type(model).__name__} with {model.config.num_attention_heads} heads")
    config.architectures = ["MistralForCausalLM"]
    with torch.device("meta"):
        carrier = transformers.MistralForCausalLM(config)
    carrier.load_state_dict(model.state_dict(), strict=True, assign=True)
    if getattr(config, "tie_word_embeddings", False):
        carrier.tie_weights()
    # Buffers (rotary frequencies) are not in the state dict: made again on the model's device.
    device = next(model.parameters()).device
    for name, buffer in list(carrier.named_buffers()):
        if buffer.is_meta:
            owner, _, attr = name.rpartition(".")
            value = getattr(model.get_submodule(owner), attr).to(device)
            carrier.get_submodule(owner).register_buffer(attr, value, persistent=False)
    return carrier.train(model.training)


def resize_config(config, layout: Layout, neurons: int | None, head_groups: int | None) -> None:
    """Write the new sizes into ``config`` (None: that size is unchanged)."""
    if neurons is not None:
        setattr(config, layout.intermediate_size_key, neurons)
    if head_groups is not None:
        # The head size is written out: with fewer heads it no longer follows from hidden_size.
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        per_group = heads_per_group(config)
        config.head_dim = head_dim
        config.num_attention_heads = head_groups * per_group
        config.num_key_value_heads = head_groups


def keep_units(
    block: nn.Module,
    block_name: str,
    layout: Layout,
    kept_neurons: torch.Tensor | None,
    kept_head_groups: torch.Tensor | None,
    groups: int,
    masks: dict[str, torch.Tensor],
) -> None:
    """Cut ``block`` down to the given neurons and head groups (ascending indices into the
    block's units; None leaves that kind of unit alone); ``groups`` is how many head groups the
    block has now. Keep-masks of earlier pruning stages, ``masks[layer name]``, are cut the
    same way so that they still match their weights."""
    if kept_neurons is not None:
        neurons = _layer(block, block_name, layout.neuron_consumer).in_features
        for path in layout.neuron_producers:
            keep_output_units(_layer(block, block_name, path), kept_neurons, neurons, masks)
        keep_input_units(_layer(block, block_name, layout.neuron_consumer), kept_neurons, neurons, masks)
        for path, attribute in layout.width_attributes.items():
            setattr(block.get_submodule(path), attribute, len(kept_neurons))
    if kept_head_groups is not None:
        for path in layout.head_producers:
            keep_output_units(_layer(block, block_name, path), kept_head_groups, groups, masks)
        keep_input_units(_layer(block, block_name, layout.head_consumer), kept_head_groups, groups, masks)


def _layer(block: nn.Module, block_name: str, path: str) -> WeightLayer:
    return WeightLayer(f"{block_name}.{path}", block.get_submodule(path))


def unit_features(kept: torch.Tensor, units: int, features: int) -> torch.Tensor:
    """The feature indices of the kept units when ``features`` are split into ``units`` equal
    contiguous slices: ``unit_features([0, 2], 3, 6) == [0, 1, 4, 5]``."""
    if features % units:
        raise ValueError(f"{features} features do not split into {units} units")
    width = features // units
    kept = torch.as_tensor(kept, dtype=torch.long)
    return (kept[:, None] * width + torch.arange(width)).reshape(-1)


def keep_output_units(layer: WeightLayer, kept: torch.Tensor, units: int, masks: dict) -> None:
    """Keep only the output features (rows of the ``[out, in]`` weight, and the bias) of the
    kept units."""
    index = unit_features(kept, units, layer.out_features).to(layer.weight().device)
    bias = layer.module.bias
    _replace_weight(layer, layer.weight()[index])
    if bias is not None:
        layer.module.bias = nn.Parameter(bias.detach()[index].contiguous(), requires_grad=bias.requires_grad)
    if layer.name in masks:
        masks[layer.name] = masks[layer.name][index.to(masks[layer.name].device)]


def keep_input_units(layer: WeightLayer, kept: torch.Tensor, units: int, masks: dict) -> None:
    """Keep only the input features (columns of the ``[out, in]`` weight) of the kept units.
    The bias belongs to the outputs and stays whole."""
    index = unit_features(kept, units, layer.in_features).to(layer.weight().device)
    _replace_weight(layer, layer.weight()[:, index])
    if layer.name in masks:
        masks[layer.name] = masks[layer.name][:, index.to(masks[layer.name].device)]


def _replace_weight(layer: WeightLayer, weight: torch.Tensor) -> None:
    """Give ``layer`` a new ``[out, in]`` weight of another shape, in the module's own layout,
    and update the sizes its forward reads (Conv1D's ``nf`` shapes its output)."""
    module = layer.module
    stored = weight.t() if layer.is_conv1d else weight
    module.weight = nn.Parameter(stored.contiguous(), requires_grad=module.weight.requires_grad)
    out_features, in_features = weight.shape
    if layer.is_conv1d:
        module.nf, module.nx = out_features, in_features
    else:
        module.out_features, module.in_features = out_features, in_features

"""config.json: is it a causal LM Squeeze compresses, does it leave *how* it is loaded to
Squeeze (no kernel, quantizer or class chosen: ``LOADING_DIRECTIVES``, a 422), and is it a sane
size?

Its sizes are bounded first, then it is built with transformers' ``AutoConfig`` and checked
again with the defaults filled in::

    model_type, architecture, config = check_config(config_doc, limits)
    # ("gpt2", "GPT2LMHeadModel", GPT2Config(...))
"""

from __future__ import annotations

from app.checkpoints.errors import CheckpointError, UploadLimits, too_many_parameters

# Model families Squeeze compresses. Each must also be a causal LM in the installed transformers.
SUPPORTED_MODEL_TYPES: frozenset[str] = frozenset(
    {"gpt2", "gpt_bigcode", "llama", "mistral", "qwen2", "opt"}
)

# Bounds on config.json's sizes.
MAX_LAYERS = 1024
MAX_HIDDEN = 65536
MAX_VOCAB = 2_000_000
MAX_INTERMEDIATE = 1 << 20
MAX_POSITIONS = 1 << 24
MAX_HEAD_DIM = 4096
_CONFIG_BOUNDS: dict[str, tuple[int, str]] = {
    "n_layer": (MAX_LAYERS, "layers"),
    "num_hidden_layers": (MAX_LAYERS, "layers"),
    "num_layers": (MAX_LAYERS, "layers"),
    "n_embd": (MAX_HIDDEN, "hidden size"),
    "hidden_size": (MAX_HIDDEN, "hidden size"),
    "d_model": (MAX_HIDDEN, "hidden size"),
    "word_embed_proj_dim": (MAX_HIDDEN, "embedding size"),
    "n_head": (MAX_HIDDEN, "attention heads"),
    "num_attention_heads": (MAX_HIDDEN, "attention heads"),
    "num_key_value_heads": (MAX_HIDDEN, "key/value heads"),
    "vocab_size": (MAX_VOCAB, "vocabulary size"),
    "n_inner": (MAX_INTERMEDIATE, "MLP size"),
    "intermediate_size": (MAX_INTERMEDIATE, "MLP size"),
    "ffn_dim": (MAX_INTERMEDIATE, "MLP size"),
    "n_positions": (MAX_POSITIONS, "positions"),
    "n_ctx": (MAX_POSITIONS, "positions"),
    "max_position_embeddings": (MAX_POSITIONS, "positions"),
    "head_dim": (MAX_HEAD_DIM, "head size"),
}
# Families whose position embeddings are a learned table (so count towards parameters).
_LEARNED_POSITIONS = frozenset({"gpt2", "gpt_bigcode", "opt"})

# config.json fields that tell transformers *how* to load a model, not what the model is: which
# kernels or classes to use, a quantizer to route the weights through, a parallel plan. The
# worker decides these itself (``worker/engine/loading.py`` passes its own options), so an
# upload carrying one is refused with a 422 that names it, rather than stripped: the stored
# checkpoint stays byte for byte what its owner sent, and what it says is never silently
# ignored. ``save_pretrained`` writes none of them for a plain model. (``auto_map`` and
# ``trust_remote_code``, anywhere in the settings files, are refused before this, by
# ``inspection._refuse_remote_code``.)
_ATTENTION = "chooses the attention kernel, which transformers may fetch from the Hub as code"
_EXPERTS = "chooses the mixture-of-experts kernel, which transformers may fetch as code"
_PLAN = "is a parallel loading plan; transformers itself never saves it"
LOADING_DIRECTIVES: dict[str, str] = {
    "attn_implementation": _ATTENTION,
    "_attn_implementation": _ATTENTION,
    "_attn_implementation_internal": _ATTENTION,
    "experts_implementation": _EXPERTS,
    "_experts_implementation": _EXPERTS,
    "_experts_implementation_internal": _EXPERTS,
    # Every upload that passes the weight check is dense (each parameter stored whole, as
    # floats): a quantization_config could only send those weights through a quantizer
    # (bitsandbytes, GPTQ, AWQ, ... with their own kernels and packages). Squeeze quantizes.
    "quantization_config": "routes the weights through a quantizer while loading, but the "
    "upload's weights are dense; Squeeze takes unquantized checkpoints and quantizes them itself",
    "tokenizer_class": "picks the class the tokenizer is loaded with; a tokenizer's own files "
    "(tokenizer_config.json) say what it is",
    "custom_pipelines": "registers pipeline code to import",
    "base_model_tp_plan": _PLAN,
    "base_model_pp_plan": _PLAN,
    "base_model_ep_plan": _PLAN,
    "base_model_fsdp_plan": _PLAN,
    "distributed_config": _PLAN,
}


def check_config(config_doc: dict, limits: UploadLimits):
    """(model_type, causal LM class name, built config) of a parsed config.json, or raise."""
    model_type, architecture = _model_type_and_architecture(config_doc)
    _refuse_loading_directives(config_doc)
    _check_config_bounds(config_doc)
    config = _build_config(model_type, config_doc)
    _check_config_size(model_type, config, config_doc, limits)
    return model_type, architecture, config


def _model_type_and_architecture(config_doc: dict) -> tuple[str, str]:
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_MAPPING_NAMES,
    )

    supported = ", ".join(sorted(SUPPORTED_MODEL_TYPES))
    model_type = config_doc.get("model_type")
    if not isinstance(model_type, str):
        raise CheckpointError(
            f"config.json has no model_type; re-save the model with save_pretrained. "
            f"Supported types: {supported}."
        )
    if (
        model_type not in SUPPORTED_MODEL_TYPES
        or model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    ):
        raise CheckpointError(
            f"model_type {model_type!r} is not supported; Squeeze compresses causal language "
            f"models of these types: {supported}."
        )
    causal = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type]
    architectures = config_doc.get("architectures")
    if architectures is None or architectures == []:
        return model_type, causal
    if not isinstance(architectures, list) or not all(isinstance(a, str) for a in architectures):
        raise CheckpointError("config.json: architectures must be a list of class names.")
    # A base-model checkpoint (e.g. GPT2Model) loads as the causal LM when its head is tied.
    if architectures[0] == MODEL_MAPPING_NAMES.get(model_type):
        return model_type, causal
    if architectures[0] != causal:
        raise CheckpointError(
            f"config.json says the architecture is {architectures[0]}, which is not a causal "
            f"language model; for model_type {model_type!r} Squeeze expects {causal}."
        )
    return model_type, causal


def _refuse_loading_directives(config_doc: dict) -> None:
    for key, why in LOADING_DIRECTIVES.items():
        if key in config_doc:
            raise CheckpointError(
                f"config.json: {key} {why}. How a model is loaded is Squeeze's choice, not the "
                f"upload's: remove {key!r} from config.json and upload again.",
                status_code=422,
            )


def _check_config_bounds(config_doc: dict) -> None:
    """Refuse absurd sizes in config.json before any object is built from it.

    Config classes can allocate per layer (e.g. a layer_types list), so a config with 10**12
    layers must not reach them.
    """
    for key, (maximum, what) in _CONFIG_BOUNDS.items():
        if key not in config_doc or config_doc[key] is None:
            continue
        value = config_doc[key]
        if isinstance(value, bool) or not isinstance(value, int):
            raise CheckpointError(f"config.json: {key} must be an integer, not {value!r}.")
        if not 1 <= value <= maximum:
            raise CheckpointError(
                f"config.json: {key} = {value} is out of range for the {what} "
                f"(1 to {maximum}); check the config."
            )


def _build_config(model_type: str, config_doc: dict):
    from transformers import AutoConfig

    fields = {key: value for key, value in config_doc.items() if key != "model_type"}
    try:
        return AutoConfig.for_model(model_type, **fields)
    except Exception as exc:  # transformers raises many types for bad fields
        raise CheckpointError(
            f"config.json is not a valid {model_type} configuration ({exc}); re-save it with "
            "save_pretrained."
        ) from None


def _check_config_size(model_type: str, config, config_doc: dict, limits: UploadLimits) -> None:
    """Check the built config (defaults included) and estimate its size; allocates nothing."""
    values = {}
    for attribute, (maximum, what) in {
        "num_hidden_layers": (MAX_LAYERS, "layers"),
        "hidden_size": (MAX_HIDDEN, "hidden size"),
        "num_attention_heads": (MAX_HIDDEN, "attention heads"),
        "vocab_size": (MAX_VOCAB, "vocabulary size"),
    }.items():
        value = getattr(config, attribute, None)
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= maximum:
            raise CheckpointError(
                f"config.json: the {what} ({attribute} = {value!r}) must be an integer from 1 to "
                f"{maximum}."
            )
        values[attribute] = value
    hidden, heads = values["hidden_size"], values["num_attention_heads"]
    head_dim = config_doc.get("head_dim")
    if head_dim is None and hidden % heads:
        raise CheckpointError(
            f"config.json: the hidden size {hidden} is not divisible by the {heads} attention "
            "heads."
        )
    kv_heads = getattr(config, "num_key_value_heads", None)
    if isinstance(kv_heads, int) and (kv_heads < 1 or heads % kv_heads):
        raise CheckpointError(
            f"config.json: the {heads} attention heads are not divisible by the {kv_heads} "
            "key/value heads."
        )

    # A lower bound on the parameter count: embeddings, the query and output projections and
    # two MLP matrices per layer. Enough to refuse a giant before building even its skeleton.
    sizes = (getattr(config, key, None) for key in ("intermediate_size", "n_inner", "ffn_dim"))
    mlp = next((size for size in sizes if isinstance(size, int)), 4 * hidden)  # GPT-2: 4 x hidden
    query = heads * (head_dim or hidden // heads)
    # OPT can embed tokens in a narrower space than the hidden size.
    embedding = getattr(config, "word_embed_proj_dim", None) or hidden
    layers, vocab = values["num_hidden_layers"], values["vocab_size"]
    estimate = vocab * min(embedding, hidden) + layers * 2 * hidden * (query + mlp)
    if model_type in _LEARNED_POSITIONS:
        positions = getattr(config, "max_position_embeddings", None)
        estimate += hidden * positions if isinstance(positions, int) else 0
    if estimate > limits.max_parameters:
        raise CheckpointError(too_many_parameters(estimate, limits, at_least=True))


def context_length(config) -> int | None:
    value = getattr(config, "max_position_embeddings", None)  # gpt2 maps this to n_positions
    return value if isinstance(value, int) and not isinstance(value, bool) else None

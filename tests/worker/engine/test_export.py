import json

import pytest
import torch
import transformers
from safetensors import safe_open

from app.specs import PruneMagnitude, QuantizeDynamicInt8, QuantizeRTN
from tests.factories import make_checkpoint
from worker.engine.loading import load_model
from worker.engine.export import resolve_format, write_checkpoint
from worker.engine.modules import compressible_layers
from worker.engine.pipeline import run_pipeline
from worker.engine.registry import EngineContext

CPU = torch.device("cpu")
IDS = torch.arange(3, 40).unsqueeze(0) * 7 % 300


def logits(model):
    with torch.no_grad():
        return model(IDS).logits


def quantized_bytes_ratio(folder, ctx):
    """Bytes the artifact spends on the quantized layers' weights (integers, scales, zero
    points, shapes) over what they take as float32."""
    stored = 0
    with safe_open(folder / "model.safetensors", framework="pt") as tensors:
        for key in tensors.keys():
            layer, _, tensor_name = key.rpartition(".")
            if layer in ctx.quantized and tensor_name.startswith("weight"):
                t = tensors.get_tensor(key)
                stored += t.numel() * t.element_size()
    dense = sum(q.q.numel() * 4 for q in ctx.quantized.values())
    return stored / dense


@pytest.mark.parametrize(
    "stage, max_ratio",
    [(QuantizeRTN(bits=8), 0.3), (QuantizeRTN(bits=4, group_size=64, symmetric=False), 0.16)],
    ids=["int8-channel", "int4-group-asym"],
)
def test_compressed_gpt2_is_written_as_gpt_bigcode_and_loads_to_the_same_logits(
    stage, max_ratio, tiny_models, tmp_path
):
    model = tiny_models["gpt2"](width=128)
    ctx = EngineContext()
    run_pipeline(model, [PruneMagnitude(sparsity=0.5), stage], ctx)

    info = write_checkpoint(model, ctx, tmp_path, "compressed-tensors", source_dir=tmp_path)

    config = json.loads((tmp_path / "config.json").read_text())
    assert info["architecture"] == "GPTBigCodeForCausalLM" and config["model_type"] == "gpt_bigcode"
    assert config["multi_query"] is False
    quantization = config["quantization_config"]
    assert quantization["quant_method"] == "compressed-tensors"
    assert quantization["quantization_status"] == "compressed"
    assert quantization["format"] == ("int-quantized" if stage.bits == 8 else "pack-quantized")
    assert quantization["ignore"] == ["lm_head"]
    assert info["weights_bytes"] == (tmp_path / "model.safetensors").stat().st_size
    assert quantized_bytes_ratio(tmp_path, ctx) <= max_ratio

    loaded = load_model(tmp_path, CPU)
    assert isinstance(loaded, transformers.GPTBigCodeForCausalLM)
    torch.testing.assert_close(logits(loaded), logits(model), rtol=0, atol=1e-5)
    torch.testing.assert_close(loaded.lm_head.weight, model.lm_head.weight, rtol=0, atol=0)


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_compressed_llama_with_a_partial_last_group(tied, tiny_models, tmp_path):
    model = tiny_models["llama"](tied)
    ctx = EngineContext()
    # The rows are 64 and 128 long: not multiples of 48.
    run_pipeline(model, [QuantizeRTN(bits=4, group_size=48)], ctx)

    write_checkpoint(model, ctx, tmp_path, "compressed-tensors", source_dir=tmp_path)

    config = json.loads((tmp_path / "config.json").read_text())
    weights = config["quantization_config"]["config_groups"]["group_0"]["weights"]
    assert weights["strategy"] == "block" and weights["block_structure"] == [1, 48]
    loaded = load_model(tmp_path, CPU)
    torch.testing.assert_close(logits(loaded), logits(model), rtol=0, atol=1e-5)
    torch.testing.assert_close(loaded.lm_head.weight, model.lm_head.weight, rtol=0, atol=0)
    if tied:
        assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()


def test_int8_llama_artifact_also_loads_without_options(tiny_models, tmp_path):
    """How most clients will load it: plain from_pretrained, weights kept compressed."""
    model = tiny_models["llama"]()
    ctx = EngineContext()
    run_pipeline(model, [QuantizeRTN(bits=8, group_size=32)], ctx)
    write_checkpoint(model, ctx, tmp_path, "compressed-tensors", source_dir=tmp_path)

    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    torch.testing.assert_close(logits(loaded), logits(model), rtol=0, atol=1e-5)


def test_dense_artifact_keeps_the_zeros_and_the_tokenizer(tiny_models, tokenizer, tmp_path):
    source, out = tmp_path / "source", tmp_path / "out"
    tokenizer.save_pretrained(source)
    model = tiny_models["opt"]()
    ctx = EngineContext()
    run_pipeline(model, [PruneMagnitude(sparsity=0.5)], ctx)

    info = write_checkpoint(model, ctx, out, "dense", source_dir=source)

    assert info["format"] == "dense" and info["architecture"] == "OPTForCausalLM"
    assert (out / "tokenizer.json").is_file() and (out / "tokenizer_config.json").is_file()
    loaded = load_model(out, CPU)
    for layer in compressible_layers(loaded):
        assert torch.equal(layer.weight() != 0, ctx.masks[layer.name])
    torch.testing.assert_close(logits(loaded), logits(model), rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    "stages, requested, expected",
    [
        ([QuantizeRTN(bits=4)], "auto", "compressed-tensors"),
        ([QuantizeDynamicInt8()], "auto", "compressed-tensors"),
        ([PruneMagnitude(sparsity=0.5), QuantizeRTN(bits=8)], "auto", "compressed-tensors"),
        # Pruned-only artifacts stay dense: no sparse compressed-tensors layout loads (the job
        # spec refuses compressed-tensors without a quantization stage, see app/specs.py).
        ([PruneMagnitude(sparsity=0.5)], "auto", "dense"),
        ([QuantizeRTN(bits=8)], "dense", "dense"),
    ],
)
def test_auto_format(stages, requested, expected, tiny_models):
    ctx = EngineContext()
    run_pipeline(tiny_models["gpt2"](), stages, ctx)
    assert resolve_format(requested, ctx) == expected


@pytest.mark.parametrize("stages", [[], [PruneMagnitude(sparsity=0.5)]], ids=["nothing", "pruned-only"])
def test_compressed_tensors_needs_a_quantization_stage(stages, tiny_models, tmp_path):
    ctx = EngineContext()
    run_pipeline(tiny_models["gpt2"](), stages, ctx)
    with pytest.raises(ValueError, match="needs a quantization stage"):
        write_checkpoint(ctx.model or tiny_models["gpt2"](), ctx, tmp_path, "compressed-tensors", tmp_path)


def test_pruned_and_quantized_layers_are_stored_quantized_only(tiny_models, tmp_path):
    model = tiny_models["llama"]()
    ctx = EngineContext()
    run_pipeline(model, [PruneMagnitude(pattern="2:4"), QuantizeRTN(bits=8)], ctx)

    write_checkpoint(model, ctx, tmp_path, "compressed-tensors", source_dir=tmp_path)

    quantization = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert quantization["format"] == "int-quantized" and not quantization.get("sparsity_config")
    torch.testing.assert_close(logits(load_model(tmp_path, CPU)), logits(model), rtol=0, atol=1e-5)


@pytest.mark.parametrize("layout", ["sparse-bitmask", "sparse-24-bitmask"])
def test_sparse_layouts_fail_instead_of_loading_random_weights(layout, tiny_models, tmp_path):
    # An upload (say, from an older llm-compressor) may declare one; from_pretrained would
    # leave those layers randomly initialised.
    model = tiny_models["llama"]()
    ctx = EngineContext()
    run_pipeline(model, [QuantizeRTN(bits=8)], ctx)
    write_checkpoint(model, ctx, tmp_path, "compressed-tensors", source_dir=tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["quantization_config"]["sparsity_config"] = {"format": layout, "targets": ["Linear"]}
    (tmp_path / "config.json").write_text(json.dumps(config))

    with pytest.raises(ValueError, match=layout):
        load_model(tmp_path, CPU)


@pytest.mark.parametrize("fmt", ["dense", "compressed-tensors"])
def test_a_small_max_shard_size_gives_shards_and_an_index_that_from_pretrained_loads(fmt, tmp_path):
    # Loaded as the engine loads an upload (a bf16 model made in memory would also have its
    # rotary frequencies in bf16, which from_pretrained keeps in float32).
    model = load_model(make_checkpoint(tmp_path / "source", "llama", dtype=torch.bfloat16), CPU)
    ctx = EngineContext()
    run_pipeline(model, [PruneMagnitude(sparsity=0.5), QuantizeRTN(bits=8)], ctx)
    max_shard_bytes = 60_000  # the embeddings and lm_head (51 200 bytes each) fit, one a shard

    out = tmp_path / "out"

    info = write_checkpoint(model, ctx, out, fmt, source_dir=tmp_path / "source", max_shard_bytes=max_shard_bytes)

    shards = sorted(out.glob("*.safetensors"))
    assert info["shards"] == len(shards) >= 3 and not (out / "model.safetensors").exists()
    assert [path.name for path in shards] == [f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                                              for i in range(1, len(shards) + 1)]
    index = json.loads((out / "model.safetensors.index.json").read_text())
    stored = {}
    for path in shards:
        with safe_open(path, framework="pt") as tensors:
            stored.update(dict.fromkeys(tensors.keys(), path.name))
        data = path.stat().st_size - _header_bytes(path)
        assert data <= max_shard_bytes, path.name
    assert index["weight_map"] == stored
    assert index["metadata"]["total_size"] == sum(path.stat().st_size - _header_bytes(path) for path in shards)

    loaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert loaded.dtype == torch.bfloat16
    torch.testing.assert_close(logits(loaded), logits(model), rtol=0, atol=0)


def _header_bytes(path) -> int:
    return 8 + int.from_bytes(path.read_bytes()[:8], "little")

import copy
import json

import pytest
import torch
import transformers

from app.specs import PruneMagnitude, QuantizeDynamicInt8
from worker.engine.loading import load_model
from worker.engine.export import write_checkpoint
from worker.engine.modules import WeightLayer, compressible_layers
from worker.engine.pipeline import run_pipeline
from worker.engine.registry import EngineContext
from worker.engine.quantize.dynamic import (
    Int8DynamicLinear,
    fake_quantize_per_token,
    input_bits,
    quantize_per_token,
    quantizes_inputs,
    stop_quantizing_inputs,
    to_cpu_serving,
)
from worker.engine.quantize.rtn import dequantize

CPU = torch.device("cpu")
IDS = torch.arange(3, 40).unsqueeze(0) * 7 % 300
W8A8_INPUTS = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "token", "dynamic": True}


def logits(model):
    with torch.no_grad():
        return model(IDS).logits


def test_per_token_scale_and_error_bound():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 64) * torch.logspace(-3, 2, 5).reshape(1, 5, 1)  # tokens 1e-3 .. 1e2
    x[1, 2] = 0.0

    q, scale = quantize_per_token(x)

    assert q.dtype == torch.int8 and q.shape == x.shape and scale.shape == (2, 5, 1)
    assert q.min() >= -128 and q.max() <= 127
    torch.testing.assert_close(scale[0, :, 0], x[0].abs().amax(-1) / 127.5)  # one scale per token
    x_hat = fake_quantize_per_token(x)
    torch.testing.assert_close(x_hat, q.float() * scale, rtol=0, atol=0)
    # The absmax element lands on 127.5 steps and is clamped to 127: exactly half a step off.
    assert ((x - x_hat).abs() <= scale / 2 * (1 + 1e-4)).all()
    assert torch.equal(x_hat[1, 2], torch.zeros(64))  # an all-zero token stays exactly zero


def test_fake_quantization_passes_gradients_straight_through():
    x = torch.randn(3, 16, requires_grad=True)
    fake_quantize_per_token(x).pow(2).sum().backward()
    torch.testing.assert_close(x.grad, 2 * fake_quantize_per_token(x.detach()))


def test_stage_weights_are_int8_per_channel_and_keep_pruned_zeros(tiny_models):
    model = tiny_models["llama"]()
    original = {layer.name: layer.weight().clone() for layer in compressible_layers(model)}
    ctx = EngineContext()

    _, metrics = run_pipeline(model, [PruneMagnitude(sparsity=0.5), QuantizeDynamicInt8()], ctx)

    assert metrics["name"] == "quantize.dynamic_int8" and metrics["bits"] == 8
    assert metrics["activation_bits"] == 8 and metrics["activation_strategy"] == "token"
    for layer in compressible_layers(model):
        quantized = ctx.quantized[layer.name]
        assert quantized.bits == 8 and quantized.group_size is None and quantized.zero_point is None
        assert quantized.scale.shape == (layer.out_features, 1)
        assert quantized.q.abs().max() <= 127  # symmetric: absmax maps to 127
        assert torch.equal(layer.weight(), dequantize(quantized))  # the model runs the grid
        assert torch.equal(layer.weight() != 0, ctx.masks[layer.name])
        kept = original[layer.name] * ctx.masks[layer.name]
        assert ((kept - layer.weight()).abs() <= quantized.scale / 2 * (1 + 1e-5)).all()
        assert input_bits(layer.module) == 8  # what the export declares for the layer


def test_stage_makes_the_model_quantize_its_inputs(tiny_models):
    model = tiny_models["gpt2"]()
    run_pipeline(model, [QuantizeDynamicInt8()], EngineContext())
    with_inputs_quantized = logits(model)
    for layer in compressible_layers(model):
        stop_quantizing_inputs(layer.module)
    weights_only = logits(model)
    assert 1e-4 < (with_inputs_quantized - weights_only).abs().max() < 0.1


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_artifact_is_w8a8_dynamic_and_reloads_with_int8_activations(name, tiny_models, tmp_path):
    model = tiny_models[name]()
    ctx = EngineContext()
    run_pipeline(model, [QuantizeDynamicInt8()], ctx)

    write_checkpoint(model, ctx, tmp_path, "compressed-tensors", source_dir=tmp_path / "none")

    quantization = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    scheme = quantization["config_groups"]["group_0"]
    assert quantization["format"] == "int-quantized" and quantization["ignore"] == ["lm_head"]
    assert {key: scheme["weights"][key] for key in ("num_bits", "type", "symmetric", "strategy")} == {
        "num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel"}
    assert {key: scheme["input_activations"][key] for key in W8A8_INPUTS} == W8A8_INPUTS
    expected = logits(model)
    # The worker's reload (dequantized weights + our per-token fake quantization) and a client's
    # plain from_pretrained (compressed-tensors' own forward wrapper) both compute the same.
    loaded = load_model(tmp_path, CPU)
    assert all(quantizes_inputs(layer.module) for layer in compressible_layers(loaded))
    assert not quantizes_inputs(loaded.lm_head)
    torch.testing.assert_close(logits(loaded), expected, rtol=0, atol=1e-5)
    plain = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    torch.testing.assert_close(logits(plain), expected, rtol=0, atol=1e-5)


def test_cpu_serving_runs_the_stored_integers(tiny_models, tmp_path):
    model = tiny_models["llama"]()
    ctx = EngineContext()
    run_pipeline(model, [QuantizeDynamicInt8()], ctx)
    write_checkpoint(model, ctx, tmp_path, "compressed-tensors", source_dir=tmp_path / "none")
    loaded = load_model(tmp_path, CPU)
    expected = logits(loaded)

    serving = to_cpu_serving(copy.deepcopy(loaded))

    for name, quantized in ctx.quantized.items():
        module = serving.get_submodule(name)
        assert isinstance(module, Int8DynamicLinear)
        assert torch.equal(module.weight_int8, quantized.q)
    assert isinstance(serving.lm_head, torch.nn.Linear)  # stays float, as in the artifact
    # Same integers on both sides, but the float sums are rounded differently, which now and then
    # moves an activation of a later layer to the next integer (the tiny model's int8 activations
    # move its logits by ~5e-3).
    torch.testing.assert_close(logits(serving), expected, rtol=0, atol=1e-3)


def test_int8_linear_matches_the_fake_quantized_layer():
    torch.manual_seed(0)
    linear = torch.nn.Linear(40, 24)
    with torch.no_grad():
        linear.weight.mul_(torch.linspace(0.1, 2.0, 24).unsqueeze(1))
    x = torch.randn(3, 7, 40)
    serving = Int8DynamicLinear.from_layer(WeightLayer("linear", linear))
    weight = serving.weight_int8.float() * serving.weight_scale.t()
    expected = torch.nn.functional.linear(fake_quantize_per_token(x), weight, linear.bias)
    torch.testing.assert_close(serving(x), expected, rtol=0, atol=1e-5)

import math

import pytest
import torch

from app.specs import PruneSparseGPT, QuantizeGPTQ
from tests import factories
from tests.worker.engine.test_capture import calibration, corpus_perplexity
from tests.worker.engine.test_sparsegpt import correlated_inputs, hessian_of, output_error
from worker.engine.loading import load_model
from worker.engine.export import write_checkpoint
from worker.engine.modules import compressible_layers
from worker.engine.pipeline import run_pipeline
from worker.engine.registry import EngineContext
from worker.engine.quantize.gptq import gptq_quantize
from worker.engine.quantize.rtn import dequantize, quantize_rtn

CPU = torch.device("cpu")


@pytest.mark.parametrize("act_order", [False, True], ids=["in-order", "act-order"])
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_8x6_layer_with_a_diagonal_hessian_is_rounded_like_rtn(act_order, symmetric):
    # As llm-compressor's test: an 8-input, 6-output Linear, H = diag(1..8), groups of 2. With
    # no correlation between inputs there is nothing to compensate: GPTQ is RTN.
    torch.manual_seed(0)
    weight = torch.nn.Linear(8, 6, bias=False).weight.detach()
    hessian = torch.diag(torch.arange(1, 9, dtype=torch.float32))

    quantized = gptq_quantize(weight, hessian, bits=4, group_size=2, symmetric=symmetric,
                              act_order=act_order, block_size=3)

    expected = quantize_rtn(weight, bits=4, group_size=2, symmetric=symmetric)
    assert quantized.scale.shape == (6, 4) and quantized.q.shape == (6, 8)
    assert torch.equal(quantized.q, expected.q)
    assert torch.equal(quantized.scale, expected.scale)
    assert (quantized.zero_point is None) == symmetric
    if not symmetric:
        assert torch.equal(quantized.zero_point, expected.zero_point)
    error = (weight - dequantize(quantized)).abs()
    assert (error <= quantized.per_element(quantized.scale) / 2 + 1e-7).all()


@pytest.mark.parametrize("act_order, symmetric", [(False, True), (True, True), (False, False)],
                         ids=["sym", "sym-act-order", "asym"])
def test_output_error_is_lower_than_rtn(act_order, symmetric):
    torch.manual_seed(0)
    weight, inputs = torch.randn(64, 704), correlated_inputs(2048, 704)  # 704 = 5.5 x 128

    quantized = gptq_quantize(weight, hessian_of(inputs), bits=4, group_size=128,
                              symmetric=symmetric, act_order=act_order)

    assert quantized.scale.shape == (64, 6) and quantized.group_size == 128  # a partial group
    assert quantized.q.min() >= -8 and quantized.q.max() <= 7
    rtn = dequantize(quantize_rtn(weight, 4, 128, symmetric))
    ratio = output_error(weight, dequantize(quantized), inputs) / output_error(weight, rtn, inputs)
    print(f"gptq / rtn output error, act_order={act_order} symmetric={symmetric}: {ratio:.3f}")
    assert ratio < 0.8


@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_pruned_weights_stay_exactly_zero(symmetric):
    torch.manual_seed(0)
    weight, inputs = torch.randn(16, 64), correlated_inputs(512, 64)
    keep = torch.rand(16, 64) > 0.5
    quantized = gptq_quantize(weight * keep, hessian_of(inputs), 4, 16, symmetric, keep=keep)
    assert (dequantize(quantized)[~keep] == 0).all()
    zero = 0 if symmetric else quantized.per_element(quantized.zero_point)
    assert torch.equal(torch.where(keep, 0, quantized.q), torch.where(keep, 0, zero).to(torch.int8))


def test_dead_inputs_get_zero_weights():
    torch.manual_seed(0)
    inputs = correlated_inputs(256, 32)
    inputs[:, 5] = 0
    quantized = gptq_quantize(torch.randn(8, 32), hessian_of(inputs), 8, None)
    assert quantized.scale.shape == (8, 1)
    assert (dequantize(quantized)[:, 5] == 0).all() and torch.isfinite(quantized.scale).all()


@pytest.mark.parametrize("arch", ["gpt2", "llama", "opt"])
def test_gptq_after_sparsegpt_keeps_the_zeros_and_stores_what_the_model_runs(arch):
    model = factories.make_model(arch)
    ctx = EngineContext(calibration=calibration())
    stages = [PruneSparseGPT(sparsity=0.5, block_size=32), QuantizeGPTQ(bits=4, group_size=32)]

    pruned, quantized = run_pipeline(model, stages, ctx)

    assert pruned["sparsity"] == pytest.approx(0.5)
    assert quantized["name"] == "quantize.gptq" and quantized["bits"] == 4
    layers = compressible_layers(model)
    assert set(ctx.quantized) == {layer.name for layer in layers}
    for layer in layers:
        keep = ctx.masks[layer.name]
        assert int((~keep).sum()) == round(0.5 * keep.numel())
        assert torch.equal(layer.weight(), dequantize(ctx.quantized[layer.name]))  # on the grid
        assert (layer.weight()[~keep] == 0).all()
        assert (ctx.quantized[layer.name].q[~keep] == 0).all()
    assert math.isfinite(corpus_perplexity(model))


def test_gptq_artifact_loads_to_the_same_logits(tmp_path):
    model = factories.make_model("gpt2")
    ctx = EngineContext(calibration=calibration())
    stage = QuantizeGPTQ(bits=4, group_size=32, symmetric=False, act_order=True)
    run_pipeline(model, [stage], ctx)

    write_checkpoint(model, ctx, tmp_path, "compressed-tensors", source_dir=tmp_path)

    ids = calibration(samples=1, seq_len=16)[0]
    with torch.no_grad():
        torch.testing.assert_close(load_model(tmp_path, CPU)(ids).logits, model(ids).logits,
                                   rtol=1e-4, atol=1e-4)

import math

import pytest
import torch

from app.specs import PruneMagnitude, QuantizeRTN
from worker.engine.modules import compressible_layers
from worker.engine.pipeline import run_pipeline
from worker.engine.registry import EngineContext
from worker.engine.quantize.rtn import dequantize, quantize_rtn


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("group_size", [None, 32, 128], ids=["channel", "g32", "g128"])
def test_error_is_at_most_half_a_step(bits, symmetric, group_size):
    torch.manual_seed(0)
    weight = torch.randn(48, 704) * torch.linspace(0.01, 3, 48).unsqueeze(1)  # 704 = 5.5 x 128
    weight[0] += 2.0  # an all-positive row: the asymmetric range must still contain 0

    qw = quantize_rtn(weight, bits, group_size, symmetric)
    n_groups = 1 if group_size is None else math.ceil(704 / group_size)
    assert qw.q.dtype == torch.int8 and qw.q.shape == weight.shape
    assert qw.scale.shape == (48, n_groups) and qw.scale.dtype == torch.float32
    assert (qw.zero_point is None) == symmetric
    if not symmetric:
        assert qw.zero_point.dtype == torch.int8 and qw.zero_point.shape == (48, n_groups)
    low = -(2 ** (bits - 1))
    assert qw.q.min() >= low and qw.q.max() <= -low - 1

    error = (weight - dequantize(qw)).abs()
    half_step = qw.per_element(qw.scale) / 2
    assert (error <= half_step * (1 + 1e-5) + 1e-7).all()


def test_partial_last_group_has_its_own_scale():
    weight = torch.ones(2, 704)
    weight[:, 640:] = 100.0  # only the last, 64-wide group is large
    qw = quantize_rtn(weight, 8, group_size=128)
    assert qw.scale.shape == (2, 6)
    torch.testing.assert_close(qw.scale[:, :5], torch.full((2, 5), 1 / 127))
    torch.testing.assert_close(qw.scale[:, 5], torch.full((2,), 100 / 127))
    torch.testing.assert_close(dequantize(qw), weight)


@pytest.mark.parametrize("symmetric", [True, False])
def test_zero_rows_and_zero_groups_stay_zero(symmetric):
    weight = torch.randn(4, 64)
    weight[1] = 0
    weight[2, :32] = 0
    qw = quantize_rtn(weight, 4, group_size=32, symmetric=symmetric)
    restored = dequantize(qw)
    assert torch.isfinite(qw.scale).all() and (qw.scale > 0).all()
    assert torch.equal(restored[1], torch.zeros(64))
    assert torch.equal(restored[2, :32], torch.zeros(32))


@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("bits", [8, 4])
def test_pruned_zeros_survive_quantization(bits, symmetric, tiny_models):
    model = tiny_models["gpt2"]()
    ctx = EngineContext()
    quantize = QuantizeRTN(bits=bits, group_size=32, symmetric=symmetric)
    stages = [PruneMagnitude(sparsity=0.5), quantize]
    _, metrics = run_pipeline(model, stages, ctx)
    layers = compressible_layers(model)
    expected = {"name": "quantize.rtn", "layers": len(layers), "bits": bits, "group_size": 32}
    assert metrics == {**metrics, **expected}
    assert metrics["max_abs_error"] > 0
    for layer in layers:
        assert torch.equal(layer.weight() != 0, ctx.masks[layer.name])  # zeros exactly where pruned
        assert torch.equal(layer.weight(), dequantize(ctx.quantized[layer.name]))


def test_pruning_after_quantization_keeps_the_integers_in_step(tiny_models):
    model = tiny_models["llama"]()
    ctx = EngineContext()
    run_pipeline(model, [QuantizeRTN(bits=4, symmetric=False), PruneMagnitude(sparsity=0.3)], ctx)
    for layer in compressible_layers(model):
        assert int((layer.weight() == 0).sum()) >= round(0.3 * layer.weight().numel())
        assert torch.equal(layer.weight(), dequantize(ctx.quantized[layer.name]))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_scales_of_a_half_precision_weight_are_stored_in_its_dtype(dtype, symmetric):
    """The scale is rounded to the weight's dtype before the weights are rounded with it, so
    the dequantized weight in that dtype is exactly what compressed-tensors computes from the
    stored integers and scale (in the scale's dtype). The error is half a step, give or take
    the scale's rounding (a range's end may fall just outside the rounded grid)."""
    from compressed_tensors.quantization.lifecycle.forward_helpers import _dequantize

    torch.manual_seed(0)
    weight = (torch.randn(16, 96) * 0.02).to(dtype)
    qw = quantize_rtn(weight, 4, group_size=32, symmetric=symmetric)

    assert qw.scale.dtype == dtype
    zero_point = None if symmetric else qw.per_element(qw.zero_point)
    theirs = _dequantize(qw.q, qw.per_element(qw.scale), zero_point, dtype=dtype)
    assert torch.equal(dequantize(qw).to(dtype), theirs)
    error = (weight.float() - dequantize(qw)).abs()
    scale_rounding = torch.finfo(dtype).eps  # relative
    assert (error <= qw.per_element(qw.scale).float() / 2 + weight.float().abs() * scale_rounding).all()

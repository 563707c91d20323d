import math

import pytest
import torch

from app.specs import PruneSparseGPT, QuantizeRTN
from tests import factories
from tests.worker.engine.test_capture import calibration, corpus_perplexity
from worker.engine.hessian import InputHessian
from worker.engine.modules import compressible_layers
from worker.engine.pipeline import run_pipeline
from worker.engine.registry import EngineContext
from worker.engine.prune.magnitude import magnitude_mask, magnitude_nm_mask
from worker.engine.prune.sparsegpt import sparsegpt_prune


def correlated_inputs(tokens: int, features: int, seed: int = 0) -> torch.Tensor:
    """``[tokens, features]`` activations with uneven scales and correlated features, as a
    transformer's are: what makes second-order pruning worth it."""
    generator = torch.Generator().manual_seed(seed)
    scales = torch.linspace(0.2, 3.0, features)
    mixing = torch.randn(features, features, generator=generator) / features ** 0.5
    return (torch.randn(tokens, features, generator=generator) * scales) @ mixing


def output_error(weight, new_weight, inputs) -> float:
    """``||W X - W' X||^2`` over the inputs."""
    return float(((inputs @ (weight - new_weight).T) ** 2).sum())


def hessian_of(inputs) -> torch.Tensor:
    hessian = InputHessian(inputs.shape[1])
    hessian.add(inputs)
    return hessian.hessian()


@pytest.mark.parametrize("sparsity", [0.5, 0.7, 0.33])
@pytest.mark.parametrize("block_size", [128, 24])  # 24 does not divide the 100 columns
def test_prunes_exactly_the_share_of_the_layer_and_zeros_it(sparsity, block_size):
    torch.manual_seed(0)
    weight, inputs = torch.randn(30, 100), correlated_inputs(256, 100)

    new_weight, keep = sparsegpt_prune(weight, hessian_of(inputs), sparsity, block_size=block_size)

    assert new_weight.shape == weight.shape and new_weight.dtype == torch.float32
    assert int((~keep).sum()) == round(sparsity * weight.numel())
    assert (new_weight[~keep] == 0).all()
    assert torch.isfinite(new_weight).all()


@pytest.mark.parametrize("block_size", [128, 30, 3])
def test_nm_pattern_in_every_group(block_size):
    torch.manual_seed(0)
    weight, inputs = torch.randn(16, 64), correlated_inputs(256, 64)
    new_weight, keep = sparsegpt_prune(weight, hessian_of(inputs), 0.5, n_m=(2, 4),
                                       block_size=block_size)
    assert ((~keep).view(16, 16, 4).sum(dim=-1) == 2).all()
    assert (new_weight[~keep] == 0).all()


@pytest.mark.parametrize("sparsity, pattern", [(0.5, None), (0.7, None), (0.5, (2, 4))],
                         ids=["50%", "70%", "2:4"])
def test_output_error_is_lower_than_magnitude_pruning(sparsity, pattern):
    torch.manual_seed(0)
    weight, inputs = torch.randn(64, 128), correlated_inputs(1024, 128)

    new_weight, _ = sparsegpt_prune(weight, hessian_of(inputs), sparsity, n_m=pattern,
                                    block_size=32)

    if pattern is None:
        keep = magnitude_mask(weight, sparsity)
    else:
        keep = magnitude_nm_mask(weight, *pattern)
    ratio = output_error(weight, new_weight, inputs) / output_error(weight, weight * keep, inputs)
    print(f"sparsegpt / magnitude output error at {sparsity:.0%} {pattern}: {ratio:.3f}")
    assert ratio < 0.8


def test_without_correlations_it_only_masks():
    # A diagonal Hessian gives nothing to compensate with: the kept weights do not move, and
    # the weights pruned are those of least w^2 * H_jj.
    torch.manual_seed(0)
    weight = torch.randn(8, 16)
    hessian = torch.diag(torch.rand(16) + 0.5)
    new_weight, keep = sparsegpt_prune(weight, hessian, 0.5, block_size=16, dampening=0.01)
    torch.testing.assert_close(new_weight, weight * keep)
    scores = weight ** 2 * (hessian.diagonal() * 1.0 + 0.01 * hessian.diagonal().mean())
    assert scores[~keep].max() <= scores[keep].min()


def test_an_earlier_mask_is_kept_and_counts_towards_the_target():
    torch.manual_seed(0)
    weight, inputs = torch.randn(16, 32), correlated_inputs(256, 32)
    earlier = torch.rand(16, 32) > 0.3  # about 30% already pruned
    new_weight, keep = sparsegpt_prune(weight * earlier, hessian_of(inputs), 0.5, block_size=8,
                                       keep=earlier)
    assert not (keep & ~earlier).any()
    assert int((~keep).sum()) == 256


def test_dead_inputs_are_pruned_first():
    torch.manual_seed(0)
    inputs = correlated_inputs(256, 32)
    inputs[:, [3, 17]] = 0  # never active in calibration
    weight = torch.randn(8, 32) + 10  # large weights, which magnitude would keep
    new_weight, keep = sparsegpt_prune(weight, hessian_of(inputs), 0.25, block_size=32)
    assert not keep[:, [3, 17]].any()
    assert torch.isfinite(new_weight).all()


@pytest.mark.parametrize("arch", ["gpt2", "llama", "opt"])
def test_sparsegpt_stage_prunes_every_layer_exactly(arch):
    model = factories.make_model(arch)
    ctx = EngineContext(calibration=calibration())

    [metrics] = run_pipeline(model, [PruneSparseGPT(sparsity=0.5, block_size=32)], ctx)

    assert metrics["name"] == "prune.sparsegpt" and metrics["sparsity"] == pytest.approx(0.5)
    for layer in compressible_layers(model):
        keep = ctx.masks[layer.name]
        assert int((~keep).sum()) == round(0.5 * keep.numel())
        assert (layer.weight()[~keep] == 0).all()
    assert math.isfinite(corpus_perplexity(model))


def test_sparsegpt_after_quantization_is_refused():
    model = factories.make_model("gpt2")
    with pytest.raises(ValueError, match="before quantization"):
        run_pipeline(model, [QuantizeRTN(bits=8), PruneSparseGPT(sparsity=0.5)],
                     EngineContext(calibration=calibration()))

import math

import pytest
import torch

from app.specs import PruneWanda
from tests import factories
from tests.worker.engine.test_capture import calibration, corpus_perplexity
from worker.engine.modules import compressible_layers
from worker.engine.pipeline import run_pipeline
from worker.engine.registry import EngineContext, JobCancelled
from worker.engine.prune.wanda import InputNormSquared, wanda_mask, wanda_scores

WEIGHT = torch.tensor([[1.0, 2.0, 3.0, 4.0, -1.0, 0.5, -2.0, 0.1],
                       [4.0, 3.0, -2.0, 1.0, 0.0, 3.0, 1.0, -1.0]])
NORM_SQUARED = torch.tensor([16.0, 1.0, 1.0, 0.25, 4.0, 1.0, 1.0, 100.0])
# |W| * sqrt(norm): row 0 [4, 2, 3, 2, 2, 0.5, 2, 1], row 1 [16, 3, 2, 0.5, 0, 3, 1, 10]


def test_scores_are_weight_magnitude_times_input_norm():
    expected = torch.tensor([[4.0, 2.0, 3.0, 2.0, 2.0, 0.5, 2.0, 1.0],
                             [16.0, 3.0, 2.0, 0.5, 0.0, 3.0, 1.0, 10.0]])
    torch.testing.assert_close(wanda_scores(WEIGHT, NORM_SQUARED), expected)


def test_unstructured_mask_drops_the_lowest_scores_of_each_row():
    keep = wanda_mask(WEIGHT, NORM_SQUARED, sparsity=0.5)
    # Row 0 drops 0.5, 1 and, of the four 2s, the first two; row 1 drops 0, 0.5, 1, 2.
    assert keep.tolist() == [[True, False, True, False, True, False, True, False],
                             [True, True, False, False, False, True, False, True]]
    # By magnitude alone row 1 would lose the -1 on the large input 7 and keep the -2 on input 2.
    assert wanda_mask(WEIGHT, torch.ones(8), 0.5).tolist()[1] == [True, True, True, False,
                                                                  False, True, False, False]


def test_nm_mask_chooses_within_each_group_of_m():
    keep = wanda_mask(WEIGHT, NORM_SQUARED, sparsity=0.5, n_m=(2, 4))
    # Groups [4, 2, 3, 2 | 2, 0.5, 2, 1] and [16, 3, 2, 0.5 | 0, 3, 1, 10]; ties: earlier dropped.
    assert keep.tolist() == [[True, False, True, False, True, False, True, False],
                             [True, True, False, False, False, True, False, True]]
    keep = wanda_mask(WEIGHT, NORM_SQUARED, sparsity=0.75, n_m=(1, 4))
    assert keep.tolist() == [[True, False, False, False, False, False, True, False],
                             [True, False, False, False, False, False, False, True]]


@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.77])
def test_exact_count_per_row(sparsity):
    torch.manual_seed(0)
    weight, norms = torch.randn(16, 70), torch.rand(70)
    keep = wanda_mask(weight, norms, sparsity)
    assert ((~keep).sum(dim=1) == round(sparsity * 70)).all()


def test_nm_pattern_on_random_weights():
    torch.manual_seed(0)
    keep = wanda_mask(torch.randn(16, 64), torch.rand(64), 0.5, n_m=(2, 4))
    assert ((~keep).view(16, 16, 4).sum(dim=-1) == 2).all()


def test_input_norm_squared_sums_over_every_token():
    x = torch.arange(12.0).view(2, 3, 2)
    norms = InputNormSquared(2)
    norms.add(x[0])
    norms.add(x[1])
    torch.testing.assert_close(norms.norm_squared(), x.reshape(6, 2).pow(2).sum(0))
    assert torch.equal(InputNormSquared(3).norm_squared(), torch.ones(3))


@pytest.mark.parametrize("arch, pattern", [("gpt2", "unstructured"), ("gpt2", "2:4"),
                                           ("llama", "unstructured"), ("opt", "2:4")])
def test_wanda_stage_prunes_every_row_exactly(arch, pattern):
    model = factories.make_model(arch)
    ctx = EngineContext(calibration=calibration())
    stage = PruneWanda(sparsity=0.5) if pattern == "unstructured" else PruneWanda(pattern="2:4")

    [metrics] = run_pipeline(model, [stage], ctx)

    assert metrics["name"] == "prune.wanda" and metrics["sparsity"] == pytest.approx(0.5)
    for layer in compressible_layers(model):
        keep = ctx.masks[layer.name]
        assert ((~keep).sum(dim=1) == layer.in_features // 2).all()
        assert (layer.weight()[~keep] == 0).all()
    assert math.isfinite(corpus_perplexity(model))


def test_cancel_stops_the_stage_between_layers():
    model = factories.make_model("gpt2")
    layers = compressible_layers(model)
    checks = 0

    def should_cancel() -> bool:
        nonlocal checks
        checks += 1
        return checks > 5  # the pipeline's check, the runner's start and block 0, two layers

    ctx = EngineContext(calibration=calibration(), should_cancel=should_cancel)
    with pytest.raises(JobCancelled):
        run_pipeline(model, [PruneWanda(sparsity=0.5)], ctx)
    assert list(ctx.masks) == [layer.name for layer in layers[:2]]
    assert all((layer.weight() != 0).all() for layer in layers[2:])

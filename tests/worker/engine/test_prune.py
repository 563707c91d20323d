import pytest
import torch

from app.specs import PruneMagnitude, PruneRandom
from worker.engine.modules import compressible_layers
from worker.engine.pipeline import run_pipeline
from worker.engine.registry import EngineContext
from worker.engine.prune.magnitude import magnitude_mask, magnitude_masks
from worker.engine.prune.nm import nm_mask
from worker.engine.prune.random import random_mask, random_nm_mask


def pruned(keep: torch.Tensor) -> int:
    return int((~keep).sum())


@pytest.mark.parametrize("sparsity", [0.1, 0.5, 0.731, 0.99])
def test_random_mask_prunes_exactly_and_repeats_with_the_seed(sparsity):
    weight = torch.randn(37, 53)
    keep = random_mask(weight, sparsity, torch.Generator().manual_seed(3))
    assert keep.dtype == torch.bool and keep.shape == weight.shape
    assert pruned(keep) == round(sparsity * weight.numel())
    assert torch.equal(keep, random_mask(weight, sparsity, torch.Generator().manual_seed(3)))
    assert not torch.equal(keep, random_mask(weight, sparsity, torch.Generator().manual_seed(4)))


@pytest.mark.parametrize("sparsity", [0.1, 0.5, 0.731])
def test_magnitude_mask_drops_exactly_the_smallest(sparsity):
    weight = torch.randn(37, 53)
    keep = magnitude_mask(weight, sparsity)
    assert pruned(keep) == round(sparsity * weight.numel())
    assert weight[~keep].abs().max() <= weight[keep].abs().min()


def test_magnitude_ties_are_broken_by_position():
    weight = torch.ones(4, 5)  # every weight ties
    keep = magnitude_mask(weight, 0.5)
    assert pruned(keep) == 10
    assert keep.flatten().tolist() == [False] * 10 + [True] * 10

    weight = torch.tensor([[0.5, -1.0, 1.0, 2.0], [1.0, -1.0, 0.1, 3.0]])
    keep = magnitude_mask(weight, 0.5)  # 0.1, 0.5, then the first two of the four 1.0s
    assert keep.tolist() == [[False, False, False, True], [True, True, False, True]]


def test_magnitude_mask_on_a_transposed_view():
    weight = torch.randn(64, 48).t()  # like a Conv1D weight seen as [out, in]
    keep = magnitude_mask(weight, 0.3)
    assert pruned(keep) == round(0.3 * weight.numel())
    assert weight[~keep].abs().max() <= weight[keep].abs().min()


def test_global_masks_share_one_threshold_and_an_exact_total():
    weights = [torch.randn(16, 16) * 0.1, torch.randn(16, 40), torch.randn(8, 8) * 10]
    keeps = magnitude_masks(weights, 0.4)
    total = sum(w.numel() for w in weights)
    assert sum(pruned(k) for k in keeps) == round(0.4 * total)
    dropped = torch.cat([w[~k].abs() for w, k in zip(weights, keeps)])
    kept = torch.cat([w[k].abs() for w, k in zip(weights, keeps)])
    assert dropped.max() <= kept.min()
    assert pruned(keeps[0]) > pruned(keeps[1]) > pruned(keeps[2])  # small layers lose more


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize(
    "stage",
    [PruneRandom(sparsity=0.37, seed=1), PruneMagnitude(sparsity=0.37)],
    ids=["random", "magnitude"],
)
def test_every_layer_gets_exactly_the_sparsity(arch, stage, tiny_models):
    model = tiny_models[arch]()
    ctx = EngineContext()
    [metrics] = run_pipeline(model, [stage], ctx)

    layers = compressible_layers(model)
    for layer in layers:
        zeros = int((layer.weight() == 0).sum())
        assert zeros == round(0.37 * layer.weight().numel()), layer.name
        assert torch.equal(ctx.masks[layer.name], layer.weight() != 0)
    assert metrics["layers"] == len(layers)
    assert metrics["sparsity"] == pytest.approx(0.37, abs=1e-3)


def test_global_magnitude_prunes_an_exact_total(tiny_models):
    model = tiny_models["llama"]()
    [metrics] = run_pipeline(model, [PruneMagnitude(sparsity=0.6, scope="global")], EngineContext())
    layers = compressible_layers(model)
    total = sum(layer.weight().numel() for layer in layers)
    zeros = sum(int((layer.weight() == 0).sum()) for layer in layers)
    assert zeros == round(0.6 * total)
    assert metrics["sparsity"] == zeros / total
    per_layer = {int((layer.weight() == 0).sum()) / layer.weight().numel() for layer in layers}
    assert len(per_layer) > 1  # one threshold, not one fraction per layer


def test_pruning_twice_composes(tiny_models):
    model = tiny_models["gpt2"]()
    ctx = EngineContext()
    run_pipeline(model, [PruneRandom(sparsity=0.5, seed=0)], ctx)
    first = {name: mask.clone() for name, mask in ctx.masks.items()}
    [metrics] = run_pipeline(model, [PruneRandom(sparsity=0.5, seed=1)], ctx)

    for layer in compressible_layers(model):
        mask = ctx.masks[layer.name]
        assert not (mask & ~first[layer.name]).any()  # nothing pruned comes back
        assert torch.equal(mask, layer.weight() != 0)
    assert 0.7 < metrics["sparsity"] < 0.8  # about 1 - 0.5 * 0.5


def test_nm_mask_keeps_the_highest_n_of_every_m():
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.3, 1.0, 1.0, 1.0, 1.0]])
    keep = nm_mask(scores, 2, 4)
    # Of four equal scores, the earlier two are dropped.
    assert keep.tolist() == [[False, True, True, False, False, False, True, True]]
    with pytest.raises(ValueError, match="multiple of 4"):
        nm_mask(torch.ones(2, 6), 2, 4)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("method", ["random", "magnitude"])
def test_an_nm_pattern_holds_in_every_group_of_every_layer(arch, method, tiny_models):
    model = tiny_models[arch]()
    originals = {layer.name: layer.weight().clone() for layer in compressible_layers(model)}
    stage = {"random": PruneRandom, "magnitude": PruneMagnitude}[method](pattern="2:4")
    [metrics] = run_pipeline(model, [stage], EngineContext())

    assert metrics["sparsity"] == 0.5
    for layer in compressible_layers(model):
        groups = (layer.weight() != 0).reshape(layer.out_features, -1, 4)
        assert (groups.sum(-1) == 2).all(), layer.name
        if method == "magnitude":
            magnitudes = originals[layer.name].abs().reshape(layer.out_features, -1, 4)
            kept, dropped = magnitudes[groups].reshape(-1, 2), magnitudes[~groups].reshape(-1, 2)
            assert (dropped.max(-1).values <= kept.min(-1).values).all()


def test_random_nm_repeats_with_the_seed():
    weight = torch.randn(8, 16)
    first = random_nm_mask(weight, 1, 4, torch.Generator().manual_seed(0))
    assert torch.equal(first, random_nm_mask(weight, 1, 4, torch.Generator().manual_seed(0)))
    assert int(first.sum()) == 8 * 4

import pytest
import torch

from tests import factories
from worker.engine.calibration import calibration_batches, token_stream
from worker.engine.capture import compress_block_by_block, first_block_inputs
from worker.engine.hessian import InputHessian
from worker.engine.modules import compressible_layers, decoder_blocks
from worker.engine.registry import EngineContext, JobCancelled
from worker.evaluate import perplexity

CPU = torch.device("cpu")
ARCHS = ["gpt2", "llama", "opt"]


def calibration(samples: int = 4, seq_len: int = 32) -> list[torch.Tensor]:
    """Calibration batches from the factories' tokenizer and corpus (shared by the method tests)."""
    return calibration_batches(factories.tokenizer(), [factories.CORPUS], samples, seq_len, seed=0)


def corpus_perplexity(model) -> float:
    ids = token_stream(factories.tokenizer(), [factories.CORPUS], max_tokens=256)
    return perplexity(model, ids, seq_len=64, stride=32, device=CPU)


class Recorder:
    """A statistic that keeps every input it is given."""

    def __init__(self):
        self.inputs = []

    def add(self, inputs):
        self.inputs.append(inputs.detach().clone())


@pytest.mark.parametrize("arch", ARCHS)
def test_block_inputs_are_the_hidden_states_of_a_plain_forward(arch):
    model = factories.make_model(arch)
    # Two lengths: each batch keeps its own mask / position embeddings.
    batches = calibration(samples=2, seq_len=16) + calibration(samples=1, seq_len=24)
    _, blocks = decoder_blocks(model)

    inputs = first_block_inputs(model, batches, CPU)

    with torch.no_grad():
        expected = [model(ids, output_hidden_states=True).hidden_states for ids in batches]
        for index, block in enumerate(blocks):
            for batch, hidden_states in enumerate(inputs.hidden_states):
                torch.testing.assert_close(hidden_states, expected[batch][index],
                                           rtol=1e-5, atol=1e-5)
            inputs.advance(block)
    assert not blocks[0]._forward_pre_hooks  # the catching hook is gone


@pytest.mark.parametrize("arch", ARCHS)
def test_each_block_is_calibrated_on_the_blocks_before_it_as_compressed(arch):
    model = factories.make_model(arch)
    batches = calibration(samples=2, seq_len=16)
    layers = compressible_layers(model)
    seen = {}

    def halve(layer, recorder):  # any change will do: later blocks must see it
        seen[layer.name] = recorder.inputs
        layer.set_weight(layer.weight() * 0.5)

    ctx = EngineContext(calibration=batches)
    assert compress_block_by_block(model, ctx, lambda layer: Recorder(), halve) == layers

    # A plain forward of the final model gives the same inputs to the first layer of each block
    # (its input depends only on the blocks before, all compressed when it was calibrated).
    prefix, blocks = decoder_blocks(model)
    firsts = [next(layer for layer in layers if layer.name.startswith(f"{prefix}.{i}."))
              for i in range(len(blocks))]
    recorders = {layer.name: Recorder() for layer in firsts}
    handles = [layer.module.register_forward_pre_hook(
        lambda module, args, name=layer.name: recorders[name].add(args[0])) for layer in firsts]
    with torch.no_grad():
        for ids in batches:
            model(ids)
    for handle in handles:
        handle.remove()
    for layer in firsts:
        for got, expected in zip(seen[layer.name], recorders[layer.name].inputs, strict=True):
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert all(not layer.module._forward_pre_hooks for layer in layers)


def test_layers_reading_the_same_input_share_one_statistic_fed_once():
    model = factories.make_model("llama")
    made: dict[str, Recorder] = {}

    def statistic(layer):
        made[layer.name] = Recorder()
        return made[layer.name]

    given = {}
    compress_block_by_block(model, EngineContext(calibration=calibration(samples=3, seq_len=16)), statistic,
                            lambda layer, recorder: given.__setitem__(layer.name, recorder))
    for block in ("model.layers.0", "model.layers.1"):
        q, k, v, o, gate, up, down = (given[f"{block}.{name}"] for name in (
            "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
            "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"))
        assert q is k is v and gate is up
        assert len({id(q), id(o), id(gate), id(down)}) == 4
    # One statistic per distinct input (4 per block, not 7), each fed the 48 tokens once.
    assert len(made) == 8
    assert all(sum(x.shape[0] * x.shape[1] for x in r.inputs) == 48 for r in made.values())


def test_hooks_are_removed_when_compressing_fails():
    model = factories.make_model("gpt2")

    def fail(layer, statistic):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        compress_block_by_block(model, EngineContext(calibration=calibration(2, 8)),
                                lambda layer: Recorder(), fail)
    assert not any(module._forward_pre_hooks or module._forward_hooks for module in model.modules())


def test_cancel_stops_between_layers():
    model = factories.make_model("llama")
    layers = compressible_layers(model)
    before = [layer.weight().clone() for layer in layers]
    checks = 0

    def should_cancel() -> bool:
        nonlocal checks
        checks += 1
        return checks > 5  # start, block 0, then three layers

    def zero(layer, statistic):
        layer.set_weight(torch.zeros_like(layer.weight()))

    ctx = EngineContext(calibration=calibration(2, 8), should_cancel=should_cancel)
    with pytest.raises(JobCancelled):
        compress_block_by_block(model, ctx, lambda layer: Recorder(), zero)
    changed = [not torch.equal(b, layer.weight()) for b, layer in zip(before, layers)]
    assert changed == [True] * 3 + [False] * (len(layers) - 3)


def test_a_method_without_calibration_data_fails_clearly():
    with pytest.raises(ValueError, match="calibration"):
        compress_block_by_block(factories.make_model("gpt2"), EngineContext(), None, None)


def test_input_hessian_is_twice_the_mean_outer_product():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 6)  # two batches of five tokens
    hessian = InputHessian(6)
    hessian.add(x[0])
    hessian.add(x[1].unsqueeze(0))
    rows = x.reshape(10, 6)
    torch.testing.assert_close(hessian.hessian(), 2 / 10 * rows.T @ rows)
    assert torch.equal(InputHessian(3).hessian(), torch.eye(3))  # no input seen


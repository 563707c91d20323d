import pytest
import torch
from transformers.pytorch_utils import Conv1D

from worker.engine.modules import compressible_layers

EXPECTED = {
    "gpt2": ["transformer.h.0.attn.c_attn", "transformer.h.0.attn.c_proj",
             "transformer.h.0.mlp.c_fc", "transformer.h.0.mlp.c_proj"],
    "llama": [f"model.layers.0.self_attn.{p}_proj" for p in "qkvo"]
    + [f"model.layers.0.mlp.{p}_proj" for p in ("gate", "up", "down")],
    "opt": [f"model.decoder.layers.0.self_attn.{p}" for p in ("k_proj", "v_proj", "q_proj")]
    + ["model.decoder.layers.0.self_attn.out_proj"]
    + ["model.decoder.layers.0.fc1", "model.decoder.layers.0.fc2"],
}


@pytest.mark.parametrize("arch", ["gpt2", "llama", "opt"])
def test_compressible_layers_are_the_block_projections_in_order(arch, tiny_models):
    model = tiny_models[arch]()
    layers = compressible_layers(model)
    names = [layer.name for layer in layers]

    per_block = len(EXPECTED[arch])
    assert len(layers) == 2 * per_block
    assert names[:per_block] == EXPECTED[arch]
    assert names[per_block:] == [n.replace(".0.", ".1.") for n in EXPECTED[arch]]
    assert not any("lm_head" in n or "embed" in n or "wte" in n for n in names)
    for layer in layers:
        module = dict(model.named_modules())[layer.name]
        assert layer.module is module
        # The same product as the module itself: x @ W.T with W = layer.weight() [out, in].
        x = torch.randn(3, layer.in_features)
        expected = module(x) - (module.bias if module.bias is not None else 0)
        torch.testing.assert_close(x @ layer.weight().t(), expected)


def test_conv1d_weight_is_a_transposed_view_and_set_weight_writes_through(tiny_models):
    layer = compressible_layers(tiny_models["gpt2"]())[0]  # c_attn: Conv1D [64, 192]
    assert isinstance(layer.module, Conv1D)
    assert (layer.out_features, layer.in_features) == (192, 64)
    assert layer.weight().data_ptr() == layer.module.weight.data_ptr()

    new = torch.arange(192 * 64, dtype=torch.float32).view(192, 64)
    layer.set_weight(new)
    torch.testing.assert_close(layer.module.weight, new.t())
    with pytest.raises(ValueError):
        layer.set_weight(new.t())


def test_linear_set_weight(tiny_models):
    layer = compressible_layers(tiny_models["llama"]())[1]  # k_proj: [32, 64]
    assert (layer.out_features, layer.in_features) == (32, 64)
    layer.set_weight(torch.zeros(32, 64))
    assert int(torch.count_nonzero(layer.module.weight)) == 0

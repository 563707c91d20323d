import copy

import pytest
import torch
import transformers
from pydantic import ValidationError
from torch.utils.flop_counter import FlopCounterMode

from app.specs import JobSpec, PruneMagnitude, PruneStructured, QuantizeRTN
from worker.engine.loading import load_model
from worker.engine.export import write_checkpoint
from worker.engine.modules import compressible_layers, decoder_blocks
from worker.engine.pipeline import run_pipeline
from worker.engine.registry import EngineContext, JobCancelled
from worker.engine.prune.structured import (apply_plan, head_groups_to_keep, most_important,
                                            plan_structured, unit_importance)
from worker.engine.prune.depth import block_influence, blocks_to_keep, blocks_to_remove, cosine_total
from worker.engine.prune.structured_layout import layout_for, unit_features
from worker.evaluate import latency_ms_per_token

CPU = torch.device("cpu")
VOCAB = 300
IDS = torch.arange(3, 40).unsqueeze(0) * 7 % VOCAB


def calibration(batches: int = 4, seq_len: int = 16) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return [torch.randint(0, VOCAB, (1, seq_len), generator=generator) for _ in range(batches)]


def logits(model):
    with torch.no_grad():
        return model(IDS).logits


def masked_logits(model, plan) -> torch.Tensor:
    """Logits of the unpruned ``model`` with the removed units' inputs to their output
    projections zeroed: what slicing them out must compute."""
    layout = layout_for(model)
    _, blocks = decoder_blocks(model)
    handles = []

    def zero_outside(kept, units):
        def hook(module, args):
            features = args[0].shape[-1]
            keep = torch.zeros(features)
            keep[unit_features(kept, units, features)] = 1.0
            return (args[0] * keep,) + args[1:]
        return hook

    for index, block in enumerate(blocks):
        if plan.kept_neurons is not None:
            handles.append(block.get_submodule(layout.neuron_consumer).register_forward_pre_hook(
                zero_outside(plan.kept_neurons[index], plan.neurons)))
        if plan.kept_head_groups is not None:
            handles.append(block.get_submodule(layout.head_consumer).register_forward_pre_hook(
                zero_outside(plan.kept_head_groups[index], plan.head_groups)))
    try:
        return logits(model)
    finally:
        for handle in handles:
            handle.remove()


# ---------------------------------------------------------------------------------------------
# The arithmetic


def test_importance_is_the_rms_size_of_what_the_unit_writes():
    generator = torch.Generator().manual_seed(0)
    units, width, out = 3, 4, 5
    scales = torch.tensor([1.0, 3.0, 0.2]).repeat_interleave(width)
    z = torch.randn(200, units * width, generator=generator) * scales
    weight = torch.randn(out, units * width, generator=generator)
    per_unit = z.reshape(-1, units, width)
    second_moment = torch.einsum("tui,tuj->uij", per_unit, per_unit) / len(z)

    unit = [slice(u * width, (u + 1) * width) for u in range(units)]
    written = [z[:, unit[u]] @ weight[:, unit[u]].T for u in range(units)]  # [tokens, out]
    direct = torch.stack([w.pow(2).sum(1).mean().sqrt() for w in written])
    torch.testing.assert_close(unit_importance(second_moment, weight), direct)


def test_a_large_activation_through_a_small_column_is_unimportant():
    # E[x^2] = 4, 1, 0.25 through output columns of norm 0.1, 1, 10: the loudest neuron writes
    # the least into the residual stream.
    second_moment = torch.tensor([4.0, 1.0, 0.25]).reshape(3, 1, 1)
    weight = torch.tensor([[0.1, 1.0, 6.0], [0.0, 0.0, 8.0]])
    importance = unit_importance(second_moment, weight)
    torch.testing.assert_close(importance, torch.tensor([0.2, 1.0, 5.0]))
    assert most_important(importance, 2).tolist() == [1, 2]


def test_most_important_is_ascending_and_ties_keep_the_lower_index():
    assert most_important(torch.tensor([1.0, 5.0, 1.0, 3.0, 1.0]), 3).tolist() == [0, 1, 3]
    assert most_important(torch.ones(6), 2).tolist() == [0, 1]


def test_head_group_count_is_the_nearest_allowed_and_rounds_towards_keeping():
    assert head_groups_to_keep(8, 0.25, list(range(1, 9))) == 6
    assert head_groups_to_keep(8, 0.25, [1, 2, 4, 8]) == 8  # 4 and 8 are as near to 6: keep more
    assert head_groups_to_keep(4, 0.25, [1, 2, 4]) == 4  # 3 wanted, 2 and 4 as near
    assert head_groups_to_keep(32, 0.5, [1, 2, 4, 8, 16, 32]) == 16
    assert head_groups_to_keep(2, 0.9, [1, 2]) == 1  # at least one group stays


# ---------------------------------------------------------------------------------------------
# On the tiny models

# sparsity, then parameters removed per block: GPT-2 and OPT lose neurons only (a weight
# column and row and a bias each); Llama 64 of 128 neurons (three rows each) and one of its two
# key/value groups (two query heads, one k and one v head, and the o_proj columns: 16 * 64 each).
EXPECTED = {
    "gpt2": (0.25, 64 * (64 + 1 + 64), {"n_inner": 192, "n_head": 4}),
    "llama": (0.5, 64 * 3 * 64 + (2 + 1 + 1 + 2) * 16 * 64,
              {"intermediate_size": 64, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16}),
    "opt": (0.25, 32 * (64 + 1 + 64), {"ffn_dim": 96, "num_attention_heads": 4}),
}


@pytest.mark.parametrize("arch", ["gpt2", "llama", "opt"])
def test_pruned_model_is_the_masked_original_and_reloads_from_its_config(arch, tiny_models, tmp_path):
    sparsity, removed_per_block, sizes = EXPECTED[arch]
    model = tiny_models[arch]()
    original = copy.deepcopy(model)
    ctx = EngineContext(calibration=calibration())

    [metrics] = run_pipeline(model, [PruneStructured(sparsity=sparsity)], ctx)

    assert metrics["parameters_before"] - metrics["parameters_after"] == 2 * removed_per_block
    assert metrics["parameters_after"] == sum(p.numel() for p in model.parameters())
    for key, value in sizes.items():
        assert getattr(model.config, key) == value, key
    # The plan the stage carried out, recomputed on the original: calibration is deterministic.
    plan = plan_structured(original, PruneStructured(sparsity=sparsity),
                           EngineContext(calibration=calibration()))
    torch.testing.assert_close(logits(model), masked_logits(original, plan), rtol=0, atol=1e-5)

    write_checkpoint(model, ctx, tmp_path / "out", "dense", source_dir=tmp_path)
    for loaded in (load_model(tmp_path / "out", CPU),
                   transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()):
        assert type(loaded) is type(model)
        for key, value in sizes.items():
            assert getattr(loaded.config, key) == value, key
        assert torch.equal(logits(loaded), logits(model))


def test_gpt2_and_opt_keep_their_heads_and_say_why(tiny_models):
    for arch in ("gpt2", "opt"):
        [metrics] = run_pipeline(tiny_models[arch](), [PruneStructured(sparsity=0.25)],
                                 EngineContext(calibration=calibration(1)))
        assert metrics["heads_removed"] == metrics["heads_removed_per_layer"] == 0
        assert metrics["neurons_removed_per_layer"] == (64 if arch == "gpt2" else 32)
        assert "heads were not removed" in metrics["note"] and "pruned_heads" in metrics["note"]

    model = tiny_models["gpt2"]()
    with pytest.raises(ValueError, match="nothing to remove.*heads were not removed"):
        run_pipeline(model, [PruneStructured(sparsity=0.5, targets=["heads"])],
                     EngineContext(calibration=calibration(1)))


def _llama(hidden: int, **extra) -> transformers.LlamaForCausalLM:
    torch.manual_seed(0)
    sizes = dict(intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=4,
                 head_dim=16, vocab_size=VOCAB)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(hidden_size=hidden, **{**sizes, **extra})).eval()


def test_llama_head_count_its_config_refuses_is_written_as_mistral(tmp_path):
    # 3 heads of 16 at hidden size 64: LlamaConfig wants hidden_size % heads == 0.
    stage = PruneStructured(sparsity=0.25, targets=["heads"])
    model = _llama(64)
    original = copy.deepcopy(model)
    plan = plan_structured(original, stage, EngineContext(calibration=calibration(2)))
    ctx = EngineContext(calibration=calibration(2))
    [metrics] = run_pipeline(model, [stage], ctx)
    carrier = ctx.model
    assert type(carrier) is transformers.MistralForCausalLM
    assert metrics["heads_removed_per_layer"] == 1 and "written as MistralForCausalLM" in metrics["note"]
    assert metrics["removed_heads"] == plan.removed_heads()
    assert (carrier.config.num_attention_heads, carrier.config.head_dim, carrier.config.sliding_window) == (3, 16, None)
    assert metrics["parameters_after"] == sum(p.numel() for p in carrier.parameters()) < metrics["parameters_before"]
    # The same computation as the original with the removed head's output zeroed.
    torch.testing.assert_close(logits(carrier), masked_logits(original, plan), rtol=0, atol=1e-5)
    write_checkpoint(carrier, ctx, tmp_path / "out", "dense", source_dir=tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert type(loaded) is transformers.MistralForCausalLM and torch.equal(logits(loaded), logits(carrier))


def test_llama_heads_stay_where_no_config_describes_fewer(tmp_path):
    # With attention biases Mistral is no equivalent: the refused head count is not offered.
    stage = PruneStructured(sparsity=0.25, targets=["heads"])
    with pytest.raises(ValueError, match="nothing to remove: 1 of 4 heads per layer asked for, 0 removed"):
        run_pipeline(_llama(64, attention_bias=True), [stage], EngineContext(calibration=calibration(1)))

    model = _llama(48)  # 48 % 3 == 0: three heads of 16 are a valid Llama config, kept as Llama
    plan = plan_structured(model, stage, EngineContext(calibration=calibration(2)))
    ctx = EngineContext(calibration=calibration(2))
    [metrics] = run_pipeline(model, [stage], ctx)
    assert ctx.model is model and metrics["heads_removed_per_layer"] == 1 and metrics["note"] is None
    assert metrics["removed_heads"] == plan.removed_heads()
    assert len(plan.kept_head_groups[0]) == 3 and plan.removed_heads()[0][0] not in plan.kept_head_groups[0]
    assert (model.config.num_attention_heads, model.config.num_key_value_heads) == (3, 3)
    model.save_pretrained(tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.config.head_dim == 16 and torch.equal(logits(loaded), logits(model))


def test_the_least_important_units_go(tiny_models):
    model = tiny_models["gpt2"]()
    quiet = [list(range(0, 256, 4)), list(range(100, 164))]  # 64 neurons per block
    for block, neurons in zip(model.transformer.h, quiet):
        block.mlp.c_proj.weight.data[neurons] *= 0.01  # Conv1D [in, out]: the neurons' rows
    plan = plan_structured(model, PruneStructured(sparsity=0.25, targets=["neurons"]),
                           EngineContext(calibration=calibration()))
    for kept, neurons in zip(plan.kept_neurons, quiet):
        assert kept.tolist() == sorted(set(range(256)) - set(neurons))

    model = tiny_models["llama"]()
    for block, group in zip(model.model.layers, [1, 0]):  # groups of two heads of 16
        block.self_attn.o_proj.weight.data[:, group * 32:(group + 1) * 32] *= 0.01
    plan = plan_structured(model, PruneStructured(sparsity=0.5, targets=["heads"]),
                           EngineContext(calibration=calibration()))
    assert [kept.tolist() for kept in plan.kept_head_groups] == [[0], [1]]
    assert plan.kept_neurons is None and plan.removed_heads() == [[2, 3], [0, 1]]


def test_needs_calibration(tiny_models):
    with pytest.raises(ValueError, match="calibration"):
        run_pipeline(tiny_models["opt"](), [PruneStructured(sparsity=0.25)], EngineContext())
    with pytest.raises(ValidationError, match="prune.structured needs calibration data"):
        JobSpec.model_validate(
            {"model_id": "m", "stages": [{"type": "prune", "method": "structured", "sparsity": 0.25}]})


def test_runs_before_quantization_only(tiny_models):
    with pytest.raises(ValueError, match="structured pruning must run before quantization"):
        run_pipeline(tiny_models["llama"](), [QuantizeRTN(bits=8), PruneStructured(sparsity=0.5)],
                     EngineContext(calibration=calibration(1)))


def test_cancel_during_calibration_leaves_the_model_and_no_hooks(tiny_models):
    model = tiny_models["llama"]()
    before = {name: p.clone() for name, p in model.named_parameters()}
    checks = 0

    def should_cancel() -> bool:
        nonlocal checks
        checks += 1
        return checks > 3  # the stage start, then two calibration batches

    with pytest.raises(JobCancelled):
        run_pipeline(model, [PruneStructured(sparsity=0.5)],
                     EngineContext(calibration=calibration(), should_cancel=should_cancel))
    assert checks == 4
    after = dict(model.named_parameters())
    assert all(torch.equal(before[name], after[name]) for name in before)
    assert model.config.intermediate_size == 128 and model.config.num_attention_heads == 4
    assert not any(module._forward_pre_hooks for module in model.modules())


def test_earlier_masks_are_sliced_and_later_quantization_exports(tiny_models, tmp_path):
    for arch in ("gpt2", "llama"):
        model = tiny_models[arch]()
        ctx = EngineContext(calibration=calibration(2))
        stages = [PruneMagnitude(sparsity=0.5), PruneStructured(sparsity=0.5), QuantizeRTN(bits=8)]
        run_pipeline(model, stages, ctx)
        for layer in compressible_layers(model):
            assert ctx.masks[layer.name].shape == layer.weight().shape
            assert not layer.weight()[~ctx.masks[layer.name]].any()

        # GPT-2 goes out as GPTBigCode: its config must carry the new MLP width.
        folder = tmp_path / arch
        info = write_checkpoint(model, ctx, folder, "compressed-tensors", source_dir=tmp_path / "none")
        loaded = load_model(folder, CPU)
        assert info["architecture"] == ("GPTBigCodeForCausalLM" if arch == "gpt2" else "LlamaForCausalLM")
        torch.testing.assert_close(logits(loaded), logits(model), rtol=0, atol=1e-5)


def test_structured_model_is_cheaper_per_token():
    """Prints the CPU latency; asserts only what does not depend on the machine."""
    def flops(model) -> int:
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            model(IDS)
        return counter.get_total_flops()

    torch.manual_seed(0)
    dense = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_layer=4, n_embd=256, n_head=4, vocab_size=VOCAB, n_positions=128, bos_token_id=0,
        eos_token_id=0)).eval()
    pruned = copy.deepcopy(dense)
    [metrics] = run_pipeline(pruned, [PruneStructured(sparsity=0.25)],
                             EngineContext(calibration=calibration(2, 64)))

    assert metrics["parameters_after"] < metrics["parameters_before"]
    assert flops(pruned) < flops(dense)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a shared machine: one core, so that the two runs compare
    try:
        # Alternated, best of three: other jobs on the machine only ever add time.
        timings = [(latency_ms_per_token(dense, 128, VOCAB, CPU), latency_ms_per_token(pruned, 128, VOCAB, CPU))
                   for _ in range(3)]
        dense_ms, pruned_ms = (min(column) for column in zip(*timings))
    finally:
        torch.set_num_threads(threads)
    print(f"\nGPT-2 4x256, 128 tokens: parameters {metrics['parameters_before']} -> "
          f"{metrics['parameters_after']}, FLOPs {flops(dense)} -> {flops(pruned)}, "
          f"latency {dense_ms:.3f} -> {pruned_ms:.3f} ms/token")


# ---------------------------------------------------------------------------------------------
# Depth: whole decoder blocks


def test_cosine_total_counts_each_token_once_and_zero_vectors_as_unchanged():
    inputs = torch.tensor([[[1.0, 0.0], [0.0, 2.0], [0.0, 0.0]]])
    outputs = torch.tensor([[[3.0, 0.0], [1.0, 1.0], [5.0, 5.0]]])
    assert cosine_total(inputs, outputs).item() == pytest.approx(1.0 + 2 ** -0.5 + 1.0)


def test_blocks_to_keep_drops_the_lowest_influence_and_ties_drop_the_later():
    assert blocks_to_keep(torch.tensor([0.4, 0.1, 0.3, 0.2]), remove=2) == [0, 2]
    assert blocks_to_keep(torch.tensor([0.2, 0.2, 0.2]), remove=1) == [0, 1]
    assert blocks_to_keep(torch.tensor([0.2, 0.2]), remove=0) == [0, 1]
    with pytest.raises(ValueError, match="at least one must stay"):
        blocks_to_keep(torch.tensor([0.1, 0.2]), remove=2)
    assert [blocks_to_remove(8, s) for s in (0.05, 0.25, 0.5, 0.9)] == [0, 2, 4, 7]
    assert blocks_to_remove(2, 0.9) == 1


def test_block_influence_is_one_minus_the_cosine_between_what_enters_and_leaves(tiny_models):
    model = tiny_models["llama"]()
    batches = calibration(2)
    with torch.no_grad():
        states = [model(input_ids=ids, output_hidden_states=True).hidden_states for ids in batches]
    hooks_before = [len(module._forward_hooks) for module in model.modules()]  # transformers' own
    influence = block_influence(model, EngineContext(calibration=batches))
    # hidden_states[i] enters block i; the last entry has the final norm applied, so only the
    # first block's output (hidden_states[1]) is the raw residual stream here.
    expected = 1 - sum(torch.nn.functional.cosine_similarity(s[0], s[1], dim=-1).sum() for s in states) / 32
    assert influence.shape == (2,)
    assert influence[0].item() == pytest.approx(expected.item(), abs=1e-5)
    assert [len(module._forward_hooks) for module in model.modules()] == hooks_before


@pytest.mark.parametrize("arch", ["gpt2", "llama", "opt"])
def test_layers_target_removes_the_least_influential_blocks_and_reloads(arch, tmp_path):
    torch.manual_seed(0)
    model = {
        "gpt2": lambda: transformers.GPT2LMHeadModel(transformers.GPT2Config(
            n_embd=32, n_layer=4, n_head=4, vocab_size=VOCAB, n_positions=64)),
        "llama": lambda: _llama(32, num_hidden_layers=4),
        "opt": lambda: transformers.OPTForCausalLM(transformers.OPTConfig(
            hidden_size=32, ffn_dim=64, num_hidden_layers=4, num_attention_heads=4, vocab_size=VOCAB,
            word_embed_proj_dim=32, max_position_embeddings=64)),
    }[arch]().eval()
    # Block 2 made an identity (its output projections zeroed): nothing enters the residual
    # stream there, so its influence is 0 and it is the block that goes.
    _, blocks = decoder_blocks(model)
    for layer in compressible_layers(model):
        if layer.name.startswith(f"{decoder_blocks(model)[0]}.2.") and layer.name.endswith(
                ("c_proj", "o_proj", "down_proj", "out_proj", "fc2")):
            layer.module.weight.data.zero_()
            if layer.module.bias is not None:
                layer.module.bias.data.zero_()
    before = logits(model)
    ctx = EngineContext(calibration=calibration(2))

    [metrics] = run_pipeline(model, [PruneStructured(sparsity=0.25, targets=["layers"])], ctx)

    assert metrics["layers_removed"] == [2] and metrics["layers"] == 3
    assert metrics["heads_removed"] == metrics["neurons_removed"] == 0 and metrics["note"] is None
    assert model.config.num_hidden_layers == 3 and len(decoder_blocks(model)[1]) == 3
    assert metrics["parameters_before"] - metrics["parameters_after"] == sum(p.numel() for p in blocks[2].parameters())
    # Removing an identity block changes nothing.
    torch.testing.assert_close(logits(model), before, rtol=0, atol=1e-5)
    model.save_pretrained(tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.config.num_hidden_layers == 3 and torch.equal(logits(loaded), logits(model))
    generated = loaded.generate(IDS[:, :5], max_new_tokens=4, do_sample=False)  # KV cache by new layer index
    assert generated.shape == (1, 9)


def test_layers_then_heads_and_neurons_of_the_blocks_that_stay(tmp_path):
    model = _llama(32, num_hidden_layers=4, intermediate_size=64)
    ctx = EngineContext(calibration=calibration(2))
    magnitude_then_structured = [PruneMagnitude(sparsity=0.5),
                                 PruneStructured(sparsity=0.5, targets=["layers", "heads", "neurons"])]
    _, metrics = run_pipeline(model, magnitude_then_structured, ctx)

    assert len(metrics["layers_removed"]) == 2 and metrics["layers"] == 2
    assert metrics["heads_removed_per_layer"] == 2 and metrics["neurons_removed_per_layer"] == 32
    assert (model.config.num_hidden_layers, model.config.num_attention_heads, model.config.intermediate_size) == (2, 2, 32)
    # The earlier stage's masks follow their blocks (renumbered) and their new shapes.
    assert sorted(ctx.masks) == sorted(layer.name for layer in compressible_layers(model))
    for layer in compressible_layers(model):
        assert ctx.masks[layer.name].shape == layer.weight().shape
        assert not layer.weight()[~ctx.masks[layer.name]].any()
    model.save_pretrained(tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert torch.equal(logits(loaded), logits(model))


def test_gpt2_can_lose_layers_where_it_cannot_lose_heads(tiny_models):
    [metrics] = run_pipeline(tiny_models["gpt2"](layers=4), [PruneStructured(sparsity=0.25, targets=["heads", "layers"])],
                             EngineContext(calibration=calibration(1)))
    assert len(metrics["layers_removed"]) == 1 and metrics["heads_removed"] == 0
    assert "heads were not removed" in metrics["note"]
    with pytest.raises(ValueError, match="nothing to remove: sparsity 0.1 of 2 layers rounds to none"):
        run_pipeline(tiny_models["gpt2"](), [PruneStructured(sparsity=0.1, targets=["layers"])],
                     EngineContext(calibration=calibration(1)))


def test_targets_must_not_repeat():
    with pytest.raises(ValidationError, match="targets must not repeat"):
        PruneStructured(sparsity=0.25, targets=["layers", "layers"])

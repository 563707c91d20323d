import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import transformers

from app.specs import DistillKD, PruneMagnitude, QuantizeRTN
from tests.factories import DATA, make_checkpoint, make_model, tokenizer
from worker.engine.calibration import token_stream
from worker.engine.distill.loss import (copied_layer_map, distillation_loss, hidden_state_loss,
                                        kd_loss, lm_loss, uniform_layer_map)
from worker.engine.distill.student import keep_decoder_blocks, kept_layer_indices, renumber_masks
from worker.engine.distill.train import (held_out_perplexity, learning_rate_factor,
                                         parameter_groups, split_held_out, train_student)
from worker.engine.loading import load_model
from worker.engine.modules import compressible_layers, decoder_blocks
from worker.engine.pipeline import run_pipeline
from worker.engine.registry import EngineContext, JobCancelled

CPU = torch.device("cpu")
CORPUS_FILE = DATA / "corpus.txt"
# Small enough for a few seconds per run on a shared CPU.
QUICK = dict(dataset_id="ds_corpus", steps=20, batch_size=4, seq_len=32, learning_rate=1e-3,
             warmup_steps=3, eval_every=10)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Models this small run faster on one thread than on two contending for shared cores.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------
# Losses


def test_kd_loss_equals_a_hand_computation():
    student = torch.tensor([[[1.0, 0.0, -1.0], [0.5, 0.5, 2.0]]])
    teacher = torch.tensor([[[0.0, 2.0, 1.0], [1.0, -1.0, 0.0]]])
    temperature = 2.0

    def softmax(row):
        exps = [math.exp(v / temperature) for v in row]
        return [e / sum(exps) for e in exps]

    per_token = []
    for s_row, t_row in zip(student[0].tolist(), teacher[0].tolist()):
        p, q = softmax(t_row), softmax(s_row)
        per_token.append(sum(pi * math.log(pi / qi) for pi, qi in zip(p, q)))
    expected = temperature**2 * sum(per_token) / 2

    assert kd_loss(student, teacher, temperature).item() == pytest.approx(expected, rel=1e-6)


def test_kd_loss_is_zero_for_equal_logits_and_positive_otherwise():
    logits = torch.randn(2, 5, 11)
    assert kd_loss(logits, logits.clone(), 3.0).item() == pytest.approx(0.0, abs=1e-6)
    assert kd_loss(logits + torch.randn(2, 5, 11), logits, 3.0).item() > 0


@pytest.mark.parametrize("temperature", [0.5, 2.0, 4.0])
def test_kd_loss_is_t_squared_times_the_kl_of_the_softened_distributions(temperature):
    student, teacher = torch.randn(2, 4, 9), torch.randn(2, 4, 9)
    softened = kd_loss(student / temperature, teacher / temperature, 1.0)
    assert kd_loss(student, teacher, temperature).item() == pytest.approx(
        temperature**2 * softened.item(), rel=1e-5)


def test_kd_loss_averages_over_the_unmasked_tokens_only():
    student, teacher = torch.randn(2, 3, 7), torch.randn(2, 3, 7)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    kept = [(0, 0), (0, 1), (1, 0)]
    expected = sum(kd_loss(student[b, t][None, None], teacher[b, t][None, None], 2.0) for b, t in kept) / 3
    assert kd_loss(student, teacher, 2.0, mask).item() == pytest.approx(expected.item(), rel=1e-5)
    padded = student.clone()
    padded[mask == 0] = 100.0  # what padding predicts does not count
    assert kd_loss(padded, teacher, 2.0, mask).item() == pytest.approx(expected.item(), rel=1e-5)


def test_kd_loss_refuses_different_vocabularies():
    with pytest.raises(ValueError, match="vocabularies must match"):
        kd_loss(torch.randn(1, 2, 5), torch.randn(1, 2, 6), 1.0)


def test_lm_loss_is_the_models_own_next_token_loss():
    model = make_model("gpt2")
    ids = torch.randint(0, 400, (2, 12))
    with torch.no_grad():
        out = model(ids, labels=ids)
    assert lm_loss(out.logits, ids).item() == pytest.approx(out.loss.item(), rel=1e-5)


def test_hidden_state_loss_matches_the_mapped_pairs():
    student = (torch.zeros(1, 2, 3), torch.ones(1, 2, 3), torch.full((1, 2, 3), 2.0))
    teacher = (torch.zeros(1, 2, 3), torch.zeros(1, 2, 3), torch.zeros(1, 2, 3), torch.ones(1, 2, 3))
    # pair (1, 1): error 1 everywhere -> 1; pair (2, 3): error 1 everywhere -> 1; (2, 2): 4
    assert hidden_state_loss(student, teacher, [(1, 1), (2, 3)]).item() == pytest.approx(1.0)
    assert hidden_state_loss(student, teacher, [(2, 2)]).item() == pytest.approx(4.0)
    with pytest.raises(ValueError, match="differ in shape"):
        hidden_state_loss(student, (torch.zeros(1, 2, 4),) * 2, [(1, 1)])


def test_distillation_loss_mixes_the_terms():
    student, teacher = torch.randn(2, 6, 13), torch.randn(2, 6, 13)
    ids = torch.randint(0, 13, (2, 6))
    hidden_s, hidden_t = (torch.randn(2, 6, 4),) * 2, (torch.randn(2, 6, 4),) * 2
    loss = distillation_loss(student, teacher, ids, temperature=2.0, alpha=0.3, hidden_loss_weight=0.5,
                             student_hidden=hidden_s, teacher_hidden=hidden_t, layer_map=[(1, 1)])
    assert loss.kd.item() == pytest.approx(kd_loss(student, teacher, 2.0).item())
    assert loss.lm.item() == pytest.approx(lm_loss(student, ids).item())
    assert loss.hidden.item() == pytest.approx(F.mse_loss(hidden_s[1], hidden_t[1]).item())
    assert loss.total.item() == pytest.approx(0.3 * loss.kd.item() + 0.7 * loss.lm.item() + 0.5 * loss.hidden.item())
    lm_only = distillation_loss(student, None, ids, temperature=2.0, alpha=0.0)  # no teacher needed
    assert lm_only.total.item() == pytest.approx(loss.lm.item())


def test_layer_maps():
    assert uniform_layer_map(3, 12) == [(1, 4), (2, 8), (3, 12)]
    assert uniform_layer_map(2, 2) == [(1, 1), (2, 2)]
    assert copied_layer_map([0, 2, 4], 6) == [(1, 1), (2, 3), (3, 6)]  # last output to last
    assert copied_layer_map([0, 1], 4) == [(1, 1), (2, 4)]


# ---------------------------------------------------------------------------------------------
# Students made of some of the teacher's blocks


def deep_model(arch: str, layers: int = 4):
    """The factories' tiny model with ``layers`` blocks (the same weights for the same seed)."""
    model = make_model(arch)
    model.config.num_hidden_layers = layers
    torch.manual_seed(1)
    return type(model)(model.config).eval()


def test_kept_layer_indices():
    assert kept_layer_indices("every_other", 12) == [0, 2, 4, 6, 8, 10]
    assert kept_layer_indices("every_other", 5) == [0, 2, 4]
    assert kept_layer_indices("first_half", 12) == [0, 1, 2, 3, 4, 5]
    assert kept_layer_indices("first_half", 1) == [0]
    assert kept_layer_indices([5, 0, 3], 6) == [0, 3, 5]
    with pytest.raises(ValueError, match="out of range: the model has 4 layers"):
        kept_layer_indices([0, 4], 4)


@pytest.mark.parametrize("arch", ["gpt2", "llama", "opt"])
def test_every_other_student_copies_the_kept_blocks_exactly(arch, tmp_path):
    teacher = deep_model(arch)
    student = keep_decoder_blocks(deep_model(arch), kept_layer_indices("every_other", 4))

    _, blocks = decoder_blocks(student)
    assert len(blocks) == 2 and student.config.num_hidden_layers == 2
    for index, block in enumerate(blocks):  # the KV cache is indexed by layer_idx
        assert {m.layer_idx for m in block.modules() if hasattr(m, "layer_idx")} == {index}

    # By hand: the teacher with blocks 1 and 3 passing their input through unchanged.
    _, teacher_blocks = decoder_blocks(teacher)
    skips = [teacher_blocks[i].register_forward_hook(lambda module, args, output: args[0]) for i in (1, 3)]
    ids = torch.randint(0, teacher.config.vocab_size, (2, 16))
    with torch.no_grad():
        by_hand = teacher(ids).logits
        logits = student(ids).logits
    for hook in skips:
        hook.remove()
    torch.testing.assert_close(logits, by_hand, rtol=0, atol=1e-6)

    student.save_pretrained(tmp_path)
    reloaded = load_model(tmp_path, CPU)
    assert reloaded.config.num_hidden_layers == 2 and len(decoder_blocks(reloaded)[1]) == 2
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, logits, rtol=0, atol=1e-6)
        # The KV cache is indexed by the renumbered layer_idx: decoding token by token agrees.
        prefix = reloaded(ids[:, :-1], use_cache=True)
        last = reloaded(ids[:, -1:], cache=prefix.cache).logits[:, -1]
    torch.testing.assert_close(last, logits[:, -1], rtol=0, atol=1e-5)


def test_masks_follow_their_blocks():
    model = deep_model("gpt2")
    masks = {layer.name: torch.ones_like(layer.weight(), dtype=torch.bool) for layer in compressible_layers(model)}
    renumbered = renumber_masks(masks, model, [1, 3])
    assert set(renumbered) == {name.replace("h.1.", "h.0.").replace("h.3.", "h.1.")
                               for name in masks if ".h.1." in name or ".h.3." in name}
    assert renumbered["transformer.h.1.mlp.c_fc"] is masks["transformer.h.3.mlp.c_fc"]


# ---------------------------------------------------------------------------------------------
# Training


def test_learning_rate_warms_up_then_decays():
    factors = [learning_rate_factor(step, 4, 20) for step in range(20)]
    assert factors[:5] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    assert all(a > b for a, b in zip(factors[4:], factors[5:])) and 0 < factors[-1] < 0.05


def test_biases_and_norms_are_not_decayed():
    model = make_model("llama")
    decayed, not_decayed = parameter_groups(model, 0.1)
    assert decayed["weight_decay"] == 0.1 and not_decayed["weight_decay"] == 0.0
    assert all(p.ndim == 2 for p in decayed["params"]) and all(p.ndim == 1 for p in not_decayed["params"])
    assert len(decayed["params"]) + len(not_decayed["params"]) == len(list(model.parameters()))


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """The job's input model, the default teacher: the tiny GPT-2 trained for a moment on the
    corpus (language-model loss only), so that it has something to teach."""
    folder = make_checkpoint(tmp_path_factory.mktemp("source"), "gpt2")
    model = load_model(folder, CPU)
    data = split_held_out(token_stream(tokenizer(), [CORPUS_FILE.read_text()]), 32)
    pretraining = DistillKD(dataset_id="ds_corpus", alpha=0.0, steps=100, batch_size=8, seq_len=32,
                            learning_rate=3e-3, warmup_steps=5, eval_every=100)
    result = train_student(model, make_model("gpt2"), data, pretraining, EngineContext())
    assert result.best_perplexity < 0.5 * result.evaluations[0][1]  # 411 -> 112
    model.save_pretrained(folder)
    return folder


def context(source: Path, **kwargs) -> EngineContext:
    return EngineContext(tokenizer=tokenizer(), resolve_dataset=lambda dataset_id: CORPUS_FILE,
                         source_model_dir=source, **kwargs)


def held_out_kd(student, teacher, seq_len: int = 32) -> float:
    data = split_held_out(token_stream(tokenizer(), [CORPUS_FILE.read_text()]), seq_len)
    windows = data.held_out[: data.held_out.numel() // seq_len * seq_len].view(-1, seq_len)
    with torch.no_grad():
        return kd_loss(student(windows).logits, teacher(windows).logits, 1.0).item()


def test_distilling_a_half_depth_student_brings_it_closer_to_the_teacher(source):
    ctx = context(source)
    teacher = load_model(source, CPU)
    before = keep_decoder_blocks(load_model(source, CPU), [0])
    kd_before = held_out_kd(before, teacher)

    stage = DistillKD(**QUICK, keep_layers="every_other", alpha=1.0)
    [metrics] = run_pipeline(load_model(source, CPU), [stage], ctx)

    student = ctx.model
    assert len(decoder_blocks(student)[1]) == 1
    assert held_out_kd(student, teacher) < 0.5 * kd_before  # measured: 0.096 -> 0.014
    assert metrics["student_perplexity_after"] < metrics["student_perplexity_before"]
    assert metrics["student_layers"] == 1 and metrics["teacher_layers"] == 2
    assert metrics["steps"] == 20 and metrics["best_step"] > 0
    assert metrics["train_loss_last"] < metrics["train_loss_first"]
    assert metrics["teacher_perplexity"] < metrics["student_perplexity_before"]  # a block less


@pytest.mark.parametrize("keep_layers", [None, [1]], ids=["recovery", "keep-block-1"])
def test_pruned_weights_stay_zero_through_training(keep_layers, source):
    ctx = context(source)
    model = load_model(source, CPU)
    stages = [PruneMagnitude(sparsity=0.5),
              DistillKD(**QUICK, keep_layers=keep_layers, hidden_loss_weight=1.0)]
    pruned = {}

    def remember_pruned(index, name):
        if name == "distill.kd":
            pruned.update({layer.name: layer.weight().clone() for layer in compressible_layers(ctx.model)})

    metrics = run_pipeline(model, stages, ctx, on_stage_start=remember_pruned)

    layers = compressible_layers(ctx.model)
    assert set(ctx.masks) == {layer.name for layer in layers}
    for layer in layers:
        keep = ctx.masks[layer.name]
        assert torch.count_nonzero(layer.weight()[~keep]) == 0, layer.name
        assert (~keep).sum() == round(0.5 * keep.numel())
    if keep_layers == [1]:  # block 1's masks are now block 0's
        old = pruned["transformer.h.1.mlp.c_fc"]
        assert torch.equal(ctx.masks["transformer.h.0.mlp.c_fc"], old != 0)
    else:
        assert not torch.equal(layers[0].weight(), pruned[layers[0].name])  # it did train
    assert metrics[1]["student_perplexity_after"] < metrics[1]["student_perplexity_before"]


def test_the_best_student_is_restored(source):
    teacher = load_model(source, CPU)
    student = load_model(source, CPU)
    data = split_held_out(token_stream(tokenizer(), [CORPUS_FILE.read_text()]), 32)
    # A learning rate this large makes the student diverge after first improving.
    config = DistillKD(**{**QUICK, "steps": 12, "eval_every": 3, "learning_rate": 0.05,
                          "warmup_steps": 0, "max_grad_norm": 1000.0})

    result = train_student(student, teacher, data, config, EngineContext())

    scores = dict(result.evaluations)
    assert [step for step, _ in result.evaluations] == [0, 3, 6, 9, 12]
    assert result.best_step == min(scores, key=scores.get)
    assert scores[12] > scores[result.best_step]  # so restoring changed the model
    assert held_out_perplexity(student, data, CPU) == result.best_perplexity


def test_cancel_stops_training_between_steps(source):
    checks = 0

    def should_cancel() -> bool:
        nonlocal checks
        checks += 1
        return checks > 6  # the stage start, then five steps

    progress = []
    ctx = context(source, should_cancel=should_cancel, on_progress=progress.append)
    with pytest.raises(JobCancelled):
        run_pipeline(load_model(source, CPU), [DistillKD(**{**QUICK, "steps": 1000})], ctx)
    assert progress == [step / 1000 for step in range(6)]


def test_a_student_with_another_vocabulary_is_refused(source, tmp_path):
    other = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_layer=1, n_embd=32, n_head=2, vocab_size=300, n_positions=128))
    other.save_pretrained(tmp_path / "other")
    ctx = context(source, resolve_model=lambda model_id: tmp_path / model_id)
    stage = DistillKD(**QUICK, student_model_id="other")
    with pytest.raises(ValueError, match=r"student's vocabulary \(300 tokens\) differs from the teacher's \(400\)"):
        run_pipeline(load_model(source, CPU), [stage], ctx)


def test_an_uploaded_student_is_trained_and_becomes_the_model(source, tmp_path):
    make_checkpoint(tmp_path / "small", "llama", seed=3)
    ctx = context(source, resolve_model=lambda model_id: tmp_path / model_id)
    [metrics] = run_pipeline(load_model(source, CPU), [DistillKD(**{**QUICK, "steps": 5},
                                                                 student_model_id="small")], ctx)
    assert isinstance(ctx.model, transformers.LlamaForCausalLM)
    assert metrics["student_perplexity_after"] <= metrics["student_perplexity_before"]


def test_an_uploaded_student_after_pruning_is_refused(source, tmp_path):
    ctx = context(source, resolve_model=lambda model_id: tmp_path / model_id)
    stages = [PruneMagnitude(sparsity=0.5), DistillKD(**QUICK, student_model_id="small")]
    with pytest.raises(ValueError, match="put the prune stages after distillation"):
        run_pipeline(load_model(source, CPU), stages, ctx)


def test_distillation_after_quantization_is_refused(source):
    with pytest.raises(ValueError, match="distillation must run before quantization"):
        run_pipeline(load_model(source, CPU), [QuantizeRTN(bits=8), DistillKD(**QUICK)], context(source))

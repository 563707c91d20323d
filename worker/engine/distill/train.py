"""Distillation training: the data, the loop, and the handler for ``DistillKD``.

After a prune stage (the pruned model learns from the model it was pruned from)::

    {"type": "distill", "method": "kd", "dataset_id": "ds_...", "steps": 500,
     "temperature": 2.0, "alpha": 0.5, "learning_rate": 5e-5, "eval_every": 50}

The teacher is loaded fresh from the job's input model (or ``teacher_model_id``), frozen. The
student is the current model, an uploaded one (``student_model_id``), or the current model's
``keep_layers``. The dataset's last tokens (10%, at most ``EVAL_MAX_TOKENS``) are held out;
training reads random windows of the rest. The student is evaluated on the held-out tokens
before training, every ``eval_every`` steps and at the end; the best one is kept. Weights that
earlier stages pruned stay exactly zero. Metrics::

    {"steps": 500, "teacher_perplexity": 21.3, "student_perplexity_before": 88.1,
     "student_perplexity_after": 27.9, "best_step": 500, "train_loss_first": 4.1,
     "train_loss_last": 2.2, "student_layers": 12, "teacher_layers": 12,
     "train_tokens": 180000, "eval_tokens": 20000}
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from app.specs import DistillKD
from worker.engine.calibration import read_texts, token_stream
from worker.engine.distill.loss import LayerMap, copied_layer_map, distillation_loss, uniform_layer_map
from worker.engine.distill.student import kept_layer_indices, keep_decoder_blocks, renumber_masks
from worker.engine.loading import load_model
from worker.engine.modules import compressible_layers, decoder_blocks
from worker.engine.registry import EngineContext, register
from worker.evaluate import perplexity

EVAL_FRACTION = 0.1
# Evaluating more held-out tokens than this only makes every evaluation slower.
EVAL_MAX_TOKENS = 32768
# The dataset is tokenized only as far as training can use it (random windows of it), at least
# this far: tokenizing a large upload whole takes minutes.
MIN_READ_TOKENS = 1 << 20
MIN_DATASET_TOKENS = 16


@dataclass
class TokenSplit:
    """The dataset's tokens: ``train`` (1-D) gives the training windows of ``seq_len`` tokens;
    ``held_out`` (1-D, the last tokens) is only evaluated."""

    train: torch.Tensor
    held_out: torch.Tensor
    seq_len: int


@dataclass
class TrainingResult:
    evaluations: list[tuple[int, float]]  # (optimizer steps done, held-out perplexity); 0 = before
    best_step: int
    loss_first: float
    loss_last: float

    @property
    def best_perplexity(self) -> float:
        return dict(self.evaluations)[self.best_step]


@register(DistillKD)
def distill_kd(model: nn.Module, config: DistillKD, ctx: EngineContext) -> dict[str, Any]:
    if ctx.quantized:
        # The student's weights change: integers quantized from the old ones would no longer
        # describe them, and training quantized weights needs a method of its own (QAT).
        raise ValueError("distillation must run before quantization")
    if ctx.tokenizer is None or ctx.resolve_dataset is None:
        raise ValueError("distillation needs the job's tokenizer and access to its datasets")

    teacher = _load_teacher(config, ctx)
    teacher_layers = len(decoder_blocks(teacher)[1])
    student, masks, layer_map = _make_student(model, config, ctx, teacher_layers)
    _check_same_vocabulary(student, teacher)
    if config.hidden_loss_weight > 0 and _width(student) != _width(teacher):
        raise ValueError(
            f"hidden_loss_weight needs student and teacher of the same hidden size "
            f"(student {_width(student)}, teacher {_width(teacher)})"
        )
    ctx.masks = masks

    ids = _read_tokens(config, ctx)
    vocabulary = _vocabulary_size(student)
    if int(ids.max()) >= vocabulary:
        raise ValueError(
            f"the tokenizer gives token id {int(ids.max())}, beyond the models' vocabulary of {vocabulary}"
        )
    seq_len = min(config.seq_len, _context_length(student), _context_length(teacher))
    data = split_held_out(ids, seq_len)

    teacher_perplexity = held_out_perplexity(teacher, data, ctx.device)
    result = train_student(student, teacher, data, config, ctx, layer_map)
    ctx.model = student
    return {
        "steps": config.steps,
        "teacher_perplexity": teacher_perplexity,
        "student_perplexity_before": result.evaluations[0][1],
        "student_perplexity_after": result.best_perplexity,
        "best_step": result.best_step,
        "train_loss_first": result.loss_first,
        "train_loss_last": result.loss_last,
        "student_layers": len(decoder_blocks(student)[1]),
        "teacher_layers": teacher_layers,
        "train_tokens": data.train.numel(),
        "eval_tokens": data.held_out.numel(),
    }


def train_student(
    student: nn.Module,
    teacher: nn.Module,
    data: TokenSplit,
    config: DistillKD,
    ctx: EngineContext,
    layer_map: LayerMap | None = None,
) -> TrainingResult:
    """Train ``student`` (in place) on ``data.train`` to imitate ``teacher``; leave it with the
    weights that scored best on ``data.held_out``, the untrained ones included.

    AdamW, linear warm-up then cosine decay, gradient clipping, bf16 autocast on CUDA (float32
    weights and losses). The student trains in float32 whatever its dtype (a bfloat16 weight
    cannot take AdamW's small updates: most would round away) and is cast back to its dtype at
    the end; the teacher runs in its own. The keep-masks in ``ctx.masks`` (named as the
    student's layers) are re-applied after every step. ``ctx.step`` is called before every
    step, so a cancelled job stops within one step. ``layer_map`` pairs hidden states for
    ``hidden_loss_weight``."""
    device = ctx.device
    dtype = next(student.parameters()).dtype
    student.to(device, torch.float32)  # before the views of its weights below are taken
    teacher.to(device).eval().requires_grad_(False)
    pruned = _pruned_weights(student, ctx.masks)
    needs_teacher = config.alpha > 0 or config.hidden_loss_weight > 0
    needs_hidden = config.hidden_loss_weight > 0
    if needs_hidden and not layer_map:
        raise ValueError("hidden_loss_weight needs a layer map")
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                else contextlib.nullcontext())

    best = held_out_perplexity(student, data, device)
    evaluations, best_step, best_state = [(0, best)], 0, _cpu_copy(student)
    generator = torch.Generator().manual_seed(config.seed)  # which windows: the same every run
    # Dropout draws from the global generators: seeded, but forked so that the worker's own
    # random state is left as it was.
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.enable_grad():
        torch.manual_seed(config.seed)
        student.requires_grad_(True)
        student.train()
        optimizer = torch.optim.AdamW(
            parameter_groups(student, config.weight_decay), lr=config.learning_rate
        )
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: learning_rate_factor(step, config.warmup_steps, config.steps)
        )
        parameters = [p for p in student.parameters() if p.requires_grad]
        loss_first = loss_last = None
        for step in range(config.steps):
            ctx.step(step, config.steps)
            batch = training_windows(data.train, config.batch_size, data.seq_len, generator).to(device)
            with autocast:
                teacher_out = None
                if needs_teacher:
                    with torch.no_grad():
                        teacher_out = teacher(batch, output_hidden_states=needs_hidden, use_cache=False)
                student_out = student(batch, output_hidden_states=needs_hidden, use_cache=False)
            loss = distillation_loss(
                student_out.logits,
                None if teacher_out is None else teacher_out.logits,
                batch,
                temperature=config.temperature,
                alpha=config.alpha,
                hidden_loss_weight=config.hidden_loss_weight,
                student_hidden=student_out.hidden_states,
                teacher_hidden=None if teacher_out is None else teacher_out.hidden_states,
                layer_map=layer_map,
            )
            optimizer.zero_grad(set_to_none=True)
            loss.total.backward()
            torch.nn.utils.clip_grad_norm_(parameters, config.max_grad_norm)
            optimizer.step()
            schedule.step()
            with torch.no_grad():
                for weight, pruned_here in pruned:
                    weight.masked_fill_(pruned_here, 0.0)
            if step == 0:
                loss_first = loss.total.item()  # later losses stay on the device: no sync
            loss_last = loss.total.detach()

            done = step + 1
            if done % config.eval_every == 0 or done == config.steps:
                score = held_out_perplexity(student, data, device)
                evaluations.append((done, score))
                if score < best:  # a NaN (diverged) score is never best
                    best, best_step, best_state = score, done, _cpu_copy(student)
                student.train()
        del optimizer, schedule  # the moments: twice the student's size

    if best_step != config.steps:
        student.load_state_dict(best_state)
    student.to(dtype).eval()  # pruned weights are exactly 0 in any dtype
    return TrainingResult(evaluations, best_step, loss_first, float(loss_last))


# ---------------------------------------------------------------------------------------------
# Data


def split_held_out(ids: torch.Tensor, seq_len: int) -> TokenSplit:
    """The last 10% of ``ids`` (at most ``EVAL_MAX_TOKENS``) held out, the rest for training.
    Windows are ``seq_len`` tokens, or all of the training tokens if there are fewer."""
    total = ids.numel()
    if total < MIN_DATASET_TOKENS:
        raise ValueError(f"the distillation dataset has {total} tokens; it needs at least {MIN_DATASET_TOKENS}")
    held_out = min(max(round(EVAL_FRACTION * total), 2), EVAL_MAX_TOKENS)
    train = ids[: total - held_out]
    return TokenSplit(train=train, held_out=ids[total - held_out :], seq_len=min(seq_len, train.numel()))


def training_windows(
    ids: torch.Tensor, batch_size: int, seq_len: int, generator: torch.Generator
) -> torch.Tensor:
    """``[batch_size, seq_len]`` windows of ``ids`` at random starts drawn from ``generator``."""
    starts = torch.randint(0, ids.numel() - seq_len + 1, (batch_size,), generator=generator)
    return ids[starts.unsqueeze(1) + torch.arange(seq_len)]


def held_out_perplexity(model: nn.Module, data: TokenSplit, device: torch.device) -> float:
    """Perplexity of ``model`` on the held-out tokens, in float32, by non-overlapping windows
    (a comparison between students, not the job's reported evaluation)."""
    window = min(data.seq_len, data.held_out.numel())
    try:
        return perplexity(model, data.held_out, seq_len=window, stride=window, device=device)
    except OverflowError:  # exp of a diverged model's mean loss
        return math.inf


def _read_tokens(config: DistillKD, ctx: EngineContext) -> torch.Tensor:
    texts = read_texts(ctx.resolve_dataset(config.dataset_id))
    wanted = max(2 * config.steps * config.batch_size * config.seq_len, MIN_READ_TOKENS)
    return token_stream(ctx.tokenizer, texts, max_tokens=math.ceil(wanted / (1 - EVAL_FRACTION)))


# ---------------------------------------------------------------------------------------------
# Optimisation


def learning_rate_factor(step: int, warmup_steps: int, total_steps: int) -> float:
    """The multiplier of the learning rate at optimizer step ``step`` (0-based): rising
    linearly to 1 over ``warmup_steps``, then a cosine down towards 0 at ``total_steps``."""
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: matrices (projections, embeddings) decay; biases and norm scales (1-D)
    do not, since shrinking them towards 0 only shifts or rescales activations."""
    trainable = [p for p in model.parameters() if p.requires_grad]  # a tied weight once
    return [
        {"params": [p for p in trainable if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for p in trainable if p.ndim < 2], "weight_decay": 0.0},
    ]


def _pruned_weights(model: nn.Module, masks: dict[str, torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """For each masked layer: a view of its weight ``[out, in]`` and where it was pruned."""
    layers = {layer.name: layer for layer in compressible_layers(model)}
    pruned = []
    for name, keep in masks.items():
        layer = layers.get(name)
        if layer is None or tuple(keep.shape) != tuple(layer.weight().shape):
            raise ValueError(f"the pruning mask of {name} does not fit the student's layers")
        pruned.append((layer.weight(), ~keep.to(device=layer.weight().device, dtype=torch.bool)))
    return pruned


def _cpu_copy(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: value.detach().to("cpu", copy=True) for name, value in model.state_dict().items()}


# ---------------------------------------------------------------------------------------------
# Teacher and student


def _load_teacher(config: DistillKD, ctx: EngineContext) -> nn.Module:
    if config.teacher_model_id is not None:
        folder = _resolve_model(config.teacher_model_id, ctx)
    elif ctx.source_model_dir is not None:
        # Fresh from disk: the model in memory may already be pruned.
        folder = ctx.source_model_dir
    else:
        raise ValueError("distillation needs a teacher: the job's input model or teacher_model_id")
    return load_model(folder, ctx.device).requires_grad_(False)


def _make_student(
    model: nn.Module, config: DistillKD, ctx: EngineContext, teacher_layers: int
) -> tuple[nn.Module, dict[str, torch.Tensor], LayerMap]:
    """The student, the keep-masks named as its layers, and its hidden-state layer map."""
    if config.student_model_id is not None:
        if ctx.masks:
            raise ValueError(
                "an uploaded student replaces the pruned model: put the prune stages after distillation"
            )
        student = load_model(_resolve_model(config.student_model_id, ctx), ctx.device)
        student_layers = len(decoder_blocks(student)[1])
        return student, {}, uniform_layer_map(student_layers, teacher_layers)

    layers = len(decoder_blocks(model)[1])
    if config.keep_layers is None:
        return model, dict(ctx.masks), uniform_layer_map(layers, teacher_layers)
    keep = kept_layer_indices(config.keep_layers, layers)
    masks = renumber_masks(ctx.masks, model, keep)
    student = keep_decoder_blocks(model, keep)
    # Each block is matched to the one it was copied from when the teacher has those blocks.
    same_depth = teacher_layers == layers
    layer_map = copied_layer_map(keep, teacher_layers) if same_depth else uniform_layer_map(len(keep), teacher_layers)
    return student, masks, layer_map


def _resolve_model(model_id: str, ctx: EngineContext) -> Path:
    if ctx.resolve_model is None:
        raise ValueError(f"cannot load model {model_id}: the job has no access to other models")
    return ctx.resolve_model(model_id)


def _check_same_vocabulary(student: nn.Module, teacher: nn.Module) -> None:
    # KL compares the two next-token distributions token id by token id.
    if _vocabulary_size(student) != _vocabulary_size(teacher):
        raise ValueError(
            f"the student's vocabulary ({_vocabulary_size(student)} tokens) differs from the "
            f"teacher's ({_vocabulary_size(teacher)}): distillation needs the same tokenizer"
        )


def _vocabulary_size(model: nn.Module) -> int:
    head = model.get_output_embeddings()
    return head.weight.shape[0] if head is not None else model.config.vocab_size


def _width(model: nn.Module) -> int | None:
    return getattr(model.config, "hidden_size", None)


def _context_length(model: nn.Module) -> int:
    # GPT-2's n_positions reads as max_position_embeddings through its attribute_map.
    return getattr(model.config, "max_position_embeddings", None) or 1 << 30

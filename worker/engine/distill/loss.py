"""The distillation losses: tensors in, a scalar out, no model.

Logits are ``[batch, tokens, vocab]``; a ``mask`` ``[batch, tokens]`` (an attention mask:
1 / True for real tokens) leaves padding out of every average. With ``T = 2``::

    kd = kd_loss(student_logits, teacher_logits, temperature=2.0)
    lm = lm_loss(student_logits, input_ids)
    hidden = hidden_state_loss(student.hidden_states, teacher.hidden_states, [(1, 2), (2, 4)])
    loss = distillation_loss(student_logits, teacher_logits, input_ids, temperature=2.0,
                             alpha=0.5).total       # 0.5 * kd + 0.5 * lm

Layer maps pair indices of the ``hidden_states`` tuples that ``output_hidden_states=True``
returns: index 0 is the embeddings, index ``i`` the output of block ``i - 1``, and the last
index the last block's output after the final norm.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

LayerMap = list[tuple[int, int]]  # (student hidden-state index, teacher hidden-state index)


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """``KL(softmax(teacher / T) || softmax(student / T)) * T^2``: summed over the vocabulary,
    averaged over the (unmasked) tokens.

    The ``T^2`` keeps the gradient's size independent of ``T`` (Hinton et al. 2015): softening
    both distributions by ``T`` shrinks the gradient of the KL by ``1 / T^2``."""
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {list(student_logits.shape)} and teacher logits "
            f"{list(teacher_logits.shape)} differ: the vocabularies must match"
        )
    # float32: the log-probabilities of bf16 logits lose the small differences KL is made of.
    student_log_probs = F.log_softmax(student_logits.float() / temperature, dim=-1)
    teacher_log_probs = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    per_token = F.kl_div(student_log_probs, teacher_log_probs, log_target=True, reduction="none").sum(-1)
    return _mean_over_tokens(per_token, mask) * temperature**2


def lm_loss(logits: torch.Tensor, input_ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Next-token cross-entropy: position ``p`` predicts token ``p + 1``, averaged over the
    predicted tokens (a pair counts when both its tokens are unmasked)."""
    per_token = F.cross_entropy(
        logits[:, :-1].float().flatten(0, 1), input_ids[:, 1:].flatten(), reduction="none"
    ).view(input_ids.shape[0], -1)
    pair_mask = None if mask is None else mask[:, :-1].bool() & mask[:, 1:].bool()
    return _mean_over_tokens(per_token, pair_mask)


def hidden_state_loss(
    student_hidden: tuple[torch.Tensor, ...],
    teacher_hidden: tuple[torch.Tensor, ...],
    layer_map: LayerMap,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """The mean over ``layer_map``'s pairs of the squared error between the student's and the
    teacher's hidden states, averaged over the features and the (unmasked) tokens."""
    if not layer_map:
        raise ValueError("hidden_state_loss needs at least one pair of layers")
    losses = []
    for student_index, teacher_index in layer_map:
        student_state = student_hidden[student_index].float()
        teacher_state = teacher_hidden[teacher_index].float()
        if student_state.shape != teacher_state.shape:
            raise ValueError(
                f"student hidden state {student_index} {list(student_state.shape)} and teacher "
                f"hidden state {teacher_index} {list(teacher_state.shape)} differ in shape"
            )
        per_token = (student_state - teacher_state).pow(2).mean(-1)
        losses.append(_mean_over_tokens(per_token, mask))
    return torch.stack(losses).mean()


class DistillationLoss(NamedTuple):
    total: torch.Tensor  # what is minimised
    kd: torch.Tensor
    lm: torch.Tensor
    hidden: torch.Tensor


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    input_ids: torch.Tensor,
    temperature: float,
    alpha: float,
    hidden_loss_weight: float = 0.0,
    student_hidden: tuple[torch.Tensor, ...] | None = None,
    teacher_hidden: tuple[torch.Tensor, ...] | None = None,
    layer_map: LayerMap | None = None,
    mask: torch.Tensor | None = None,
) -> DistillationLoss:
    """``alpha * kd + (1 - alpha) * lm + hidden_loss_weight * hidden``, with its parts.

    A term whose weight is 0 is not computed (and reads 0): ``teacher_logits`` may be None
    when ``alpha`` is 0, the hidden states when ``hidden_loss_weight`` is 0."""
    zero = student_logits.new_zeros((), dtype=torch.float32)
    kd = kd_loss(student_logits, teacher_logits, temperature, mask) if alpha > 0 else zero
    lm = lm_loss(student_logits, input_ids, mask) if alpha < 1 else zero
    hidden = zero
    if hidden_loss_weight > 0:
        hidden = hidden_state_loss(student_hidden, teacher_hidden, layer_map, mask)
    total = alpha * kd + (1 - alpha) * lm + hidden_loss_weight * hidden
    return DistillationLoss(total, kd, lm, hidden)


def uniform_layer_map(student_layers: int, teacher_layers: int) -> LayerMap:
    """Student block ``s`` (1-based) matched to teacher block ``round(s * T / S)``: evenly
    spaced, and the last to the last, so that both final (normed) outputs are compared.
    ``uniform_layer_map(3, 12) == [(1, 4), (2, 8), (3, 12)]``."""
    return [(s, round(s * teacher_layers / student_layers)) for s in range(1, student_layers + 1)]


def copied_layer_map(keep: list[int], teacher_layers: int) -> LayerMap:
    """For a student built from the teacher's blocks ``keep``: each student block matched to
    the block it was copied from, ``copied_layer_map([0, 2, 4], 6) == [(1, 1), (2, 3), (3, 6)]``.

    The student's last hidden state comes out of the final norm, like the teacher's last one
    and unlike the teacher's block ``keep[-1]`` (unless that is the last): the last pair is
    always last to last."""
    pairs = [(student + 1, teacher + 1) for student, teacher in enumerate(keep)]
    pairs[-1] = (len(keep), teacher_layers)
    return pairs


def _mean_over_tokens(per_token: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return per_token.mean()
    mask = mask.to(device=per_token.device, dtype=per_token.dtype)
    # clamp: an all-padding batch gives 0, not 0 / 0.
    return (per_token * mask).sum() / mask.sum().clamp(min=1)

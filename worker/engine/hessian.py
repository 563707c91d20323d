"""The second-order machinery SparseGPT and GPTQ share: the Hessian of a layer's calibration
inputs, and the column-by-column sweep that changes a weight while spreading each change's
error over the columns not yet visited.

A layer ``y = W x`` is compressed to ``W'`` so that ``sum ||W x - W' x||^2`` over the
calibration inputs stays small. That loss is quadratic in each row of ``W'`` with Hessian
``H = 2/n * sum x x^T`` (the same for every row), so::

    hessian = InputHessian(in_features=768)
    hessian.add(inputs)                      # called by a hook, [..., 768] per batch
    new_weight = sweep_columns(weight, hessian.hessian(), dampening=0.01, block_size=128,
                               segment_size=128, start_segment=choose)

SparseGPT chooses, per segment, which weights become 0; GPTQ chooses the integer grid the
segment's weights are rounded to. Everything else (dead inputs, dampening, the inverse, the
error propagation) is written once, here.
"""

from __future__ import annotations

import logging
from typing import Callable

import torch

logger = logging.getLogger(__name__)

# Given a column's index and its current values, the values it is replaced with.
ColumnRule = Callable[[int, torch.Tensor], torch.Tensor]
# Given a segment's first column, the current values of its columns [rows, width] and the
# matching diagonal of the inverse Hessian's Cholesky factor [width], the rule for its columns.
SegmentStart = Callable[[int, torch.Tensor, torch.Tensor], ColumnRule]


class InputHessian:
    """``H = 2/n * sum x x^T`` over the ``n`` input vectors a layer saw (one per token), in
    float32 on ``device``. ``add`` is the calibration hook's statistic."""

    def __init__(self, in_features: int, device: torch.device | str = "cpu"):
        self._sum = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self._count = 0

    def add(self, inputs: torch.Tensor) -> None:
        rows = inputs.detach().reshape(-1, inputs.shape[-1]).to(self._sum.device, torch.float32)
        self._sum.addmm_(rows.t(), rows)
        self._count += rows.shape[0]

    def hessian(self) -> torch.Tensor:
        """The Hessian; the identity (every input weighs the same) if no input was seen, e.g.
        a layer the calibration text never reached."""
        if self._count == 0:
            return torch.eye(self._sum.shape[0], dtype=torch.float32, device=self._sum.device)
        # The scale changes neither method's choices; the mean keeps the values in float32's
        # comfortable range however many tokens were seen.
        return self._sum * (2.0 / self._count)


def sweep_columns(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    dampening: float,
    block_size: int,
    segment_size: int,
    start_segment: SegmentStart,
) -> torch.Tensor:
    """Replace the columns of the ``[out, in]`` weight from left to right by what the rules
    give, each time updating the columns to the right so that the layer's output on the
    calibration inputs changes as little as possible (the OBS update, done in blocks of
    ``block_size`` columns as in GPTQ section 3.4). Returns the new weight in float32.

    Every ``segment_size`` columns, ``start_segment`` sees the segment's columns as they are
    at that moment (with the updates from all columns before) and returns the rule for its
    columns: SparseGPT picks the segment's mask there, GPTQ its quantization scale.

    Inputs that were always 0 in calibration ("dead", zero on the Hessian diagonal) say
    nothing about their weights, which are set to 0, as in GPTQ and SparseGPT.
    """
    weight = weight.detach().to(torch.float32).clone()
    columns = weight.shape[1]
    dead = hessian.diagonal() == 0
    weight[:, dead] = 0
    factor = _inverse_cholesky(hessian, dead, dampening)
    factor_diagonal = factor.diagonal()

    rule: ColumnRule | None = None
    for first, end in _blocks(columns, block_size, segment_size):
        block = weight[:, first:end].clone()
        errors = torch.zeros_like(block)
        block_factor = factor[first:end, first:end]
        for offset in range(end - first):
            column = first + offset
            if column % segment_size == 0:
                # The segment lies in this block, or starts it: either way its current values
                # are in `block` or, beyond the block, in `weight` (already fully updated).
                last = min(column + segment_size, columns)
                current = block[:, offset:last - first] if last <= end else weight[:, column:last]
                rule = start_segment(column, current, factor_diagonal[column:last])
            values = block[:, offset].clone()  # the update below writes into `block`
            new_values = rule(column, values)
            error = (values - new_values) / block_factor[offset, offset]
            block[:, offset:] -= error.unsqueeze(1) * block_factor[offset, offset:].unsqueeze(0)
            block[:, offset] = new_values  # exactly, not up to the rounding of the update
            errors[:, offset] = error
        weight[:, first:end] = block
        weight[:, end:] -= errors @ factor[first:end, end:]
    return weight


def _inverse_cholesky(hessian: torch.Tensor, dead: torch.Tensor, dampening: float) -> torch.Tensor:
    """The upper Cholesky factor ``U`` of ``(H + lambda I)^-1`` (``U^T U`` is the inverse),
    ``lambda = dampening * mean(diag H)``. Row ``i`` of ``U`` right of the diagonal, over
    ``U[i, i]``, is how a change of column ``i`` is best compensated by the later columns."""
    hessian = hessian.detach().to(torch.float32).clone()
    hessian[dead, dead] = 1.0  # decouples the dead inputs; their weights are 0
    hessian.diagonal().add_(dampening * hessian.diagonal().mean())
    lower, info = torch.linalg.cholesky_ex(hessian)
    if info == 0:
        upper, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(lower), upper=True)
        if info == 0:
            return upper
    # Too few or too collinear calibration inputs. Without a usable inverse each column is
    # only rounded or pruned where it stands (RTN / magnitude), which is still a valid result.
    logger.warning("the calibration Hessian is not positive definite: no error compensation "
                   "for this layer (more calibration samples or a larger dampening help)")
    return torch.eye(hessian.shape[0], dtype=torch.float32, device=hessian.device)


def _blocks(columns: int, block_size: int, segment_size: int) -> list[tuple[int, int]]:
    """``[first, end)`` column ranges of at most ``block_size``. A segment that starts inside a
    block ends inside it too (the block is cut before it otherwise), so that the values
    ``start_segment`` sees are up to date without pending block updates."""
    blocks, first = [], 0
    while first < columns:
        end = min(first + block_size, columns)
        last_start = (end - 1) // segment_size * segment_size
        if first < last_start and min(last_start + segment_size, columns) > end:
            end = last_start
        blocks.append((first, end))
        first = end
    return blocks

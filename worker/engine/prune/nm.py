"""N:M semi-structured sparsity: in every M consecutive inputs of a row, only N weights stay.

``{"type": "prune", "method": "magnitude", "pattern": "2:4"}`` keeps the two largest of every
four weights, the pattern sparse tensor cores run fast. Each pruning method supplies its own
score (``|w|``, a random draw, ``|w| * ||x||``); the choice within a group is made here::

    keep = nm_mask(weight.abs(), n=2, m=4)   # [out, in], in divisible by 4
"""

from __future__ import annotations

import torch


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """A keep-mask shaped like the ``[out, in]`` scores that drops the ``m - n`` lowest scores
    of every group of ``m`` consecutive inputs. Ties are broken by position, the earlier input
    dropped first, as in unstructured magnitude pruning."""
    rows, columns = scores.shape
    if columns % m:
        raise ValueError(f"an N:M pattern needs rows of a multiple of {m} inputs, got {columns}")
    groups = scores.reshape(rows, columns // m, m)
    lowest_first = torch.sort(groups, dim=-1, stable=True).indices
    keep = torch.ones_like(groups, dtype=torch.bool)
    keep.scatter_(-1, lowest_first[..., : m - n], False)
    return keep.reshape(rows, columns)

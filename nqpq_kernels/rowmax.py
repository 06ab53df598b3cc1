"""The maximum of each row with its first index, fast on CPU: ``max_first_index`` (the streamed path's argmax).

torch's CPU ``max(dim)`` / ``argmax(dim)`` with indices is not vectorized, ``amax`` is; this search runs on
``amax`` over column groups and leaves the index-returning kernels a few columns per row.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["max_first_index"]


def max_first_index(x: Tensor, width: int = 64) -> tuple[Tensor, Tensor]:
    """``x.max(dim=-1)``'s values and first indices, about 15× faster on CPU for long rows.

    torch's CPU ``max(dim)`` with indices is not vectorized (1.5 ms for 1.8 M fp32 here, against 0.08 ms for
    ``amax``). Per row: the maxima of ``width``-wide column groups (``amax`` on a view), the first group holding the
    row's maximum, then the first index within that group (``argmax`` on ``width`` columns only), the columns past
    the last whole group apart. The first index of the maximum, as ``max`` gives it; NaN propagates into the value
    (the index of a NaN row is then unspecified: callers treat such rows as non-finite)."""
    cols = x.shape[-1]
    whole = cols // width * width
    if whole < 2 * width:  # short rows: the plain kernel
        return x.max(dim=-1)
    groups = (x if whole == cols else x[..., :whole]).unflatten(-1, (whole // width, width))  # a view
    group_max = groups.amax(dim=-1)
    m = group_max.amax(dim=-1)
    tail_m = tail_i = None
    if whole < cols:
        tail_m, tail_i = x[..., whole:].max(dim=-1)
        m = torch.maximum(m, tail_m)
    hit = group_max == m.unsqueeze(-1)
    first_group = hit.view(torch.uint8).argmax(dim=-1)  # the first True; 0 if none (the maximum is in the tail)
    if x.is_contiguous():
        # That group's columns by flat offset (row start + group start) into a [N − width + 1, width] window view
        # of x: index_select copies them ~4× faster than gather on the grouped view.
        starts = torch.arange(0, x.numel(), cols, device=x.device).view(first_group.shape)
        starts.add_(first_group, alpha=width)
        within = x.view(-1).unfold(0, width, 1).index_select(0, starts.view(-1)).argmax(dim=-1)
        idx = within.view(first_group.shape).add_(first_group, alpha=width)
    else:
        pick = first_group[..., None, None].expand(*first_group.shape, 1, width)
        idx = torch.gather(groups, -2, pick).squeeze(-2).argmax(dim=-1).add_(first_group, alpha=width)
    if tail_i is not None:
        idx = torch.where(hit.any(dim=-1), idx, tail_i + whole)
    return m, idx

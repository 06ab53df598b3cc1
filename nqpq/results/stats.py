"""Paired bootstrap confidence intervals for perplexity differences and "recovered %".

Method: the percentile bootstrap over the scored blocks. One resample draws ``n`` block indices
uniformly with replacement from the ``n`` scored blocks; the perplexity of a configuration on that
resample is ``exp(mean of its block losses at those indices)``, the spec's definition applied to the
resampled blocks. The same index rows serve the baseline and every configuration (a *paired*
bootstrap: block-to-block variation, which all configurations share, cancels in their differences).
A statistic (ΔPPL, recovered %) is computed per resample from the resample's perplexities, and its
95 % interval is the 2.5th and 97.5th percentiles of the ``BOOTSTRAP_RESAMPLES`` values (numpy's
default linear interpolation). The indices come from ``numpy.random.default_rng(seed)``, so a run's
intervals are a function of its block losses and ``--seed`` alone (the same on every rank and in
``nqpq report``'s re-print).

Below ``MIN_BLOCKS`` scored blocks there is no interval at all, and the functions here return None. A paired
bootstrap over n blocks has only C(2n − 1, n) distinct resamples (n = 2: 3, n = 4: 35, n = 8: 6435), each resample
of all-one-block has probability n^−n, and the percentile interval of a mean under-covers (by the factor
√((n − 1)/n) and by z against Student's t). Measured for the mean of n normal blocks (2000 data sets, 2000
resamples each; docs/verdict.md): a "95 %" interval holds the true mean 48 % of the time at n = 2, 79 % at 4, 88 %
at 8, 90 % at 10, 93 % at 16 and 30. 8 is where that climb flattens, the smallest n whose 2000 resamples come from
more distinct resamples than there are draws (6435 > 2000), and no single resample weighs more than 1e-7; the
default, 30 blocks, covers ≈ 93 %.

A recovered-% bound beyond ±``RECOVERED_PCT_LIMIT`` is not a bound the blocks support: it comes from resamples on
which top-1 happens to lose (almost) nothing, where the ratio divides by ~0. Such a bound is None ("unbounded"; JSON
has no infinity) and printed as ">1000" / "<-1000" (``bounded``).

Pure functions of numpy arrays / float lists (and the loss tensors' perplexity); nothing here knows about models.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

BOOTSTRAP_RESAMPLES = 2000
CI_LEVEL = 0.95
MIN_BLOCKS = 8  # fewest scored blocks with any interval (see above)
RECOVERED_PCT_LIMIT = 1000.0  # a recovered-% bound past ± this is unbounded (None)

Losses = Sequence[float] | np.ndarray


def ppl_from_losses(losses: torch.Tensor) -> float:
    """exp(mean over blocks of each block's mean loss), in float64."""
    return math.exp(losses.double().mean().item())


def distinct_resamples(n_blocks: int) -> int:
    """How many different resamples (multisets of ``n_blocks`` blocks out of ``n_blocks``) a bootstrap can draw."""
    return math.comb(2 * n_blocks - 1, n_blocks)


def resample_indices(n_blocks: int, seed: int, n_resamples: int = BOOTSTRAP_RESAMPLES) -> np.ndarray | None:
    """``[n_resamples, n_blocks]`` block indices drawn with replacement, or None below ``MIN_BLOCKS`` blocks (too
    few to support an interval)."""
    if n_blocks < MIN_BLOCKS:
        return None
    return np.random.default_rng(seed).integers(0, n_blocks, size=(n_resamples, n_blocks))


def resampled_ppl(block_losses: Losses, indices: np.ndarray) -> np.ndarray:
    """``[n_resamples]`` perplexities: exp(mean of the block losses of each resample)."""
    return np.exp(np.asarray(block_losses, dtype=np.float64)[indices].mean(axis=1))


def percentile_interval(values: np.ndarray, level: float = CI_LEVEL) -> list[float] | None:
    """``[lo, hi]``, the central ``level`` percentile interval of ``values``; None if any value is not finite."""
    values = np.asarray(values, dtype=np.float64)
    if not np.isfinite(values).all():
        return None
    tail = (1.0 - level) / 2 * 100
    lo, hi = np.percentile(values, [tail, 100 - tail])
    return [float(lo), float(hi)]


def delta_ppl_ci(baseline: Losses, config: Losses, indices: np.ndarray | None) -> list[float] | None:
    """95 % interval of PPL(config) − PPL(baseline), both on the same resampled blocks."""
    if indices is None:
        return None
    return percentile_interval(resampled_ppl(config, indices) - resampled_ppl(baseline, indices))


def recovered_pct_ci(baseline: Losses, top1: Losses, config: Losses, indices: np.ndarray | None) -> list[float] | None:
    """95 % interval of the spec's recovered %, (PPL_top1 − PPL_c) / max(PPL_top1 − PPL_base, 1e-9) · 100, with the
    three perplexities of each resample taken on the same blocks; ``[lo, hi]`` where a bound past
    ±``RECOVERED_PCT_LIMIT`` is None (unbounded).

    A resample on which top-1 happens to lose (almost) nothing has a denominator near the 1e-9 floor, and its
    recovered % is huge: such a bound says only that these blocks cannot pin the ratio down on that side.
    """
    if indices is None:
        return None
    base, a, c = (resampled_ppl(x, indices) for x in (baseline, top1, config))
    return bounded(percentile_interval((a - c) / np.maximum(a - base, 1e-9) * 100), RECOVERED_PCT_LIMIT)


def bounded(interval: list[float] | None, limit: float) -> list[float | None] | None:
    """``interval`` with what the data cannot bound made explicit: a low end below −``limit`` is None (unbounded
    below), a high end above ``limit`` None (unbounded above); a low end above ``limit`` becomes ``limit`` and a high
    end below −``limit`` becomes −``limit`` (the interval lies beyond ±``limit``: a true, conservative bound)."""
    if interval is None:
        return None
    lo, hi = interval
    return [None if lo < -limit else min(lo, limit), None if hi > limit else max(hi, -limit)]


def half_width(interval: Sequence[float | None] | None) -> float | None:
    """Half the width of ``[lo, hi]`` (the "±" of an interval); None for no interval; inf for an unbounded one."""
    if interval is None:
        return None
    if interval[0] is None or interval[1] is None:
        return math.inf
    return (interval[1] - interval[0]) / 2


def blocks_to_halve(n_blocks: int) -> int:
    """Scored blocks that would about halve an interval's width: a bootstrap interval shrinks as 1/√n."""
    return 4 * n_blocks

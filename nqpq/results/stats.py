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
``nqpq report``'s re-print). With one scored block every resample is that block: there is no
interval, and the functions here return None.

Pure functions of numpy arrays / float lists; nothing here knows about models.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

BOOTSTRAP_RESAMPLES = 2000
CI_LEVEL = 0.95

Losses = Sequence[float] | np.ndarray


def resample_indices(n_blocks: int, seed: int, n_resamples: int = BOOTSTRAP_RESAMPLES) -> np.ndarray | None:
    """``[n_resamples, n_blocks]`` block indices drawn with replacement, or None when ``n_blocks < 2``."""
    if n_blocks < 2:
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
    three perplexities of each resample taken on the same blocks.

    A resample on which top-1 happens to lose (almost) nothing has a denominator near the 1e-9 floor, and its
    recovered % is huge: the interval then says, truthfully, that these blocks cannot pin the ratio down.
    """
    if indices is None:
        return None
    base, a, c = (resampled_ppl(x, indices) for x in (baseline, top1, config))
    return percentile_interval((a - c) / np.maximum(a - base, 1e-9) * 100)


def half_width(interval: Sequence[float] | None) -> float | None:
    """Half the width of ``[lo, hi]`` (the "±" of an interval), None for no interval."""
    return None if interval is None else (interval[1] - interval[0]) / 2


def blocks_to_halve(n_blocks: int) -> int:
    """Scored blocks that would about halve an interval's width: a bootstrap interval shrinks as 1/√n."""
    return 4 * n_blocks

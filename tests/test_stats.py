"""The paired bootstrap (nqpq.results.stats) against a straightforward re-implementation with the same indices."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

from nqpq.results.stats import (
    BOOTSTRAP_RESAMPLES,
    MIN_BLOCKS,
    RECOVERED_PCT_LIMIT,
    blocks_to_halve,
    bounded,
    delta_ppl_ci,
    distinct_resamples,
    half_width,
    percentile_interval,
    recovered_pct_ci,
    resample_indices,
)


def plain_percentile(values: list[float], q: float) -> float:
    """The q-th percentile with linear interpolation between order statistics (numpy's default), by hand."""
    ordered = sorted(values)
    pos = q / 100 * (len(ordered) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def plain_ppl(losses: list[float], rows: list[int]) -> float:
    return math.exp(sum(losses[i] for i in rows) / len(rows))


def losses_of(n: int, seed: int, shift: float = 0.0, noise: float = 0.05) -> tuple[list[float], list[float]]:
    """Per-block losses of a baseline and of a configuration that is worse by ``shift`` plus block noise."""
    rng = random.Random(seed)
    base = [rng.gauss(3.0, 0.4) for _ in range(n)]
    return base, [b + shift + rng.gauss(0.0, noise) for b in base]


def test_indices_are_seeded_and_none_below_the_minimum():
    a, b = resample_indices(9, seed=3), resample_indices(9, seed=3)
    assert a.shape == (BOOTSTRAP_RESAMPLES, 9) and np.array_equal(a, b)
    assert a.min() >= 0 and a.max() <= 8
    assert not np.array_equal(a, resample_indices(9, seed=4))
    assert MIN_BLOCKS == 8 and resample_indices(8, seed=3) is not None
    for n in (1, 2, 4, 7):
        assert resample_indices(n, seed=3) is None
    assert delta_ppl_ci([2.0], [2.5], None) is None and recovered_pct_ci([2.0], [2.5], [2.2], None) is None


def test_intervals_equal_a_loop_over_the_same_resamples():
    base, top1 = losses_of(12, seed=1, shift=0.10)
    _, lowrank = losses_of(12, seed=1, shift=0.03)
    indices = resample_indices(12, seed=42)
    deltas, recovered = [], []
    for row in indices.tolist():  # one resample: the same blocks for all three configurations (paired)
        p_base, p_top1, p_c = plain_ppl(base, row), plain_ppl(top1, row), plain_ppl(lowrank, row)
        deltas.append(p_c - p_base)
        recovered.append((p_top1 - p_c) / max(p_top1 - p_base, 1e-9) * 100)
    want_delta = [plain_percentile(deltas, 2.5), plain_percentile(deltas, 97.5)]
    want_recovered = [plain_percentile(recovered, 2.5), plain_percentile(recovered, 97.5)]
    assert delta_ppl_ci(base, lowrank, indices) == pytest.approx(want_delta, rel=1e-12)
    assert recovered_pct_ci(base, top1, lowrank, indices) == pytest.approx(want_recovered, rel=1e-12)


def test_pairing_removes_the_shared_block_variation():
    """A configuration worse by a constant loss on every block: its ΔPPL interval is narrow, though the blocks'
    own perplexities vary a lot (an unpaired bootstrap would be as wide as that variation)."""
    base, config = losses_of(30, seed=2, shift=0.05, noise=0.0)
    indices = resample_indices(30, seed=0)
    lo, hi = delta_ppl_ci(base, config, indices)
    ppl_lo, ppl_hi = percentile_interval(np.exp(np.asarray(base)[indices].mean(axis=1)))
    assert 0 < lo < hi and hi - lo < 0.2 * (ppl_hi - ppl_lo)


def test_intervals_shrink_as_the_blocks_grow():
    """The interval of a mean shrinks as 1/sqrt(n): four times the blocks, about half the width."""
    def width(n):
        base, config = losses_of(n, seed=5, shift=0.02, noise=0.1)
        lo, hi = delta_ppl_ci(base, config, resample_indices(n, seed=1))
        return hi - lo

    w, w4, w16 = width(50), width(blocks_to_halve(50)), width(blocks_to_halve(blocks_to_halve(50)))
    assert 0.35 < w4 / w < 0.65 and 0.35 < w16 / w4 < 0.65


def test_non_finite_values_give_no_interval():
    assert percentile_interval(np.array([1.0, math.nan, 2.0])) is None
    assert percentile_interval(np.array([1.0, math.inf])) is None
    assert percentile_interval(np.arange(101.0)) == pytest.approx([2.5, 97.5])


def test_distinct_resamples_count_multisets():
    """C(2n − 1, n): the multisets of n blocks out of n, counted here by enumerating sorted index tuples."""
    import itertools

    for n in range(1, 7):
        assert distinct_resamples(n) == len(set(itertools.combinations_with_replacement(range(n), n)))
    assert [distinct_resamples(n) for n in (2, 4, 8)] == [3, 35, 6435]
    assert distinct_resamples(MIN_BLOCKS) > BOOTSTRAP_RESAMPLES  # the minimum's draws are not all repeats


@pytest.mark.parametrize("interval, want", [
    ([108.8, 47028434469.07], [108.8, None]),  # issue 32's bound: unbounded above, not 4.7e10
    ([-5e6, 40.0], [None, 40.0]), ([-2e3, 3e3], [None, None]), ([-999.0, 999.0], [-999.0, 999.0]),
    ([1500.0, 4e4], [RECOVERED_PCT_LIMIT, None]),  # all of it above the limit: "at least 1000"
    ([-4e4, -1500.0], [None, -RECOVERED_PCT_LIMIT]), (None, None)])
def test_unsupported_bounds_are_null(interval, want):
    assert bounded(interval, RECOVERED_PCT_LIMIT) == want


def test_recovered_interval_with_a_vanishing_top1_loss_is_unbounded_and_json_safe():
    """Top-1 loses ~nothing on some resamples: the ratio's bound is null (JSON has no inf), never 1e10."""
    import json

    base = [3.0, 2.8, 3.1, 2.9, 3.3, 3.0, 2.7, 3.2]
    top1 = [b + d for b, d in zip(base, [0.2, -0.2, 0.15, -0.1, 0.2, -0.15, 0.1, -0.19])]
    config = [b - 0.05 for b in base]
    ci = recovered_pct_ci(base, top1, config, resample_indices(8, seed=0))
    assert ci is not None and None in ci
    assert all(v is None or abs(v) <= RECOVERED_PCT_LIMIT for v in ci)
    assert json.loads(json.dumps(ci)) == ci
    assert half_width(ci) == math.inf and half_width([10.0, 30.0]) == 10.0 and half_width(None) is None

"""What a result's numbers say (nqpq.results.verdict), as pure functions on numbers: curve entries, draws, the interval
mark, the residual spectrum, the baseline check and the bootstrap summary, each against values worked out here
independently (float64, by hand)."""

from __future__ import annotations

import math
import statistics

import numpy as np
import pytest
import torch

from nqpq.errors import NqpqError
from nqpq.experiments.calibration import basis_from_grams
from nqpq.experiments.config import SweepConfig
from nqpq.results.stats import BOOTSTRAP_RESAMPLES, CI_LEVEL, resample_indices
from nqpq.results.verdict import (
    RECOVERY_TARGET,
    bootstrap_info,
    crosses_target,
    curve_entry,
    finite_baseline,
    residual_spectrum,
    with_draws,
)


def ppl(losses: list[float]) -> float:
    return math.exp(statistics.fmean(losses))


def test_curve_entry_is_the_spec_arithmetic_with_paired_intervals():
    base, top1, lowrank = [2.0, 2.5, 3.0, 2.2], [2.6, 3.1, 3.3, 2.9], [2.1, 2.6, 3.05, 2.3]
    t = {k: torch.tensor(v, dtype=torch.float64) for k, v in (("b", base), ("a", top1), ("c", lowrank))}
    indices = resample_indices(len(base), seed=3)
    e = curve_entry(8, t["c"], t["b"], t["a"], indices)
    assert e["d_r"] == 8 and e["block_losses"] == lowrank
    assert e["ppl"] == pytest.approx(ppl(lowrank), rel=1e-12)
    assert e["delta_ppl"] == pytest.approx(ppl(lowrank) - ppl(base), rel=1e-12)
    want = (ppl(top1) - ppl(lowrank)) / (ppl(top1) - ppl(base)) * 100
    assert e["recovered_pct"] == pytest.approx(want, rel=1e-12)
    # The intervals: percentiles of the same statistics on the same resamples of the blocks, paired.
    b, a, c = (np.array(x) for x in (base, top1, lowrank))
    rb, ra, rc = (np.exp(x[indices].mean(axis=1)) for x in (b, a, c))
    lo, hi = (1 - CI_LEVEL) / 2 * 100, (1 + CI_LEVEL) / 2 * 100
    assert e["delta_ppl_ci95"] == pytest.approx(list(np.percentile(rc - rb, [lo, hi])), rel=1e-12)
    assert e["recovered_pct_ci95"] == pytest.approx(list(np.percentile((ra - rc) / (ra - rb) * 100, [lo, hi])),
                                                    rel=1e-12)


def test_curve_entry_without_loss_or_intervals():
    same = torch.tensor([2.0, 2.5], dtype=torch.float64)
    e = curve_entry(1, same + 0.1, same, same, resample_indices(2, seed=0))
    assert e["recovered_pct"] is None and e["recovered_pct_ci95"] is None  # top-1 loses nothing: no ratio
    assert e["delta_ppl_ci95"] is not None
    one = torch.tensor([2.0], dtype=torch.float64)
    e = curve_entry(1, one + 0.1, one, one + 0.3, resample_indices(1, seed=0))  # one block: no bootstrap
    assert e["delta_ppl_ci95"] is None and e["recovered_pct_ci95"] is None
    assert e["recovered_pct"] == pytest.approx((math.exp(2.3) - math.exp(2.1)) / (math.exp(2.3) - math.exp(2.0))
                                               * 100, rel=1e-12)


def entry(d_r: int, recovered: float | None) -> dict:
    return {"d_r": d_r, "recovered_pct": recovered, "ppl": 1.0}


def test_with_draws_keeps_draw_0_and_measures_the_spread():
    draws = [{"curve": [entry(1, 40.0), entry(4, 95.0)]}, {"curve": [entry(1, 55.5), entry(4, 91.0)]},
             {"curve": [entry(1, 47.0), entry(4, 99.0)]}]
    curve = with_draws(draws)
    assert [c["recovered_pct"] for c in curve] == [40.0, 95.0]  # the headline is draw 0's
    assert [c["recovered_pct_draws"] for c in curve] == [[40.0, 55.5, 47.0], [95.0, 91.0, 99.0]]
    assert [c["recovered_pct_spread"] for c in curve] == [15.5, 8.0]


@pytest.mark.parametrize("values", [[40.0], [40.0, None], [40.0, math.nan], [math.inf, 40.0]])
def test_with_draws_has_no_spread_with_one_draw_or_a_value_missing(values):
    curve = with_draws([{"curve": [entry(2, v)]} for v in values])
    assert curve[0]["recovered_pct_spread"] is None
    assert curve[0]["recovered_pct_draws"] == pytest.approx(values, nan_ok=True)


@pytest.mark.parametrize("ci, mark", [(None, ""), ([80.0, 89.9], ""), ([80.0, 90.0], "*"), ([89.9, 95.0], "*"),
                                      ([90.0, 95.0], ""), ([-300.0, 400.0], "*")])
def test_crosses_target_marks_intervals_with_90_inside(ci, mark):
    assert RECOVERY_TARGET == 90.0
    assert crosses_target({"recovered_pct_ci95": ci}) == mark


def test_residual_spectrum_lists_every_head_and_the_mean_r90():
    # Diagonal Grams: the eigenvalues are the diagonal, so the cumulative variance and r90 are known by hand.
    spectra = {3: [[5.0, 4.5, 0.5], [1.0, 0.0, 0.0]], 7: [[1.0, 1.0, 1.0], [9.5, 0.25, 0.25]]}
    grams = {layer: torch.stack([torch.diag(torch.tensor(s, dtype=torch.float64)) for s in heads])
             for layer, heads in spectra.items()}
    entries, mean_r90 = residual_spectrum(basis_from_grams(grams))
    want = []
    for layer in (3, 7):
        for head, s in enumerate(spectra[layer]):
            cv = [sum(s[: r + 1]) / sum(s) for r in range(len(s))]
            want.append((layer, head, cv, 1 + sum(v < 0.9 for v in cv)))
    assert [(e["layer"], e["head"], e["r90"]) for e in entries] == [(w[0], w[1], w[3]) for w in want]
    for e, w in zip(entries, want):
        assert e["cumulative_variance"] == pytest.approx(w[2], rel=1e-12)
    assert [w[3] for w in want] == [2, 1, 3, 1]  # no cumulative variance sits at 0.9 exactly
    assert mean_r90 == statistics.mean([2, 1, 3, 1])


def test_finite_baseline_passes_numbers_and_refuses_nan_or_inf():
    assert finite_baseline(12.5, torch.float16) == 12.5
    for bad in (math.nan, math.inf):
        with pytest.raises(NqpqError, match=f"baseline perplexity is {bad}.*float16"):
            finite_baseline(bad, torch.float16)


def test_bootstrap_info_names_the_method_and_its_settings():
    assert bootstrap_info(SweepConfig(seed=7, n_blocks=12)) == {
        "method": "paired percentile bootstrap over the scored blocks", "resamples": BOOTSTRAP_RESAMPLES,
        "level": CI_LEVEL, "seed": 7, "n_blocks": 12}

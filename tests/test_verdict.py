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
from nqpq.results.stats import BOOTSTRAP_RESAMPLES, CI_LEVEL, MIN_BLOCKS, resample_indices
from nqpq.results.verdict import (
    INCONCLUSIVE,
    OUTCOMES,
    RECOVERY_TARGET,
    bootstrap_info,
    crosses_target,
    curve_entry,
    finite_baseline,
    residual_spectrum,
    spectrum_by_layer,
    verdict,
    with_draws,
)


def ppl(losses: list[float]) -> float:
    return math.exp(statistics.fmean(losses))


def test_curve_entry_is_the_spec_arithmetic_with_paired_intervals():
    # 8 blocks (the fewest with intervals); top-1 costs 0.3-0.7 nats on every block: a measurable loss.
    base = [2.0, 2.5, 3.0, 2.2, 2.7, 1.9, 2.4, 2.8]
    top1 = [2.6, 3.1, 3.3, 2.9, 3.2, 2.5, 2.9, 3.3]
    lowrank = [2.1, 2.6, 3.05, 2.3, 2.75, 2.0, 2.5, 2.85]
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
    same = torch.tensor([2.0, 2.5, 2.2, 2.9, 3.1, 2.4, 2.6, 2.3], dtype=torch.float64)
    e = curve_entry(1, same + 0.1, same, same, resample_indices(8, seed=0))
    assert e["recovered_pct"] is None and e["recovered_pct_ci95"] is None  # top-1 loses nothing: no ratio
    assert e["delta_ppl_ci95"] is not None
    # Top-1 costs +0.3 on half the blocks and -0.3 on the other half: its interval holds 0, so no ratio either,
    # though the point estimate (a sum of exp differences) is not 0.
    noisy = same + torch.tensor([0.3, -0.3] * 4, dtype=torch.float64)
    e = curve_entry(1, same + 0.1, same, noisy, resample_indices(8, seed=0))
    assert e["recovered_pct"] is None and e["recovered_pct_ci95"] is None
    for n in (1, 2, MIN_BLOCKS - 1):  # below MIN_BLOCKS: no interval, so top-1's loss is never measurable
        few = torch.arange(n, dtype=torch.float64) / 10 + 2.0
        e = curve_entry(1, few + 0.1, few, few + 0.3, resample_indices(n, seed=0))
        assert e["delta_ppl_ci95"] is None and e["recovered_pct_ci95"] is None and e["recovered_pct"] is None


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
    basis = basis_from_grams(grams)
    entries, mean_r90 = residual_spectrum(basis.cumulative_variance, basis.r90)
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
    assert bootstrap_info(seed=7, n_blocks=12) == {
        "method": "paired percentile bootstrap over the scored blocks", "resamples": BOOTSTRAP_RESAMPLES,
        "level": CI_LEVEL, "seed": 7, "n_blocks": 12, "min_blocks": 8, "distinct_resamples": 1352078}


def test_verdict_imports_only_numbers():
    """nqpq.results.verdict is numbers only: of nqpq it imports errors and stats, nothing that loads a model
    (calibration, config, evaluate), so the verdict can be re-derived without the model stack."""
    import ast
    from pathlib import Path

    import nqpq.results.verdict

    tree = ast.parse(Path(nqpq.results.verdict.__file__).read_text(encoding="utf-8"))
    modules = {("." * node.level) + (node.module or "") for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    modules |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    assert modules == {"__future__", "collections.abc", "math", "statistics", "torch", "..errors", ".stats"}


# The rule (docs/verdict.md) at issue 32's numbers: SmolLM2-135M layer 27, top-1 dPPL +0.070, 95% CI
# [-0.286, +0.336]; d_r=8 "recovered 569.9 %, CI [108.8, 4.7e10]". Before: YES, settled.
ISSUE_CURVE = [{"d_r": 8, "ppl": 20.190 - 0.3989, "recovered_pct": 569.9, "recovered_pct_ci95": [108.8, None]},
               {"d_r": 32, "ppl": 20.190 - 0.35, "recovered_pct": 500.0, "recovered_pct_ci95": [95.0, None]}]


@pytest.mark.parametrize("n_blocks, reason", [(4, "too_few_blocks"), (30, "no_measurable_loss")])
def test_issue_numbers_are_inconclusive(n_blocks, reason):
    v = verdict(ISSUE_CURVE, 20.120, 20.190, top1_ci=[-0.286, 0.336], n_blocks=n_blocks)
    assert v["outcome"] == INCONCLUSIVE == "INCONCLUSIVE" and v["reason"] == reason
    assert v["compressible"] is None and v["settled"] is False and v["d_r_min"] is None
    assert v["recovered_pct"] is None and v["ci95"] is None and v["best_recovered_pct"] is None
    if reason == "no_measurable_loss":
        assert v["explanation"] == "top-1 loses nothing measurable at this setting: ΔPPL CI [-0.286, +0.336]"
    else:
        assert v["explanation"].startswith("4 scored blocks support no interval (a paired bootstrap over 4 has 35 "
                                           "distinct resamples; intervals need at least 8 blocks)")


@pytest.mark.parametrize("n_blocks", [1, 2, 4, 7])
def test_few_blocks_never_settle_even_with_intervals_given(n_blocks):
    """Below MIN_BLOCKS the verdict is INCONCLUSIVE and never settled, whatever intervals a caller passes."""
    curve = [{"d_r": 8, "ppl": 20.5, "recovered_pct": 95.0, "recovered_pct_ci95": [92.0, 98.0]}]
    v = verdict(curve, 20.0, 30.0, top1_ci=[9.0, 11.0], n_blocks=n_blocks)
    assert (v["outcome"], v["reason"], v["settled"]) == ("INCONCLUSIVE", "too_few_blocks", False)
    assert verdict(curve, 20.0, 30.0, top1_ci=[9.0, 11.0], n_blocks=MIN_BLOCKS)["settled"] is True


def test_outcomes_are_a_named_set():
    assert OUTCOMES == ("YES", "PARTIAL", "INCONCLUSIVE")
    measured = [{"d_r": 1, "ppl": 29.0, "recovered_pct": 10.0, "recovered_pct_ci95": [5.0, 15.0]},
                {"d_r": 4, "ppl": 20.5, "recovered_pct": 95.0, "recovered_pct_ci95": [91.0, None]}]
    yes = verdict(measured, 20.0, 30.0, top1_ci=[9.0, 11.0], n_blocks=30)
    assert (yes["outcome"], yes["compressible"], yes["d_r_min"], yes["settled"]) == ("YES", True, 4, True)
    partial = verdict(measured[:1], 20.0, 30.0, top1_ci=[9.0, 11.0], n_blocks=30)
    assert (partial["outcome"], partial["compressible"], partial["settled"]) == ("PARTIAL", False, True)
    # An upper bound that is unbounded reaches 90 %: PARTIAL, not settled.
    open_top = [{**measured[0], "recovered_pct_ci95": [5.0, None]}]
    assert verdict(open_top, 20.0, 30.0, top1_ci=[9.0, 11.0], n_blocks=30)["settled"] is False
    # d_r_min's lower bound unbounded: YES, not settled.
    open_bottom = [{**measured[1], "recovered_pct_ci95": [None, 120.0]}]
    assert verdict(open_bottom, 20.0, 30.0, top1_ci=[9.0, 11.0], n_blocks=30)["settled"] is False


@pytest.mark.parametrize("ci, mark", [([None, 95.0], "*"), ([80.0, None], "*"), ([91.0, None], ""),
                                      ([None, 89.0], ""), ([None, None], "*")])
def test_crosses_target_reads_unbounded_sides(ci, mark):
    assert crosses_target({"recovered_pct_ci95": ci}) == mark


def test_spectrum_by_layer_is_the_mean_over_heads_and_head_0():
    spectrum = [{"layer": 5, "head": 1, "cumulative_variance": [0.5, 0.9, 1.0]},
                {"layer": 5, "head": 0, "cumulative_variance": [0.2, 0.6, 1.0]},
                {"layer": 2, "head": 0, "cumulative_variance": [0.7, 0.95, 1.0]}]
    by_layer = spectrum_by_layer(spectrum)
    assert list(by_layer) == [2, 5]
    assert by_layer[5]["mean"] == pytest.approx([0.35, 0.75, 1.0], rel=1e-15)
    assert by_layer[5]["head0"] == [0.2, 0.6, 1.0] and by_layer[5]["heads"] == 2
    assert by_layer[5]["min"] == [0.2, 0.6, 1.0] and by_layer[5]["max"] == [0.5, 0.9, 1.0]

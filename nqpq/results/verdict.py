"""What a run's numbers say: recovered %, the curve entries and their draws, the bootstrap summary, the residual
spectrum, and the verdict with its ``settled`` rule (docs/verdict.md).

Pure functions on numbers (per-block losses, perplexities, the basis's spectra as tensors): no model, no printing,
no settings object. The report's text about them is in ``nqpq.results.report_lines``; the intervals come from
``nqpq.results.stats``.

The rule: "recovered %" of top-1's loss is defined only where that loss is measurable, i.e. top-1's paired
bootstrap interval of ΔPPL (top-1 minus baseline) lies above ``NO_LOSS_REL`` × the baseline PPL (in practice:
excludes 0). Where it is not, or where there are too few blocks for an interval (``nqpq.results.stats.MIN_BLOCKS``),
or a perplexity is not finite, every recovered % is null and the verdict's outcome is INCONCLUSIVE, with
``compressible`` null (the test made no claim either way; false would read as PARTIAL's "not compressible") and
``settled`` false. Otherwise the spec's rule: YES when some d_r recovers >= 90 %, else PARTIAL.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence

import torch

from ..errors import NqpqError
from .stats import (
    BOOTSTRAP_RESAMPLES,
    CI_LEVEL,
    MIN_BLOCKS,
    delta_ppl_ci,
    distinct_resamples,
    ppl_from_losses,
    recovered_pct_ci,
)

RECOVERY_TARGET = 90.0  # % of the top-1 loss a rank must recover to call the residual compressible
# The minimum effect: top-1's ΔPPL and the low end of its interval must exceed this fraction of the baseline PPL.
# It sits at the rounding of the losses, not at a scientific threshold: the interval is what decides.
NO_LOSS_REL = 1e-6

# The verdict's outcomes (results.json's verdict["outcome"]).
YES, PARTIAL, INCONCLUSIVE = "YES", "PARTIAL", "INCONCLUSIVE"
OUTCOMES = (YES, PARTIAL, INCONCLUSIVE)

# Why a verdict is INCONCLUSIVE (verdict["reason"]); verdict["explanation"] says it in words.
NOT_FINITE = "not_finite"  # a crystallized perplexity is NaN or inf (an overflow in the model's dtype)
TOO_FEW_BLOCKS = "too_few_blocks"  # fewer than MIN_BLOCKS scored blocks: no interval, so no measurable loss
NO_MEASURABLE_LOSS = "no_measurable_loss"  # top-1's ΔPPL interval reaches 0 (or below the minimum effect)
REASONS = (NOT_FINITE, TOO_FEW_BLOCKS, NO_MEASURABLE_LOSS)
NOT_FINITE_TEXT = "a crystallized perplexity is not finite (NaN or inf); the test is inconclusive"

Interval = Sequence[float | None] | None


def top1_loss_measured(ppl_baseline: float, ppl_top1: float, top1_ci: Interval) -> bool:
    """Whether top-1 loses something measurable: its ΔPPL and the low end of its 95 % interval both above
    ``NO_LOSS_REL`` × the baseline PPL. No interval (too few blocks, or a non-finite loss): not measured."""
    if top1_ci is None or top1_ci[0] is None or not math.isfinite(ppl_top1):
        return False
    floor = NO_LOSS_REL * ppl_baseline
    return ppl_top1 - ppl_baseline > floor and top1_ci[0] > floor


def recovered_pct(ppl_baseline: float, ppl_top1: float, ppl_c: float, top1_ci: Interval) -> float | None:
    """The spec's "% of the top-1 loss recovered" by a configuration of PPL ``ppl_c``; None where top-1's loss is
    not measurable (``top1_loss_measured``): a percentage of a loss lost in noise is noise divided by ~0."""
    if not top1_loss_measured(ppl_baseline, ppl_top1, top1_ci):
        return None
    return (ppl_top1 - ppl_c) / max(ppl_top1 - ppl_baseline, 1e-9) * 100


def crosses_target(entry: dict) -> str:
    """"*" when the entry's recovered-% interval has 90 % inside it (the data cannot tell which side it is on); an
    unbounded side (None) reaches past anything."""
    ci = entry["recovered_pct_ci95"]
    if ci is None:
        return ""
    lo = -math.inf if ci[0] is None else ci[0]
    hi = math.inf if ci[1] is None else ci[1]
    return "*" if lo < RECOVERY_TARGET <= hi else ""


def curve_entry(d_r: int, losses: torch.Tensor, base_losses: torch.Tensor, top1_losses: torch.Tensor,
                indices) -> dict:
    """One low-rank configuration's results: PPL, ΔPPL and recovered %, their paired bootstrap intervals
    (``nqpq.results.stats``; None below ``MIN_BLOCKS`` blocks) and its per-block losses. Recovered % and its interval
    are None where top-1's own loss is not measurable on these blocks."""
    ppl_fp, ppl_a, ppl_c = (ppl_from_losses(x) for x in (base_losses, top1_losses, losses))
    recovered = recovered_pct(ppl_fp, ppl_a, ppl_c, delta_ppl_ci(base_losses, top1_losses, indices))
    return {"d_r": d_r, "ppl": ppl_c, "delta_ppl": ppl_c - ppl_fp, "recovered_pct": recovered,
            "delta_ppl_ci95": delta_ppl_ci(base_losses, losses, indices),
            "recovered_pct_ci95": None if recovered is None else recovered_pct_ci(base_losses, top1_losses, losses,
                                                                                    indices),
            "block_losses": losses.tolist()}


def with_draws(draws: list[dict]) -> list[dict]:
    """The headline curve, draw 0's, each entry with every draw's recovered % and their spread (max − min; None
    with one draw or where a value is n/a)."""
    curve = []
    for j, entry in enumerate(draws[0]["curve"]):
        per_draw = [d["curve"][j]["recovered_pct"] for d in draws]
        finite = len(per_draw) > 1 and all(r is not None and math.isfinite(r) for r in per_draw)
        curve.append({**entry, "recovered_pct_draws": per_draw,
                      "recovered_pct_spread": max(per_draw) - min(per_draw) if finite else None})
    return curve


def bootstrap_info(seed: int, n_blocks: int) -> dict:
    """results.json's ``bootstrap``: how the intervals were computed (``nqpq.results.stats``), and the fewest blocks
    that get one."""
    return {"method": "paired percentile bootstrap over the scored blocks", "resamples": BOOTSTRAP_RESAMPLES,
            "level": CI_LEVEL, "seed": seed, "n_blocks": n_blocks, "min_blocks": MIN_BLOCKS,
            "distinct_resamples": distinct_resamples(n_blocks)}


def residual_spectrum(cumulative_variance: Mapping[int, torch.Tensor],
                      r90: Mapping[int, torch.Tensor]) -> tuple[list[dict], float]:
    """Per (layer, head), layers in increasing order: cumulative variance of ε (``[H, D]`` per layer) and r90
    (``[H]``); and the mean r90 over every head."""
    spectrum = []
    for layer in sorted(cumulative_variance):
        cv_all, r90_all = cumulative_variance[layer], r90[layer]
        for head in range(cv_all.shape[0]):
            spectrum.append({"layer": layer, "head": head, "cumulative_variance": cv_all[head].tolist(),
                             "r90": int(r90_all[head])})
    return spectrum, statistics.mean(s["r90"] for s in spectrum)


def spectrum_by_layer(spectrum: list[dict]) -> dict[int, dict]:
    """Per layer: the cumulative variance of ε averaged over the layer's heads ("mean", a list over r), its min and
    max over the heads, head 0's ("head0", the printed table's other row) and the number of heads ("heads")."""
    by_layer: dict[int, list[list[float]]] = {}
    for s in sorted(spectrum, key=lambda s: (s["layer"], s["head"])):
        by_layer.setdefault(s["layer"], []).append(s["cumulative_variance"])
    return {layer: {"mean": [sum(col) / len(col) for col in zip(*curves)], "min": [min(col) for col in zip(*curves)],
                    "max": [max(col) for col in zip(*curves)], "head0": curves[0], "heads": len(curves)}
            for layer, curves in sorted(by_layer.items())}


def finite_baseline(ppl: float, dtype: torch.dtype) -> float:
    """``ppl``, the baseline perplexity, or an ``NqpqError`` when it is NaN or infinite: every comparison with it
    would be NaN too, and a verdict drawn from NaNs says nothing."""
    if not math.isfinite(ppl):
        raise NqpqError(f"the baseline perplexity is {ppl}: the model's own forward gives non-finite losses on these "
                        f"blocks (an overflow in {str(dtype).removeprefix('torch.')}, or non-finite weights); there is "
                        "nothing to compare the crystallized layers with")
    return ppl


def smallest_recovering(curve: list[dict]) -> int | None:
    """The smallest d_r recovering >= 90 % of top-1's loss (the spec's d_r_min); None if none, or if recovered %
    is n/a (top-1's loss not measurable)."""
    good = [c["d_r"] for c in curve if c["recovered_pct"] is not None and c["recovered_pct"] >= RECOVERY_TARGET]
    return min(good) if good else None


def inconclusive_reason(curve: list[dict], ppl_baseline: float, ppl_top1: float, top1_ci: Interval,
                        n_blocks: int) -> tuple[str, str] | None:
    """``(reason, explanation)`` when the verdict must be INCONCLUSIVE (``REASONS``), else None."""
    if not all(math.isfinite(p) for p in (ppl_top1, *(c["ppl"] for c in curve))):
        return NOT_FINITE, NOT_FINITE_TEXT
    if n_blocks < MIN_BLOCKS or top1_ci is None:
        return TOO_FEW_BLOCKS, (
            f"{n_blocks} scored block{'s' * (n_blocks != 1)} support no interval (a paired bootstrap over "
            f"{n_blocks} has {distinct_resamples(n_blocks)} distinct resamples; intervals need at least {MIN_BLOCKS} "
            "blocks), so top-1's loss cannot be told from noise")
    if not top1_loss_measured(ppl_baseline, ppl_top1, top1_ci):
        lo, hi = top1_ci
        return NO_MEASURABLE_LOSS, f"top-1 loses nothing measurable at this setting: ΔPPL CI [{lo:+.3f}, {hi:+.3f}]"
    return None


def verdict(curve: list[dict], ppl_baseline: float, ppl_top1: float, *, top1_ci: Interval, n_blocks: int,
            draws_d_r_min: list[int | None] | None = None) -> dict:
    """The verdict: ``outcome`` in ``OUTCOMES``, with d_r_min (YES) or the best d_r (PARTIAL) and its interval.

    INCONCLUSIVE (``inconclusive_reason``): ``compressible`` null, every number null, ``settled`` false, and
    ``reason`` / ``explanation`` say why. Otherwise the spec's rule, the smallest d_r recovering >= 90 % (YES,
    ``compressible`` true) or else the best d_r (PARTIAL, ``compressible`` false). ``recovered_pct`` / ``ci95``:
    d_r_min's (YES) or the best d_r's (PARTIAL) recovered % and 95 % interval (a bound None where unbounded).
    ``settled``: YES with d_r_min's whole interval >= 90, or PARTIAL with every interval below 90, and, with several
    calibration draws (``draws_d_r_min``, each draw's own d_r_min), every draw agreeing.
    """
    several = draws_d_r_min is not None and len(draws_d_r_min) > 1
    extra = {"n_blocks": n_blocks, "draws_d_r_min": draws_d_r_min, "top1_delta_ppl_ci95": top1_ci}
    inconclusive = inconclusive_reason(curve, ppl_baseline, ppl_top1, top1_ci, n_blocks)
    if inconclusive is not None:
        reason, explanation = inconclusive
        return {"outcome": INCONCLUSIVE, "compressible": None, "d_r_min": None, "best_d_r": None,
                "best_recovered_pct": None, "recovered_pct": None, "ci95": None, "settled": False,
                "draws_agree": None, **extra, "reason": reason, "explanation": explanation}
    best = max(curve, key=lambda c: c["recovered_pct"])
    dr_min = smallest_recovering(curve)
    agree = all(d == dr_min for d in draws_d_r_min) if several else None
    if dr_min is not None:
        chosen = next(c for c in curve if c["d_r"] == dr_min)
        ci = chosen.get("recovered_pct_ci95")
        settled = ci is not None and ci[0] is not None and ci[0] >= RECOVERY_TARGET
    else:
        chosen, ci = best, best.get("recovered_pct_ci95")
        cis = [c.get("recovered_pct_ci95") for c in curve]
        settled = all(i is not None and i[1] is not None and i[1] < RECOVERY_TARGET for i in cis)
    return {"outcome": YES if dr_min is not None else PARTIAL, "compressible": dr_min is not None,
            "d_r_min": dr_min, "best_d_r": best["d_r"], "best_recovered_pct": best["recovered_pct"],
            "recovered_pct": chosen["recovered_pct"], "ci95": ci, "settled": settled and agree is not False,
            "draws_agree": agree, **extra, "reason": None, "explanation": None}

"""What a run's numbers say: recovered %, the curve entries and their draws, the bootstrap summary, the residual
spectrum, and the verdict with its ``settled`` rule.

Pure functions on numbers (per-block losses, perplexities, a fitted basis): no model, no printing. The report's
text about them is in ``nqpq.report``; the intervals themselves come from ``nqpq.stats``.
"""

from __future__ import annotations

import math
import statistics

import torch

from ..errors import NqpqError
from ..experiments.calibration import ResidualBasis
from ..experiments.config import SweepConfig
from ..model.losses import ppl_from_losses
from .stats import BOOTSTRAP_RESAMPLES, CI_LEVEL, delta_ppl_ci, recovered_pct_ci

RECOVERY_TARGET = 90.0  # % of the top-1 loss a rank must recover to call the residual compressible
# At or below this fraction of the baseline PPL, top-1 loses nothing measurable: "recovered %" of a
# loss that is not there is noise divided by ~0, so it is reported as null and the verdict as inconclusive.
NO_LOSS_REL = 1e-6
INCONCLUSIVE = "top-1 loses nothing here; the test is inconclusive"
# A crystallized perplexity that is NaN or infinite (an overflow in the model's dtype) recovers nothing measurable.
NOT_FINITE = "a crystallized perplexity is not finite (NaN or inf); the test is inconclusive"


def top1_loses_nothing(ppl_baseline: float, ppl_top1: float) -> bool:
    """Whether top-1's perplexity cost is at or below ``NO_LOSS_REL`` of the baseline (nothing to recover)."""
    return ppl_top1 - ppl_baseline <= NO_LOSS_REL * ppl_baseline


def recovered_pct(ppl_baseline: float, ppl_top1: float, ppl_c: float) -> float | None:
    """The spec's "% of the top-1 loss recovered" by a configuration of PPL ``ppl_c``; None when there is no loss."""
    if top1_loses_nothing(ppl_baseline, ppl_top1):
        return None
    return (ppl_top1 - ppl_c) / max(ppl_top1 - ppl_baseline, 1e-9) * 100


def crosses_target(entry: dict) -> str:
    """"*" when the entry's recovered-% interval has 90 % inside it (the data cannot tell which side it is on)."""
    ci = entry["recovered_pct_ci95"]
    return "*" if ci is not None and ci[0] < RECOVERY_TARGET <= ci[1] else ""



def curve_entry(d_r: int, losses: torch.Tensor, base_losses: torch.Tensor, top1_losses: torch.Tensor,
                indices) -> dict:
    """One low-rank configuration's results: PPL, ΔPPL and recovered %, their paired bootstrap intervals
    (``nqpq.stats``; None with one scored block) and its per-block losses."""
    ppl_fp, ppl_a, ppl_c = (ppl_from_losses(x) for x in (base_losses, top1_losses, losses))
    recovered = recovered_pct(ppl_fp, ppl_a, ppl_c)
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


def bootstrap_info(cfg: SweepConfig) -> dict:
    """results.json's ``bootstrap``: how the intervals were computed (``nqpq.stats``)."""
    return {"method": "paired percentile bootstrap over the scored blocks", "resamples": BOOTSTRAP_RESAMPLES,
            "level": CI_LEVEL, "seed": cfg.seed, "n_blocks": cfg.n_blocks}


def residual_spectrum(basis: ResidualBasis) -> tuple[list[dict], float]:
    """Per (layer, head): cumulative variance of ε and r90; and the mean r90."""
    spectrum = []
    for layer in basis.layers:
        cv_all, r90_all = basis.cumulative_variance[layer], basis.r90[layer]
        for head in range(cv_all.shape[0]):
            spectrum.append({"layer": layer, "head": head, "cumulative_variance": cv_all[head].tolist(),
                             "r90": int(r90_all[head])})
    return spectrum, statistics.mean(s["r90"] for s in spectrum)


def finite_baseline(ppl: float, dtype: torch.dtype) -> float:
    """``ppl``, the baseline perplexity, or an ``NqpqError`` when it is NaN or infinite: every comparison with it
    would be NaN too, and a verdict drawn from NaNs says nothing."""
    if not math.isfinite(ppl):
        raise NqpqError(f"the baseline perplexity is {ppl}: the model's own forward gives non-finite losses on these "
                        f"blocks (an overflow in {str(dtype).removeprefix('torch.')}, or non-finite weights); there is "
                        "nothing to compare the crystallized layers with")
    return ppl


def verdict(curve: list[dict], ppl_baseline: float, ppl_top1: float, *, n_blocks: int | None = None,
             draws_d_r_min: list[int | None] | None = None) -> dict:
    """The spec's verdict (the smallest d_r recovering >= 90 %, else the best d_r) with its interval.

    ``recovered_pct`` / ``ci95``: d_r_min's (YES) or the best d_r's (PARTIAL) recovered % and 95 % interval (None
    without intervals). ``settled``: YES with d_r_min's whole interval >= 90, or PARTIAL with every interval below
    90, and, with several calibration draws (``draws_d_r_min``, each draw's own d_r_min), every draw agreeing.
    """
    if not all(math.isfinite(p) for p in (ppl_top1, *(c["ppl"] for c in curve))):
        explanation = NOT_FINITE
    elif top1_loses_nothing(ppl_baseline, ppl_top1):
        explanation = INCONCLUSIVE
    else:
        explanation = None
    several = draws_d_r_min is not None and len(draws_d_r_min) > 1
    extra = {"n_blocks": n_blocks, "draws_d_r_min": draws_d_r_min}
    if explanation is not None:
        return {"compressible": None, "d_r_min": None, "best_d_r": None, "best_recovered_pct": None,
                "recovered_pct": None, "ci95": None, "settled": None, "draws_agree": None, **extra,
                "explanation": explanation}
    good = [c["d_r"] for c in curve if c["recovered_pct"] >= RECOVERY_TARGET]
    best = max(curve, key=lambda c: c["recovered_pct"])
    dr_min = min(good) if good else None
    agree = all(d == dr_min for d in draws_d_r_min) if several else None
    if dr_min is not None:
        chosen = next(c for c in curve if c["d_r"] == dr_min)
        ci = chosen.get("recovered_pct_ci95")
        settled = ci is not None and ci[0] >= RECOVERY_TARGET
    else:
        chosen, ci = best, best.get("recovered_pct_ci95")
        cis = [c.get("recovered_pct_ci95") for c in curve]
        settled = all(i is not None and i[1] < RECOVERY_TARGET for i in cis)
    return {"compressible": dr_min is not None, "d_r_min": dr_min, "best_d_r": best["d_r"],
            "best_recovered_pct": best["recovered_pct"], "recovered_pct": chosen["recovered_pct"], "ci95": ci,
            "settled": settled and agree is not False, "draws_agree": agree, **extra}

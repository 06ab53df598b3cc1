"""Reading an older results.json under today's rule: a format-2 sweep or scan re-derived as format 3.

Format 2 stored every per-block loss a verdict needs (the baseline's, full's, top-1's per sink setting and each
low-rank configuration's per calibration draw) and the bootstrap's seed; what changed in format 3 is the rule drawn
from them (docs/verdict.md: INCONCLUSIVE where top-1's loss is not measurable, no interval below ``MIN_BLOCKS``
blocks, unbounded recovered-% bounds null). ``upgrade`` recomputes every number that depends on the rule from the
stored losses with the functions the sweep and the scan call (``nqpq.results.verdict``: ``curve_entry``,
``with_draws``, ``verdict``, ``bootstrap_info``), so an upgraded file holds what a format-3 run on the same losses
holds, and marks it ``upgraded_from: 2``. Two labels format 2 never recorded are null: ``config.model_class`` and
``config.model_given``. The results.json on disk is not rewritten.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .stats import delta_ppl_ci, ppl_from_losses, resample_indices
from .verdict import bootstrap_info, curve_entry, smallest_recovering, verdict, with_draws

UPGRADABLE = (2,)  # the older format versions ``upgrade`` reads


def _losses(values: Sequence[float]) -> torch.Tensor:
    """Stored block losses as the float64 tensor the verdict's functions take (``tolist`` of it gives them back)."""
    return torch.tensor(values, dtype=torch.float64)


def _redrawn(old_draws: Sequence[dict], base: torch.Tensor, top1: torch.Tensor, indices) -> list[dict]:
    """Each calibration draw's curve recomputed from its entries' block losses (with its other keys kept)."""
    draws = []
    for d in old_draws:
        curve = [curve_entry(c["d_r"], _losses(c["block_losses"]), base, top1, indices) for c in d["curve"]]
        draws.append({**d, "curve": curve})
    return draws


def _analysis(old: dict, base: torch.Tensor, ppl_fp: float, n_blocks: int, indices, *, sweep: bool) -> dict:
    """One sink setting of a sweep or one layer of a scan: its curve, draws, top-1 interval and verdict recomputed
    from the stored losses, the rest kept."""
    top1 = _losses(old["top1_block_losses"])
    ppl_top1 = ppl_from_losses(top1)
    draws = _redrawn(old["draws"], base, top1, indices)
    if sweep:  # a sweep's draws keep their own d_r_min (a scan's their r90_mean)
        draws = [{**d, "d_r_min": smallest_recovering(d["curve"])} for d in draws]
    curve = with_draws(draws)
    top1_ci = delta_ppl_ci(base, top1, indices)
    return {**old, "ppl_top1": ppl_top1, "top1_delta_ppl_ci95": top1_ci, "curve": curve, "draws": draws,
            "verdict": verdict(curve, ppl_fp, ppl_top1, top1_ci=top1_ci, n_blocks=n_blocks,
                               draws_d_r_min=[smallest_recovering(d["curve"]) for d in draws])}


def upgrade(results: dict, version: int) -> dict:
    """A format-``version`` (2) sweep or scan results dict as format 3, re-derived from its block losses; the input is
    not changed. A file without the losses or keys format 2 wrote raises ``KeyError`` / ``TypeError`` (the caller
    names the file as broken)."""
    if version not in UPGRADABLE:
        raise ValueError(f"format version {version} cannot be upgraded (only {UPGRADABLE})")
    kind = results["kind"]
    base = _losses(results["block_losses"]["baseline"])
    n_blocks, seed = base.numel(), results["bootstrap"]["seed"]
    if results["bootstrap"]["n_blocks"] != n_blocks:
        raise ValueError(f"bootstrap.n_blocks is {results['bootstrap']['n_blocks']} but {n_blocks} baseline block "
                         "losses are stored")
    ppl_fp = ppl_from_losses(base)
    indices = resample_indices(n_blocks, seed)
    config = {**results["config"], "model_class": None, "model_given": None}
    out = {**results, "format_version": 3, "upgraded_from": version, "ppl_baseline": ppl_fp,
           "bootstrap": bootstrap_info(seed, n_blocks), "config": config}
    if kind == "scan":
        sinks = [{**s, "layers": [_analysis(e, base, ppl_fp, n_blocks, indices, sweep=False)
                                  for e in s["layers"]]} for s in results["sinks"]]
        head = next(s for s in sinks if s["sink_tokens"] == results["sink_tokens"])
        out.update(sinks=sinks, layers=head["layers"])
        return out
    analyses = [_analysis(s, base, ppl_fp, n_blocks, indices, sweep=True) for s in results["sinks"]]
    head = next(a for a in analyses if a["sink_tokens"] == results["sink_tokens"])
    full = _losses(results["block_losses"]["full"])
    out.update(sinks=analyses, ppl_top1=head["ppl_top1"], ppl_full=ppl_from_losses(full), curve=head["curve"],
               top1_delta_ppl_ci95=head["top1_delta_ppl_ci95"], full_delta_ppl_ci95=delta_ppl_ci(base, full, indices),
               block_losses={**results["block_losses"], "top1": head["top1_block_losses"]}, draws=head["draws"],
               spectrum=head["spectrum"], mean_eff_dim=head["mean_eff_dim"], verdict=head["verdict"])
    return out


def upgrade_note(results: dict) -> list[str]:
    """The report's line saying that the verdict was re-derived from an older file (none for a current one)."""
    old = results.get("upgraded_from")
    if old is None:
        return []
    return [f" note: a format-{old} results.json, read under format {results['format_version']}'s rule: every "
            "interval, recovered % and verdict re-derived from its stored block losses (docs/verdict.md); the "
            "model's class and whether it was passed in were not recorded"]

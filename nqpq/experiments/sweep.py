"""The EXP-Q03 sweep: baseline, calibration, top-1 / full / low-rank perplexities, verdict.

Fast by construction: the layers below the lowest crystallized layer run once
(``PrefixRunner``), blocks are evaluated in batches, calibration rides along the
baseline pass, and under torchrun the blocks are split across ranks.

This module is the sweep's loop (crystallize, collect); what it shares with its sibling ``nqpq.experiments.scan``
(load, blocks, observe, calibrate, results.json's config) is ``nqpq.experiments.setup``. Its settings and their
checks are in ``nqpq.experiments.config``, the batch size in ``nqpq.experiments.batching``, what
the numbers say (recovered %, verdict) in ``nqpq.results.verdict``, and the printed report in ``nqpq.results.report``.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from ..model.crystallize import crystallize
from ..model.replay import PrefixRunner
from ..results.report import print_sweep_report
from ..results.results_file import SWEEP_FORMAT_VERSION
from ..results.stats import delta_ppl_ci, ppl_from_losses, resample_indices
from ..results.verdict import (
    bootstrap_info,
    curve_entry,
    finite_baseline,
    residual_spectrum,
    smallest_recovering,
    verdict,
    with_draws,
)
from .batching import default_batch_size, gather_losses, plan_batches
from .config import SweepConfig, calibration_source, check_flags
from .heads import heads_for_run
from .op_cost import CostRecorder
from .resume import Checkpoint
from .setup import BaselineObservation, fit_bases, open_run, results_config, run_facts


def run_sweep(
    cfg: SweepConfig,
    *,
    model: torch.nn.Module | None = None,
    ids: torch.Tensor | None = None,
    log: Callable[[str], None] | None = None,
    calib_ids: torch.Tensor | None = None,
    checkpoint: Checkpoint | None = None,
) -> dict:
    """Run EXP-Q03 as configured; print the spec's report; return the results dict.

    Pass ``model`` (a loaded decoder-only causal LM, on the device you want) and ``ids``
    (1-D token ids) to skip loading; the run is then labelled by that model (``given_model_label``), or by
    ``cfg.model`` when it is set, and ``cfg.text_file`` only labels the text.
    The residual basis is fitted where ``cfg.calib_from`` says: by default on the ``calib_blocks`` blocks
    of ``ids`` after the scored ones (``ids`` must hold them); with ``cfg.calib_text_file``, pass that
    text's ids as ``calib_ids``.
    ``cfg.layers`` None means the model's default layers, ``cfg.d_r`` None the spec's ranks up
    to the head dimension; the ranks are swept in increasing order, each once.

    Raises ``NqpqError`` for bad settings or unavailable inputs (the CLI prints it).
    Writing files is the caller's job (``nqpq.results.results_file.write_results``).
    ``checkpoint`` (``nqpq.experiments.resume``): keep each finished configuration there, and take those it holds.
    """
    from tqdm.auto import tqdm

    check_flags(cfg)
    timings: dict = {}
    t0 = time.perf_counter()
    run = open_run(cfg, model, ids, log, "[EXP-Q03]", calib_ids=calib_ids)
    model, device, say, is_main = run.model, run.device, run.say, run.is_main
    facts = run_facts(cfg, run, lambda parts: parts.default_layers if cfg.layers is None else cfg.layers)
    parts, layers, d_rs, sinks, blocks, calibrations = (facts.parts, facts.layers, facts.d_rs, facts.sinks,
                                                        facts.blocks, facts.calibrations)
    timings["load_s"] = time.perf_counter() - t0

    model_dtype = next(model.parameters()).dtype
    batch_size = cfg.batch_size or default_batch_size(
        device, parts, cfg.seq_len, cfg.n_blocks, model_dtype, hidden=getattr(model.config, "hidden_size", None))
    if checkpoint is not None:
        batch_size = checkpoint.batch_size(batch_size)
        checkpoint.begin(results_config(cfg, run, facts, batch_size), model,
                         [blocks, *(c.blocks for c in calibrations if c.blocks is not None)],
                         2 + len(sinks) * (1 + len(calibrations) * len(d_rs)), timings, say)
    resumed = None if checkpoint is None else checkpoint.resumed_baseline
    # The spec's choice calibrates on the leading scored blocks, in batches of their own during the baseline pass.
    eval_calib = cfg.calib_blocks if calibrations[0].blocks is None else 0
    batches, n_calib_batches = plan_batches(cfg.n_blocks, eval_calib, batch_size)
    runner = PrefixRunner(model, blocks, batches, start=min(layers), parts=parts)
    n_local = sum(len(b) for b in batches)
    show = cfg.progress and is_main

    def bar(desc, total=n_local):
        return tqdm(total=total, desc=desc, unit="blk", leave=False, disable=not show)

    def timed_losses(key, desc, fn):
        t = time.perf_counter()
        with bar(desc) as pbar:
            local = fn(pbar)
        losses = gather_losses(local, batches, cfg.n_blocks)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        timings[key] = time.perf_counter() - t
        return losses

    # The crystallinity statistics (and, for the spec's choice, Σ εεᵀ of the calibration batches, which come
    # first) ride along the baseline pass: the crystallized layers of every batch are observed, the model's
    # own attention output kept. Each sink setting observes the same calls with its own op call.
    t_sweep = time.perf_counter()
    watch = BaselineObservation(model, parts, layers, sinks, cfg.backend)

    def observe_calibration(i):
        return watch.context(calib=i < n_calib_batches)

    if resumed is not None:  # the replay needs the baseline's record; its observations and the calibration are kept
        timed_losses("baseline_replay_s", "baseline", runner.capture_baseline)
        base_losses, bases, crystallinity = resumed
    else:
        base_losses = timed_losses(
            "baseline_s", "baseline + calibration" if eval_calib else "baseline",
            lambda pbar: runner.capture_baseline(pbar, context_for=observe_calibration),
        )
    ppl_fp = finite_baseline(ppl_from_losses(base_losses), model_dtype)

    if resumed is None:
        # One basis per calibration set and sink setting; held-out and other-text sets get a pass of their own (one
        # for every sink setting), up to max(layers).
        t = time.perf_counter()
        bases = [fit_bases(model, parts, layers, cal, watch.grams(), sinks, batch_size, cfg.backend,
                           lambda n: bar("calibration", n)) for cal in calibrations]
        crystallinity = watch.crystallinity()
        timings["calibration_s"] = time.perf_counter() - t
        if checkpoint is not None:
            checkpoint.save_baseline(base_losses, bases, crystallinity)

    # --heads: the query heads crystallized per layer (a rule measured on the first calibration set), else all.
    heads = heads_for_run(cfg, model, parts, layers, calibrations[0], calibration_source(cfg), blocks, batch_size,
                          sinks[0])
    crystal = layers if heads is None else heads.mapping
    costs = CostRecorder(parts.geometry, layers, cfg.seq_len, device, model_dtype, cfg.backend)
    record_cost(costs, "baseline", "baseline", None, 0)

    def config_losses(mode, d_r, key, basis=None, sink_tokens=0):
        record_cost(costs, key, mode, d_r, sink_tokens)

        def compute():
            with crystallize(model, crystal, mode=mode, basis=None if basis is None else basis.basis, d_r=d_r,
                             backend=cfg.backend, sink_tokens=sink_tokens, parts=parts):
                return timed_losses(f"{key}_s", key, runner.losses)
        return compute() if checkpoint is None else checkpoint.losses(key, compute)

    full_losses = config_losses("full", None, "full")  # ctx whatever the sink: once
    ppl_b = ppl_from_losses(full_losses)
    indices = resample_indices(cfg.n_blocks, cfg.seed)
    analyses = []
    for n in sinks:
        tag = "" if n == sinks[0] else f"_sink{n}"  # the headline setting keeps the plain timing keys
        top1_losses = config_losses("top1", None, f"top1{tag}", sink_tokens=n)
        ppl_a = ppl_from_losses(top1_losses)
        draws = []
        for cal, per_sink in zip(calibrations, bases):  # the low-rank configurations, once per basis
            suffix = tag + (f"_draw{cal.draw}" if cal.draw else "")
            draw_curve = [curve_entry(d_r, config_losses("lowrank", d_r, f"lowrank_d{d_r}{suffix}", per_sink[n], n),
                                      base_losses, top1_losses, indices) for d_r in d_rs]
            draws.append({"draw": cal.draw, "first_block": cal.first_block, "curve": draw_curve,
                          "d_r_min": smallest_recovering(draw_curve)})
        curve = with_draws(draws)
        spectrum, mean_eff = residual_spectrum(bases[0][n].cumulative_variance, bases[0][n].r90)
        top1_ci = delta_ppl_ci(base_losses, top1_losses, indices)
        analyses.append({
            "sink_tokens": n, "ppl_top1": ppl_a, "curve": curve,
            "top1_delta_ppl_ci95": top1_ci,
            "top1_block_losses": top1_losses.tolist(), "draws": draws,
            "spectrum": spectrum, "mean_eff_dim": mean_eff,
            "verdict": verdict(curve, ppl_fp, ppl_a, top1_ci=top1_ci, n_blocks=cfg.n_blocks,
                               draws_d_r_min=[d["d_r_min"] for d in draws]),
            "crystallinity": crystallinity[n],
        })
    timings["sweep_s"] = time.perf_counter() - t_sweep
    timings["total_s"] = time.perf_counter() - t0

    head = analyses[0]  # the first sink setting is the headline: the spec's keys hold its numbers
    config = results_config(cfg, run, facts, batch_size)
    results = {
        "kind": "sweep", "format_version": SWEEP_FORMAT_VERSION,
        "ppl_baseline": ppl_fp, "ppl_top1": head["ppl_top1"], "ppl_full": ppl_b, "curve": head["curve"],
        "top1_delta_ppl_ci95": head["top1_delta_ppl_ci95"],
        "full_delta_ppl_ci95": delta_ppl_ci(base_losses, full_losses, indices),
        "block_losses": {"baseline": base_losses.tolist(), "top1": head["top1_block_losses"],
                         "full": full_losses.tolist()},
        "draws": head["draws"], "bootstrap": bootstrap_info(cfg.seed, cfg.n_blocks),
        "spectrum": head["spectrum"], "mean_eff_dim": head["mean_eff_dim"], "verdict": head["verdict"],
        # The spec's statistics of the baseline (i* over every key); each sink setting's own are in "sinks".
        "crystallinity": crystallinity[0], "sink_tokens": sinks[0],
        "sinks": analyses,
        "heads": None if heads is None else heads.results(),
        "config": config,
        "timings": timings, "basis": bases[0][sinks[0]],
        "cost": costs.results(),
    }
    print_sweep_report(results, say)
    return results


def record_cost(costs: CostRecorder, key: str, mode: str, d_r: int | None, sink_tokens: int) -> None:
    """Record one configuration's attention cost (``nqpq.experiments.op_cost``: the formulas, and the op timed on
    its own on the run's shapes) before its passes run; results.json's ``cost`` holds them."""
    costs.record(key, mode, d_r, sink_tokens)


"""``nqpq scan``: every layer crystallized alone, with its crystallinity.

For each scanned layer L, with only L crystallized: top-1 perplexity, low-rank
perplexity for each d_r with L's own residual basis, the recovered %, and L's mean
r90; and, for every head of every scanned layer, the crystallinity statistics
(``nqpq.experiments.crystallinity``) of the baseline model.

Fast by construction. One baseline pass does everything that needs the untouched
model: it records the hidden state entering every scanned layer (``PrefixRunner``
with several start layers), accumulates Σ εεᵀ of every scanned layer on the
calibration batches when they are scored blocks (``--calib-from eval``; otherwise one calibration
pass per draw, up to the highest scanned layer, serves every layer), and counts the crystallinity
statistics on every batch. Each
configuration of layer L then replays only layers L..n−1 (and the LM head) from the record.

Cost, scanning all n layers with k ranks (k + 1 configurations per layer), a layer
costing c and the final norm + LM head h: one baseline pass plus
(k + 1)·Σ_L ((n − L)·c + h) = (k + 1)·(n(n + 1)/2·c + n·h), against
n·(k + 1)·(n·c + h) plus n calibration passes for the naive loop (a full forward per
configuration). Both grow as n²; the scan skips the unchanged layers below L, at most
halving the work when the layers dominate, less when the LM head is a large share.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from ..model.crystallize import crystallize
from ..model.replay import PrefixRunner
from ..results.crystallinity_table import layer_means, sink_metrics
from ..results.report import print_scan_report
from ..results.results_file import SCAN_FORMAT_VERSION
from ..results.stats import delta_ppl_ci, ppl_from_losses, resample_indices
from ..results.verdict import bootstrap_info, curve_entry, finite_baseline, smallest_recovering, verdict, with_draws
from .batching import default_batch_size, gather_losses, plan_batches
from .config import SweepConfig, calibration_source, check_flags
from .heads import heads_for_run
from .resume import Checkpoint
from .setup import BaselineObservation, fit_bases, open_run, results_config, run_facts


def run_scan(
    cfg: SweepConfig,
    *,
    model: torch.nn.Module | None = None,
    ids: torch.Tensor | None = None,
    log: Callable[[str], None] | None = None,
    calib_ids: torch.Tensor | None = None,
    checkpoint: Checkpoint | None = None,
) -> dict:
    """Scan ``cfg.layers`` (None: every layer) one at a time; print the report; return the results dict.

    Takes the sweep's settings (``SweepConfig``) and, like ``run_sweep``, an optional loaded
    ``model`` and 1-D ``ids`` (and ``calib_ids`` with ``cfg.calib_text_file``).
    Raises ``NqpqError`` for bad settings or unavailable inputs.
    Writing files is the caller's job (``nqpq.results.results_file.write_results``).
    ``checkpoint`` (``nqpq.experiments.resume``): keep each finished configuration there, and take those it holds.
    """
    from tqdm.auto import tqdm

    check_flags(cfg)
    timings: dict = {}
    t0 = time.perf_counter()
    run = open_run(cfg, model, ids, log, "[scan]", calib_ids=calib_ids)
    model, device, say = run.model, run.device, run.say
    facts = run_facts(cfg, run, lambda parts: sorted(parts.attn_layers if cfg.layers is None else cfg.layers))
    parts, layers, d_rs, sinks, blocks, calibrations = (facts.parts, facts.layers, facts.d_rs, facts.sinks,
                                                        facts.blocks, facts.calibrations)
    timings["load_s"] = time.perf_counter() - t0

    model_dtype = next(model.parameters()).dtype
    # The record holds the hidden state entering every scanned layer, for every block: count all of them.
    batch_size = cfg.batch_size or default_batch_size(
        device, parts, cfg.seq_len, cfg.n_blocks, model_dtype, hidden=getattr(model.config, "hidden_size", None),
        n_records=len(layers))
    if checkpoint is not None:
        batch_size = checkpoint.batch_size(batch_size)
        checkpoint.begin(results_config(cfg, run, facts, batch_size), model,
                         [blocks, *(c.blocks for c in calibrations if c.blocks is not None)],
                         1 + len(layers) * len(sinks) * (1 + len(calibrations) * len(d_rs)), timings, say)
    resumed = None if checkpoint is None else checkpoint.resumed_baseline
    # The spec's choice calibrates on the leading scored blocks, in batches of their own during the baseline pass.
    eval_calib = cfg.calib_blocks if calibrations[0].blocks is None else 0
    batches, n_calib_batches = plan_batches(cfg.n_blocks, eval_calib, batch_size)
    runner = PrefixRunner(model, blocks, batches, start=layers, parts=parts)
    n_local = sum(len(b) for b in batches)
    show = cfg.progress and run.is_main

    def synced_losses(local: torch.Tensor) -> torch.Tensor:
        losses = gather_losses(local, batches, cfg.n_blocks)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return losses

    # The baseline pass: every batch feeds the crystallinity counts, the spec's calibration
    # batches (first) also the Gram matrices; the model's own attention output is kept. Each sink
    # setting observes the same calls with its own op call.
    watch = BaselineObservation(model, parts, layers, sinks, cfg.backend)

    def observe(i: int):
        return watch.context(calib=i < n_calib_batches)

    t = time.perf_counter()
    with tqdm(total=n_local, desc="baseline + calibration" if eval_calib else "baseline", unit="blk", leave=False,
              disable=not show) as pbar:
        # Resuming, the replay needs the baseline's record; its observations and the calibration are kept.
        base_losses = synced_losses(runner.capture_baseline(pbar, context_for=None if resumed else observe))
    timings["baseline_replay_s" if resumed else "baseline_s"] = time.perf_counter() - t
    if resumed is not None:
        base_losses, bases, crystallinity = resumed
    ppl_fp = finite_baseline(ppl_from_losses(base_losses), model_dtype)

    # One basis per calibration set and sink setting, every scanned layer's from the same pass (up to the highest
    # scanned layer).
    t = time.perf_counter()

    def bar(total: int):
        return tqdm(total=total, desc="calibration", unit="blk", leave=False, disable=not show)

    if resumed is None:
        bases = [fit_bases(model, parts, layers, cal, watch.grams(), sinks, batch_size, cfg.backend, bar)
                 for cal in calibrations]
        crystallinity = watch.crystallinity()
        if checkpoint is not None:
            checkpoint.save_baseline(base_losses, bases, crystallinity)
    means = {n: layer_means(c) for n, c in crystallinity.items()}
    timings["calibration_s"] = time.perf_counter() - t  # calibration passes, eigendecompositions, stats reduction
    indices = resample_indices(cfg.n_blocks, cfg.seed)
    # --heads: each scanned layer crystallizes its chosen query heads; a layer where none is chosen is not scanned.
    heads = heads_for_run(cfg, model, parts, layers, calibrations[0], calibration_source(cfg), blocks, batch_size,
                          sinks[0])
    scanned = layers if heads is None else tuple(li for li in layers if li in heads.mapping)

    def layer_losses(layer: int, mode: str, d_r: int | None, pbar, n: int, basis=None, draw: int = 0) -> torch.Tensor:
        def compute() -> torch.Tensor:
            chosen = [layer] if heads is None else {layer: heads.mapping[layer]}
            with crystallize(model, chosen, mode=mode, basis=None if basis is None else {layer: basis.basis[layer]},
                             d_r=d_r, backend=cfg.backend, sink_tokens=n, parts=parts):
                return synced_losses(runner.losses(pbar, start=layer))
        if checkpoint is None:
            return compute()
        key = f"layer{layer}_{mode}" + (f"_d{d_r}" if d_r is not None else "") + f"_sink{n}_draw{draw}"
        return checkpoint.losses(key, compute)

    def scan_layer(layer: int, n: int, pbar) -> dict:
        """Layer ``layer`` crystallized alone with ``n`` sink tokens: top-1, then low-rank once per basis."""
        top1_losses = layer_losses(layer, "top1", None, pbar, n)
        draws = []
        for cal, per_sink in zip(calibrations, bases):  # the low-rank configurations, once per basis
            basis = per_sink[n]
            draw_curve = [curve_entry(d_r, layer_losses(layer, "lowrank", d_r, pbar, n, basis, cal.draw), base_losses,
                                      top1_losses, indices) for d_r in d_rs]
            draws.append({"draw": cal.draw, "first_block": cal.first_block, "curve": draw_curve,
                          "r90_mean": basis.r90[layer].double().mean().item()})
        ppl_top1 = ppl_from_losses(top1_losses)
        top1_ci = delta_ppl_ci(base_losses, top1_losses, indices)
        curve = with_draws(draws)
        return {
            "layer": layer, "ppl_top1": ppl_top1, "top1_delta_ppl_ci95": top1_ci,
            "top1_block_losses": top1_losses.tolist(), "curve": curve, "draws": draws,
            # The layer's own verdict (the scan's cells): INCONCLUSIVE where its top-1 loses nothing measurable.
            "verdict": verdict(curve, ppl_fp, ppl_top1, top1_ci=top1_ci, n_blocks=cfg.n_blocks,
                               draws_d_r_min=[smallest_recovering(d["curve"]) for d in draws]),
            "r90_mean": draws[0]["r90_mean"], "top1_prob_mean": means[n][layer]["top1_prob_mean"],
        }

    per_sink = {n: [] for n in sinks}
    layer_s = {}
    total = n_local * len(scanned) * len(sinks) * (1 + len(d_rs) * len(bases))
    with tqdm(total=total, desc="scan", unit="blk", leave=False, disable=not show) as pbar:
        for layer in scanned:
            t = time.perf_counter()
            for n in sinks:
                per_sink[n].append(scan_layer(layer, n, pbar))
            layer_s[str(layer)] = time.perf_counter() - t
    timings["layers_s"] = layer_s
    timings["total_s"] = time.perf_counter() - t0

    config = results_config(cfg, run, facts, batch_size)
    results = {
        "kind": "scan", "format_version": SCAN_FORMAT_VERSION, "ppl_baseline": ppl_fp,
        "layers": per_sink[sinks[0]], "block_losses": {"baseline": base_losses.tolist()},
        "bootstrap": bootstrap_info(cfg.seed, cfg.n_blocks),
        # The spec's statistics of the baseline (i* over every key); each sink setting's own are in "sinks".
        "crystallinity": crystallinity[0], "sink_tokens": sinks[0],
        # Gu et al.'s attention-sink metric from the heads' α₁ (the same softmax whatever the sink setting).
        "attention_sink": sink_metrics(crystallinity[0], cfg.sink_eps),
        "sinks": [{"sink_tokens": n, "layers": per_sink[n], "crystallinity": crystallinity[n]} for n in sinks],
        "heads": None if heads is None else heads.results(),
        "config": config, "timings": timings,
    }
    print_scan_report(results, say)
    return results


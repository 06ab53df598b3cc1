"""``nqpq scan``: every layer crystallized alone, with its crystallinity.

For each scanned layer L, with only L crystallized: top-1 perplexity, low-rank
perplexity for each d_r with L's own residual basis, the recovered %, and L's mean
r90; and, for every head of every scanned layer, the crystallinity statistics
(``nqpq.crystallinity``) of the baseline model.

Fast by construction. One baseline pass does everything that needs the untouched
model: it records the hidden state entering every scanned layer (``PrefixRunner``
with several start layers), accumulates Σ εεᵀ of every scanned layer on the
calibration batches, and counts the crystallinity statistics on every batch. Each
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

from .calibration import GramAccumulator, basis_from_grams, reduce_grams
from .crystallinity import CrystallinityAccumulator, format_table, layer_means
from .evaluate import PrefixRunner, ppl_from_losses
from .integration import crystallize, observe_residuals
from .sweep import (
    SweepConfig,
    _check_model_fit,
    _gather_losses,
    _plan_batches,
    check_flags,
    default_batch_size,
    finite_baseline,
    make_blocks_checked,
    open_run,
    recovered_pct,
    results_config,
    sweep_ranks,
)

SCAN_FORMAT_VERSION = 1  # results.json layout; `nqpq report` refuses others


def run_scan(
    cfg: SweepConfig,
    *,
    model: torch.nn.Module | None = None,
    ids: torch.Tensor | None = None,
    log: Callable[[str], None] | None = None,
) -> dict:
    """Scan ``cfg.layers`` (None: every layer) one at a time; print the report; return the results dict.

    Takes the sweep's settings (``SweepConfig``) and, like ``run_sweep``, an optional loaded
    ``model`` and 1-D ``ids``. Raises ``NqpqError`` for bad settings or unavailable inputs.
    Writing files is the caller's job (``nqpq.report.write_results``).
    """
    from tqdm.auto import tqdm

    from .models import model_parts

    check_flags(cfg)
    timings: dict = {}
    t0 = time.perf_counter()
    run = open_run(cfg, model, ids, log, "[scan]")
    model, device, say = run.model, run.device, run.say
    parts = model_parts(model)
    layers = tuple(sorted(range(parts.n_layers) if cfg.layers is None else cfg.layers))
    d_rs = sweep_ranks(cfg, parts.head_dim)
    _check_model_fit(cfg, parts, layers, d_rs)
    blocks = make_blocks_checked(run.ids, cfg.seq_len, cfg.n_blocks)
    timings["load_s"] = time.perf_counter() - t0

    model_dtype = next(model.parameters()).dtype
    # The record holds the hidden state entering every scanned layer, for every block: count all of them.
    batch_size = cfg.batch_size or default_batch_size(
        device, parts, cfg.seq_len, cfg.n_blocks, model_dtype, hidden=getattr(model.config, "hidden_size", None),
        n_records=len(layers))
    batches, n_calib_batches = _plan_batches(cfg.n_blocks, cfg.calib_blocks, batch_size)
    runner = PrefixRunner(model, blocks, batches, start=layers)
    n_local = sum(len(b) for b in batches)
    show = cfg.progress and run.is_main

    def synced_losses(local: torch.Tensor) -> torch.Tensor:
        losses = _gather_losses(local, batches, cfg.n_blocks)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return losses

    # The baseline pass: every batch feeds the crystallinity counts, the calibration
    # batches (first) also the Gram matrices; the model's own attention output is kept.
    grams = GramAccumulator()
    stats = CrystallinityAccumulator(layers, parts.n_heads)

    def observe(i: int):
        return observe_residuals(model, layers, grams if i < n_calib_batches else None, backend=cfg.backend,
                                 stats_sink=stats)

    t = time.perf_counter()
    with tqdm(total=n_local, desc="baseline + calibration", unit="blk", leave=False, disable=not show) as pbar:
        ppl_fp = finite_baseline(ppl_from_losses(synced_losses(runner.capture_baseline(pbar, context_for=observe))),
                                 model_dtype)
    timings["baseline_s"] = time.perf_counter() - t

    t = time.perf_counter()
    basis = basis_from_grams(reduce_grams(grams.grams, layers, model))
    crystallinity = stats.results()
    timings["calibration_s"] = time.perf_counter() - t  # eigendecompositions and the stats reduction
    means = layer_means(crystallinity)

    def layer_ppl(layer: int, mode: str, d_r: int | None, pbar) -> float:
        with crystallize(model, [layer], mode=mode, basis={layer: basis.basis[layer]}, d_r=d_r,
                         backend=cfg.backend):
            return ppl_from_losses(synced_losses(runner.losses(pbar, start=layer)))

    results_layers = []
    layer_s = {}
    total = n_local * len(layers) * (1 + len(d_rs))
    with tqdm(total=total, desc="scan", unit="blk", leave=False, disable=not show) as pbar:
        for layer in layers:
            t = time.perf_counter()
            ppl_top1 = layer_ppl(layer, "top1", None, pbar)
            curve = []
            for d_r in d_rs:
                ppl_c = layer_ppl(layer, "lowrank", d_r, pbar)
                curve.append({"d_r": d_r, "ppl": ppl_c, "recovered_pct": recovered_pct(ppl_fp, ppl_top1, ppl_c)})
            results_layers.append({
                "layer": layer, "ppl_top1": ppl_top1, "curve": curve,
                "r90_mean": basis.r90[layer].double().mean().item(),
                "top1_prob_mean": means[layer]["top1_prob_mean"],
            })
            layer_s[str(layer)] = time.perf_counter() - t
    timings["layers_s"] = layer_s
    timings["total_s"] = time.perf_counter() - t0

    config = results_config(cfg, run, parts, layers, d_rs, batch_size, blocks)
    results = {
        "kind": "scan", "format_version": SCAN_FORMAT_VERSION, "ppl_baseline": ppl_fp,
        "layers": results_layers, "crystallinity": crystallinity, "config": config, "timings": timings,
    }
    print_scan_report(results, say)
    return results


def _pct(pct: float | None) -> str:
    return "n/a" if pct is None else f"{pct:.1f}%"


def print_scan_report(results: dict, say: Callable[[str], None] = print) -> None:
    """The scan's printed report, from its results dict alone (the run and ``nqpq report`` both call it)."""
    cfg = results["config"]
    ppl_fp, d_rs = results["ppl_baseline"], cfg["d_r"]
    say(f"[scan] {cfg['model']}: {cfg['family']}, Hq={cfg['n_heads']} Hkv={cfg['n_kv_heads']} "
        f"D={cfg['head_dim']}; {cfg['n_blocks']}x{cfg['seq_len']} tokens, each layer crystallized alone")
    say(f" PPL baseline (full softmax) = {ppl_fp:.3f}")
    say(" recovered % of the top-1 loss by d_r:")
    say(f" {'layer':>5} | {'top-1 PPL':>9} {'dPPL':>8} | " + " ".join(f"{f'd_r={d}':>7}" for d in d_rs)
        + f" | {'r90':>5} {'top-1 p':>7}")
    for e in results["layers"]:
        recovered = " ".join(f"{_pct(c['recovered_pct']):>7}" for c in e["curve"])
        say(f" {e['layer']:5d} | {e['ppl_top1']:9.3f} {e['ppl_top1'] - ppl_fp:+8.3f} | {recovered} | "
            f"{e['r90_mean']:5.1f} {e['top1_prob_mean']:7.4f}")
    say("")
    for line in format_table(results["crystallinity"]):
        say(line)
    if cfg["random_weights"]:
        say(" NOTE: DEMO run on RANDOM weights: the pipeline is real, the numbers say nothing about GPT-2.")

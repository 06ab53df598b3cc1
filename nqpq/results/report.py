"""The printed report of a sweep and of a scan, made from the results dict alone, and ``nqpq report``, which re-prints
it and redraws the plots from ``results.json``.

The run and ``nqpq report`` print the same text; its lines are made in ``nqpq.results.report_lines``, the files are
read and written by ``nqpq.results.results_file``.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from .cost import cost_lines
from .crystallinity_table import format_sink_metrics, format_table
from .report_lines import (
    describe_blocks,
    describe_calibration,
    describe_geometry,
    describe_heads,
    describe_sink,
    draw_lines,
    format_ci,
    head_widths,
    interval_notes,
    pct_text,
    sink_comparison,
    spectrum_table,
    top1_note,
    verdict_lines,
    verdict_summary,
)
from .results_file import load_results, write_results
from .upgrade import upgrade_note
from .verdict import INCONCLUSIVE, crosses_target


def print_report(results: dict, say: Callable[[str], None] = print) -> None:
    """The report a sweep or a scan printed when it ran, from its results dict alone."""
    if results.get("kind") == "scan":
        print_scan_report(results, say)
    else:
        print_sweep_report(results, say)


def redraw(out_dir: str, say: Callable[[str], None] = print) -> list[str]:
    """``nqpq report``: re-print the report and redraw every plot from ``out_dir/results.json``.

    Nothing is printed or written unless all of it can be: a file whose entries do not hold
    what this version writes raises ``NqpqError``.
    """
    from ..errors import NqpqError

    results = load_results(out_dir)
    lines: list[str] = upgrade_note(results)
    try:
        print_report(results, lines.append)
        written = write_results(out_dir, results, include_json=False)
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as err:
        raise NqpqError(f"{os.path.join(out_dir, 'results.json')} is broken ({type(err).__name__}: {err}); "
                        "nothing was redrawn") from err
    for line in lines:
        say(line)
    return written


# The printed reports.


def print_sweep_report(results: dict, say: Callable[[str], None] = print) -> None:
    """The spec's printed report, from a sweep's results dict alone (the run and ``nqpq report`` both call it),
    with where the basis was fitted, the 95 % intervals, the calibration draws and how settled the verdict is."""
    cfg = results["config"]
    d_head, ppl_fp = cfg["d_head"], results["ppl_baseline"]
    if "family" in cfg:
        say(f" model: {describe_geometry(cfg)}")
    say(f" checkpoint: {cfg['model']}")
    if "text_source" in cfg:
        say(f" text: {cfg['text_source']}")
    say(f" blocks: {describe_blocks(cfg)}")
    for line in describe_calibration(cfg):
        say(line)
    head_sink = results.get("sink_tokens", 0)
    for line in describe_sink(head_sink, [e["sink_tokens"] for e in results.get("sinks", ())]):
        say(line)
    for line in describe_heads(results.get("heads")):
        say(line)
    say(f" PPL baseline (full softmax) = {ppl_fp:.3f}")
    say(f"[EXP-Q03] SVD of excitation residuals eps for layers {tuple(cfg['layers'])}...")
    for line in spectrum_table(results["spectrum"], d_head):
        say(line)
    say(f" mean effective dim (r for 90% var): {results['mean_eff_dim']:.1f} / {d_head}")
    ppl_a, ppl_b = results["ppl_top1"], results["ppl_full"]
    ground = "V_i*" if not head_sink else f"sink exact + V_i*R, n={head_sink}"
    say(f" [A] Top-1 pure ({ground}) = {ppl_a:.3f} dPPL={ppl_a - ppl_fp:+.3f} "
        f"95% CI {format_ci(results['top1_delta_ppl_ci95'])}{top1_note(results['verdict'])}")
    say(f" [B] Top-1 + full eps (sanity) = {ppl_b:.3f} dPPL={ppl_b - ppl_fp:+.3f} (should ~ 0)")
    say(f"\n [C] Top-1 + low-rank residual (d_head={d_head}):")
    for c in results["curve"]:
        recovered = "  n/a" if c["recovered_pct"] is None else f"{pct_text(c['recovered_pct']):>6}"
        say(f" d_r={c['d_r']:2d}/{d_head}: PPL={c['ppl']:8.3f} dPPL={c['delta_ppl']:+7.3f} "
            f"recovered={recovered} of Top-1 loss | 95% CI dPPL {format_ci(c['delta_ppl_ci95'])}, "
            f"recovered {format_ci(c['recovered_pct_ci95'], '.1f')}")
    for line in interval_notes(results["bootstrap"], [c["recovered_pct_ci95"] for c in results["curve"]]):
        say(line)
    for line in draw_lines(results["curve"], cfg["calibration"]):
        say(line)
    say(f"\n{'=' * 66}\n[EXP-Q03 VERDICT] is the excitation residual compressible?\n{'=' * 66}")
    for line in verdict_lines(results["verdict"], results["curve"], d_head):
        say(line)
    say("")
    for line in format_table(results["crystallinity"]):
        say(line)
    sinks = results.get("sinks", [])
    for entry in sinks:
        if entry["sink_tokens"]:
            for line in format_table(entry["crystallinity"], entry["sink_tokens"]):
                say(line)
    if len(sinks) > 1:
        for line in sink_comparison(sinks, ppl_fp, cfg["d_r"]):
            say(line)
    for line in cost_lines(results):
        say(line)
    if cfg["random_weights"]:
        say(" NOTE: DEMO run on RANDOM weights: the pipeline is real, the numbers say nothing about GPT-2.")


def print_scan_report(results: dict, say: Callable[[str], None] = print) -> None:
    """The scan's printed report, from its results dict alone (the run and ``nqpq report`` both call it)."""
    cfg = results["config"]
    ppl_fp, d_rs = results["ppl_baseline"], cfg["d_r"]
    say(f"[scan] {cfg['model']}: {cfg['family']}, Hq={cfg['n_heads']} Hkv={cfg['n_kv_heads']} "
        f"{head_widths(cfg)}; {cfg['n_blocks']}x{cfg['seq_len']} tokens, each layer crystallized alone")
    if "text_source" in cfg:
        say(f" text: {cfg['text_source']}")
    say(f" blocks: {describe_blocks(cfg)}")
    for line in describe_calibration(cfg):
        say(line)
    sinks = results.get("sinks", [])
    for line in describe_sink(results.get("sink_tokens", 0), [e["sink_tokens"] for e in sinks]):
        say(line)
    for line in describe_heads(results.get("heads")):
        say(line)
    say(f" PPL baseline (full softmax) = {ppl_fp:.3f}")
    say(" recovered % of the top-1 loss by d_r, and each layer's verdict (--: INCONCLUSIVE, recovered % undefined):")
    say(f" {'layer':>5} | {'top-1 PPL':>9} {'dPPL':>8} | " + " ".join(f"{f'd_r={d}':>7}" for d in d_rs)
        + f" | {'r90':>5} {'top-1 p':>7} | verdict")
    for e in results["layers"]:
        inconclusive = e["verdict"]["outcome"] == INCONCLUSIVE
        recovered = " ".join(f"{'--' if inconclusive else pct_text(c['recovered_pct']):>7}" for c in e["curve"])
        say(f" {e['layer']:5d} | {e['ppl_top1']:9.3f} {e['ppl_top1'] - ppl_fp:+8.3f} | {recovered} | "
            f"{e['r90_mean']:5.1f} {e['top1_prob_mean']:7.4f} | {verdict_summary(e['verdict'])}")
    say(" 95% CI of top-1 dPPL and of recovered % by d_r (* : the interval crosses 90%):")
    for e in results["layers"]:
        cis = " ".join(f"d_r={c['d_r']} {format_ci(c['recovered_pct_ci95'], '.1f')}{crosses_target(c)}"
                       for c in e["curve"])
        say(f" {e['layer']:5d} | dPPL {format_ci(e['top1_delta_ppl_ci95'])} | {cis}")
    for line in interval_notes(results["bootstrap"], [c["recovered_pct_ci95"] for e in results["layers"]
                                                      for c in e["curve"]]):
        say(line)
    if cfg["calibration"]["draws"] > 1:
        say(f" recovered % per calibration draw ({cfg['calibration']['draws']} bases; spread = max - min):")
        for e in results["layers"]:
            per_draw = " | ".join(
                f"d_r={c['d_r']} " + " ".join(pct_text(r) for r in c["recovered_pct_draws"])
                + (f" (spread {c['recovered_pct_spread']:.1f})" if c["recovered_pct_spread"] is not None else "")
                for c in e["curve"])
            say(f" {e['layer']:5d} | {per_draw}")
    else:
        say(" calibration variability not measured (one basis; --calib-draws K fits K bases on disjoint held-out "
            "sets)")
    say("")
    for line in format_table(results["crystallinity"]):
        say(line)
    for entry in sinks:
        if entry["sink_tokens"]:
            for line in format_table(entry["crystallinity"], entry["sink_tokens"]):
                say(line)
    for line in format_sink_metrics(results.get("attention_sink")):  # absent from results written before it
        say(line)
    if len(sinks) > 1:
        say("")
        say(" Sink kept apart, side by side (n = sink tokens; top-1 dPPL, then recovered % by d_r, then mean r90):")
        say(f" {'layer':>5} | " + " | ".join(f"n={e['sink_tokens']}: dPPL " + " ".join(f"d_r={d}" for d in d_rs)
                                             + " r90" for e in sinks))
        for i, layer in enumerate(e["layer"] for e in results["layers"]):
            cells = []
            for e in sinks:
                row = e["layers"][i]
                cells.append(f"{row['ppl_top1'] - ppl_fp:+8.3f} " + " ".join(pct_text(c["recovered_pct"])
                                                                            for c in row["curve"])
                             + f" {row['r90_mean']:.1f}")
            say(f" {layer:5d} | " + " | ".join(cells))
    if cfg["random_weights"]:
        say(" NOTE: DEMO run on RANDOM weights: the pipeline is real, the numbers say nothing about GPT-2.")

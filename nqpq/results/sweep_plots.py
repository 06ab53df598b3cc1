"""The sweep's plots, drawn from its results dict alone: ΔPPL and recovered % against d_r with their 95 % intervals,
the residual spectrum, and ΔPPL against each configuration's cost (with the Pareto front)."""

from __future__ import annotations

import math

from .plot_common import blocks_text, error_bars, pyplot, suptitle, sweep_title, wrap_to_width
from .verdict import INCONCLUSIVE, spectrum_by_layer


def curve_figure(results: dict):
    """Left: ΔPPL against d_r (A, B and C with their 95 % intervals); right: recovered % against d_r, or, for an
    INCONCLUSIVE verdict, that it is undefined and why."""
    plt = pyplot()
    cfg, curve, verdict = results["config"], results["curve"], results["verdict"]
    d_r = [c["d_r"] for c in curve]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 5.2), layout="constrained")
    delta = [c["delta_ppl"] for c in curve]
    ax1.errorbar(d_r, delta, yerr=error_bars(delta, [c["delta_ppl_ci95"] for c in curve]), fmt="o-", capsize=3,
                 label="C: top-1 + rank-d_r ε (95% CI)")
    top1_delta = results["ppl_top1"] - results["ppl_baseline"]
    ax1.axhline(top1_delta, color="tab:red", ls="--", label="A: top-1")
    if results["top1_delta_ppl_ci95"] is not None:
        ax1.axhspan(*results["top1_delta_ppl_ci95"], color="tab:red", alpha=0.12, label="A: 95% CI")
    ax1.axhline(results["ppl_full"] - results["ppl_baseline"], color="tab:green", ls=":", label="B: full")
    ax1.set(xlabel="d_r", ylabel="ΔPPL vs baseline")
    ax1.set_title(f"ΔPPL vs d_r (PPL over {blocks_text(cfg)})", fontsize=9)
    head_sink = results.get("sink_tokens", 0)
    others = [e for e in results.get("sinks", ()) if e["sink_tokens"] != head_sink]
    if verdict["outcome"] == INCONCLUSIVE:
        text = (f"recovered %: undefined\n\nINCONCLUSIVE: {verdict['explanation']}\n\nrecovered % is defined only "
                "where top-1's loss is measurable (docs/verdict.md)")
        ax2.text(0.5, 0.5, wrap_to_width(fig, text, 9, 0.38 * fig.bbox.width), ha="center", va="center",
                 transform=ax2.transAxes, fontsize=9)
        ax2.set(xticks=[], yticks=[])
    else:
        recovered = [c["recovered_pct"] for c in curve]
        finite = [v for v in recovered if v is not None]
        # The axis stays on the estimates; an unbounded side of an interval runs past it (▲/▼ at the edge).
        ylim = (min(-10.0, min(finite) - 20), max(110.0, max(finite) + 20))
        cis = [c["recovered_pct_ci95"] for c in curve]
        ax2.errorbar(d_r, recovered, yerr=error_bars(recovered, cis, unbounded=10 * (ylim[1] - ylim[0])), fmt="o-",
                     capsize=3, label="draw 0 (95% CI)")
        up = [d for d, ci in zip(d_r, cis) if ci is not None and ci[1] is None]
        down = [d for d, ci in zip(d_r, cis) if ci is not None and ci[0] is None]
        if up or down:
            ax2.plot(up, [ylim[1]] * len(up), "^", color="tab:blue", clip_on=False,
                     label="CI unbounded (past ±1000 %)")
            ax2.plot(down, [ylim[0]] * len(down), "v", color="tab:blue", clip_on=False)
        for k in range(1, len(curve[0]["recovered_pct_draws"]) if curve else 0):  # the other calibration draws
            ax2.plot(d_r, [c["recovered_pct_draws"][k] for c in curve], ".:", color="gray", alpha=0.7,
                     label="other calibration draws" if k == 1 else None)
        ax2.axhline(90, color="gray", ls="--", label="90 %")
        ax2.set_ylim(*ylim)
    # The other sink settings, side by side with the headline (each its own top-1 and basis).
    for k, other in enumerate(others):
        color = f"C{k + 3}"
        label = f"n={other['sink_tokens']} sink tokens"
        o_delta = [c["delta_ppl"] for c in other["curve"]]
        ax1.errorbar(d_r, o_delta, yerr=error_bars(o_delta, [c["delta_ppl_ci95"] for c in other["curve"]]),
                     fmt="s-", color=color, capsize=3, label=f"C, {label}")
        ax1.axhline(other["ppl_top1"] - results["ppl_baseline"], color=color, ls="--", label=f"A, {label}")
        o_rec = [c["recovered_pct"] for c in other["curve"]]
        if verdict["outcome"] != INCONCLUSIVE and other["verdict"]["outcome"] != INCONCLUSIVE:
            ax2.errorbar(d_r, o_rec, yerr=error_bars(o_rec, [c["recovered_pct_ci95"] for c in other["curve"]]),
                         fmt="s-", color=color, capsize=3, label=label)
    ax2.set(xlabel="d_r", ylabel="recovered % of top-1 loss")
    ax2.set_title(f"Recovered % vs d_r (from the PPLs over {blocks_text(cfg)})", fontsize=9)
    for ax in (ax1, ax2) if verdict["outcome"] != INCONCLUSIVE else (ax1,):
        if d_r and min(d_r) > 0:
            ax.set_xscale("log", base=2)
            ax.set_xticks(d_r, [str(d) for d in d_r])
            ax.minorticks_off()
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    suptitle(fig, sweep_title(results))
    return fig


def spectrum_figure(results: dict):
    """Cumulative variance of ε against r: per layer, the mean over its heads (the printed table's "mean" row) and
    the band from the lowest to the highest head."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 5.5), layout="constrained")
    for k, (layer, s) in enumerate(spectrum_by_layer(results["spectrum"]).items()):
        r = range(1, len(s["mean"]) + 1)
        ax.plot(r, s["mean"], color=f"C{k}", label=f"layer {layer}: mean of {s['heads']} heads")
        ax.fill_between(r, s["min"], s["max"], color=f"C{k}", alpha=0.15)
    ax.axhline(0.9, color="gray", ls="--", label="90 % of the variance")
    ax.set(xlabel="r (principal directions of ε kept)", ylabel="cumulative variance of ε", ylim=(0, 1.01))
    ax.set_title(wrap_to_width(fig, "Residual spectrum: mean over each layer's heads (lines, = the report's 'mean' "
                                    "rows); shaded: min–max over the heads", 9, 0.9 * fig.bbox.width), fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    suptitle(fig, sweep_title(results))
    return fig


def cost_points(results: dict) -> list[dict]:
    """The headline configurations (full, top-1, each rank of the first calibration draw) with their ΔPPL, its
    interval and their cost entry (results["cost"]); empty for results written before costs were recorded."""
    cost = {c["key"]: c for c in (results.get("cost") or {}).get("configurations", [])}
    base = results["ppl_baseline"]
    points = []
    if "full" in cost:
        points.append(dict(label="full", delta=results["ppl_full"] - base, ci=results.get("full_delta_ppl_ci95"),
                           cost=cost["full"]))
    if "top1" in cost:
        points.append(dict(label="top-1", delta=results["ppl_top1"] - base, ci=results.get("top1_delta_ppl_ci95"),
                           cost=cost["top1"]))
    for c in results["curve"]:
        if f"lowrank_d{c['d_r']}" in cost:
            points.append(dict(label=f"d_r {c['d_r']}", delta=c["delta_ppl"], ci=c["delta_ppl_ci95"],
                               cost=cost[f"lowrank_d{c['d_r']}"]))
    return points


def pareto_front(xs: list[float], ys: list[float]) -> list[int]:
    """Indices of the points no other point beats on both (lower x and lower y), by increasing x."""
    order = sorted(range(len(xs)), key=lambda i: (xs[i], ys[i]))
    front, best = [], math.inf
    for i in order:
        if ys[i] < best:
            front.append(i)
            best = ys[i]
    return front


COST_AXES = (("relative_prefill_flops", "prefill FLOPs / full"), ("relative_decode_bytes", "decode bytes / full"),
             ("relative_op_time", "measured op time / full"))


def cost_figure(results: dict):
    """ΔPPL (95 % intervals) against each configuration's attention cost relative to full attention on the
    crystallized layers: prefill FLOPs, decode-step bytes (both by formula) and the op time measured on the run's
    device; the Pareto front of full, top-1 and the ranks joined by a line."""
    plt = pyplot()
    points = cost_points(results)
    fig, axes = plt.subplots(1, len(COST_AXES), figsize=(14, 4.8), layout="constrained")
    for ax, (key, xlabel) in zip(axes, COST_AXES):
        shown = [p for p in points if p["cost"].get(key) is not None]
        if not shown:
            ax.text(0.5, 0.5, "no cost recorded in these results", ha="center", va="center",
                    transform=ax.transAxes, fontsize=9)
            ax.set_axis_off()
            continue
        xs = [p["cost"][key] for p in shown]
        ys = [p["delta"] for p in shown]
        ax.errorbar(xs, ys, yerr=error_bars(ys, [p["ci"] for p in shown]), fmt="o", capsize=3, color="tab:blue",
                    label="ΔPPL (95% CI)")
        for x, y, p in zip(xs, ys, shown):
            ax.annotate(p["label"], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        front = pareto_front(xs, ys)
        ax.plot([xs[i] for i in front], [ys[i] for i in front], "-", color="tab:orange", alpha=0.8,
                label="Pareto front")
        ax.axhline(0.0, color="black", lw=0.8)
        ax.axvline(1.0, color="gray", ls=":", lw=0.8)
        ax.set(xlabel=xlabel, ylabel="ΔPPL vs baseline")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    cost = results.get("cost") or {}
    where = (f"\ncost of the crystallized layers' attention relative to full: prefill at T {cost['seq_len']}, decode "
             f"at context {cost['decode_context_len']}, op timed on {cost['device']} ({cost['dtype']})" if cost else "")
    suptitle(fig, sweep_title(results) + where)
    return fig

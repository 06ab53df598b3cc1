"""The scan's plots, drawn from its results dict alone: the recovered-% heatmap over layer × d_r, the top-1
probability per head, and each layer's top-1 ΔPPL.

The recovered-% heatmap has a fixed colour scale, 0–100 % (what "recovered %" means, the same in every run): cells
beyond it are drawn in the over/under colours and marked ▲/▼, an outlier cannot flatten the rest, and an
INCONCLUSIVE layer's cells (top-1 loses nothing measurable there, docs/verdict.md) are hatched and read "INC",
never a number.
"""

from __future__ import annotations

import math

from .plot_common import blocks_text, error_bars, pyplot, scan_title, suptitle, wrap_to_width
from .verdict import INCONCLUSIVE, crosses_target

RECOVERED_SCALE = (0.0, 100.0)  # the recovered-% heatmap's colour range; beyond it: the over/under colours, marked
OVER_COLOUR, UNDER_COLOUR = "#e377c2", "#8c564b"  # pink, brown: outside viridis, so a clipped cell reads as such
INCONCLUSIVE_REASONS = {
    "no_measurable_loss": "top-1's ΔPPL CI holds 0",
    "too_few_blocks": "too few blocks for an interval",
    "not_finite": "a perplexity is not finite",
}


def _recovered_cell(v: float | None, state: str) -> tuple[str, str]:
    """A recovered-% cell's text and text colour."""
    lo, hi = RECOVERED_SCALE
    if state == INCONCLUSIVE:
        return "INC", "black"
    if v is None:
        return "n/a", "black"
    if v > hi:
        return f"{v:.0f}▲", "black"
    if v < lo:
        return f"{v:.0f}▼", "white"
    return f"{v:.0f}", "black" if v > lo + 0.6 * (hi - lo) else "white"


def recovered_figure(results: dict):
    """Heatmap: recovered % of the top-1 loss over layer × d_r (each layer crystallized alone), on the fixed
    colour scale ``RECOVERED_SCALE``; INCONCLUSIVE layers hatched ("INC"), clipped cells ▲/▼, cells whose 95 %
    interval crosses 90 % framed with a "*"."""
    import numpy as np

    plt = pyplot()
    layers, d_rs, cfg = results["layers"], results["config"]["d_r"], results["config"]
    states = [e["verdict"]["outcome"] for e in layers]
    values = [[None if state == INCONCLUSIVE else c["recovered_pct"] for c in e["curve"]]
              for e, state in zip(layers, states)]
    grid = np.array([[math.nan if v is None else v for v in row] for row in values], dtype=float)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.8 * len(d_rs) + 3.5), max(4.0, 0.45 * len(layers) + 3.0)),
                           layout="constrained")
    cmap = plt.get_cmap("viridis").with_extremes(bad="lightgrey", over=OVER_COLOUR, under=UNDER_COLOUR)
    im = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, vmin=RECOVERED_SCALE[0], vmax=RECOVERED_SCALE[1],
                   aspect="auto")
    ax.set_xticks(range(len(d_rs)), [str(d) for d in d_rs])
    ax.set_yticks(range(len(layers)), [str(e["layer"]) for e in layers])
    for i, (e, state) in enumerate(zip(layers, states)):
        if state == INCONCLUSIVE:
            ax.add_patch(plt.Rectangle((-0.5, i - 0.5), len(d_rs), 1, facecolor="lightgrey", edgecolor="grey",
                                       hatch="///", lw=0.5))
        for j, c in enumerate(e["curve"]):
            marked = state != INCONCLUSIVE and bool(crosses_target(c))
            if marked:
                ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="red", lw=1.5))
            if len(layers) * len(d_rs) <= 400:  # annotations stay legible up to ~20×20
                text, colour = _recovered_cell(values[i][j], state)
                ax.text(j, i, text + ("*" if marked else ""), ha="center", va="center", fontsize=7, color=colour)
    lo, hi = RECOVERED_SCALE
    legend = (f"d_r\nINC, hatched: INCONCLUSIVE, the layer's top-1 loses nothing measurable (recovered % undefined); "
              f"▲ pink / ▼ brown: beyond the colour scale {lo:.0f}–{hi:.0f} % (the number is the value); "
              "red frame *: the 95% CI crosses 90%")
    ax.set_xlabel(wrap_to_width(fig, legend, 8, 0.8 * fig.bbox.width), fontsize=8)
    ax.set_ylabel("layer")
    ax.set_title(wrap_to_width(fig, f"recovered % of the layer's top-1 loss (PPL over {blocks_text(cfg)})", 9,
                               0.8 * fig.bbox.width), fontsize=9)
    fig.colorbar(im, ax=ax, extend="both", label=f"recovered % (colours clipped to {lo:.0f}–{hi:.0f})")
    suptitle(fig, scan_title(results))
    return fig


def top1_prob_figure(results: dict):
    """Heatmap: each head's top-1 attention probability, averaged over every query row of the scored blocks
    (baseline model), over layer × head."""
    import numpy as np

    plt = pyplot()
    cfg = results["config"]
    by_layer: dict[int, dict[int, float]] = {}
    for e in results["crystallinity"]:
        by_layer.setdefault(e["layer"], {})[e["head"]] = e["top1_prob_mean"]
    heads = sorted({h for row in by_layer.values() for h in row})
    rows = sorted(by_layer)
    values = [[by_layer[li].get(h) for h in heads] for li in rows]
    grid = np.array([[math.nan if v is None else v for v in row] for row in values], dtype=float)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.6 * len(heads) + 3.5), max(4.0, 0.45 * len(rows) + 3.0)),
                           layout="constrained")
    im = ax.imshow(np.ma.masked_invalid(grid), cmap=plt.get_cmap("viridis").with_extremes(bad="lightgrey"),
                   vmin=0.0, vmax=1.0, aspect="auto")
    ax.set_xticks(range(len(heads)), [str(h) for h in heads])
    ax.set_yticks(range(len(rows)), [str(r) for r in rows])
    ax.set(xlabel="head", ylabel="layer")
    if len(rows) * len(heads) <= 400:
        for i, row in enumerate(values):
            for j, v in enumerate(row):
                ax.text(j, i, "n/a" if v is None or not math.isfinite(v) else f"{v:.2f}", ha="center", va="center",
                        fontsize=7, color="black" if v is None or not math.isfinite(v) or v > 0.6 else "white")
    ax.set_title(wrap_to_width(fig, f"baseline model: top-1 probability per head, mean over every query row of "
                                    f"{blocks_text(cfg)}", 9, 0.8 * fig.bbox.width), fontsize=9)
    fig.colorbar(im, ax=ax, label="mean top-1 probability")
    suptitle(fig, scan_title(results))
    return fig


def delta_ppl_figure(results: dict):
    """Bars: ΔPPL of top-1 attention in each layer alone against the baseline, with 95 % intervals; a layer whose
    top-1 loss is not measurable (INCONCLUSIVE) is a grey hatched bar."""
    from matplotlib.patches import Patch

    plt = pyplot()
    layers, cfg = results["layers"], results["config"]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.45 * len(layers) + 3.0), 4.8), layout="constrained")
    delta = [e["ppl_top1"] - results["ppl_baseline"] for e in layers]
    inconclusive = [e["verdict"]["outcome"] == INCONCLUSIVE for e in layers]
    bars = ax.bar([str(e["layer"]) for e in layers], delta, capsize=3,
                  color=["lightgrey" if x else "tab:blue" for x in inconclusive],
                  edgecolor=["grey" if x else "tab:blue" for x in inconclusive],
                  yerr=error_bars(delta, [e["top1_delta_ppl_ci95"] for e in layers]))
    for bar, x in zip(bars.patches, inconclusive):
        if x:
            bar.set_hatch("///")
    ax.axhline(0.0, color="black", lw=0.8)
    reasons = sorted({INCONCLUSIVE_REASONS[e["verdict"]["reason"]] for e in layers
                      if e["verdict"]["outcome"] == INCONCLUSIVE})
    handles = [Patch(facecolor="tab:blue", label="top-1 loses measurably (CI above 0)")]
    if reasons:
        handles.append(Patch(facecolor="lightgrey", edgecolor="grey", hatch="///",
                             label=f"INCONCLUSIVE: {'; '.join(reasons)}"))
    ax.legend(handles=handles, fontsize=8)
    ax.set(xlabel="layer (crystallized alone); error bars: 95% CI", ylabel="ΔPPL of top-1 vs baseline")
    ax.set_title(wrap_to_width(fig, f"PPL over {blocks_text(cfg)}; baseline PPL {results['ppl_baseline']:.3f}", 9,
                               0.9 * fig.bbox.width), fontsize=9)
    ax.grid(alpha=0.3, axis="y")
    suptitle(fig, scan_title(results))
    return fig

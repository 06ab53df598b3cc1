"""The plots of a sweep and of a scan, drawn from the results dict alone (``nqpq report`` redraws them).

Every figure keeps its text inside the canvas: constrained layout, and titles wrapped to the figure's width as
measured by the renderer (a model name or path of any length). Each plot says what it averages. The scan's
recovered-% heatmap has a fixed colour scale, 0–100 % (what "recovered %" means, the same in every run): cells
beyond it are drawn in the over/under colours and marked ▲/▼, an outlier cannot flatten the rest, and an
INCONCLUSIVE layer's cells (top-1 loses nothing measurable there, docs/verdict.md) are hatched and read "INC",
never a number.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from .verdict import INCONCLUSIVE, crosses_target, spectrum_by_layer

RECOVERED_SCALE = (0.0, 100.0)  # the recovered-% heatmap's colour range; beyond it: the over/under colours, marked
OVER_COLOUR, UNDER_COLOUR = "#e377c2", "#8c564b"  # pink, brown: outside viridis, so a clipped cell reads as such
INCONCLUSIVE_REASONS = {
    "no_measurable_loss": "top-1's ΔPPL CI holds 0",
    "too_few_blocks": "too few blocks for an interval",
    "not_finite": "a perplexity is not finite",
}
CALIBRATION_NAMES = {"heldout": "held-out blocks", "eval": "scored blocks (spec)", "text": "another text"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def wrap_to_width(fig, text: str, fontsize: float, width_px: float) -> str:
    """``text`` with line breaks so that every line, measured by the figure's renderer at ``fontsize``, is at most
    ``width_px`` wide; a single word wider than that (a long path) is cut where it must be."""
    from matplotlib.font_manager import FontProperties

    renderer = fig.canvas.get_renderer()
    prop = FontProperties(size=fontsize)

    def width(s: str) -> float:
        return renderer.get_text_width_height_descent(s, prop, ismath=False)[0]

    lines = []
    for paragraph in text.split("\n"):
        line = ""
        for word in paragraph.split(" "):
            candidate = f"{line} {word}" if line else word
            if width(candidate) <= width_px:
                line = candidate
                continue
            if line:
                lines.append(line)
            while width(word) > width_px and len(word) > 1:
                cut = max(1, max((k for k in range(1, len(word)) if width(word[:k]) <= width_px), default=1))
                lines.append(word[:cut])
                word = word[cut:]
            line = word
        lines.append(line)
    return "\n".join(lines)


def _suptitle(fig, text: str, fontsize: float = 9) -> None:
    """The figure's title, wrapped to 96 % of its width (constrained layout keeps it inside vertically)."""
    fig.suptitle(wrap_to_width(fig, text, fontsize, 0.96 * fig.bbox.width), fontsize=fontsize)


def _save(fig, path: str) -> None:
    fig.savefig(path, dpi=120)
    _pyplot().close(fig)


def error_bars(values: list[float | None], cis: list[list[float | None] | None],
               unbounded: float = 0.0) -> list[list[float]] | None:
    """matplotlib's ``yerr`` ([below], [above]) for point estimates and their 95 % intervals; None without any
    interval. An interval that misses its estimate (a skewed bootstrap can) draws no bar on that side; an unbounded
    side (None) draws a bar of length ``unbounded`` (the caller makes it reach past the axes, which clip it)."""
    if all(ci is None for ci in cis):
        return None

    def side(v: float, bound: float | None, sign: int) -> float:
        if bound is None:
            return unbounded
        return max(sign * (bound - v), 0.0) if math.isfinite(bound) else 0.0

    below, above = [], []
    for v, ci in zip(values, cis):
        if v is None or ci is None or not math.isfinite(v):
            below.append(0.0)
            above.append(0.0)
        else:
            below.append(side(v, ci[0], -1))
            above.append(side(v, ci[1], 1))
    return [below, above]


def _blocks(cfg: dict) -> str:
    return f"{cfg['n_blocks']} blocks × {cfg['seq_len']} tokens"


def _scan_title(results: dict) -> str:
    cfg = results["config"]
    tag = "\nRANDOM WEIGHTS (demo): the numbers say nothing about the model" if cfg.get("random_weights") else ""
    return (f"nqpq scan: {cfg['model']}\n{cfg['family']}, Hq={cfg['n_heads']}, Hkv={cfg['n_kv_heads']}, "
            f"D={cfg['head_dim']}; each layer crystallized alone; {_blocks(cfg)}{tag}")


def _sweep_title(results: dict) -> str:
    cfg = results["config"]
    tag = "\nRANDOM WEIGHTS (demo): the numbers say nothing about GPT-2" if cfg.get("random_weights") else ""
    shape = (f"; {cfg['family']} Hq={cfg['n_heads']} Hkv={cfg['n_kv_heads']} D={cfg['head_dim']}"
             if "family" in cfg else "")
    cal = cfg["calibration"]["source"]
    return (f"EXP-Q03 sweep: {cfg['model']}\nlayers {cfg['layers']} crystallized together; {_blocks(cfg)}{shape}; "
            f"basis from {CALIBRATION_NAMES[cal]}{tag}")


# The scan's plots.


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

    plt = _pyplot()
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
    ax.set_title(wrap_to_width(fig, f"recovered % of the layer's top-1 loss (PPL over {_blocks(cfg)})", 9,
                               0.8 * fig.bbox.width), fontsize=9)
    fig.colorbar(im, ax=ax, extend="both", label=f"recovered % (colours clipped to {lo:.0f}–{hi:.0f})")
    _suptitle(fig, _scan_title(results))
    return fig


def top1_prob_figure(results: dict):
    """Heatmap: each head's top-1 attention probability, averaged over every query row of the scored blocks
    (baseline model), over layer × head."""
    import numpy as np

    plt = _pyplot()
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
                                    f"{_blocks(cfg)}", 9, 0.8 * fig.bbox.width), fontsize=9)
    fig.colorbar(im, ax=ax, label="mean top-1 probability")
    _suptitle(fig, _scan_title(results))
    return fig


def delta_ppl_figure(results: dict):
    """Bars: ΔPPL of top-1 attention in each layer alone against the baseline, with 95 % intervals; a layer whose
    top-1 loss is not measurable (INCONCLUSIVE) is a grey hatched bar."""
    from matplotlib.patches import Patch

    plt = _pyplot()
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
    ax.set_title(wrap_to_width(fig, f"PPL over {_blocks(cfg)}; baseline PPL {results['ppl_baseline']:.3f}", 9,
                               0.9 * fig.bbox.width), fontsize=9)
    ax.grid(alpha=0.3, axis="y")
    _suptitle(fig, _scan_title(results))
    return fig


# The sweep's plots.


def curve_figure(results: dict):
    """Left: ΔPPL against d_r (A, B and C with their 95 % intervals); right: recovered % against d_r, or, for an
    INCONCLUSIVE verdict, that it is undefined and why."""
    plt = _pyplot()
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
    ax1.set_title(f"ΔPPL vs d_r (PPL over {_blocks(cfg)})", fontsize=9)
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
    ax2.set_title(f"Recovered % vs d_r (from the PPLs over {_blocks(cfg)})", fontsize=9)
    for ax in (ax1, ax2) if verdict["outcome"] != INCONCLUSIVE else (ax1,):
        if d_r and min(d_r) > 0:
            ax.set_xscale("log", base=2)
            ax.set_xticks(d_r, [str(d) for d in d_r])
            ax.minorticks_off()
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    _suptitle(fig, _sweep_title(results))
    return fig


def spectrum_figure(results: dict):
    """Cumulative variance of ε against r: per layer, the mean over its heads (the printed table's "mean" row) and
    the band from the lowest to the highest head."""
    plt = _pyplot()
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
    _suptitle(fig, _sweep_title(results))
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
    plt = _pyplot()
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
    _suptitle(fig, _sweep_title(results) + where)
    return fig


def _saver(figure: Callable) -> Callable[[dict, str], None]:
    def draw(results: dict, path: str) -> None:
        _save(figure(results), path)

    draw.__doc__ = figure.__doc__
    return draw


plot_recovered, plot_top1_prob, plot_delta_ppl = (_saver(f) for f in (recovered_figure, top1_prob_figure,
                                                                       delta_ppl_figure))
plot_curve, plot_spectrum = _saver(curve_figure), _saver(spectrum_figure)
plot_cost = _saver(cost_figure)

# (file name, figure(results)); report.write_results draws each through SCAN_PLOTS / SWEEP_PLOTS.
SCAN_FIGURES = (("recovered_heatmap.png", recovered_figure), ("top1_prob_heatmap.png", top1_prob_figure),
                ("delta_ppl_top1.png", delta_ppl_figure))
SWEEP_FIGURES = (("delta_ppl_vs_dr.png", curve_figure), ("cumulative_variance.png", spectrum_figure),
                 ("delta_ppl_vs_cost.png", cost_figure))
SCAN_PLOTS = tuple((name, _saver(figure)) for name, figure in SCAN_FIGURES)
SWEEP_PLOTS = tuple((name, _saver(figure)) for name, figure in SWEEP_FIGURES)

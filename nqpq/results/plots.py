"""The plots of a sweep and of a scan, drawn from the results dict alone (``nqpq report`` redraws them)."""

from __future__ import annotations

import math

from .verdict import crosses_target


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def error_bars(values: list[float | None], cis: list[list[float] | None]) -> list[list[float]] | None:
    """matplotlib's ``yerr`` ([below], [above]) for point estimates and their 95 % intervals; None without any
    interval. An interval that misses its estimate (a skewed bootstrap can) draws no bar on that side."""
    if all(ci is None for ci in cis):
        return None
    below, above = [], []
    for v, ci in zip(values, cis):
        ok = v is not None and ci is not None and all(map(math.isfinite, (v, *ci)))
        below.append(max(v - ci[0], 0.0) if ok else 0.0)
        above.append(max(ci[1] - v, 0.0) if ok else 0.0)
    return [below, above]


def _title(results: dict) -> str:
    cfg = results["config"]
    tag = "\nRANDOM WEIGHTS (demo): the numbers say nothing about the model" if cfg.get("random_weights") else ""
    return (f"nqpq scan {cfg['model']} ({cfg['family']}, Hq={cfg['n_heads']}, Hkv={cfg['n_kv_heads']}, "
            f"D={cfg['head_dim']})\neach layer crystallized alone, {cfg['n_blocks']}×{cfg['seq_len']} tokens{tag}")


def _heatmap(plt, rows: list[int], cols: list, values: list[list[float | None]], *, xlabel: str, cbar: str,
             vmin: float, vmax: float, fmt: str, path: str, title: str,
             marked: list[list[bool]] | None = None, mark_label: str = "") -> None:
    """Rows × columns, each cell annotated; None cells are grey and read "n/a"; ``marked`` cells get a red frame
    and a "*"."""
    import numpy as np

    grid = np.array([[math.nan if v is None else v for v in row] for row in values], dtype=float)
    fig, ax = plt.subplots(figsize=(max(5.0, 0.7 * len(cols) + 2.5), max(3.5, 0.45 * len(rows) + 2.0)))
    cmap = plt.get_cmap("viridis").with_extremes(bad="lightgrey")
    im = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto")
    ax.set_xticks(range(len(cols)), [str(c) for c in cols])
    ax.set_yticks(range(len(rows)), [str(r) for r in rows])
    ax.set(xlabel=xlabel, ylabel="layer")
    if len(rows) * len(cols) <= 400:  # annotations stay legible up to ~20×20
        for i, row in enumerate(values):
            for j, v in enumerate(row):
                star = "*" if marked and marked[i][j] else ""
                ax.text(j, i, ("n/a" if v is None else format(v, fmt)) + star, ha="center", va="center", fontsize=7,
                        color="black" if v is None or v > vmin + 0.6 * (vmax - vmin) else "white")
    if marked:
        for i, row in enumerate(marked):
            for j, m in enumerate(row):
                if m:
                    ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="red", lw=1.5))
        if mark_label:
            ax.set_xlabel(f"{xlabel}\n{mark_label}")
    fig.colorbar(im, ax=ax, label=cbar)
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_recovered(results: dict, path: str) -> None:
    """Heatmap: recovered % of the top-1 loss over layer × d_r; cells whose 95 % interval crosses 90 % are framed."""
    plt = _pyplot()
    layers = results["layers"]
    values = [[c["recovered_pct"] for c in e["curve"]] for e in layers]
    marked = [[bool(crosses_target(c)) for c in e["curve"]] for e in layers]
    finite = [v for row in values for v in row if v is not None]
    _heatmap(plt, [e["layer"] for e in layers], results["config"]["d_r"], values, xlabel="d_r",
             cbar="recovered % of the top-1 loss", vmin=min([0.0, *finite]), vmax=max([100.0, *finite]),
             fmt=".0f", path=path, title=_title(results), marked=marked,
             mark_label="framed *: the 95% CI crosses 90%")


def plot_top1_prob(results: dict, path: str) -> None:
    """Heatmap: mean top-1 attention probability over layer × head (baseline model)."""
    plt = _pyplot()
    by_layer: dict[int, dict[int, float]] = {}
    for e in results["crystallinity"]:
        by_layer.setdefault(e["layer"], {})[e["head"]] = e["top1_prob_mean"]
    heads = sorted({h for row in by_layer.values() for h in row})
    rows = sorted(by_layer)
    values = [[by_layer[li].get(h) for h in heads] for li in rows]
    _heatmap(plt, rows, heads, values, xlabel="head", cbar="mean top-1 probability", vmin=0.0, vmax=1.0,
             fmt=".2f", path=path, title=_title(results))


def plot_delta_ppl(results: dict, path: str) -> None:
    """Bars: ΔPPL of top-1 attention in each layer alone, against the baseline."""
    plt = _pyplot()
    layers = results["layers"]
    fig, ax = plt.subplots(figsize=(max(5.0, 0.45 * len(layers) + 2.5), 4.2))
    delta = [e["ppl_top1"] - results["ppl_baseline"] for e in layers]
    ax.bar([str(e["layer"]) for e in layers], delta, capsize=3,
           yerr=error_bars(delta, [e["top1_delta_ppl_ci95"] for e in layers]))
    ax.axhline(0.0, color="black", lw=0.8)
    ax.set(xlabel="layer (crystallized alone); bars: 95% CI", ylabel="ΔPPL of top-1 vs baseline",
           title=f"baseline PPL {results['ppl_baseline']:.3f}")
    ax.grid(alpha=0.3, axis="y")
    fig.suptitle(_title(results), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


SCAN_PLOTS = (
    ("recovered_heatmap.png", plot_recovered),
    ("top1_prob_heatmap.png", plot_top1_prob),
    ("delta_ppl_top1.png", plot_delta_ppl),
)


# The sweep's plots.


def plot_curve(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curve = results["curve"]
    d_r = [c["d_r"] for c in curve]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4.8))
    delta = [c["delta_ppl"] for c in curve]
    ax1.errorbar(d_r, delta, yerr=error_bars(delta, [c["delta_ppl_ci95"] for c in curve]), fmt="o-", capsize=3,
                 label="C: top-1 + rank-d_r ε (95% CI)")
    top1_delta = results["ppl_top1"] - results["ppl_baseline"]
    ax1.axhline(top1_delta, color="tab:red", ls="--", label="A: top-1")
    if results["top1_delta_ppl_ci95"] is not None:
        ax1.axhspan(*results["top1_delta_ppl_ci95"], color="tab:red", alpha=0.12, label="A: 95% CI")
    ax1.axhline(results["ppl_full"] - results["ppl_baseline"], color="tab:green", ls=":", label="B: full")
    ax1.set(xlabel="d_r", ylabel="ΔPPL vs baseline", title="ΔPPL vs d_r")
    recovered = [c["recovered_pct"] for c in curve]
    if any(r is None for r in recovered):  # top-1 lost nothing: a percentage of no loss is not a number
        ax2.text(0.5, 0.5, f"recovered %: n/a\n{results['verdict'].get('explanation', '')}", ha="center",
                 va="center", transform=ax2.transAxes, wrap=True)
    else:
        cis = [c["recovered_pct_ci95"] for c in curve]
        ax2.errorbar(d_r, recovered, yerr=error_bars(recovered, cis), fmt="o-", capsize=3, label="draw 0 (95% CI)")
        for k in range(1, len(curve[0]["recovered_pct_draws"]) if curve else 0):  # the other calibration draws
            ax2.plot(d_r, [c["recovered_pct_draws"][k] for c in curve], ".:", color="gray", alpha=0.7,
                     label="other calibration draws" if k == 1 else None)
        # Intervals from resamples where top-1 loses ~nothing have no scale: keep the axis on the estimates.
        finite = [v for v in recovered if v is not None]
        if finite:
            ax2.set_ylim(min(-10.0, min(finite) - 20), max(110.0, max(finite) + 20))
    # The other sink settings, side by side with the headline (each its own top-1 and basis).
    head_sink = results.get("sink_tokens", 0)
    for k, other in enumerate(e for e in results.get("sinks", ()) if e["sink_tokens"] != head_sink):
        color = f"C{k + 3}"
        label = f"n={other['sink_tokens']} sink tokens"
        o_delta = [c["delta_ppl"] for c in other["curve"]]
        ax1.errorbar(d_r, o_delta, yerr=error_bars(o_delta, [c["delta_ppl_ci95"] for c in other["curve"]]),
                     fmt="s-", color=color, capsize=3, label=f"C, {label}")
        ax1.axhline(other["ppl_top1"] - results["ppl_baseline"], color=color, ls="--", label=f"A, {label}")
        o_rec = [c["recovered_pct"] for c in other["curve"]]
        if all(r is not None for r in o_rec):
            ax2.errorbar(d_r, o_rec, yerr=error_bars(o_rec, [c["recovered_pct_ci95"] for c in other["curve"]]),
                         fmt="s-", color=color, capsize=3, label=label)
    ax2.axhline(90, color="gray", ls="--", label="90 %")
    ax2.set(xlabel="d_r", ylabel="recovered % of top-1 loss", title="Recovered % vs d_r")
    for ax in (ax1, ax2):
        if d_r and min(d_r) > 0:
            ax.set_xscale("log", base=2)
            ax.set_xticks(d_r, [str(d) for d in d_r])
            ax.minorticks_off()
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(_sweep_title(results))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_spectrum(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    by_layer: dict[int, list[list[float]]] = {}
    for s in results["spectrum"]:
        by_layer.setdefault(s["layer"], []).append(s["cumulative_variance"])
    for layer, curves in sorted(by_layer.items()):
        mean = [sum(col) / len(col) for col in zip(*curves)]
        ax.plot(range(1, len(mean) + 1), mean, label=f"layer {layer} (mean of {len(curves)} heads)")
    ax.axhline(0.9, color="gray", ls="--")
    ax.set(xlabel="r", ylabel="cumulative variance of ε", title="Residual spectrum", ylim=(0, 1.01))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.suptitle(_sweep_title(results), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _sweep_title(results: dict) -> str:
    cfg = results["config"]
    tag = "\nRANDOM WEIGHTS (demo): the numbers say nothing about GPT-2" if cfg.get("random_weights") else ""
    shape = (f", {cfg['family']} Hq={cfg['n_heads']} Hkv={cfg['n_kv_heads']} D={cfg['head_dim']}"
             if "family" in cfg else "")
    cal = cfg["calibration"]["source"]
    return (f"EXP-Q03 {cfg['model']}\nlayers {cfg['layers']}, {cfg['n_blocks']}×{cfg['seq_len']} tokens{shape}, "
            f"basis from {CALIBRATION_NAMES[cal]}{tag}")


CALIBRATION_NAMES = {"heldout": "held-out blocks", "eval": "scored blocks (spec)", "text": "another text"}

SWEEP_PLOTS = (("delta_ppl_vs_dr.png", plot_curve), ("cumulative_variance.png", plot_spectrum))

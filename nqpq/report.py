"""A run's results: ``results.json`` and PNG plots written whole or not at all, read back, re-printed, redrawn."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable

# What each kind of results.json must hold at the top level; a file without them is refused.
REQUIRED_KEYS = {
    "sweep": ("ppl_baseline", "ppl_top1", "ppl_full", "curve", "spectrum", "mean_eff_dim", "verdict", "crystallinity",
              "config"),
    "scan": ("ppl_baseline", "layers", "crystallinity", "config"),
}


def check_out_dir(path: str) -> None:
    """Fail before the sweep runs, not after, if ``path`` cannot hold the results."""
    from .errors import NqpqError

    if os.path.exists(path) and not os.path.isdir(path):
        raise NqpqError(f"--out {path!r} exists and is not a directory")
    try:
        os.makedirs(path, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=path, prefix=".nqpq-probe-")
        probe.close()
    except OSError as err:
        raise NqpqError(f"--out {path!r} is not writable: {err}") from err


def json_ready(results: dict) -> dict:
    """The results without the in-memory basis (which is saved separately as basis.pt)."""
    return {k: v for k, v in results.items() if k != "basis"}


def _plot_curve(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .plots import error_bars

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
    fig.suptitle(_title(results))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_spectrum(results: dict, path: str) -> None:
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
    fig.suptitle(_title(results), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _title(results: dict) -> str:
    cfg = results["config"]
    tag = "\nRANDOM WEIGHTS (demo): the numbers say nothing about GPT-2" if cfg.get("random_weights") else ""
    shape = (f", {cfg['family']} Hq={cfg['n_heads']} Hkv={cfg['n_kv_heads']} D={cfg['head_dim']}"
             if "family" in cfg else "")
    cal = cfg["calibration"]["source"]
    return (f"EXP-Q03 {cfg['model']}\nlayers {cfg['layers']}, {cfg['n_blocks']}×{cfg['seq_len']} tokens{shape}, "
            f"basis from {CALIBRATION_NAMES[cal]}{tag}")


CALIBRATION_NAMES = {"heldout": "held-out blocks", "eval": "scored blocks (spec)", "text": "another text"}

SWEEP_PLOTS = (("delta_ppl_vs_dr.png", _plot_curve), ("cumulative_variance.png", _plot_spectrum))


def plots_for(results: dict) -> tuple:
    """``(file name, draw(results, path))`` for each plot of this kind of results."""
    if results.get("kind") == "scan":
        from .plots import SCAN_PLOTS

        return SCAN_PLOTS
    return SWEEP_PLOTS


def write_results(out_dir: str, results: dict, *, include_json: bool = True) -> list[str]:
    """Write results.json, the plots and basis.pt into ``out_dir``; all of them or none.

    ``include_json=False`` (``nqpq report``) redraws the plots only.
    """

    os.makedirs(out_dir, exist_ok=True)
    staging = tempfile.mkdtemp(dir=out_dir, prefix=".nqpq-")
    try:
        names = []
        if include_json:
            with open(os.path.join(staging, "results.json"), "w") as f:
                json.dump(json_ready(results), f, indent=2)
            names.append("results.json")
        for name, draw in plots_for(results):
            draw(results, os.path.join(staging, name))
            names.append(name)
        if "basis" in results:
            results["basis"].save(os.path.join(staging, "basis.pt"))
            names.append("basis.pt")
        written = []
        for name in names:
            os.replace(os.path.join(staging, name), os.path.join(out_dir, name))
            written.append(os.path.join(out_dir, name))
        return written
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def load_results(out_dir: str) -> dict:
    """``out_dir/results.json`` of a sweep or a scan, checked for kind, version and top-level keys."""
    from .errors import NqpqError
    from .scan import SCAN_FORMAT_VERSION
    from .sweep import SWEEP_FORMAT_VERSION

    path = os.path.join(out_dir, "results.json")
    try:
        with open(path, encoding="utf-8") as f:
            results = json.load(f)
    except FileNotFoundError as err:
        raise NqpqError(f"{path}: no such file (give the --out directory of a sweep or a scan)") from err
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise NqpqError(f"{path} cannot be read as JSON: {err}") from err
    if not isinstance(results, dict):
        raise NqpqError(f"{path}: expected a JSON object, got {type(results).__name__}")
    versions = {"sweep": SWEEP_FORMAT_VERSION, "scan": SCAN_FORMAT_VERSION}
    kind, version = results.get("kind"), results.get("format_version")
    if kind not in versions:
        raise NqpqError(f"{path}: 'kind' is {kind!r}, not 'sweep' or 'scan' (written by another nqpq version?)")
    if version != versions[kind]:
        raise NqpqError(f"{path}: a {kind} results.json of format version {version!r}; this nqpq reads version "
                        f"{versions[kind]} (re-run the {kind} with this version)")
    missing = [k for k in REQUIRED_KEYS[kind] if k not in results]
    if missing:
        raise NqpqError(f"{path}: a {kind} results.json without {missing}: the file is broken")
    return results


def print_report(results: dict, say: Callable[[str], None] = print) -> None:
    """The report a sweep or a scan printed when it ran, from its results dict alone."""
    if results.get("kind") == "scan":
        from .scan import print_scan_report

        print_scan_report(results, say)
    else:
        from .sweep import print_sweep_report

        print_sweep_report(results, say)


def redraw(out_dir: str, say: Callable[[str], None] = print) -> list[str]:
    """``nqpq report``: re-print the report and redraw every plot from ``out_dir/results.json``.

    Nothing is printed or written unless all of it can be: a file whose entries do not hold
    what this version writes raises ``NqpqError``.
    """
    from .errors import NqpqError

    results = load_results(out_dir)
    lines: list[str] = []
    try:
        print_report(results, lines.append)
        written = write_results(out_dir, results, include_json=False)
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as err:
        raise NqpqError(f"{os.path.join(out_dir, 'results.json')} is broken ({type(err).__name__}: {err}); "
                        "nothing was redrawn") from err
    for line in lines:
        say(line)
    return written

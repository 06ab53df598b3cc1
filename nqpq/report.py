"""Writing a sweep's results: ``results.json`` and PNG plots, whole or not at all."""

from __future__ import annotations

import json
import os
import shutil
import tempfile

RESULT_FILES = ("results.json", "delta_ppl_vs_dr.png", "cumulative_variance.png")


def check_out_dir(path: str) -> None:
    """Fail before the sweep runs, not after, if ``path`` cannot hold the results."""
    from .data import NqpqError

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

    curve = results["curve"]
    d_r = [c["d_r"] for c in curve]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4.8))
    ax1.plot(d_r, [c["delta_ppl"] for c in curve], "o-", label="C: top-1 + rank-d_r ε")
    ax1.axhline(results["ppl_top1"] - results["ppl_baseline"], color="tab:red", ls="--", label="A: top-1")
    ax1.axhline(results["ppl_full"] - results["ppl_baseline"], color="tab:green", ls=":", label="B: full")
    ax1.set(xlabel="d_r", ylabel="ΔPPL vs baseline", title="ΔPPL vs d_r")
    ax2.plot(d_r, [c["recovered_pct"] for c in curve], "o-")
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
    return f"EXP-Q03 {cfg['model']}\nlayers {cfg['layers']}, {cfg['n_blocks']}×{cfg['seq_len']} tokens{tag}"


def write_results(out_dir: str, results: dict) -> list[str]:
    """Write results.json, the plots and basis.pt into ``out_dir``; all of them or none."""

    os.makedirs(out_dir, exist_ok=True)
    staging = tempfile.mkdtemp(dir=out_dir, prefix=".nqpq-")
    try:
        with open(os.path.join(staging, "results.json"), "w") as f:
            json.dump(json_ready(results), f, indent=2)
        _plot_curve(results, os.path.join(staging, "delta_ppl_vs_dr.png"))
        _plot_spectrum(results, os.path.join(staging, "cumulative_variance.png"))
        names = list(RESULT_FILES)
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

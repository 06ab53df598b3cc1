"""``nqpq eval``'s outputs from its results dict alone: the printed report (per task, each metric of the model and of
every configuration with the paired difference, its 95 % interval and verdict, then a verdict line), the plot
``eval_deltas.png``, and results.json + the plot written whole or not at all."""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import textwrap
from collections.abc import Callable, Sequence

from .paired import BASELINE, BETTER, WORSE
from .plot_common import error_bars, pyplot
from .report_lines import describe_heads

PLOT_NAME = "eval_deltas.png"


def _num(value: float | None, signed: bool = False) -> str:
    """4 decimals, or 6 significant digits for large values (perplexities of random models run to 1e9)."""
    if value is None or not math.isfinite(value):
        return "n/a"
    sign = "+" if signed else ""
    return format(value, f"{sign}.6g" if abs(value) >= 1e4 else f"{sign}.4f")


def _ci(ci: Sequence[float] | None) -> str:
    return "no interval" if ci is None else f"[{_num(ci[0], True)}, {_num(ci[1], True)}]"


def print_eval_report(results: dict, say: Callable[[str], None] = print) -> None:
    """Per task: every metric of the model and of each configuration, the paired difference with its 95 % interval
    and verdict, then a verdict line on the task's primary metric."""
    cfg = results["config"]
    say(f"[eval] {cfg['model']}: layers {' '.join(map(str, cfg['layers']))} crystallized; lm-eval "
        f"{cfg['lm_eval']}, batch size 1; differences are configuration − model on the same documents, 95 % paired "
        f"bootstrap intervals ({results['bootstrap']['resamples']} resamples, seed {results['bootstrap']['seed']})")
    for line in describe_heads(results.get("heads")):
        say(line)
    for name, task in results["tasks"].items():
        say(f"[eval] {name} ({task['output_type']}, {task['n_items']} documents)")
        arrows = {key: key + {True: " ↑", False: " ↓"}.get(meta["higher_is_better"], "")
                  for key, meta in task["metrics"].items()}
        rows = [("metric", "configuration", "value", "Δ vs model", "95 % CI", "verdict")]
        for key in task["metrics"]:
            for config, scores in task["scores"].items():
                if config == BASELINE:
                    rows.append((arrows[key], config, _num(scores[key]), "", "", ""))
                    continue
                d = task["differences"][config][key]
                rows.append((arrows[key], config, _num(scores[key]), _num(d["delta"], True), _ci(d["ci95"]),
                             d["verdict"]))
        widths = [max(len(row[i]) for row in rows) for i in range(5)]
        for row in rows:
            say("  " + f"{row[0]:<{widths[0]}}  {row[1]:<{widths[1]}}  {row[2]:>{widths[2]}}  {row[3]:>{widths[3]}}  "
                f"{row[4]:<{widths[4]}}  {row[5]}".rstrip())
        if "generations" in task["items"][BASELINE]:  # generate_until: how often the text itself changed
            base = task["items"][BASELINE]["generations"]
            same = "; ".join(f"{config} {sum(a == b for a, b in zip(base, task['items'][config]['generations']))}"
                             for config in task["differences"])
            say(f"  generations identical to the model's (of {task['n_items']}): {same}")
        primary = task["primary_metric"]
        verdicts = "; ".join(f"{config} {d[primary]['verdict']} ({_num(d[primary]['delta'], True)}, 95 % CI "
                             f"{_ci(d[primary]['ci95'])})" for config, d in task["differences"].items())
        say(f"  verdict on {primary}: {verdicts}")


def plot_eval(results: dict, path: str) -> None:
    """Per task (a row) and metric (a panel): each configuration's difference against the model with its 95 %
    interval, a line at 0."""
    plt = pyplot()
    tasks = results["tasks"]
    n_cols = max(len(t["metrics"]) for t in tasks.values())
    configs = results["config"]["configurations"]
    height = 0.45 * len(configs) * len(tasks) + 1.6 * len(tasks) + 0.8
    fig, axes = plt.subplots(len(tasks), n_cols, squeeze=False, figsize=(max(4.2 * n_cols, 6.5), height))
    for row, (name, task) in enumerate(tasks.items()):
        for col in range(n_cols):
            ax = axes[row][col]
            if col >= len(task["metrics"]):
                ax.axis("off")
                continue
            key, meta = list(task["metrics"].items())[col]
            deltas = [task["differences"][c][key]["delta"] for c in configs]
            cis = [task["differences"][c][key]["ci95"] for c in configs]
            colors = [{BETTER: "tab:green", WORSE: "tab:red"}.get(task["differences"][c][key]["verdict"], "tab:grey")
                      for c in configs]
            ys = list(range(len(configs)))
            xerr = error_bars(deltas, cis)
            for y, x, color, k in zip(ys, deltas, colors, range(len(configs))):
                ax.errorbar([x], [y], xerr=None if xerr is None else [[xerr[0][k]], [xerr[1][k]]], fmt="o",
                            color=color, capsize=4)
            ax.axvline(0.0, color="black", lw=0.8)
            ax.set_yticks(ys, configs)
            ax.set_ylim(len(configs) - 0.5, -0.5)  # the first configuration on top, half a row of margin
            direction = {True: "higher is better", False: "lower is better"}.get(meta["higher_is_better"], "")
            ax.set_xlabel("Δ vs model" + (f" ({direction})" if direction else ""))  # the metric: in the title
            ax.set_title(f"{name}: {key} ({task['n_items']} docs)", fontsize=9)
    heads = results.get("heads")
    what = f"layers {' '.join(map(str, results['config']['layers']))} crystallized" + (
        f" ({heads['n_chosen']} heads chosen by {heads['by']})" if heads else "")
    # Wrapped to the figure's width: a GGUF file's label alone runs past two panels.
    title = textwrap.fill(f"nqpq eval {results['config']['model']}", width=int(45 * n_cols))
    fig.suptitle(f"{title}\n{what}: difference against the model with its 95 % paired interval", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_eval_results(out_dir: str, results: dict) -> list[str]:
    """Write results.json and the plot into ``out_dir``, each whole: both are made in a staging folder inside
    ``out_dir`` first, then moved in place (``os.replace``); on any failure neither is written."""
    os.makedirs(out_dir, exist_ok=True)
    staging = tempfile.mkdtemp(dir=out_dir, prefix=".nqpq-")
    try:
        with open(os.path.join(staging, "results.json"), "w") as f:
            json.dump(results, f, indent=2, allow_nan=True)
        plot_eval(results, os.path.join(staging, PLOT_NAME))
        written = []
        for name in ("results.json", PLOT_NAME):
            os.replace(os.path.join(staging, name), os.path.join(out_dir, name))
            written.append(os.path.join(out_dir, name))
        return written
    finally:
        shutil.rmtree(staging, ignore_errors=True)

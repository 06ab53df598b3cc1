"""A run's report: ``results.json`` and the plots written whole or not at all, read back, re-printed, redrawn; and
every line of the printed report of a sweep and of a scan, made from the results dict alone (the run and
``nqpq report`` print the same text); and what results.json says about the model's geometry and the software."""

from __future__ import annotations

import json
import os
import platform
import shutil
import sys
import tempfile
from collections.abc import Callable, Sequence

import torch

from .cost import cost_lines
from .crystallinity_table import format_sink_metrics, format_table
from .stats import MIN_BLOCKS, RECOVERED_PCT_LIMIT, blocks_to_halve, distinct_resamples, half_width
from .upgrade import UPGRADABLE, upgrade, upgrade_note
from .verdict import INCONCLUSIVE, RECOVERY_TARGET, YES, crosses_target, spectrum_by_layer

# results.json layouts (sweep, scan); `nqpq report` refuses others. 2: calibration source and draws, bootstrap
# intervals, block losses. 3: verdict["outcome"] (INCONCLUSIVE where top-1's loss is not measurable, no intervals
# below MIN_BLOCKS blocks, unbounded recovered-% bounds null) and, in a scan, each layer's verdict.
SWEEP_FORMAT_VERSION = 3
SCAN_FORMAT_VERSION = 3

# What each kind of results.json must hold at the top level; a file without them is refused.
REQUIRED_KEYS = {
    "sweep": ("ppl_baseline", "ppl_top1", "ppl_full", "curve", "spectrum", "mean_eff_dim", "verdict", "crystallinity",
              "config"),
    "scan": ("ppl_baseline", "layers", "crystallinity", "config"),
}


def check_out_dir(path: str) -> None:
    """Fail before the sweep runs, not after, if ``path`` cannot hold the results."""
    from ..errors import NqpqError

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


def plots_for(results: dict) -> tuple:
    """``(file name, draw(results, path))`` for each plot of this kind of results."""
    from .plots import SCAN_PLOTS, SWEEP_PLOTS

    if results.get("kind") == "scan":
        return SCAN_PLOTS
    # A sweep from before costs were recorded (an upgraded format-2 file) has no cost to plot.
    return SWEEP_PLOTS if "cost" in results else tuple(p for p in SWEEP_PLOTS if p[0] != "delta_ppl_vs_cost.png")


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
    """``out_dir/results.json`` of a sweep or a scan, checked for kind, version and top-level keys; a file of an
    older format this version can re-derive (``nqpq.results.upgrade``) is returned as today's format, marked
    ``upgraded_from``."""
    from ..errors import NqpqError

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
    if version in UPGRADABLE and version != versions[kind]:
        try:
            results = upgrade(results, version)
        except (KeyError, TypeError, ValueError, IndexError, AttributeError, StopIteration) as err:
            raise NqpqError(f"{path}: a {kind} results.json of format version {version} that cannot be re-derived "
                            f"under version {versions[kind]}'s rule ({type(err).__name__}: {err})") from err
    elif version != versions[kind]:
        raise NqpqError(f"{path}: a {kind} results.json of format version {version!r}; this nqpq reads version "
                        f"{versions[kind]} (re-run the {kind} with this version)")
    missing = [k for k in REQUIRED_KEYS[kind] if k not in results]
    if missing:
        raise NqpqError(f"{path}: a {kind} results.json without {missing}: the file is broken")
    return results


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
        recovered = "  n/a" if c["recovered_pct"] is None else f"{_pct(c['recovered_pct']):>6}"
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


def describe_sink(head: int, settings: Sequence[int]) -> list[str]:
    """The report's line on the ground state: the spec's V[i*], or the sink kept apart; and the settings compared."""
    lines = []
    if head:
        lines.append(f" ground state: the first {head} key(s) kept exactly (the sink), the rest of the mass on the "
                     "winner among the other keys (--sink-tokens)")
    if len(settings) > 1:
        lines.append(f" sink settings compared side by side: {', '.join(map(str, settings))} (the report's numbers: "
                     f"{head}; each setting has its own basis)")
    return lines


def describe_blocks(cfg: dict) -> str:
    """One line for the report: how many blocks of what were scored, and whether each starts with BOS."""
    if cfg.get("bos"):
        return (f"{cfg['n_blocks']} x {cfg['seq_len']} tokens, each BOS (id {cfg['bos_token_id']}) + "
                f"{cfg['seq_len'] - 1} text tokens (BOS is never scored; 'sink' = the BOS position)")
    return (f"{cfg['n_blocks']} x {cfg['seq_len']} tokens cut from the text, no BOS ('sink' = the block's first "
            "token)")


def head_widths(cfg: dict) -> str:
    """``D=…``, or ``D_qk=…, D_v=…`` where q/k and v heads differ (multi-head latent attention); a learned sink
    is named (results written before these keys existed have one head_dim)."""
    qk, v = cfg.get("qk_dim", cfg["head_dim"]), cfg.get("v_dim", cfg["head_dim"])
    widths = f"D={v}" if qk == v else f"D_qk={qk}, D_v={v}"
    sinks = cfg.get("learned_sink")
    return widths + (", learned sinks" if sinks is True or (isinstance(sinks, dict) and any(sinks.values())) else "")


def describe_geometry(cfg: dict) -> str:
    """One line for the report: family, Hq/Hkv/D and the window/softcaps in force on the crystallized layers."""
    windows = sorted({w for w in cfg["sliding_window"].values() if w is not None})
    # Llama 4's chunked layers (results files written before the field have none): named only where in force.
    chunk_sizes = sorted({c for c in (cfg.get("attention_chunk") or {}).values() if c is not None})
    chunks = f", attention chunks {'/'.join(map(str, chunk_sizes))}" if chunk_sizes else ""
    # A multimodal wrapper (Gemma 3's ForConditionalGeneration) is scored through its text model: name both.
    family = f"{cfg['wrapper']} (text model {cfg['family']})" if cfg.get("wrapper") else cfg["family"]
    return (f"{family}, {cfg['n_layers']} layers, Hq={cfg['n_heads']}, Hkv={cfg['n_kv_heads']}, "
            f"{head_widths(cfg)}, sliding window {'/'.join(map(str, windows)) if windows else 'none'}{chunks}, "
            f"attention softcap {cfg['attn_softcap'] or 'none'}, logit softcap {cfg['final_logit_softcap'] or 'none'}"
            f" ({cfg['dtype']})")


def describe_calibration(cfg: dict) -> list[str]:
    """The report's lines on where the basis was fitted (from results.json's ``config``)."""
    cal = cfg["calibration"]
    c, k, first = cal["blocks_per_draw"], cal["draws"], cal["first_blocks"][0]
    span = f"block {first}" if c * k == 1 else f"blocks {first}..{first + c * k - 1}"
    sets = f"{k} disjoint sets of {c} blocks ({span})" if k > 1 else span
    if cal["source"] == "eval":
        return [f" calibration: the spec's choice, the first {c} scored blocks ({span})",
                f" NOTE: the basis saw {cal['scored_blocks_seen']} of the {cfg['n_blocks']} scored blocks, so "
                "recovered % may be optimistic (--calib-from heldout fits it on blocks that are not scored)"]
    if cal["source"] == "text":
        return [f" calibration: another text, {cal['text']}: {sets}"]
    return [f" calibration: held out, {sets} of the same text, after the scored ones (no scored token seen by "
            "the basis)"]


def verdict_summary(verdict: dict) -> str:
    """The verdict in a few words, for side-by-side tables and the scan's per-layer column."""
    outcome = verdict["outcome"]  # a format-2 file is upgraded when read (load_results), so every verdict has one
    if outcome == INCONCLUSIVE:
        why = {"no_measurable_loss": " (top-1 dPPL CI holds 0)", "too_few_blocks": f" ({verdict['n_blocks']} blocks)",
               "not_finite": " (a PPL not finite)"}.get(verdict.get("reason"), "")
        return f"INCONCLUSIVE{why}"
    unsettled = "" if verdict["settled"] else " (not settled)"
    if outcome == YES:
        return f"YES d_r={verdict['d_r_min']}{unsettled}"
    return f"PARTIAL best d_r={verdict['best_d_r']} {_pct(verdict['best_recovered_pct'], '.0f')}{unsettled}"


def top1_note(verdict: dict) -> str:
    """After top-1's interval in the report: that it holds 0 (or is missing), when that makes the run INCONCLUSIVE."""
    if verdict["outcome"] != INCONCLUSIVE or verdict["reason"] == "not_finite":
        return ""
    if verdict["reason"] == "too_few_blocks":
        return f" (no interval below {MIN_BLOCKS} blocks: recovered % is n/a)"
    return " (holds 0: no measurable loss, recovered % is n/a)"


def spectrum_table(spectrum: Sequence[dict], d_head: int) -> list[str]:
    """The residual spectrum table: per layer the mean over its heads (what cumulative_variance.png plots) and head
    0 (the spec's row), each labelled."""
    lines = [f"\n Residual effective dimension (cumulative variance of eps, d_head={d_head}; 'mean': over the layer's "
             "heads, as plotted in cumulative_variance.png; 'H 0': head 0 alone, the spec's row):",
             f" {'layer/head':>14} | r=1  r=2  r=4  r=8  r=16"]
    for layer, s in spectrum_by_layer(spectrum).items():
        for label, cv in ((f"L{layer:2d} mean of {s['heads']}", s["mean"]), (f"L{layer:2d} H 0", s["head0"])):
            lines.append(f" {label:>14} | " + " ".join(f"{cv[min(r - 1, len(cv) - 1)]:.2f}" for r in (1, 2, 4, 8, 16)))
    return lines


def sink_comparison(sinks: Sequence[dict], ppl_baseline: float, d_rs: Sequence[int]) -> list[str]:
    """The sink settings side by side: top-1 ΔPPL with its interval, mean r90, recovered % per d_r, verdict."""
    lines = ["", " Sink kept apart, side by side (n = sink tokens; each n its own basis, top-1 and low-rank runs):",
             f" {'n':>3} | {'top-1 dPPL':>10} {'95% CI':>20} | {'r90':>5} | "
             + " ".join(f"{f'd_r={d}':>7}" for d in d_rs) + " | verdict"]
    for e in sinks:
        recovered = " ".join(f"{_pct(c['recovered_pct']):>7}" for c in e["curve"])
        lines.append(f" {e['sink_tokens']:3d} | {e['ppl_top1'] - ppl_baseline:+10.3f} "
                     f"{format_ci(e['top1_delta_ppl_ci95']):>20} | {e['mean_eff_dim']:5.1f} | {recovered} | "
                     f"{verdict_summary(e['verdict'])}")
    return lines


def _bound(v: float | None, fmt: str, side: int) -> str:
    """One bound of an interval: a ΔPPL ("+" in ``fmt``) as is; a recovered % past ±RECOVERED_PCT_LIMIT, or None
    (unbounded: ``side`` -1 for a low end, +1 for a high end), as "<-1000" / ">1000"."""
    if v is None:
        return f"<-{RECOVERED_PCT_LIMIT:.0f}" if side < 0 else f">{RECOVERED_PCT_LIMIT:.0f}"
    if "+" not in fmt and abs(v) >= RECOVERED_PCT_LIMIT:
        return f"<-{RECOVERED_PCT_LIMIT:.0f}" if v < 0 else f">{RECOVERED_PCT_LIMIT:.0f}"
    return format(v, fmt)


def format_ci(ci: Sequence[float | None] | None, fmt: str = "+.3f") -> str:
    """``[lo, hi]`` of a 95 % interval, or n/a (fmt "+..." for ΔPPL; otherwise a recovered %, unbounded sides
    printed as "<-1000" / ">1000")."""
    return "n/a" if ci is None else f"[{_bound(ci[0], fmt, -1)}, {_bound(ci[1], fmt, 1)}]"


def _span(ci: Sequence[float | None]) -> str:
    return f"{_bound(ci[0], '.0f', -1)}–{_bound(ci[1], '.0f', 1)}"


def interval_notes(bootstrap: dict, recovered_cis: Sequence[Sequence[float | None] | None]) -> list[str]:
    """How the intervals were made; that there are none below MIN_BLOCKS blocks; how many blocks would halve wide
    ones."""
    n = bootstrap["n_blocks"]
    if n < bootstrap["min_blocks"]:
        return [f" no confidence intervals: {n} scored block{'s' * (n != 1)} (a paired bootstrap over {n} has "
                f"{distinct_resamples(n)} distinct resamples; intervals need --n-blocks {bootstrap['min_blocks']} or "
                "more, docs/verdict.md)"]
    lines = [f" 95% CI: {bootstrap['method']}, {bootstrap['resamples']} resamples of the {n} blocks "
             f"(seed {bootstrap['seed']})"]
    widths = [half_width(ci) for ci in recovered_cis if ci is not None]
    if widths and max(widths) > 10:
        widest = (f"unbounded (a bound past ±{RECOVERED_PCT_LIMIT:.0f}%)" if max(widths) == float("inf")
                  else f"±{max(widths):.0f} points")
        lines.append(f" the widest interval of recovered % is {widest}: about four times as many "
                     f"blocks (--n-blocks {blocks_to_halve(n)}) would halve the intervals")
    return lines


def draw_lines(curve: list[dict], calibration: dict) -> list[str]:
    """Each d_r's recovered % per calibration draw and their spread; or that calibration variability is unmeasured."""
    if calibration["draws"] < 2:
        return [" calibration variability not measured (one basis; --calib-draws K fits K bases on disjoint "
                "held-out sets)"]
    lines = [f" recovered % per calibration draw ({calibration['draws']} bases, {calibration['blocks_per_draw']} "
             "blocks each; draw 0 above):"]
    for c in curve:
        values = " ".join(f"{_pct(r):>6}" for r in c["recovered_pct_draws"])
        spread = "n/a" if c["recovered_pct_spread"] is None else f"{c['recovered_pct_spread']:.1f} points"
        lines.append(f" d_r={c['d_r']:2d}: {values} | spread {spread}")
    return lines


def verdict_lines(verdict: dict, curve: list[dict], d_head: int) -> list[str]:
    """The verdict, with d_r_min's (or the best d_r's) interval and, when not settled, why."""
    if verdict["outcome"] == INCONCLUSIVE:
        return [f" => INCONCLUSIVE: {verdict['explanation']}.",
                "    Recovered % is defined only where top-1's loss is measurable (docs/verdict.md): no "
                "compressibility claim either way."]
    ci, rec, n = verdict["ci95"], verdict["recovered_pct"], verdict["n_blocks"]
    with_ci = f" (95% CI {_span(ci)})" if ci is not None else ""
    reasons = []
    if ci is None:
        reasons.append("there is no interval")
    elif verdict["outcome"] == YES and (ci[0] is None or ci[0] < RECOVERY_TARGET):
        reasons.append(f"the 95% CI ({_span(ci)}) reaches below 90%")
    elif verdict["outcome"] != YES:
        reaching = [c["d_r"] for c in curve if c["recovered_pct_ci95"]
                    and (c["recovered_pct_ci95"][1] is None or c["recovered_pct_ci95"][1] >= RECOVERY_TARGET)]
        if reaching:
            reasons.append(f"the 95% CI of d_r={', '.join(map(str, reaching))} reaches 90%")
    if verdict["draws_agree"] is False:
        mins = ", ".join("none" if d is None else str(d) for d in verdict["draws_d_r_min"])
        reasons.append(f"the {len(verdict['draws_d_r_min'])} calibration draws disagree (d_r_min per draw: {mins})")
    at = f"{n} block{'s' * (n != 1)}"
    unsettled = f"but {'; '.join(reasons)}: not settled at {at}." if reasons else ""
    if verdict["outcome"] == YES:
        dr_min = verdict["d_r_min"]
        if reasons:
            return [f" => YES at d_r={dr_min}/{d_head} ({_pct(rec, '.0f')} of the Top-1 loss), {unsettled}"]
        return [f" => YES: d_r={dr_min}/{d_head} recovers {_pct(rec, '.0f')}{with_ci} of the Top-1 loss (>=90%). "
                f"Deep layers are nearly crystalline + a rank-{dr_min} excitation. Compressible attention found."]
    lines = [f" => PARTIAL: best is d_r={verdict['best_d_r']} recovering {_pct(rec, '.0f')}{with_ci}. The residual "
             "is not strongly low-rank; excitations are spread across many value dimensions."]
    lines.append(f"    {unsettled}" if reasons else f"    Every d_r's 95% CI is below 90%: settled at {at}.")
    return lines


def _pct(pct: float | None, fmt: str = ".1f") -> str:
    """A recovered %: n/a for None; past ±RECOVERED_PCT_LIMIT as ">1000%" / "<-1000%" (the stored number is kept)."""
    if pct is None:
        return "n/a"
    if abs(pct) >= RECOVERED_PCT_LIMIT:
        return f"<-{RECOVERED_PCT_LIMIT:.0f}%" if pct < 0 else f">{RECOVERED_PCT_LIMIT:.0f}%"
    return f"{pct:{fmt}}%"


def describe_heads(heads: dict | None) -> list[str]:
    """The report's lines for ``--heads`` (results.json's ``heads``; none without the flag, or in older files): the
    heads crystallized per layer, how they were chosen and, for a rule, each layer's measured values."""
    if not heads:
        return []
    how = f"rule {heads['rule']}" if heads["by"] == "rule" else "index"
    chosen = " ".join(f"{layer}:{','.join(map(str, hs))}" for layer, hs in heads["chosen"].items())
    lines = [f" heads: {heads['n_chosen']} crystallized by {how}: {chosen} (the other heads: plain attention)"]
    if heads.get("values"):
        where = heads["measured_on"]
        lines.append(f"  {heads['stat']} per head, measured on {where['blocks']} {where['source']} calibration "
                     f"blocks from block {where['first_block']} (sink_tokens={where['sink_tokens']}):")
        for layer, values in heads["values"].items():
            lines.append(f"  layer {layer:>3}: " + " ".join(f"{v:.3f}" for v in values))
    return lines


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
        recovered = " ".join(f"{'--' if inconclusive else _pct(c['recovered_pct']):>7}" for c in e["curve"])
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
                f"d_r={c['d_r']} " + " ".join(_pct(r) for r in c["recovered_pct_draws"])
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
                cells.append(f"{row['ppl_top1'] - ppl_fp:+8.3f} " + " ".join(_pct(c["recovered_pct"])
                                                                            for c in row["curve"])
                             + f" {row['r90_mean']:.1f}")
            say(f" {layer:5d} | " + " | ".join(cells))
    if cfg["random_weights"]:
        say(" NOTE: DEMO run on RANDOM weights: the pipeline is real, the numbers say nothing about GPT-2.")


def geometry_config(parts, layers: Sequence[int]) -> dict:
    """What results.json says about the model: family, heads, head dim, and the window/softcaps in force."""
    def per_layer(field):  # one number when the chosen layers agree, else one per layer
        values = {str(li): getattr(parts.geometry[li], field) for li in layers}
        return next(iter(values.values())) if len(set(values.values())) == 1 else values

    return {"family": parts.family, "wrapper": parts.wrapper, "n_layers": parts.n_layers,
            "attn_layers": list(parts.attn_layers), "n_heads": per_layer("n_heads"),
            "n_kv_heads": per_layer("n_kv_heads"), "head_dim": per_layer("v_dim"), "qk_dim": per_layer("qk_dim"),
            "v_dim": per_layer("v_dim"), "learned_sink": per_layer("learned_sink"),
            "sliding_window": {str(li): parts.geometry[li].sliding_window for li in layers},
            "attention_chunk": {str(li): parts.geometry[li].attention_chunk for li in layers},
            "attn_softcap": parts.attn_softcap, "final_logit_softcap": parts.final_logit_softcap}


def versions(device: torch.device) -> dict:
    """results.json's software versions and the device's name."""
    import transformers

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "cpu")
    return {"torch": torch.__version__, "transformers": transformers.__version__, "triton": triton_version,
            "python": sys.version.split()[0], "device_name": name}

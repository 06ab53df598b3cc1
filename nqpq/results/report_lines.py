"""The pieces of the printed reports, each from the results dict alone: the lines on the model, the blocks, the
calibration, the sink and ``--heads``; the spectrum table; the 95 % intervals and how they were made; the calibration
draws; the verdict and its summary; the sink settings side by side; and how a recovered % or an interval is printed.
``nqpq.results.report`` puts them together into the report of a sweep and of a scan; the reports of ``nqpq eval`` and
``nqpq generate`` share the ``--heads`` lines."""

from __future__ import annotations

from collections.abc import Sequence

from .stats import MIN_BLOCKS, RECOVERED_PCT_LIMIT, blocks_to_halve, distinct_resamples, half_width
from .verdict import INCONCLUSIVE, RECOVERY_TARGET, YES, spectrum_by_layer


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
    return f"PARTIAL best d_r={verdict['best_d_r']} {pct_text(verdict['best_recovered_pct'], '.0f')}{unsettled}"


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
        recovered = " ".join(f"{pct_text(c['recovered_pct']):>7}" for c in e["curve"])
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
        values = " ".join(f"{pct_text(r):>6}" for r in c["recovered_pct_draws"])
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
            return [f" => YES at d_r={dr_min}/{d_head} ({pct_text(rec, '.0f')} of the Top-1 loss), {unsettled}"]
        return [f" => YES: d_r={dr_min}/{d_head} recovers {pct_text(rec, '.0f')}{with_ci} of the Top-1 loss (>=90%). "
                f"Deep layers are nearly crystalline + a rank-{dr_min} excitation. Compressible attention found."]
    lines = [f" => PARTIAL: best is d_r={verdict['best_d_r']} recovering {pct_text(rec, '.0f')}{with_ci}. The residual "
             "is not strongly low-rank; excitations are spread across many value dimensions."]
    lines.append(f"    {unsettled}" if reasons else f"    Every d_r's 95% CI is below 90%: settled at {at}.")
    return lines


def pct_text(pct: float | None, fmt: str = ".1f") -> str:
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

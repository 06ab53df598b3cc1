"""Attention cost of each sweep configuration by formula: FLOPs and bytes moved per prefill token and per decode step.

Pure formulas from the attention geometry (docs/cost.md derives each term). Per query head and query, with n the
keys it sees (causal, a sliding window or a chunk), Dqk q/k's width, Dv v's, d_r the rank, n_S the sink keys kept
apart (``sink_tokens``)::

    scores    2·Dqk·n            every configuration (the argmax is taken on them)
    softmax   4·n                max, subtract, exp, sum: full, low rank, top-1 with a sink
    argmax    n                  top-1 and low rank
    P·V       2·Dv·n             full
    P·(V P_r) 2·d_r·n            low rank through V·P_r, plus 2·Dv·d_r to form the key's row of V P_r
                                 (once per key and query head) and 2·Dv·d_r for P_r (p·(V P_r) − (V P_r)[i*])
    sink      2·Dv·n_S           top-1 / low rank with n_S > 0: Σ_S p_j V_j (low rank: + 2·Dv·d_r to project it)

Bytes are the compulsory traffic of one layer in the inputs' element size (a streaming kernel reads each operand
once): prefill per token q, k, v and out (low rank adds V P_r written once and read once); a decode step reads
the whole K cache and the V cache (full), one V row per query head (top-1, low rank: V[i*]), the V P_r cache
(low rank, one [n, d_r] per query head) and P_r itself (fp32), and the sink's V rows. ``baseline`` is the model's
own attention: full attention's cost. Relative costs are against full attention on the same crystallized layers.

A configuration's dict also carries the op time measured on the run's device (``nqpq.experiments.op_cost``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

SOFTMAX_FLOPS_PER_KEY = 4  # max, subtract, exp, sum
ARGMAX_FLOPS_PER_KEY = 1  # one comparison
BASIS_BYTES = 4  # the basis is read in fp32


@dataclass(frozen=True)
class AttentionShape:
    """What the cost of one layer's attention depends on (``nqpq.model.geometry.LayerGeometry`` has these)."""

    n_heads: int
    n_kv_heads: int
    qk_dim: int
    v_dim: int
    sliding_window: int | None = None
    attention_chunk: int | None = None


def visible_keys(position: int, shape: AttentionShape) -> int:
    """Keys the query at 0-based ``position`` sees: causal, within its window or its chunk."""
    if shape.sliding_window is not None:
        return min(position + 1, shape.sliding_window)
    if shape.attention_chunk is not None:
        return position % shape.attention_chunk + 1
    return position + 1


def mean_visible_keys(seq_len: int, shape: AttentionShape) -> float:
    """Keys a prefill query sees, averaged over the positions 0 .. seq_len − 1."""
    if shape.sliding_window is None and shape.attention_chunk is None:
        return (seq_len + 1) / 2
    return sum(visible_keys(i, shape) for i in range(seq_len)) / seq_len


def query_flops(shape: AttentionShape, mode: str, d_r: int | None, sink_tokens: int, n_keys: float) -> float:
    """FLOPs of one query head's attention over ``n_keys`` keys (the table of the module docstring)."""
    dq, dv = shape.qk_dim, shape.v_dim
    n_sink = min(sink_tokens, n_keys)
    flops = 2 * dq * n_keys
    if mode in ("full", "baseline"):
        return flops + SOFTMAX_FLOPS_PER_KEY * n_keys + 2 * dv * n_keys
    flops += ARGMAX_FLOPS_PER_KEY * n_keys
    if sink_tokens:
        flops += SOFTMAX_FLOPS_PER_KEY * n_keys + 2 * dv * n_sink
    if mode == "top1":
        return flops
    if mode != "lowrank" or d_r is None:
        raise ValueError(f"mode must be baseline, full, top1 or lowrank with d_r, got {mode!r} d_r={d_r}")
    if not sink_tokens:
        flops += SOFTMAX_FLOPS_PER_KEY * n_keys
    flops += 2 * d_r * n_keys + 2 * dv * d_r  # P·(V P_r) and P_r ε_r
    if sink_tokens:
        flops += 2 * dv * d_r  # P_rᵀ Σ_S p_j V_j
    return flops


def prefill_flops_per_token(shape: AttentionShape, mode: str, d_r: int | None, sink_tokens: int,
                            seq_len: int) -> float:
    """One layer's attention FLOPs per prefill token (every query head), at ``seq_len``."""
    flops = query_flops(shape, mode, d_r, sink_tokens, mean_visible_keys(seq_len, shape))
    if mode == "lowrank":
        flops += 2 * shape.v_dim * d_r  # this token's row of V P_r, per query head
    return shape.n_heads * flops


def decode_flops_per_step(shape: AttentionShape, mode: str, d_r: int | None, sink_tokens: int,
                          context_len: int) -> float:
    """One layer's attention FLOPs for one decode step whose query sees a ``context_len``-token cache."""
    flops = query_flops(shape, mode, d_r, sink_tokens, visible_keys(context_len - 1, shape))
    if mode == "lowrank":
        flops += 2 * shape.v_dim * d_r  # the new key's row of V P_r, per query head
    return shape.n_heads * flops


def prefill_bytes_per_token(shape: AttentionShape, mode: str, d_r: int | None, elem_bytes: int) -> float:
    """One layer's compulsory bytes per prefill token: q, k, v read and out written once (+ V P_r for low rank)."""
    elems = (shape.n_heads * shape.qk_dim + shape.n_kv_heads * shape.qk_dim + shape.n_kv_heads * shape.v_dim
             + shape.n_heads * shape.v_dim)
    if mode == "lowrank":
        elems += 2 * shape.n_heads * d_r  # V P_r written once, read once
    return elems * elem_bytes


def decode_bytes_per_step(shape: AttentionShape, mode: str, d_r: int | None, sink_tokens: int, context_len: int,
                          elem_bytes: int) -> float:
    """One layer's bytes for one decode step at ``context_len``: q, the new k/v written, out; the K cache; then
    the V cache (full), or V[i*] per query head and the sink's V rows (top-1), plus the V P_r cache, its new row
    and P_r (low rank)."""
    n = visible_keys(context_len - 1, shape)
    n_sink = min(sink_tokens, n)
    hq, hkv, dq, dv = shape.n_heads, shape.n_kv_heads, shape.qk_dim, shape.v_dim
    elems = hq * dq + hkv * (dq + dv) + hq * dv + hkv * n * dq
    basis_bytes = 0
    if mode in ("full", "baseline"):
        elems += hkv * n * dv
    else:
        elems += hq * dv + hkv * n_sink * dv
        if mode == "lowrank":
            elems += hq * n * d_r + hq * d_r
            basis_bytes = hq * dv * d_r * BASIS_BYTES
    return elems * elem_bytes + basis_bytes


def configuration_cost(shapes: Sequence[AttentionShape], mode: str, d_r: int | None, sink_tokens: int,
                       seq_len: int, context_len: int, elem_bytes: int) -> dict:
    """A configuration's cost summed over the crystallized layers (``shapes``, one per layer), with each figure
    relative to full attention on the same layers."""
    def total(fn: Callable[[AttentionShape, str], float]) -> tuple[float, float]:
        mine = sum(fn(s, mode) for s in shapes)
        full = sum(fn(s, "full") for s in shapes)
        return mine, mine / full

    pf, pf_rel = total(lambda s, m: prefill_flops_per_token(s, m, d_r, sink_tokens, seq_len))
    pb, pb_rel = total(lambda s, m: prefill_bytes_per_token(s, m, d_r, elem_bytes))
    df, df_rel = total(lambda s, m: decode_flops_per_step(s, m, d_r, sink_tokens, context_len))
    db, db_rel = total(lambda s, m: decode_bytes_per_step(s, m, d_r, sink_tokens, context_len, elem_bytes))
    return {
        "mode": mode, "d_r": d_r, "sink_tokens": sink_tokens,
        "prefill_flops_per_token": pf, "prefill_bytes_per_token": pb,
        "decode_flops_per_step": df, "decode_bytes_per_step": db,
        "relative_prefill_flops": pf_rel, "relative_prefill_bytes": pb_rel,
        "relative_decode_flops": df_rel, "relative_decode_bytes": db_rel,
    }


def cost_lines(results: dict) -> list[str]:
    """The report's cost table: each configuration's ΔPPL beside its cost relative to full attention (none for
    results written before costs were recorded)."""
    cost = results.get("cost")
    if not cost:
        return []
    delta = {}
    base = results.get("ppl_baseline")
    if base is not None:
        delta["full"] = results.get("ppl_full", base) - base
        delta["baseline"] = 0.0
        head = results.get("sink_tokens", 0)
        for setting in results.get("sinks", []):  # the sweep's keys: the headline setting untagged
            tag = "" if setting["sink_tokens"] == head else f"_sink{setting['sink_tokens']}"
            delta[f"top1{tag}"] = setting["ppl_top1"] - base
            delta.update({f"lowrank_d{c['d_r']}{tag}": c["delta_ppl"] for c in setting["curve"]})
    lines = [
        f"Cost of the crystallized layers' attention, relative to full attention (prefill at T {cost['seq_len']}, "
        f"decode at context {cost['decode_context_len']}; op time: {cost['device']}, "
        f"{cost['dtype']}, {cost.get('op_time_statistic', 'median')} of {cost['repeats']}):",
        f"  {'configuration':<18} {'ΔPPL':>9} {'prefill FLOPs':>13} {'decode FLOPs':>12} {'decode bytes':>12} "
        f"{'op ms':>9} {'op time':>8}",
    ]
    for c in cost["configurations"]:
        d = delta.get(c["key"])
        d_txt = f"{d:+9.3f}" if d is not None else f"{'-':>9}"
        t_txt = f"{c['op_time_ms']:9.2f}" if c.get("op_time_ms") is not None else f"{'-':>9}"
        r_txt = f"{c['relative_op_time']:7.2f}×" if c.get("relative_op_time") is not None else f"{'-':>8}"
        lines.append(f"  {c['key']:<18} {d_txt} {c['relative_prefill_flops']:12.2f}× "
                     f"{c['relative_decode_flops']:11.2f}× {c['relative_decode_bytes']:11.2f}× {t_txt} {r_txt}")
    return lines

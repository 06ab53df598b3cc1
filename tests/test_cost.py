"""The cost formulas (nqpq.results.cost) against counts made here by brute force, and the cost plot's Pareto front."""

from __future__ import annotations

import pytest

from nqpq.results.cost import (
    AttentionShape,
    configuration_cost,
    cost_lines,
    decode_bytes_per_step,
    mean_visible_keys,
    prefill_flops_per_token,
    visible_keys,
)
from nqpq.results.sweep_plots import pareto_front

SMOLLM2 = AttentionShape(n_heads=9, n_kv_heads=3, qk_dim=64, v_dim=64)


def brute_prefill_flops(shape: AttentionShape, mode: str, d_r: int | None, seq_len: int) -> float:
    """Count every query's work key by key (no sink): the definition the formulas sum in closed form."""
    total = 0
    for i in range(seq_len):
        keys = [j for j in range(i + 1) if (shape.sliding_window is None or i - j < shape.sliding_window)
                and (shape.attention_chunk is None or j // shape.attention_chunk == i // shape.attention_chunk)]
        n = len(keys)
        per_head = 2 * shape.qk_dim * n  # scores
        if mode == "full":
            per_head += 4 * n + 2 * shape.v_dim * n
        elif mode == "top1":
            per_head += n
        else:
            per_head += n + 4 * n + 2 * d_r * n + 2 * shape.v_dim * d_r + 2 * shape.v_dim * d_r
        total += shape.n_heads * per_head
    return total / seq_len


@pytest.mark.parametrize("shape", [SMOLLM2, AttentionShape(4, 2, 32, 16, sliding_window=5),
                                   AttentionShape(4, 4, 16, 16, attention_chunk=7)], ids=["causal", "window", "chunk"])
@pytest.mark.parametrize("mode, d_r", [("full", None), ("top1", None), ("lowrank", 8)])
def test_prefill_flops_match_a_key_by_key_count(shape, mode, d_r):
    assert prefill_flops_per_token(shape, mode, d_r, 0, 37) == pytest.approx(brute_prefill_flops(shape, mode, d_r, 37))


def test_visible_keys():
    assert [visible_keys(i, AttentionShape(1, 1, 16, 16)) for i in range(4)] == [1, 2, 3, 4]
    assert [visible_keys(i, AttentionShape(1, 1, 16, 16, sliding_window=2)) for i in range(4)] == [1, 2, 2, 2]
    assert [visible_keys(i, AttentionShape(1, 1, 16, 16, attention_chunk=3)) for i in range(5)] == [1, 2, 3, 1, 2]
    assert mean_visible_keys(4, AttentionShape(1, 1, 16, 16)) == 2.5


def test_low_rank_through_vp_costs_about_d_plus_dr_over_2d_at_long_context():
    # Issue 35's estimate: total attention FLOPs ~ (D + d_r) / (2D) of full (the softmax and argmax terms aside).
    c = configuration_cost([SMOLLM2], "lowrank", 8, 0, seq_len=8192, context_len=8192, elem_bytes=2)
    assert c["relative_prefill_flops"] == pytest.approx((64 + 8) / 128, abs=0.03)
    assert c["relative_prefill_flops"] > (64 + 8) / 128  # the softmax and argmax are on top


def test_decode_bytes_by_hand():
    L, s = 100, 2
    full = decode_bytes_per_step(SMOLLM2, "full", None, 0, L, s)
    common = (9 * 64 + 3 * 128 + 9 * 64) * s  # q, the new k and v, out
    assert full == common + 3 * L * 64 * s * 2  # K and V caches
    top1 = decode_bytes_per_step(SMOLLM2, "top1", None, 2, L, s)
    assert top1 == common + 3 * L * 64 * s + 9 * 64 * s + 3 * 2 * 64 * s  # K, V[i*] per head, the sink's V rows
    low = decode_bytes_per_step(SMOLLM2, "lowrank", 8, 0, L, s)
    assert low == common + 3 * L * 64 * s + 9 * 64 * s + 9 * L * 8 * s + 9 * 8 * s + 9 * 64 * 8 * 4


def test_baseline_and_full_are_the_unit():
    for mode in ("baseline", "full"):
        c = configuration_cost([SMOLLM2, AttentionShape(9, 3, 64, 64, sliding_window=128)], mode, None, 0, 256,
                               256, 2)
        assert all(c[k] == 1.0 for k in c if k.startswith("relative_"))


def test_sinks_add_their_keys_work():
    no_sink = prefill_flops_per_token(SMOLLM2, "top1", None, 0, 64)
    sink = prefill_flops_per_token(SMOLLM2, "top1", None, 4, 64)
    assert sink > no_sink  # the softmax (m_S) and Σ_S p_j V_j


def test_pareto_front():
    xs = [1.0, 0.5, 0.6, 0.7, 0.55]
    ys = [0.0, 3.0, 1.0, 1.5, 2.0]
    assert pareto_front(xs, ys) == [1, 4, 2, 0]


def test_cost_lines_name_each_configuration_with_its_delta():
    results = {"ppl_baseline": 10.0, "ppl_full": 10.0, "sink_tokens": 0,
               "sinks": [{"sink_tokens": 0, "ppl_top1": 12.0, "curve": [{"d_r": 8, "delta_ppl": 0.5}]}],
               "cost": {"seq_len": 256, "decode_context_len": 256, "device": "cpu", "dtype": "float32", "repeats": 3,
                        "configurations": [
                            {"key": k, "relative_prefill_flops": 1.0, "relative_decode_flops": 1.0,
                             "relative_decode_bytes": 1.0, "op_time_ms": 2.0, "relative_op_time": 1.0}
                            for k in ("full", "top1", "lowrank_d8")]}}
    lines = cost_lines(results)
    assert len(lines) == 5
    assert "+2.000" in lines[3] and "+0.500" in lines[4]
    assert cost_lines({"ppl_baseline": 1.0}) == []


def test_op_times_come_from_interleaved_rounds_and_keep_the_fastest(monkeypatch):
    """Every configuration is timed together, after one warm-up each, in rotated interleaved rounds, the fastest
    round kept (times summed over layers of one geometry): a load that comes and goes cannot favour one of them."""
    from types import SimpleNamespace

    import torch

    from nqpq.experiments import op_cost

    geometry = SimpleNamespace(n_heads=4, n_kv_heads=2, qk_dim=16, v_dim=16, sliding_window=None,
                               attention_chunk=None)
    rec = op_cost.CostRecorder({0: geometry, 1: geometry}, [0, 1], 32, torch.device("cpu"), torch.float32, "torch",
                               repeats=3)
    clock = [0.0]
    calls: list[str] = []
    # Per configuration, the seconds each successive call takes: a warm-up, then 3 rounds.
    durations = {"baseline": [9.0, 0.5, 0.3, 0.4], "full": [9.0, 2.0, 1.0, 3.0], "top1": [9.0, 0.8, 0.9, 0.7]}

    def fake_op_call(shape, mode, d_r, sink_tokens):
        def call():
            calls.append(mode)
            clock[0] += durations[mode][sum(c == mode for c in calls) - 1]
        return call

    monkeypatch.setattr(rec, "_op_call", fake_op_call)
    monkeypatch.setattr(op_cost.time, "perf_counter", lambda: clock[0])
    for key in ("baseline", "full", "top1"):
        rec.record(key, key)
    assert calls == []  # recording times nothing: the passes run undisturbed
    out = rec.results()
    # warm-ups in order, then three rounds, each starting one configuration later
    assert calls == ["baseline", "full", "top1"] + ["baseline", "full", "top1"] + ["full", "top1", "baseline"] + \
        ["top1", "baseline", "full"]
    by_key = {c["key"]: c for c in out["configurations"]}
    # fastest round, x2 layers of the one geometry, in ms
    assert by_key["baseline"]["op_time_ms"] == pytest.approx(2 * 300.0)
    assert by_key["full"]["op_time_ms"] == pytest.approx(2 * 1000.0)
    assert by_key["top1"]["op_time_ms"] == pytest.approx(2 * 700.0)
    assert by_key["top1"]["relative_op_time"] == pytest.approx(0.7)
    assert out["op_time_statistic"] == "fastest of interleaved rounds" and out["repeats"] == 3
    rec.results()
    assert len(calls) == 12  # asked again: not timed again

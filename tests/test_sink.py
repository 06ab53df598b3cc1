"""The sink kept apart inside a model: crystallized layers and observations with sink_tokens, against float64."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import REL_SCORE_MARGIN, build_model
from f64_reference import F64Reference, build_llama

from nqpq import crystallize
from nqpq.experiments.crystallinity import CrystallinityAccumulator
from nqpq.model.crystallize import Observer, observe_residuals
from nqpq.model.losses import block_losses

N_BLOCKS, SEQ_LEN, LAYERS = 3, 16, (1, 3)


def build(family: str, vocab: int) -> torch.nn.Module:
    return build_model("eager", vocab_size=vocab) if family == "gpt2" else build_llama(vocab)


def blocks_of(token_ids: torch.Tensor) -> torch.Tensor:
    return token_ids[: N_BLOCKS * SEQ_LEN].view(N_BLOCKS, SEQ_LEN)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("sink_tokens", [1, 4])
def test_crystallized_top1_with_a_sink_equals_float64(family, sink_tokens, tokenizer, token_ids):
    model = build(family, len(tokenizer))
    blocks = blocks_of(token_ids)
    ref = F64Reference(model)
    ref.sink_tokens = sink_tokens
    ref.crystal = {li: ("top1", None) for li in LAYERS}
    ref.observed = set(LAYERS)  # records the float64 score gaps of the compared rows
    want = ref.block_losses(blocks)
    assert min(ref.gaps) > REL_SCORE_MARGIN, f"near-tie in the test inputs: {min(ref.gaps):.1e}·max|s|"
    with crystallize(model, LAYERS, mode="top1", backend="torch", sink_tokens=sink_tokens):
        got = block_losses(model, blocks, batch_size=2)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=0)
    with crystallize(model, LAYERS, mode="top1", backend="torch"):
        spec = block_losses(model, blocks, batch_size=2)
    # The sink changes the losses by far more than the tolerance above: the comparison sees it.
    assert ((spec - got).abs() / got.abs()).max() > 1e-4


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_observers_count_each_sink_setting_as_float64(family, tokenizer, token_ids):
    model = build(family, len(tokenizer))
    heads = model.config.num_attention_heads
    blocks = blocks_of(token_ids)
    accs = {n: CrystallinityAccumulator(LAYERS, heads, sink_tokens=n) for n in (0, 1, 4)}
    before = [p.detach().clone() for p in model.parameters()]
    with observe_residuals(model, LAYERS, None, backend="torch", stats_acc=accs[0],
                           observers=[Observer(n, None, accs[n]) for n in (1, 4)]):
        observed = block_losses(model, blocks, batch_size=2)
    assert torch.equal(observed, block_losses(model, blocks, batch_size=2))  # the model's own output, bit for bit
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    for n, acc in accs.items():
        ref = F64Reference(model)
        ref.sink_tokens = n
        ref.observed = set(LAYERS)
        ref.block_losses(blocks)
        assert min(ref.gaps) > REL_SCORE_MARGIN
        got, want = acc.results(), ref.crystallinity()
        assert [(e["layer"], e["head"]) for e in got] == [(e["layer"], e["head"]) for e in want]
        for g, w in zip(got, want):
            for key in ("sink_frac", "self_frac", "prev_frac"):
                assert g[key] == pytest.approx(w[key], abs=1e-12), (n, g["layer"], g["head"], key)
            for key in ("top1_prob_mean", "sink_mass_mean"):
                assert g[key] == pytest.approx(w[key], abs=2e-6), (n, g["layer"], g["head"], key)
            # The share p[i*ᴿ] / (1 − m) divides by 1 − m: the fp32 rounding of m (a few ulps of m) is amplified
            # by m / (1 − m) on rows where the sink takes almost everything. The bound is that conditioning,
            # computed from the float64 rows, not a tolerance chosen to pass.
            assert g["winner_share_mean"] == pytest.approx(w["winner_share_mean"],
                                                           abs=2e-6 + share_bound(ref, g["layer"], g["head"], n))
        if n == 0:
            assert all(e["sink_mass_mean"] == 0 and e["winner_share_mean"] == e["top1_prob_mean"] for e in got)
        else:
            assert all(e["sink_mass_mean"] > 0 for e in got)


def share_bound(ref: F64Reference, layer: int, head: int, n: int) -> float:
    """The mean over rows of 8 fp32 ulps of the sink mass m, times the share's sensitivity to m: share / (1 − m)."""
    total, rows = 0.0, 0
    for h, _, top1, mass in ref.stats[layer]:
        if h != head:
            continue
        m, p = mass[n:], top1[n:]
        total += float((8 * 2.0**-24 * m * p / (1 - m) ** 2).sum())
        rows += m.numel()
    return total / rows


def test_sink_tokens_checked_before_anything_is_attached(tokenizer):
    model = build("gpt2", len(tokenizer))
    for bad, err in ((-1, ValueError), (1.0, ValueError), (True, ValueError)):  # as_index: "must be an int"
        with pytest.raises(err, match="sink_tokens"):
            with crystallize(model, LAYERS, mode="top1", backend="torch", sink_tokens=bad):
                pass
    assert not any(hasattr(m, "_nqpq_layer_spec") for m in model.modules())
    with pytest.raises(ValueError, match="observers are for observe=True"):
        from nqpq.model.crystallize import crystallize_layers

        crystallize_layers(model, LAYERS, mode="top1", observers=[Observer(1)])
    assert math.isfinite(float(block_losses(model, blocks_of(torch.arange(64) % 50)).mean()))


def sweep_config(**kwargs):
    from nqpq.experiments.config import SweepConfig

    settings = dict(model="tiny", layers=LAYERS, d_r=(2,), n_blocks=N_BLOCKS, seq_len=SEQ_LEN, calib_blocks=1,
                    calib_from="eval", batch_size=2, device="cpu", backend="torch", progress=False)
    return SweepConfig(**{**settings, **kwargs})


def test_sweep_runs_sink_settings_side_by_side_as_float64(tokenizer, token_ids):
    """--sink-tokens 0 1: each setting equals its own run and the float64 definition; the report re-prints."""
    import json

    from nqpq.experiments.sweep import run_sweep
    from nqpq.results.report import print_report

    model = build_llama(len(tokenizer))
    lines: list[str] = []
    both = run_sweep(sweep_config(sink_tokens=(0, 1)), model=model, ids=token_ids, log=lines.append)
    assert [e["sink_tokens"] for e in both["sinks"]] == [0, 1] and both["sink_tokens"] == 0
    alone = {n: run_sweep(sweep_config(sink_tokens=(n,)), model=model, ids=token_ids, log=lambda _: None)
             for n in (0, 1)}
    for entry in both["sinks"]:  # sharing the baseline pass changes nothing
        single = alone[entry["sink_tokens"]]["sinks"][0]
        assert entry["ppl_top1"] == single["ppl_top1"]
        assert [c["ppl"] for c in entry["curve"]] == [c["ppl"] for c in single["curve"]]
        assert entry["crystallinity"] == single["crystallinity"]
    assert both["ppl_top1"] == both["sinks"][0]["ppl_top1"] and both["curve"] == both["sinks"][0]["curve"]

    blocks = blocks_of(token_ids)
    ref = F64Reference(model)
    ref.sink_tokens = 1
    ref.baseline(blocks, 1, LAYERS)
    assert min(ref.gaps) > REL_SCORE_MARGIN
    ref.crystal = {li: ("top1", None) for li in LAYERS}
    sink1 = both["sinks"][1]
    assert math.isclose(sink1["ppl_top1"], ref.ppl(blocks), rel_tol=1e-5)
    for li in LAYERS:  # the rank-2 projector is well defined: a clear gap after the second eigenvalue
        cv = ref.cv[li]
        assert ((cv[:, 1] - cv[:, 0]) > 1e-3).all() and ((cv[:, 2] - cv[:, 1]) > 1e-3).all()
    ref.crystal = {li: ("lowrank", ref.basis[li][:, :, :2]) for li in LAYERS}
    assert math.isclose(sink1["curve"][0]["ppl"], ref.ppl(blocks), rel_tol=1e-5)
    assert sink1["ppl_top1"] != both["sinks"][0]["ppl_top1"]

    printed = [line for line in lines if not line.startswith("[EXP-Q03] Loading")]
    assert any("Sink kept apart, side by side" in line for line in printed)
    reprinted: list[str] = []
    print_report(json.loads(json.dumps({k: v for k, v in both.items() if k != "basis"})), reprinted.append)
    assert reprinted == printed


def test_scan_with_a_sink_equals_float64(tokenizer, token_ids):
    from nqpq.experiments.scan import run_scan

    model = build_llama(len(tokenizer))
    got = run_scan(sweep_config(layers=(3,), sink_tokens=(1, 0)), model=model, ids=token_ids, log=lambda _: None)
    assert got["sink_tokens"] == 1 and [e["sink_tokens"] for e in got["sinks"]] == [1, 0]
    ref = F64Reference(model)
    ref.observed = {3}
    blocks = blocks_of(token_ids)
    for n, entry in ((1, got["sinks"][0]), (0, got["sinks"][1])):
        ref.sink_tokens = n
        assert math.isclose(entry["layers"][0]["ppl_top1"], ref.layer_ppl(blocks, 3, "top1"), rel_tol=1e-5)
    assert min(ref.gaps) > REL_SCORE_MARGIN
    assert got["layers"] == got["sinks"][0]["layers"]

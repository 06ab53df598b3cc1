"""``--heads`` in the sweep and the scan (issue 36 item 1): by index or by a crystallinity rule measured on the
calibration text, against the float64 reference (tests/f64_reference.py): the perplexities of the chosen heads
crystallized (the others plain attention), and the per-head statistics the rule reads; bad choices refused in one
line before any model loads.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest import N_HEAD, REL_SCORE_MARGIN, build_model
from f64_reference import F64Reference

from nqpq.errors import NqpqError
from nqpq.experiments.config import SweepConfig
from nqpq.experiments.heads import HeadRule, parse_heads
from nqpq.experiments.scan import run_scan
from nqpq.experiments.sweep import run_sweep

LAYERS, T, N, C = (2, 3), 16, 8, 2


def config(**kw) -> SweepConfig:
    base = dict(layers=LAYERS, d_r=(2,), n_blocks=N, seq_len=T, calib_blocks=C, device="cpu", batch_size=4,
                backend="torch", progress=False)
    return SweepConfig(**{**base, **kw})


@pytest.mark.parametrize("text, want", [
    ("27:0,1,2 28:3", {27: (0, 1, 2), 28: (3,)}),
    ("5:3,1", {5: (1, 3)}),
    ("top1_prob>=0.7", HeadRule("top1_prob", ">=", 0.7)),
    (" sink_frac < .5 ", HeadRule("sink_frac", "<", 0.5)),
    ("winner_share>1e-1", HeadRule("winner_share", ">", 0.1)),
    ("first_key_mass<0.3", HeadRule("first_key_mass", "<", 0.3)),
])
def test_heads_are_read_as_written(text, want):
    assert parse_heads(text) == want


@pytest.mark.parametrize("text, message", [
    ("27:0,1 27:2", r"^--heads '27:0,1 27:2': layer 27 is named twice"),
    ("27:1,1", r"^--heads: the heads of layer 27 repeats a head: \[1, 1\]$"),
    ("27:", r"^--heads '27:': give heads by index"),
    ("top1>=0.7", r"^--heads 'top1>=0.7': unknown statistic 'top1'; known: top1_prob, sink_frac"),
    ("top1_prob=0.7", r"^--heads 'top1_prob=0.7': give heads by index"),
    ("27:-1", r"^--heads '27:-1': give heads by index"),
])
def test_bad_heads_are_named_in_one_line(text, message):
    with pytest.raises(NqpqError, match=message) as caught:
        parse_heads(text)
    assert "\n" not in str(caught.value)


def f64_model(model, heads: dict[int, tuple[int, ...]], mode: str = "top1") -> F64Reference:
    ref = F64Reference(model)
    ref.crystal = {li: (mode, None) for li in heads}
    ref.crystal_heads = {li: set(h) for li, h in heads.items()}
    return ref


@torch.no_grad()
def test_sweep_by_index_is_the_float64_model_with_those_heads_crystallized(tokenizer, token_ids):
    model = build_model(vocab_size=len(tokenizer))
    heads = {2: (0, 3), 3: (1,)}
    printed: list[str] = []
    results = run_sweep(config(heads="2:0,3 3:1"), model=model, ids=token_ids, log=printed.append)
    assert " heads: 3 crystallized by index: 2:0,3 3:1 (the other heads: plain attention)" in printed
    assert results["heads"] == {"by": "index", "rule": None, "stat": None, "chosen": {"2": [0, 3], "3": [1]},
                                "n_chosen": 3, "values": None, "measured_on": None}
    assert results["config"]["heads"] == "2:0,3 3:1"
    blocks = token_ids[: N * T].view(N, T)
    ref = f64_model(model, heads)
    want = ref.block_losses(blocks)
    assert min(ref.crystal_gaps) > REL_SCORE_MARGIN, "a near-tie in the test inputs"
    torch.testing.assert_close(torch.tensor(results["block_losses"]["top1"], dtype=torch.float64), want,
                               rtol=1e-5, atol=1e-6)
    # Not the layers with every head crystallized: the choice of heads is what was measured.
    every = f64_model(model, {li: tuple(range(N_HEAD)) for li in LAYERS}).block_losses(blocks)
    assert float((every - want).abs().max()) > 1e-3


@torch.no_grad()
def test_sweep_by_rule_chooses_the_heads_float64_measures_on_the_calibration_blocks(tokenizer, token_ids):
    model = build_model(vocab_size=len(tokenizer))
    # float64's top-1 probability per head on the held-out calibration blocks (the C blocks after the N scored).
    calib = token_ids[N * T:(N + C) * T].view(C, T)
    ref = F64Reference(model)
    ref.observed = set(LAYERS)
    ref.block_losses(calib)
    stats = {(s["layer"], s["head"]): s["top1_prob_mean"] for s in ref.crystallinity()}
    # A threshold between two measured values, far from both (fp32 statistics round at ~1e-7): the rule's choice
    # cannot hinge on rounding.
    ordered = sorted(stats.values())
    gaps = [(b - a, (a + b) / 2) for a, b in zip(ordered[len(ordered) // 4:], ordered[len(ordered) // 4 + 1:])]
    gap, threshold = max(gaps)
    assert gap > 1e-4
    results = run_sweep(config(heads=f"top1_prob>={threshold:.6f}"), model=model, ids=token_ids, log=lambda *_: None)
    got = results["heads"]
    assert got["by"] == "rule" and got["stat"] == "top1_prob_mean"
    assert got["measured_on"] == {"source": "heldout", "first_block": N, "blocks": C, "seq_len": T, "sink_tokens": 0}
    for li in LAYERS:
        torch.testing.assert_close(torch.tensor(got["values"][str(li)], dtype=torch.float64),
                                   torch.tensor([stats[li, h] for h in range(N_HEAD)], dtype=torch.float64),
                                   rtol=1e-5, atol=1e-6)
    want = {li: tuple(h for h in range(N_HEAD) if stats[li, h] >= threshold) for li in LAYERS}
    assert got["chosen"] == {str(li): list(h) for li, h in want.items() if h}
    blocks = token_ids[: N * T].view(N, T)
    ref_top1 = f64_model(model, {li: h for li, h in want.items() if h}).block_losses(blocks)
    torch.testing.assert_close(torch.tensor(results["block_losses"]["top1"], dtype=torch.float64), ref_top1,
                               rtol=1e-5, atol=1e-6)


@torch.no_grad()
def test_a_rule_on_first_key_mass_chooses_the_heads_float64_attentions_say(tokenizer, token_ids):
    """α₁ (``first_key_mass``) per head on the calibration blocks, against p[t, 0] of the model's own attentions in
    float64 (``output_attentions``, eager): the rule keeps the heads under a threshold far from every head's value."""
    model = build_model(vocab_size=len(tokenizer))
    calib = token_ids[N * T:(N + C) * T].view(C, T)
    ref = copy.deepcopy(model).double()
    ref.config._attn_implementation = "eager"
    attentions = ref(input_ids=calib, output_attentions=True, use_cache=False).attentions
    alpha = {(li, h): float(attentions[li][:, h, :, 0].mean()) for li in LAYERS for h in range(N_HEAD)}
    ordered = sorted(alpha.values())
    gap, threshold = max((b - a, (a + b) / 2) for a, b in zip(ordered, ordered[1:]))
    assert gap > 1e-4
    results = run_sweep(config(heads=f"first_key_mass<{threshold:.6f}"), model=model, ids=token_ids,
                        log=lambda *_: None)
    got = results["heads"]
    assert got["by"] == "rule" and got["stat"] == "first_key_mass_mean"
    for li in LAYERS:
        torch.testing.assert_close(torch.tensor(got["values"][str(li)], dtype=torch.float64),
                                   torch.tensor([alpha[li, h] for h in range(N_HEAD)], dtype=torch.float64),
                                   rtol=1e-5, atol=1e-6)
    want = {li: [h for h in range(N_HEAD) if alpha[li, h] < threshold] for li in LAYERS}
    assert got["chosen"] == {str(li): h for li, h in want.items() if h}


def test_a_rule_that_chooses_no_head_is_an_error(tokenizer, token_ids):
    model = build_model(vocab_size=len(tokenizer))
    with pytest.raises(NqpqError, match=r"^--heads top1_prob>=2: no head of --layers \[2, 3\] meets the rule"):
        run_sweep(config(heads="top1_prob>=2"), model=model, ids=token_ids, log=lambda *_: None)


@torch.no_grad()
def test_scan_crystallizes_each_layers_chosen_heads(tokenizer, token_ids):
    model = build_model(vocab_size=len(tokenizer))
    results = run_scan(config(heads="3:0,2"), model=model, ids=token_ids, log=lambda *_: None)
    assert [e["layer"] for e in results["layers"]] == [3]  # layer 2 has no head chosen: not scanned
    blocks = token_ids[: N * T].view(N, T)
    want = f64_model(model, {3: (0, 2)}).block_losses(blocks)
    torch.testing.assert_close(torch.tensor(results["layers"][0]["top1_block_losses"], dtype=torch.float64), want,
                               rtol=1e-5, atol=1e-6)
    assert math.isfinite(results["layers"][0]["ppl_top1"])


@pytest.mark.parametrize("heads, message", [
    ("1:0", r"--heads names layers \[1\] that are not among --layers \[2, 3\]"),
    (f"2:{N_HEAD}", rf"--heads: the heads of layer 2 \[{N_HEAD}\]: layer 2 has query heads 0..{N_HEAD - 1}"),
])
def test_cli_refuses_bad_heads_before_loading(heads, message, saved_model, tmp_path, capsys, monkeypatch):
    import nqpq.experiments.setup as sweep_mod
    from nqpq.cli import main

    def no_load(*_args, **_kw):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(sweep_mod, "_load", no_load)
    code = main(["sweep", "--model", str(saved_model[0]), "--text-file", str(saved_model[1]), "--layers", "2", "3",
                 "--heads", *heads.split(), "--n-blocks", "2", "--seq-len", "16", "--device", "cpu", "--no-progress"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(err) == 1 and err[0].startswith("nqpq: error: ")
    import re

    assert re.search(message, err[0]), err[0]

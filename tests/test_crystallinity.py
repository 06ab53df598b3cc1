"""Crystallinity statistics: the accumulator against per-row loops, then on tiny models against float64."""

from __future__ import annotations

import json
import math

import pytest
import torch

from nqpq.experiments.crystallinity import CrystallinityAccumulator
from nqpq.results.crystallinity_table import format_table, layer_means


def loop_stats(argmaxes: list[torch.Tensor], probs: list[torch.Tensor], n_heads: int) -> list[dict]:
    """Per-head sums written row by row, in float64: the definition, independent of the accumulator."""
    out = []
    for h in range(n_heads):
        top1 = sink = self_ = prev = rows = 0
        for am, pr in zip(argmaxes, probs):
            B, _, T = am.shape
            for b in range(B):
                for t in range(T):
                    i = int(am[b, h, t])
                    top1 += float(pr[b, h, t])
                    sink += i == 0
                    self_ += i == t
                    prev += t >= 1 and i == t - 1
                    rows += 1
        out.append({"head": h, "top1_prob_mean": top1 / rows, "sink_frac": sink / rows,
                    "self_frac": self_ / rows, "prev_frac": prev / rows})
    return out


def random_calls(n_heads: int, seed: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    argmaxes, probs = [], []
    for B, T in ((2, 5), (1, 7), (3, 1)):
        t = torch.arange(T)
        # i* in 0..t, with the sink, self and prev positions over-represented.
        choice = torch.randint(0, 4, (B, n_heads, T), generator=g)
        anywhere = (torch.rand(B, n_heads, T, generator=g) * (t + 1)).long()
        am = torch.where(choice == 0, 0, torch.where(choice == 1, t, torch.where(choice == 2, (t - 1).clamp(min=0),
                                                                                   anywhere)))
        argmaxes.append(am.long())
        probs.append(torch.rand(B, n_heads, T, generator=g, dtype=torch.float32))
    return argmaxes, probs


def test_accumulator_matches_row_loop():
    H = 3
    acc = CrystallinityAccumulator([5, 2], H)
    calls = {2: random_calls(H, 0), 5: random_calls(H, 1)}
    for layer, (ams, prs) in calls.items():
        for am, pr in zip(ams, prs):
            acc.add(layer, am, pr)
    got = acc.results()
    assert [(e["layer"], e["head"]) for e in got] == [(2, 0), (2, 1), (2, 2), (5, 0), (5, 1), (5, 2)]
    for layer in (2, 5):
        want = loop_stats(*calls[layer], H)
        for w, g in zip(want, [e for e in got if e["layer"] == layer]):
            for key in ("top1_prob_mean", "sink_frac", "self_frac", "prev_frac"):
                assert math.isclose(g[key], w[key], rel_tol=1e-12, abs_tol=1e-15), (layer, w["head"], key)


def test_row_zero_is_sink_and_self_never_prev():
    acc = CrystallinityAccumulator([0], 1)
    acc.add(0, torch.zeros(1, 1, 1, dtype=torch.long), torch.ones(1, 1, 1))
    (e,) = acc.results()
    assert (e["sink_frac"], e["self_frac"], e["prev_frac"], e["top1_prob_mean"]) == (1.0, 1.0, 0.0, 1.0)
    # T = 3: i* = (0, 0, 1) → sink rows 0, 1; self row 0; prev rows 1, 2.
    acc = CrystallinityAccumulator([0], 1)
    acc.add(0, torch.tensor([[[0, 0, 1]]]), torch.tensor([[[1.0, 0.5, 0.25]]]))
    (e,) = acc.results()
    assert e["sink_frac"] == 2 / 3 and e["self_frac"] == 1 / 3 and e["prev_frac"] == 2 / 3
    assert e["top1_prob_mean"] == 1.75 / 3


def test_non_finite_rows_count_nowhere_but_poison_the_mean():
    acc = CrystallinityAccumulator([0], 1)
    acc.add(0, torch.tensor([[[-1, -1]]]), torch.tensor([[[float("nan"), 1.0]]]))
    (e,) = acc.results()
    assert math.isnan(e["top1_prob_mean"])
    assert e["sink_frac"] == e["self_frac"] == e["prev_frac"] == 0.0


def test_accumulator_rejects_bad_input():
    acc = CrystallinityAccumulator([1], 2)
    am, pr = torch.zeros(1, 2, 4, dtype=torch.long), torch.zeros(1, 2, 4)
    with pytest.raises(ValueError, match=r"layer 3 is not one of the accumulator's layers \[1\]"):
        acc.add(3, am, pr)
    with pytest.raises(ValueError, match=r"argmax must be \[B, Hq=2, T\], got shape \(1, 3, 4\)"):
        acc.add(1, torch.zeros(1, 3, 4, dtype=torch.long), pr)
    with pytest.raises(ValueError, match=r"one shape, got \(1, 2, 4\) and \(1, 2, 5\)"):
        acc.add(1, am, torch.zeros(1, 2, 5))
    with pytest.raises(TypeError, match="argmax must be int64, got torch.int32"):
        acc.add(1, am.int(), pr)
    with pytest.raises(TypeError, match="top1_prob must be a torch.Tensor, got list"):
        acc.add(1, am, [0.0])
    with pytest.raises(RuntimeError, match="layer 1 was never observed"):
        acc.results()
    with pytest.raises(ValueError, match="n_heads must be a positive int"):
        CrystallinityAccumulator([0], 0)


def test_layer_means_and_table():
    entries = [{"layer": 4, "head": h, "top1_prob_mean": p, "sink_frac": s, "self_frac": 0.0, "prev_frac": 0.5}
               for h, (p, s) in enumerate(((0.5, 0.25), (0.75, 0.75)))]
    means = layer_means(entries)
    assert means == {4: {"top1_prob_mean": 0.625, "sink_frac": 0.5, "self_frac": 0.0, "prev_frac": 0.5}}
    assert format_table(entries)[-1] == "     4 |  0.6250  0.500  0.000  0.500"


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_sweep_reports_crystallinity_of_its_layers(family, tokenizer, token_ids, tmp_path, capsys):
    """The sweep's crystallinity equals the float64 definition, and its report re-prints from results alone."""
    from conftest import REL_SCORE_MARGIN, build_model
    from f64_reference import F64Reference, build_llama

    from nqpq.experiments.config import SweepConfig
    from nqpq.experiments.sweep import run_sweep
    from nqpq.results.report import print_report

    model = build_model("eager", vocab_size=len(tokenizer)) if family == "gpt2" else build_llama(len(tokenizer))
    n_blocks, seq_len = 3, 16
    cfg = SweepConfig(model="tiny", layers=(3, 1), d_r=(2,), n_blocks=n_blocks, seq_len=seq_len, calib_blocks=1,
                      batch_size=2, device="cpu", backend="torch", progress=False)
    lines: list[str] = []
    results = run_sweep(cfg, model=model, ids=token_ids, log=lines.append)

    ref = F64Reference(model)
    ref.baseline(token_ids[: n_blocks * seq_len].view(n_blocks, seq_len), 1, [1, 3])
    assert min(ref.gaps) > REL_SCORE_MARGIN, f"near-tie in the test inputs: top-2 gap {min(ref.gaps):.1e}·max|s|"
    want, got = ref.crystallinity(), results["crystallinity"]
    assert [(e["layer"], e["head"]) for e in got] == [(e["layer"], e["head"]) for e in want]
    assert len(got) == 2 * model.config.num_attention_heads
    for g, w in zip(got, want):
        for key in ("sink_frac", "self_frac", "prev_frac"):  # clear argmax on every row: exact counts
            assert g[key] == pytest.approx(w[key], abs=1e-12), (g["layer"], g["head"], key)
        assert g["top1_prob_mean"] == pytest.approx(w["top1_prob_mean"], abs=2e-6)

    table = format_table(got)
    assert all(line in lines for line in table)
    printed = [line for line in lines if not line.startswith("[EXP-Q03] Loading")]
    reprinted: list[str] = []
    print_report(json.loads(json.dumps({k: v for k, v in results.items() if k != "basis"})), reprinted.append)
    assert reprinted == printed
    if family == "gpt2":  # `nqpq report` on the written directory: the same lines, the sweep's plots redrawn
        from nqpq.cli import main as cli_main
        from nqpq.results.results_file import write_results

        write_results(str(tmp_path), results)
        (tmp_path / "delta_ppl_vs_dr.png").unlink()
        capsys.readouterr()
        assert cli_main(["report", str(tmp_path)]) == 0
        out = capsys.readouterr().out.splitlines()
        assert [ln for ln in out if not ln.startswith("[report] wrote")] == "\n".join(printed).splitlines()
        assert (tmp_path / "delta_ppl_vs_dr.png").is_file()

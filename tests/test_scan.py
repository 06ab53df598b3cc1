"""``nqpq scan`` and ``nqpq report``: against a float64 implementation, the plain way, and end to end."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys

import pytest
import torch
from conftest import REL_SCORE_MARGIN, REPO, build_model, wikitext_text
from f64_reference import F64Reference, build_llama

import nqpq.experiments.scan
from nqpq import calibrate, crystallize, perplexity
from nqpq.cli import main as cli_main
from nqpq.experiments.batching import default_batch_size
from nqpq.experiments.config import SweepConfig
from nqpq.experiments.scan import run_scan
from nqpq.results.results_file import SCAN_FORMAT_VERSION
from nqpq.results.stats import delta_ppl_ci, resample_indices

# 16 blocks: enough for intervals (8 at least), and for some layers' top-1 loss to be measurable and others' not.
SEQ_LEN, N_BLOCKS, CALIB = 16, 16, 2
D_R = (1, 4)
# fp32 pipeline vs float64 definition: perplexities agree to ~1e-6 relative when every argmax is clear.
PPL_RTOL = 2e-5
PROB_ATOL = 2e-6
CV_MARGIN = 1e-4  # r90 counts cumulative variances below 0.9: none may sit this close to 0.9


def build(family: str, vocab_size: int) -> torch.nn.Module:
    # Llama seed 1: seed 0 has a near-tie row (top-2 gap < REL_SCORE_MARGIN) within the 16 blocks.
    return build_model("eager", vocab_size=vocab_size) if family == "gpt2" else build_llama(vocab_size, seed=1)


def scan_config(layers=None, **kw) -> SweepConfig:
    return SweepConfig(model="tiny", layers=layers, d_r=D_R, n_blocks=N_BLOCKS, seq_len=SEQ_LEN,
                       calib_blocks=CALIB, calib_from="eval", device="cpu", backend="torch", progress=False, **kw)


def reference_scan(model, blocks, layers) -> tuple[dict, F64Reference]:
    """The scan's results.json numbers from the float64 implementation, conditioning asserted."""
    ref = F64Reference(model)
    ppl_fp = ref.baseline(blocks, CALIB, layers)
    assert min(ref.gaps) > REL_SCORE_MARGIN, f"near-tie in the test inputs: top-2 gap {min(ref.gaps):.1e}·max|s|"
    for layer in layers:
        assert ((ref.cv[layer] - 0.9).abs() > CV_MARGIN).all(), f"layer {layer}: a cumulative variance at ~0.9"
    out = []
    base_losses = ref.block_losses(blocks)
    floor = 1e-6 * ppl_fp  # docs/verdict.md's minimum effect
    for layer in layers:
        top1 = ref.layer_ppl(blocks, layer, "top1")
        ref.crystal = {layer: ("top1", None)}
        top1_losses = ref.block_losses(blocks)
        ref.crystal = {}
        # The rule: recovered % is defined only where top-1's paired interval (the seed's resamples, SweepConfig's
        # default 42, of the float64 block losses) lies above the minimum effect; that must not hinge on rounding.
        ci = delta_ppl_ci(base_losses.numpy(), top1_losses.numpy(), resample_indices(blocks.shape[0], 42))
        assert ci is not None and abs(ci[0] - floor) > 1e-4 * ppl_fp, (layer, ci)
        measured = top1 - ppl_fp > floor and ci[0] > floor
        curve = []
        for d_r in D_R:
            ppl = ref.layer_ppl(blocks, layer, "lowrank", d_r)
            recovered = (top1 - ppl) / (top1 - ppl_fp) * 100 if measured else None
            curve.append({"d_r": d_r, "ppl": ppl, "recovered_pct": recovered})
        out.append({"layer": layer, "ppl_top1": top1, "curve": curve, "measured": measured,
                    "r90_mean": ref.r90[layer].double().mean().item()})
    return {"ppl_baseline": ppl_fp, "layers": out, "crystallinity": ref.crystallinity()}, ref


def assert_matches_reference(got: dict, want: dict) -> None:
    assert math.isclose(got["ppl_baseline"], want["ppl_baseline"], rel_tol=PPL_RTOL)
    assert [e["layer"] for e in got["layers"]] == [e["layer"] for e in want["layers"]]
    for g, w in zip(got["layers"], want["layers"]):
        # Whether top-1 loses anything (else recovered % is null) must not hinge on rounding: its cost is far
        # from the 1e-6 threshold, on either side (a random model's top-1 may even lower the PPL).
        assert abs(w["ppl_top1"] - want["ppl_baseline"]) > 1e-4 * want["ppl_baseline"], g["layer"]
        assert math.isclose(g["ppl_top1"], w["ppl_top1"], rel_tol=PPL_RTOL), g["layer"]
        assert g["r90_mean"] == w["r90_mean"]
        for gc, wc in zip(g["curve"], w["curve"], strict=True):
            assert gc["d_r"] == wc["d_r"]
            assert math.isclose(gc["ppl"], wc["ppl"], rel_tol=PPL_RTOL), (g["layer"], gc["d_r"])
            if wc["recovered_pct"] is None:
                assert gc["recovered_pct"] is None, (g["layer"], gc["d_r"])
            else:  # a ratio of PPL differences: its error is the PPL error over the top-1 loss
                tol = 4 * PPL_RTOL * w["ppl_top1"] / (w["ppl_top1"] - want["ppl_baseline"]) * 100
                assert abs(gc["recovered_pct"] - wc["recovered_pct"]) <= tol, (g["layer"], gc["d_r"])
        # The layer's verdict: INCONCLUSIVE where top-1 loses nothing measurable, else the spec's YES / PARTIAL.
        if not w["measured"]:
            assert (g["verdict"]["outcome"], g["verdict"]["reason"]) == ("INCONCLUSIVE", "no_measurable_loss")
            assert g["verdict"]["compressible"] is None and g["verdict"]["settled"] is False
        else:
            reaching = [c["recovered_pct"] >= 90.0 for c in w["curve"]]
            assert g["verdict"]["outcome"] == ("YES" if any(reaching) else "PARTIAL"), g["layer"]
    assert len(got["crystallinity"]) == len(want["crystallinity"])
    for g, w in zip(got["crystallinity"], want["crystallinity"]):
        assert (g["layer"], g["head"]) == (w["layer"], w["head"])
        # the argmax is clear on every row (asserted above): the fractions are exact counts
        for key in ("sink_frac", "self_frac", "prev_frac"):
            assert g[key] == pytest.approx(w[key], abs=1e-12), (g["layer"], g["head"], key)
        assert g["top1_prob_mean"] == pytest.approx(w["top1_prob_mean"], abs=PROB_ATOL)
    means = {}
    for w in want["crystallinity"]:
        means.setdefault(w["layer"], []).append(w["top1_prob_mean"])
    for g in got["layers"]:
        assert g["top1_prob_mean"] == pytest.approx(sum(means[g["layer"]]) / len(means[g["layer"]]), abs=PROB_ATOL)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_scan_matches_float64_and_the_plain_way(family, tokenizer, token_ids):
    ids = token_ids
    model = build(family, len(tokenizer))
    blocks = ids[: N_BLOCKS * SEQ_LEN].view(N_BLOCKS, SEQ_LEN)
    lines: list[str] = []
    got = run_scan(scan_config(batch_size=3), model=model, ids=ids, log=lines.append)  # 2 calib + 14 rest blocks
    assert got["kind"] == "scan" and got["config"]["layers"] == [0, 1, 2, 3]
    assert got["config"]["n_kv_heads"] == (2 if family == "llama" else 4)
    want, _ = reference_scan(model, blocks, [0, 1, 2, 3])
    assert_matches_reference(got, want)

    # The replay from layer L equals crystallizing L alone the plain way (full forward, same fp32 op).
    for entry in got["layers"][1::2]:
        layer = entry["layer"]
        with crystallize(model, [layer], mode="top1", backend="torch"):
            plain_top1 = perplexity(model, ids, SEQ_LEN, N_BLOCKS)
        assert math.isclose(entry["ppl_top1"], plain_top1, rel_tol=1e-6)
        basis = calibrate(model, blocks[:CALIB], [layer], backend="torch")
        with crystallize(model, [layer], mode="lowrank", basis=basis.basis, d_r=D_R[-1], backend="torch"):
            plain_lowrank = perplexity(model, ids, SEQ_LEN, N_BLOCKS)
        assert math.isclose(entry["curve"][-1]["ppl"], plain_lowrank, rel_tol=1e-6)

    # The report is a function of the results dict: re-printing it gives what the run printed.
    reprinted: list[str] = []
    from nqpq.results.report import print_report

    print_report(json.loads(json.dumps({k: v for k, v in got.items()})), reprinted.append)
    assert reprinted == [line for line in lines if not line.startswith("[scan] Loading")]


def test_a_layer_whose_top1_loses_measurably_matches_float64(tokenizer, token_ids):
    """Llama layer 1 over 16 blocks of 32 tokens: top-1's interval lies above 0 there, so its recovered % and its
    YES / PARTIAL are numbers, and they are the float64 reference's (the test above sees only INCONCLUSIVE layers:
    on these random models most top-1 losses are lost in the block-to-block noise)."""
    model = build("llama", len(tokenizer))
    seq_len, n_blocks = 32, 16
    cfg = SweepConfig(model="tiny", layers=(1,), d_r=D_R, n_blocks=n_blocks, seq_len=seq_len, calib_blocks=CALIB,
                      calib_from="eval", device="cpu", backend="torch", progress=False, batch_size=4)
    got = run_scan(cfg, model=model, ids=token_ids, log=lambda *_: None)
    want, _ = reference_scan(model, token_ids[: n_blocks * seq_len].view(n_blocks, seq_len), [1])
    assert want["layers"][0]["measured"]  # the case this test is for
    assert_matches_reference(got, want)
    assert got["layers"][0]["verdict"]["outcome"] in ("YES", "PARTIAL")
    assert all(c["recovered_pct_ci95"] is not None for c in got["layers"][0]["curve"])


def test_scan_of_some_layers(tokenizer, token_ids, monkeypatch):
    ids = token_ids
    model = build_model("eager", vocab_size=len(tokenizer))
    sized = []

    def batch_size(*args, **kwargs):
        sized.append(kwargs.get("n_records", 1))
        return default_batch_size(*args, **kwargs)

    monkeypatch.setattr(nqpq.experiments.scan, "default_batch_size", batch_size)
    got = run_scan(scan_config(layers=(3, 1)), model=model, ids=ids, log=lambda *_: None)
    assert sized == [2]  # the default batch size sets aside the record of both scanned layers' inputs
    assert [e["layer"] for e in got["layers"]] == [1, 3]
    assert sorted({e["layer"] for e in got["crystallinity"]}) == [1, 3]
    assert sorted(got["timings"]["layers_s"]) == ["1", "3"]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "nqpq", *args], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=300)


def report_lines(stdout: str) -> list[str]:
    return [ln for ln in stdout.splitlines() if not ln.startswith(("[scan] Loading", "[scan] wrote", "[report]"))]


def test_cli_scan_then_report_on_a_saved_llama(tmp_path, tokenizer, capsys):
    model = build_llama(len(tokenizer))
    model_dir, out = tmp_path / "tiny-llama", tmp_path / "out"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    text = tmp_path / "wiki.valid.raw"
    text.write_text(wikitext_text(seed=3), encoding="utf-8")
    run = run_cli("scan", "--model", str(model_dir), "--text-file", str(text), "--layers", "1", "3",
                  "--d-r", *map(str, D_R), "--n-blocks", str(N_BLOCKS), "--seq-len", str(SEQ_LEN),
                  "--calib-blocks", str(CALIB), "--calib-from", "eval", "--device", "cpu", "--backend", "torch",
                  "--out", str(out), "--no-progress")
    assert run.returncode == 0, run.stderr
    names = {"results.json", "recovered_heatmap.png", "top1_prob_heatmap.png", "delta_ppl_top1.png"}
    assert names <= set(os.listdir(out))
    results = json.loads((out / "results.json").read_text())
    assert set(results) >= {"kind", "format_version", "ppl_baseline", "layers", "crystallinity", "config",
                            "timings"}
    assert set(results["layers"][0]) == {"layer", "ppl_top1", "top1_delta_ppl_ci95", "top1_block_losses", "curve",
                                         "draws", "r90_mean", "top1_prob_mean", "verdict"}
    assert set(results["layers"][0]["curve"][0]) == {"d_r", "ppl", "delta_ppl", "recovered_pct", "delta_ppl_ci95",
                                                     "recovered_pct_ci95", "block_losses", "recovered_pct_draws",
                                                     "recovered_pct_spread"}

    # The numbers are the definition's, computed in float64 on the same tokens.
    from nqpq.sources.text import ids_for_blocks, rows_from_file

    ids = ids_for_blocks(rows_from_file(str(text)), tokenizer, N_BLOCKS * SEQ_LEN)
    want, _ = reference_scan(model, ids[: N_BLOCKS * SEQ_LEN].view(N_BLOCKS, SEQ_LEN), [1, 3])
    assert_matches_reference(results, want)

    for name in names - {"results.json"}:
        (out / name).unlink()
    (model_dir / "model.safetensors").unlink()  # the report needs neither the model nor the text
    text.unlink()
    capsys.readouterr()
    assert cli_main(["report", str(out)]) == 0
    assert names <= set(os.listdir(out))
    assert report_lines(capsys.readouterr().out) == report_lines(run.stdout)


def test_report_refuses_broken_or_foreign_results(tmp_path, capsys):
    good = {"kind": "scan", "format_version": SCAN_FORMAT_VERSION, "ppl_baseline": 1.0, "layers": [],
            "crystallinity": [], "config": {}}
    cases = {
        "missing": (None, "no such file"),
        "not-json": ("{not json", "cannot be read as JSON"),
        "list": ("[1, 2]", "expected a JSON object, got list"),
        "old": (json.dumps({"ppl_baseline": 1.0}), "'kind' is None, not 'sweep' or 'scan'"),
        "newer": (json.dumps({**good, "format_version": 99}),
                  f"format version 99; this nqpq reads version {SCAN_FORMAT_VERSION}"),
        "no-layers": (json.dumps({k: v for k, v in good.items() if k != "layers"}), r"without \['layers'\]"),
        "bad-entry": (json.dumps({**good, "layers": [{"layer": 0}]}), "is broken .*nothing was redrawn"),
    }
    for name, (content, message) in cases.items():
        d = tmp_path / name
        d.mkdir()
        if content is not None:
            (d / "results.json").write_text(content)
        assert cli_main(["report", str(d)]) == 2, name
        err = capsys.readouterr()
        assert err.out == "" and err.err.startswith("nqpq: error: "), name
        assert re.search(message, err.err), (name, err.err)
        assert sorted(os.listdir(d)) == ([] if content is None else ["results.json"]), name


def test_scan_rejects_bad_layers(tokenizer, token_ids):
    ids = token_ids
    from nqpq.errors import NqpqError

    model = build_model("eager", vocab_size=len(tokenizer))
    with pytest.raises(NqpqError, match=r"--layers \[4\]: the model has layers 0..3"):
        run_scan(scan_config(layers=(1, 4)), model=model, ids=ids, log=lambda *_: None)

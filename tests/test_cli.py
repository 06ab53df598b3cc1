"""End to end: `nqpq sweep` on a tiny saved model, its outputs, its errors, and the torchrun path."""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from conftest import HEAD_DIM, N_HEAD, build_model
from transformers import GPT2LMHeadModel, GPT2TokenizerFast

from nqpq import ResidualBasis, calibrate, crystallize, make_blocks, perplexity
from nqpq.cli import main

LAYERS, D_RS, N_BLOCKS, SEQ_LEN, CALIB = (2, 3), (0, 1, 16), 6, 32, 2
REPORT_LINES = ("PPL baseline", "[A] Top-1", "[B]", "d_r=", "VERDICT")


def sweep_args(model_dir, text_file, out, *extra):
    args = ["sweep", "--model", str(model_dir), "--text-file", str(text_file),
            "--layers", *map(str, LAYERS), "--d-r", *map(str, D_RS), "--n-blocks", str(N_BLOCKS),
            "--seq-len", str(SEQ_LEN), "--calib-blocks", str(CALIB), "--device", "cpu", "--batch-size", "4",
            "--no-progress"]
    if out is not None:
        args += ["--out", str(out)]
    return args + list(extra)


def rel(a, b):
    return abs(a - b) / abs(b)


def text_ids(text_file, tokenizer):
    """The spec's text preparation, written out: non-blank rows joined by blank lines, then tokenized."""
    rows = Path(text_file).read_text(encoding="utf-8").splitlines(keepends=True)
    text = "\n\n".join(t for t in rows if t.strip())
    return tokenizer(text, return_tensors="pt")["input_ids"].squeeze(0)


@pytest.fixture(scope="module")
def sweep_run(saved_model, tmp_path_factory):
    """One in-process `nqpq sweep` run: (exit code, stdout, out dir, results.json)."""
    model_dir, text_file = saved_model
    out = tmp_path_factory.mktemp("sweep") / "out"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = main(sweep_args(model_dir, text_file, out))
    results = json.loads((out / "results.json").read_text()) if code == 0 else None
    return code, stdout.getvalue(), out, results


def test_sweep_runs_and_reports(sweep_run):
    code, stdout, out, _ = sweep_run
    assert code == 0
    for line in REPORT_LINES:
        assert line in stdout, line
    assert stdout.count("d_r=") >= len(D_RS)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["results.json", "delta_ppl_vs_dr.png", "cumulative_variance.png", "basis.pt"])
    for png in ("delta_ppl_vs_dr.png", "cumulative_variance.png"):
        data = (out / png).read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 1000


def test_results_json_schema(sweep_run):
    results = sweep_run[3]
    for key in ("ppl_baseline", "ppl_top1", "ppl_full", "curve", "spectrum", "mean_eff_dim", "verdict",
                "config", "timings"):
        assert key in results, key
    assert [c["d_r"] for c in results["curve"]] == list(D_RS)
    for c in results["curve"]:
        assert set(c) >= {"d_r", "ppl", "delta_ppl", "recovered_pct"}
        assert c["delta_ppl"] == pytest.approx(c["ppl"] - results["ppl_baseline"], rel=1e-12, abs=1e-12)
        want = (results["ppl_top1"] - c["ppl"]) / max(results["ppl_top1"] - results["ppl_baseline"], 1e-9) * 100
        assert c["recovered_pct"] == pytest.approx(want, rel=1e-9, abs=1e-9)
    assert [(s["layer"], s["head"]) for s in results["spectrum"]] == [(li, h) for li in LAYERS for h in range(N_HEAD)]
    for s in results["spectrum"]:
        assert set(s) >= {"layer", "head", "cumulative_variance", "r90"}
        cv = s["cumulative_variance"]
        assert len(cv) == HEAD_DIM and cv[-1] == pytest.approx(1.0) and cv == sorted(cv)
        assert s["r90"] == sum(v < 0.9 for v in cv) + 1
    assert results["mean_eff_dim"] == pytest.approx(statistics.mean(s["r90"] for s in results["spectrum"]))
    verdict, good = results["verdict"], [c["d_r"] for c in results["curve"] if c["recovered_pct"] >= 90.0]
    assert set(verdict) >= {"compressible", "d_r_min"}
    assert verdict["compressible"] == bool(good) and verdict["d_r_min"] == (min(good) if good else None)
    config = results["config"]
    assert config["torch"] == torch.__version__ and config["transformers"] == transformers.__version__
    assert config["device_name"] and config["device"] == "cpu" and config["world_size"] == 1
    assert config["layers"] == list(LAYERS) and config["d_r"] == list(D_RS)
    assert config["n_blocks"] == N_BLOCKS and config["seq_len"] == SEQ_LEN and config["calib_blocks"] == CALIB
    assert all(isinstance(v, float) and v >= 0 for v in results["timings"].values())
    assert "total_s" in results["timings"]


def test_results_limits(sweep_run):
    results = sweep_run[3]
    assert rel(results["ppl_full"], results["ppl_baseline"]) <= 1e-5
    by_rank = {c["d_r"]: c["ppl"] for c in results["curve"]}
    assert rel(by_rank[HEAD_DIM], results["ppl_full"]) <= 1e-6
    assert rel(by_rank[0], results["ppl_top1"]) <= 1e-6
    assert rel(results["ppl_top1"], results["ppl_baseline"]) > 1e-4  # top-1 is a real change


def test_results_equal_straightforward_recomputation(sweep_run, saved_model):
    model_dir, text_file = saved_model
    results, out = sweep_run[3], sweep_run[2]
    model = GPT2LMHeadModel.from_pretrained(model_dir).eval()
    ids = text_ids(text_file, GPT2TokenizerFast.from_pretrained(model_dir))
    assert results["config"]["n_tokens"] == ids.numel()
    basis = ResidualBasis.load(str(out / "basis.pt"))
    assert basis.layers == list(LAYERS)

    def ppl(mode=None, d_r=None):
        if mode is None:
            return perplexity(model, ids, SEQ_LEN, N_BLOCKS)
        with crystallize(model, LAYERS, mode=mode, basis=basis.basis, d_r=d_r, backend="torch"):
            return perplexity(model, ids, SEQ_LEN, N_BLOCKS)

    assert rel(results["ppl_baseline"], ppl()) <= 1e-6
    assert rel(results["ppl_top1"], ppl("top1")) <= 1e-6
    assert rel(results["ppl_full"], ppl("full")) <= 1e-6
    for c in results["curve"]:
        assert rel(c["ppl"], ppl("lowrank", c["d_r"])) <= 1e-6, c["d_r"]

    # The basis is the one calibrate() fits on the leading --calib-blocks blocks.
    fresh = calibrate(model, make_blocks(ids, SEQ_LEN, N_BLOCKS)[:CALIB], LAYERS, backend="torch")
    for s in results["spectrum"]:
        li, h = s["layer"], s["head"]
        assert s["r90"] == int(fresh.r90[li][h])
        assert torch.allclose(torch.tensor(s["cumulative_variance"], dtype=torch.float64),
                              fresh.cumulative_variance[li][h], rtol=0, atol=1e-6)
        torch.testing.assert_close(basis.eigenvalues[li][h], fresh.eigenvalues[li][h], rtol=1e-5,
                                   atol=1e-6 * fresh.eigenvalues[li][h][0].item())


def cli_command():
    """The installed `nqpq` console script (next to this Python, else on PATH), or None."""
    here = Path(sys.executable).with_name("nqpq")
    return str(here) if here.exists() else shutil.which("nqpq")


def test_console_script_demo(tmp_path):
    command = cli_command()
    if command is None:
        pytest.skip("the nqpq console script is not installed (pip install -e .)")
    result = subprocess.run(
        [command, "sweep", "--demo", "--n-blocks", "2", "--seq-len", "64", "--layers", "11", "--d-r", "1",
         "--no-progress"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "random weights" in result.stdout.lower()
    assert "VERDICT" in result.stdout


def assert_clean_error(code, err, out, *needles):
    assert code == 2
    error_lines = [line for line in err.splitlines() if "nqpq: error:" in line]
    assert len(error_lines) == 1 and error_lines[0].startswith("nqpq: error: "), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in error_lines[0], (needle, error_lines[0])
    assert not out.exists() or not any(out.iterdir())


BAD_INPUTS = {
    "layer": (["--layers", "99"], ["--layers", "0..3"]),
    "d_r": (["--d-r", "1", str(HEAD_DIM + 1)], ["--d-r", "0..16"]),
    "too_many_blocks": (["--n-blocks", "100000"], ["--n-blocks", "tokens"]),
    "seq_len": (["--seq-len", "129"], ["--seq-len 129", "2..128"]),
    "calib_zero": (["--calib-blocks", "0"], ["--calib-blocks 0"]),
    "n_blocks_zero": (["--n-blocks", "0"], ["--n-blocks 0"]),
    "calib_too_many": (["--calib-blocks", "7"], ["--calib-blocks 7"]),
    "missing_text": (["--text-file", "/nonexistent/wiki.raw"], ["--text-file", "/nonexistent/wiki.raw"]),
    "text_is_dir": (["--text-file", "/"], ["--text-file"]),
    "batch_size": (["--batch-size", "0"], ["--batch-size"]),
    "dtype": (["--dtype", "int8"], ["--dtype"]),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_clean_error(case, saved_model, tmp_path, capsys):
    extra, needles = BAD_INPUTS[case]
    out = tmp_path / "out"
    code = main(sweep_args(*saved_model, out, *extra))
    assert_clean_error(code, capsys.readouterr().err, out, *needles)


def test_undecodable_text_file(saved_model, tmp_path, capsys):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes(" = Caf\xe9 = \n".encode("latin-1") * 50)
    out = tmp_path / "out"
    code = main(sweep_args(saved_model[0], bad, out))
    assert_clean_error(code, capsys.readouterr().err, out, "--text-file")


def run_cli(args, cwd, timeout=120, **env):
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **env}
    full_env.pop("PYTHONPATH", None)
    return subprocess.run([sys.executable, "-m", "nqpq", *args], cwd=cwd, env=full_env, capture_output=True,
                          text=True, timeout=timeout)


def test_bad_input_in_a_real_process(saved_model, tmp_path):
    out = tmp_path / "out"
    result = run_cli(sweep_args(*saved_model, out, "--layers", "99"), cwd=tmp_path)
    assert_clean_error(result.returncode, result.stderr, out, "--layers")


def test_unknown_hub_model_offline(saved_model, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "out"
    args = sweep_args("no-such-user/no-such-gpt2", saved_model[1], out)
    result = run_cli(args, cwd=tmp_path)
    assert_clean_error(result.returncode, result.stderr, out, "--model PATH", "--text-file PATH",
                       "no-such-user/no-such-gpt2")


def test_torchrun_gloo_matches_single_process(sweep_run, saved_model, tmp_path):
    out2 = tmp_path / "out2"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "nqpq",
               *sweep_args(*saved_model, out2)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("PYTHONPATH", None)
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    one, two = sweep_run[3], json.loads((out2 / "results.json").read_text())
    assert two["config"]["world_size"] == 2
    for key in ("ppl_baseline", "ppl_top1", "ppl_full"):
        assert rel(two[key], one[key]) <= 1e-6, key
    assert [c["d_r"] for c in two["curve"]] == [c["d_r"] for c in one["curve"]]
    for a, b in zip(one["curve"], two["curve"]):
        assert rel(b["ppl"], a["ppl"]) <= 1e-6, a["d_r"]
    assert [s["r90"] for s in two["spectrum"]] == [s["r90"] for s in one["spectrum"]]
    assert result.stdout.count("PPL baseline") == 1  # only rank 0 reports


def test_sweep_on_shared_data(shared_data, tmp_path, capsys):
    """The real GPT-2 tokenizer and WikiText validation text, with a tiny random model of GPT-2's vocabulary."""
    tokenizer = GPT2TokenizerFast.from_pretrained(str(shared_data))
    assert len(tokenizer) == 50257
    raw = (shared_data / "wiki.valid.raw").read_text(encoding="utf-8")
    assert len(tokenizer.encode(raw)) == 249_887  # the count shared/data/README.md publishes
    model_dir = tmp_path / "gpt2-vocab"
    build_model("eager", vocab_size=len(tokenizer)).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    out = tmp_path / "out"
    args = ["sweep", "--model", str(model_dir), "--text-file", str(shared_data / "wiki.valid.raw"),
            "--layers", "3", "--d-r", "2", "--n-blocks", "3", "--seq-len", "64", "--device", "cpu", "--no-progress",
            "--out", str(out)]
    assert main(args) == 0
    results = json.loads((out / "results.json").read_text())
    ids = text_ids(shared_data / "wiki.valid.raw", tokenizer)
    assert results["config"]["n_tokens"] == ids.numel()
    assert results["config"]["calib_blocks"] == 3  # default: 4, capped at --n-blocks
    model = GPT2LMHeadModel.from_pretrained(model_dir).eval()
    assert rel(results["ppl_baseline"], perplexity(model, ids, 64, 3)) <= 1e-6
    assert math.isfinite(results["ppl_top1"])

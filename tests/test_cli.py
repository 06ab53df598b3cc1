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
from conftest import HEAD_DIM, N_HEAD, assert_clear_argmax, build_model, score_margins, wikitext_text
from transformers import GPT2LMHeadModel, GPT2TokenizerFast

from nqpq import ResidualBasis, calibrate, crystallize, make_blocks, perplexity
from nqpq.cli import main

# 8 blocks: the fewest with intervals (nqpq.results.stats.MIN_BLOCKS), so the verdict can be more than INCONCLUSIVE.
LAYERS, D_RS, N_BLOCKS, SEQ_LEN, CALIB = (2, 3), (1, 16), 8, 32, 2
REPORT_LINES = ("PPL baseline", "[A] Top-1", "[B]", "d_r=", "VERDICT")


def sweep_args(model_dir, text_file, out, *extra):
    args = ["sweep", "--model", str(model_dir), "--text-file", str(text_file),
            "--layers", *map(str, LAYERS), "--d-r", *map(str, D_RS), "--n-blocks", str(N_BLOCKS),
            "--seq-len", str(SEQ_LEN), "--calib-blocks", str(CALIB), "--calib-from", "eval", "--device", "cpu",
            "--batch-size", "4", "--no-progress"]
    if out is not None:
        args += ["--out", str(out)]
    return args + list(extra)


def rel(a, b):
    return abs(a - b) / abs(b)


def top1_measurable(results):
    """docs/verdict.md's rule: top-1's ΔPPL and the low end of its 95 % interval above 1e-6 of the baseline."""
    ci, floor = results["top1_delta_ppl_ci95"], 1e-6 * results["ppl_baseline"]
    return ci is not None and results["ppl_top1"] - results["ppl_baseline"] > floor and ci[0] > floor


def spec_recovered(ppl_baseline, ppl_top1, ppl_c, measurable=True):
    """The spec's recovered %, or None where top-1's loss is not measurable (docs/verdict.md)."""
    if not measurable:
        return None
    return pytest.approx((ppl_top1 - ppl_c) / max(ppl_top1 - ppl_baseline, 1e-9) * 100, rel=1e-9, abs=1e-9)


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
        ["results.json", "delta_ppl_vs_dr.png", "cumulative_variance.png", "delta_ppl_vs_cost.png", "basis.pt"])
    for png in ("delta_ppl_vs_dr.png", "cumulative_variance.png", "delta_ppl_vs_cost.png"):
        data = (out / png).read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 1000


def test_results_carry_each_configurations_cost(sweep_run):
    code, stdout, _, results = sweep_run
    cost = results["cost"]
    assert cost["seq_len"] == SEQ_LEN and cost["device"] == "cpu" and cost["n_layers"] == len(LAYERS)
    keys = [c["key"] for c in cost["configurations"]]
    assert keys == ["baseline", "full", "top1", *(f"lowrank_d{d}" for d in D_RS)]
    by_key = {c["key"]: c for c in cost["configurations"]}
    for key in ("baseline", "full"):
        for rel in ("relative_prefill_flops", "relative_prefill_bytes", "relative_decode_flops",
                    "relative_decode_bytes"):
            assert by_key[key][rel] == pytest.approx(1.0)
    assert by_key["full"]["relative_op_time"] == pytest.approx(1.0)
    assert by_key["top1"]["relative_prefill_flops"] < 1.0 and by_key["top1"]["relative_decode_bytes"] < 1.0
    for c in cost["configurations"]:
        assert c["op_time_ms"] > 0
    ranks = [by_key[f"lowrank_d{d}"]["relative_prefill_flops"] for d in D_RS]
    assert ranks == sorted(ranks)  # a larger rank costs more
    assert "Cost of the crystallized layers' attention" in stdout


def test_results_json_schema(sweep_run):
    results = sweep_run[3]
    for key in ("ppl_baseline", "ppl_top1", "ppl_full", "curve", "spectrum", "mean_eff_dim", "verdict",
                "config", "timings"):
        assert key in results, key
    assert [c["d_r"] for c in results["curve"]] == list(D_RS)
    for c in results["curve"]:
        assert set(c) >= {"d_r", "ppl", "delta_ppl", "recovered_pct"}
        assert c["delta_ppl"] == pytest.approx(c["ppl"] - results["ppl_baseline"], rel=1e-12, abs=1e-12)
        assert c["recovered_pct"] == spec_recovered(results["ppl_baseline"], results["ppl_top1"], c["ppl"],
                                                    top1_measurable(results))
    assert [(s["layer"], s["head"]) for s in results["spectrum"]] == [(li, h) for li in LAYERS for h in range(N_HEAD)]
    for s in results["spectrum"]:
        assert set(s) >= {"layer", "head", "cumulative_variance", "r90"}
        cv = s["cumulative_variance"]
        assert len(cv) == HEAD_DIM and cv[-1] == pytest.approx(1.0) and cv == sorted(cv)
        assert s["r90"] == sum(v < 0.9 for v in cv) + 1
    assert results["mean_eff_dim"] == pytest.approx(statistics.mean(s["r90"] for s in results["spectrum"]))
    verdict = results["verdict"]
    assert set(verdict) >= {"outcome", "compressible", "d_r_min", "settled"}
    if not top1_measurable(results):
        assert verdict["outcome"] == "INCONCLUSIVE" and verdict["reason"] == "no_measurable_loss"
        assert verdict["compressible"] is None and verdict["d_r_min"] is None and verdict["settled"] is False
    else:
        good = [c["d_r"] for c in results["curve"] if c["recovered_pct"] >= 90.0]
        assert verdict["outcome"] == ("YES" if good else "PARTIAL")
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
    # d_r = 0 (exactly top-1) is no longer a sweep rank (--d-r >= 1); test_integration checks it on the op.
    assert rel(results["ppl_top1"], results["ppl_baseline"]) > 1e-4  # top-1 is a real change


def test_results_equal_straightforward_recomputation(sweep_run, saved_model):
    model_dir, text_file = saved_model
    results, out = sweep_run[3], sweep_run[2]
    model = GPT2LMHeadModel.from_pretrained(model_dir).eval()
    ids = text_ids(text_file, GPT2TokenizerFast.from_pretrained(model_dir))
    assert results["config"]["n_tokens"] == N_BLOCKS * SEQ_LEN  # only the tokens the blocks use are read
    basis = ResidualBasis.load(str(out / "basis.pt"))
    assert basis.layers == list(LAYERS)

    # The sweep ran batches of 4 and replayed from layer 2; here it is one block at a time, whole model. Every
    # row of the crystallized layers (baseline rows included: they feed calibration) must have a clear argmax.
    # The same rows are compared in test_torchrun_gloo_matches_single_process.
    gaps = []

    def ppl(mode=None, d_r=None):
        with score_margins(model, LAYERS) as call_gaps:
            if mode is None:
                value = perplexity(model, ids, SEQ_LEN, N_BLOCKS)
            else:
                with crystallize(model, LAYERS, mode=mode, basis=basis.basis, d_r=d_r, backend="torch"):
                    value = perplexity(model, ids, SEQ_LEN, N_BLOCKS)
        gaps.extend(call_gaps)
        return value

    assert rel(results["ppl_baseline"], ppl()) <= 1e-6
    assert rel(results["ppl_top1"], ppl("top1")) <= 1e-6
    assert rel(results["ppl_full"], ppl("full")) <= 1e-6
    for c in results["curve"]:
        assert rel(c["ppl"], ppl("lowrank", c["d_r"])) <= 1e-6, c["d_r"]
    assert_clear_argmax(gaps)

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
    "d_r": (["--d-r", "1", str(HEAD_DIM + 1)], ["--d-r", "1..16"]),
    "d_r_zero": (["--d-r", "0", "4"], ["--d-r [0]", ">= 1", "rank 0 is top-1"]),
    "too_many_blocks": (["--n-blocks", "100000"], ["--n-blocks", "tokens"]),
    "seq_len": (["--seq-len", "129"], ["--seq-len 129", "2..128"]),
    "calib_zero": (["--calib-blocks", "0"], ["--calib-blocks 0"]),
    "n_blocks_zero": (["--n-blocks", "0"], ["--n-blocks 0"]),
    "calib_too_many": (["--calib-blocks", "9"], ["--calib-blocks 9"]),
    "missing_text": (["--text-file", "/nonexistent/wiki.raw"], ["--text-file", "/nonexistent/wiki.raw"]),
    "text_is_dir": (["--text-file", "/"], ["--text-file"]),
    "batch_size": (["--batch-size", "0"], ["--batch-size"]),
    "dtype": (["--dtype", "int8"], ["--dtype"]),
    "calib_from": (["--calib-from", "test"], ["--calib-from 'test'", "heldout, eval"]),
    "calib_text_missing": (["--calib-from", "heldout", "--calib-text-file", "/nonexistent/c.raw"],
                           ["--calib-text-file", "/nonexistent/c.raw"]),
    "heldout_too_short": (["--calib-from", "heldout", "--calib-blocks", "1000"],
                          ["held-out calibration", "needs 1008 blocks", "the text has"]),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_clean_error(case, saved_model, tmp_path, capsys):
    extra, needles = BAD_INPUTS[case]
    out = tmp_path / "out"
    code = main(sweep_args(*saved_model, out, *extra))
    assert_clean_error(code, capsys.readouterr().err, out, *needles)


def test_calibration_text_too_short(saved_model, tmp_path, capsys):
    short = tmp_path / "short.raw"
    short.write_text(" = Title = \n Few words here . \n", encoding="utf-8")
    out = tmp_path / "out"
    code = main(sweep_args(*saved_model, out, "--calib-from", "heldout", "--calib-text-file", str(short)))
    assert_clean_error(code, capsys.readouterr().err, out, "--calib-text-file", str(short), "need 64 tokens",
                       "the text has")


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
    assert_same_intervals(one, two)


def assert_same_intervals(one: dict, two: dict) -> None:
    """The bootstrap intervals of two runs whose block losses agree to rounding (same seed, same indices)."""
    def close(a, b, scale):
        assert (a is None) == (b is None)
        if a is not None:
            assert a == pytest.approx(b, rel=1e-5, abs=1e-6 * scale)

    close(two["top1_delta_ppl_ci95"], one["top1_delta_ppl_ci95"], one["ppl_baseline"])
    for a, b in zip(one["curve"], two["curve"], strict=True):
        close(b["delta_ppl_ci95"], a["delta_ppl_ci95"], one["ppl_baseline"])
        close(b["recovered_pct_ci95"], a["recovered_pct_ci95"], 100.0)
        assert b["block_losses"] == pytest.approx(a["block_losses"], rel=1e-6)


def test_torchrun_heldout_draws_match_single_process(saved_model, tmp_path, capsys):
    """Held-out calibration blocks split across 2 ranks (odd count: 3 per draw) give one process's bases, PPLs
    and intervals."""
    extra = ["--calib-from", "heldout", "--calib-blocks", "3", "--calib-draws", "2"]
    out1, out2 = tmp_path / "one", tmp_path / "two"
    assert main(sweep_args(*saved_model, out1, *extra)) == 0
    capsys.readouterr()
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "nqpq",
               *sweep_args(*saved_model, out2, *extra)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("PYTHONPATH", None)
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    one, two = (json.loads((d / "results.json").read_text()) for d in (out1, out2))
    assert two["config"]["world_size"] == 2 and two["config"]["calibration"]["first_blocks"] == [N_BLOCKS, N_BLOCKS + 3]
    for a, b in zip(one["draws"], two["draws"], strict=True):
        for ca, cb in zip(a["curve"], b["curve"], strict=True):
            assert rel(cb["ppl"], ca["ppl"]) <= 1e-6, (a["draw"], ca["d_r"])
    for sa, sb in zip(one["spectrum"], two["spectrum"]):
        assert sb["cumulative_variance"] == pytest.approx(sa["cumulative_variance"], abs=1e-6)
    assert_same_intervals(one, two)


def test_sweep_on_real_tokenizer_and_wikitext(real_files, tmp_path, capsys):
    """The real GPT-2 tokenizer and WikiText validation text, with a tiny random model of GPT-2's vocabulary."""
    tokenizer = GPT2TokenizerFast.from_pretrained(str(real_files.gpt2_tokenizer))
    assert len(tokenizer) == 50257
    raw = real_files.wiki_valid.read_text(encoding="utf-8")
    assert len(tokenizer.encode(raw)) == 249_887  # the count tests/data/README.md publishes
    model_dir = tmp_path / "gpt2-vocab"
    build_model("eager", vocab_size=len(tokenizer)).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    out = tmp_path / "out"
    args = ["sweep", "--model", str(model_dir), "--text-file", str(real_files.wiki_valid),
            "--layers", "3", "--d-r", "2", "--n-blocks", "3", "--seq-len", "64", "--device", "cpu", "--no-progress",
            "--out", str(out)]
    assert main(args) == 0
    results = json.loads((out / "results.json").read_text())
    ids = text_ids(real_files.wiki_valid, tokenizer)
    assert results["config"]["n_tokens"] == 3 * 64
    assert results["config"]["calib_blocks"] == 4  # default: 4 held-out blocks, after the 3 scored ones
    assert results["config"]["calibration"]["first_blocks"] == [3]
    model = GPT2LMHeadModel.from_pretrained(model_dir).eval()
    assert rel(results["ppl_baseline"], perplexity(model, ids, 64, 3)) <= 1e-6
    assert math.isfinite(results["ppl_top1"])


# --- hardening, each through the real console script in its own process ----------------------------------------

def nqpq_command(*args: str) -> list[str]:
    """The installed `nqpq` console script, else ``python -m nqpq``, with ``args``."""
    command = cli_command()
    return [command, *args] if command else [sys.executable, "-m", "nqpq", *args]


def cli_env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def run_parallel(cases: dict[str, list[str]], cwd: Path, timeout: float = 180) -> dict:
    """Run each command line at once (they are mostly start-up time) and collect (rc, stdout, stderr)."""
    procs = {name: subprocess.Popen(nqpq_command(*args), cwd=cwd, env=cli_env(), stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True) for name, args in cases.items()}
    done = {}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=timeout)
        done[name] = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    return done


def save_weights(model_dir: Path, edit) -> None:
    from safetensors.torch import load_file, save_file

    state = load_file(str(model_dir / "model.safetensors"))
    edit(state)
    save_file(state, str(model_dir / "model.safetensors"), metadata={"format": "pt"})


def tiny_llama(tie: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                        tie_word_embeddings=tie))


@pytest.fixture(scope="module")
def refusal_cases(saved_model, tmp_path_factory):
    """Checkpoints and flags that must be refused: {name: (sweep args, needles in the error line)}, and paths."""
    model_dir, text_file = saved_model
    tmp_path = tmp_path_factory.mktemp("refusals")
    # A GPT-2 config over Llama weights: loaded as GPT-2, every weight would be random (the original bug).
    swapped = tmp_path / "gpt2-config-llama-weights"
    tiny_llama(tie=False).save_pretrained(swapped)
    GPT2LMHeadModel.from_pretrained(model_dir).config.save_pretrained(swapped)
    # A Llama whose untied LM head is not in the file.
    headless = tmp_path / "llama-no-head"
    tiny_llama(tie=False).save_pretrained(headless)
    save_weights(headless, lambda s: s.pop("lm_head.weight"))
    # A download cut short.
    truncated = tmp_path / "truncated"
    shutil.copytree(model_dir, truncated)
    weights = truncated / "model.safetensors"
    with open(weights, "r+b") as f:
        f.truncate(weights.stat().st_size - 1000)
    # A model whose embedding is smaller than the tokenizer's vocabulary (100 rows vs 300 tokens).
    small_vocab = tmp_path / "small-vocab"
    build_model(vocab_size=100).save_pretrained(small_vocab)
    # An encoder.
    from transformers import BertConfig, BertForMaskedLM

    encoder = tmp_path / "bert"
    BertForMaskedLM(BertConfig(vocab_size=300, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=64)).save_pretrained(encoder)
    # --out: one the run would create (removed on failure), one that exists (left as it was).
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "notes.txt").write_text("keep me")
    new_out = tmp_path / "new" / "out"

    def args(model, *extra, out=None):
        return sweep_args(model, text_file, out, "--tokenizer", str(model_dir), *extra)

    return {
        "swapped": (args(swapped, "--layers", "1", out=new_out), ["missing", "unexpected", "randomly initialised"]),
        # (--d-r within its head width 8: a rank it cannot take would be refused from its config, before the load.)
        "headless": (args(headless, "--layers", "1", "--d-r", "2", out=existing), ["lm_head.weight", "missing"]),
        "truncated": (args(truncated, out=existing), ["Could not load the model", "SafetensorError"]),
        "small_vocab": (args(small_vocab), ["(300 tokens)", "(100 rows)"]),
        "encoder": (args(encoder, "--layers", "0"), ["encoder", "bert"]),
        "device_meta": (args(model_dir, "--device", "meta"), ["--device 'meta'"]),
        "demo_model": (["sweep", "--demo", "--model", str(model_dir)], ["--demo", "--model"]),
        # Flags that need no model are checked before the model (here: one that does not exist) is looked at.
        "flags_first": (sweep_args(tmp_path / "no-such-model", text_file, None, "--batch-size", "0"),
                        ["--batch-size"]),
        "text_first": (sweep_args(tmp_path / "no-such-model", tmp_path / "no-such.raw", None), ["--text-file"]),
    }, tmp_path


def assert_one_line_error(name, code, err, needles):
    assert code == 2, (name, err[-2000:])
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("nqpq: error: "), (name, err[-2000:])
    for needle in needles:
        assert needle in lines[0], (name, needle, lines[0])


# Start-up dominates these runs (~3 s each on 2 cores): three run as real processes, in parallel,
# and the others in this process through the same entry point (main).
IN_A_REAL_PROCESS = ("swapped", "truncated", "small_vocab")


def test_refusals_in_real_processes(refusal_cases):
    """A checkpoint that is not what it claims, half-downloaded, or too small for the tokenizer: exit 2, one
    line; an --out directory the run created is gone, one that existed is as it was."""
    cases, tmp_path = refusal_cases
    results = run_parallel({name: cases[name][0] for name in IN_A_REAL_PROCESS}, cwd=tmp_path)
    for name in IN_A_REAL_PROCESS:
        assert_one_line_error(name, results[name].returncode, results[name].stderr, cases[name][1])
    assert not (tmp_path / "new").exists()
    existing = tmp_path / "existing"
    assert sorted(p.name for p in existing.iterdir()) == ["notes.txt"]
    assert (existing / "notes.txt").read_text() == "keep me"


@pytest.mark.parametrize("name", ["headless", "encoder", "device_meta", "demo_model", "flags_first", "text_first"])
def test_refusals(refusal_cases, name, capsys):
    cases, _ = refusal_cases
    args, needles = cases[name]
    code = main(args)
    assert_one_line_error(name, code, capsys.readouterr().err, needles)
    existing = refusal_cases[1] / "existing"
    assert sorted(p.name for p in existing.iterdir()) == ["notes.txt"]


def test_help_states_each_default_once(tmp_path):
    result = subprocess.run(nqpq_command("sweep", "--help"), cwd=tmp_path, env=cli_env(), capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    options = " ".join(result.stdout.split()).split(" --")[1:]  # one chunk per option, wrapped lines joined
    assert len(options) >= 15
    for option in options:
        assert option.count("default") <= 1, option
    assert "quarter of the free GPU memory" in " ".join(result.stdout.split())  # what the default batch size does


def test_ctrl_c_exits_130_and_writes_no_results(saved_model, tmp_path):
    import signal
    import time

    model_dir, _ = saved_model
    text = tmp_path / "long.raw"
    text.write_text(wikitext_text(n_articles=200, seed=4), encoding="utf-8")
    out = tmp_path / "out"
    args = sweep_args(model_dir, text, out, "--n-blocks", "60", "--seq-len", "128", "--layers", "1", "2", "3",
                      "--d-r", *map(str, range(1, HEAD_DIM + 1)))
    # As a terminal's Ctrl-C reaches a foreground command: SIGINT at its default disposition. A test run started in
    # the background of a non-interactive shell inherits SIGINT ignored, and Python then installs no KeyboardInterrupt
    # handler: the sweep would finish (exit 0). The disposition is reset, then the same process execs nqpq.
    reset_sigint = ("import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
                    "os.execvp(sys.argv[1], sys.argv[1:])")
    proc = subprocess.Popen([sys.executable, "-c", reset_sigint, *nqpq_command(*args)], cwd=tmp_path,
                            env={**cli_env(), "PYTHONUNBUFFERED": "1"}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        first = proc.stdout.readline()
        assert "Loading" in first, first
        # Into the sweep proper: its first measured number printed, most configurations still ahead.
        seen = [first]
        while "PPL baseline" not in seen[-1] and seen[-1]:
            seen.append(proc.stdout.readline())
        assert "PPL baseline" in seen[-1], "".join(seen)
        time.sleep(0.5)
        assert proc.poll() is None, "the sweep ended before it could be interrupted"
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, err[-2000:]
    # The configurations that finished are kept for --resume (nqpq.experiments.resume, tests/test_resume.py);
    # results.json is written whole at the end or not at all.
    [line] = [line for line in err.splitlines() if line.strip()] or [""]
    kept = line.startswith("nqpq: interrupted; kept ") and line.endswith("with --resume to finish it")
    assert kept or line == "nqpq: interrupted; nothing written", err[-2000:]
    assert not (out / "results.json").exists()
    assert (out / ".nqpq-partial" / "state.json").is_file() if kept else not out.exists()


def measured_run(args: list[str], cwd: Path) -> tuple[float, int, str]:
    """(wall seconds, peak RSS in KiB, stderr) of one `nqpq` process."""
    import time

    err_path = cwd / f"stderr-{len(list(cwd.iterdir()))}.txt"
    with open(err_path, "w") as err:
        t = time.perf_counter()
        proc = subprocess.Popen(nqpq_command(*args), cwd=cwd, env=cli_env(), stdout=subprocess.DEVNULL, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - t
    proc.returncode = os.waitstatus_to_exitcode(status)
    assert proc.returncode == 0, err_path.read_text()[-2000:]
    return seconds, usage.ru_maxrss, err_path.read_text()


def test_huge_text_costs_what_the_blocks_need(saved_model, tmp_path):
    """A 40 MB text file costs about what a 30 KB one does: only the rows the blocks need are read and tokenized."""
    model_dir, small = saved_model
    huge = tmp_path / "huge.raw"
    chunk = wikitext_text(n_articles=300, seed=9)
    with open(huge, "w", encoding="utf-8") as f:
        for _ in range(40_000_000 // len(chunk) + 1):
            f.write(chunk)
    assert huge.stat().st_size > 40_000_000 and small.stat().st_size < 100_000

    def args(text, out):
        return ["sweep", "--model", str(model_dir), "--text-file", str(text), "--layers", "3", "--d-r", "4", "4",
                "2", "--n-blocks", "4", "--seq-len", "32", "--calib-blocks", "2", "--device", "cpu", "--no-progress",
                "--out", str(out)]

    small_s, small_rss, _ = measured_run(args(small, tmp_path / "small"), tmp_path)
    huge_s, huge_rss, _ = measured_run(args(huge, tmp_path / "huge"), tmp_path)
    # Reading it whole took ~10x the time and GBs; the bounds leave room for a busy shared machine only.
    assert huge_rss < small_rss * 1.1, (huge_rss, small_rss)
    assert huge_s < small_s * 2 + 2.0, (huge_s, small_s)
    for out in ("small", "huge"):
        results = json.loads((tmp_path / out / "results.json").read_text())
        assert [c["d_r"] for c in results["curve"]] == [2, 4]  # --d-r 4 4 2: each once, in order
        assert results["config"]["d_r"] == [2, 4] and results["config"]["n_tokens"] == 4 * 32


def test_report_into_a_closed_pipe_is_quiet(sweep_run, tmp_path):
    """`nqpq report DIR | head -1`: the reader leaves early; no BrokenPipeError traceback, exit 141 (SIGPIPE)."""
    out = sweep_run[2]
    proc = subprocess.Popen(nqpq_command("report", str(out)), cwd=tmp_path, env=cli_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline()  # the report has started
        proc.stdout.close()  # like `head -1` exiting
        err = proc.stderr.read()
        proc.wait(timeout=120)
    finally:
        proc.kill()
    assert "Traceback" not in err and "BrokenPipeError" not in err, err[-2000:]
    assert proc.returncode in (0, 141), err[-2000:]  # 0 only if everything fit the pipe buffer before the close


# --- errors before work (issue 32): flags the model cannot take are refused from its config, before any weight ---

@pytest.fixture
def no_weights(monkeypatch):
    """Fail the test if a tokenizer or any weight is read (the config alone must answer)."""
    from nqpq.experiments import setup

    def refuse(what):
        def fail(*args, **kwargs):
            raise AssertionError(f"{what} was called before the refusal")
        return fail

    for name in ("load_model", "load_tokenizer", "demo_model"):
        monkeypatch.setattr(setup, name, refuse(name))
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse("from_pretrained"))


@pytest.mark.parametrize("command", ["sweep", "scan"])
@pytest.mark.parametrize("flags, line", [
    (["--layers", "99"], "--layers [99]: the model has layers 0..3"),
    (["--layers", "1", "4"], "--layers [4]: the model has layers 0..3"),
    (["--d-r", "2", str(HEAD_DIM + 1)], f"--d-r [{HEAD_DIM + 1}]: each d_r must be in 1..{HEAD_DIM} (the head "
                                        "dimension; rank 0 is top-1)"),
    (["--seq-len", "129"], "--seq-len 129: must be in 2..128 (the model's positions)"),
])
def test_flags_refused_from_the_config_before_loading(command, flags, line, saved_model, tmp_path, capsys,
                                                      no_weights):
    model_dir, text_file = saved_model
    out = tmp_path / "out"
    args = [command, "--model", str(model_dir), "--text-file", str(text_file), "--n-blocks", "2", "--seq-len", "32",
            "--device", "cpu", "--no-progress", "--out", str(out), *flags]
    assert main(args) == 2
    assert capsys.readouterr().err.splitlines() == [f"nqpq: error: {line}"]
    assert not out.exists()


def test_demo_flags_refused_before_the_random_model_is_built(tmp_path, capsys, no_weights):
    assert main(["sweep", "--demo", "--layers", "12", "--n-blocks", "2", "--no-progress"]) == 2
    assert capsys.readouterr().err.splitlines() == ["nqpq: error: --layers [12]: the model has layers 0..11"]
    assert main(["sweep", "--demo", "--d-r", "65", "--n-blocks", "2", "--no-progress"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "nqpq: error: --d-r [65]: each d_r must be in 1..64 (the head dimension; "
        "rank 0 is top-1)"]


def test_named_model_refusal_in_a_real_process_fetches_nothing(tmp_path):
    """`nqpq sweep --model smollm2-135m --layers 99` in its own process, with an empty model cache and pip kept off
    the registry: the layers line, exit 2, and the cache still empty (nothing fetched, nothing loaded)."""
    cache = tmp_path / "cache"
    cache.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "NQPQ_CACHE": str(cache),
           "PIP_NO_INDEX": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    for flags, line in ((["--layers", "99"], "--layers [99]: the model has layers 0..29"),
                        (["--d-r", "65"], "--d-r [65]: each d_r must be in 1..64 (the head "
                                          "dimension; rank 0 is top-1)")):
        result = subprocess.run([sys.executable, "-m", "nqpq", "sweep", "--model", "smollm2-135m", *flags,
                                 "--n-blocks", "4", "--out", str(tmp_path / "x")], cwd=tmp_path, env=env,
                                capture_output=True, text=True, timeout=120)
        assert (result.returncode, result.stderr.splitlines()) == (2, [f"nqpq: error: {line}"]), result.stderr
    assert list(cache.iterdir()) == [] and not (tmp_path / "x").exists()


def test_version_is_the_package_version(capsys):
    """`nqpq --version` prints nqpq.__version__ (nqpq/version.py), the one the package's metadata reads too
    (pyproject: dynamic)."""
    import tomllib

    import nqpq

    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out == f"nqpq {nqpq.__version__}\n"
    project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    assert "version" not in project["project"] and "version" in project["project"]["dynamic"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "nqpq.version.__version__"}


@pytest.mark.parametrize("argv, unknown", [(["sweep", "--layrs", "3"], "--layrs 3"),
                                           (["scan", "--demo", "--d_r", "3"], "--d_r 3"),
                                           (["report", "out", "--x"], "--x"), (["models", "--all"], "--all")])
def test_a_mistyped_flag_prints_the_subcommands_usage(argv, unknown, capsys):
    """The subcommand's own usage (its flags), not the top-level one, then one error line naming what was not known."""
    with pytest.raises(SystemExit) as done:
        main(argv)
    assert done.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"usage: nqpq {argv[0]} ")
    assert err.splitlines()[-1] == f"nqpq {argv[0]}: error: unrecognized arguments: {unknown}"

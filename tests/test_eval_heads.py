"""``nqpq eval --heads``: the sweep's head choice (by index, or by a crystallinity rule measured on the sweep's
calibration blocks) in an lm-eval run, offline on the local tasks and the tiny GQA Llama.

Checked: by index, top-1's loglikelihoods are an independent float64 model's with exactly those heads crystallized;
by rule, the heads chosen are those whose float64 top-1 probability on the sweep's held-out calibration blocks meets
the rule (the measured values recorded); the choice is named in results.json and the report; the CLI runs --heads
with a generate_until and a multiple-choice task and writes it; bad --heads end in one line and exit 2.
"""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from conftest import REL_SCORE_MARGIN, REPO, build_tokenizer
from f64_reference import F64Reference, build_llama, f64_loglikelihood
from test_downstream import one_error_line

from nqpq import make_blocks
from nqpq.cli import main
from nqpq.experiments.downstream import EvalConfig, run_eval
from nqpq.experiments.lm_eval_tasks import make_lm
from nqpq.results.paired import BASELINE
from nqpq.sources.text import ids_for_blocks, packaged_text, rows_from_file

pytestmark = pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None,
                                reason="nqpq eval needs lm-evaluation-harness (pip install -e '.[eval]')")

TASKS = REPO / "tests" / "data" / "tasks"
LAYERS = (1, 2)
N_HEADS = 4
SEQ_LEN, N_BLOCKS, CALIB_BLOCKS = 48, 2, 3
N_DOCS = 10


@pytest.fixture(scope="module")
def tiny():
    tokenizer = build_tokenizer()
    return build_llama(len(tokenizer)), tokenizer


def evaluate(tiny, heads, monkeypatch, lines=None) -> dict:
    model, tokenizer = tiny
    monkeypatch.chdir(REPO)  # the task's data_files are relative to the repository root
    cfg = EvalConfig(model="tiny-llama", tasks=("nqpq_cloze",), include_path=str(TASKS), limit=N_DOCS, layers=LAYERS,
                     heads=heads, modes=("top1",), text="wikitext-103-valid", n_blocks=N_BLOCKS, seq_len=SEQ_LEN,
                     calib_blocks=CALIB_BLOCKS, device="cpu", backend="torch", progress=False)
    return run_eval(cfg, model=model, tokenizer=tokenizer, log=(lambda _: None) if lines is None else lines.append)


def cloze_docs() -> list[dict]:
    with open(TASKS / "nqpq_cloze.jsonl") as f:
        return [json.loads(line) for line in f][:N_DOCS]


def assert_top1_is_float64_with(results, tiny, chosen: dict[int, tuple[int, ...]]) -> None:
    """Top-1's loglikelihood of every choice equals a float64 model with ``chosen`` heads crystallized top-1, where
    every crystallized row has a clear maximum; most requests qualify."""
    model, tokenizer = tiny
    ref = F64Reference(model)
    ref.crystal = {li: ("top1", None) for li in chosen}
    ref.crystal_heads = {li: set(h) for li, h in chosen.items()}
    lm = make_lm(model, tokenizer, progress=False)
    task = results["tasks"]["nqpq_cloze"]
    compared = changed = total = 0
    for doc, got, base in zip(cloze_docs(), task["items"]["top1"]["loglikelihoods"],
                              task["items"][BASELINE]["loglikelihoods"]):
        for choice, ll, ll_base in zip(doc["choices"], got, base):
            total += 1
            ref.crystal_gaps = []
            want = f64_loglikelihood(ref, *lm._encode_pair(doc["question"], " " + choice))
            if min(ref.crystal_gaps) <= REL_SCORE_MARGIN:
                continue
            assert ll == pytest.approx(want, rel=1e-5, abs=1e-4)
            compared += 1
            changed += abs(ll - ll_base) > 1e-2
    assert compared >= 0.75 * total, f"only {compared} of {total} requests have clear maxima"
    assert changed >= 0.5 * compared, "the chosen heads should change the loglikelihoods far beyond rounding"


def test_by_index_crystallizes_those_heads(tiny, monkeypatch):
    lines: list[str] = []
    results = evaluate(tiny, "1:0,2 2:3", monkeypatch, lines)
    assert results["config"]["heads"] == "1:0,2 2:3"
    assert results["heads"] == {"by": "index", "rule": None, "stat": None, "chosen": {"1": [0, 2], "2": [3]},
                                "n_chosen": 3, "values": None, "measured_on": None}
    assert " heads: 3 crystallized by index: 1:0,2 2:3 (the other heads: plain attention)" in lines
    assert "calibration_s" in results["timings"]
    assert_top1_is_float64_with(results, tiny, {1: (0, 2), 2: (3,)})


def test_by_rule_chooses_the_heads_float64_measures_on_the_sweeps_calibration_blocks(tiny, monkeypatch):
    model, tokenizer = tiny
    # The sweep's held-out calibration blocks: the CALIB_BLOCKS blocks after its N_BLOCKS scored ones (the tiny
    # tokenizer puts no BOS first: blocks are cut from the text as they are).
    ids = ids_for_blocks(rows_from_file(packaged_text("wikitext-103-valid")), tokenizer,
                         (N_BLOCKS + CALIB_BLOCKS) * SEQ_LEN)
    calib = make_blocks(ids, SEQ_LEN, CALIB_BLOCKS, first_block=N_BLOCKS)
    ref = F64Reference(model)
    ref.observed = set(LAYERS)
    ref.block_losses(calib)
    stats = {(s["layer"], s["head"]): s["top1_prob_mean"] for s in ref.crystallinity()}
    # A threshold between two measured values, far from both (fp32 statistics round at ~1e-7).
    ordered = sorted(stats.values())
    gap, threshold = max((b - a, (a + b) / 2) for a, b in zip(ordered[2:-3], ordered[3:-2]))
    assert gap > 1e-4
    lines: list[str] = []
    results = evaluate(tiny, f"top1_prob>={threshold:.6f}", monkeypatch, lines)
    got = results["heads"]
    assert got["by"] == "rule" and got["stat"] == "top1_prob_mean"
    assert got["measured_on"] == {"source": "heldout", "first_block": N_BLOCKS, "blocks": CALIB_BLOCKS,
                                  "seq_len": SEQ_LEN, "sink_tokens": 0}
    for li in LAYERS:
        torch.testing.assert_close(torch.tensor(got["values"][str(li)], dtype=torch.float64),
                                   torch.tensor([stats[li, h] for h in range(N_HEADS)], dtype=torch.float64),
                                   rtol=1e-5, atol=1e-6)
    want = {li: tuple(h for h in range(N_HEADS) if stats[li, h] >= threshold) for li in LAYERS}
    want = {li: h for li, h in want.items() if h}
    assert got["chosen"] == {str(li): list(h) for li, h in want.items()}
    assert 0 < got["n_chosen"] < len(LAYERS) * N_HEADS
    assert any(line.startswith(f" heads: {got['n_chosen']} crystallized by rule top1_prob>=") for line in lines)
    assert_top1_is_float64_with(results, tiny, want)


def test_cli_runs_heads_on_a_generate_and_a_multiple_choice_task(saved_model, tmp_path, monkeypatch, capsys):
    model_dir, _ = saved_model
    monkeypatch.chdir(REPO)
    out = tmp_path / "run"
    code = main(["eval", "--model", str(model_dir), "--tasks", "nqpq_arith,nqpq_cloze", "--include-path", str(TASKS),
                 "--layers", "1", "2", "--heads", "1:0,2", "2:1", "--mode", "full", "top1", "--limit", "3",
                 "--device", "cpu", "--no-progress", "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    results = json.loads((out / "results.json").read_text())
    assert results["heads"]["chosen"] == {"1": [0, 2], "2": [1]} and results["config"]["heads"] == "1:0,2 2:1"
    arith = results["tasks"]["nqpq_arith"]
    assert arith["output_type"] == "generate_until" and arith["n_items"] == 3
    assert arith["items"]["full"]["generations"] == arith["items"][BASELINE]["generations"]
    assert " heads: 3 crystallized by index: 1:0,2 2:1 (the other heads: plain attention)" in captured.out
    assert "  generations identical to the model's (of 3): full 3; top1 " in captured.out
    assert "verdict on exact_match,strict-match: full no interval" in captured.out  # 3 documents: too few


@pytest.mark.parametrize("heads, message", [
    (["5:0"], "--heads names layers [5] that are not among --layers [1]"),
    (["1:0", "1:2"], "--heads '1:0 1:2': layer 1 is named twice"),
    (["fast_heads"], "--heads 'fast_heads': give heads by index"),
    (["top1_prob>=1.5"], "--heads top1_prob>=1.5: no head of --layers [1] meets the rule"),
    (["1:7"], "--heads: the heads of layer 1 [7]: layer 1 has query heads 0..3"),
])
def test_bad_heads_exit_2_with_one_line(heads, message, saved_model, tmp_path, monkeypatch, capsys):
    model_dir, _ = saved_model
    monkeypatch.chdir(REPO)
    out = tmp_path / "never"
    assert main(["eval", "--model", str(model_dir), "--tasks", "nqpq_cloze", "--include-path", str(TASKS),
                 "--layers", "1", "--heads", *heads, "--text", "wikitext-103-valid", "--n-blocks", "2",
                 "--seq-len", "32", "--calib-blocks", "2", "--limit", "2", "--device", "cpu", "--no-progress",
                 "--out", str(out)]) == 2
    assert message in one_error_line(capsys)
    assert not out.exists()


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if a tokenizer or any weight is read, or lm-eval's tasks are loaded: the model's config alone
    must answer (as the sweep's checks before loading, tests/test_sweep_heads.py)."""
    import transformers

    from nqpq.experiments import downstream
    from nqpq.sources import checkpoints

    def refuse(what):
        def fail(*_args, **_kwargs):
            raise AssertionError(f"{what} was called before the refusal")
        return fail

    for name in ("load_model", "load_tokenizer"):
        monkeypatch.setattr(checkpoints, name, refuse(name))
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse("from_pretrained"))
    monkeypatch.setattr(downstream, "task_manager", refuse("task_manager"))


@pytest.mark.parametrize("layers, heads, message", [
    (["1"], ["1:7"], "--heads: the heads of layer 1 [7]: layer 1 has query heads 0..3"),
    (["1", "2"], ["1:0", "2:1,4"], "--heads: the heads of layer 2 [4]: layer 2 has query heads 0..3"),
])
def test_head_indices_refused_from_the_config_before_loading(layers, heads, message, saved_model, tmp_path,
                                                             monkeypatch, capsys, no_model_load):
    """Head indices the model does not have: one line, exit 2, before lm-eval's tasks, a tokenizer or a weight
    loads, and --out left uncreated."""
    model_dir, _ = saved_model
    monkeypatch.chdir(REPO)
    out = tmp_path / "never"
    assert main(["eval", "--model", str(model_dir), "--tasks", "nqpq_cloze", "--include-path", str(TASKS),
                 "--layers", *layers, "--heads", *heads, "--limit", "2", "--device", "cpu", "--no-progress",
                 "--out", str(out)]) == 2
    assert one_error_line(capsys) == f"nqpq: error: {message}"
    assert not out.exists()

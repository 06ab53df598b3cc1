"""``nqpq eval``: lm-evaluation-harness tasks on a model and its crystallized configurations, offline.

The tasks are local (tests/data/tasks: a multiple-choice task and a loglikelihood_rolling one, YAML + JSONL); the
model is a tiny random GQA Llama with the tests' offline BPE tokenizer. Checked: full mode reproduces the model's
per-document loglikelihoods to fp32 rounding and its metrics item for item; top-1's loglikelihoods equal an
independent float64 computation of the crystallized model; the paired bootstrap equals a plain numpy computation
with the same seed on the same documents; the basis is the one ``nqpq.calibrate`` fits on the sweep's calibration
blocks (and a ``--basis`` file of it gives the same numbers); results.json and the plot are written whole; bad input
and a missing lm-eval end in one line and exit 2.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REL_SCORE_MARGIN, REPO, build_tokenizer
from f64_reference import F64Reference, build_llama, f64_loglikelihood

from nqpq import calibrate, make_blocks
from nqpq.cli import main
from nqpq.experiments.downstream import EvalConfig, run_eval
from nqpq.experiments.lm_eval_tasks import make_lm
from nqpq.results.eval_report import PLOT_NAME, write_eval_results
from nqpq.results.paired import BASELINE, BETTER, NO_CHANGE, NO_INTERVAL, WORSE, judge, paired_interval
from nqpq.results.stats import BOOTSTRAP_RESAMPLES
from nqpq.sources.text import ids_for_blocks, packaged_text, rows_from_file

# Every test but the one that hides lm-eval needs it (the dev extra installs it).
needs_lm_eval = pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None,
                                   reason="nqpq eval needs lm-evaluation-harness (pip install -e '.[eval]')")

TASKS = REPO / "tests" / "data" / "tasks"
LAYERS = (1, 2)
D_R = 4
SEQ_LEN, N_BLOCKS, CALIB_BLOCKS = 48, 2, 3  # the sweep's calibration blocks, short enough for 128 positions
SEED = 42


@pytest.fixture(scope="module")
def tiny():
    """The tiny GQA Llama (sharpened attention: crystallizing changes its numbers) and the offline tokenizer."""
    tokenizer = build_tokenizer()
    return build_llama(len(tokenizer)), tokenizer


def eval_config(**overrides) -> EvalConfig:
    settings = dict(model="tiny-llama", tasks=("nqpq_cloze", "nqpq_paragraphs"), include_path=str(TASKS),
                    layers=LAYERS, modes=("full", "top1", "lowrank"), d_r=(D_R,), text="wikitext-103-valid",
                    n_blocks=N_BLOCKS, seq_len=SEQ_LEN, calib_blocks=CALIB_BLOCKS, device="cpu", backend="torch",
                    seed=SEED, progress=False)
    return EvalConfig(**{**settings, **overrides})


@pytest.fixture(scope="module")
def run(tiny):
    """One eval of both local tasks: the model, full, top1 and lowrank d_r=4 (the basis fitted by the run)."""
    model, tokenizer = tiny
    cwd = os.getcwd()
    os.chdir(REPO)  # the tasks' data_files are relative to the repository root (datasets' rule: the cwd)
    try:
        return run_eval(eval_config(), model=model, tokenizer=tokenizer, log=lambda _: None)
    finally:
        os.chdir(cwd)


def docs(name: str) -> list[dict]:
    with open(TASKS / f"{name}.jsonl") as f:
        return [json.loads(line) for line in f]


def flat(rows: list[list[float]]) -> np.ndarray:
    return np.array([x for row in rows for x in row], dtype=np.float64)


@needs_lm_eval
def test_every_document_scored_under_every_configuration(run):
    cloze, paragraphs = run["tasks"]["nqpq_cloze"], run["tasks"]["nqpq_paragraphs"]
    assert run["config"]["configurations"] == ["full", "top1", f"lowrank d_r={D_R}"]
    assert cloze["n_items"] == len(docs("nqpq_cloze")) == 40
    assert paragraphs["n_items"] == len(docs("nqpq_paragraphs")) == 16
    for task in (cloze, paragraphs):
        assert task["items"]["doc_ids"] == list(range(task["n_items"]))
        assert set(task["scores"]) == {BASELINE, "full", "top1", f"lowrank d_r={D_R}"}
    assert list(cloze["metrics"]) == ["acc", "acc_norm"]
    assert cloze["metrics"]["acc"] == {"aggregation": "mean", "higher_is_better": True}
    assert paragraphs["metrics"]["word_perplexity"] == {"aggregation": "weighted_perplexity",
                                                        "higher_is_better": False}
    assert paragraphs["metrics"]["bits_per_byte"]["aggregation"] == "bits_per_byte"


@needs_lm_eval
def test_metrics_are_recomputed_from_the_documents_loglikelihoods(run):
    """Each document's acc is argmax of its choices' loglikelihoods == the JSONL label, and lm-eval's aggregate is
    their mean; word perplexity is exp(−Σ ll / Σ words) over the paragraphs."""
    cloze = run["tasks"]["nqpq_cloze"]
    labels = [d["label"] for d in docs("nqpq_cloze")]
    for config, scores in cloze["scores"].items():
        lls = cloze["items"][config]["loglikelihoods"]
        acc = [float(int(np.argmax(row)) == gold) for row, gold in zip(lls, labels)]
        assert cloze["items"][config]["values"]["acc"] == acc
        assert scores["acc"] == pytest.approx(sum(acc) / len(acc), rel=1e-12)
    paragraphs = run["tasks"]["nqpq_paragraphs"]
    words = [len(d["text"].split()) for d in docs("nqpq_paragraphs")]
    for config, scores in paragraphs["scores"].items():
        ll = flat(paragraphs["items"][config]["loglikelihoods"])
        assert [w for _, w in paragraphs["items"][config]["values"]["word_perplexity"]] == words
        assert scores["word_perplexity"] == pytest.approx(math.exp(-ll.sum() / sum(words)), rel=1e-9)


@needs_lm_eval
def test_full_mode_gives_the_models_numbers(run):
    """Full mode computes ctx = the model's own attention output through the op: each document's loglikelihoods
    agree to fp32 rounding, and every per-document metric is the model's (each document's choices are far apart
    compared with that rounding, checked on the model's numbers first: a clear maximum by construction)."""
    for name, task in run["tasks"].items():
        base = flat(task["items"][BASELINE]["loglikelihoods"])
        full = flat(task["items"]["full"]["loglikelihoods"])
        assert np.all(np.abs(full - base) <= 1e-6 * np.abs(base) + 1e-6), name
        assert all(d["verdict"] == NO_CHANGE for d in task["differences"]["full"].values()), name
    cloze = run["tasks"]["nqpq_cloze"]
    assert cloze["items"]["full"]["values"] == cloze["items"][BASELINE]["values"]  # acc, acc_norm per document
    assert cloze["scores"]["full"] == cloze["scores"][BASELINE]
    paragraphs = run["tasks"]["nqpq_paragraphs"]
    for key in ("word_perplexity", "byte_perplexity"):  # exp(−Σ ll / Σ w): its log is linear in the lls
        full, base = paragraphs["scores"]["full"][key], paragraphs["scores"][BASELINE][key]
        assert math.log(full) == pytest.approx(math.log(base), rel=1e-6)
    assert paragraphs["scores"]["full"]["bits_per_byte"] == pytest.approx(
        paragraphs["scores"][BASELINE]["bits_per_byte"], rel=1e-6)
    lengths = [[len(c) + 1 for c in d["choices"]] for d in docs("nqpq_cloze")]  # lm-eval's " " + choice
    for lls, chars in zip(cloze["items"][BASELINE]["loglikelihoods"], lengths):
        for scores in (np.array(lls), np.array(lls) / np.array(chars)):  # acc, acc_norm
            top = np.sort(scores)[-2:]
            assert top[1] - top[0] > 1e-3, "a near-tie between two choices: pick other documents or seeds"


@needs_lm_eval
def test_top1_loglikelihoods_equal_a_float64_crystallized_model(run, tiny):
    """The top-1 configuration's per-request loglikelihoods (first 10 documents of each task) equal an independent
    float64 computation of the model with layers 1 and 2 crystallized top-1, on lm-eval's own token ids. i* is an
    argmax: a request is compared only where every crystallized row of its float64 forward has a clear maximum
    (top-2 score gap > REL_SCORE_MARGIN·max|s|, conftest), and most requests must qualify."""
    model, tokenizer = tiny
    ref = F64Reference(model)
    ref.crystal = {li: ("top1", None) for li in LAYERS}
    lm = make_lm(model, tokenizer, progress=False)
    cloze, paragraphs = run["tasks"]["nqpq_cloze"], run["tasks"]["nqpq_paragraphs"]
    requests = []  # (context ids, continuation ids, top-1 loglikelihood, the model's)
    for doc, got, base in zip(docs("nqpq_cloze")[:10], cloze["items"]["top1"]["loglikelihoods"],
                              cloze["items"][BASELINE]["loglikelihoods"]):
        for choice, ll, ll_base in zip(doc["choices"], got, base):
            requests.append((*lm._encode_pair(doc["question"], " " + choice), ll, ll_base))
    for doc, (got,), (base,) in zip(docs("nqpq_paragraphs")[:10], paragraphs["items"]["top1"]["loglikelihoods"],
                                    paragraphs["items"][BASELINE]["loglikelihoods"]):
        tokens = lm.tok_encode(doc["text"])
        assert len(tokens) < lm.max_length  # one window: the prefix token, then the whole text
        requests.append(([lm.prefix_token_id], tokens, got, base))
    compared = changed = 0
    for context, continuation, got, base in requests:
        ref.crystal_gaps = []
        want = f64_loglikelihood(ref, context, continuation)
        if min(ref.crystal_gaps) <= REL_SCORE_MARGIN:
            continue
        assert got == pytest.approx(want, rel=1e-5, abs=1e-4)
        compared += 1
        changed += abs(got - base) > 1e-2
    assert compared >= 0.75 * len(requests), f"only {compared} of {len(requests)} requests have clear maxima"
    assert changed >= 0.5 * compared, "top-1 should change the loglikelihoods far beyond rounding"


def numpy_paired_ci(base: np.ndarray, config: np.ndarray, aggregate, seed: int = SEED) -> list[float]:
    """The 95 % paired percentile bootstrap, written out in numpy: the same resampled documents for both."""
    n = len(base)
    idx = np.random.default_rng(seed).integers(0, n, size=(BOOTSTRAP_RESAMPLES, n))
    diffs = np.array([aggregate(config[row]) - aggregate(base[row]) for row in idx])
    return list(np.percentile(diffs, [2.5, 97.5]))


@needs_lm_eval
def test_paired_intervals_equal_a_plain_numpy_bootstrap(run):
    cloze, paragraphs = run["tasks"]["nqpq_cloze"], run["tasks"]["nqpq_paragraphs"]
    for config in ("top1", f"lowrank d_r={D_R}"):
        for key in ("acc", "acc_norm"):
            base = np.array(cloze["items"][BASELINE]["values"][key])
            other = np.array(cloze["items"][config]["values"][key])
            d = cloze["differences"][config][key]
            assert d["ci95"] == pytest.approx(numpy_paired_ci(base, other, np.mean), abs=1e-12)
            assert d["delta"] == pytest.approx(other.mean() - base.mean(), abs=1e-12)
            assert d["verdict"] == judge(d["ci95"], True, base.mean())
        words = np.array(paragraphs["items"][BASELINE]["values"]["word_perplexity"])
        other_words = np.array(paragraphs["items"][config]["values"]["word_perplexity"])
        assert np.array_equal(words[:, 1], other_words[:, 1])  # the same documents, the same word counts

        def word_ppl(rows):
            return math.exp(-rows[:, 0].sum() / rows[:, 1].sum())

        def bits(rows):
            return -rows[:, 0].sum() / rows[:, 1].sum() / math.log(2)

        d = paragraphs["differences"][config]["word_perplexity"]
        assert d["ci95"] == pytest.approx(numpy_paired_ci(words, other_words, word_ppl), rel=1e-9)
        byte_rows = np.array(paragraphs["items"][BASELINE]["values"]["bits_per_byte"])
        other_bytes = np.array(paragraphs["items"][config]["values"]["bits_per_byte"])
        d = paragraphs["differences"][config]["bits_per_byte"]
        assert d["ci95"] == pytest.approx(numpy_paired_ci(byte_rows, other_bytes, bits), rel=1e-9, abs=1e-12)


@needs_lm_eval
def test_verdicts_and_their_edge_cases():
    assert judge([0.01, 0.2], True) == BETTER
    assert judge([0.01, 0.2], False) == WORSE  # a perplexity that went up
    assert judge([-0.2, -0.01], True) == WORSE
    assert judge([-0.2, 0.0], True) == NO_CHANGE  # an interval touching 0 does not exclude it
    assert judge(None, True) == NO_INTERVAL
    assert judge([1e-6, 2e-6], False, 1.0) == NO_CHANGE  # within float32 rounding of the model's value
    assert judge([1e-6, 2e-6], False, 0.01) == WORSE
    from lm_eval.api.metrics import mean

    assert paired_interval([1.0], [0.0], mean, None) is None  # one document: no interval


@needs_lm_eval
def test_basis_is_the_sweeps_calibration_and_a_basis_file_gives_the_same_numbers(run, tiny, tmp_path):
    """The run's basis is ``nqpq.calibrate`` on the sweep's held-out blocks (blocks N_BLOCKS.. of the text); the
    same basis saved and passed as --basis gives the same lowrank loglikelihoods."""
    model, tokenizer = tiny
    per_block = SEQ_LEN  # the tiny tokenizer puts no BOS first: blocks are cut from the text as they are
    ids = ids_for_blocks(rows_from_file(packaged_text("wikitext-103-valid")), tokenizer,
                         (N_BLOCKS + CALIB_BLOCKS) * per_block)
    blocks = make_blocks(ids, SEQ_LEN, CALIB_BLOCKS, first_block=N_BLOCKS)
    path = tmp_path / "basis.pt"
    calibrate(model, blocks, LAYERS, backend="torch").save(str(path))
    assert run["config"]["basis"]["source"] == "calibration"
    calibration = run["config"]["basis"]["calibration"]
    assert calibration["source"] == "heldout" and calibration["first_blocks"] == [N_BLOCKS]
    assert calibration["blocks_per_draw"] == CALIB_BLOCKS and calibration["seq_len"] == SEQ_LEN
    cwd = os.getcwd()
    os.chdir(REPO)
    try:
        again = run_eval(eval_config(tasks=("nqpq_cloze",), modes=("lowrank",), basis=str(path), limit=6),
                         model=model, tokenizer=tokenizer, log=lambda _: None)
    finally:
        os.chdir(cwd)
    name = f"lowrank d_r={D_R}"
    assert again["config"]["basis"] == {"source": "file", "file": "basis.pt"}
    got = again["tasks"]["nqpq_cloze"]["items"][name]["loglikelihoods"]
    assert got == run["tasks"]["nqpq_cloze"]["items"][name]["loglikelihoods"][:6]


@needs_lm_eval
def test_results_and_plot_written_whole(run, tmp_path):
    out = tmp_path / "out"
    written = write_eval_results(str(out), run)
    assert sorted(Path(p).name for p in written) == sorted(["results.json", PLOT_NAME])
    assert sorted(p.name for p in out.iterdir()) == sorted(["results.json", PLOT_NAME])  # no staging left
    assert json.loads((out / "results.json").read_text())["tasks"].keys() == run["tasks"].keys()
    assert (out / PLOT_NAME).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    broken = dict(run, timings={"not json": object()})  # results.json fails half-way: nothing replaced
    with pytest.raises(TypeError):
        write_eval_results(str(out), broken)
    assert json.loads((out / "results.json").read_text())["tasks"].keys() == run["tasks"].keys()
    assert sorted(p.name for p in out.iterdir()) == sorted(["results.json", PLOT_NAME])


@needs_lm_eval
def test_cli_runs_a_saved_model_and_writes_its_results(saved_model, tmp_path, monkeypatch, capsys):
    model_dir, _ = saved_model
    monkeypatch.chdir(REPO)
    out = tmp_path / "run"
    code = main(["eval", "--model", str(model_dir), "--tasks", "nqpq_cloze", "--include-path", str(TASKS),
                 "--layers", "1", "--mode", "top1", "--limit", "5", "--device", "cpu", "--no-progress",
                 "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    results = json.loads((out / "results.json").read_text())
    assert results["kind"] == "eval" and results["config"]["limit"] == 5
    assert results["tasks"]["nqpq_cloze"]["n_items"] == 5
    assert (out / PLOT_NAME).is_file()
    printed = capsys.readouterr().out
    assert "verdict on acc: top1" in printed


def one_error_line(capsys) -> str:
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("nqpq: error: ")
    return lines[0]


@needs_lm_eval
@pytest.mark.parametrize("argv, message", [
    (["--limit", "0"], "--limit 0: must be at least 1"),
    (["--mode", "lowrank"], "--mode lowrank needs --d-r"),
    (["--mode", "top1", "--d-r", "8"], "--d-r: ranks are for --mode lowrank"),
    (["--mode", "fast"], "--mode fast: each must be one of"),
    (["--include-path", "/no/such/dir"], "--include-path '/no/such/dir': no such directory"),
])
def test_bad_flags_exit_2_with_one_line(argv, message, tmp_path, capsys):
    out = tmp_path / "never"
    assert main(["eval", "--tasks", "nqpq_cloze", "--out", str(out), *argv]) == 2
    assert message in one_error_line(capsys)
    assert not out.exists()  # a directory the run would have created is not left behind


@needs_lm_eval
def test_unknown_task_exits_2_with_one_line(saved_model, tmp_path, capsys):
    model_dir, _ = saved_model
    assert main(["eval", "--model", str(model_dir), "--tasks", "nqpq_cloze,no_such_task_xyz", "--include-path",
                 str(TASKS), "--no-progress"]) == 2
    line = one_error_line(capsys)
    assert "unknown task no_such_task_xyz" in line and "nqpq_cloze" not in line.split("unknown task")[1]


@needs_lm_eval
def test_basis_of_another_shape_exits_2_before_any_task_runs(saved_model, tmp_path, monkeypatch, capsys):
    from nqpq.experiments.calibration import ResidualBasis

    model_dir, _ = saved_model  # the tiny GPT-2: 4 heads of width 16
    path = tmp_path / "basis.pt"
    ResidualBasis({1: torch.eye(8).expand(2, 8, 8).clone()}, {1: torch.ones(2, 8)}, {1: torch.ones(2, 8)},
                  {1: torch.ones(2)}).save(str(path))
    monkeypatch.chdir(REPO)
    assert main(["eval", "--model", str(model_dir), "--tasks", "nqpq_cloze", "--include-path", str(TASKS),
                 "--layers", "1", "--mode", "lowrank", "--d-r", "4", "--basis", str(path), "--device", "cpu",
                 "--no-progress"]) == 2
    captured = capsys.readouterr()
    assert captured.err.strip().splitlines() == [
        "nqpq: error: ValueError: basis for layer 1 must be [H=4, D=16, R] with R >= d_r=4 (D: the value head width "
        "D_v), got (2, 8, 8)"]
    assert "[eval] model:" not in captured.out  # refused before the model's run


def test_missing_lm_eval_is_one_line_and_nqpq_still_imports(tmp_path):
    """lm_eval made unimportable in a fresh interpreter: nqpq and its CLI import, and nqpq eval says what to
    install."""
    script = ("import sys; sys.modules['lm_eval'] = None\n"  # `import lm_eval` now raises ImportError
              "import nqpq, nqpq.cli, nqpq.experiments.downstream\n"
              "sys.exit(nqpq.cli.main(['eval', '--tasks', 'nqpq_cloze', '--out', sys.argv[1]]))\n")
    out = tmp_path / "never"
    proc = subprocess.run([sys.executable, "-c", script, str(out)], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "nqpq: error: nqpq eval needs lm-evaluation-harness: pip install -e '.[eval]'"]
    assert not out.exists()

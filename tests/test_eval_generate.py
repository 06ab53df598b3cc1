"""``nqpq eval`` on generate_until tasks: lm-eval's ``HFLM.generate_until`` (``model.generate`` with the KV cache, stop
sequences, left-padded batches) through the crystallized model, offline.

The task is the local word-problem task of tests/data/tasks (``nqpq_arith``: a regex filter, exact match), written
here without its worked examples and with a stop sequence the tiny random model writes ("th"), so that its prompts
are short enough for the tiny Llama's 128 positions, differ in length (a batch pads them), and generation stops
mid-way on most documents. Checked: full mode generates the model's text exactly, document by document (the model's
own greedy steps have clear margins, checked); top-1 generates what an independent float64 greedy decode of the
crystallized model generates, cut at the stop sequences as lm-eval cuts them; each document's exact match is the
regex's answer against the target; a left-padded batch generates what each document generates alone.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re

import numpy as np
import pytest
import torch
from conftest import REL_SCORE_MARGIN, REPO, build_tokenizer
from f64_reference import F64Reference, build_llama

from nqpq.experiments.downstream import EvalConfig, run_eval
from nqpq.experiments.lm_eval_tasks import make_lm
from nqpq.model.crystallize import crystallize
from nqpq.results.paired import BASELINE, NO_CHANGE

pytestmark = pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None,
                                reason="nqpq eval needs lm-evaluation-harness (pip install -e '.[eval]')")

TASKS = REPO / "tests" / "data" / "tasks"
LAYERS = (1, 2)
N_DOCS = 8
MAX_GEN = 12
STOPS = ["th", "Question:"]
# A greedy step compared across rounding needs its top-2 logits this far apart; full mode's logits are within a tenth
# of it of the model's (checked on every sequence generated).
LOGIT_MARGIN = 1e-4


@pytest.fixture(scope="module")
def tiny():
    tokenizer = build_tokenizer()
    return build_llama(len(tokenizer)), tokenizer


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    """nqpq_arith without its worked examples (short prompts), stopping at "th" too, MAX_GEN new tokens."""
    folder = tmp_path_factory.mktemp("tasks")
    text = (TASKS / "nqpq_arith.yaml").read_text()
    text = re.sub(r"description:.*?\n(?=doc_to_text)", "", text, flags=re.S)
    text = text.replace("task: nqpq_arith", "task: short_arith")
    text = text.replace("tests/data/tasks/nqpq_arith.jsonl", str(TASKS / "nqpq_arith.jsonl"))
    text = text.replace('until: ["Question:", "\\n\\n"]', f"until: {json.dumps(STOPS)}")
    text = text.replace("max_gen_toks: 24", f"max_gen_toks: {MAX_GEN}")
    assert "\ndescription:" not in text and '"th"' in text and f"max_gen_toks: {MAX_GEN}" in text
    (folder / "short_arith.yaml").write_text(text)
    return folder


@pytest.fixture(scope="module")
def run(tiny, task_dir):
    model, tokenizer = tiny
    cfg = EvalConfig(model="tiny-llama", tasks=("short_arith",), include_path=str(task_dir), limit=N_DOCS,
                     layers=LAYERS, modes=("full", "top1"), device="cpu", backend="torch", progress=False)
    return run_eval(cfg, model=model, tokenizer=tokenizer, log=lambda _: None)


def docs() -> list[dict]:
    with open(TASKS / "nqpq_arith.jsonl") as f:
        return [json.loads(line) for line in f][:N_DOCS]


def prompt_ids(lm, question: str) -> list[int]:
    """The context's ids as lm-eval encodes a batch of one (left-truncated to leave room for MAX_GEN tokens)."""
    ids, _ = lm.tok_batch_encode([f"Question: {question}\nAnswer:"], left_truncate_len=lm.max_length - MAX_GEN)
    return ids[0].tolist()


@torch.no_grad()
def greedy(model, ids: list[int], eos: int) -> tuple[list[int], float]:
    """A greedy loop that recomputes the whole sequence each step (no cache), stopping at EOS; and the smallest
    top-2 logit gap of its steps."""
    seq, gaps = list(ids), []
    for _ in range(MAX_GEN):
        logits = model(input_ids=torch.tensor([seq]), use_cache=False).logits[0, -1].double()
        top = logits.topk(2).values
        gaps.append(float(top[0] - top[1]))
        seq.append(int(logits.argmax()))
        if seq[-1] == eos:
            break
    return seq[len(ids):], min(gaps)


def as_lm_eval_cuts(tokenizer, tokens: list[int]) -> str:
    """lm-eval's text of a generation: decoded without special tokens, cut at each stop sequence (and EOS)."""
    text = tokenizer.decode(tokens, skip_special_tokens=True)
    for stop in [*STOPS, tokenizer.eos_token]:
        text = text.split(stop)[0]
    return text


def test_full_mode_generates_the_models_text(run, tiny):
    """Full mode: every document's generated text, filtered answers and exact matches are the model's. The model's
    greedy steps have clear margins (checked), so rounding cannot flip a token; and generation did stop mid-way on
    some documents (the stop sequence is exercised)."""
    model, tokenizer = tiny
    task = run["tasks"]["short_arith"]
    assert task["output_type"] == "generate_until" and task["n_items"] == N_DOCS
    assert list(task["metrics"]) == ["exact_match,strict-match", "exact_match,equation-result"]
    base, full = task["items"][BASELINE], task["items"]["full"]
    assert full["generations"] == base["generations"]
    assert full["answers"] == base["answers"] and full["values"] == base["values"]
    assert all(d["verdict"] == NO_CHANGE and d["delta"] == 0.0 for d in task["differences"]["full"].values())
    lm = make_lm(model, tokenizer, progress=False)
    stopped = 0
    for doc, text in zip(docs(), base["generations"]):
        tokens, gap = greedy(model, prompt_ids(lm, doc["question"]), tokenizer.eos_token_id)
        assert gap > LOGIT_MARGIN, "a near-tie in the model's greedy steps: choose other documents"
        seq = torch.tensor([prompt_ids(lm, doc["question"]) + tokens])
        with torch.no_grad():
            own = model(input_ids=seq, use_cache=False).logits
            with crystallize(model, LAYERS, mode="full", backend="torch"):
                through_op = model(input_ids=seq, use_cache=False).logits
        assert float((own - through_op).abs().max()) < LOGIT_MARGIN / 10
        assert text == as_lm_eval_cuts(tokenizer, tokens)
        stopped += len(tokenizer.decode(tokens, skip_special_tokens=True)) > len(text)
    assert stopped >= N_DOCS // 4, "the stop sequence should cut some generations"


def test_top1_generates_what_a_float64_crystallized_model_generates(run, tiny):
    """Top-1's texts equal a float64 greedy decode of the model with layers 1 and 2 crystallized top-1 (a plain
    loop, no cache), where every step's logits and every crystallized row's scores have clear maxima."""
    model, tokenizer = tiny
    ref = F64Reference(model)
    ref.crystal = {li: ("top1", None) for li in LAYERS}
    lm = make_lm(model, tokenizer, progress=False)
    task = run["tasks"]["short_arith"]
    compared = changed = 0
    for doc, got, base in zip(docs(), task["items"]["top1"]["generations"], task["items"][BASELINE]["generations"]):
        ref.crystal_gaps = []
        tokens, gap = greedy(ref.model, prompt_ids(lm, doc["question"]), tokenizer.eos_token_id)
        if gap <= LOGIT_MARGIN or min(ref.crystal_gaps) <= REL_SCORE_MARGIN:
            continue
        assert got == as_lm_eval_cuts(tokenizer, tokens)
        compared += 1
        changed += got != base
    assert compared >= 0.75 * N_DOCS, f"only {compared} of {N_DOCS} documents have clear maxima"
    assert changed >= 0.5 * compared, "top-1 should change what the model writes"


def test_exact_match_is_the_regex_answer_against_the_target(run):
    task = run["tasks"]["short_arith"]
    targets = [d["target"] for d in docs()]
    for config in (BASELINE, "full", "top1"):
        items = task["items"][config]
        for text, strict, equation, target, em_strict, em_equation in zip(
                items["generations"], items["answers"]["strict-match"], items["answers"]["equation-result"],
                targets, items["values"]["exact_match,strict-match"],
                items["values"]["exact_match,equation-result"]):
            found = re.findall(r"#### (-?[0-9]+)", text)
            assert strict == (found[0] if found else "[invalid]")
            found = re.findall(r"= (-?[0-9]+)", text)
            assert equation == (found[0] if found else "[invalid]")
            assert (em_strict, em_equation) == (float(strict == target), float(equation == target))
        for key, values in items["values"].items():
            assert task["scores"][config][key] == pytest.approx(np.mean(values), abs=1e-12)


@pytest.mark.parametrize("mode", ["full", "top1"])
def test_a_left_padded_batch_generates_what_each_document_generates_alone(run, tiny, task_dir, mode):
    """lm-eval at batch size 4 left-pads the prompts (they differ in length) and passes the mask; inside crystallize
    each document's text is the one it generates alone (the run, batch size 1)."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    model, tokenizer = tiny
    manager = TaskManager(include_path=str(task_dir), include_defaults=False)
    task = manager.load(["short_arith"])["tasks"]["short_arith"]
    lm = make_lm(model, tokenizer, progress=False, batch_size=4)
    lengths = {len(prompt_ids(lm, d["question"])) for d in docs()}
    assert len(lengths) > 1, "the prompts should differ in length (a batch pads them)"
    cwd = os.getcwd()
    with crystallize(model, LAYERS, mode=mode, backend="torch"):
        try:
            os.chdir(REPO)
            out = lm_eval.simple_evaluate(model=lm, tasks=[task], task_manager=manager, limit=N_DOCS,
                                          log_samples=True, bootstrap_iters=0)
        finally:
            os.chdir(cwd)
    samples = sorted((s for s in out["samples"]["short_arith"] if s["filter"] == "strict-match"),
                     key=lambda s: s["doc_id"])
    assert [s["resps"][0][0] for s in samples] == run["tasks"]["short_arith"]["items"][mode]["generations"]

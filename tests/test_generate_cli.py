"""``nqpq generate`` end to end on a saved tiny GPT-2 (tests/conftest.py's ``saved_model``), and its refusals."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from nqpq.cli import main
from nqpq.model.crystallize import crystallize


def generate_args(model_dir, text_file, *extra) -> list[str]:
    return ["generate", "--model", str(model_dir), "--text-file", str(text_file), "--n-blocks", "2", "--seq-len",
            "32", "--calib-blocks", "2", "--layers", "1", "2", "--max-new-tokens", "6", "--device", "cpu",
            "--backend", "torch", *extra]


def test_generate_end_to_end(saved_model, tmp_path, capsys):
    model_dir, text_file = saved_model
    out = tmp_path / "run"
    prompt_file = tmp_path / "p.txt"
    prompt_file.write_text("the river and the city", encoding="utf-8")
    code = main(generate_args(model_dir, text_file, "--prompt", "The history of", "--prompt-file", str(prompt_file),
                              "--mode", "full", "top1", "lowrank", "--d-r", "2", "8", "--out", str(out)))
    printed = capsys.readouterr().out
    assert code == 0, printed
    results = json.loads((out / "results.json").read_text())
    assert results["kind"] == "generate" and results["config"]["configurations"] == [
        "full", "top1", "lowrank d_r=2", "lowrank d_r=8"]
    assert [r["prompt"] for r in results["prompts"]] == ["The history of", "the river and the city"]
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    for rec in results["prompts"]:
        ids = torch.tensor([tok(rec["prompt"])["input_ids"]])
        with torch.no_grad():
            own = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6,
                                 do_sample=False, pad_token_id=tok.eos_token_id)[0, ids.shape[1]:].tolist()
            with crystallize(model, [1, 2], mode="top1"):
                top1 = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6,
                                      do_sample=False, pad_token_id=tok.eos_token_id)[0, ids.shape[1]:].tolist()
            # the mean log-probability the model gives the top1 continuation, teacher-forced
            seq = torch.tensor([ids[0].tolist() + top1])
            logp = torch.log_softmax(model(input_ids=seq).logits[0, ids.shape[1] - 1:-1].double(), -1)
        want_lp = float(logp.gather(-1, torch.tensor(top1)[:, None]).mean())
        assert rec["model"]["tokens"] == own
        full, got = rec["configurations"]["full"], rec["configurations"]["top1"]
        assert full["tokens"] == own and full["first_divergence"] is None and full["agreement"] == 1.0
        assert got["tokens"] == top1 and got["text"] == tok.decode(top1)
        assert got["mean_logprob"] == pytest.approx(want_lp, abs=1e-5)
        same = [a == b for a, b in zip(own, top1, strict=True)]
        assert got["agreement"] == pytest.approx(sum(same) / 6)
        first = None if all(same) else same.index(False)
        assert (got["first_divergence"] or {}).get("index") == first
    assert "prompt: 'The history of'" in printed and "lowrank d_r=8" in printed


def test_generate_sampling_is_seeded(saved_model, tmp_path, capsys):
    runs = []
    for seed in ("1", "1", "2"):
        out = tmp_path / f"s{len(runs)}"
        assert main(generate_args(*saved_model, "--prompt", "The history of", "--sample", "--temperature", "1.5",
                                  "--top-p", "0.95", "--seed", seed, "--max-new-tokens", "12", "--out", str(out))) == 0
        runs.append(json.loads((out / "results.json").read_text())["prompts"][0]["model"]["tokens"])
    capsys.readouterr()
    assert runs[0] == runs[1] and runs[0] != runs[2]


@pytest.mark.parametrize("extra, message", [
    (["--prompt", "   "], "--prompt: the prompt is empty"),
    ([], "give a prompt"),
    (["--prompt", "x", "--max-new-tokens", "0"], "--max-new-tokens 0: must be at least 1"),
    (["--prompt", "x", "--mode", "lowrank"], "--mode lowrank needs --d-r"),
    (["--prompt", "x", "--temperature", "0.7"], "are for --sample"),
    (["--prompt", "x", "--sample", "--top-p", "0"], "--top-p 0.0: must be in"),
    (["--prompt", "x", "--prompt-file", "/no/such/file"], "--prompt-file '/no/such/file': no such file"),
    (["--prompt", "x", "--mode", "top1", "--layers", "99"], "99"),
])
def test_generate_refusals(saved_model, tmp_path, capsys, extra, message):
    out = tmp_path / "never"
    args = [a for a in generate_args(*saved_model, "--out", str(out)) if True]
    if "--layers" in extra:  # replace the default layers
        i = args.index("--layers")
        del args[i:i + 3]
    code = main(args + extra)
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()


def test_generate_heads_by_index_and_by_rule(saved_model, tmp_path, capsys):
    """--heads by index continues as ``crystallize(model, {layer: heads})`` does (per-head crystallization is checked
    against float64 in tests/test_crystal_heads.py), named in results.json and the report; by rule it records the
    heads the rule chose and their measured values."""
    model_dir, text_file = saved_model
    out = tmp_path / "by-index"
    code = main(generate_args(model_dir, text_file, "--prompt", "The history of", "--heads", "1:0,1", "2:1",
                              "--mode", "top1", "--out", str(out)))
    printed = capsys.readouterr().out
    assert code == 0, printed
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["heads"] == "1:0,1 2:1"
    assert results["heads"]["by"] == "index" and results["heads"]["chosen"] == {"1": [0, 1], "2": [1]}
    assert " heads: 3 crystallized by index: 1:0,1 2:1 (the other heads: plain attention)" in printed
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    ids = torch.tensor([tok("The history of")["input_ids"]])
    with torch.no_grad(), crystallize(model, {1: [0, 1], 2: [1]}, mode="top1"):
        want = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6,
                              do_sample=False, pad_token_id=tok.eos_token_id)[0, ids.shape[1]:].tolist()
    assert results["prompts"][0]["configurations"]["top1"]["tokens"] == want

    out = tmp_path / "by-rule"
    code = main(generate_args(model_dir, text_file, "--prompt", "The history of", "--heads", "top1_prob>=0.0",
                              "--mode", "top1", "--out", str(out)))
    printed = capsys.readouterr().out
    assert code == 0, printed
    heads = json.loads((out / "results.json").read_text())["heads"]
    n_heads = model.config.n_head
    assert heads["by"] == "rule" and heads["chosen"] == {"1": list(range(n_heads)), "2": list(range(n_heads))}
    assert all(0.0 < v <= 1.0 for values in heads["values"].values() for v in values)
    assert " heads: " in printed and "top1_prob_mean per head" in printed


def test_generate_bad_heads_is_one_line(saved_model, tmp_path, capsys):
    model_dir, text_file = saved_model
    code = main(generate_args(model_dir, text_file, "--prompt", "x", "--heads", "5:0", "--out",
                              str(tmp_path / "run")))
    err = capsys.readouterr().err
    assert code == 2 and "--heads names layers [5] that are not among --layers [1, 2]" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "run").exists()


@pytest.mark.parametrize("heads, message", [
    (["1:4"], "--heads: the heads of layer 1 [4]: layer 1 has query heads 0..3"),
    (["1:0", "2:1,9"], "--heads: the heads of layer 2 [9]: layer 2 has query heads 0..3"),
])
def test_generate_head_indices_refused_from_the_config_before_loading(heads, message, saved_model, tmp_path, capsys,
                                                                      monkeypatch):
    """Head indices the model does not have: one line, exit 2, before a tokenizer or any weight is read (the sweep's
    check before loading, on the model's config alone), and --out left uncreated."""
    import transformers

    from nqpq.sources import checkpoints

    def refuse(what):
        def fail(*_args, **_kwargs):
            raise AssertionError(f"{what} was called before the refusal")
        return fail

    for name in ("load_model", "load_tokenizer"):
        monkeypatch.setattr(checkpoints, name, refuse(name))
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse("from_pretrained"))
    out = tmp_path / "never"
    code = main(generate_args(*saved_model, "--prompt", "x", "--heads", *heads, "--out", str(out)))
    err = capsys.readouterr().err
    assert (code, err.strip().splitlines()) == (2, [f"nqpq: error: {message}"]), err
    assert not out.exists()

"""The sweep's arithmetic: recovered %, the inconclusive verdict, ranks, the real dtype, the default batch size."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
from conftest import HEAD_DIM, build_model

from nqpq.data import NqpqError
from nqpq.report import write_results
from nqpq.scan import run_scan
from nqpq.sweep import (
    INCONCLUSIVE,
    NOT_FINITE,
    SweepConfig,
    _verdict,
    default_batch_size,
    free_memory,
    recovered_pct,
    run_sweep,
    sweep_ranks,
)

GIB = 1 << 30


def spec_formula(base, top1, c):
    return (top1 - c) / max(top1 - base, 1e-9) * 100


@pytest.mark.parametrize("base, top1, c", [(20.0, 25.0, 21.0), (20.0, 20.0 + 2.1e-5, 20.00001), (7.5, 9.0, 9.5),
                                          (100.0, 100.0 + 1.01e-4, 100.0)])
def test_recovered_is_the_spec_formula_where_top1_loses(base, top1, c):
    assert top1 - base > 1e-6 * base
    assert recovered_pct(base, top1, c) == spec_formula(base, top1, c)


@pytest.mark.parametrize("base, top1", [(20.0, 20.0), (20.0, 20.0 + 1.9e-5), (100.0, 100.0 + 0.99e-4), (20.0, 19.0)])
def test_recovered_is_null_where_top1_loses_nothing(base, top1):
    """At or below 1e-6 of the baseline (or a top-1 better than the baseline) there is no loss to recover."""
    assert recovered_pct(base, top1, base) is None


def test_ranks_deduplicated_sorted_and_default_up_to_head_dim():
    assert sweep_ranks(SweepConfig(d_r=(4, 4, 2)), 64) == [2, 4]
    assert sweep_ranks(SweepConfig(d_r=None), 64) == [1, 2, 4, 8, 16, 32]
    assert sweep_ranks(SweepConfig(d_r=None), 16) == [1, 2, 4, 8, 16]
    assert sweep_ranks(SweepConfig(d_r=None), 80) == [1, 2, 4, 8, 16, 32]


LAYERS = (2, 3)


def silent_layers_model(tokenizer):
    """The tiny GPT-2 with the output projection of the crystallized layers zeroed: whatever those layers'
    attention computes (full, top-1, low-rank) is multiplied by 0, so every configuration scores exactly the
    baseline, while the residuals ε (taken before the projection) are non-zero and calibrate as usual."""
    model = build_model(vocab_size=len(tokenizer))
    with torch.no_grad():
        for layer in LAYERS:
            model.transformer.h[layer].attn.c_proj.weight.zero_()
    return model


def test_top1_that_loses_nothing_is_inconclusive(tokenizer, token_ids, tmp_path, capsys):
    model = silent_layers_model(tokenizer)
    cfg = SweepConfig(layers=LAYERS, d_r=(1, HEAD_DIM), n_blocks=4, seq_len=32, calib_blocks=2, device="cpu",
                      batch_size=2, progress=False)
    results = run_sweep(cfg, model=model, ids=token_ids)
    assert results["ppl_top1"] == results["ppl_baseline"] == results["ppl_full"]
    assert [c["recovered_pct"] for c in results["curve"]] == [None, None]
    assert results["verdict"]["compressible"] is None and results["verdict"]["d_r_min"] is None
    assert results["verdict"]["explanation"] == INCONCLUSIVE == "top-1 loses nothing here; the test is inconclusive"
    report = capsys.readouterr().out
    assert report.count("recovered=  n/a") == 2 and "INCONCLUSIVE" in report and INCONCLUSIVE in report
    assert "YES" not in report and "PARTIAL" not in report

    write_results(str(tmp_path), results)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert [c["recovered_pct"] for c in saved["curve"]] == [None, None]
    assert saved["verdict"]["compressible"] is None and saved["verdict"]["explanation"] == INCONCLUSIVE
    assert (tmp_path / "delta_ppl_vs_dr.png").read_bytes().startswith(b"\x89PNG")


@pytest.mark.parametrize("run", [run_sweep, run_scan])
def test_non_finite_baseline_is_an_error(run, tokenizer, token_ids):
    """A model whose own forward gives NaN losses has no baseline: a clear error, not a verdict drawn from NaNs
    (it was "PARTIAL, best d_r=1 recovering nan%", written with exit 0)."""
    model = build_model(vocab_size=len(tokenizer))
    with torch.no_grad():
        model.lm_head.weight[5, 0] = float("nan")
    cfg = SweepConfig(layers=LAYERS, d_r=(1,), n_blocks=4, seq_len=32, calib_blocks=2, device="cpu", batch_size=2,
                      progress=False)
    with pytest.raises(NqpqError, match=r"the baseline perplexity is nan: the model's own forward gives non-finite"):
        run(cfg, model=model, ids=token_ids, log=lambda *_: None)


def test_non_finite_crystallized_perplexity_is_inconclusive():
    """A NaN or infinite crystallized perplexity (an overflow) recovers nothing measurable: no YES/PARTIAL."""

    def curve(top1, ppls):
        return [{"d_r": d_r, "ppl": p, "recovered_pct": recovered_pct(20.0, top1, p)} for d_r, p in zip((1, 2), ppls)]

    assert _verdict(curve(25.0, (21.0, 20.5)), 20.0, 25.0)["d_r_min"] == 2  # 80 %, then 90 %
    for top1, ppls in ((math.nan, (21.0, 20.5)), (25.0, (21.0, math.inf)), (25.0, (math.nan, 20.5))):
        assert _verdict(curve(top1, ppls), 20.0, top1) == {
            "compressible": None, "d_r_min": None, "best_d_r": None, "best_recovered_pct": None,
            "explanation": NOT_FINITE}


def test_results_record_the_models_real_dtype(tokenizer, token_ids):
    model = build_model(vocab_size=len(tokenizer)).to(torch.bfloat16)
    cfg = SweepConfig(layers=(3,), d_r=(1,), n_blocks=2, seq_len=16, calib_blocks=1, device="cpu", dtype="float32",
                      batch_size=2, progress=False)
    config = run_sweep(cfg, model=model, ids=token_ids, log=lambda *_: None)["config"]
    assert config["dtype"] == "bfloat16"
    assert (config["family"], config["n_heads"], config["n_kv_heads"], config["head_dim"]) == ("gpt2", 4, 4, HEAD_DIM)
    assert config["sliding_window"] == {"3": None} and config["attn_softcap"] is None


# --- default batch size ----------------------------------------------------------------------------------------

def head(vocab, hidden):
    return SimpleNamespace(weight=torch.empty(vocab, hidden, device="meta"))


LLAMA_8B = SimpleNamespace(n_heads=32, n_kv_heads=8, head_dim=128, lm_head=head(128256, 4096))
GPT2_SMALL = SimpleNamespace(n_heads=12, n_kv_heads=12, head_dim=64, lm_head=head(50257, 768))


def test_batch_size_counts_the_reference_t2_buffers_on_cpu():
    """Llama-3-8B geometry at T=2048: the reference's two fp32 [32, T, T] buffers alone are 1 GiB per block."""
    cpu = torch.device("cpu")
    per_block_floor = 2 * 32 * 2048 * 2048 * 4
    batch = default_batch_size(cpu, LLAMA_8B, 2048, 100, torch.bfloat16, hidden=4096, free=24 * GIB)
    assert 1 <= batch <= 24 * GIB // 4 // per_block_floor  # a quarter of free memory, at most
    assert batch < 8  # the old fixed CPU batch would need more than 8 GiB here
    assert default_batch_size(cpu, LLAMA_8B, 2048, 100, torch.bfloat16, hidden=4096, free=GIB) == 1


def test_batch_size_grows_with_memory_and_shrinks_with_dtype_width():
    cpu = torch.device("cpu")

    def batch(free, dtype):
        return default_batch_size(cpu, GPT2_SMALL, 1024, 100, dtype, hidden=768, free=free)

    assert batch(2 * GIB, torch.float32) < batch(8 * GIB, torch.float32) < batch(32 * GIB, torch.float32)
    assert batch(8 * GIB, torch.bfloat16) > batch(8 * GIB, torch.float32)
    assert default_batch_size(cpu, GPT2_SMALL, 64, 3, torch.float32, hidden=768, free=64 * GIB) == 3


def test_batch_size_respects_the_cuda_grid_limit():
    """batch · Hq must stay within CUDA's 65535 grid rows, however much memory there is."""
    cuda = torch.device("cuda")  # only the arithmetic runs: the free memory is given
    batch = default_batch_size(cuda, GPT2_SMALL, 64, 1_000_000, torch.float16, hidden=768, free=10_000 * GIB)
    assert batch * 12 <= 65535 and batch == 65535 // 12


def test_batch_size_sets_the_prefix_record_aside():
    """The recorded hidden states of every block ([n_blocks, T, hidden]) are kept all sweep: more blocks, fewer
    per batch."""
    cpu = torch.device("cpu")

    def batch(n_blocks):
        return default_batch_size(cpu, LLAMA_8B, 1024, n_blocks, torch.bfloat16, hidden=4096, free=64 * GIB)

    assert batch(4000) < batch(200)
    several = default_batch_size(cpu, LLAMA_8B, 1024, 200, torch.bfloat16, hidden=4096, free=64 * GIB, n_records=16)
    assert several < batch(200)  # the scan records the input of every scanned layer


def test_batch_size_sets_the_fp32_lm_head_aside_for_16_bit_models():
    """lm_losses forms logits with an fp32 copy of the LM head (2 GiB at Llama-3-8B's head): 16-bit models only."""
    cpu = torch.device("cpu")
    small_head = SimpleNamespace(**{**vars(LLAMA_8B), "lm_head": head(1000, 4096)})

    def batch(parts, dtype):
        return default_batch_size(cpu, parts, 256, 1000, dtype, hidden=4096, free=16 * GIB)

    assert batch(LLAMA_8B, torch.bfloat16) < batch(small_head, torch.bfloat16)
    assert batch(LLAMA_8B, torch.float32) == batch(small_head, torch.float32)  # fp32: the head is used as it is


def test_cpu_free_memory_is_the_available_ram():
    meminfo = dict(line.split(":", 1) for line in open("/proc/meminfo"))
    available = int(meminfo["MemAvailable"].split()[0]) * 1024
    assert abs(free_memory(torch.device("cpu")) - available) < 0.1 * available


# --- other families through `nqpq sweep` (tiny random configs, saved like a hub checkpoint) --------------------

def save_family(root, name, model, tokenizer):
    model_dir = root / name
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    return model_dir


def tiny_llama(vocab_size):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                                        max_position_embeddings=128)).eval()


def tiny_gemma2(vocab_size):
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    return Gemma2ForCausalLM(Gemma2Config(
        vocab_size=vocab_size, hidden_size=48, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=128, sliding_window=16,
        attn_logit_softcapping=50.0, final_logit_softcapping=30.0, query_pre_attn_scalar=16)).eval()


def hf_perplexity(model, ids, seq_len, n_blocks):
    """The spec's perplexity from the model's own logits, in float64: exp(mean over blocks of the block mean)."""
    blocks = ids[: seq_len * n_blocks].view(n_blocks, seq_len)
    with torch.no_grad():
        logits = model(input_ids=blocks, use_cache=False).logits.double()
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), blocks[:, 1:].reshape(-1),
                                            reduction="none")
    return nll.view(n_blocks, seq_len - 1).mean(dim=1).mean().exp().item()


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_sweep_of_another_family(family, tokenizer, saved_model, tmp_path, capsys):
    """A saved Llama (GQA) or Gemma 2 (windows, softcaps, head_dim != hidden/heads) runs with the checkpoint's
    weights, the default layers (the last quarter) and ranks (up to head_dim), and names its geometry."""
    from transformers import AutoModelForCausalLM

    from nqpq.cli import main

    build = tiny_llama if family == "llama" else tiny_gemma2
    model_dir = save_family(tmp_path, family, build(len(tokenizer)), tokenizer)
    text_file = saved_model[1]
    out = tmp_path / "out"
    code = main(["sweep", "--model", str(model_dir), "--text-file", str(text_file), "--n-blocks", "4", "--seq-len",
                 "32", "--calib-blocks", "2", "--device", "cpu", "--batch-size", "2", "--no-progress", "--out",
                 str(out)])
    report = capsys.readouterr().out
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    config = results["config"]
    head_dim = 8 if family == "llama" else 16
    assert (config["family"], config["n_heads"], config["n_kv_heads"], config["head_dim"]) == (family, 4, 2, head_dim)
    assert config["layers"] == [3] and config["d_r"] == [d for d in (1, 2, 4, 8, 16, 32) if d <= head_dim]
    assert f"model: {family}, 4 layers, Hq=4, Hkv=2, D={head_dim}" in report
    if family == "gemma2":  # layer 3 is a full-attention layer; the softcaps are in force
        assert config["sliding_window"] == {"3": None}
        assert config["attn_softcap"] == 50.0 and config["final_logit_softcap"] == 30.0
        assert "attention softcap 50.0, logit softcap 30.0" in report
    # The checkpoint's own weights: the baseline is the loaded model's perplexity, computed the plain way.
    ids = torch.tensor(tokenizer.encode("\n\n".join(t for t in text_file.read_text().splitlines(keepends=True)
                                                     if t.strip())))
    reloaded = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    assert abs(results["ppl_baseline"] - hf_perplexity(reloaded, ids, 32, 4)) <= 1e-5 * results["ppl_baseline"]


def test_rank_above_head_dim_refused(tokenizer, saved_model, tmp_path, capsys):
    from nqpq.cli import main

    model_dir = save_family(tmp_path, "llama", tiny_llama(len(tokenizer)), tokenizer)
    code = main(["sweep", "--model", str(model_dir), "--text-file", str(saved_model[1]), "--n-blocks", "2",
                 "--seq-len", "16", "--calib-blocks", "1", "--device", "cpu", "--d-r", "2", "9", "--no-progress"])
    assert code == 2 and "--d-r [9]: each d_r must be in 0..8 (the head dimension)" in capsys.readouterr().err


def test_only_rank_0_touches_out_before_the_process_group(saved_model, tmp_path, monkeypatch, capsys):
    """Under torchrun RANK is set before the process group exists: other ranks must not create or probe --out."""
    from nqpq.cli import main

    model_dir, text_file = saved_model
    monkeypatch.setenv("RANK", "1")
    out = tmp_path / "out"
    code = main(["sweep", "--model", str(model_dir), "--text-file", str(text_file), "--layers", "99", "--device",
                 "cpu", "--no-progress", "--out", str(out)])
    assert code == 2 and "--layers [99]" in capsys.readouterr().err
    assert not out.exists()


def test_model_without_attention_interface_refused(tokenizer, saved_model, tmp_path, capsys):
    """A decoder-only causal LM that loads cleanly but has no attention to crystallize (Mamba): exit 2, one line."""
    from transformers import MambaConfig, MambaForCausalLM

    from nqpq.cli import main

    torch.manual_seed(0)
    model = MambaForCausalLM(MambaConfig(vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=2, state_size=4))
    model_dir = save_family(tmp_path, "mamba", model, tokenizer)
    out = tmp_path / "out"
    code = main(["sweep", "--model", str(model_dir), "--text-file", str(saved_model[1]), "--n-blocks", "2",
                 "--seq-len", "16", "--calib-blocks", "1", "--device", "cpu", "--no-progress", "--out", str(out)])
    err = [line for line in capsys.readouterr().err.splitlines() if "nqpq" in line or "Traceback" in line]
    assert code == 2 and len(err) == 1 and "AttentionInterface" in err[0] and "MambaForCausalLM" in err[0]
    assert not out.exists()

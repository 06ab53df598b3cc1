"""The sweep's arithmetic: recovered %, the inconclusive verdict, ranks, the real dtype, the default batch size."""

from __future__ import annotations

import json
import math
import statistics
from types import SimpleNamespace

import pytest
import torch
from conftest import HEAD_DIM, REL_SCORE_MARGIN, build_model

from nqpq.errors import NqpqError
from nqpq.experiments.batching import batch_bytes_per_block, default_batch_size, free_memory
from nqpq.experiments.config import SweepConfig, sweep_ranks
from nqpq.experiments.scan import run_scan
from nqpq.experiments.sweep import run_sweep
from nqpq.results.results_file import write_results
from nqpq.results.verdict import INCONCLUSIVE, NOT_FINITE, NOT_FINITE_TEXT, recovered_pct
from nqpq.results.verdict import verdict as _verdict

GIB = 1 << 30


def spec_formula(base, top1, c):
    return (top1 - c) / max(top1 - base, 1e-9) * 100


@pytest.mark.parametrize("base, top1, c, ci", [(20.0, 25.0, 21.0, [4.0, 6.0]),
                                              (20.0, 20.0 + 2.1e-5, 20.00001, [2.01e-5, 2.2e-5]),
                                              (7.5, 9.0, 9.5, [0.2, 2.5]),
                                              (100.0, 100.0 + 1.01e-4, 100.0, [1.001e-4, 1e-3])])
def test_recovered_is_the_spec_formula_where_top1_loses_measurably(base, top1, c, ci):
    """Top-1's ΔPPL and its whole interval above 1e-6 of the baseline: the spec's formula."""
    assert top1 - base > 1e-6 * base and ci[0] > 1e-6 * base
    assert recovered_pct(base, top1, c, ci) == spec_formula(base, top1, c)


@pytest.mark.parametrize("base, top1, ci", [
    (20.0, 20.0, [0.0, 0.0]), (20.0, 20.0 + 1.9e-5, [1e-5, 3e-5]), (100.0, 100.0 + 0.99e-4, [0.5e-4, 1.5e-4]),
    (20.0, 19.0, [-1.5, -0.5]),
    (20.190 - 0.070, 20.190, [-0.286, 0.336]),  # issue 32's SmolLM2 layer 27: the interval holds 0
    (20.0, 25.0, [-0.1, 9.0]),  # a large loss whose interval still reaches 0
    (20.0, 25.0, [1.5e-5, 9.0]),  # above 0 but not above the minimum effect (1e-6 x 20)
    (20.0, 25.0, None),  # no interval (fewer than 8 blocks)
])
def test_recovered_is_null_where_top1_loses_nothing_measurable(base, top1, ci):
    """Top-1's interval reaching 1e-6 of the baseline or below (or no interval): no loss to recover, whatever the
    point estimate."""
    assert recovered_pct(base, top1, base, ci) is None


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
    cfg = SweepConfig(layers=LAYERS, d_r=(1, HEAD_DIM), n_blocks=8, seq_len=32, calib_blocks=2, device="cpu",
                      batch_size=2, progress=False)
    results = run_sweep(cfg, model=model, ids=token_ids)
    assert results["ppl_top1"] == results["ppl_baseline"] == results["ppl_full"]
    assert results["top1_delta_ppl_ci95"] == [0.0, 0.0]  # every resample: the same PPL twice
    assert [c["recovered_pct"] for c in results["curve"]] == [None, None]
    verdict = results["verdict"]
    assert (verdict["outcome"], verdict["reason"]) == (INCONCLUSIVE, "no_measurable_loss") == ("INCONCLUSIVE",
                                                                                               "no_measurable_loss")
    assert verdict["compressible"] is None and verdict["d_r_min"] is None and verdict["settled"] is False
    message = "top-1 loses nothing measurable at this setting: ΔPPL CI [+0.000, +0.000]"
    assert verdict["explanation"] == message
    report = capsys.readouterr().out
    assert report.count("recovered=  n/a") == 2 and f"=> INCONCLUSIVE: {message}." in report
    assert "YES" not in report and "PARTIAL" not in report and "settled" not in report

    write_results(str(tmp_path), results)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert [c["recovered_pct"] for c in saved["curve"]] == [None, None]
    assert saved["verdict"]["outcome"] == INCONCLUSIVE and saved["verdict"]["compressible"] is None
    assert saved["verdict"]["explanation"] == message
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

    ci = [4.0, 6.0]

    def curve(top1, ppls):
        return [{"d_r": d_r, "ppl": p, "recovered_pct": recovered_pct(20.0, top1, p, ci)}
                for d_r, p in zip((1, 2), ppls)]

    assert _verdict(curve(25.0, (21.0, 20.5)), 20.0, 25.0, top1_ci=ci, n_blocks=30)["d_r_min"] == 2  # 80 %, 90 %
    for top1, ppls in ((math.nan, (21.0, 20.5)), (25.0, (21.0, math.inf)), (25.0, (math.nan, 20.5))):
        assert _verdict(curve(top1, ppls), 20.0, top1, top1_ci=ci, n_blocks=30) == {
            "outcome": "INCONCLUSIVE", "compressible": None, "d_r_min": None, "best_d_r": None,
            "best_recovered_pct": None, "recovered_pct": None, "ci95": None, "settled": False, "draws_agree": None,
            "n_blocks": 30, "draws_d_r_min": None, "top1_delta_ppl_ci95": ci, "reason": NOT_FINITE,
            "explanation": NOT_FINITE_TEXT}


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


def sized(n_heads: int, n_kv_heads: int, head_dim: int, lm_head) -> SimpleNamespace:
    """What the batch sizing reads of ModelParts: the largest geometry over the attention layers, the LM head."""
    widest = {"n_heads": n_heads, "n_kv_heads": n_kv_heads, "qk_dim": head_dim, "v_dim": head_dim}
    return SimpleNamespace(largest=lambda field, layers=None: widest[field], lm_head=lm_head)


LLAMA_8B = sized(32, 8, 128, head(128256, 4096))
GPT2_SMALL = sized(12, 12, 64, head(50257, 768))


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


def test_batch_size_on_cuda_is_memory_alone():
    """The kernel takes any batch · Hq (it launches the (block, head) pairs in chunks of CUDA's 65535 grid rows:
    tests/test_kernel.py, chunked launches equal one) and sums the Gram into one [Hq, D, D] on the device: on CUDA,
    as on the CPU, memory alone bounds the batch, past the 65535 // Hq blocks a grid cap would allow."""
    cuda, cpu = torch.device("cuda"), torch.device("cpu")  # only the arithmetic runs: the free memory is given
    args, kwargs = (GPT2_SMALL, 64, 1_000_000, torch.float16), {"hidden": 768, "free": 10_000 * GIB}
    batch = default_batch_size(cuda, *args, **kwargs)
    assert batch == default_batch_size(cpu, *args, **kwargs)
    assert batch * 12 > 65535


def test_batch_bytes_per_block_charges_no_gram():
    """A block's bytes, term by term (GPT-2 small, T = 1024, fp32): activations, the model's eager scores and
    probabilities, the reference op's two [Hq, T, T] buffers and ε, the op's statistics; no Gram, which the op
    keeps as one [Hq, D, D] per call whatever the batch."""
    T, H, D, hidden, elem = 1024, 12, 64, 768, 4
    want = (16 * T * hidden * elem + 2 * H * T * T * elem + 2 * H * T * T * 4 + 2 * H * T * D * 4
            + H * T * (8 + 4 + 4))
    assert batch_bytes_per_block(GPT2_SMALL, hidden, T, torch.float32) == want


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
    """lm_losses forms logits with an fp32 copy of the LM head (2 GiB at Llama-3-8B's head): 16-bit models, and
    fp32 models whose vocabulary it pads."""
    cpu = torch.device("cpu")
    small_head = SimpleNamespace(**{**vars(LLAMA_8B), "lm_head": head(1000, 4096)})

    def batch(parts, dtype):
        return default_batch_size(cpu, parts, 256, 1000, dtype, hidden=4096, free=16 * GIB)

    assert batch(LLAMA_8B, torch.bfloat16) < batch(small_head, torch.bfloat16)
    assert batch(LLAMA_8B, torch.float32) == batch(small_head, torch.float32)  # fp32: the head is used as it is
    # ... unless its vocabulary is not a multiple of 8: lm_losses then keeps a padded fp32 copy (nqpq.model.losses)
    odd_head = SimpleNamespace(**{**vars(LLAMA_8B), "lm_head": head(128257, 4096)})
    few = {"hidden": 4096, "free": 16 * GIB}  # 100 blocks: the record leaves room for the head to matter
    assert (default_batch_size(cpu, odd_head, 256, 100, torch.float32, **few)
            < default_batch_size(cpu, LLAMA_8B, 256, 100, torch.float32, **few))


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
    err = capsys.readouterr().err
    assert code == 2 and "--d-r [9]: each d_r must be in 1..8 (the head dimension; rank 0 is top-1)" in err


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


# --- calibration apart from evaluation, draws, intervals (issue 18) ----------------------------------------------

CAL_LAYERS, CAL_T, CAL_N, CAL_C = (2, 3), 16, 4, 2


def cal_config(**kw) -> SweepConfig:
    base = dict(layers=CAL_LAYERS, d_r=(1, 4, HEAD_DIM), n_blocks=CAL_N, seq_len=CAL_T, calib_blocks=CAL_C,
                device="cpu", batch_size=3, backend="torch", progress=False)
    return SweepConfig(**{**base, **kw})


def test_heldout_basis_is_the_float64_basis_of_the_blocks_after_the_scored_ones(tokenizer, token_ids):
    from f64_reference import F64Reference

    model = build_model(vocab_size=len(tokenizer))
    results = run_sweep(cal_config(), model=model, ids=token_ids, log=lambda *_: None)
    assert results["config"]["calibration"] == {
        "source": "heldout", "text": "ids given by the caller", "blocks_per_draw": CAL_C, "draws": 1,
        "first_blocks": [CAL_N], "scored_blocks_seen": 0}
    # Σ εεᵀ in float64 over exactly the held-out blocks (the reference scores one more block after its calibration).
    heldout_and_one = token_ids[CAL_N * CAL_T:(CAL_N + CAL_C + 1) * CAL_T].view(CAL_C + 1, CAL_T)
    ref = F64Reference(model)
    ref.baseline(heldout_and_one, CAL_C, CAL_LAYERS)
    assert min(ref.gaps) > REL_SCORE_MARGIN, "near-tie in the held-out blocks"
    scored = F64Reference(model)
    scored.baseline(token_ids[: CAL_N * CAL_T].view(CAL_N, CAL_T), CAL_C, CAL_LAYERS)
    for s in results["spectrum"]:
        want = ref.cv[s["layer"]][s["head"]]
        assert ((want - 0.9).abs() > 1e-4).all(), "a cumulative variance at ~0.9: r90 would hinge on rounding"
        torch.testing.assert_close(torch.tensor(s["cumulative_variance"], dtype=torch.float64), want, rtol=0,
                                   atol=1e-6)
        assert s["r90"] == int(ref.r90[s["layer"]][s["head"]])
    # ... and not the basis of the first scored blocks (the spec's choice): the two spectra differ.
    assert max((ref.cv[li] - scored.cv[li]).abs().max().item() for li in CAL_LAYERS) > 1e-3
    for li in CAL_LAYERS:
        for h in range(ref.basis[li].shape[0]):
            got, want = results["basis"].basis[li][h].double(), ref.basis[li][h]
            share = torch.diff(ref.cv[li][h], prepend=ref.cv[li][h].new_zeros(1))  # eigenvalue / total, descending
            for r in (1, 4):
                if (share[r - 1] - share[r]) / share[r - 1] > 1e-2:  # the top-r subspace is well defined
                    torch.testing.assert_close(got[:, :r] @ got[:, :r].T, want[:, :r] @ want[:, :r].T, rtol=0,
                                               atol=1e-4, msg=f"layer {li} head {h} r={r}")


def test_calibration_draws_are_the_disjoint_held_out_sets(tokenizer, token_ids):
    """Draw k's basis is calibrate() on blocks n + k·c .. n + (k+1)·c − 1; its low-rank PPLs are the plain ones."""
    from conftest import assert_clear_argmax, score_margins

    from nqpq import calibrate, crystallize, make_blocks, perplexity

    model = build_model(vocab_size=len(tokenizer))
    n = 16  # enough blocks for top-1's loss to be measurable on this model, so each draw has a recovered %
    results = run_sweep(cal_config(calib_draws=2, d_r=(1, 4), n_blocks=n), model=model, ids=token_ids,
                        log=lambda *_: None)
    assert results["verdict"]["outcome"] in ("YES", "PARTIAL")
    assert [d["first_block"] for d in results["draws"]] == [n, n + CAL_C]
    assert results["config"]["calibration"]["first_blocks"] == [n, n + CAL_C]
    gaps = []
    for draw in results["draws"]:
        blocks = make_blocks(token_ids, CAL_T, CAL_C, first_block=draw["first_block"])
        with score_margins(model, CAL_LAYERS) as call_gaps:
            basis = calibrate(model, blocks, CAL_LAYERS, backend="torch")
            for entry in draw["curve"]:
                with crystallize(model, CAL_LAYERS, mode="lowrank", basis=basis.basis, d_r=entry["d_r"],
                                 backend="torch"):
                    want = perplexity(model, token_ids, CAL_T, n)
                assert abs(entry["ppl"] - want) <= 1e-6 * want, (draw["draw"], entry["d_r"])
        gaps.extend(call_gaps)
    assert_clear_argmax(gaps)
    for j, entry in enumerate(results["curve"]):
        per_draw = [d["curve"][j]["recovered_pct"] for d in results["draws"]]
        assert entry["recovered_pct_draws"] == per_draw and entry["recovered_pct"] == per_draw[0]
        assert entry["recovered_pct_spread"] == pytest.approx(max(per_draw) - min(per_draw))
    assert results["verdict"]["draws_d_r_min"] == [d["d_r_min"] for d in results["draws"]]


def test_spec_choice_intervals_hold_their_estimates_and_come_from_the_block_losses(tokenizer, token_ids):
    from nqpq.results.stats import delta_ppl_ci, recovered_pct_ci, resample_indices

    model = build_model(vocab_size=len(tokenizer))
    lines: list[str] = []
    # 16 blocks: top-1's loss is measurable on this model (at 8 its interval holds 0, and recovered % is n/a).
    results = run_sweep(cal_config(calib_from="eval", n_blocks=16), model=model, ids=token_ids, log=lines.append)
    assert results["config"]["calibration"]["scored_blocks_seen"] == CAL_C
    assert any(f"the basis saw {CAL_C} of the 16 scored blocks, so recovered % may be optimistic" in ln
               for ln in lines)
    losses = results["block_losses"]
    assert math.isclose(math.exp(statistics.fmean(losses["baseline"])), results["ppl_baseline"], rel_tol=1e-12)
    indices = resample_indices(16, results["config"]["seed"])
    lo, hi = results["top1_delta_ppl_ci95"]
    assert lo <= results["ppl_top1"] - results["ppl_baseline"] <= hi
    assert [lo, hi] == delta_ppl_ci(losses["baseline"], losses["top1"], indices)
    checked = 0
    for c in results["curve"]:
        assert math.isclose(math.exp(statistics.fmean(c["block_losses"])), c["ppl"], rel_tol=1e-12)
        assert c["delta_ppl_ci95"][0] <= c["delta_ppl"] <= c["delta_ppl_ci95"][1]
        assert c["delta_ppl_ci95"] == delta_ppl_ci(losses["baseline"], c["block_losses"], indices)
        if c["recovered_pct"] is not None:
            assert c["recovered_pct_ci95"][0] <= c["recovered_pct"] <= c["recovered_pct_ci95"][1]
            assert c["recovered_pct_ci95"] == recovered_pct_ci(losses["baseline"], losses["top1"], c["block_losses"],
                                                               indices)
            checked += 1
    assert checked


def test_intervals_shrink_as_the_scored_blocks_grow(tokenizer, token_ids):
    model = build_model(vocab_size=len(tokenizer))

    def widths(n):
        r = run_sweep(cal_config(n_blocks=n, d_r=(1, 4), batch_size=16), model=model, ids=token_ids,
                      log=lambda *_: None)
        cis = [r["top1_delta_ppl_ci95"], *(c["delta_ppl_ci95"] for c in r["curve"])]
        return [hi - lo for lo, hi in cis]

    # The width's own estimate is noisy at a handful of blocks: compare 16 with 128 (8x: about 1/sqrt(8) the width).
    for few, many in zip(widths(16), widths(128)):
        assert many < 0.7 * few, (few, many)


def test_one_scored_block_has_no_interval(tokenizer, token_ids):
    model = build_model(vocab_size=len(tokenizer))
    lines: list[str] = []
    results = run_sweep(cal_config(n_blocks=1), model=model, ids=token_ids, log=lines.append)
    assert results["top1_delta_ppl_ci95"] is None
    assert all(c["delta_ppl_ci95"] is None and c["recovered_pct_ci95"] is None for c in results["curve"])
    assert results["verdict"]["ci95"] is None and results["verdict"]["settled"] is False
    assert (results["verdict"]["outcome"], results["verdict"]["reason"]) == ("INCONCLUSIVE", "too_few_blocks")
    assert any("no confidence intervals: 1 scored block" in ln for ln in lines)
    assert any("calibration variability not measured" in ln for ln in lines)


def entry(d_r, recovered, ci):
    return {"d_r": d_r, "ppl": 21.0, "recovered_pct": recovered, "recovered_pct_ci95": ci}


@pytest.mark.parametrize("curve, draws, want", [
    ([entry(1, 50.0, [40.0, 60.0]), entry(8, 93.0, [91.0, 95.0])], None, (True, 8, True)),
    ([entry(1, 50.0, [40.0, 60.0]), entry(8, 93.0, [84.0, 97.0])], None, (True, 8, False)),
    ([entry(1, 50.0, [40.0, 60.0]), entry(8, 93.0, [91.0, 95.0])], [8, 16], (True, 8, False)),
    ([entry(1, 50.0, [40.0, 60.0]), entry(8, 93.0, [91.0, 95.0])], [8, 8], (True, 8, True)),
    ([entry(1, 50.0, [40.0, 60.0]), entry(8, 80.0, [70.0, 89.0])], None, (False, None, True)),
    ([entry(1, 50.0, [40.0, 60.0]), entry(8, 80.0, [70.0, 92.0])], None, (False, None, False)),
    ([entry(1, 50.0, None), entry(8, 80.0, None)], None, (False, None, False)),
])
def test_verdict_carries_its_interval_and_whether_it_is_settled(curve, draws, want):
    verdict = _verdict(curve, 20.0, 25.0, top1_ci=[4.0, 6.0], n_blocks=30, draws_d_r_min=draws)
    assert (verdict["compressible"], verdict["d_r_min"], verdict["settled"]) == want
    assert verdict["outcome"] == ("YES" if want[0] else "PARTIAL") and verdict["reason"] is None
    chosen = curve[1]
    assert verdict["recovered_pct"] == chosen["recovered_pct"] and verdict["ci95"] == chosen["recovered_pct_ci95"]
    assert verdict["draws_agree"] == (None if draws is None else len(set(draws)) == 1)


def test_verdict_lines_say_how_sure_they_are():
    from nqpq.results.report_lines import verdict_lines

    def lines(curve, draws=None):
        return "\n".join(verdict_lines(_verdict(curve, 20.0, 25.0, top1_ci=[4.0, 6.0], n_blocks=30,
                                                draws_d_r_min=draws), curve, 64))

    assert "YES: d_r=8/64 recovers 93% (95% CI 91–95)" in lines([entry(8, 93.0, [91.0, 95.0])])
    assert ("YES at d_r=8/64 (93% of the Top-1 loss), but the 95% CI (84–97) reaches below 90%: not settled at 30 "
            "blocks") in lines([entry(8, 93.0, [84.0, 97.0])])
    assert "calibration draws disagree (d_r_min per draw: 8, none)" in lines([entry(8, 93.0, [91.0, 95.0])], [8, None])
    assert "settled at 30 blocks" in lines([entry(8, 80.0, [70.0, 89.0])])
    assert "the 95% CI of d_r=8 reaches 90%: not settled" in lines([entry(8, 80.0, [70.0, 92.0])])


@pytest.mark.parametrize("kw, message", [
    (dict(calib_from="test"), r"--calib-from 'test': must be one of heldout, eval"),
    (dict(calib_from="eval", calib_draws=2), r"--calib-draws 2: the spec's choice"),
    (dict(calib_from="eval", calib_blocks=5), r"--calib-blocks 5: must be in 1..--n-blocks \(4\) with --calib-from"),
    (dict(calib_draws=0), r"--calib-draws 0: must be at least 1"),
    (dict(calib_blocks=300), r"held-out calibration \(--calib-from heldout\) needs 304 blocks of 16 text tokens "
                             r"\(4864 tokens\): --n-blocks 4 scored, then --calib-blocks 300 x --calib-draws 1 = 300 "
                             r"calibration blocks; the text has 4342 tokens \(271 blocks\)"),
])
def test_bad_calibration_settings(kw, message, tokenizer, token_ids):
    model = build_model(vocab_size=len(tokenizer))
    with pytest.raises(NqpqError, match=message):
        run_sweep(cal_config(**kw), model=model, ids=token_ids, log=lambda *_: None)


def test_calibration_on_another_text(tokenizer, token_ids, tmp_path, monkeypatch):
    """calib_ids: the basis of blocks 0..c−1 of that text; too short a text is an error naming both counts."""
    from nqpq import calibrate, make_blocks

    monkeypatch.chdir(tmp_path)
    (tmp_path / "other.raw").write_text("the text the ids below stand for\n")  # the path labels the run
    model = build_model(vocab_size=len(tokenizer))
    other = token_ids.flip(0)
    results = run_sweep(cal_config(calib_text_file="other.raw"), model=model, ids=token_ids, calib_ids=other,
                        log=lambda *_: None)
    assert results["config"]["calibration"]["source"] == "text"
    want = calibrate(model, make_blocks(other, CAL_T, CAL_C), CAL_LAYERS, backend="torch")
    for s in results["spectrum"]:
        assert s["r90"] == int(want.r90[s["layer"]][s["head"]])
    with pytest.raises(NqpqError, match=r"--calib-text-file 'other.raw': --calib-blocks 2 x --calib-draws 1 = 2 "
                                        r"calibration blocks of 16 text tokens need 32 tokens; the text has 20 tokens"):
        run_sweep(cal_config(calib_text_file="other.raw"), model=model, ids=token_ids, calib_ids=other[:20],
                  log=lambda *_: None)

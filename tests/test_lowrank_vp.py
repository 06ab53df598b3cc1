"""Low rank through V·P_r in the Triton kernel (issue 35 item 1), against float64.

Evaluation (no Gram requested) runs the key loop's P·V dot on V·P_r's d_r columns (padded to >= 16) and forms
out = ground + P_r (p·(V P_r) − P_rᵀ ground) in the epilogue; calibration (a Gram) keeps the whole ε. Every variant
is compared with the float64 definitions (tests/f64_reference.py), and the V·P_r output with the whole-ε output of
the same kernel (the numbers the kernel gave before), within each dtype's tolerance. Interpreter-sized (run with
TRITON_INTERPRET=1 without CUDA).
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from f64_reference import check_sink_against_f64  # noqa: E402
from plain_attention import TOL  # noqa: E402

from nqpq_kernels import launch as launch_mod  # noqa: E402
from nqpq_kernels import prefill as ra_mod  # noqa: E402
from nqpq_kernels import residual_attention_triton  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"

if DEV == "cpu" and (os.environ.get("TRITON_INTERPRET") != "1" or not ra_mod.interpreter_active()):
    pytest.skip("no CUDA and the Triton interpreter is not active (TRITON_INTERPRET=1 before import)",
                allow_module_level=True)


def make_basis(Hq: int, Dv: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(Hq, Dv, Dv, generator=g, dtype=torch.float64))[0].float().to(DEV)


def rand_qkv(B, Hq, Hkv, T, D, dtype, Dv=None, seed=0, sharp=2.0):
    """q [B, Hq, T, D], k [B, Hkv, T, D], v [B, Hkv, T, Dv]; ``sharp`` scales q for clear maxima."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, T, D, generator=g) * sharp
    k = torch.randn(B, Hkv, T, D, generator=g)
    v = torch.randn(B, Hkv, T, Dv or D, generator=g)
    return [t.to(device=DEV, dtype=dtype) for t in (q, k, v)]


def run_vp(q, k, v, d_r, basis, **kw):
    """The kernel's evaluation call (no Gram: through V·P_r), checked against float64."""
    res = residual_attention_triton(q, k, v, mode="lowrank", basis=basis, d_r=d_r, return_argmax=True,
                                    return_top1_prob=True, return_sink_mass=True, **kw)
    check_sink_against_f64(res, q, k, v, "lowrank", basis=basis, d_r=d_r, **kw)
    return res


def test_meta_goes_through_vp_only_without_a_gram():
    meta, _ = launch_mod.kernel_meta(64, torch.float16, "lowrank", "cpu", lowrank_rank=8)
    assert meta["LOWRANK_VP"] and meta["DR_PAD"] == 16
    meta, _ = launch_mod.kernel_meta(64, torch.float16, "lowrank", "cpu", lowrank_rank=40)
    assert meta["DR_PAD"] == 64
    meta, _ = launch_mod.kernel_meta(64, torch.float16, "lowrank", "cpu", lowrank_rank=8, return_gram=True)
    assert not meta["LOWRANK_VP"]  # calibration keeps the whole ε
    meta, _ = launch_mod.kernel_meta(64, torch.float16, "full", "cpu", lowrank_rank=8)
    assert not meta["LOWRANK_VP"]


def test_project_values_is_v_times_the_basis_per_query_head():
    B, Hq, Hkv, T, Dv, d_r = 2, 6, 2, 5, 32, 7
    _, _, v = rand_qkv(B, Hq, Hkv, T, 16, torch.float32, Dv=Dv)
    basis = make_basis(Hq, Dv)
    vp = ra_mod.project_values(v, basis, d_r, 16)
    assert vp.shape == (B, Hq, T, 16) and vp.is_contiguous()
    v_rep = v.double().repeat_interleave(Hq // Hkv, dim=1)
    want = torch.einsum("bhtd,hdr->bhtr", v_rep, basis.double()[:, :, :d_r])
    torch.testing.assert_close(vp[..., :d_r].double(), want, atol=1e-5, rtol=1e-5)
    assert bool((vp[..., d_r:] == 0).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("d_r", [1, 5, 16, 23])
def test_vp_matches_f64_and_the_whole_eps_path(dtype, d_r):
    q, k, v = rand_qkv(1, 4, 2, 45, 32, dtype)
    basis = make_basis(4, 32)
    res = run_vp(q, k, v, d_r, basis)
    whole = residual_attention_triton(q, k, v, mode="lowrank", basis=basis, d_r=d_r, return_argmax=True,
                                      return_gram=True)
    same = res.argmax == whole.argmax
    torch.testing.assert_close(res.out[same].float(), whole.out[same].float(), **TOL[dtype])


def test_vp_full_rank_is_full_attention():
    q, k, v = rand_qkv(1, 2, 2, 33, 16, torch.float32)
    basis = make_basis(2, 16)
    res = run_vp(q, k, v, 16, basis)
    full = residual_attention_triton(q, k, v, mode="full")
    torch.testing.assert_close(res.out, full.out, **TOL[torch.float32])


@pytest.mark.parametrize("variant", [
    dict(sliding_window=7),
    dict(attention_chunk=16),
    dict(softcap=3.0),
    dict(sink_tokens=1),
    dict(sink_tokens=3, sliding_window=9),
    dict(learned_sink="head"),
    dict(learned_sink="row", sink_tokens=2),
    dict(attn_mask="bool"),
    dict(attn_mask="float", sink_tokens=2),
], ids=lambda v: "-".join(f"{k}={x}" for k, x in v.items()))
def test_vp_variants_match_f64(variant):
    B, Hq, Hkv, T, D = 1, 4, 2, 37, 16
    q, k, v = rand_qkv(B, Hq, Hkv, T, D, torch.float32, seed=3)
    kw = dict(variant)
    g = torch.Generator().manual_seed(5)
    if kw.get("learned_sink") == "head":
        kw["learned_sink"] = torch.randn(Hq, generator=g).to(DEV)
    elif kw.get("learned_sink") == "row":
        kw["learned_sink"] = torch.randn(B, Hq, T, generator=g).to(DEV)
    if kw.get("attn_mask") == "bool":
        # causal plus a hidden band: visibility decided by the mask alone
        i = torch.arange(T)
        kw["attn_mask"] = ((i[None, :] <= i[:, None]) & ~((i[:, None] - i[None, :] > 3) & (i[None, :] % 5 == 1)))
        kw["attn_mask"] = kw["attn_mask"].to(DEV)
    elif kw.get("attn_mask") == "float":
        i = torch.arange(T)
        bias = torch.randn(B, 1, T, T, generator=g) * 0.5
        kw["attn_mask"] = bias.masked_fill(i[None, None, None, :] > i[None, None, :, None], float("-inf")).to(DEV)
    run_vp(q, k, v, 6, make_basis(Hq, D), **kw)


def test_vp_mla_widths():
    # v narrower than q/k (multi-head latent attention): the basis rows and V·P_r come from v's width.
    q, k, v = rand_qkv(1, 2, 1, 29, 48, torch.float32, Dv=32, seed=7)
    run_vp(q, k, v, 9, make_basis(2, 32))
    run_vp(q, k, v, 9, make_basis(2, 32), sink_tokens=2)


def test_vp_fp16_sink_and_window():
    q, k, v = rand_qkv(2, 3, 3, 40, 16, torch.float16, seed=11)
    run_vp(q, k, v, 4, make_basis(3, 16), sink_tokens=2, sliding_window=12)


@pytest.mark.parametrize("sink_tokens", [0, 3])
def test_vp_grouped_heads_equal_mha_on_repeated_kv(sink_tokens):
    # Grouped heads read their kv head in place (V·P_r per query head from it): the same as MHA on repeated K/V,
    # within rounding (the product is batched differently).
    q, k, v = rand_qkv(1, 6, 2, 33, 32, torch.float32, Dv=16, seed=13)
    basis = make_basis(6, 16)
    gqa = run_vp(q, k, v, 5, basis, sink_tokens=sink_tokens)
    rep = [t.repeat_interleave(3, dim=1) for t in (k, v)]
    mha = residual_attention_triton(q, *rep, mode="lowrank", basis=basis, d_r=5, sink_tokens=sink_tokens,
                                    return_argmax=True)
    assert torch.equal(gqa.argmax, mha.argmax)
    torch.testing.assert_close(gqa.out, mha.out, atol=1e-6, rtol=1e-6)

"""Tests of the fused Triton residual-attention kernel (``nqpq_kernels``).

Without CUDA they run under Triton's CPU interpreter (TRITON_INTERPRET=1, set
here before triton is imported).  The kernel is checked against an independent
float64 implementation written below *and* against ``nqpq_kernels.reference``.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from f64_reference import check_sink_against_f64  # noqa: E402
from plain_attention import GRAM_RTOL, TOL, check_against_plain, plain_scores  # noqa: E402

import nqpq_kernels  # noqa: E402
from nqpq_kernels import launch as launch_mod  # noqa: E402
from nqpq_kernels import prefill as ra_mod  # noqa: E402
from nqpq_kernels import prefill_loop, residual_attention_triton  # noqa: E402
from nqpq_kernels.contract import ResidualAttentionResult  # noqa: E402
from nqpq_kernels.reference import residual_attention_reference  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
MODES = ("top1", "full", "lowrank")

if DEV == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no CUDA and TRITON_INTERPRET is not 1", allow_module_level=True)
if DEV == "cpu" and not ra_mod.interpreter_active():
    pytest.skip(
        "triton was imported before TRITON_INTERPRET=1 could be set here (e.g. through conftest); "
        "run with TRITON_INTERPRET=1 in the environment",
        allow_module_level=True,
    )



def make_basis(H, D, seed=0, R=None):
    g = torch.Generator().manual_seed(seed)
    Q = torch.linalg.qr(torch.randn(H, D, D, generator=g, dtype=torch.float64))[0].float()
    if R is not None:
        Q = Q[:, :, :R]
    return Q.to(DEV)


def rand_qkv(B, H, T, D, dtype, seed=0, Hkv=None, sharp=1.0):
    """q [B, H, T, D], k/v [B, Hkv, T, D] (Hkv defaults to H); ``sharp`` scales q for clearer maxima."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, T, D, generator=g) * sharp
    kv = [torch.randn(B, Hkv or H, T, D, generator=g) for _ in range(2)]
    return [t.to(device=DEV, dtype=dtype) for t in (q, *kv)]


def run_and_check(q, k, v, mode, d_r=None, basis=None, return_gram=True, out_layout="bhtd", min_clear=0.9, **kw):
    """Run the kernel (everything requested), compare with float64 and with the package reference."""
    B, H, T, D = q.shape
    opts = {key: kw.pop(key) for key in ("scale", "sliding_window", "softcap") if key in kw}
    res = residual_attention_triton(
        q, k, v, mode=mode, basis=basis, d_r=d_r, return_argmax=True, return_gram=return_gram,
        return_top1_prob=True, out_layout=out_layout, **opts, **kw,
    )
    assert isinstance(res, ResidualAttentionResult)
    assert (res.gram is not None) == return_gram
    check_against_plain(res, q, k, v, mode, basis, d_r, out_layout=out_layout, min_clear=min_clear, **opts)

    # Against the package reference: outputs on rows where both pick the same index (all rows for "full").
    ref = residual_attention_reference(
        q, k, v, mode=mode, basis=basis, d_r=d_r, return_argmax=True, return_gram=return_gram,
        return_top1_prob=True, out_layout=out_layout, **opts,
    )
    assert torch.equal(res.argmax == -1, ref.argmax == -1)
    same = res.argmax == ref.argmax
    rows = same if mode != "full" else torch.ones_like(same)
    rows = rows.transpose(1, 2) if out_layout == "bthd" else rows
    torch.testing.assert_close(res.out[rows].float(), ref.out[rows].float(), **TOL[q.dtype], equal_nan=True)
    torch.testing.assert_close(res.top1_prob, ref.top1_prob, atol=2e-6, rtol=2e-5, equal_nan=True)
    if return_gram and bool(torch.isfinite(ref.gram).all()):
        scale_g = ref.gram.abs().max().clamp_min(1e-12)
        assert float((res.gram - ref.gram).abs().max() / scale_g) < GRAM_RTOL[q.dtype]
    return res


# --------------------------------------------------------------------------- #
# Numerical coverage (interpreter-sized)
# --------------------------------------------------------------------------- #
# Full cross product on a small core: every mode x dtype x T at D=16.
CORE = [
    (mode, dtype, T)
    for mode in MODES
    for dtype in (torch.float32, torch.float16)
    for T in (1, 2, 17, 63, 64, 65, 130)
]


@pytest.mark.parametrize("mode,dtype,T", CORE)
def test_core(mode, dtype, T):
    B, H, D = 2, 2, 16
    q, k, v = rand_qkv(B, H, T, D, dtype, seed=T)
    basis = make_basis(H, D) if mode == "lowrank" else None
    # Alternate the gram request so top1 runs both with and without the P@V loop.
    run_and_check(q, k, v, mode, d_r=5 if mode == "lowrank" else None, basis=basis,
                  return_gram=(T % 2 == 1))


@pytest.mark.parametrize("T", [17, 130])
@pytest.mark.parametrize("D", [32, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("mode", MODES)
def test_head_dims(mode, dtype, D, T):
    B, H = 1, 3
    q, k, v = rand_qkv(B, H, T, D, dtype, seed=D)
    basis = make_basis(H, D) if mode == "lowrank" else None
    run_and_check(q, k, v, mode, d_r=16 if mode == "lowrank" else None, basis=basis)


@pytest.mark.parametrize(
    "D,d_r,dtype",
    [(D, d_r, torch.float32) for D in (16, 32, 64) for d_r in sorted({0, 1, 5, 16, D}) if d_r <= D]
    + [(32, 5, torch.float16), (32, 32, torch.float16), (16, 0, torch.float16)],
)
def test_lowrank_d_r(D, d_r, dtype):
    B, H, T = 1, 2, 63
    q, k, v = rand_qkv(B, H, T, D, dtype, seed=d_r)
    basis = make_basis(H, D, seed=D)
    out = run_and_check(q, k, v, "lowrank", d_r=d_r, basis=basis).out
    if d_r == 0:  # no correction: exactly top1
        top1 = residual_attention_triton(q, k, v, mode="top1").out
        torch.testing.assert_close(out, top1, atol=0, rtol=0)
    if d_r == D:  # complete orthonormal basis: lowrank == full
        full = residual_attention_triton(q, k, v, mode="full").out
        torch.testing.assert_close(out.float(), full.float(), **TOL[dtype])


@pytest.mark.parametrize("mode", MODES)
def test_head_dim_128(mode):
    B, H, T, D = 1, 2, 70, 128
    q, k, v = rand_qkv(B, H, T, D, torch.float32, seed=128)
    basis = make_basis(H, D) if mode == "lowrank" else None
    run_and_check(q, k, v, mode, d_r=40 if mode == "lowrank" else None, basis=basis)


def test_lowrank_basis_fewer_columns_than_D():
    """R < D (R >= d_r) and a float64 basis are accepted."""
    B, H, T, D = 1, 2, 40, 32
    q, k, v = rand_qkv(B, H, T, D, torch.float32, seed=3)
    basis = make_basis(H, D, R=7).double()
    run_and_check(q, k, v, "lowrank", d_r=7, basis=basis)


def test_bfloat16_interpreter_or_gpu():
    B, H, T, D = 1, 2, 33, 16
    q, k, v = rand_qkv(B, H, T, D, torch.bfloat16, seed=11)
    run_and_check(q, k, v, "lowrank", d_r=4, basis=make_basis(H, D))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("mode", MODES)
def test_noncontiguous_packed_qkv(mode, dtype):
    """q/k/v are views of a packed [B, T, 3*H*D] projection, as transformers hands them."""
    B, H, T, D = 2, 2, 65, 32
    g = torch.Generator().manual_seed(5)
    qkv = torch.randn(B, T, 3 * H * D, generator=g).to(device=DEV, dtype=dtype)
    q, k, v = (t.view(B, T, H, D).transpose(1, 2) for t in qkv.split(H * D, dim=-1))
    assert not q.is_contiguous() and q.stride(-1) == 1
    before = qkv.clone()
    basis = make_basis(H, D) if mode == "lowrank" else None
    run_and_check(q, k, v, mode, d_r=9 if mode == "lowrank" else None, basis=basis)
    assert torch.equal(qkv, before)


@pytest.mark.parametrize("mode", MODES)
def test_out_layout_bthd(mode):
    B, H, T, D = 2, 3, 50, 16
    q, k, v = rand_qkv(B, H, T, D, torch.float32, seed=7)
    basis = make_basis(H, D) if mode == "lowrank" else None
    d_r = 6 if mode == "lowrank" else None
    out = run_and_check(q, k, v, mode, d_r=d_r, basis=basis, out_layout="bthd").out
    # With the Gram, as run_and_check asked it (low rank: the same whole-ε path on both sides).
    out_b = residual_attention_triton(q, k, v, mode=mode, basis=basis, d_r=d_r, return_gram=True).out
    torch.testing.assert_close(out, out_b.transpose(1, 2).contiguous(), atol=0, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_exact_ties_first_index(dtype):
    """Integer-valued q/k make every score exact, so ties are exact: the kernel must
    return the first maximal index, i.e. torch.argmax of the reference p."""
    B, H, T, D = 1, 2, 130, 16  # scale = 1/4, exact
    g = torch.Generator().manual_seed(1)
    q = torch.randint(-1, 2, (B, H, T, D), generator=g).to(device=DEV, dtype=dtype)
    k = torch.randint(-1, 2, (B, H, T, D), generator=g).to(device=DEV, dtype=dtype)
    # Repeated keys across tiles: later copies of early keys.
    k[:, :, 40] = k[:, :, 3]
    k[:, :, 100] = k[:, :, 3]
    k[:, :, 90] = k[:, :, 70]
    v = torch.randn(B, H, T, D, generator=g).to(device=DEV, dtype=dtype)
    for mode in MODES:
        basis = make_basis(H, D) if mode == "lowrank" else None
        out, idx, _, _, _ = residual_attention_triton(
            q, k, v, mode=mode, basis=basis, d_r=3 if mode == "lowrank" else None, return_argmax=True
        )
        r_out, r_idx, _, _, _ = residual_attention_reference(
            q, k, v, mode=mode, basis=basis, d_r=3 if mode == "lowrank" else None, return_argmax=True
        )
        assert torch.equal(idx, r_idx)
        s = plain_scores(q, k)[0]
        assert torch.equal(idx.cpu(), s.argmax(-1))  # torch.argmax: the first maximal index
        torch.testing.assert_close(out.float(), r_out.float(), **TOL[dtype])
    # There really were ties, and the kernel picked the first of them.
    n_ties = (s == s.max(-1, keepdim=True).values).sum(-1)
    assert int((n_ties > 1).sum()) > 10


@pytest.mark.parametrize("out_layout", ["bhtd", "bthd"])
@pytest.mark.parametrize("mode", MODES)
def test_poisoned_output_fully_written(mode, out_layout):
    B, H, T, D = 1, 2, 37, 16
    q, k, v = rand_qkv(B, H, T, D, torch.float16, seed=2)
    shape = (B, H, T, D) if out_layout == "bhtd" else (B, T, H, D)
    poisoned = torch.full(shape, float("nan"), device=DEV, dtype=torch.float16)
    basis = make_basis(H, D) if mode == "lowrank" else None
    out = residual_attention_triton(
        q, k, v, mode=mode, basis=basis, d_r=2 if mode == "lowrank" else None,
        out_layout=out_layout, out=poisoned,
    ).out
    assert out.data_ptr() == poisoned.data_ptr()
    assert not torch.isnan(out).any()
    r_out = residual_attention_reference(
        q, k, v, mode=mode, basis=basis, d_r=2 if mode == "lowrank" else None, out_layout=out_layout
    ).out
    torch.testing.assert_close(out.float(), r_out.float(), **TOL[torch.float16])


@pytest.mark.parametrize("block_m,block_n", [(16, 16), (64, 16), (32, 32), (64, 64)])
def test_other_tilings(monkeypatch, block_m, block_n):
    """The kernel is correct for other block shapes than the default (diagonal splitting)."""
    monkeypatch.setattr(
        launch_mod, "pick_config",
        lambda *a, **k: dict(BLOCK_M=block_m, BLOCK_N=block_n, num_warps=4, num_stages=2),
    )
    B, H, T, D = 1, 2, 130, 32
    q, k, v = rand_qkv(B, H, T, D, torch.float32, seed=block_m + block_n)
    run_and_check(q, k, v, "lowrank", d_r=5, basis=make_basis(H, D))
    run_and_check(q, k, v, "top1", return_gram=False)


@pytest.mark.parametrize("split", [False, True])
@pytest.mark.parametrize("D,gram_cols,r_block", [(64, 16, 16), (64, 32, 16), (128, 16, 16)])
def test_epilogue_chunks(monkeypatch, D, gram_cols, r_block, split):
    """The Gram GRAM_COLS columns at a time (ε's column blocks by one-hot products, or by reshape + split:
    SPLIT_GRAM, 2 / 4 / 8 blocks) and the projection R_BLOCK basis columns at a time (the CUDA table's D 256 and
    fp32 choices) against float64, at widths the interpreter runs quickly; with the sink's ground."""
    monkeypatch.setattr(
        launch_mod, "pick_config",
        lambda *a, **k: dict(BLOCK_M=32, BLOCK_N=16, num_warps=4, num_stages=1, GRAM_COLS=gram_cols,
                             R_BLOCK=r_block, SPLIT_GRAM=split),
    )
    meta, _ = launch_mod.kernel_meta(D, torch.float32, "lowrank", DEV, return_gram=True)
    assert (meta["GRAM_COLS"], meta["R_BLOCK"], meta["SPLIT_GRAM"]) == (gram_cols, r_block, split)
    q, k, v = rand_qkv(1, 2, 40, D, torch.float32, seed=gram_cols + r_block + D)
    run_and_check(q, k, v, "lowrank", d_r=37, basis=make_basis(2, D))
    run_sink(q, k, v, "lowrank", 3, d_r=37, basis=make_basis(2, D))


def test_allow_tf32_and_custom_scale():
    B, H, T, D = 1, 2, 30, 16
    q, k, v = rand_qkv(B, H, T, D, torch.float32, seed=4)
    basis = make_basis(H, D)
    out, idx, gram, _, _ = residual_attention_triton(
        q, k, v, mode="lowrank", basis=basis, d_r=4, scale=0.7, allow_tf32=True,
        return_argmax=True, return_gram=True,
    )
    r_out, r_idx, r_gram, _, _ = residual_attention_reference(
        q, k, v, mode="lowrank", basis=basis, d_r=4, scale=0.7, return_argmax=True, return_gram=True
    )
    same = idx == r_idx
    assert float(same.float().mean()) > 0.9
    torch.testing.assert_close(out[same], r_out[same], atol=5e-2, rtol=5e-2)
    assert float((gram - r_gram).abs().max() / r_gram.abs().max()) < 5e-2


def test_exports():
    assert nqpq_kernels.residual_attention_triton is residual_attention_triton
    out, a, g, t, m = residual_attention_triton(*rand_qkv(1, 1, 3, 16, torch.float32), mode="full")
    assert a is None and g is None and t is None and m is None and out.shape == (1, 1, 3, 16)


# --------------------------------------------------------------------------- #
# Grouped-query heads, sliding windows, soft caps, padded head dims, top1_prob
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("Hkv,dtype", [(1, torch.float32), (2, torch.float16)])
@pytest.mark.parametrize("mode", MODES)
def test_gqa_mqa(mode, Hkv, dtype):
    """Hq=4 query heads over Hkv kv heads (MQA for Hkv=1); equal to MHA on repeat_kv-expanded K/V."""
    B, H, T, D = 2, 4, 40, 16
    q, k, v = rand_qkv(B, H, T, D, dtype, seed=Hkv, Hkv=Hkv, sharp=2.0)
    basis = make_basis(H, D) if mode == "lowrank" else None
    d_r = 5 if mode == "lowrank" else None
    res = run_and_check(q, k, v, mode, d_r=d_r, basis=basis)
    rep = [t.repeat_interleave(H // Hkv, dim=1) for t in (k, v)]
    mha = residual_attention_triton(q, *rep, mode=mode, basis=basis, d_r=d_r, return_argmax=True,
                                    return_gram=True, return_top1_prob=True)
    for name in ("out", "argmax", "top1_prob"):
        assert torch.equal(getattr(res, name), getattr(mha, name)), name
    torch.testing.assert_close(res.gram, mha.gram, rtol=1e-6, atol=1e-9)


# BLOCK_M=32, BLOCK_N=16 under the interpreter: w=1, w shorter than a key tile, a tile, between the tile
# and the query block, longer than a block, T-1, and longer than T.
@pytest.mark.parametrize("window", [1, 5, 16, 23, 40, 69, 100])
@pytest.mark.parametrize("mode", MODES)
def test_sliding_window(mode, window):
    B, H, T, D = 1, 4, 70, 16
    q, k, v = rand_qkv(B, H, T, D, torch.float32, seed=window, Hkv=2, sharp=2.0)
    basis = make_basis(H, D) if mode == "lowrank" else None
    res = run_and_check(q, k, v, mode, d_r=4 if mode == "lowrank" else None, basis=basis, sliding_window=window,
                        return_gram=mode != "top1")
    assert bool((res.argmax > torch.arange(T, device=DEV) - window).all())
    if window == 1:
        assert torch.equal(res.argmax, torch.arange(T, device=DEV).expand(B, H, T))
        assert bool((res.top1_prob == 1).all())


def visited_tiles_equal_needed(monkeypatch, band, **mask) -> int:
    """Runs the interpreter kernel with a soft cap (its ``_tanh`` is called once per visited key tile) under the
    mask ``mask`` (a window or a chunk), asserts it visits exactly the tiles where some row sees a key (``band(i)``:
    the mask's rule beside causality, on row/key indices ``i``) and that its output is right; returns the count."""
    T = 200
    q, k, v = rand_qkv(1, 1, T, 16, torch.float32, seed=sum(mask.values()))
    visits = []
    real_tanh = prefill_loop._tanh

    def counting_tanh(x):
        visits.append(1)
        return real_tanh(x)

    monkeypatch.setattr(prefill_loop, "_tanh", counting_tanh)  # the key loop's global: looked up per call
    monkeypatch.setattr(ra_mod, "interpreter_active", lambda: True)  # it inspects the (now wrapped) helpers
    res = residual_attention_triton(q, k, v, mode="full", softcap=50.0, return_argmax=True, **mask)
    block_m, block_n = 32, 16  # the interpreter's tiles
    i = torch.arange(T)
    visible = (i[None, :] <= i[:, None]) & band(i)
    needed = sum(bool(visible[m: m + block_m, n: n + block_n].any())
                 for m in range(0, T, block_m) for n in range(0, T, block_n))
    assert len(visits) == needed
    check_against_plain(res, q, k, v, "full", softcap=50.0, **mask)
    return needed


@pytest.mark.skipif(DEV != "cpu", reason="counts tiles through the interpreter")
@pytest.mark.parametrize("window", [1, 5, 16, 23, 40])
def test_sliding_window_skips_tiles(monkeypatch, window):
    """Only key tiles that some row of the query block can see are visited: cost ~ T·w, not T²."""
    needed = visited_tiles_equal_needed(monkeypatch, lambda i: i[None, :] > i[:, None] - window,
                                        sliding_window=window)
    n_m = -(-200 // 32)
    assert needed <= n_m * ((window + 32) // 16 + 2)  # linear in T·w


def test_sliding_window_fp16_other_tilings(monkeypatch):
    """Window edges against other tile shapes (BLOCK_M == BLOCK_N, and BLOCK_M = 4 * BLOCK_N)."""
    q, k, v = rand_qkv(1, 2, 100, 32, torch.float16, seed=8, Hkv=1, sharp=2.0)
    for block_m, block_n in ((16, 16), (64, 16)):
        monkeypatch.setattr(launch_mod, "pick_config", lambda *a, bm=block_m, bn=block_n, **kw: dict(
            BLOCK_M=bm, BLOCK_N=bn, num_warps=4, num_stages=1))
        for window in (3, 17, 50):
            run_and_check(q, k, v, "full", sliding_window=window)


@pytest.mark.parametrize("softcap", [2.0, 30.0])
@pytest.mark.parametrize("mode", MODES)
def test_softcap(mode, softcap):
    B, H, T, D = 1, 2, 50, 32
    q, k, v = rand_qkv(B, H, T, D, torch.float32, seed=int(softcap), Hkv=1, sharp=2.0)
    basis = make_basis(H, D) if mode == "lowrank" else None
    run_and_check(q, k, v, mode, d_r=6 if mode == "lowrank" else None, basis=basis, softcap=softcap,
                  sliding_window=30 if mode == "full" else None, min_clear=0.5)


def test_softcap_tanh_accuracy():
    """The kernel's tanh (built from exp: no libdevice in the interpreter) against float64 over a wide range."""
    x = torch.cat([torch.linspace(-12, 12, 481), torch.tensor([0.0, 1e-6, -1e-6, 0.3999, 0.4, 0.4001, 9.0, 9.02,
                                                               20.0, -20.0, 100.0, 1e30, -1e30])])
    # With a window of 2, odd row 2m+1 sees key 2m (k = 0: score 0) and key 2m+1 (k = e_0: score c·tanh(x_m / c),
    # c = 1), so its top1_prob is 1 / (1 + e^-|tanh x_m|).
    n, D = x.numel(), 16
    q = torch.zeros(1, 1, 2 * n, D)
    k = torch.zeros(1, 1, 2 * n, D)
    q[0, 0, 1::2, 0] = x
    k[0, 0, 1::2, 0] = 1.0
    res = residual_attention_triton(q.to(DEV), k.to(DEV), torch.zeros_like(q).to(DEV), mode="top1", scale=1.0,
                                    softcap=1.0, sliding_window=2, return_top1_prob=True)
    want = 1.0 / (1.0 + torch.exp(-torch.tanh(x.double()).abs()))
    torch.testing.assert_close(res.top1_prob[0, 0, 1::2].double().cpu(), want, atol=3e-7, rtol=0)


def saturated_tie_qkv(T, D=16, dtype=torch.float32, seed=0):
    """Integer scores: 'hot' keys score 29..31, which c·tanh(s/c) caps to exactly c (c=1) in fp32 and fp64;
    the others score -1..1. Rows that see several hot keys tie exactly; hot keys sit in several key tiles."""
    g = torch.Generator().manual_seed(seed)
    q = torch.zeros(1, 2, T, D)
    q[..., 0] = 1.0
    q[..., 1] = torch.randint(-1, 2, (1, 2, T), generator=g).float()
    k = torch.zeros(1, 1, T, D)
    hot = torch.rand(T, generator=g) < 0.12
    hot[[5, 20, 21, 40, 95]] = True
    k[0, 0, :, 0] = 30.0 * hot
    k[0, 0, :, 1] = torch.randint(-1, 2, (T,), generator=g).float()
    v = torch.randn(1, 1, T, D, generator=g)
    return [t.to(device=DEV, dtype=dtype) for t in (q, k, v)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_softcap_saturated_exact_ties_first_index(dtype):
    T = 100
    q, k, v = saturated_tie_qkv(T, dtype=dtype)
    for window in (None, 7, 30):
        kw = dict(scale=1.0, softcap=1.0, sliding_window=window, return_argmax=True, return_top1_prob=True)
        for mode in MODES:
            basis = make_basis(2, 16) if mode == "lowrank" else None
            d_r = 4 if mode == "lowrank" else None
            res = residual_attention_triton(q, k, v, mode=mode, basis=basis, d_r=d_r, **kw)
            ref = residual_attention_reference(q, k, v, mode=mode, basis=basis, d_r=d_r, **kw)
            assert torch.equal(res.argmax, ref.argmax), (mode, window)
            check_against_plain(res, q, k, v, mode, basis, d_r, scale=1.0, softcap=1.0, sliding_window=window,
                                min_clear=0)
        s = plain_scores(q, k, scale=1.0, sliding_window=window, softcap=1.0)[0]
        first = (s == s.amax(-1, keepdim=True)).int().argmax(-1)  # first maximal index, computed apart
        assert torch.equal(res.argmax.cpu(), first)
        n_ties = (s == s.amax(-1, keepdim=True)).sum(-1)
        assert int((n_ties > 1).sum()) > 30  # many exact ties, across key tiles
        assert bool((res.argmax.cpu() // 16 < torch.arange(T) // 16).any())


@pytest.mark.parametrize("D", [48, 80, 96, 256])
@pytest.mark.parametrize("mode", MODES)
def test_padded_head_dims(mode, D):
    """Head dims that are not powers of two are padded inside the kernel (masked loads and stores)."""
    B, H, T = 1, 2, 40 if D < 256 else 33
    dtype = torch.float16 if D == 96 else torch.float32
    q, k, v = rand_qkv(B, H, T, D, dtype, seed=D, Hkv=1, sharp=2.0)
    basis = make_basis(H, D) if mode == "lowrank" else None
    d_r = {48: 48, 80: 70, 96: 17, 256: 130}[D] if mode == "lowrank" else None  # several R_BLOCK chunks
    res = run_and_check(q, k, v, mode, d_r=d_r, basis=basis, out_layout="bthd" if D == 80 else "bhtd",
                        softcap=20.0 if D == 256 else None, sliding_window=9 if D == 96 else None)
    if mode == "lowrank" and D == 48:  # d_r = D with an orthonormal basis: exactly "full" (to fp32 rounding)
        full = residual_attention_triton(q, k, v, mode="full").out
        torch.testing.assert_close(res.out, full, **TOL[dtype])


def test_top1_prob_costs_no_change():
    """Asking for top1_prob (which needs the softmax denominator in top1 mode) changes nothing else."""
    q, k, v = rand_qkv(2, 2, 45, 16, torch.float32, seed=12)
    for mode in MODES:
        basis = make_basis(2, 16) if mode == "lowrank" else None
        d_r = 3 if mode == "lowrank" else None
        a = residual_attention_triton(q, k, v, mode=mode, basis=basis, d_r=d_r, return_argmax=True)
        b = residual_attention_triton(q, k, v, mode=mode, basis=basis, d_r=d_r, return_argmax=True,
                                      return_top1_prob=True)
        assert a.top1_prob is None and b.top1_prob.shape == (2, 2, 45)
        assert torch.equal(a.out, b.out) and torch.equal(a.argmax, b.argmax)
        assert bool((b.top1_prob[..., 0] == 1).all()) and bool((b.top1_prob > 0).all())


def test_argmax_on_scores_not_rounded_p():
    """Scores 0 and 2^-30 give one fp32 probability; i* is taken on the scores, so row 1 picks index 1."""
    q = torch.zeros(1, 1, 2, 16)
    k = torch.zeros(1, 1, 2, 16)
    q[..., 0] = 1.0
    k[0, 0, 1, 0] = 1.0
    v = torch.randn(1, 1, 2, 16)
    res = residual_attention_triton(q.to(DEV), k.to(DEV), v.to(DEV), mode="top1", scale=2.0**-30,
                                    return_argmax=True)
    assert res.argmax[0, 0].tolist() == [0, 1]
    ref = residual_attention_reference(q, k, v, mode="top1", scale=2.0**-30, return_argmax=True)
    assert ref.argmax[0, 0].tolist() == [0, 1]


# --------------------------------------------------------------------------- #
# The sink kept apart (sink_tokens=n): against the float64 definitions and the package reference
# --------------------------------------------------------------------------- #
def run_sink(q, k, v, mode, n, d_r=None, basis=None, return_gram=True, out_layout="bhtd", min_clear=0.9, **opts):
    """The kernel with sink_tokens=n and everything asked, checked against float64 and against the reference."""
    kw = dict(mode=mode, basis=basis, d_r=d_r, sink_tokens=n, return_argmax=True, return_gram=return_gram,
              return_top1_prob=True, return_sink_mass=True, out_layout=out_layout, **opts)
    res = residual_attention_triton(q, k, v, **kw)
    assert (res.gram is not None) == return_gram
    first = check_sink_against_f64(res, q, k, v, mode, basis, d_r, sink_tokens=n, out_layout=out_layout,
                                   min_clear=min_clear, **opts)
    ref = residual_attention_reference(q, k, v, **kw)
    assert torch.equal(res.argmax == -1, ref.argmax == -1)
    same = res.argmax == ref.argmax
    rows = same if mode != "full" else torch.ones_like(same)
    out_rows = rows.transpose(1, 2) if out_layout == "bthd" else rows
    torch.testing.assert_close(res.out[out_rows].float(), ref.out[out_rows].float(), **TOL[q.dtype], equal_nan=True)
    torch.testing.assert_close(res.top1_prob[same], ref.top1_prob[same], atol=2e-6, rtol=2e-5, equal_nan=True)
    torch.testing.assert_close(res.sink_mass, ref.sink_mass, atol=2e-6, rtol=2e-5, equal_nan=True)
    if return_gram and bool(torch.isfinite(ref.gram).all()):
        assert float((res.gram - ref.gram).abs().max() / ref.gram.abs().max().clamp_min(1e-12)) < GRAM_RTOL[q.dtype]
    # Rows t < n see only sink keys: all the mass is the sink's, exactly.
    T = q.shape[2]
    early = (torch.arange(T, device=res.argmax.device) < n).expand_as(res.argmax) & (res.argmax >= 0)
    assert bool((res.sink_mass[early] == 1).all())
    return res, first


SINK_CORE = [
    (mode, dtype, T, n)
    for mode in MODES
    for dtype in (torch.float32, torch.float16)
    for T in (2, 17, 65, 130)
    for n in (0, 1, 4)
]


@pytest.mark.parametrize("mode,dtype,T,n", SINK_CORE)
def test_sink_core(mode, dtype, T, n):
    B, H, D = 2, 2, 16
    q, k, v = rand_qkv(B, H, T, D, dtype, seed=T + 7 * n, sharp=2.0)
    basis = make_basis(H, D) if mode == "lowrank" else None
    res, _ = run_sink(q, k, v, mode, n, d_r=5 if mode == "lowrank" else None, basis=basis, return_gram=(T % 2 == 1))
    if n == 0:  # n = 0 is the spec: the kernel without any sink code, bit for bit
        # The same Gram request (low rank: evaluation runs V·P_r, a Gram the whole ε; equal within rounding).
        plain_res = residual_attention_triton(q, k, v, mode=mode, basis=basis, d_r=5 if mode == "lowrank" else None,
                                              return_argmax=True, return_top1_prob=True, return_gram=T % 2 == 1)
        for name in ("out", "argmax", "top1_prob"):
            assert torch.equal(getattr(res, name), getattr(plain_res, name)), name
        assert bool((res.sink_mass == 0).all())


# (B, Hq, Hkv, T, D, dtype, window, softcap, out_layout, min_clear); BLOCK_M=32, BLOCK_N=16 in the interpreter.
SINK_GEOMETRIES = {
    "gqa-fp16": (2, 4, 2, 40, 16, torch.float16, None, None, "bhtd", 0.9),
    "mqa-window-5": (1, 4, 1, 70, 16, torch.float32, 5, None, "bhtd", 0.9),  # the sink leaves the view early
    "window-23-D32": (1, 2, 2, 70, 32, torch.float32, 23, None, "bhtd", 0.9),
    "softcap-30": (1, 2, 1, 50, 32, torch.float32, None, 30.0, "bhtd", 0.8),
    "softcap-window": (1, 2, 1, 50, 16, torch.float16, 30, 5.0, "bhtd", 0.5),
    "padded-48": (1, 2, 1, 40, 48, torch.float32, None, None, "bhtd", 0.9),
    "padded-80-bthd": (1, 2, 1, 40, 80, torch.float32, None, None, "bthd", 0.9),
    "padded-96-fp16-window": (1, 2, 1, 40, 96, torch.float16, 9, None, "bhtd", 0.9),
    "bf16": (1, 2, 2, 33, 16, torch.bfloat16, None, None, "bhtd", 0.9),
}


@pytest.mark.parametrize("n", [1, 4])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("geometry", list(SINK_GEOMETRIES))
def test_sink_gqa_window_softcap_padded(geometry, mode, n):
    B, Hq, Hkv, T, D, dtype, window, softcap, layout, min_clear = SINK_GEOMETRIES[geometry]
    q, k, v = rand_qkv(B, Hq, T, D, dtype, seed=D + T + n, Hkv=Hkv, sharp=2.0)
    basis = make_basis(Hq, D) if mode == "lowrank" else None
    d_r = min(D, 20) if mode == "lowrank" else None
    res, _ = run_sink(q, k, v, mode, n, d_r=d_r, basis=basis, out_layout=layout, min_clear=min_clear,
                      sliding_window=window, softcap=softcap)
    if window is not None:
        # Rows past n + w − 1 see no sink key: no sink mass, and the top-1 ground state is V[i*ᴿ] exactly.
        late = (torch.arange(T, device=DEV) >= n + window - 1).expand_as(res.argmax)
        assert bool(late.any()) and bool((res.sink_mass[late] == 0).all())
        if mode == "top1" and layout == "bhtd":
            v_rep = v.repeat_interleave(Hq // Hkv, dim=1)
            v_star = torch.gather(v_rep, 2, res.argmax.clamp_min(0).unsqueeze(-1).expand(B, Hq, T, D))
            assert torch.equal(res.out[late], v_star[late])
    if Hkv < Hq:  # grouped heads read their kv head in place: the same as MHA on repeated K/V
        rep = [t.repeat_interleave(Hq // Hkv, dim=1) for t in (k, v)]
        mha = residual_attention_triton(q, *rep, mode=mode, basis=basis, d_r=d_r, sink_tokens=n, return_argmax=True,
                                        return_top1_prob=True, return_sink_mass=True, out_layout=layout,
                                        sliding_window=window, softcap=softcap, return_gram=True)  # as run_sink
        for name in ("out", "argmax", "top1_prob", "sink_mass"):
            assert torch.equal(getattr(res, name), getattr(mha, name)), name


@pytest.mark.parametrize("block_m,block_n", [(32, 16), (16, 16), (64, 16), (32, 32)])
@pytest.mark.parametrize("n", [15, 16, 17, 37, 100])
def test_sink_many_keys_other_tilings(monkeypatch, block_m, block_n, n):
    """n across tile and block boundaries (one and several sink tiles, the diagonal block inside the sink),
    and n >= T (every key is a sink key: ground = ctx on every row)."""
    monkeypatch.setattr(
        launch_mod, "pick_config",
        lambda *a, **k: dict(BLOCK_M=block_m, BLOCK_N=block_n, num_warps=4, num_stages=2),
    )
    B, H, T, D = 1, 2, 70, 16
    q, k, v = rand_qkv(B, H, T, D, torch.float32, seed=n + block_m, Hkv=1, sharp=2.0)
    res, _ = run_sink(q, k, v, "lowrank", n, d_r=5, basis=make_basis(H, D))
    if n >= T:
        full = residual_attention_triton(q, k, v, mode="full").out
        torch.testing.assert_close(res.out, full, **TOL[torch.float32])
        assert bool((res.sink_mass == 1).all()) and float(res.gram.abs().max()) == 0.0
    run_sink(q, k, v, "top1", n, return_gram=False, sliding_window=20)


def test_sink_rows_before_n_are_ctx():
    """Rows t < n: ground = ctx, so top1 and lowrank equal full there, ε = 0 (the Gram ignores those rows), and
    the argmax is the first maximum over the visible (sink) keys."""
    B, H, T, D, n = 1, 2, 40, 16, 6
    q, k, v = rand_qkv(B, H, T, D, torch.float32, seed=31, sharp=2.0)
    basis = make_basis(H, D)
    kw = dict(sink_tokens=n, return_argmax=True, return_top1_prob=True, return_sink_mass=True)
    full = residual_attention_triton(q, k, v, mode="full", **kw)
    for mode in ("top1", "lowrank"):
        res = residual_attention_triton(q, k, v, mode=mode, basis=basis, d_r=4, **kw)
        torch.testing.assert_close(res.out[:, :, :n], full.out[:, :, :n], **TOL[torch.float32])
        assert torch.equal(res.argmax, full.argmax)
    s = plain_scores(q, k)[0]
    assert torch.equal(full.argmax[:, :, :n].cpu(), s[:, :, :n].argmax(-1))
    assert bool((full.argmax[:, :, n:] >= n).all())
    torch.testing.assert_close(full.top1_prob[:, :, :n].double().cpu(), s[:, :, :n].softmax(-1).amax(-1),
                               atol=2e-6, rtol=2e-5)
    # The Gram of rows t >= n only equals the Gram of every row: rows t < n add ε = 0.
    g_all = residual_attention_triton(q, k, v, mode="top1", sink_tokens=n, return_gram=True).gram
    ctx = full.out.double()
    ground = residual_attention_triton(q, k, v, mode="top1", sink_tokens=n).out.double()
    eps = (ctx - ground)[:, :, n:]
    torch.testing.assert_close(g_all, torch.einsum("bhti,bhtj->hij", eps, eps), rtol=1e-4, atol=1e-9)


def test_sink_requests_change_no_output():
    """Asking for the Gram, top1_prob or the sink mass (which switch on ctx or the softmax denominator) changes
    neither the output nor the argmax, with a sink too (rows t < n included)."""
    q, k, v = rand_qkv(2, 2, 45, 16, torch.float32, seed=13, sharp=2.0)
    for mode in MODES:
        basis = make_basis(2, 16) if mode == "lowrank" else None
        kw = dict(mode=mode, basis=basis, d_r=3 if mode == "lowrank" else None, sink_tokens=4, return_argmax=True)
        # Low rank with a Gram takes the whole-ε path (evaluation runs through V·P_r): both sides ask for it there,
        # so the comparison is of top1_prob and the sink mass alone (test_lowrank_vp.py checks the two paths).
        a = residual_attention_triton(q, k, v, **kw, return_gram=mode == "lowrank")
        b = residual_attention_triton(q, k, v, **kw, return_gram=True, return_top1_prob=True, return_sink_mass=True)
        assert torch.equal(a.out, b.out) and torch.equal(a.argmax, b.argmax), mode


def record_launch_kwargs(monkeypatch) -> list[dict]:
    """The keyword arguments (compile-time constants included) of every launch of the kernel from now on."""
    launches = []
    real = ra_mod._residual_attn_fwd

    class Spy:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                launches.append(kwargs)
                return real[grid](*args, **kwargs)
            return launch

    monkeypatch.setattr(ra_mod, "_residual_attn_fwd", Spy())
    monkeypatch.setattr(ra_mod, "interpreter_active", lambda: True)  # it inspects the (now wrapped) kernel
    return launches


def test_sink_one_compiled_variant_for_every_n(monkeypatch):
    """sink_tokens is a runtime argument (not specialized): every n >= 1 launches the same compile-time
    constants, so one compiled kernel serves n = 1, 4, 16, 37; n = 0 compiles the kernel without sink code."""
    real = ra_mod._residual_attn_fwd
    launches = record_launch_kwargs(monkeypatch)
    q, k, v = rand_qkv(1, 2, 40, 16, torch.float32, seed=5)
    for n in (0, 1, 4, 16, 37):
        residual_attention_triton(q, k, v, mode="lowrank", basis=make_basis(2, 16), d_r=3, sink_tokens=n,
                                  return_sink_mass=True)
    assert launches[0]["HAS_SINK"] is False and all(kw["HAS_SINK"] is True for kw in launches[1:])
    # The compile-time constants and scalars (tensors such as the V·P_r product are new per call).
    constants = [{key: val for key, val in kw.items() if not isinstance(val, torch.Tensor) and key != "n_sink"}
                 for kw in launches]
    assert all(c == constants[1] for c in constants[1:])
    dns = real.kwargs["do_not_specialize"] if hasattr(real, "kwargs") else real.do_not_specialize
    assert "n_sink" in dns


@pytest.mark.parametrize("bad,exc,match", [
    (True, TypeError, "^sink_tokens must be an int, got bool$"),
    (1.0, TypeError, "^sink_tokens must be an int, got float$"),
    (-1, ValueError, "^sink_tokens must be >= 0"),
])
def test_sink_tokens_errors(bad, exc, match):
    q, k, v = rand_qkv(1, 1, 4, 16, torch.float32)
    with pytest.raises(exc, match=match):
        residual_attention_triton(q, k, v, mode="full", sink_tokens=bad)


# --------------------------------------------------------------------------- #
# MLA widths (v narrower or wider than q/k) and the learned sink (issue 27): against float64 and the reference
# --------------------------------------------------------------------------- #
def mla_qkv(B, Hq, Hkv, T, Dqk, Dv, dtype, seed=0, sharp=2.0):
    """q [B, Hq, T, Dqk], k [B, Hkv, T, Dqk], v [B, Hkv, T, Dv]."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, T, Dqk, generator=g) * sharp
    k = torch.randn(B, Hkv, T, Dqk, generator=g)
    v = torch.randn(B, Hkv, T, Dv, generator=g)
    return [t.to(device=DEV, dtype=dtype) for t in (q, k, v)]


def sink_logits(Hq, seed=0):
    """One logit per query head over the scores' range: the learned sink takes a few % to most of a row."""
    g = torch.Generator().manual_seed(100 + seed)
    return (torch.randn(Hq, generator=g) * 2.0 + 1.0).to(DEV)


# (B, Hq, Hkv, T, Dqk, Dv, dtype, window, softcap, out_layout, min_clear); BLOCK_M=32, BLOCK_N=16 here.
MLA_GEOMETRIES = {
    "mla-32-16": (1, 2, 2, 40, 32, 16, torch.float32, None, None, "bhtd", 0.9),
    "mla-48-32-gqa-fp16": (2, 4, 2, 40, 48, 32, torch.float16, None, None, "bhtd", 0.9),
    "mla-16-48-wider-v-bthd": (1, 2, 1, 40, 16, 48, torch.float32, None, None, "bthd", 0.9),
    "mla-64-32-window-softcap": (1, 2, 1, 50, 64, 32, torch.float32, 9, 20.0, "bhtd", 0.8),
    "mla-192-128": (1, 2, 1, 33, 192, 128, torch.float32, None, None, "bhtd", 0.9),
}


@pytest.mark.parametrize("n,learned", [(0, False), (0, True), (3, True), (3, False)])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("geometry", list(MLA_GEOMETRIES))
def test_mla_and_learned_sink(geometry, mode, n, learned):
    B, Hq, Hkv, T, Dqk, Dv, dtype, window, softcap, layout, min_clear = MLA_GEOMETRIES[geometry]
    q, k, v = mla_qkv(B, Hq, Hkv, T, Dqk, Dv, dtype, seed=Dqk + Dv + n)
    basis = make_basis(Hq, Dv) if mode == "lowrank" else None
    d_r = min(Dv, 20) if mode == "lowrank" else None
    sink = sink_logits(Hq, seed=n) if learned else None
    res, _ = run_sink(q, k, v, mode, n, d_r=d_r, basis=basis, out_layout=layout, min_clear=min_clear,
                      sliding_window=window, softcap=softcap, learned_sink=sink)
    shape = (B, Hq, T, Dv) if layout == "bhtd" else (B, T, Hq, Dv)
    assert res.out.shape == shape and res.gram.shape == (Hq, Dv, Dv)
    if learned:
        assert float(res.sink_mass[..., n:].mean()) > 0.02  # the sink takes real mass on these inputs
    if Hkv < Hq:  # grouped heads read their kv head in place: the same as MHA on repeated K/V
        rep = [t.repeat_interleave(Hq // Hkv, dim=1) for t in (k, v)]
        # With the Gram as run_sink asked it: low rank then takes the same (whole-ε) path on both.
        mha = residual_attention_triton(q, *rep, mode=mode, basis=basis, d_r=d_r, sink_tokens=n, learned_sink=sink,
                                        return_argmax=True, return_top1_prob=True, return_sink_mass=True,
                                        out_layout=layout, sliding_window=window, softcap=softcap, return_gram=True)
        for name in ("out", "argmax", "top1_prob", "sink_mass"):
            assert torch.equal(getattr(res, name), getattr(mha, name)), name


@pytest.mark.parametrize("n", [0, 4])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("geometry", list(SINK_GEOMETRIES))
def test_learned_sink_gqa_window_softcap_padded(geometry, mode, n):
    """The learned sink over the sink_tokens grid: GQA, windows (the sink keys leave the view, the learned sink
    never does), soft caps, padded widths, bf16; with and without sink_tokens."""
    B, Hq, Hkv, T, D, dtype, window, softcap, layout, min_clear = SINK_GEOMETRIES[geometry]
    q, k, v = rand_qkv(B, Hq, T, D, dtype, seed=D + T + n + 1, Hkv=Hkv, sharp=2.0)
    basis = make_basis(Hq, D) if mode == "lowrank" else None
    d_r = min(D, 20) if mode == "lowrank" else None
    sink = sink_logits(Hq, seed=D + n)
    res, _ = run_sink(q, k, v, mode, n, d_r=d_r, basis=basis, out_layout=layout, min_clear=min_clear,
                      sliding_window=window, softcap=softcap, learned_sink=sink)
    assert bool((res.sink_mass > 0).all())  # every row sees the learned sink


def row_sink_logits(B, Hq, T, seed=0):
    """One logit per query row (Inkling 2's sink_proj of the row's hidden state), over the scores' range."""
    g = torch.Generator().manual_seed(200 + seed)
    return (torch.randn(B, Hq, T, generator=g) * 2.0 + 1.0).to(DEV)


@pytest.mark.parametrize("n", [0, 3])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("geometry", ["gqa-fp16", "mqa-window-5", "softcap-window", "padded-80-bthd"])
def test_learned_sink_per_row(geometry, mode, n):
    """A learned sink logit per query row [B, Hq, T] (Inkling 2) against float64, GQA / window / softcap / padded."""
    B, Hq, Hkv, T, D, dtype, window, softcap, layout, min_clear = SINK_GEOMETRIES[geometry]
    q, k, v = rand_qkv(B, Hq, T, D, dtype, seed=D + T + n + 5, Hkv=Hkv, sharp=2.0)
    basis = make_basis(Hq, D) if mode == "lowrank" else None
    d_r = min(D, 20) if mode == "lowrank" else None
    sink = row_sink_logits(B, Hq, T, seed=D + n)
    res, _ = run_sink(q, k, v, mode, n, d_r=d_r, basis=basis, out_layout=layout, min_clear=min_clear,
                      sliding_window=window, softcap=softcap, learned_sink=sink)
    assert bool((res.sink_mass > 0).all())
    # A head's logit given per row is the per-head sink, bit for bit (the same kernel reads it with row stride 0).
    per_head = sink_logits(Hq, seed=n)
    kw = dict(mode=mode, basis=basis, d_r=d_r, sink_tokens=n, sliding_window=window, softcap=softcap,
              return_argmax=True, return_top1_prob=True, return_sink_mass=True, return_gram=True, out_layout=layout)
    a = residual_attention_triton(q, k, v, learned_sink=per_head, **kw)
    b = residual_attention_triton(q, k, v, learned_sink=per_head[None, :, None].expand(B, Hq, T), **kw)
    for name in ("out", "argmax", "top1_prob", "sink_mass", "gram"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name


def test_learned_sink_per_row_full_mode_is_inkling2_attention():
    """Full mode with per-row sinks is transformers' Inkling 2 eager attention (sinks [B, Hq, T, 1])."""
    from transformers.models.inkling2.modeling_inkling2 import eager_attention_forward

    B, Hq, Hkv, T, D = 2, 4, 2, 40, 16
    q, k, v = rand_qkv(B, Hq, T, D, torch.float32, seed=6, Hkv=Hkv, sharp=2.0)
    module = torch.nn.Module()
    module.num_key_value_groups, module.training = Hq // Hkv, False
    sink = row_sink_logits(B, Hq, T)
    mask = torch.full((T, T), float("-inf")).triu(1).double()
    want, _ = eager_attention_forward(module, *(t.double().cpu() for t in (q, k, v)), mask, D**-0.5,
                                      sinks=sink.double().cpu().unsqueeze(-1))
    full = residual_attention_triton(q, k, v, mode="full", learned_sink=sink).out
    torch.testing.assert_close(full.double().cpu(), want.transpose(1, 2), **TOL[torch.float32])


def test_learned_sink_per_row_non_finite_logit():
    """A NaN or +inf logit on one row makes that row non-finite, no other."""
    q, k, v = rand_qkv(1, 2, 30, 16, torch.float32, seed=8, Hkv=1, sharp=2.0)
    sink = row_sink_logits(1, 2, 30)
    sink[0, 0, 7], sink[0, 1, 20] = float("nan"), float("inf")
    bad = torch.zeros(1, 2, 30, dtype=torch.bool, device=DEV)
    bad[0, 0, 7] = bad[0, 1, 20] = True
    for mode in MODES:
        basis = make_basis(2, 16) if mode == "lowrank" else None
        res, _ = run_sink(q, k, v, mode, 2, d_r=4 if mode == "lowrank" else None, basis=basis, learned_sink=sink)
        assert torch.equal(torch.isnan(res.out).all(-1), bad) and torch.equal(torch.isnan(res.out).any(-1), bad)
        assert torch.equal(res.argmax == -1, bad)


@pytest.mark.parametrize("block_m,block_n", [(16, 16), (64, 16), (32, 32)])
def test_learned_sink_and_mla_other_tilings(monkeypatch, block_m, block_n):
    monkeypatch.setattr(
        launch_mod, "pick_config",
        lambda *a, **k: dict(BLOCK_M=block_m, BLOCK_N=block_n, num_warps=4, num_stages=2),
    )
    q, k, v = mla_qkv(1, 2, 1, 70, 32, 16, torch.float32, seed=block_m + block_n)
    sink = sink_logits(2, seed=block_m)
    run_sink(q, k, v, "lowrank", 17, d_r=5, basis=make_basis(2, 16), learned_sink=sink)
    run_sink(q, k, v, "top1", 0, return_gram=False, sliding_window=20, learned_sink=sink)


def test_learned_sink_full_mode_is_gpt_oss_attention():
    """Full mode with a learned sink is transformers' gpt-oss eager attention (sink column softmaxed, dropped)."""
    from transformers.models.gpt_oss.modeling_gpt_oss import eager_attention_forward

    Hq, Hkv, T, D = 4, 2, 40, 16
    q, k, v = rand_qkv(2, Hq, T, D, torch.float32, seed=4, Hkv=Hkv, sharp=2.0)
    module = torch.nn.Module()
    module.sinks = sink_logits(Hq).cpu()
    module.num_key_value_groups = Hq // Hkv
    mask = torch.full((T, T), float("-inf")).triu(1).double()
    want, _ = eager_attention_forward(module, *(t.double().cpu() for t in (q, k, v)), mask, D**-0.5)
    full = residual_attention_triton(q, k, v, mode="full", learned_sink=module.sinks.to(DEV)).out
    torch.testing.assert_close(full.double().cpu(), want.transpose(1, 2), **TOL[torch.float32])


def test_learned_sink_non_finite_logits():
    """A NaN or +inf logit makes its head's rows non-finite (as the reference); the other heads are computed."""
    q, k, v = rand_qkv(1, 4, 30, 16, torch.float32, seed=3, Hkv=2, sharp=2.0)
    sink = sink_logits(4)
    sink[1], sink[2] = float("nan"), float("inf")
    for mode in MODES:
        for n in (0, 3):
            basis = make_basis(4, 16) if mode == "lowrank" else None
            res, _ = run_sink(q, k, v, mode, n, d_r=4 if mode == "lowrank" else None, basis=basis,
                              learned_sink=sink)
            bad = torch.zeros(1, 4, 30, dtype=torch.bool, device=DEV)
            bad[:, 1:3] = True
            assert torch.equal(torch.isnan(res.out).all(-1), bad) and torch.equal(torch.isnan(res.out).any(-1), bad)
            assert torch.equal(res.argmax == -1, bad) and torch.equal(torch.isnan(res.sink_mass), bad)


def test_learned_sink_requests_change_no_output():
    """Asking for the Gram, top1_prob or the sink mass changes neither the output nor the argmax."""
    q, k, v = mla_qkv(2, 2, 1, 45, 32, 16, torch.float32, seed=13)
    sink = sink_logits(2)
    for n in (0, 4):
        for mode in MODES:
            basis = make_basis(2, 16) if mode == "lowrank" else None
            kw = dict(mode=mode, basis=basis, d_r=3 if mode == "lowrank" else None, sink_tokens=n,
                      learned_sink=sink, return_argmax=True)
            # Low rank with a Gram takes the whole-ε path: both sides ask for it there (see above).
            a = residual_attention_triton(q, k, v, **kw, return_gram=mode == "lowrank")
            b = residual_attention_triton(q, k, v, **kw, return_gram=True, return_top1_prob=True,
                                          return_sink_mass=True)
            assert torch.equal(a.out, b.out) and torch.equal(a.argmax, b.argmax), mode


@pytest.mark.parametrize("Dqk,Dv", [(24, 16), (16, 24), (16, 272)])
def test_error_bad_value_width(Dqk, Dv):
    q, k, _ = _qkv(D=Dqk)
    v = torch.randn(1, 2, 8, Dv, device=DEV)
    bad = Dqk if Dqk % 16 else Dv
    with pytest.raises(ValueError, match=f"head dims that are multiples of 16 up to 256, got D={bad}"):
        residual_attention_triton(q, k, v, mode="full")


# --------------------------------------------------------------------------- #
# Every launch runs under the tensors' device (issue 21): Triton launches on the *current* CUDA device
# --------------------------------------------------------------------------- #
def test_launch_runs_under_the_tensors_device(monkeypatch):
    import contextlib

    entered = []

    class Recorder:  # stands in for torch.cuda.device: records which device the launcher selects
        def __init__(self, device):
            self.device = torch.device(device)

        def __enter__(self):
            entered.append(("enter", self.device))

        def __exit__(self, *exc):
            entered.append(("exit", self.device))
            return False

    with monkeypatch.context() as m:
        m.setattr(torch.cuda, "device", Recorder)
        with ra_mod._launch_device(torch.device("cuda", 1)):
            entered.append(("inside", None))
        assert entered == [("enter", torch.device("cuda", 1)), ("inside", None), ("exit", torch.device("cuda", 1))]
        entered.clear()
        with ra_mod._launch_device(torch.device("cpu")):  # the interpreter: nothing of CUDA is touched
            pass
        assert entered == []

    # The launcher builds the guard from q's device and launches every chunk inside it.
    real_guard, real_kernel = ra_mod._launch_device, ra_mod._residual_attn_fwd
    guards, inside_at_launch = [], []
    state = {"inside": False}

    @contextlib.contextmanager
    def spy_guard(device):
        guards.append(device)
        with real_guard(device):
            state["inside"] = True
            try:
                yield
            finally:
                state["inside"] = False

    class Spy:
        def __getitem__(self, grid):
            inside_at_launch.append(state["inside"])
            return real_kernel[grid]

    monkeypatch.setattr(ra_mod, "_launch_device", spy_guard)
    monkeypatch.setattr(ra_mod, "_residual_attn_fwd", Spy())
    monkeypatch.setattr(ra_mod, "interpreter_active", lambda: True)
    monkeypatch.setattr(ra_mod, "MAX_GRID_Y", 3)  # 4 (b, h) pairs: two launches
    q, k, v = rand_qkv(2, 2, 20, 16, torch.float32, seed=9)
    res = residual_attention_triton(q, k, v, mode="full", return_argmax=True)
    assert guards == [q.device] and inside_at_launch == [True, True]
    check_against_plain(res, q, k, v, "full")


# --------------------------------------------------------------------------- #
# Non-finite rows (run in a subprocess: an out-of-range load would crash the interpreter, not fail a test)
# --------------------------------------------------------------------------- #
_NAN_SCRIPT = """
import sys, torch
from nqpq_kernels import residual_attention_triton
cases = torch.load(sys.argv[1])
results = {}
for name, case in cases.items():
    case = dict(case)
    q, k, v = (case.pop(x).to(sys.argv[3]) for x in "qkv")
    if case.get("basis") is not None:
        case["basis"] = case["basis"].to(sys.argv[3])
    res = residual_attention_triton(q, k, v, return_argmax=True, return_gram=True, return_top1_prob=True,
                                    return_sink_mass=True, **case)
    results[name] = tuple(None if t is None else t.cpu() for t in res)
torch.save(results, sys.argv[2])
"""


def _nan_cases():
    cases = {}
    q, k, v = rand_qkv(1, 2, 40, 16, torch.float32, seed=2, Hkv=1, sharp=2.0)
    q[0, 1, 7, 3] = float("nan")  # one query row
    q[0, 0, 33, :] = float("nan")  # a whole query row (in the second query block)
    k[0, 0, 12, 0] = float("nan")  # one key: every row that sees it
    for mode in MODES:
        for window in (None, 4, 20):
            cases[f"nan-{mode}-{window}"] = dict(
                q=q, k=k, v=v, mode=mode, sliding_window=window, softcap=5.0 if window == 20 else None,
                basis=make_basis(2, 16) if mode == "lowrank" else None, d_r=4 if mode == "lowrank" else None)
    g = torch.Generator().manual_seed(4)
    q16, k16 = ((torch.randn(1, 2, 24, 16, generator=g) * 0.4 * 6e4).half() for _ in range(2))
    v16 = torch.randn(1, 2, 24, 16, generator=g).half()
    for mode in MODES:
        cases[f"overflow-{mode}"] = dict(q=q16, k=k16, v=v16, mode=mode, basis=make_basis(2, 16) if mode == "lowrank"
                                         else None, d_r=4 if mode == "lowrank" else None)
    all_big = [(torch.randn(1, 2, 24, 16, generator=g) * 6e4).half() for _ in range(3)]
    cases["overflow-all"] = dict(q=all_big[0], k=all_big[1], v=all_big[2], mode="full")
    qi, ki, vi = rand_qkv(1, 1, 6, 16, torch.float32, seed=4, sharp=3.0)
    qi[0, 0, 3, 0] = 1e30
    ki[0, 0, :, 0] = torch.tensor([-1e30, 0.0, -1e30, 0.0, 0.0, 0.0])  # row 3: -inf scores next to finite ones
    qi[0, 0, 5, 0] = 1e30
    ki[0, 0, 5, 0] = 1e30  # row 5: +inf
    cases["inf-full"] = dict(q=qi, k=ki, v=vi, mode="full")
    # The sink: NaN rows as above, with n = 1 and 4; a NaN key inside the sink (key 2, window 4: rows 2..5);
    # fp16 overflow with n = 4.
    k_sink = k.clone()
    k_sink[0, 0, 2, 5] = float("nan")
    for mode in MODES:
        lowrank = dict(basis=make_basis(2, 16) if mode == "lowrank" else None, d_r=4 if mode == "lowrank" else None)
        for n in (1, 4):
            for window in (None, 4, 20):
                cases[f"sink-nan-{mode}-{window}-{n}"] = dict(
                    q=q, k=k, v=v, mode=mode, sliding_window=window, softcap=5.0 if window == 20 else None,
                    sink_tokens=n, **lowrank)
        cases[f"sink-nankey-{mode}"] = dict(q=q, k=k_sink, v=v, mode=mode, sliding_window=4, softcap=None,
                                            sink_tokens=4, **lowrank)
        cases[f"sink-overflow-{mode}"] = dict(q=q16, k=k16, v=v16, mode=mode, sliding_window=None, softcap=None,
                                              sink_tokens=4, **lowrank)
    return {name: {key: (val.cpu() if isinstance(val, torch.Tensor) else val) for key, val in case.items()}
            for name, case in cases.items()}


@pytest.fixture(scope="module")
def nan_results(tmp_path_factory):
    import subprocess
    import sys

    tmp = tmp_path_factory.mktemp("nan")
    cases = _nan_cases()
    torch.save(cases, tmp / "cases.pt")
    env = dict(os.environ, TRITON_INTERPRET="1" if DEV == "cpu" else os.environ.get("TRITON_INTERPRET", "0"))
    proc = subprocess.run([sys.executable, "-c", _NAN_SCRIPT, str(tmp / "cases.pt"), str(tmp / "out.pt"), DEV],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"kernel process died (rc {proc.returncode}): {proc.stderr[-2000:]}"
    return cases, torch.load(tmp / "out.pt")


def test_nan_rows_only_those_rows(nan_results):
    cases, results = nan_results
    for name in (n for n in cases if n.startswith("nan-")):
        case = dict(cases[name])
        q, k, v = case.pop("q"), case.pop("k"), case.pop("v")
        res = ResidualAttentionResult(*results[name])
        window = case["sliding_window"]
        bad = torch.zeros(1, 2, 40, dtype=torch.bool)
        bad[0, 1, 7] = bad[0, 0, 33] = True
        bad[0, :, 12: (40 if window is None else 12 + window)] = True
        assert torch.equal(torch.isnan(res.out).all(-1), bad) and torch.equal(torch.isnan(res.out).any(-1), bad)
        assert torch.equal(res.argmax == -1, bad) and torch.equal(torch.isnan(res.top1_prob), bad), name
        assert bool(torch.isnan(res.gram).all())  # both heads hold a NaN row
        ref = residual_attention_reference(q, k, v, return_argmax=True, return_gram=True, return_top1_prob=True,
                                           **case)
        assert torch.equal(ref.argmax == -1, bad)
        check_against_plain(res, q, k, v, case["mode"], case["basis"], case["d_r"], sliding_window=window,
                            softcap=case["softcap"])


def test_overflow_and_infinite_scores(nan_results):
    """fp16 inputs beyond 65504 (±inf): no crash, and the same non-finite rows as the reference and float64."""
    cases, results = nan_results
    for name in (n for n in cases if n.startswith(("overflow-", "inf-"))):
        case = dict(cases[name])
        q, k, v = case.pop("q"), case.pop("k"), case.pop("v")
        res = ResidualAttentionResult(*results[name])
        ref = residual_attention_reference(q, k, v, return_argmax=True, return_gram=True, return_top1_prob=True,
                                           **case)
        T = q.shape[2]
        assert bool((res.argmax >= -1).all()) and bool((res.argmax < T).all())
        assert torch.equal(res.argmax == -1, ref.argmax == -1), name
        assert torch.equal(torch.isnan(res.out).any(-1), ref.argmax == -1), name
        same = res.argmax == ref.argmax
        torch.testing.assert_close(res.out[same].float(), ref.out[same].float(), equal_nan=True,
                                   **TOL[q.dtype])
        torch.testing.assert_close(res.top1_prob, ref.top1_prob, atol=2e-6, rtol=2e-5, equal_nan=True)
        if name == "overflow-all":
            assert bool((res.argmax == -1).all())
        elif name == "inf-full":  # 1e30·1e30 overflows fp32 only: float64 would not agree, check by hand
            assert (res.argmax[0, 0] == -1).tolist() == [False] * 5 + [True] and int(res.argmax[0, 0, 3]) in (1, 3)
        else:
            bad = check_against_plain(res, q, k, v, case["mode"], case.get("basis"), case.get("d_r"),
                                      min_clear=0).bad
            assert 0 < int(bad.sum()) < bad.numel()


def test_sink_nan_and_overflow_rows(nan_results):
    """With a sink: exactly the non-finite rows are NaN (out, top1_prob, sink_mass) with argmax -1, a NaN key
    inside the sink poisons only the rows that see it, and every other row matches float64."""
    cases, results = nan_results
    names = [n for n in cases if n.startswith("sink-")]
    assert len(names) == 24
    for name in names:
        case = dict(cases[name])
        q, k, v = case.pop("q"), case.pop("k"), case.pop("v")
        res = ResidualAttentionResult(*results[name])
        window = case["sliding_window"]
        if name.startswith("sink-nan-"):
            bad = torch.zeros(1, 2, 40, dtype=torch.bool)
            bad[0, 1, 7] = bad[0, 0, 33] = True
            bad[0, :, 12: (40 if window is None else 12 + window)] = True
        elif name.startswith("sink-nankey-"):
            bad = torch.zeros(1, 2, 40, dtype=torch.bool)
            bad[0, 1, 7] = bad[0, 0, 33] = True
            bad[0, :, 12:16] = True
            bad[0, :, 2:6] = True  # the rows that see key 2 through the window of 4
        else:
            bad = None
        if bad is not None:
            assert torch.equal(torch.isnan(res.out).any(-1), bad) and torch.equal(torch.isnan(res.out).all(-1), bad)
            assert torch.equal(res.argmax == -1, bad), name
            assert torch.equal(torch.isnan(res.top1_prob), bad) and torch.equal(torch.isnan(res.sink_mass), bad)
        ref = residual_attention_reference(q, k, v, return_argmax=True, return_gram=True, return_top1_prob=True,
                                           return_sink_mass=True, **case)
        assert torch.equal(ref.argmax == -1, res.argmax == -1), name
        assert torch.equal(torch.isnan(ref.sink_mass), torch.isnan(res.sink_mass)), name
        first = check_sink_against_f64(res, q, k, v, case["mode"], case["basis"], case["d_r"],
                                       sliding_window=window, softcap=case["softcap"],
                                       sink_tokens=case["sink_tokens"], min_clear=0 if bad is None else 0.9)
        if bad is None:
            assert 0 < int(first.bad.sum()) < first.bad.numel(), name


# --------------------------------------------------------------------------- #
# Launch chunking over CUDA's grid-y limit, and the on-device Gram reduction
# --------------------------------------------------------------------------- #
def test_grid_chunking_same_results(monkeypatch):
    """B·Hq above the grid-y limit is launched in chunks: identical outputs (the Gram up to fp32 sum order)."""
    q, k, v = rand_qkv(3, 4, 40, 16, torch.float32, seed=21, Hkv=2)
    basis = make_basis(4, 16)
    kw = dict(mode="lowrank", basis=basis, d_r=5, return_argmax=True, return_gram=True, return_top1_prob=True)
    whole = residual_attention_triton(q, k, v, **kw)
    launches = []
    real = ra_mod._residual_attn_fwd

    class Spy:
        def __getitem__(self, grid):
            launches.append(grid)
            return real[grid]

    monkeypatch.setattr(ra_mod, "_residual_attn_fwd", Spy())
    monkeypatch.setattr(ra_mod, "interpreter_active", lambda: True)  # it inspects the (now wrapped) kernel
    monkeypatch.setattr(ra_mod, "MAX_GRID_Y", 5)  # 12 (b, h) pairs: chunks of 5, 5, 2
    chunked = residual_attention_triton(q, k, v, **kw)
    assert [g[1] for g in launches] == [5, 5, 2]
    for name in ("out", "argmax", "top1_prob"):
        assert torch.equal(getattr(chunked, name), getattr(whole, name)), name
    # fp32 partial sums in another order: rounding of the order of eps·Σ|terms|, relative to the largest entry.
    torch.testing.assert_close(chunked.gram, whole.gram, rtol=1e-5, atol=1e-6 * float(whole.gram.abs().max()))
    check_against_plain(chunked, q, k, v, "lowrank", basis, 5)


def test_gram_reduced_on_device_no_per_block_buffer():
    """The Gram is summed into one fp32 [Hq, D, D] buffer: no [B·Hq·n_blocks, D, D] allocation, no copy of it."""
    from torch.overrides import TorchFunctionMode

    B, H, T, D = 3, 2, 100, 16  # 4 query blocks of 32 per (b, h)
    q, k, v = rand_qkv(B, H, T, D, torch.float32, seed=22)
    allocated = []

    class Sizes(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if isinstance(out, torch.Tensor) and func in (torch.empty, torch.zeros, torch.Tensor.double,
                                                          torch.Tensor.sum, torch.Tensor.to):
                allocated.append(out.numel())
            return out

    with Sizes():
        res = residual_attention_triton(q, k, v, mode="top1", return_gram=True)
    assert H * D * D in allocated
    assert max(allocated) <= max(B * H * T * D, H * D * D), allocated  # the output, the [Hq, D, D] Gram
    check_against_plain(res, q, k, v, "top1")


# --------------------------------------------------------------------------- #
# Clear errors
# --------------------------------------------------------------------------- #
def _qkv(B=1, H=2, T=8, D=16, dtype=torch.float32):
    return rand_qkv(B, H, T, D, dtype)


def test_error_cpu_without_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q, k, v = (t.cpu() for t in _qkv())
    with pytest.raises(RuntimeError, match="needs CUDA.*TRITON_INTERPRET=1"):
        residual_attention_triton(q, k, v, mode="full")


@pytest.mark.parametrize("D", [8, 24, 100, 272])
def test_error_bad_head_dim(D):
    q, k, v = _qkv(D=D)
    with pytest.raises(ValueError, match=f"head dims that are multiples of 16 up to 256, got D={D}"):
        residual_attention_triton(q, k, v, mode="full")


def test_last_dim_strided_input_is_copied():
    """stride(-1) != 1 (which the kernel's loads cannot read in place): a contiguous copy, same numbers."""
    q, k, v = _qkv(D=32)
    q2 = q.repeat_interleave(2, dim=-1)[..., ::2]  # [.., 32], stride(-1) == 2
    v2 = v.repeat_interleave(2, dim=-1)[..., ::2]
    assert q2.stride(-1) == 2 and torch.equal(q2, q)
    for mode in MODES:
        basis = make_basis(2, 32) if mode == "lowrank" else None
        d_r = 3 if mode == "lowrank" else None
        a = residual_attention_triton(q2, k, v2, mode=mode, basis=basis, d_r=d_r, return_argmax=True)
        b = residual_attention_triton(q, k, v, mode=mode, basis=basis, d_r=d_r, return_argmax=True)
        assert torch.equal(a.out, b.out) and torch.equal(a.argmax, b.argmax)


def test_error_basis_shape():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="basis must be"):
        residual_attention_triton(q, k, v, mode="lowrank", basis=torch.zeros(3, 16, 16, device=DEV), d_r=2)
    with pytest.raises(ValueError, match="fewer than d_r"):
        residual_attention_triton(q, k, v, mode="lowrank", basis=torch.zeros(2, 16, 2, device=DEV), d_r=4)


def test_error_d_r_and_mode_and_layout():
    q, k, v = _qkv()
    basis = torch.zeros(2, 16, 16, device=DEV)
    with pytest.raises(ValueError, match="d_r must be in 0..D"):
        residual_attention_triton(q, k, v, mode="lowrank", basis=basis, d_r=17)
    with pytest.raises(ValueError, match="needs d_r"):
        residual_attention_triton(q, k, v, mode="lowrank", basis=basis)
    with pytest.raises(ValueError, match="mode must be one of"):
        residual_attention_triton(q, k, v, mode="top2")
    with pytest.raises(ValueError, match="out_layout"):
        residual_attention_triton(q, k, v, mode="full", out_layout="tbhd")
    with pytest.raises(ValueError, match=r"^out_layout must be one of .*, got Tensor\(1000,\) torch.float32$"):
        residual_attention_triton(q, k, v, mode="full", out_layout=torch.zeros(1000))  # its type, not its repr
    with pytest.raises(TypeError, match="dtype"):
        residual_attention_triton(q.double(), k.double(), v.double(), mode="full")


def test_error_bad_out_buffer():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="out must be"):
        residual_attention_triton(q, k, v, mode="full", out=torch.empty(1, 2, 8, 16, dtype=torch.float16,
                                                                         device=DEV))


# --------------------------------------------------------------------------- #
# GPU (compiled kernel) checks
# --------------------------------------------------------------------------- #
def _gpu_check(B, Hq, Hkv, T, D, dtype, mode, window=None, softcap=None, seed=0):
    """Compiled kernel vs the fp32 reference on the same (upcast) inputs, on the GPU.

    argmax: exact on rows whose fp32 top-2 score gap exceeds 1e-3, a near-maximum elsewhere; outputs on rows
    with the same index; the Gram against Σ εεᵀ built with the kernel's own index; top1_prob everywhere.
    """
    g = torch.Generator(device="cuda").manual_seed(seed + T + D)
    q = torch.randn(B, Hq, T, D, device="cuda", generator=g).to(dtype)
    k, v = (torch.randn(B, Hkv, T, D, device="cuda", generator=g).to(dtype) for _ in range(2))
    basis = torch.linalg.qr(torch.randn(Hq, D, D, device="cuda", generator=g))[0] if mode == "lowrank" else None
    d_r = D // 4 if mode == "lowrank" else None
    opts = dict(sliding_window=window, softcap=softcap)
    res = residual_attention_triton(q, k, v, mode=mode, basis=basis, d_r=d_r, return_argmax=True,
                                    return_gram=True, return_top1_prob=True, **opts)
    torch.cuda.synchronize()
    qf, kf, vf = q.float(), k.float(), v.float()
    ref = residual_attention_reference(qf, kf, vf, mode=mode, basis=basis, d_r=d_r, return_argmax=True,
                                       return_top1_prob=True, **opts)
    assert not torch.isnan(res.out).any() and bool((res.argmax >= 0).all())
    # fp32 scores, as both backends see them.
    G = Hq // Hkv
    s = torch.matmul(qf, kf.repeat_interleave(G, 1).transpose(-1, -2)) * D**-0.5
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    i = torch.arange(T, device="cuda")
    visible = (i[None, :] <= i[:, None]) & (True if window is None else (i[None, :] > i[:, None] - window))
    s.masked_fill_(~visible, float("-inf"))
    top2 = s.topk(min(2, T), dim=-1).values
    gap = torch.where(torch.isfinite(top2[..., 1]), top2[..., 0] - top2[..., 1], torch.inf)
    clear = gap > 1e-3
    assert float(clear.float().mean()) > 0.5
    assert torch.equal(res.argmax[clear], ref.argmax[clear])
    s_at = s.gather(-1, res.argmax.unsqueeze(-1)).squeeze(-1)
    assert bool((s_at >= top2[..., 0] - 1e-3).all())
    del s
    rows = (res.argmax == ref.argmax) if mode != "full" else torch.ones_like(res.argmax, dtype=torch.bool)
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else TOL[dtype]
    torch.testing.assert_close(res.out[rows].float(), ref.out[rows], **tol)
    torch.testing.assert_close(res.top1_prob, ref.top1_prob, atol=1e-5, rtol=1e-4)
    # Gram with the kernel's own index, so near-tie rows where the two indices differ do not matter.
    ctx = residual_attention_reference(qf, kf, vf, mode="full", **opts).out
    v_rep = vf.repeat_interleave(G, 1)
    v_star = torch.gather(v_rep, 2, res.argmax.unsqueeze(-1).expand(B, Hq, T, D))
    eps = (ctx - v_star).double()
    exp_gram = torch.einsum("bhti,bhtj->hij", eps, eps)
    assert float((res.gram - exp_gram).abs().max() / exp_gram.abs().max()) < GRAM_RTOL[dtype] * 3


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("T", [256, 1024, 2048])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("mode", MODES)
def test_gpu_vs_reference(mode, dtype, T, D):
    _gpu_check(2, 4, 4, T, D, dtype, mode)


# (B, Hq, Hkv, T, D, window, softcap): Llama-3 GQA, MQA with a window, Gemma 2 (D 256, cap 50, window),
# Phi-2's D 80, Phi-3's D 96 with a window shorter than a tile.
GPU_GEOMETRIES = [
    (1, 8, 2, 1024, 128, None, None),
    (1, 4, 1, 1024, 64, 256, None),
    (1, 4, 2, 700, 256, 300, 50.0),
    (2, 4, 4, 512, 80, None, None),
    (1, 4, 2, 512, 96, 40, None),
]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("geometry", GPU_GEOMETRIES, ids=lambda g: "B{}-Hq{}-Hkv{}-T{}-D{}-w{}-c{}".format(*g))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("mode", MODES)
def test_gpu_gqa_window_softcap_head_dims(mode, dtype, geometry):
    B, Hq, Hkv, T, D, window, softcap = geometry
    _gpu_check(B, Hq, Hkv, T, D, dtype, mode, window=window, softcap=softcap)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_nan_and_overflow_rows(dtype):
    """Compiled kernel: NaN rows stay NaN (only those), argmax -1, no illegal access on overflow."""
    B, H, T, D = 1, 4, 300, 64
    q, k, v = (torch.randn(B, H, T, D, device="cuda", dtype=dtype) for _ in range(3))
    q[0, 1, 100, 5] = float("nan")
    k[0, 2, 200, 0] = float("nan")
    for mode in MODES:
        basis = torch.linalg.qr(torch.randn(H, D, D, device="cuda"))[0] if mode == "lowrank" else None
        kw = dict(mode=mode, basis=basis, d_r=8 if mode == "lowrank" else None, return_argmax=True,
                  return_top1_prob=True)
        res = residual_attention_triton(q, k, v, **kw)
        ref = residual_attention_reference(q.float(), k.float(), v.float(), **kw)
        torch.cuda.synchronize()
        bad = ref.argmax == -1
        assert int(bad.sum()) == 1 + 100 and torch.equal(res.argmax == -1, bad)
        assert torch.equal(torch.isnan(res.out).any(-1), bad) and torch.equal(torch.isnan(res.top1_prob), bad)
    big = [(t * 6e4).to(dtype) for t in (q.nan_to_num(), k.nan_to_num())]  # fp16 overflows to ±inf
    res = residual_attention_triton(*big, v, mode="top1", return_argmax=True)
    ref = residual_attention_reference(*(t.float() for t in big), v.float(), mode="top1", return_argmax=True)
    torch.cuda.synchronize()
    assert torch.equal(res.argmax == -1, ref.argmax == -1) and bool((res.argmax < T).all())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_packed_bthd(dtype):
    B, H, T, D = 2, 4, 1000, 64
    qkv = torch.randn(B, T, 3 * H * D, device="cuda", dtype=dtype)
    q, k, v = (t.view(B, T, H, D).transpose(1, 2) for t in qkv.split(H * D, dim=-1))
    basis = torch.linalg.qr(torch.randn(H, D, D, device="cuda"))[0]
    poisoned = torch.full((B, T, H, D), float("nan"), device="cuda", dtype=dtype)
    out, idx, _, _, _ = residual_attention_triton(
        q, k, v, mode="lowrank", basis=basis, d_r=8, return_argmax=True, out_layout="bthd", out=poisoned
    )
    r_out, r_idx, _, _, _ = residual_attention_reference(
        q.float(), k.float(), v.float(), mode="lowrank", basis=basis, d_r=8, return_argmax=True,
        out_layout="bthd",
    )
    assert not torch.isnan(out).any()
    rows = (idx == r_idx).transpose(1, 2)
    torch.testing.assert_close(out[rows].float(), r_out[rows], **TOL[dtype])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_grid_y_chunks():
    """B·Hq beyond CUDA's 65535 grid-y limit (GPT-2 small at T=64 with 5.6k blocks) runs, chunked."""
    B, H, T, D = 5600, 12, 64, 64
    q, k, v = (torch.randn(B, H, T, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    res = residual_attention_triton(q, k, v, mode="top1", return_argmax=True, return_gram=True)
    ref = residual_attention_reference(q[-2:].float(), k[-2:].float(), v[-2:].float(), mode="top1",
                                       return_argmax=True)
    torch.cuda.synchronize()
    assert float((res.argmax[-2:] == ref.argmax).float().mean()) > 0.99  # the last chunk ran
    assert bool(torch.isfinite(res.gram).all())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("n", [1, 4, 16])
@pytest.mark.parametrize("geometry", [(2, 4, 4, 1024, 64, None, None), (1, 8, 2, 1024, 128, 256, None),
                                      (1, 4, 2, 700, 256, 300, 50.0), (1, 4, 2, 512, 96, 40, None)],
                         ids=lambda g: "B{}-Hq{}-Hkv{}-T{}-D{}-w{}-c{}".format(*g))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("mode", MODES)
def test_gpu_sink_vs_reference(mode, dtype, geometry, n):
    """Compiled kernel with sink_tokens=n vs the fp32 reference on the same (upcast) inputs: argmax exact on rows
    whose fp32 top-2 gap over R exceeds 1e-3, outputs and top1_prob on rows with the same index, sink mass on
    every row."""
    B, Hq, Hkv, T, D, window, softcap = geometry
    g = torch.Generator(device="cuda").manual_seed(T + D + n)
    q = torch.randn(B, Hq, T, D, device="cuda", generator=g).to(dtype)
    k, v = (torch.randn(B, Hkv, T, D, device="cuda", generator=g).to(dtype) for _ in range(2))
    basis = torch.linalg.qr(torch.randn(Hq, D, D, device="cuda", generator=g))[0] if mode == "lowrank" else None
    kw = dict(mode=mode, basis=basis, d_r=D // 4 if mode == "lowrank" else None, sliding_window=window,
              softcap=softcap, sink_tokens=n, return_argmax=True, return_top1_prob=True, return_sink_mass=True)
    res = residual_attention_triton(q, k, v, **kw)
    torch.cuda.synchronize()
    ref = residual_attention_reference(q.float(), k.float(), v.float(), **kw)
    assert not torch.isnan(res.out).any() and bool((res.argmax >= 0).all())
    t = torch.arange(T, device="cuda")
    assert bool((res.argmax[..., n:] >= n).all())
    s = torch.matmul(q.float(), k.float().repeat_interleave(Hq // Hkv, 1).transpose(-1, -2)) * D**-0.5
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    visible = (t[None, :] <= t[:, None]) & (True if window is None else (t[None, :] > t[:, None] - window))
    s.masked_fill_(~visible | (t[None, :] < n), float("-inf"))  # R only
    top2 = s.topk(2, dim=-1).values
    del s
    gap = torch.where(torch.isfinite(top2[..., 1]), top2[..., 0] - top2[..., 1], torch.inf)
    clear = (gap > 1e-3) & (t >= n)
    assert float(clear.float().mean()) > 0.5
    assert torch.equal(res.argmax[clear], ref.argmax[clear])
    same = res.argmax == ref.argmax
    rows = same if mode != "full" else torch.ones_like(same)
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else TOL[dtype]
    torch.testing.assert_close(res.out[rows].float(), ref.out[rows], **tol)
    torch.testing.assert_close(res.top1_prob[same], ref.top1_prob[same], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(res.sink_mass, ref.sink_mass, atol=1e-5, rtol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_gpu_tensors_on_a_non_current_device():
    """Tensors on cuda:1 while the current device is cuda:0: the launch runs on cuda:1 (issue 21)."""
    torch.cuda.set_device(0)
    q, k, v = (torch.randn(2, 4, 300, 64, device="cuda:1", dtype=torch.bfloat16) for _ in range(3))
    kw = dict(mode="top1", sink_tokens=1, return_argmax=True, return_gram=True)
    res = residual_attention_triton(q, k, v, **kw)
    torch.cuda.synchronize(1)
    assert torch.cuda.current_device() == 0 and res.out.device == q.device
    ref = residual_attention_reference(q.float(), k.float(), v.float(), **kw)
    same = res.argmax == ref.argmax
    assert float(same.float().mean()) > 0.95
    torch.testing.assert_close(res.out[same].float(), ref.out[same], **TOL[torch.bfloat16])


# --------------------------------------------------------------------------- #
# Through the GPT-2 integration
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_gpt2_forward_triton_equals_torch(attn):
    from transformers import GPT2Config, GPT2LMHeadModel

    from nqpq import calibrate, crystallize

    torch.manual_seed(0)
    config = GPT2Config(n_layer=3, n_head=2, n_embd=32, vocab_size=97, n_positions=64,
                        bos_token_id=0, eos_token_id=0)  # D = 16, the kernel's smallest head
    model = GPT2LMHeadModel(config).to(DEV).eval()
    model.set_attn_implementation(attn)
    ids = torch.randint(0, 97, (2, 40), device=DEV)
    basis = calibrate(model, ids.cpu(), [1, 2], backend="torch")
    triton_basis = calibrate(model, ids.cpu(), [1, 2], backend="triton")
    for li in (1, 2):
        torch.testing.assert_close(triton_basis.eigenvalues[li], basis.eigenvalues[li], rtol=1e-4, atol=1e-9)
    with torch.no_grad():
        for mode, d_r in (("top1", None), ("full", None), ("lowrank", 5)):
            logits = {}
            for backend in ("torch", "triton"):
                with crystallize(model, [1, 2], mode=mode, basis=basis.basis, d_r=d_r, backend=backend):
                    logits[backend] = model(ids).logits
            torch.testing.assert_close(logits["triton"], logits["torch"], atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- #
# Chunked attention (attention_chunk=C, Llama 4's chunked layers): query i sees keys j <= i with j // C == i // C
# --------------------------------------------------------------------------- #
# BLOCK_M=32, BLOCK_N=16 under the interpreter: C=1, C below a key tile, a tile, between a tile and the query
# block (chunk boundaries inside query blocks), a block, longer than a block, T - 1, T and longer than T.
@pytest.mark.parametrize("chunk", [1, 5, 8, 16, 23, 32, 40, 69, 70, 100])
@pytest.mark.parametrize("mode", MODES)
def test_attention_chunk(mode, chunk):
    B, H, T, D = 1, 4, 70, 16
    q, k, v = rand_qkv(B, H, T, D, torch.float32, seed=chunk, Hkv=2, sharp=2.0)
    basis = make_basis(H, D) if mode == "lowrank" else None
    res, _ = run_sink(q, k, v, mode, 0, d_r=4 if mode == "lowrank" else None, basis=basis,
                      return_gram=mode != "top1", attention_chunk=chunk)
    check_against_plain(res, q, k, v, mode, basis, 4 if mode == "lowrank" else None, attention_chunk=chunk)
    t = torch.arange(T, device=DEV)
    assert bool((res.argmax >= t // chunk * chunk).all()) and bool((res.argmax <= t).all())
    if chunk == 1:
        assert torch.equal(res.argmax, t.expand(B, H, T)) and bool((res.top1_prob == 1).all())
    if chunk >= T:  # one chunk: plain causal attention, the same kernel variant, bit for bit
        plain_res = residual_attention_triton(q, k, v, mode=mode, basis=basis, d_r=4 if mode == "lowrank" else None,
                                              return_argmax=True, return_top1_prob=True,
                                              return_gram=mode != "top1")  # the same path as run_sink's
        for name in ("out", "argmax", "top1_prob"):
            assert torch.equal(getattr(res, name), getattr(plain_res, name)), name


# (B, Hq, Hkv, T, Dqk, Dv, dtype, chunk, softcap, sink_tokens, learned, out_layout, min_clear)
CHUNK_GEOMETRIES = {
    "gqa-fp16-sink": (2, 4, 2, 40, 16, 16, torch.float16, 8, None, 3, False, "bhtd", 0.9),
    "sink-beyond-chunk": (1, 2, 1, 50, 16, 16, torch.float32, 8, None, 12, False, "bhtd", 0.9),
    "softcap-learned-bthd": (1, 2, 1, 50, 32, 32, torch.float32, 13, 20.0, 0, True, "bthd", 0.8),
    "mla-48-32-sink-learned": (1, 4, 2, 40, 48, 32, torch.float32, 24, None, 4, True, "bhtd", 0.9),
    "padded-80-fp16": (1, 2, 1, 40, 80, 80, torch.float16, 17, None, 0, False, "bhtd", 0.9),
    "bf16": (1, 2, 2, 33, 16, 16, torch.bfloat16, 8, None, 2, False, "bhtd", 0.9),
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("geometry", list(CHUNK_GEOMETRIES))
def test_attention_chunk_with_everything(geometry, mode):
    """Chunks with sink keys (a row sees only its own chunk's sink keys), learned sinks, soft caps, GQA, MLA widths,
    padded widths, 16-bit inputs: against float64 and the reference."""
    B, Hq, Hkv, T, Dqk, Dv, dtype, chunk, softcap, n, learned, layout, min_clear = CHUNK_GEOMETRIES[geometry]
    q, k, v = mla_qkv(B, Hq, Hkv, T, Dqk, Dv, dtype, seed=Dqk + T + chunk)
    basis = make_basis(Hq, Dv) if mode == "lowrank" else None
    d_r = min(Dv, 20) if mode == "lowrank" else None
    sink = sink_logits(Hq, seed=chunk) if learned else None
    res, _ = run_sink(q, k, v, mode, n, d_r=d_r, basis=basis, out_layout=layout, min_clear=min_clear,
                      softcap=softcap, learned_sink=sink, attention_chunk=chunk)
    if n > 0 and not learned:
        # Rows of a later chunk than the sink keys' see none of them: no sink mass.
        late = (torch.arange(T, device=DEV) // chunk * chunk >= n).expand_as(res.argmax)
        assert bool(late.any()) and bool((res.sink_mass[late] == 0).all())
    if Hkv < Hq:  # grouped heads read their kv head in place: the same as MHA on repeated K/V
        rep = [t.repeat_interleave(Hq // Hkv, dim=1) for t in (k, v)]
        mha = residual_attention_triton(q, *rep, mode=mode, basis=basis, d_r=d_r, sink_tokens=n, learned_sink=sink,
                                        return_argmax=True, return_top1_prob=True, return_sink_mass=True,
                                        out_layout=layout, softcap=softcap, attention_chunk=chunk,
                                        return_gram=True)  # as run_sink
        for name in ("out", "argmax", "top1_prob", "sink_mass"):
            assert torch.equal(getattr(res, name), getattr(mha, name)), name


@pytest.mark.parametrize("block_m,block_n", [(16, 16), (64, 16), (32, 32), (64, 32)])
@pytest.mark.parametrize("chunk", [7, 16, 24, 48])
def test_attention_chunk_other_tilings(monkeypatch, block_m, block_n, chunk):
    """Chunk boundaries inside and on query blocks and key tiles of other sizes (the per-row first key)."""
    monkeypatch.setattr(
        launch_mod, "pick_config",
        lambda *a, **k: dict(BLOCK_M=block_m, BLOCK_N=block_n, num_warps=4, num_stages=2),
    )
    q, k, v = rand_qkv(1, 2, 70, 16, torch.float32, seed=chunk + block_m, Hkv=1, sharp=2.0)
    run_sink(q, k, v, "lowrank", 0, d_r=5, basis=make_basis(2, 16), attention_chunk=chunk)
    run_sink(q, k, v, "top1", 3, return_gram=False, attention_chunk=chunk)


@pytest.mark.skipif(DEV != "cpu", reason="counts tiles through the interpreter")
@pytest.mark.parametrize("chunk", [5, 16, 23, 40])
def test_attention_chunk_skips_tiles(monkeypatch, chunk):
    """Only key tiles some row of the query block can see are visited: cost ~ T·C, not T²."""
    visited_tiles_equal_needed(monkeypatch, lambda i: i[None, :] // chunk == i[:, None] // chunk,
                               attention_chunk=chunk)


@pytest.mark.parametrize("kw,exc,match", [
    (dict(attention_chunk=True), TypeError, "^attention_chunk must be an int, got bool$"),
    (dict(attention_chunk=2.0), TypeError, "^attention_chunk must be an int, got float$"),
    (dict(attention_chunk=0), ValueError, "^attention_chunk must be >= 1"),
    (dict(attention_chunk=4, sliding_window=3), ValueError, "^attention_chunk and sliding_window cannot be combined"),
])
def test_attention_chunk_errors(kw, exc, match):
    q, k, v = rand_qkv(1, 1, 8, 16, torch.float32)
    for fn in (residual_attention_triton, residual_attention_reference):
        with pytest.raises(exc, match=match):
            fn(q, k, v, mode="full", **kw)


def test_attention_chunk_one_compiled_variant_for_every_c(monkeypatch):
    """attention_chunk is a runtime argument (not specialized): every C < T launches the same compile-time constants
    as a sliding window (the per-row first-key path), so one compiled kernel serves every chunk size and window."""
    real = ra_mod._residual_attn_fwd
    launches = record_launch_kwargs(monkeypatch)
    q, k, v = rand_qkv(1, 2, 40, 16, torch.float32, seed=5)
    for kw in (dict(attention_chunk=3), dict(attention_chunk=16), dict(attention_chunk=39), dict(sliding_window=8),
               dict(attention_chunk=40)):
        residual_attention_triton(q, k, v, mode="full", **kw)
    assert all(kw == launches[0] for kw in launches[:4]) and launches[0]["WINDOWED"] is True
    assert launches[4]["WINDOWED"] is False  # C >= T: plain causal
    dns = real.kwargs["do_not_specialize"] if hasattr(real, "kwargs") else real.do_not_specialize
    assert "chunk" in dns

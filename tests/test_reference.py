"""residual_attention (torch backend) and residual_attention_reference against a plain float64 loop."""

from __future__ import annotations

import pytest
import torch
from f64_reference import check_sink_against_f64
from plain_attention import check_against_plain, plain

from nqpq import ResidualAttentionResult, residual_attention, residual_attention_reference
from nqpq_kernels.dispatch import residual_attention_impl, resolve_backend

MODES = ("top1", "full", "lowrank")
SHAPES = [(1, 1, 16), (2, 3, 32), (1, 2, 64)]  # (B, H, D)


def random_qkv(B, H, T, D, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, T, D, generator=g).to(dtype) for _ in range(3)]


def random_basis(H, D, R=None, seed=1):
    """Orthonormal columns per head, [H, D, R]."""
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(H, D, D, generator=g, dtype=torch.float64))
    return Q[:, :, : (R or D)].float().contiguous()


def run_both(q, k, v, **kw):
    """(op output, reference output): the public op with backend='torch' and the reference function."""
    op_out = residual_attention(q, k, v, backend="torch", **kw)
    ref_out = residual_attention_reference(q, k, v, **kw).out
    return op_out, ref_out


@pytest.mark.parametrize("B,H,D", SHAPES)
@pytest.mark.parametrize("T", [1, 2, 63, 77])
@pytest.mark.parametrize("mode", ["top1", "full"])
def test_top1_full_match_plain_fp32(B, H, D, T, mode):
    q, k, v = random_qkv(B, H, T, D, seed=T + D)
    want = plain(q, k, v, mode).out
    for got in run_both(q, k, v, mode=mode):
        assert got.dtype == torch.float32 and got.shape == (B, H, T, D)
        torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("B,H,D", SHAPES)
@pytest.mark.parametrize("T", [1, 2, 63, 77])
def test_lowrank_matches_plain_fp32(B, H, D, T):
    q, k, v = random_qkv(B, H, T, D, seed=T * D)
    basis = random_basis(H, D)
    for d_r in sorted({0, 1, 5, D}):
        want = plain(q, k, v, "lowrank", basis, d_r).out
        for got in run_both(q, k, v, mode="lowrank", basis=basis, d_r=d_r):
            torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5, msg=f"d_r={d_r}")


def test_lowrank_limits_and_narrow_basis():
    q, k, v = random_qkv(2, 3, 40, 32, seed=5)
    basis = random_basis(3, 32)
    top1, _ = run_both(q, k, v, mode="top1")
    full, _ = run_both(q, k, v, mode="full")
    zero, _ = run_both(q, k, v, mode="lowrank", basis=basis, d_r=0)
    whole, _ = run_both(q, k, v, mode="lowrank", basis=basis, d_r=32)
    assert torch.equal(zero, top1)
    torch.testing.assert_close(whole, full, atol=1e-5, rtol=1e-5)
    # Only the first d_r columns are read: a basis with exactly R = d_r columns gives the same result.
    five, _ = run_both(q, k, v, mode="lowrank", basis=basis, d_r=5)
    narrow, _ = run_both(q, k, v, mode="lowrank", basis=basis[:, :, :5].contiguous(), d_r=5)
    torch.testing.assert_close(narrow, five, atol=1e-6, rtol=1e-6)


def test_lowrank_with_non_orthonormal_basis():
    q, k, v = random_qkv(1, 2, 20, 16, seed=9)
    basis = torch.randn(2, 16, 6, generator=torch.Generator().manual_seed(3)) * 0.3
    want = plain(q, k, v, "lowrank", basis, 4).out
    for got in run_both(q, k, v, mode="lowrank", basis=basis, d_r=4):
        torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 1e-2), (torch.bfloat16, 4e-2)])
@pytest.mark.parametrize("mode", MODES)
def test_half_precision_inputs(dtype, tol, mode):
    B, H, T, D = 2, 2, 50, 32
    q, k, v = random_qkv(B, H, T, D, dtype=dtype, seed=11)
    basis = random_basis(H, D)
    kw = {"basis": basis, "d_r": 5} if mode == "lowrank" else {}
    want = plain(q, k, v, mode, basis, 5).out
    for got in run_both(q, k, v, mode=mode, **kw):
        assert got.dtype == dtype
        torch.testing.assert_close(got.double(), want, atol=tol, rtol=tol)


def test_ties_pick_the_first_index():
    # Integer-valued q, k and a power-of-two scale make every score exact, so repeated keys tie exactly.
    T, D = 9, 16
    g = torch.Generator().manual_seed(0)
    base = torch.randint(0, 2, (3, D), generator=g).float()
    k = base[torch.tensor([0, 1, 0, 2, 1, 0, 2, 1, 0])].view(1, 1, T, D)
    q = torch.randint(-2, 3, (1, 1, T, D), generator=g).float()
    q[0, 0, 4] = 0.0  # all scores equal: argmax must be 0
    v = torch.randn(1, 1, T, D, generator=g)
    _, got_op = residual_attention(q, k, v, mode="top1", backend="torch", scale=0.25, return_argmax=True)
    got_ref = residual_attention_reference(q, k, v, mode="top1", scale=0.25, return_argmax=True).argmax
    scores = (q[0, 0] @ k[0, 0].T) * 0.25
    for t in range(T):
        row = scores[t, : t + 1]
        first = int((row == row.max()).nonzero()[0])
        assert int(got_op[0, 0, t]) == first and int(got_ref[0, 0, t]) == first, t
    assert int(got_ref[0, 0, 4]) == 0
    want, want_arg = plain(q, k, v, "top1", scale=0.25)[:2]
    assert torch.equal(got_ref, want_arg)
    out = residual_attention(q, k, v, mode="top1", backend="torch", scale=0.25)
    torch.testing.assert_close(out.double(), want, atol=0, rtol=0)


@pytest.mark.parametrize("mode", MODES)
def test_non_contiguous_views_of_packed_qkv(mode):
    B, T, H, D = 2, 30, 3, 16
    packed = torch.randn(B, T, 3 * H * D, generator=torch.Generator().manual_seed(4))
    q, k, v = (x.view(B, T, H, D).transpose(1, 2) for x in packed.split(H * D, dim=2))
    assert not q.is_contiguous()
    basis = random_basis(H, D)
    kw = {"basis": basis, "d_r": 5} if mode == "lowrank" else {}
    want = plain(q, k, v, mode, basis, 5).out
    contiguous = [x.contiguous() for x in (q, k, v)]
    for got, same in zip(run_both(q, k, v, mode=mode, **kw), run_both(*contiguous, mode=mode, **kw)):
        torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got, same, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("mode", MODES)
def test_custom_scale(mode):
    q, k, v = random_qkv(1, 2, 33, 16, seed=8)
    basis = random_basis(2, 16)
    kw = {"basis": basis, "d_r": 3} if mode == "lowrank" else {}
    want = plain(q, k, v, mode, basis, 3, scale=0.37).out
    for got in run_both(q, k, v, mode=mode, scale=0.37, **kw):
        torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
    if mode != "top1":  # a positive scale never moves the argmax, so top1 cannot tell
        default, _ = run_both(q, k, v, mode=mode, **kw)
        assert not torch.allclose(default, got)


def test_return_argmax():
    q, k, v = random_qkv(2, 3, 45, 32, seed=12)
    want_arg = plain(q, k, v, "full").argmax
    out, arg = residual_attention(q, k, v, mode="full", backend="torch", return_argmax=True)
    assert arg.dtype == torch.int64 and arg.shape == (2, 3, 45)
    assert torch.equal(arg, want_arg)
    assert torch.equal(out, residual_attention(q, k, v, mode="full", backend="torch"))
    res = residual_attention_reference(q, k, v, mode="full", return_argmax=True)
    assert isinstance(res, ResidualAttentionResult)
    assert torch.equal(res.argmax, want_arg) and res.gram is None and res.top1_prob is None
    none = residual_attention_reference(q, k, v, mode="full")
    assert none.argmax is None and none.gram is None and none.top1_prob is None


@pytest.mark.parametrize("mode", MODES)
def test_return_gram(mode):
    B, H, T, D = 2, 3, 41, 16
    q, k, v = random_qkv(B, H, T, D, seed=13)
    basis = random_basis(H, D)
    kw = {"basis": basis, "d_r": 4} if mode == "lowrank" else {}
    out, _, gram, _, _ = residual_attention_reference(q, k, v, mode=mode, return_gram=True, **kw)
    want = plain(q, k, v, mode, basis, 4).gram
    assert gram.dtype == torch.float64 and gram.shape == (H, D, D)
    torch.testing.assert_close(gram, want, atol=1e-4 * want.abs().max().item(), rtol=1e-5)
    assert torch.equal(gram, gram.transpose(1, 2))
    assert torch.equal(out, residual_attention_reference(q, k, v, mode=mode, **kw)[0])


@pytest.mark.parametrize("mode", MODES)
def test_out_layout_bthd(mode):
    q, k, v = random_qkv(2, 3, 17, 16, seed=14)
    basis = random_basis(3, 16)
    kw = {"basis": basis, "d_r": 2} if mode == "lowrank" else {}
    bhtd = residual_attention_reference(q, k, v, mode=mode, **kw).out
    bthd = residual_attention_reference(q, k, v, mode=mode, out_layout="bthd", **kw).out
    assert bthd.shape == (2, 17, 3, 16) and bthd.is_contiguous()
    assert torch.equal(bthd, bhtd.transpose(1, 2))
    with pytest.raises(ValueError, match="out_layout"):
        residual_attention_reference(q, k, v, mode=mode, out_layout="bshd", **kw)


def _bad(match, exc=ValueError, **overrides):
    """Call both entry points with one argument changed; both must raise ``exc`` matching ``match``."""
    q, k, v = random_qkv(1, 2, 8, 16)
    kw = {"q": q, "k": k, "v": v, "mode": "lowrank", "basis": random_basis(2, 16), "d_r": 4}
    kw.update(overrides)
    with pytest.raises(exc, match=match):
        residual_attention(**kw, backend="torch")
    kw.pop("backend", None)
    with pytest.raises(exc, match=match):
        residual_attention_reference(**kw)


def test_bad_rank():
    q = torch.randn(2, 8, 16)
    _bad(r"q must be \[B, H, T, D\]", q=q, k=q, v=q)


def test_shape_mismatch():
    _bad("same shape", k=torch.randn(1, 2, 9, 16))
    _bad("same shape", v=torch.randn(1, 3, 8, 16))


def test_integer_dtype():
    ints = torch.ones(1, 2, 8, 16, dtype=torch.int64)
    _bad("dtype must be float32, float16 or bfloat16", TypeError, q=ints, k=ints, v=ints)


def test_mixed_dtypes():
    _bad("share a dtype", TypeError, v=torch.randn(1, 2, 8, 16).half())


def test_bad_mode():
    _bad("mode must be one of", mode="top2")


@pytest.mark.parametrize("d_r", [-1, 17])
def test_d_r_out_of_range(d_r):
    _bad(r"d_r must be in 0\.\.D \(D=16\)", d_r=d_r)


def test_lowrank_needs_basis_and_d_r():
    _bad("needs basis", basis=None)
    _bad("needs d_r", d_r=None)


def test_basis_wrong_shape():
    _bad(r"basis must be \[H=2, D=16, R\]", basis=torch.randn(3, 16, 16))
    _bad(r"basis must be \[H=2, D=16, R\]", basis=torch.randn(2, 8, 16))
    _bad(r"basis must be a tensor \[H, D, R\]", basis=torch.randn(16, 16))


def test_basis_fewer_columns_than_d_r():
    _bad("R=3 columns, fewer than d_r=4", basis=torch.randn(2, 16, 3))


def test_unknown_backend():
    q, k, v = random_qkv(1, 1, 4, 16)
    with pytest.raises(ValueError, match="backend must be one of"):
        residual_attention(q, k, v, mode="full", backend="cuda")


def test_triton_backend_on_cpu_refused(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q, k, v = random_qkv(1, 1, 4, 16)
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        residual_attention(q, k, v, mode="full", backend="triton")


# --------------------------------------------------------------------------- #
# Grouped-query heads, sliding windows, soft caps, top1_prob, any head dim
# --------------------------------------------------------------------------- #
def gqa_qkv(B, Hq, Hkv, T, D, dtype=torch.float32, seed=0, sharp=1.0):
    """q [B, Hq, T, D], k/v [B, Hkv, T, D]; ``sharp`` scales q (a clearer maximum per row)."""
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(B, Hq, T, D, generator=g) * sharp).to(dtype)
    return q, *(torch.randn(B, Hkv, T, D, generator=g).to(dtype) for _ in range(2))


def reference_all(q, k, v, mode, **kw):
    basis = random_basis(q.shape[1], q.shape[3]) if mode == "lowrank" else None
    d_r = 5 if mode == "lowrank" else None
    res = residual_attention_reference(q, k, v, mode=mode, basis=basis, d_r=d_r, return_argmax=True,
                                       return_gram=True, return_top1_prob=True, return_sink_mass=True, **kw)
    return res, basis, d_r


@pytest.mark.parametrize("Hkv", [1, 2, 4])
@pytest.mark.parametrize("mode", MODES)
def test_gqa_mqa_matches_plain(mode, Hkv):
    q, k, v = gqa_qkv(2, 4, Hkv, 37, 16, seed=Hkv, sharp=3.0)
    res, basis, d_r = reference_all(q, k, v, mode)
    check_against_plain(res, q, k, v, mode, basis, d_r)
    # Same as multi-head attention on K/V repeated in transformers' repeat_kv order.
    rep = [t.repeat_interleave(4 // Hkv, dim=1) for t in (k, v)]
    mha = residual_attention_reference(q, *rep, mode=mode, basis=basis, d_r=d_r, return_argmax=True,
                                       return_gram=True, return_top1_prob=True, return_sink_mass=True)
    for a, b in zip(res, mha, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("window", [1, 3, 16, 36, 37, 100])
@pytest.mark.parametrize("mode", MODES)
def test_sliding_window_matches_plain(mode, window):
    q, k, v = gqa_qkv(1, 4, 2, 37, 16, seed=window, sharp=3.0)
    res, basis, d_r = reference_all(q, k, v, mode, sliding_window=window)
    check_against_plain(res, q, k, v, mode, basis, d_r, sliding_window=window)
    assert bool((res.argmax > torch.arange(37) - window).all())
    if window == 1:  # each query sees only itself
        assert torch.equal(res.argmax, torch.arange(37).expand(1, 4, 37))
        torch.testing.assert_close(res.top1_prob, torch.ones(1, 4, 37))
    if window >= 37:  # a window covering the sequence is plain causal attention
        plain_causal, _, _ = reference_all(q, k, v, mode)
        for a, b in zip(res, plain_causal, strict=True):
            assert torch.equal(a, b)


@pytest.mark.parametrize("softcap,min_clear", [(0.5, 0.0), (5.0, 0.5), (50.0, 0.8)])  # small caps saturate: ties
@pytest.mark.parametrize("mode", MODES)
def test_softcap_matches_plain(mode, softcap, min_clear):
    q, k, v = gqa_qkv(1, 2, 1, 33, 16, seed=int(softcap * 10), sharp=3.0)
    res, basis, d_r = reference_all(q, k, v, mode, softcap=softcap, sliding_window=20)
    check_against_plain(res, q, k, v, mode, basis, d_r, softcap=softcap, sliding_window=20, min_clear=min_clear)


def saturated_tie_qkv(T, D=16, dtype=torch.float32, seed=0):
    """Integer scores: 'hot' keys score 29..31 (c·tanh(s/c) is exactly c for c=1, in fp32 and fp64), the
    rest -1..1. Rows that see a hot key tie exactly between all of them; the first must win."""
    g = torch.Generator().manual_seed(seed)
    q = torch.zeros(1, 2, T, D)
    q[..., 0] = 1.0
    q[..., 1] = torch.randint(-1, 2, (1, 2, T), generator=g).float()
    k = torch.zeros(1, 1, T, D)
    hot = torch.rand(T, generator=g) < 0.15
    hot[[5, 20, 21, 40]] = True
    k[0, 0, :, 0] = 30.0 * hot
    k[0, 0, :, 1] = torch.randint(-1, 2, (T,), generator=g).float()
    v = torch.randn(1, 1, T, D, generator=g)
    return q.to(dtype), k.to(dtype), v.to(dtype), hot


def test_softcap_saturated_ties_first_index():
    T = 64
    q, k, v, hot = saturated_tie_qkv(T)
    for window in (None, 10):
        res = residual_attention_reference(q, k, v, mode="top1", scale=1.0, softcap=1.0, sliding_window=window,
                                           return_argmax=True)
        capped = torch.tanh(q[0] @ k[0, 0].T)  # [2, T, T]
        n_ties = 0
        for h in range(2):
            for i in range(T):
                lo = 0 if window is None else max(0, i - window + 1)
                row = capped[h, i, lo: i + 1]
                first = lo + int((row == row.max()).nonzero()[0])
                assert int(res.argmax[0, h, i]) == first, (h, i)
                n_ties += int((row == row.max()).sum() > 1)
        assert n_ties > 20  # the test really exercises ties
        check_against_plain(res, q, k, v, "top1", scale=1.0, softcap=1.0, sliding_window=window, min_clear=0)


@pytest.mark.parametrize("D", [8, 24, 80])
def test_any_head_dim(D):
    q, k, v = gqa_qkv(1, 2, 1, 20, D, seed=D, sharp=2.0)
    for mode in MODES:
        res, basis, d_r = reference_all(q, k, v, mode)
        check_against_plain(res, q, k, v, mode, basis, d_r)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gqa_window_softcap_half_precision(dtype):
    q, k, v = gqa_qkv(2, 4, 2, 30, 32, dtype=dtype, seed=3, sharp=3.0)
    res, basis, d_r = reference_all(q, k, v, "lowrank", sliding_window=9, softcap=20.0)
    assert res.out.dtype == dtype
    check_against_plain(res, q, k, v, "lowrank", basis, d_r, sliding_window=9, softcap=20.0)


def test_public_op_return_order():
    q, k, v = gqa_qkv(1, 4, 2, 12, 16, seed=1)
    kw = dict(mode="full", backend="torch", sliding_window=5, softcap=10.0)
    res = residual_attention_impl("torch")(q, k, v, mode="full", sliding_window=5, softcap=10.0, return_argmax=True,
                                           return_top1_prob=True)
    out = residual_attention(q, k, v, **kw)
    assert isinstance(out, torch.Tensor) and torch.equal(out, res.out)
    out, arg = residual_attention(q, k, v, **kw, return_argmax=True)
    assert torch.equal(arg, res.argmax)
    out, top1 = residual_attention(q, k, v, **kw, return_top1_prob=True)
    assert torch.equal(top1, res.top1_prob) and top1.dtype == torch.float32
    out, arg, top1 = residual_attention(q, k, v, **kw, return_argmax=True, return_top1_prob=True)
    assert torch.equal(arg, res.argmax) and torch.equal(top1, res.top1_prob)


def test_top1_prob_is_max_p():
    q, k, v = gqa_qkv(2, 2, 2, 25, 16, seed=6)
    for mode in MODES:
        res, basis, d_r = reference_all(q, k, v, mode)
        scores = (q @ k.transpose(-1, -2)).double() * 0.25
        scores.masked_fill_(torch.ones(25, 25, dtype=torch.bool).triu(1), float("-inf"))
        torch.testing.assert_close(res.top1_prob.double(), scores.softmax(-1).amax(-1), atol=1e-6, rtol=1e-6)
    assert float(res.top1_prob[..., 0].min()) == 1.0  # row 0 sees one key


def test_argmax_on_scores_not_rounded_p():
    """Scores 0 and 2^-30 round to the same fp32 probability; i* is taken on the scores: index 1."""
    q = torch.zeros(1, 1, 2, 16)
    k = torch.zeros(1, 1, 2, 16)
    q[..., 0] = 1.0
    k[0, 0, 1, 0] = 1.0  # q1·k0 = 0, q1·k1 = 1
    v = torch.randn(1, 1, 2, 16)
    scale = 2.0**-30
    s = torch.tensor([0.0, scale])
    p = s.softmax(-1)
    assert p[0] == p[1]  # the probabilities really tie in fp32
    res = residual_attention_reference(q, k, v, mode="top1", scale=scale, return_argmax=True)
    assert res.argmax[0, 0].tolist() == [0, 1]
    torch.testing.assert_close(res.out[0, 0, 1], v[0, 0, 1], atol=0, rtol=0)
    _, arg = residual_attention(q, k, v, mode="top1", scale=scale, backend="torch", return_argmax=True)
    assert arg[0, 0].tolist() == [0, 1]


# --------------------------------------------------------------------------- #
# Non-finite rows
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("mode", MODES)
def test_nan_rows(mode):
    """NaN in q row t: only row t is NaN. NaN in key j: exactly the rows that see j (causal, window)."""
    q, k, v = gqa_qkv(1, 2, 1, 20, 16, seed=2, sharp=3.0)
    q[0, 1, 7, 3] = float("nan")
    k[0, 0, 12, 0] = float("nan")
    for window in (None, 4):
        res, basis, d_r = reference_all(q, k, v, mode, sliding_window=window)
        bad = torch.zeros(1, 2, 20, dtype=torch.bool)
        bad[0, 1, 7] = True
        bad[0, :, 12: (20 if window is None else 16)] = True
        assert torch.equal(torch.isnan(res.out).all(-1), bad) and torch.equal(torch.isnan(res.out).any(-1), bad)
        assert torch.equal(res.argmax == -1, bad) and torch.equal(torch.isnan(res.top1_prob), bad)
        assert bool(torch.isnan(res.gram).all())  # both heads hold non-finite rows
        check_against_plain(res, q, k, v, mode, basis, d_r, sliding_window=window)


def test_infinite_scores():
    """+inf best score: non-finite row. A -inf score next to finite ones only gets zero weight."""
    q, k, v = gqa_qkv(1, 1, 1, 6, 16, seed=4, sharp=3.0)
    q[0, 0, 3, 0] = 1e30
    k[0, 0, :, 0] = torch.tensor([-1e30, 0.0, -1e30, 0.0, 0.0, 0.0])  # row 3: -inf, s, -inf, s (fp32 overflow)
    q[0, 0, 5, 0] = 1e30
    k[0, 0, 5, 0] = 1e30  # row 5: +inf at key 5
    for mode in MODES:
        res, basis, d_r = reference_all(q, k, v, mode)
        assert torch.isnan(res.out[0, 0]).any(-1).tolist() == [False] * 5 + [True]
        assert res.argmax[0, 0, 5] == -1 and res.argmax[0, 0, 3] in (1, 3)
        # Rows 0..4 (they never see key 5) against float64, where 1e30·1e30 does not overflow.
        first5 = [t[:, :, :5] for t in (q, k, v)]
        res5 = residual_attention_reference(*first5, mode=mode, basis=basis, d_r=d_r, return_argmax=True,
                                            return_top1_prob=True)
        check_against_plain(res5, *first5, mode, basis, d_r, min_clear=0.5)
        for a, b in zip(res5, res, strict=True):
            if a is not None:
                assert torch.equal(a, b[:, :, :5])


def test_fp16_overflow_rows():
    """fp16 inputs scaled by 6e4 overflow to ±inf: no crash, and exactly the rows whose scores are NaN or
    ±inf at the top are non-finite (the float64 oracle decides which)."""
    q, k, v = gqa_qkv(1, 2, 1, 24, 16, seed=4)
    q, k = (q * 0.4 * 6e4).half(), (k * 0.4 * 6e4).half()  # a few entries beyond 65504: ±inf
    v = v.half()
    assert bool(torch.isinf(q).any()) and bool(torch.isinf(k).any())
    for mode in MODES:
        res, basis, d_r = reference_all(q, k, v, mode)
        want = check_against_plain(res, q, k, v, mode, basis, d_r, min_clear=0)
        assert torch.equal(torch.isnan(res.out).any(-1), want.bad)
        assert 0 < int(want.bad.sum()) < want.bad.numel()


# --------------------------------------------------------------------------- #
# Errors and backend choice
# --------------------------------------------------------------------------- #
def test_gqa_shape_errors():
    q = torch.randn(1, 6, 8, 16)
    with pytest.raises(ValueError, match=r"multiple of the number of kv heads, got Hq=6, Hkv=4"):
        residual_attention_reference(q, torch.randn(1, 4, 8, 16), torch.randn(1, 4, 8, 16), mode="full")
    for bad in ((2, 2, 8, 16), (1, 2, 7, 16), (1, 2, 8, 32)):  # Tk = 7 < Tq = 8: more queries than keys
        with pytest.raises(ValueError, match="must agree on B and D with Tq <= Tk"):
            residual_attention_reference(q, torch.randn(bad), torch.randn(bad), mode="full")
    with pytest.raises(ValueError, match="k and v must have the same shape"):
        residual_attention_reference(q, torch.randn(1, 2, 8, 16), torch.randn(1, 3, 8, 16), mode="full")


@pytest.mark.parametrize(
    "kw,exc,match",
    [
        (dict(sliding_window=0), ValueError, "sliding_window must be >= 1"),
        (dict(sliding_window=-3), ValueError, "sliding_window must be >= 1"),
        (dict(sliding_window=2.5), TypeError, "sliding_window must be an int, got float"),
        (dict(sliding_window=True), TypeError, "sliding_window must be an int, got bool"),
        (dict(softcap=0.0), ValueError, "softcap must be a positive finite number"),
        (dict(softcap=-1.0), ValueError, "softcap must be a positive finite number"),
        (dict(softcap=float("inf")), ValueError, "softcap must be a positive finite number"),
        (dict(softcap=float("nan")), ValueError, "softcap must be a positive finite number"),
        (dict(softcap="30"), TypeError, "softcap must be a number, got str"),
        (dict(scale=float("nan")), ValueError, "scale must be a positive finite number"),
        (dict(scale="0.5"), TypeError, "scale must be a number, got str"),
    ],
)
def test_window_softcap_scale_errors(kw, exc, match):
    q, k, v = random_qkv(1, 2, 8, 16)
    for fn in (residual_attention_reference, lambda *a, **k: residual_attention(*a, **k, backend="torch")):
        with pytest.raises(exc, match=match):
            fn(q, k, v, mode="full", **kw)


def test_numpy_integers_accepted():
    np = pytest.importorskip("numpy")
    q, k, v = random_qkv(1, 2, 8, 16)
    basis = random_basis(2, 16)
    a = residual_attention_reference(q, k, v, mode="lowrank", basis=basis, d_r=np.int64(3), sliding_window=np.int32(4))
    b = residual_attention_reference(q, k, v, mode="lowrank", basis=basis, d_r=3, sliding_window=4)
    assert torch.equal(a.out, b.out)


def test_list_input_is_a_type_error():
    q, k, v = random_qkv(1, 1, 4, 16)
    for name in ("q", "k", "v"):
        args = {"q": q, "k": k, "v": v, name: q.tolist()}
        with pytest.raises(TypeError, match=f"^{name} must be a torch.Tensor, got list$"):
            residual_attention(**args, mode="full", backend="torch")
        with pytest.raises(TypeError, match=f"^{name} must be a torch.Tensor, got list$"):
            residual_attention_reference(**args, mode="full")


def test_basis_object_gives_a_short_message():
    """A ResidualBasis (an object full of tensors) where the basis tensor goes: a one-line TypeError."""
    from nqpq import ResidualBasis

    big = {layer: torch.randn(2, 16, 16) for layer in range(4)}
    rb = ResidualBasis(basis=big, eigenvalues=big, cumulative_variance=big, r90={0: torch.ones(2)})
    q, k, v = random_qkv(1, 2, 8, 16)
    for fn in (residual_attention_reference, lambda *a, **kw: residual_attention(*a, **kw, backend="torch")):
        with pytest.raises(TypeError) as err:
            fn(q, k, v, mode="lowrank", basis=rb, d_r=2)
        msg = str(err.value)
        assert msg.startswith("basis must be a torch.Tensor [Hq, D, R], got ResidualBasis") and len(msg) < 200


def test_resolve_backend_head_dims(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert resolve_backend("auto", "cuda") == "triton"
    for D in (16, 64, 80, 96, 128, 256):
        assert resolve_backend("auto", "cuda", D) == "triton"
    for D in (8, 24, 100, 272):
        assert resolve_backend("auto", "cuda", D) == "torch"  # the kernel cannot: fall back to the reference
        with pytest.raises(ValueError, match=f"head dims that are multiples of 16 up to 256, got D={D}"):
            resolve_backend("triton", "cuda", D)
    assert resolve_backend("auto", "cpu", 64) == "torch"
    assert resolve_backend("torch", "cuda", 24) == "torch"
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        resolve_backend("triton", "cpu", 64)


def test_choice_arguments_named_by_type_not_repr():
    """mode, out_layout and backend given a tensor (or a list): the message names its type and shape only."""
    q, k, v = random_qkv(1, 1, 4, 16)
    big = torch.zeros(1000)
    calls = {
        "mode": lambda x: residual_attention_reference(q, k, v, mode=x),
        "out_layout": lambda x: residual_attention_reference(q, k, v, mode="full", out_layout=x),
        "backend": lambda x: residual_attention(q, k, v, mode="full", backend=x),
    }
    for name, call in calls.items():
        with pytest.raises(ValueError) as err:
            call(big)
        assert str(err.value).endswith("got Tensor(1000,) torch.float32") and len(str(err.value)) < 120, name
        with pytest.raises(ValueError, match=f"^{name} must be one of .*, got list$"):
            call(["full"])
        with pytest.raises(ValueError, match=f"^{name} must be one of .*, got 'x'$"):
            call("x")


def test_window_beyond_int64_is_plain_causal():
    """Any int window >= T is plain causal attention, as in the kernel. Before, the mask compared with the window
    as int64: 2**63 wrapped to a negative window (every row masked: NaN output, argmax -1), 2**70 overflowed."""
    q, k, v = gqa_qkv(1, 2, 1, 9, 16, seed=3, sharp=3.0)
    for window in (9, 2**63, 2**70):
        res, _, _ = reference_all(q, k, v, "full", sliding_window=window)
        causal, _, _ = reference_all(q, k, v, "full")
        for a, b in zip(res, causal, strict=True):
            assert torch.equal(a, b)


# --------------------------------------------------------------------------- #
# The sink kept apart (sink_tokens=n) against the float64 definitions (tests/f64_reference.sink_plain)
# --------------------------------------------------------------------------- #
def torch_backend_checked(q, k, v, mode, basis, d_r, min_clear=0.9, **kw):
    """What the public op's ``backend="torch"`` runs (on CPU the streamed path, ``nqpq_kernels.streamed``; elsewhere the
    reference), with the outputs the op can return (no Gram: low rank then takes the op's path), checked against
    float64 on the same inputs as the reference: the public op's numbers are then compared with it bit for bit."""
    res = residual_attention_impl("torch")(q, k, v, mode=mode, basis=basis, d_r=d_r, return_argmax=True,
                                           return_top1_prob=True, return_sink_mass=True, **kw)
    check_sink_against_f64(res, q, k, v, mode, basis, d_r, min_clear=min_clear, **kw)
    return res


def reference_sink(q, k, v, mode, n, **kw):
    basis = random_basis(q.shape[1], q.shape[3]) if mode == "lowrank" else None
    d_r = 5 if mode == "lowrank" else None
    res = residual_attention_reference(q, k, v, mode=mode, basis=basis, d_r=d_r, sink_tokens=n, return_argmax=True,
                                       return_gram=True, return_top1_prob=True, return_sink_mass=True, **kw)
    return res, basis, d_r


@pytest.mark.parametrize("n", [0, 1, 4])
@pytest.mark.parametrize("B,H,D", SHAPES)
@pytest.mark.parametrize("T", [1, 2, 63, 77])
@pytest.mark.parametrize("mode", MODES)
def test_sink_matches_f64(mode, T, B, H, D, n):
    q, k, v = gqa_qkv(B, H, H, T, D, seed=T + D + n, sharp=3.0)
    res, basis, d_r = reference_sink(q, k, v, mode, n)
    check_sink_against_f64(res, q, k, v, mode, basis, d_r, sink_tokens=n)
    # The public op (torch backend) returns its implementation's numbers, checked against float64, appended in order.
    res = torch_backend_checked(q, k, v, mode, basis, d_r, sink_tokens=n)
    out, arg, top1, mass = residual_attention(q, k, v, mode=mode, basis=basis, d_r=d_r, backend="torch",
                                              sink_tokens=n, return_argmax=True, return_top1_prob=True,
                                              return_sink_mass=True)
    for a, b in ((out, res.out), (arg, res.argmax), (top1, res.top1_prob), (mass, res.sink_mass)):
        assert torch.equal(a, b)


# (Hq, Hkv, T, D, dtype, window, softcap, min_clear)
SINK_CASES = {
    "gqa": (4, 2, 37, 16, torch.float32, None, None, 0.9),
    "mqa-window-1": (4, 1, 37, 16, torch.float32, 1, None, 0.9),
    "window-3": (4, 2, 37, 16, torch.float32, 3, None, 0.9),
    "window-16": (4, 2, 37, 16, torch.float32, 16, None, 0.9),
    "softcap-window": (2, 1, 33, 16, torch.float32, 20, 5.0, 0.5),
    "padded-48": (2, 1, 30, 48, torch.float32, None, None, 0.9),
    "fp16-gqa-window-softcap": (4, 2, 30, 32, torch.float16, 9, 20.0, 0.9),
    "bf16": (2, 2, 30, 32, torch.bfloat16, None, None, 0.9),
}


@pytest.mark.parametrize("n", [1, 4])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", list(SINK_CASES))
def test_sink_gqa_window_softcap(case, mode, n):
    Hq, Hkv, T, D, dtype, window, softcap, min_clear = SINK_CASES[case]
    q, k, v = gqa_qkv(2, Hq, Hkv, T, D, dtype=dtype, seed=T + n, sharp=3.0)
    res, basis, d_r = reference_sink(q, k, v, mode, n, sliding_window=window, softcap=softcap)
    assert res.out.dtype == dtype
    check_sink_against_f64(res, q, k, v, mode, basis, d_r, sliding_window=window, softcap=softcap, sink_tokens=n,
                           min_clear=min_clear)
    rows = torch.arange(T)
    assert bool((res.argmax[..., n:] >= n).all()) and bool((res.sink_mass[..., :n] == 1).all())
    if window is not None:
        # Rows past n + w − 1 see no sink key: no sink mass, and the ground state is V[i*ᴿ] exactly.
        late = (rows >= n + window - 1).expand_as(res.argmax)
        assert bool((res.sink_mass[late] == 0).all())
        if mode == "top1":
            v_star = torch.gather(v.repeat_interleave(Hq // Hkv, 1), 2, res.argmax.unsqueeze(-1).expand(-1, -1, -1, D))
            assert torch.equal(res.out[late], v_star[late])
    rep = [t.repeat_interleave(Hq // Hkv, dim=1) for t in (k, v)]
    mha = residual_attention_reference(q, *rep, mode=mode, basis=basis, d_r=d_r, sink_tokens=n, return_argmax=True,
                                       return_gram=True, return_top1_prob=True, return_sink_mass=True,
                                       sliding_window=window, softcap=softcap)
    for a, b in zip(res, mha, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


def test_sink_zero_is_the_spec():
    """sink_tokens=0 is today's op bit for bit; its sink mass is 0 (NaN on a non-finite row)."""
    q, k, v = gqa_qkv(1, 4, 2, 30, 16, seed=5, sharp=3.0)
    q[0, 1, 7, 0] = float("nan")
    for mode in MODES:
        res, basis, d_r = reference_sink(q, k, v, mode, 0, sliding_window=12)
        spec, _, _ = reference_all(q, k, v, mode, sliding_window=12)
        for a, b in zip(res, spec, strict=True):
            assert torch.equal(a.nan_to_num(), b.nan_to_num()) and torch.equal(a.isnan(), b.isnan())
        bad = res.argmax == -1
        assert int(bad.sum()) == 1 and bool(res.sink_mass[bad].isnan().all()) and bool((res.sink_mass[~bad] == 0).all())


def test_sink_winner_share_of_the_rest():
    """top1_prob / (1 − sink_mass) is the winner's share of the non-sink mass, p[i*ᴿ] / Σ_R p (float64 by hand)."""
    q, k, v = gqa_qkv(2, 2, 1, 40, 16, seed=8, sharp=3.0)
    n = 2
    res, _, _ = reference_sink(q, k, v, "top1", n)
    s = (q.double() @ k.double().transpose(-1, -2)) * 0.25
    s.masked_fill_(torch.ones(40, 40, dtype=torch.bool).triu(1), float("-inf"))
    p = s.softmax(-1)
    rest = p[..., n:]
    share = rest.amax(-1) / rest.sum(-1)
    got = res.top1_prob.double() / (1 - res.sink_mass.double())
    torch.testing.assert_close(got[..., n:], share[..., n:], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(res.sink_mass[..., n:].double(), p[..., n:, :n].sum(-1), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("n", [9, 2**40])
def test_sink_covering_the_sequence_is_ctx(n):
    """n >= T: every key is a sink key, every ground state is ctx: top1 and lowrank are full, ε = 0, mass 1."""
    q, k, v = gqa_qkv(1, 2, 1, 9, 16, seed=3, sharp=3.0)
    full = residual_attention_reference(q, k, v, mode="full").out
    for mode in MODES:
        res, basis, d_r = reference_sink(q, k, v, mode, n)
        torch.testing.assert_close(res.out, full, atol=1e-6, rtol=1e-6)
        assert float(res.gram.abs().max()) == 0.0 and bool((res.sink_mass == 1).all())
        check_sink_against_f64(res, q, k, v, mode, basis, d_r, sink_tokens=min(n, 9))


@pytest.mark.parametrize("mode", MODES)
def test_sink_nan_rows(mode):
    """NaN in q row t or in key j (a sink key too): exactly the rows that see it are non-finite."""
    q, k, v = gqa_qkv(1, 2, 1, 20, 16, seed=2, sharp=3.0)
    q[0, 1, 7, 3] = float("nan")
    k[0, 0, 12, 0] = float("nan")
    k[0, 0, 1, 2] = float("nan")  # in the sink (n = 4): rows 1..4 with a window of 4
    res, basis, d_r = reference_sink(q, k, v, mode, 4, sliding_window=4)
    bad = torch.zeros(1, 2, 20, dtype=torch.bool)
    bad[0, 1, 7] = True
    bad[0, :, 12:16] = True
    bad[0, :, 1:5] = True
    assert torch.equal(torch.isnan(res.out).all(-1), bad) and torch.equal(torch.isnan(res.out).any(-1), bad)
    assert torch.equal(res.argmax == -1, bad) and torch.equal(torch.isnan(res.top1_prob), bad)
    assert torch.equal(torch.isnan(res.sink_mass), bad) and bool(torch.isnan(res.gram).all())
    check_sink_against_f64(res, q, k, v, mode, basis, d_r, sliding_window=4, sink_tokens=4)


@pytest.mark.parametrize(
    "bad,exc,match",
    [
        (True, TypeError, "^sink_tokens must be an int, got bool$"),
        (2.0, TypeError, "^sink_tokens must be an int, got float$"),
        ("1", TypeError, "^sink_tokens must be an int, got str$"),
        (-1, ValueError, r"^sink_tokens must be >= 0 \(keys j < sink_tokens are the sink\), got -1$"),
    ],
)
def test_sink_tokens_errors(bad, exc, match):
    q, k, v = random_qkv(1, 2, 8, 16)
    for fn in (residual_attention_reference, lambda *a, **kw: residual_attention(*a, **kw, backend="torch")):
        with pytest.raises(exc, match=match):
            fn(q, k, v, mode="full", sink_tokens=bad)


def test_sink_tokens_numpy_int_and_return_order():
    np = pytest.importorskip("numpy")
    q, k, v = gqa_qkv(1, 4, 2, 12, 16, seed=1, sharp=3.0)
    res = residual_attention_reference(q, k, v, mode="top1", sink_tokens=2, return_argmax=True, return_top1_prob=True,
                                       return_sink_mass=True)
    same = residual_attention_reference(q, k, v, mode="top1", sink_tokens=np.int64(2), return_sink_mass=True)
    assert torch.equal(res.out, same.out) and torch.equal(res.sink_mass, same.sink_mass)
    assert same.argmax is None and same.top1_prob is None and same.gram is None
    kw = dict(mode="top1", backend="torch", sink_tokens=2)
    res = residual_attention_impl("torch")(q, k, v, mode="top1", sink_tokens=2, return_argmax=True,
                                           return_top1_prob=True, return_sink_mass=True)
    out, mass = residual_attention(q, k, v, **kw, return_sink_mass=True)
    assert torch.equal(out, res.out) and torch.equal(mass, res.sink_mass) and mass.dtype == torch.float32
    out, arg, mass = residual_attention(q, k, v, **kw, return_argmax=True, return_sink_mass=True)
    assert torch.equal(arg, res.argmax) and torch.equal(mass, res.sink_mass)
    out, arg, top1 = residual_attention(q, k, v, **kw, return_argmax=True, return_top1_prob=True)
    assert torch.equal(top1, res.top1_prob)
    assert torch.equal(residual_attention(q, k, v, **kw), res.out)


# --------------------------------------------------------------------------- #
# MLA widths (v narrower or wider than q/k) and the learned sink (issue 27), against float64 (sink_plain)
# --------------------------------------------------------------------------- #
def mla_qkv(B, Hq, Hkv, T, Dqk, Dv, dtype=torch.float32, seed=0, sharp=3.0):
    """q [B, Hq, T, Dqk], k [B, Hkv, T, Dqk], v [B, Hkv, T, Dv]."""
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(B, Hq, T, Dqk, generator=g) * sharp).to(dtype)
    k = torch.randn(B, Hkv, T, Dqk, generator=g).to(dtype)
    return q, k, torch.randn(B, Hkv, T, Dv, generator=g).to(dtype)


def sink_logits(Hq, seed=0):
    """One logit per query head, spread over the scores' range (the sink takes from a few % to most of a row)."""
    g = torch.Generator().manual_seed(100 + seed)
    return torch.randn(Hq, generator=g) * 2.0 + 1.0


def reference_mla(q, k, v, mode, n=0, learned_sink=None, d_r=5, **kw):
    Hq, Dv = q.shape[1], v.shape[3]
    basis = random_basis(Hq, Dv) if mode == "lowrank" else None
    d_r = min(d_r, Dv) if mode == "lowrank" else None
    res = residual_attention_reference(q, k, v, mode=mode, basis=basis, d_r=d_r, sink_tokens=n,
                                       learned_sink=learned_sink, return_argmax=True, return_gram=True,
                                       return_top1_prob=True, return_sink_mass=True, **kw)
    return res, basis, d_r


# (Hq, Hkv, T, Dqk, Dv, dtype, window, softcap, min_clear)
MLA_CASES = {
    "mla-24-16": (2, 2, 33, 24, 16, torch.float32, None, None, 0.9),
    "mla-48-32-gqa": (4, 2, 30, 48, 32, torch.float32, None, None, 0.9),
    "mla-16-48-wider-v": (2, 1, 30, 16, 48, torch.float32, None, None, 0.9),
    "mla-192-128": (2, 1, 20, 192, 128, torch.float32, None, None, 0.9),
    "equal-gqa-window": (4, 2, 37, 16, 16, torch.float32, 5, None, 0.9),
    "mla-window-softcap": (2, 1, 33, 24, 16, torch.float32, 20, 5.0, 0.5),
    "mla-fp16-gqa": (4, 2, 30, 48, 32, torch.float16, 9, None, 0.9),
}


@pytest.mark.parametrize("learned", [False, True])
@pytest.mark.parametrize("n", [0, 3])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", list(MLA_CASES))
def test_mla_and_learned_sink_match_f64(case, mode, n, learned):
    Hq, Hkv, T, Dqk, Dv, dtype, window, softcap, min_clear = MLA_CASES[case]
    q, k, v = mla_qkv(2, Hq, Hkv, T, Dqk, Dv, dtype=dtype, seed=T + Dqk + n)
    sink = sink_logits(Hq, seed=n) if learned else None
    res, basis, d_r = reference_mla(q, k, v, mode, n, sink, sliding_window=window, softcap=softcap)
    assert res.out.shape == (2, Hq, T, Dv) and res.out.dtype == dtype and res.gram.shape == (Hq, Dv, Dv)
    check_sink_against_f64(res, q, k, v, mode, basis, d_r, sliding_window=window, softcap=softcap, sink_tokens=n,
                           min_clear=min_clear, learned_sink=sink)
    if learned:  # the sink takes real mass on these inputs
        assert float(res.sink_mass[..., n:].mean()) > 0.02
    # The public op (torch backend) returns its implementation's numbers, checked against float64.
    op_res = torch_backend_checked(q, k, v, mode, basis, d_r, min_clear=min_clear, sink_tokens=n, learned_sink=sink,
                                   sliding_window=window, softcap=softcap)
    out, arg, top1, mass = residual_attention(q, k, v, mode=mode, basis=basis, d_r=d_r, backend="torch",
                                              sink_tokens=n, learned_sink=sink, sliding_window=window,
                                              softcap=softcap, return_argmax=True, return_top1_prob=True,
                                              return_sink_mass=True)
    for a, b in ((out, op_res.out), (arg, op_res.argmax), (top1, op_res.top1_prob), (mass, op_res.sink_mass)):
        assert torch.equal(a, b)
    # Grouped heads: the same as MHA on repeated K/V.
    rep = [t.repeat_interleave(Hq // Hkv, dim=1) for t in (k, v)]
    mha, _, _ = reference_mla(q, *rep, mode, n, sink, sliding_window=window, softcap=softcap)
    for a, b in zip(res, mha, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6, equal_nan=True)


@pytest.mark.parametrize("mode", MODES)
def test_learned_sink_full_mode_is_gpt_oss_attention(mode):
    """Full mode with a learned sink is transformers' gpt-oss eager attention (sink column softmaxed, dropped);
    top1 / lowrank keep the sink's mass apart: (1 − m_L) V[i*] (+ P Pᵀ ε)."""
    from transformers.models.gpt_oss.modeling_gpt_oss import eager_attention_forward

    Hq, Hkv, T, D = 4, 2, 25, 16
    q, k, v = gqa_qkv(2, Hq, Hkv, T, D, seed=4, sharp=3.0)
    module = torch.nn.Module()
    module.sinks = sink_logits(Hq)
    module.num_key_value_groups = Hq // Hkv
    mask = torch.full((T, T), float("-inf")).triu(1)
    want, _ = eager_attention_forward(module, q.double(), k.double(), v.double(), mask.double(), D**-0.5)
    full = residual_attention(q, k, v, mode="full", backend="torch", learned_sink=module.sinks)
    torch.testing.assert_close(full.double(), want.transpose(1, 2), atol=2e-6, rtol=1e-5)
    if mode != "full":
        res, basis, d_r = reference_mla(q, k, v, mode, 0, module.sinks, d_r=D)
        # A complete orthonormal basis gives back ctx; top1 is (1 − m_L) V[i*].
        if mode == "lowrank":
            torch.testing.assert_close(res.out, full, atol=2e-6, rtol=1e-5)
        else:
            v_star = torch.gather(v.repeat_interleave(2, 1), 2, res.argmax.unsqueeze(-1).expand(-1, -1, -1, D))
            torch.testing.assert_close(res.out, (1 - res.sink_mass).unsqueeze(-1) * v_star, atol=1e-6, rtol=1e-6)


def test_learned_sink_none_and_minus_inf_are_today():
    """learned_sink=None is today's op; a -inf logit is a sink of no weight: every number of today, bit for bit.
    Equal widths are today's op too (MLA changes nothing when Dqk = Dv)."""
    q, k, v = gqa_qkv(2, 4, 2, 30, 16, seed=6, sharp=3.0)
    for n in (0, 3):
        for mode in MODES:
            today, _, _ = reference_mla(q, k, v, mode, n)
            spec, _, _ = reference_sink(q, k, v, mode, n) if n else reference_all(q, k, v, mode)
            off, _, _ = reference_mla(q, k, v, mode, n, torch.full((4,), float("-inf")))
            for a, b, c in zip(today, spec, off, strict=True):
                if a is None:
                    continue
                assert torch.equal(a, b) and torch.equal(a, c), mode


def test_learned_sink_non_finite_logits():
    """A NaN or +inf sink logit makes its head's rows non-finite (NaN out, argmax −1, NaN top1_prob/sink_mass and
    Gram); the other heads are computed as usual."""
    q, k, v = gqa_qkv(1, 4, 2, 20, 16, seed=2, sharp=3.0)
    sink = sink_logits(4)
    sink[1], sink[2] = float("nan"), float("inf")
    for mode in MODES:
        res, basis, d_r = reference_mla(q, k, v, mode, 2, sink)
        bad = torch.zeros(1, 4, 20, dtype=torch.bool)
        bad[:, 1:3] = True
        assert torch.equal(torch.isnan(res.out).all(-1), bad) and torch.equal(torch.isnan(res.out).any(-1), bad)
        assert torch.equal(res.argmax == -1, bad) and torch.equal(torch.isnan(res.top1_prob), bad)
        assert torch.equal(torch.isnan(res.sink_mass), bad)
        assert torch.equal(torch.isnan(res.gram).all(-1).all(-1), torch.tensor([False, True, True, False]))
        check_sink_against_f64(res, q, k, v, mode, basis, d_r, sink_tokens=2, learned_sink=sink)


@pytest.mark.parametrize("n", [0, 3])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", ["mla-48-32-gqa", "equal-gqa-window", "mla-window-softcap"])
def test_learned_sink_per_row_matches_f64(case, mode, n):
    """One sink logit per query row [B, Hq, T] (Inkling 2's sink_proj): float64 from the definitions; a head's
    logit repeated over its rows is the per-head sink bit for bit; a NaN / +inf logit spoils only its row."""
    Hq, Hkv, T, Dqk, Dv, dtype, window, softcap, min_clear = MLA_CASES[case]
    q, k, v = mla_qkv(2, Hq, Hkv, T, Dqk, Dv, dtype=dtype, seed=T + Dqk + n + 1)
    g = torch.Generator().manual_seed(300 + n)
    sink = torch.randn(2, Hq, T, generator=g) * 2.0 + 1.0
    sink[1, 0, 5], sink[0, Hq - 1, T - 1] = float("nan"), float("inf")
    res, basis, d_r = reference_mla(q, k, v, mode, n, sink, sliding_window=window, softcap=softcap)
    bad = torch.zeros(2, Hq, T, dtype=torch.bool)
    bad[1, 0, 5] = bad[0, Hq - 1, T - 1] = True
    assert torch.equal(res.argmax == -1, bad) and torch.equal(torch.isnan(res.out).any(-1), bad)
    sink[1, 0, 5] = sink[0, Hq - 1, T - 1] = 0.0
    res, basis, d_r = reference_mla(q, k, v, mode, n, sink, sliding_window=window, softcap=softcap)
    check_sink_against_f64(res, q, k, v, mode, basis, d_r, sliding_window=window, softcap=softcap, sink_tokens=n,
                           min_clear=min_clear, learned_sink=sink)
    per_head = sink_logits(Hq, seed=n)
    a, _, _ = reference_mla(q, k, v, mode, n, per_head, sliding_window=window, softcap=softcap)
    b, _, _ = reference_mla(q, k, v, mode, n, per_head[None, :, None].expand(2, Hq, T), sliding_window=window,
                            softcap=softcap)
    for x, y in zip(a, b, strict=True):
        assert (x is None and y is None) or torch.equal(x, y)


@pytest.mark.parametrize(
    "overrides,exc,match",
    [
        (dict(learned_sink=[0.0, 1.0]), TypeError,
         r"^learned_sink must be a torch.Tensor \[Hq\] / \[B, Hq, T\] or None, got list$"),
        (dict(learned_sink=torch.zeros(2, dtype=torch.int64)), TypeError, "^learned_sink must be floating point"),
        (dict(learned_sink=torch.zeros(3)), ValueError, r"^learned_sink must be \[Hq=2\] \(one logit per query head\)"),
        (dict(learned_sink=torch.zeros(1, 2)), ValueError, r"^learned_sink must be \[Hq=2\]"),
        (dict(learned_sink=torch.zeros(1, 2, 9)), ValueError, r"or \[B=1, Hq=2, T=8\] \(one per query row"),
        (dict(v=torch.randn(1, 2, 9, 16)), ValueError, r"^k and v must have the same shape \[B, Hkv, T\]"),
        (dict(k=torch.randn(1, 2, 8, 24)), ValueError, "must agree on B and D with Tq <= Tk"),
        (dict(v=torch.randn(1, 2, 8, 8), basis=random_basis(2, 16)), ValueError,
         r"^basis must be \[H=2, D=8, R\] \(one basis per query head, in v's width\)"),
        (dict(v=torch.randn(1, 2, 8, 8), basis=random_basis(2, 8), d_r=9), ValueError,
         r"^d_r must be in 0\.\.D \(D=8, v's width; q and k have 16\), got 9$"),
    ],
)
def test_mla_and_learned_sink_errors(overrides, exc, match):
    _bad(match, exc, **overrides)


def test_mla_default_scale_is_the_qk_width():
    """scale defaults to Dqk**-0.5 (the scores live in the q/k width), not Dv's."""
    q, k, v = mla_qkv(1, 2, 2, 20, 64, 16, seed=3)
    default = residual_attention_reference(q, k, v, mode="full").out
    explicit = residual_attention_reference(q, k, v, mode="full", scale=64**-0.5).out
    assert torch.equal(default, explicit)
    other = residual_attention_reference(q, k, v, mode="full", scale=16**-0.5).out
    assert not torch.allclose(default, other)


def test_resolve_backend_value_width():
    """MLA: the kernel needs both widths in TRITON_HEAD_DIMS; auto falls back to the reference otherwise."""
    assert resolve_backend("auto", "cuda", 192, 128) == "triton"
    assert resolve_backend("auto", "cuda", 64, 24) == "torch"
    with pytest.raises(ValueError, match="multiples of 16 up to 256, got D=24"):
        resolve_backend("triton", "cuda", 64, 24)


# Chunked attention (attention_chunk=C, Llama 4): query i sees keys j <= i with j // C == i // C.
# (Hq, Hkv, T, D, dtype, chunk, softcap, sink_tokens, learned)
CHUNK_CASES = {
    "c1": (2, 1, 20, 16, torch.float32, 1, None, 0, False),
    "c5-gqa": (4, 2, 37, 16, torch.float32, 5, None, 0, False),
    "c8-sink3": (4, 2, 37, 16, torch.float32, 8, None, 3, False),
    "c8-sink12": (2, 1, 37, 16, torch.float32, 8, None, 12, False),  # sink keys in two chunks
    "c16-softcap-learned": (2, 1, 33, 16, torch.float32, 16, 5.0, 2, True),
    "c36-below-T": (2, 2, 37, 32, torch.float32, 36, None, 0, False),
    "c37-equal-T": (2, 2, 37, 32, torch.float32, 37, None, 0, False),
    "c99-above-T": (2, 2, 37, 32, torch.float32, 99, None, 1, False),
    "fp16-c7-sink2": (4, 2, 30, 32, torch.float16, 7, 20.0, 2, False),
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", list(CHUNK_CASES))
def test_attention_chunk_against_float64(case, mode):
    Hq, Hkv, T, D, dtype, chunk, softcap, n, learned = CHUNK_CASES[case]
    q, k, v = gqa_qkv(2, Hq, Hkv, T, D, dtype=dtype, seed=T + chunk, sharp=3.0)
    sink = torch.linspace(-1.0, 2.0, Hq) if learned else None
    res, basis, d_r = reference_sink(q, k, v, mode, n, softcap=softcap, learned_sink=sink, attention_chunk=chunk)
    assert res.out.dtype == dtype
    check_sink_against_f64(res, q, k, v, mode, basis, d_r, softcap=softcap, sink_tokens=n, learned_sink=sink,
                           attention_chunk=chunk)
    rows = torch.arange(T)
    assert bool((res.argmax >= rows // chunk * chunk).all())  # never a key of an earlier chunk
    if chunk >= T:  # one chunk: plain causal attention, bit for bit
        plain_res, _, _ = reference_sink(q, k, v, mode, n, softcap=softcap, learned_sink=sink)
        for name in ("out", "argmax", "gram", "top1_prob", "sink_mass"):
            assert torch.equal(getattr(res, name), getattr(plain_res, name)), name
    # The public op passes the chunk through (to its implementation, checked against float64).
    op_res = torch_backend_checked(q, k, v, mode, basis, d_r, sink_tokens=n, softcap=softcap, learned_sink=sink,
                                   attention_chunk=chunk)
    op = residual_attention(q, k, v, mode=mode, basis=basis, d_r=d_r, backend="torch", sink_tokens=n,
                            softcap=softcap, learned_sink=sink, attention_chunk=chunk)
    assert torch.equal(op, op_res.out)


def test_visible_keys_chunk():
    from nqpq_kernels.reference import visible_keys

    i = torch.arange(10)
    want = (i[None, :] <= i[:, None]) & (i[None, :] // 4 == i[:, None] // 4)
    assert torch.equal(visible_keys(10, None, "cpu", 4), want)
    assert torch.equal(visible_keys(10, None, "cpu", 10), visible_keys(10, None, "cpu"))

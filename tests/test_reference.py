"""residual_attention (torch backend) and residual_attention_reference against a plain float64 loop."""

from __future__ import annotations

import math

import pytest
import torch

from nqpq import residual_attention, residual_attention_reference

MODES = ("top1", "full", "lowrank")
SHAPES = [(1, 1, 16), (2, 3, 32), (1, 2, 64)]  # (B, H, D)


def plain(q, k, v, mode, basis=None, d_r=None, scale=None):
    """The spec's formulas, one (b, h) at a time, in float64. Returns (out, argmax, gram)."""
    B, H, T, D = q.shape
    scale = D**-0.5 if scale is None else scale
    out = torch.zeros(B, H, T, D, dtype=torch.float64)
    arg = torch.zeros(B, H, T, dtype=torch.long)
    gram = torch.zeros(H, D, D, dtype=torch.float64)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    for b in range(B):
        for h in range(H):
            qq, kk, vv = (x[b, h].double() for x in (q, k, v))
            scores = (qq @ kk.T * scale).masked_fill(~causal, -math.inf)
            p = scores.softmax(-1)
            i_star = torch.argmax(p, dim=-1)
            ctx = p @ vv
            v_star = vv[i_star]
            eps = ctx - v_star
            if mode == "top1":
                o = v_star
            elif mode == "full":
                o = ctx
            else:
                P = basis[h, :, :d_r].double()
                o = v_star + eps @ P @ P.T
            out[b, h], arg[b, h] = o, i_star
            gram[h] += eps.T @ eps
    return out, arg, gram


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
    ref_out, _, _ = residual_attention_reference(q, k, v, **kw)
    return op_out, ref_out


@pytest.mark.parametrize("B,H,D", SHAPES)
@pytest.mark.parametrize("T", [1, 2, 63, 77])
@pytest.mark.parametrize("mode", ["top1", "full"])
def test_top1_full_match_plain_fp32(B, H, D, T, mode):
    q, k, v = random_qkv(B, H, T, D, seed=T + D)
    want, _, _ = plain(q, k, v, mode)
    for got in run_both(q, k, v, mode=mode):
        assert got.dtype == torch.float32 and got.shape == (B, H, T, D)
        torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("B,H,D", SHAPES)
@pytest.mark.parametrize("T", [1, 2, 63, 77])
def test_lowrank_matches_plain_fp32(B, H, D, T):
    q, k, v = random_qkv(B, H, T, D, seed=T * D)
    basis = random_basis(H, D)
    for d_r in sorted({0, 1, 5, D}):
        want, _, _ = plain(q, k, v, "lowrank", basis, d_r)
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
    want, _, _ = plain(q, k, v, "lowrank", basis, 4)
    for got in run_both(q, k, v, mode="lowrank", basis=basis, d_r=4):
        torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 1e-2), (torch.bfloat16, 4e-2)])
@pytest.mark.parametrize("mode", MODES)
def test_half_precision_inputs(dtype, tol, mode):
    B, H, T, D = 2, 2, 50, 32
    q, k, v = random_qkv(B, H, T, D, dtype=dtype, seed=11)
    basis = random_basis(H, D)
    kw = {"basis": basis, "d_r": 5} if mode == "lowrank" else {}
    want, _, _ = plain(q, k, v, mode, basis, 5)
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
    _, got_ref, _ = residual_attention_reference(q, k, v, mode="top1", scale=0.25, return_argmax=True)
    scores = (q[0, 0] @ k[0, 0].T) * 0.25
    for t in range(T):
        row = scores[t, : t + 1]
        first = int((row == row.max()).nonzero()[0])
        assert int(got_op[0, 0, t]) == first and int(got_ref[0, 0, t]) == first, t
    assert int(got_ref[0, 0, 4]) == 0
    want, want_arg, _ = plain(q, k, v, "top1", scale=0.25)
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
    want, _, _ = plain(q, k, v, mode, basis, 5)
    contiguous = [x.contiguous() for x in (q, k, v)]
    for got, same in zip(run_both(q, k, v, mode=mode, **kw), run_both(*contiguous, mode=mode, **kw)):
        torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got, same, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("mode", MODES)
def test_custom_scale(mode):
    q, k, v = random_qkv(1, 2, 33, 16, seed=8)
    basis = random_basis(2, 16)
    kw = {"basis": basis, "d_r": 3} if mode == "lowrank" else {}
    want, _, _ = plain(q, k, v, mode, basis, 3, scale=0.37)
    for got in run_both(q, k, v, mode=mode, scale=0.37, **kw):
        torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
    if mode != "top1":  # a positive scale never moves the argmax, so top1 cannot tell
        default, _ = run_both(q, k, v, mode=mode, **kw)
        assert not torch.allclose(default, got)


def test_return_argmax():
    q, k, v = random_qkv(2, 3, 45, 32, seed=12)
    _, want_arg, _ = plain(q, k, v, "full")
    out, arg = residual_attention(q, k, v, mode="full", backend="torch", return_argmax=True)
    assert arg.dtype == torch.int64 and arg.shape == (2, 3, 45)
    assert torch.equal(arg, want_arg)
    assert torch.equal(out, residual_attention(q, k, v, mode="full", backend="torch"))
    _, ref_arg, gram = residual_attention_reference(q, k, v, mode="full", return_argmax=True)
    assert torch.equal(ref_arg, want_arg) and gram is None
    _, none_arg, _ = residual_attention_reference(q, k, v, mode="full")
    assert none_arg is None


@pytest.mark.parametrize("mode", MODES)
def test_return_gram(mode):
    B, H, T, D = 2, 3, 41, 16
    q, k, v = random_qkv(B, H, T, D, seed=13)
    basis = random_basis(H, D)
    kw = {"basis": basis, "d_r": 4} if mode == "lowrank" else {}
    out, _, gram = residual_attention_reference(q, k, v, mode=mode, return_gram=True, **kw)
    _, _, want = plain(q, k, v, mode, basis, 4)
    assert gram.dtype == torch.float64 and gram.shape == (H, D, D)
    torch.testing.assert_close(gram, want, atol=1e-4 * want.abs().max().item(), rtol=1e-5)
    assert torch.equal(gram, gram.transpose(1, 2))
    assert torch.equal(out, residual_attention_reference(q, k, v, mode=mode, **kw)[0])


@pytest.mark.parametrize("mode", MODES)
def test_out_layout_bthd(mode):
    q, k, v = random_qkv(2, 3, 17, 16, seed=14)
    basis = random_basis(3, 16)
    kw = {"basis": basis, "d_r": 2} if mode == "lowrank" else {}
    bhtd, _, _ = residual_attention_reference(q, k, v, mode=mode, **kw)
    bthd, _, _ = residual_attention_reference(q, k, v, mode=mode, out_layout="bthd", **kw)
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

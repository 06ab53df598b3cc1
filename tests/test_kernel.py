"""Tests of the fused Triton residual-attention kernel (``nqpq_kernels``).

Without CUDA they run under Triton's CPU interpreter (TRITON_INTERPRET=1, set
here before triton is imported).  The kernel is checked against an independent
float64 implementation written below *and* against ``nqpq.reference``.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

import nqpq_kernels  # noqa: E402
from nqpq_kernels import residual_attention as ra_mod  # noqa: E402
from nqpq_kernels import residual_attention_triton  # noqa: E402

from nqpq.reference import residual_attention_reference  # noqa: E402

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

# Tolerances of the kernel output against float64 math (output tensor in its dtype).
TOL = {
    torch.float32: dict(atol=2e-5, rtol=1e-5),
    torch.float16: dict(atol=1e-2, rtol=5e-3),
    torch.bfloat16: dict(atol=6e-2, rtol=2e-2),
}
GRAM_RTOL = {torch.float32: 1e-4, torch.float16: 3e-3, torch.bfloat16: 2e-2}
TIE_RTOL = 1e-4  # relative top-2 gap of p below which a row counts as a near-tie


# --------------------------------------------------------------------------- #
# Independent plain implementation (float64, per-head Python loop)
# --------------------------------------------------------------------------- #
def plain_softmax(q, k, scale):
    """float64 causal softmax p [B, H, T, T]."""
    B, H, T, D = q.shape
    p = torch.empty(B, H, T, T, dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            s = q[b, h].double().cpu() @ k[b, h].double().cpu().T * scale
            s = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
            p[b, h] = torch.softmax(s, dim=-1)
    return p


def plain_outputs(q, k, v, p, idx, mode, basis, d_r):
    """out [B,H,T,D] float64 and gram [H,D,D] float64 for the given argmax ``idx``."""
    B, H, T, D = q.shape
    out = torch.empty(B, H, T, D, dtype=torch.float64)
    gram = torch.zeros(H, D, D, dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            vh = v[b, h].double().cpu()
            ctx = p[b, h] @ vh
            v_star = vh[idx[b, h].cpu()]
            eps = ctx - v_star
            gram[h] += eps.T @ eps
            if mode == "top1":
                out[b, h] = v_star
            elif mode == "full":
                out[b, h] = ctx
            else:
                P = basis[h, :, :d_r].double().cpu()
                out[b, h] = v_star + (eps @ P) @ P.T
    return out, gram


def check_argmax(idx, p):
    """Kernel index must be a maximum of p: exact where the top-2 gap is clear. Returns the clear mask."""
    idx = idx.cpu()
    top2 = p.topk(min(2, p.shape[-1]), dim=-1).values
    p1 = top2[..., 0]
    gap = (p1 - top2[..., 1]) if p.shape[-1] > 1 else torch.ones_like(p1)
    clear = gap > TIE_RTOL * p1
    ref_idx = p.argmax(dim=-1)
    assert torch.equal(idx[clear], ref_idx[clear]), "argmax differs on rows with a clear maximum"
    p_at = p.gather(-1, idx.unsqueeze(-1)).squeeze(-1)
    assert bool((p_at >= p1 * (1 - 2 * TIE_RTOL)).all()), "argmax is not a (near-)maximum of p"
    # Causality of the index itself.
    T = p.shape[-1]
    assert bool((idx <= torch.arange(T)).all()) and bool((idx >= 0).all())
    return clear


def make_basis(H, D, seed=0, R=None):
    g = torch.Generator().manual_seed(seed)
    Q = torch.linalg.qr(torch.randn(H, D, D, generator=g, dtype=torch.float64))[0].float()
    if R is not None:
        Q = Q[:, :, :R]
    return Q.to(DEV)


def rand_qkv(B, H, T, D, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, T, D, generator=g).to(device=DEV, dtype=dtype) for _ in range(3)]


def run_and_check(q, k, v, mode, d_r=None, basis=None, return_gram=True, out_layout="bhtd", **kw):
    """Run kernel + plain + reference and compare everything."""
    B, H, T, D = q.shape
    dtype = q.dtype
    scale = D**-0.5
    out, idx, gram = residual_attention_triton(
        q, k, v, mode=mode, basis=basis, d_r=d_r, return_argmax=True, return_gram=return_gram,
        out_layout=out_layout, **kw,
    )
    assert out.dtype == dtype and idx.dtype == torch.int64
    if out_layout == "bthd":
        assert out.shape == (B, T, H, D) and out.is_contiguous()
        out_bhtd = out.transpose(1, 2)
    else:
        assert out.shape == (B, H, T, D)
        out_bhtd = out
    assert idx.shape == (B, H, T)
    assert not torch.isnan(out).any()

    p = plain_softmax(q, k, scale)
    check_argmax(idx, p)
    exp_out, exp_gram = plain_outputs(q, k, v, p, idx, mode, basis, d_r)
    torch.testing.assert_close(out_bhtd.double().cpu(), exp_out, **TOL[dtype], check_dtype=False)

    if return_gram:
        assert gram.dtype == torch.float64 and gram.shape == (H, D, D)
        scale_g = exp_gram.abs().max().clamp_min(1e-12)
        assert float((gram.cpu() - exp_gram).abs().max() / scale_g) < GRAM_RTOL[dtype]
    else:
        assert gram is None

    # Against the package reference (rows where both pick the same index).
    r_out, r_idx, r_gram = residual_attention_reference(
        q, k, v, mode=mode, basis=basis, d_r=d_r, return_argmax=True, return_gram=return_gram,
        out_layout=out_layout,
    )
    same = (r_idx == idx)
    if out_layout == "bthd":
        same_o = same.transpose(1, 2)
    else:
        same_o = same
    rows = same_o if mode != "full" else torch.ones_like(same_o)
    torch.testing.assert_close(out[rows].float(), r_out[rows].float(), **TOL[dtype])
    if return_gram:
        scale_g = r_gram.abs().max().clamp_min(1e-12)
        assert float((gram - r_gram).abs().max() / scale_g) < GRAM_RTOL[dtype]
    return out, idx, gram


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
    out, idx, _ = run_and_check(q, k, v, "lowrank", d_r=d_r, basis=basis)
    if d_r == 0:  # no correction: exactly top1
        top1, _, _ = residual_attention_triton(q, k, v, mode="top1")
        torch.testing.assert_close(out, top1, atol=0, rtol=0)
    if d_r == D:  # complete orthonormal basis: lowrank == full
        full, _, _ = residual_attention_triton(q, k, v, mode="full")
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
    out, _, _ = run_and_check(q, k, v, mode, d_r=d_r, basis=basis, out_layout="bthd")
    out_b, _, _ = residual_attention_triton(q, k, v, mode=mode, basis=basis, d_r=d_r)
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
        out, idx, _ = residual_attention_triton(
            q, k, v, mode=mode, basis=basis, d_r=3 if mode == "lowrank" else None, return_argmax=True
        )
        r_out, r_idx, _ = residual_attention_reference(
            q, k, v, mode=mode, basis=basis, d_r=3 if mode == "lowrank" else None, return_argmax=True
        )
        assert torch.equal(idx, r_idx)
        p = plain_softmax(q, k, D**-0.5)
        assert torch.equal(idx.cpu(), p.argmax(-1))
        torch.testing.assert_close(out.float(), r_out.float(), **TOL[dtype])
    # There really were ties, and the kernel picked the first of them.
    n_ties = (p == p.max(-1, keepdim=True).values).sum(-1)
    assert int((n_ties > 1).sum()) > 10


@pytest.mark.parametrize("out_layout", ["bhtd", "bthd"])
@pytest.mark.parametrize("mode", MODES)
def test_poisoned_output_fully_written(mode, out_layout):
    B, H, T, D = 1, 2, 37, 16
    q, k, v = rand_qkv(B, H, T, D, torch.float16, seed=2)
    shape = (B, H, T, D) if out_layout == "bhtd" else (B, T, H, D)
    poisoned = torch.full(shape, float("nan"), device=DEV, dtype=torch.float16)
    basis = make_basis(H, D) if mode == "lowrank" else None
    out, _, _ = residual_attention_triton(
        q, k, v, mode=mode, basis=basis, d_r=2 if mode == "lowrank" else None,
        out_layout=out_layout, out=poisoned,
    )
    assert out.data_ptr() == poisoned.data_ptr()
    assert not torch.isnan(out).any()
    r_out, _, _ = residual_attention_reference(
        q, k, v, mode=mode, basis=basis, d_r=2 if mode == "lowrank" else None, out_layout=out_layout
    )
    torch.testing.assert_close(out.float(), r_out.float(), **TOL[torch.float16])


@pytest.mark.parametrize("block_m,block_n", [(16, 16), (64, 16), (32, 32), (64, 64)])
def test_other_tilings(monkeypatch, block_m, block_n):
    """The kernel is correct for other block shapes than the default (diagonal splitting)."""
    monkeypatch.setattr(
        ra_mod, "_pick_config",
        lambda *a, **k: dict(BLOCK_M=block_m, BLOCK_N=block_n, num_warps=4, num_stages=2),
    )
    B, H, T, D = 1, 2, 130, 32
    q, k, v = rand_qkv(B, H, T, D, torch.float32, seed=block_m + block_n)
    run_and_check(q, k, v, "lowrank", d_r=5, basis=make_basis(H, D))
    run_and_check(q, k, v, "top1", return_gram=False)


def test_allow_tf32_and_custom_scale():
    B, H, T, D = 1, 2, 30, 16
    q, k, v = rand_qkv(B, H, T, D, torch.float32, seed=4)
    basis = make_basis(H, D)
    out, idx, gram = residual_attention_triton(
        q, k, v, mode="lowrank", basis=basis, d_r=4, scale=0.7, allow_tf32=True,
        return_argmax=True, return_gram=True,
    )
    r_out, r_idx, r_gram = residual_attention_reference(
        q, k, v, mode="lowrank", basis=basis, d_r=4, scale=0.7, return_argmax=True, return_gram=True
    )
    same = idx == r_idx
    assert float(same.float().mean()) > 0.9
    torch.testing.assert_close(out[same], r_out[same], atol=5e-2, rtol=5e-2)
    assert float((gram - r_gram).abs().max() / r_gram.abs().max()) < 5e-2


def test_exports():
    assert nqpq_kernels.residual_attention_triton is residual_attention_triton
    out, a, g = residual_attention_triton(*rand_qkv(1, 1, 3, 16, torch.float32), mode="full")
    assert a is None and g is None and out.shape == (1, 1, 3, 16)


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


def test_error_bad_head_dim():
    q, k, v = _qkv(D=24)
    with pytest.raises(ValueError, match="head dims"):
        residual_attention_triton(q, k, v, mode="full")


def test_error_last_dim_not_contiguous():
    q, k, v = _qkv(D=32)
    q2 = q.repeat_interleave(2, dim=-1)[..., ::2]  # [.., 32], stride(-1) == 2
    assert q2.stride(-1) == 2
    with pytest.raises(ValueError, match=r"stride\(-1\) == 1"):
        residual_attention_triton(q2, k, v, mode="full")


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
def _gpu_p_stats(q, k, scale):
    """fp32 p on the GPU -> (p1, top-2 gap) [B,H,T] and the value p[idx] getter."""
    T = q.shape[2]
    s = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    s.masked_fill_(torch.ones(T, T, dtype=torch.bool, device=q.device).triu_(1), float("-inf"))
    return torch.softmax(s, dim=-1)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("T", [256, 1024, 2048])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("mode", MODES)
def test_gpu_vs_reference(mode, dtype, T, D):
    B, H = 2, 4
    g = torch.Generator(device="cuda").manual_seed(T + D)
    q, k, v = (torch.randn(B, H, T, D, device="cuda", generator=g).to(dtype) for _ in range(3))
    basis = torch.linalg.qr(torch.randn(H, D, D, device="cuda", generator=g))[0]
    d_r = D // 4 if mode == "lowrank" else None
    out, idx, gram = residual_attention_triton(
        q, k, v, mode=mode, basis=basis if mode == "lowrank" else None, d_r=d_r,
        return_argmax=True, return_gram=True,
    )
    torch.cuda.synchronize()
    # Reference in fp32 on the upcast inputs.
    r_out, r_idx, r_gram = residual_attention_reference(
        q.float(), k.float(), v.float(), mode=mode, basis=basis if mode == "lowrank" else None, d_r=d_r,
        return_argmax=True, return_gram=True,
    )
    assert not torch.isnan(out).any()
    # argmax: exact on clear rows, a near-maximum elsewhere.
    p = _gpu_p_stats(q, k, D**-0.5)
    top2 = p.topk(2, dim=-1).values
    p1 = top2[..., 0]
    clear = (p1 - top2[..., 1]) > TIE_RTOL * p1
    clear[..., 0] = True  # a single visible key
    assert torch.equal(idx[clear], r_idx[clear])
    p_at = p.gather(-1, idx.unsqueeze(-1)).squeeze(-1)
    assert bool((p_at >= p1 * (1 - 2 * TIE_RTOL)).all())
    del p
    rows = (idx == r_idx) if mode != "full" else torch.ones_like(idx, dtype=torch.bool)
    tol = dict(TOL[dtype])
    if dtype == torch.float32:
        tol = dict(atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out[rows].float(), r_out[rows], **tol)
    # Gram against float64 Σ εεᵀ built from the fp32 reference ctx and the kernel's own index
    # (so near-tie rows where the two indices differ do not matter).
    ctx, _, _ = residual_attention_reference(q.float(), k.float(), v.float(), mode="full")
    v_star = torch.gather(v.float(), 2, idx.unsqueeze(-1).expand(B, H, T, D))
    eps = (ctx - v_star).double()
    exp_gram = torch.einsum("bhti,bhtj->hij", eps, eps)
    rel = float((gram - exp_gram).abs().max() / exp_gram.abs().max())
    assert rel < GRAM_RTOL[dtype] * 3
    if bool((idx == r_idx).all()):
        assert float((gram - r_gram).abs().max() / r_gram.abs().max()) < GRAM_RTOL[dtype] * 3


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_packed_bthd(dtype):
    B, H, T, D = 2, 4, 1000, 64
    qkv = torch.randn(B, T, 3 * H * D, device="cuda", dtype=dtype)
    q, k, v = (t.view(B, T, H, D).transpose(1, 2) for t in qkv.split(H * D, dim=-1))
    basis = torch.linalg.qr(torch.randn(H, D, D, device="cuda"))[0]
    poisoned = torch.full((B, T, H, D), float("nan"), device="cuda", dtype=dtype)
    out, idx, _ = residual_attention_triton(
        q, k, v, mode="lowrank", basis=basis, d_r=8, return_argmax=True, out_layout="bthd", out=poisoned
    )
    r_out, r_idx, _ = residual_attention_reference(
        q.float(), k.float(), v.float(), mode="lowrank", basis=basis, d_r=8, return_argmax=True,
        out_layout="bthd",
    )
    assert not torch.isnan(out).any()
    rows = (idx == r_idx).transpose(1, 2)
    torch.testing.assert_close(out[rows].float(), r_out[rows], **TOL[dtype])


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

"""Fused Triton forward kernel for residual attention (EXP-Q03).

Per (b, h) with q, k, v ``[T, D]``::

    p   = causal softmax(q kᵀ · scale)           (float32)
    i*  = argmax_j p[j]                           (first index on ties)
    ctx = p @ V,   ε = ctx − V[i*]
    top1 → V[i*];  full → ctx;  lowrank → V[i*] + (ε P) Pᵀ,  P = basis[h, :, :d_r]

Modelled on Triton's fused-attention tutorial (06-fused-attention): a grid of
``(cdiv(T, BLOCK_M), B * H)`` programs, each owning ``BLOCK_M`` queries and
walking the key tiles up to the causal diagonal with an online softmax.  The
argmax is tracked on the same fp32 scaled scores the softmax uses (the running
row maximum of the softmax *is* the running best score), so it costs one extra
reduction per tile.  ``mode == "top1"`` without a Gram request skips the
``P @ V`` accumulation entirely.

The module never touches the CUDA driver at import time: block sizes come from a
plain heuristic table evaluated inside the launcher.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = ["residual_attention_triton", "SUPPORTED_HEAD_DIMS"]

SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)
OUT_LAYOUTS = ("bhtd", "bthd")
_MODE_IDS = {"top1": 0, "full": 1, "lowrank": 2}


# --------------------------------------------------------------------------- #
# Kernel
# --------------------------------------------------------------------------- #
@triton.jit
def _attn_fwd_inner(
    acc, l_i, m_i, best_idx,
    q, k_base, v_base, stride_kt, stride_vt,
    offs_m, offs_n, offs_d,
    scale, lo, hi, T,
    BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr,
    NEED_CTX: tl.constexpr,
    DOT_PREC: tl.constexpr,
    DOT_F32: tl.constexpr,
):
    """Walk key tiles [lo, hi); ``m_i`` is both the softmax running max and the best score."""
    LOG2E: tl.constexpr = 1.4426950408889634
    BIG: tl.constexpr = 2147483647
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        cols = start_n + offs_n  # int32 [BLOCK_N]
        rows64 = cols.to(tl.int64)
        k_ptrs = k_base + rows64[:, None] * stride_kt + offs_d[None, :]
        if MASKED:
            k = tl.load(k_ptrs, mask=(cols < T)[:, None], other=0.0)
        else:
            k = tl.load(k_ptrs)
        if DOT_F32:
            k = k.to(tl.float32)
        # fp32 scaled scores, exactly what the softmax (and the argmax) sees.
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * scale
        if MASKED:
            valid = (cols[None, :] <= offs_m[:, None]) & (cols[None, :] < T)
            s = tl.where(valid, s, float("-inf"))
        # Tile maximum and the first key index reaching it.
        t_max = tl.max(s, 1)
        t_idx = tl.min(tl.where(s == t_max[:, None], cols[None, :], BIG), 1)
        take = (t_max > m_i) | ((t_max == m_i) & (t_idx < best_idx))
        best_idx = tl.where(take, t_idx, best_idx)
        m_new = tl.maximum(m_i, t_max)
        if NEED_CTX:
            alpha = tl.exp2((m_i - m_new) * LOG2E)
            p = tl.exp2((s - m_new[:, None]) * LOG2E)
            l_i = l_i * alpha + tl.sum(p, 1)
            v_ptrs = v_base + rows64[:, None] * stride_vt + offs_d[None, :]
            if MASKED:
                v = tl.load(v_ptrs, mask=(cols < T)[:, None], other=0.0)
            else:
                v = tl.load(v_ptrs)
            if DOT_F32:
                v = v.to(tl.float32)
            acc = acc * alpha[:, None]
            acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PREC)
        m_i = m_new
    return acc, l_i, m_i, best_idx


@triton.jit(do_not_specialize=["n_m_blocks", "d_r"])
def _residual_attn_fwd(
    Q, K, V, Out, Argmax, Basis, Gram,
    stride_qb, stride_qh, stride_qt,
    stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt,
    stride_ob, stride_oh, stride_ot,
    stride_ab, stride_ah,
    stride_ph, stride_pd, stride_pr,
    H, T, n_m_blocks, d_r, scale,
    D: tl.constexpr,
    R_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    MODE: tl.constexpr,  # 0 top1, 1 full, 2 lowrank
    NEED_CTX: tl.constexpr,
    STORE_ARGMAX: tl.constexpr,
    STORE_GRAM: tl.constexpr,
    DOT_PREC: tl.constexpr,
    EPI_PREC: tl.constexpr,
    DOT_F32: tl.constexpr,  # upcast operands to fp32 (only for bf16 under the CPU interpreter)
):
    start_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // H).to(tl.int64)
    off_h = (pid_bh % H).to(tl.int64)

    q_base = Q + off_b * stride_qb + off_h * stride_qh
    k_base = K + off_b * stride_kb + off_h * stride_kh
    v_base = V + off_b * stride_vb + off_h * stride_vh
    o_base = Out + off_b * stride_ob + off_h * stride_oh

    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)  # int32 query rows
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    mask_m = offs_m < T
    offs_m64 = offs_m.to(tl.int64)

    q = tl.load(q_base + offs_m64[:, None] * stride_qt + offs_d[None, :], mask=mask_m[:, None], other=0.0)
    if DOT_F32:
        q = q.to(tl.float32)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, D], dtype=tl.float32)
    best_idx = tl.full([BLOCK_M], 2147483647, dtype=tl.int32)

    # Stage 1: key tiles strictly below this query block (all keys < T, all visible).
    lo = start_m * BLOCK_M
    acc, l_i, m_i, best_idx = _attn_fwd_inner(
        acc, l_i, m_i, best_idx, q, k_base, v_base, stride_kt, stride_vt,
        offs_m, offs_n, offs_d, scale, 0, lo, T,
        BLOCK_N, False, NEED_CTX, DOT_PREC, DOT_F32,
    )
    # Stage 2: the diagonal block (causal + sequence-end mask).
    hi = tl.minimum(lo + BLOCK_M, T)
    acc, l_i, m_i, best_idx = _attn_fwd_inner(
        acc, l_i, m_i, best_idx, q, k_base, v_base, stride_kt, stride_vt,
        offs_m, offs_n, offs_d, scale, lo, hi, T,
        BLOCK_N, True, NEED_CTX, DOT_PREC, DOT_F32,
    )

    # ---- epilogue ----------------------------------------------------------
    best64 = best_idx.to(tl.int64)
    v_star = tl.load(
        v_base + best64[:, None] * stride_vt + offs_d[None, :], mask=mask_m[:, None], other=0.0
    ).to(tl.float32)

    if NEED_CTX:
        ctx = acc / l_i[:, None]
        eps = tl.where(mask_m[:, None], ctx - v_star, 0.0)

    if MODE == 0:
        out = v_star
    elif MODE == 1:
        out = ctx
    else:
        offs_r = tl.arange(0, R_PAD)
        p_ptrs = Basis + off_h * stride_ph + offs_d[:, None] * stride_pd + offs_r[None, :] * stride_pr
        # Columns >= d_r read as zero: one compiled kernel serves every rank of a sweep.
        P = tl.load(p_ptrs, mask=(offs_r < d_r)[None, :], other=0.0)  # [D, R_PAD] fp32
        coeff = tl.dot(eps, P, input_precision=EPI_PREC)  # [BLOCK_M, R_PAD]
        out = tl.dot(coeff, tl.trans(P), v_star, input_precision=EPI_PREC)  # V[i*] + (εP)Pᵀ

    o_ptrs = o_base + offs_m64[:, None] * stride_ot + offs_d[None, :]
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=mask_m[:, None])

    if STORE_ARGMAX:
        a_ptrs = Argmax + off_b * stride_ab + off_h * stride_ah + offs_m64
        tl.store(a_ptrs, best64, mask=mask_m)

    if STORE_GRAM:
        g = tl.dot(tl.trans(eps), eps, input_precision=EPI_PREC)  # [D, D] fp32 partial
        pid_lin = pid_bh.to(tl.int64) * n_m_blocks + start_m
        g_ptrs = Gram + pid_lin * (D * D) + offs_d[:, None] * D + offs_d[None, :]
        tl.store(g_ptrs, g)


# --------------------------------------------------------------------------- #
# Launcher
# --------------------------------------------------------------------------- #
def _interpret_mode() -> bool:
    """True when Triton runs in its CPU interpreter (read at call time)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def interpreter_active() -> bool:
    """True when the kernel (and triton.language's own jit helpers) were built for the interpreter.

    Triton reads TRITON_INTERPRET when a function is decorated, i.e. when triton and this module
    are imported, so setting the variable later has no effect.
    """
    return all(
        type(f).__name__ == "InterpretedFunction" for f in (_residual_attn_fwd, _attn_fwd_inner, tl.zeros)
    )


def _check_backend_device(device: torch.device) -> None:
    if device.type == "cuda":
        return
    if device.type == "cpu" and _interpret_mode():
        if not interpreter_active():
            raise RuntimeError(
                'backend="triton" on CPU: TRITON_INTERPRET=1 is set but triton (or nqpq_kernels) was '
                "imported before it was; set TRITON_INTERPRET=1 in the environment before importing "
                'triton, or use backend="torch".'
            )
        return
    raise RuntimeError(
        f'backend="triton" needs CUDA tensors (or CPU tensors with TRITON_INTERPRET=1 set before '
        f"triton is imported); got tensors on {device}. Use backend=\"torch\" for the reference path."
    )


def _pick_config(D: int, dtype: torch.dtype, mode: str, return_gram: bool, device: torch.device) -> dict:
    """Block sizes / launch options. A fixed small config for the interpreter, a table on CUDA."""
    if device.type != "cuda":
        # The interpreter ignores num_warps/num_stages; BLOCK_M > BLOCK_N exercises both stages.
        return dict(BLOCK_M=32, BLOCK_N=16, num_warps=4, num_stages=1)
    heavy_epilogue = mode == "lowrank" or return_gram  # fp32 [*, D] x [D, D] epilogue dots
    if dtype in (torch.float16, torch.bfloat16):
        if D <= 64:
            # H100, bf16, B=32 H=12 D=64 (benchmarks.tune, 2026-11-27): 64/64/4 warps/3 stages was the
            # fastest of the 20 configs tried for full and lowrank at T=256 and T=1024 (T=1024: full 0.205 ms,
            # lowrank 0.301 ms, vs 0.222 / 0.350 ms with 128/64).
            cfg = dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3)
        else:
            cfg = dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3)
    else:  # fp32 operands: twice the bytes per tile
        if D <= 64:
            cfg = dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=2)
        else:
            cfg = dict(BLOCK_M=64, BLOCK_N=32, num_warps=8, num_stages=2)
    if D == 128 and heavy_epilogue and cfg["BLOCK_M"] > 64:
        cfg["BLOCK_M"] = 64
    return cfg


def residual_attention_triton(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    mode: str,
    basis: Tensor | None = None,
    d_r: int | None = None,
    scale: float | None = None,
    return_argmax: bool = False,
    return_gram: bool = False,
    out_layout: str = "bhtd",
    allow_tf32: bool = False,
    out: Tensor | None = None,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Fused residual attention; same contract as ``nqpq.reference.residual_attention_reference``.

    Returns ``(out, argmax, gram)``: ``out`` in the input dtype, ``[B, H, T, D]``
    (``out_layout="bhtd"``) or a contiguous ``[B, T, H, D]`` (``"bthd"``);
    ``argmax`` int64 ``[B, H, T]`` or None; ``gram`` float64 ``[H, D, D]`` =
    Σ_{b,t} ε εᵀ or None.

    ``out`` (keyword-only, optional) is a preallocated output of the right shape,
    dtype and device with a unit last stride; mainly a test hook.
    """
    from nqpq.validate import check_residual_attention_inputs  # late import: no cycles

    d_r, scale = check_residual_attention_inputs(q, k, v, mode, basis, d_r, scale)
    if out_layout not in OUT_LAYOUTS:
        raise ValueError(f"out_layout must be 'bhtd' or 'bthd', got {out_layout!r}")
    _check_backend_device(q.device)
    B, H, T, D = q.shape
    if D not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f'backend="triton" supports head dims {SUPPORTED_HEAD_DIMS}, got D={D}')
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.stride(-1) != 1:
            raise ValueError(
                f"{name} must be contiguous in its last dimension (stride(-1) == 1), "
                f"got strides {tuple(t.stride())}"
            )

    device = q.device
    out_shape = (B, H, T, D) if out_layout == "bhtd" else (B, T, H, D)
    if out is None:
        out = torch.empty(out_shape, device=device, dtype=q.dtype)
    else:
        if not isinstance(out, Tensor):
            raise TypeError(f"out must be a torch.Tensor, got {type(out).__name__}")
        if tuple(out.shape) != out_shape or out.dtype != q.dtype or out.device != device:
            raise ValueError(
                f"out must be {out_shape} {q.dtype} on {device}, got {tuple(out.shape)} "
                f"{out.dtype} on {out.device}"
            )
        if out.stride(-1) != 1:
            raise ValueError(f"out must have stride(-1) == 1, got strides {tuple(out.stride())}")
    if out_layout == "bhtd":
        stride_ob, stride_oh, stride_ot = out.stride(0), out.stride(1), out.stride(2)
    else:
        stride_ob, stride_oh, stride_ot = out.stride(0), out.stride(2), out.stride(1)

    need_ctx = mode != "top1" or return_gram
    cfg = _pick_config(D, q.dtype, mode, return_gram, device)
    BLOCK_M, BLOCK_N = cfg["BLOCK_M"], cfg["BLOCK_N"]
    assert BLOCK_M % BLOCK_N == 0, "BLOCK_M must be a multiple of BLOCK_N (diagonal stage)"
    n_m = triton.cdiv(T, BLOCK_M)

    argmax = torch.empty((B, H, T), device=device, dtype=torch.int64) if return_argmax else None
    gram_buf = (
        torch.empty((B * H * n_m, D, D), device=device, dtype=torch.float32) if return_gram else None
    )

    # The basis is read in place through its strides (a copy only if it is not fp32); the kernel
    # masks columns >= d_r, and d_r <= min(R, D), so no padding is needed.
    R_PAD = D
    basis_f32 = basis.to(device=device, dtype=torch.float32) if mode == "lowrank" else None

    # fp32 inputs: exact fp32 dots ("ieee") unless tf32 is asked for. 16-bit inputs: the main dots
    # run on the inputs' own type (input_precision is moot there, pass Triton's default), and the
    # fp32 epilogue (projection, Gram) uses tf32: its 10-bit mantissa is at least the output's.
    precision = "ieee" if q.dtype == torch.float32 and not allow_tf32 else "tf32"
    # Triton's CPU interpreter computes bf16 tl.dot wrongly (numpy has no bfloat16), so there
    # the operands are upcast to fp32; compiled kernels always dot in the input dtype.
    dot_f32 = device.type != "cuda" and q.dtype == torch.bfloat16

    # Unused pointer arguments get a valid tensor (the kernel never dereferences them).
    dummy = out
    grid = (n_m, B * H)
    _residual_attn_fwd[grid](
        q, k, v, out,
        argmax if argmax is not None else dummy,
        basis_f32 if basis_f32 is not None else dummy,
        gram_buf if gram_buf is not None else dummy,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        stride_ob, stride_oh, stride_ot,
        argmax.stride(0) if argmax is not None else 0,
        argmax.stride(1) if argmax is not None else 0,
        *(basis_f32.stride() if basis_f32 is not None else (0, 0, 0)),
        H, T, n_m, d_r, scale,
        D=D,
        R_PAD=R_PAD,
        BLOCK_M=BLOCK_M,
        BLOCK_N=BLOCK_N,
        MODE=_MODE_IDS[mode],
        NEED_CTX=need_ctx,
        STORE_ARGMAX=return_argmax,
        STORE_GRAM=return_gram,
        DOT_PREC=precision,
        EPI_PREC=precision,
        DOT_F32=dot_f32,
        num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
    )

    gram = None
    if return_gram:
        gram = gram_buf.view(B, H, n_m, D, D).sum(dim=(0, 2), dtype=torch.float64)
    return out, argmax, gram

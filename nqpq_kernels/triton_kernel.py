"""Fused Triton forward kernel for residual attention (EXP-Q03).

Per (b, query head h), with kv head ``h // (Hq // Hkv)`` and q, k, v ``[T, D]``::

    s   = q kᵀ · scale,  s = c·tanh(s/c) (softcap),  masked to i - w < j <= i   (fp32)
    p   = softmax(s)
    i*  = first index of max_j s[j]               (= argmax p, taken on the exact scores)
    ctx = p @ V,   ε = ctx − V[i*]
    top1 → V[i*];  full → ctx;  lowrank → V[i*] + (ε P) Pᵀ,  P = basis[h, :, :d_r]

With ``sink_tokens=n > 0`` (S = visible keys j < n, R = visible keys j >= n; ``nqpq_kernels.reference`` has the math)::

    i*ᴿ = first index of max_{j∈R} s[j],   m_S = Σ_{j∈S} p[j]
    ground = Σ_{j∈S} p[j] V[j] + (1 − m_S) V[i*ᴿ]   (ctx where R has no finite score: rows t < n)
    ε = ctx − ground;  top1 → ground;  lowrank → ground + (ε P) Pᵀ

Modelled on Triton's fused-attention tutorial (06-fused-attention): a grid of
``(cdiv(T, BLOCK_M), B * Hq)`` programs (B·Hq chunked over CUDA's grid-y limit),
each owning ``BLOCK_M`` queries and walking the key tiles up to the causal
diagonal (from the start of its window, with a sliding window) with an online
softmax. The argmax is tracked on the same fp32 scores the softmax uses (the
running row maximum of the softmax *is* the running best score), so it costs
one extra reduction per tile, and the top-1 probability is ``1 / l`` at the end.
``mode == "top1"`` without a Gram or top1_prob request skips the exponentials
and the ``P @ V`` accumulation entirely.

The sink stays in the same pass: the key tiles that hold j < n (always the first ones walked) also sum
Σ_S exp(s − m) V and Σ_S exp(s − m) into a second accumulator under the softmax's online rescaling, and
track R's best score apart from the softmax max; later tiles leave the sink sums alone (one rescale in the
epilogue). ``HAS_SINK`` (n > 0) is the only compile-time switch, n itself a runtime argument: one compiled
kernel serves every n >= 1, and n = 0 runs the kernel without any sink code (the spec, bit for bit).
In top1 mode with a sink the exponentials are needed (m_S) but ``P @ V`` only over the sink tiles.

An explicit mask (``attn_mask``: ``HAS_BIAS``, one more compiled variant) decides visibility alone: the program
walks every key tile [0, Tk) (Tk may exceed T: keys a model appends) and adds the mask's fp32 [BLOCK_M, BLOCK_N]
tile (int64 offsets, masked loads, stride 0 on broadcast dims) to the capped scores; the causal walks are then
empty ranges, and the epilogue is the same code.

Head dims that are not a power of two (80, 96, ...) are padded to one inside the
kernel (masked loads and stores). Non-finite rows (a NaN score, or a best score
of ±inf) give NaN outputs, argmax -1, top1_prob and sink_mass NaN, and never an
out-of-range load.

The module never touches the CUDA driver at import time: block sizes come from the
plain rule table of ``nqpq_kernels.launch``, evaluated inside the launcher.
"""

from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from .contract import (
    OUT_LAYOUTS,
    TRITON_HEAD_DIMS,
    ResidualAttentionResult,
    check_choice,
    check_residual_attention_inputs,
)
from .launch import kernel_meta

__all__ = ["MAX_GRID_Y", "SUPPORTED_HEAD_DIMS", "residual_attention_triton"]

SUPPORTED_HEAD_DIMS = TRITON_HEAD_DIMS


# --------------------------------------------------------------------------- #
# Kernel
# --------------------------------------------------------------------------- #
@triton.jit
def _tanh(x):
    """fp32 tanh from exp (Triton's CPU interpreter has no libdevice, and one code path is tested).

    Below |x| = 0.4 an odd Taylor polynomial (truncation < 1e-8 relative); above, 1 − 2/(e^{2|x|} + 1),
    which has no cancellation there. Saturates to exactly ±1 (for |x| ≳ 9), as fp32 tanh does.
    """
    a = tl.abs(x)
    small = a < 0.4
    xs = tl.where(small, x, 0.0)  # each branch only sees its own inputs: no overflow in the unused one
    x2 = xs * xs
    poly = xs * (1.0 + x2 * (-0.3333333333333333 + x2 * (0.13333333333333333 + x2 * (
        -0.05396825396825397 + x2 * (0.021869488536155203 + x2 * (-0.008863235529902197
                                                                   + x2 * 0.003592128036572481))))))
    a = tl.where(a > 15.0, 15.0, a)  # tanh is 1.0f from ~9 on; a NaN fails the test and stays NaN
    big = 1.0 - 2.0 / (tl.exp(2.0 * a) + 1.0)
    big = tl.where(x < 0, -big, big)
    return tl.where(small, poly, big)


@triton.jit
def _halves(x, ROWS: tl.constexpr, WIDTH: tl.constexpr):
    """x [ROWS, WIDTH] -> its columns [0, WIDTH/2) and [WIDTH/2, WIDTH), exactly (no arithmetic)."""
    return tl.split(tl.permute(tl.reshape(x, [ROWS, 2, WIDTH // 2]), (0, 2, 1)))


@triton.jit
def _tile_argmax(s, t_max, cols, n_sink, m_i, best_idx, m_r, m_s, idx_s, HAS_SINK: tl.constexpr,
                 IN_SINK: tl.constexpr):
    """The running argmax after one key tile (tiles come in increasing key order: a tie keeps the earlier index).
    s: the tile's masked fp32 scores [rows, BLOCK_N], t_max their row max, cols the key indices; m_i the softmax's
    running max before the tile (the best score without a sink). With a sink, ``m_r`` / ``best_idx`` track the best
    over R (keys j >= n) and, in the tiles holding a sink key (IN_SINK), ``m_s`` / ``idx_s`` the best over S.
    Shared by the prefill kernel's key loop and the decode kernel's split pass."""
    BIG: tl.constexpr = 2147483647
    if IN_SINK:
        # The argmax skips the sink: R's best here; S's best too (the index of rows whose R is empty).
        is_s = cols < n_sink
        s_r = tl.where(is_s[None, :], float("-inf"), s)
        r_max = tl.max(s_r, 1)
        r_idx = tl.min(tl.where(s_r == r_max[:, None], cols[None, :], BIG), 1)
        take = (r_max > m_r) | ((r_max == m_r) & (r_idx < best_idx))
        best_idx = tl.where(take, r_idx, best_idx)
        m_r = tl.maximum(m_r, r_max)
        s_s = tl.where(is_s[None, :], s, float("-inf"))
        sk_max = tl.max(s_s, 1)
        sk_idx = tl.min(tl.where(s_s == sk_max[:, None], cols[None, :], BIG), 1)
        take_s = (sk_max > m_s) | ((sk_max == m_s) & (sk_idx < idx_s))
        idx_s = tl.where(take_s, sk_idx, idx_s)
        m_s = tl.maximum(m_s, sk_max)
    else:
        t_idx = tl.min(tl.where(s == t_max[:, None], cols[None, :], BIG), 1)
        if HAS_SINK:  # every key here is in R, but R's best is not the softmax max
            take = (t_max > m_r) | ((t_max == m_r) & (t_idx < best_idx))
            m_r = tl.maximum(m_r, t_max)
        else:
            take = (t_max > m_i) | ((t_max == m_i) & (t_idx < best_idx))
        best_idx = tl.where(take, t_idx, best_idx)
    return best_idx, m_r, m_s, idx_s


@triton.jit
def _gram_block(g_base, eps, offs_dv, mask_dv, HEAD_DV: tl.constexpr, DV_PAD: tl.constexpr,
                GRAM_COLS: tl.constexpr, DOT_PREC: tl.constexpr):
    """Add εᵀ ε into the head's fp32 [HEAD_DV, HEAD_DV] Gram: whole, or GRAM_COLS columns per atomic step with ε's
    column block selected by a one-hot product (registers cannot be sliced; exact, 1·x + 0s; under tf32 it rounds
    ε as the Gram dot does). A [256, 256] fp32 block would need 256 KiB of shared memory on its way to the atomics
    (more than an SM has). Shared by the prefill kernel and the decode combine."""
    eps_t = tl.trans(eps)
    if GRAM_COLS == DV_PAD:
        g = tl.dot(eps_t, eps, input_precision=DOT_PREC)  # [DV_PAD, DV_PAD]
        tl.atomic_add(g_base + offs_dv[:, None] * HEAD_DV + offs_dv[None, :], g,
                      mask=mask_dv[:, None] & mask_dv[None, :])
    else:
        offs_c = tl.arange(0, GRAM_COLS)
        for c0 in tl.static_range(0, DV_PAD, GRAM_COLS):
            cols_g = c0 + offs_c
            select = (offs_dv[:, None] == cols_g[None, :]).to(tl.float32)  # [DV_PAD, GRAM_COLS]
            eps_c = tl.dot(eps, select, input_precision=DOT_PREC)
            g = tl.dot(eps_t, eps_c, input_precision=DOT_PREC)  # [DV_PAD, GRAM_COLS]
            tl.atomic_add(g_base + offs_dv[:, None] * HEAD_DV + cols_g[None, :], g,
                          mask=mask_dv[:, None] & (cols_g < HEAD_DV)[None, :])


@triton.jit
def _gram_cols(g_base, eps_t, eps_c, c0, offs_dv, mask_dv, HEAD_DV: tl.constexpr, GRAM_COLS: tl.constexpr,
               DOT_PREC: tl.constexpr):
    """Add εᵀ ε_c (the Gram's columns [c0, c0 + GRAM_COLS)) into the head's fp32 [HEAD_DV, HEAD_DV] Gram."""
    cols_g = c0 + tl.arange(0, GRAM_COLS)
    g = tl.dot(eps_t, eps_c, input_precision=DOT_PREC)  # [DV_PAD, GRAM_COLS]
    tl.atomic_add(g_base + offs_dv[:, None] * HEAD_DV + cols_g[None, :], g,
                  mask=mask_dv[:, None] & (cols_g < HEAD_DV)[None, :])


@triton.jit
def _gram_halves(g_base, eps_t, x, c0, offs_dv, mask_dv, HEAD_DV: tl.constexpr, GRAM_COLS: tl.constexpr,
                 DOT_PREC: tl.constexpr, ROWS: tl.constexpr):
    """The Gram's columns [c0, c0 + 2·GRAM_COLS) from x = ε's columns there ([ROWS, 2·GRAM_COLS]), in two steps."""
    e0, e1 = _halves(x, ROWS, 2 * GRAM_COLS)
    _gram_cols(g_base, eps_t, e0, c0, offs_dv, mask_dv, HEAD_DV, GRAM_COLS, DOT_PREC)
    _gram_cols(g_base, eps_t, e1, c0 + GRAM_COLS, offs_dv, mask_dv, HEAD_DV, GRAM_COLS, DOT_PREC)


@triton.jit
def _lowrank_vp_epilogue(ctx_r, ground, v_star, w_base, stride_wt, offs_w, safe_idx, bad, mask_m, Basis,
                         off_h, stride_ph, stride_pd, stride_pr, offs_dv, mask_dv, d_r, sink_part, sink_mass,
                         r_empty, m_learned, HAS_SINK: tl.constexpr, SINK_ACC: tl.constexpr, LEARNED: tl.constexpr,
                         DOT_PREC: tl.constexpr):
    """Low rank through V·P_r: ground + P_r (ctx_r − P_rᵀ ground), ctx_r = Σ p·(V P_r) (the key loop's
    normalized [BLOCK_M, DR_PAD] accumulator). P_rᵀ V[i*] is the gathered row (V P_r)[i*] (the same stored
    product the loop summed, so a one-hot row gives ε_r = 0 exactly); with a sink, P_rᵀ Σ_S p V is projected
    from the exact sink part; a learned sink scales the ground state by (1 − m_L) and changes nothing else."""
    w_star = tl.load(w_base + safe_idx.to(tl.int64)[:, None] * stride_wt + offs_w[None, :],
                     mask=mask_m[:, None], other=0.0).to(tl.float32)  # (V P_r)[i*]
    # P_r: the basis's first d_r columns (the rest read as 0: V·P_r's padding columns are 0 too).
    p_ptrs = Basis + off_h * stride_ph + offs_dv[:, None] * stride_pd + offs_w[None, :] * stride_pr
    P = tl.load(p_ptrs, mask=mask_dv[:, None] & (offs_w < d_r)[None, :], other=0.0)  # [DV_PAD, DR_PAD]
    if HAS_SINK:
        if SINK_ACC:
            ground_r = tl.dot(sink_part, P, input_precision=DOT_PREC) + (1.0 - sink_mass)[:, None] * w_star
        else:
            ground_r = w_star
    elif LEARNED:
        ground_r = (1.0 - m_learned)[:, None] * w_star
    else:
        ground_r = w_star
    eps_r = ctx_r - ground_r  # P_rᵀ ε
    if HAS_SINK:
        eps_r = tl.where((r_empty & (~bad))[:, None], 0.0, eps_r)  # ground = ctx: ε = 0 by definition
    eps_r = tl.where(mask_m[:, None], eps_r, 0.0)
    eps_r = tl.where(bad[:, None], float("nan"), eps_r)
    return tl.dot(eps_r, tl.trans(P), ground, input_precision=DOT_PREC)


@triton.jit
def _attn_fwd_inner(
    acc, l_i, m_i, best_idx, nan_row,
    m_r, acc_s, l_s, m_ref, m_s, idx_s,
    q, k_base, v_base, stride_kt, stride_vt,
    offs_m, offs_n, offs_d, mask_d, offs_dv, mask_dv,
    scale, softcap, row_lo, n_sink, lo, hi, T,
    BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr,  # apply the causal / sequence-end (and window / chunk) mask to this range
    WINDOWED: tl.constexpr,  # a per-row first visible key row_lo [BLOCK_M] (a sliding window or a chunk)
    EVEN_D: tl.constexpr,  # q/k's width is a power of two: no head-dim mask on K
    EVEN_DV: tl.constexpr,  # v's width is a power of two: no head-dim mask on V
    SOFTCAP: tl.constexpr,
    NEED_L: tl.constexpr,
    NEED_CTX: tl.constexpr,
    DOT_PREC: tl.constexpr,
    DOT_F32: tl.constexpr,
    HAS_SINK: tl.constexpr,  # sink_tokens > 0: the argmax state (m_r, best_idx) is over the keys j >= n only
    IN_SINK: tl.constexpr,  # this range holds the key tiles with j < n (always the first tiles walked)
    SINK_ACC: tl.constexpr,  # accumulate Σ_S p V (the ground state is needed: not for "full" without a Gram)
    bias_rows=None,  # HAS_BIAS: [BLOCK_M] pointers to each query row of attn_mask's fp32 bias
    row_ok=None,  # HAS_BIAS: [BLOCK_M] the query rows < Tq (the others read no bias)
    stride_bn=0,  # HAS_BIAS: the bias's key stride (0 where the mask broadcasts over keys)
    HAS_BIAS: tl.constexpr = False,  # add attn_mask's tile to the scores (T is then the key count Tk)
    w_base=None,  # VP: this head's V·P_r rows [Tk, DR_PAD] (the launcher's product, zero-padded columns)
    stride_wt=0,
    offs_w=None,  # VP: tl.arange(0, DR_PAD)
    VP: tl.constexpr = False,  # low rank through V·P_r: acc sums p·(V P_r) (d_r columns), not p·V
):
    """Walk key tiles [lo, hi).

    ``m_i`` is the softmax running max. Without a sink it is also the best score; with one, ``m_r`` /
    ``best_idx`` track the best score and its index over R (keys j >= n), and in the sink tiles ``m_s`` /
    ``idx_s`` the best over S, ``l_s`` / ``acc_s`` Σ_S exp(s − m) and Σ_S exp(s − m) V, relative to
    ``m_ref`` (the running max at the last sink tile: later tiles hold no sink key, so the epilogue
    rescales the sink sums once instead of every tile).
    """
    LOG2E: tl.constexpr = 1.4426950408889634
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        cols = start_n + offs_n  # int32 [BLOCK_N]
        rows64 = cols.to(tl.int64)
        k_ptrs = k_base + rows64[:, None] * stride_kt + offs_d[None, :]
        if MASKED:
            if EVEN_D:
                k = tl.load(k_ptrs, mask=(cols < T)[:, None], other=0.0)
            else:
                k = tl.load(k_ptrs, mask=(cols < T)[:, None] & mask_d[None, :], other=0.0)
        else:
            if EVEN_D:
                k = tl.load(k_ptrs)
            else:
                k = tl.load(k_ptrs, mask=mask_d[None, :], other=0.0)
        if DOT_F32:
            k = k.to(tl.float32)
        # fp32 scaled (capped) scores, exactly what the softmax (and the argmax) sees.
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * scale
        if SOFTCAP:
            s = _tanh(s / softcap) * softcap  # Gemma 2's order: divide, tanh, multiply; then mask
        if HAS_BIAS:
            # attn_mask, added to the scaled (capped) scores as transformers' eager attention adds it (a hidden key
            # is -inf here); keys past Tk are masked below, rows past Tq are never stored.
            b_ptrs = bias_rows[:, None] + rows64[None, :] * stride_bn
            s = s + tl.load(b_ptrs, mask=row_ok[:, None] & (cols < T)[None, :], other=0.0)
        if MASKED:
            valid = (cols[None, :] <= offs_m[:, None]) & (cols[None, :] < T)
            if WINDOWED:
                valid = valid & (cols[None, :] >= row_lo[:, None])
            s = tl.where(valid, s, float("-inf"))
        if not NEED_L:
            # A NaN among the visible scores marks the row non-finite (the epilogue writes NaN there);
            # dropping it from the max keeps the index search in range. With the softmax's sum this costs
            # nothing in the loop: a NaN score makes its exponential, hence l_i, NaN (l_i only rescales by
            # finite or NaN factors, never drops a term), and the epilogue reads the flag from l_i.
            is_nan = s != s
            nan_row = nan_row | (tl.max(is_nan.to(tl.int32), 1) > 0)
            s = tl.where(is_nan, float("-inf"), s)
        # Tile maximum and the first key index reaching it; tiles come in increasing key order.
        t_max = tl.max(s, 1)
        best_idx, m_r, m_s, idx_s = _tile_argmax(s, t_max, cols, n_sink, m_i, best_idx, m_r, m_s, idx_s,
                                                 HAS_SINK, IN_SINK)
        m_new = tl.maximum(m_i, t_max)
        if NEED_L:
            # A row that has seen only -inf so far subtracts 0, not -inf (no -inf - -inf = NaN).
            m_base = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2((m_i - m_base) * LOG2E)
            p = tl.exp2((s - m_base[:, None]) * LOG2E)
            l_i = l_i * alpha + tl.sum(p, 1)
            if IN_SINK:
                p_s = tl.where((cols < n_sink)[None, :], p, 0.0)
                l_s = l_s * alpha + tl.sum(p_s, 1)
                m_ref = m_base
            if NEED_CTX and VP:
                # Low rank through V·P_r: the P·V dot on DR_PAD columns of V·P_r instead of V's DV_PAD.
                w_ptrs = w_base + rows64[:, None] * stride_wt + offs_w[None, :]
                if MASKED:
                    w = tl.load(w_ptrs, mask=(cols < T)[:, None], other=0.0)
                else:
                    w = tl.load(w_ptrs)
                if DOT_F32:
                    w = w.to(tl.float32)
                acc = acc * alpha[:, None]
                acc = tl.dot(p.to(w.dtype), w, acc, input_precision=DOT_PREC)
            if (NEED_CTX and not VP) or (IN_SINK and SINK_ACC):
                v_ptrs = v_base + rows64[:, None] * stride_vt + offs_dv[None, :]
                if MASKED:
                    if EVEN_DV:
                        v = tl.load(v_ptrs, mask=(cols < T)[:, None], other=0.0)
                    else:
                        v = tl.load(v_ptrs, mask=(cols < T)[:, None] & mask_dv[None, :], other=0.0)
                else:
                    if EVEN_DV:
                        v = tl.load(v_ptrs)
                    else:
                        v = tl.load(v_ptrs, mask=mask_dv[None, :], other=0.0)
                if DOT_F32:
                    v = v.to(tl.float32)
                if NEED_CTX and not VP:
                    acc = acc * alpha[:, None]
                    acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PREC)
                if IN_SINK and SINK_ACC:
                    acc_s = acc_s * alpha[:, None]
                    acc_s = tl.dot(p_s.to(v.dtype), v, acc_s, input_precision=DOT_PREC)
        m_i = m_new
    return acc, l_i, m_i, best_idx, nan_row, m_r, acc_s, l_s, m_ref, m_s, idx_s


@triton.jit
def _attn_fwd_range(
    acc, l_i, m_i, best_idx, nan_row,
    m_r, acc_s, l_s, m_ref, m_s, idx_s,
    q, k_base, v_base, stride_kt, stride_vt,
    offs_m, offs_n, offs_d, mask_d, offs_dv, mask_dv,
    scale, softcap, row_lo, n_sink, sink_end, lo, hi, T,
    BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr,
    WINDOWED: tl.constexpr,
    EVEN_D: tl.constexpr,
    EVEN_DV: tl.constexpr,
    SOFTCAP: tl.constexpr,
    NEED_L: tl.constexpr,
    NEED_CTX: tl.constexpr,
    DOT_PREC: tl.constexpr,
    DOT_F32: tl.constexpr,
    HAS_SINK: tl.constexpr,
    SINK_ACC: tl.constexpr,
    bias_rows=None,  # HAS_BIAS: as _attn_fwd_inner's
    row_ok=None,
    stride_bn=0,
    HAS_BIAS: tl.constexpr = False,
    w_base=None,  # VP: as _attn_fwd_inner's
    stride_wt=0,
    offs_w=None,
    VP: tl.constexpr = False,
):
    """Key tiles [lo, hi): with a sink, the tiles below ``sink_end`` (the first tile boundary >= n) with the
    sink bookkeeping, the rest without it; tile starts stay multiples of BLOCK_N. With ``HAS_BIAS`` each tile
    adds attn_mask's bias tile (the explicit-mask walk)."""
    if HAS_SINK:
        split = tl.minimum(tl.maximum(sink_end, lo), hi)
        acc, l_i, m_i, best_idx, nan_row, m_r, acc_s, l_s, m_ref, m_s, idx_s = _attn_fwd_inner(
            acc, l_i, m_i, best_idx, nan_row, m_r, acc_s, l_s, m_ref, m_s, idx_s,
            q, k_base, v_base, stride_kt, stride_vt, offs_m, offs_n, offs_d, mask_d, offs_dv, mask_dv,
            scale, softcap, row_lo, n_sink, lo, split, T,
            BLOCK_N, MASKED, WINDOWED, EVEN_D, EVEN_DV, SOFTCAP, NEED_L, NEED_CTX, DOT_PREC, DOT_F32, True, True,
            SINK_ACC, bias_rows, row_ok, stride_bn, HAS_BIAS, w_base, stride_wt, offs_w, VP,
        )
        lo = split
    acc, l_i, m_i, best_idx, nan_row, m_r, acc_s, l_s, m_ref, m_s, idx_s = _attn_fwd_inner(
        acc, l_i, m_i, best_idx, nan_row, m_r, acc_s, l_s, m_ref, m_s, idx_s,
        q, k_base, v_base, stride_kt, stride_vt, offs_m, offs_n, offs_d, mask_d, offs_dv, mask_dv,
        scale, softcap, row_lo, n_sink, lo, hi, T,
        BLOCK_N, MASKED, WINDOWED, EVEN_D, EVEN_DV, SOFTCAP, NEED_L, NEED_CTX, DOT_PREC, DOT_F32, HAS_SINK, False,
        SINK_ACC, bias_rows, row_ok, stride_bn, HAS_BIAS, w_base, stride_wt, offs_w, VP,
    )
    return acc, l_i, m_i, best_idx, nan_row, m_r, acc_s, l_s, m_ref, m_s, idx_s


@triton.jit(do_not_specialize=["bh_off", "d_r", "window", "chunk", "n_sink", "q_off"])
def _residual_attn_fwd(
    Q, K, V, Out, Argmax, Top1P, Basis, Gram, SinkMass, LearnedSink,
    stride_qb, stride_qh, stride_qt,
    stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt,
    stride_ob, stride_oh, stride_ot,
    stride_ab, stride_ah,  # Argmax, Top1P and SinkMass: contiguous [B, Hq, T] buffers
    stride_ph, stride_pd, stride_pr,
    H, GROUP, T, bh_off, d_r, window, chunk, n_sink, scale, softcap,
    HEAD_D: tl.constexpr,  # q/k's real width
    D_PAD: tl.constexpr,  # next power of two (tl.arange / tl.dot shapes)
    HEAD_DV: tl.constexpr,  # v's real width (= HEAD_D but for MLA): out, ctx, V[i*], ε, basis rows, Gram
    DV_PAD: tl.constexpr,
    R_BLOCK: tl.constexpr,  # basis columns per epilogue step
    GRAM_COLS: tl.constexpr,  # Gram columns per atomic step
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    MODE: tl.constexpr,  # 0 top1, 1 full, 2 lowrank
    NEED_L: tl.constexpr,  # accumulate the softmax denominator (ctx or top1_prob)
    NEED_CTX: tl.constexpr,  # accumulate p @ V
    WINDOWED: tl.constexpr,  # a sliding window (window > 0) or a chunk (chunk > 0): a per-row first visible key
    SOFTCAP: tl.constexpr,
    STORE_ARGMAX: tl.constexpr,
    STORE_TOP1P: tl.constexpr,
    STORE_GRAM: tl.constexpr,
    STORE_SINK: tl.constexpr,
    DOT_PREC: tl.constexpr,  # the key loop's dots and the epilogue's (projection, Gram)
    DOT_F32: tl.constexpr,  # upcast operands to fp32 (only for bf16 under the CPU interpreter)
    HAS_SINK: tl.constexpr,  # n_sink > 0 (n itself is a runtime argument: one compile serves every n >= 1)
    SINK_ACC: tl.constexpr,  # with HAS_SINK: the output or the Gram needs the ground state (Σ_S p V)
    LEARNED: tl.constexpr,  # a learned sink: one logit per query row (LearnedSink, fp32), value zero
    stride_lb=0, stride_lh=0, stride_lt=0,  # LEARNED: the logits' strides [B, Hq, T] (0: one per head, gpt-oss)
    Bias=None,  # HAS_BIAS: attn_mask as an fp32 additive bias, read through its strides [B, Hq, Tq, Tk] (0: broadcast)
    stride_bb=0, stride_bh=0, stride_bm=0, stride_bn=0,
    T_K=0,  # the number of keys: Tq + q_off without a mask; under HAS_BIAS any (keys of the model's own past Tq)
    q_off=0,  # without a mask: Tk − Tq, the absolute position of query row 0 (a KV cache; 0 for Tq = Tk)
    HAS_BIAS: tl.constexpr = False,  # attn_mask given: it alone decides visibility (no causal walk)
    SPLIT_GRAM: tl.constexpr = False,
    CrystalHeads=None,  # PER_HEAD: int8 [Hq], 1 = this query head outputs its mode's result, 0 = plain attention
    PER_HEAD: tl.constexpr = False,  # some heads are left plain (their output is ctx: NEED_CTX is set)
    VPr=None,  # LOWRANK_VP: V·P_r per query head [B, Hq, Tk, DR_PAD] in v's dtype (the launcher's product)
    stride_wb=0, stride_wh=0, stride_wt=0,
    LOWRANK_VP: tl.constexpr = False,  # low rank through V·P_r (evaluation: no Gram); else the whole ε
    DR_PAD: tl.constexpr = 16,  # V·P_r's padded width (>= 16 for tl.dot, >= d_r)
):
    EVEN_D: tl.constexpr = HEAD_D == D_PAD
    EVEN_DV: tl.constexpr = HEAD_DV == DV_PAD
    start_m = tl.program_id(0)
    pid_bh = tl.program_id(1) + bh_off  # the launcher chunks B*Hq over CUDA's grid-y limit
    off_b = (pid_bh // H).to(tl.int64)
    off_h = (pid_bh % H).to(tl.int64)
    off_hk = off_h // GROUP  # kv head of this query head (transformers' repeat_kv order)

    q_base = Q + off_b * stride_qb + off_h * stride_qh
    k_base = K + off_b * stride_kb + off_hk * stride_kh
    v_base = V + off_b * stride_vb + off_hk * stride_vh
    o_base = Out + off_b * stride_ob + off_h * stride_oh
    offs_w = tl.arange(0, DR_PAD)
    if LOWRANK_VP:
        w_base = VPr + off_b * stride_wb + off_h * stride_wh
    else:
        w_base = VPr

    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)  # int32 query rows
    pos_m = offs_m + q_off  # their absolute positions: what the causal, window and chunk bounds compare
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D_PAD)
    mask_d = offs_d < HEAD_D
    mask_m = offs_m < T
    offs_m64 = offs_m.to(tl.int64)
    mask_md = mask_m[:, None] & mask_d[None, :]
    offs_dv = tl.arange(0, DV_PAD)
    mask_dv = offs_dv < HEAD_DV
    mask_mdv = mask_m[:, None] & mask_dv[None, :]

    q = tl.load(q_base + offs_m64[:, None] * stride_qt + offs_d[None, :], mask=mask_md, other=0.0)
    if DOT_F32:
        q = q.to(tl.float32)

    LOG2E: tl.constexpr = 1.4426950408889634
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    # Low rank through V·P_r sums p·(V P_r): DR_PAD columns, not DV_PAD.
    acc = tl.zeros([BLOCK_M, DR_PAD if LOWRANK_VP else DV_PAD], dtype=tl.float32)
    best_idx = tl.full([BLOCK_M], 2147483647, dtype=tl.int32)
    nan_row = tl.zeros([BLOCK_M], dtype=tl.int1)
    # The sink's state (only touched with HAS_SINK): R's best score, S's best score and index, Σ_S p and
    # Σ_S p V (unnormalized, relative to m_ref).
    m_r = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    m_s = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    idx_s = tl.full([BLOCK_M], 2147483647, dtype=tl.int32)
    l_s = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_ref = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc_s = tl.zeros([BLOCK_M, DV_PAD], dtype=tl.float32)
    sink_end = ((n_sink + BLOCK_N - 1) // BLOCK_N) * BLOCK_N  # key tiles below hold a sink key

    diag = start_m * BLOCK_M + q_off  # the block's first row's position: first key of the diagonal block
    lo = (diag // BLOCK_N) * BLOCK_N  # aligned down (= diag without an offset): tile starts stay multiples of BLOCK_N
    if WINDOWED:
        # Each row's first visible key: i - w + 1 under a sliding window, (i // C) * C under a chunk (Llama 4's
        # chunked attention: i sees j <= i with j // C == i // C). Both rise with i, so the block's first row has
        # the smallest and its last row the largest; one runtime branch, no compile per window or chunk size.
        chunk_safe = tl.maximum(chunk, 1)
        row_lo = tl.where(chunk > 0, (pos_m // chunk_safe) * chunk_safe, pos_m - window + 1)
        first_row = diag
        last_row = diag + BLOCK_M - 1
        first = tl.where(chunk > 0, (first_row // chunk_safe) * chunk_safe, first_row - window + 1)
        last = tl.where(chunk > 0, (last_row // chunk_safe) * chunk_safe, last_row - window + 1)
        # Key tiles wholly before every row's first visible key are skipped: cost grows as T·w (T·C), not T².
        # [lo_w, mid): tiles some row of the block cannot fully see (masked);
        # [mid, lo): tiles every row sees completely (no mask).
        first = tl.maximum(first, 0)
        lo_w = tl.minimum((first // BLOCK_N) * BLOCK_N, lo)
        mid = tl.maximum(last, 0)
        mid = tl.minimum(((mid + BLOCK_N - 1) // BLOCK_N) * BLOCK_N, lo)
        acc, l_i, m_i, best_idx, nan_row, m_r, acc_s, l_s, m_ref, m_s, idx_s = _attn_fwd_range(
            acc, l_i, m_i, best_idx, nan_row, m_r, acc_s, l_s, m_ref, m_s, idx_s,
            q, k_base, v_base, stride_kt, stride_vt,
            pos_m, offs_n, offs_d, mask_d, offs_dv, mask_dv, scale, softcap, row_lo, n_sink, sink_end, lo_w, mid,
            T_K, BLOCK_N, True, True, EVEN_D, EVEN_DV, SOFTCAP, NEED_L, NEED_CTX, DOT_PREC, DOT_F32, HAS_SINK, SINK_ACC,
            w_base=w_base, stride_wt=stride_wt, offs_w=offs_w, VP=LOWRANK_VP,
        )
    else:
        mid = 0
        row_lo = pos_m  # unused without WINDOWED
    if HAS_BIAS:
        # An explicit mask decides alone which keys a row sees: every key tile [0, Tk) is walked, masked only past
        # the last key (each row's causal bound is set past it), with the bias added; the sink's tiles first. No
        # causal walk is compiled.
        bias_rows = Bias + off_b * stride_bb + off_h * stride_bh + offs_m64 * stride_bm
        no_bound = tl.zeros([BLOCK_M], dtype=tl.int32) + T_K
        acc, l_i, m_i, best_idx, nan_row, m_r, acc_s, l_s, m_ref, m_s, idx_s = _attn_fwd_range(
            acc, l_i, m_i, best_idx, nan_row, m_r, acc_s, l_s, m_ref, m_s, idx_s,
            q, k_base, v_base, stride_kt, stride_vt,
            no_bound, offs_n, offs_d, mask_d, offs_dv, mask_dv, scale, softcap, row_lo, n_sink, sink_end, 0, T_K,
            T_K, BLOCK_N, True, False, EVEN_D, EVEN_DV, SOFTCAP, NEED_L, NEED_CTX, DOT_PREC, DOT_F32, HAS_SINK,
            SINK_ACC, bias_rows, mask_m, stride_bn, True, w_base, stride_wt, offs_w, LOWRANK_VP,
        )
    else:
        # Key tiles strictly below the diagonal block, all visible to every row.
        acc, l_i, m_i, best_idx, nan_row, m_r, acc_s, l_s, m_ref, m_s, idx_s = _attn_fwd_range(
            acc, l_i, m_i, best_idx, nan_row, m_r, acc_s, l_s, m_ref, m_s, idx_s,
            q, k_base, v_base, stride_kt, stride_vt,
            pos_m, offs_n, offs_d, mask_d, offs_dv, mask_dv, scale, softcap, row_lo, n_sink, sink_end, mid, lo, T_K,
            BLOCK_N, False, False, EVEN_D, EVEN_DV, SOFTCAP, NEED_L, NEED_CTX, DOT_PREC, DOT_F32, HAS_SINK, SINK_ACC,
            w_base=w_base, stride_wt=stride_wt, offs_w=offs_w, VP=LOWRANK_VP,
        )
        # The diagonal block (causal + sequence-end mask, and the window when it is shorter than a block).
        hi = tl.minimum(diag + BLOCK_M, T_K)
        acc, l_i, m_i, best_idx, nan_row, m_r, acc_s, l_s, m_ref, m_s, idx_s = _attn_fwd_range(
            acc, l_i, m_i, best_idx, nan_row, m_r, acc_s, l_s, m_ref, m_s, idx_s,
            q, k_base, v_base, stride_kt, stride_vt,
            pos_m, offs_n, offs_d, mask_d, offs_dv, mask_dv, scale, softcap, row_lo, n_sink, sink_end, lo, hi, T_K,
            BLOCK_N, True, WINDOWED, EVEN_D, EVEN_DV, SOFTCAP, NEED_L, NEED_CTX, DOT_PREC, DOT_F32, HAS_SINK,
            SINK_ACC, w_base=w_base, stride_wt=stride_wt, offs_w=offs_w, VP=LOWRANK_VP,
        )

    # ---- epilogue ----------------------------------------------------------
    # Non-finite row: a visible NaN score, or a best score of ±inf (no softmax exists). Its index is
    # replaced by a valid one for the V load (never out of range), and every output is NaN.
    bad = nan_row | (m_i == float("inf")) | (m_i == float("-inf"))
    if NEED_L:
        bad = bad | (l_i != l_i)  # a visible NaN score (the loop keeps no flag then)
    if LEARNED:
        # The learned sink is a key every row sees with this logit and value zero; it is merged into the
        # online softmax here, once (a zero value adds nothing to acc): the loop is the same code as without it.
        # A NaN or +inf logit makes its row non-finite.
        sink_l = tl.load(LearnedSink + off_b * stride_lb + off_h * stride_lh + offs_m64 * stride_lt,
                         mask=mask_m, other=0.0)  # [BLOCK_M]: a head's logit is read with a row stride of 0
        bad = bad | (sink_l != sink_l) | (sink_l == float("inf"))
    if HAS_BIAS:
        # A row with no visible key under the mask (every score -inf, none NaN: a pad query) is empty: computed as a
        # bad row, then stored as a zero output, argmax -1, top1_prob and sink_mass 0, ε = 0 (issue 34).
        empty = (m_i == float("-inf")) & (~nan_row)
        if NEED_L:
            empty = empty & (l_i == l_i)
        if LEARNED:
            empty = empty & (sink_l == sink_l) & (sink_l != float("inf"))
    if HAS_SINK:
        # R holds no finite score (every row t < n): the ground state is ctx, the argmax S's first maximum.
        r_empty = m_r == float("-inf")
        arg_idx = tl.where(r_empty, idx_s, best_idx)
        safe_idx = tl.where(bad | (~mask_m) | r_empty, 0, best_idx)
    else:
        arg_idx = best_idx
        safe_idx = tl.where(bad | (~mask_m), 0, best_idx)
    v_star = tl.load(
        v_base + safe_idx.to(tl.int64)[:, None] * stride_vt + offs_dv[None, :], mask=mask_mdv, other=0.0
    ).to(tl.float32)
    v_star = tl.where(bad[:, None], float("nan"), v_star)
    # Names the V·P_r epilogue reads in every variant (overwritten where a sink / learned sink defines them).
    sink_part = v_star
    sink_mass = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_learned = tl.zeros([BLOCK_M], dtype=tl.float32)
    if not HAS_SINK:
        r_empty = tl.zeros([BLOCK_M], dtype=tl.int1)

    if LEARNED:
        # With the sink's term: l = l_i·e^(m_i − m) + e^(s_h − m), m = max(m_i, s_h). ``norm`` takes a sum
        # relative to m_i (acc, l_i, the sink_tokens sums) to a probability.
        m_all = tl.where(bad, 0.0, tl.maximum(m_i, sink_l))  # finite on every row the epilogue keeps
        c_real = tl.exp2((m_i - m_all) * LOG2E)  # 0 where m_i = -inf (rows past T)
        e_sink = tl.exp2((sink_l - m_all) * LOG2E)
        l_tot = l_i * c_real + e_sink
        l_div = tl.where(l_tot > 0, l_tot, 1.0)
        norm = c_real / l_div
        m_learned = e_sink / l_div  # m_L
        if NEED_CTX:
            ctx = tl.where(bad[:, None], float("nan"), acc * norm[:, None])
    else:
        # l_i is 0 only on rows without a visible finite score (non-finite, or padding past T): divide by 1 there.
        l_div = tl.where(l_i > 0, l_i, 1.0)
        if NEED_CTX:
            ctx = tl.where(bad[:, None], float("nan"), acc / l_div[:, None])
    if HAS_SINK:
        # The sink sums were last rescaled at the last sink tile (max m_ref): bring them to the final max.
        # l_s == 0 means no visible sink key had weight (acc_s is 0 too): factor 0, never exp of a big gap.
        m_fin = tl.where(m_i == float("-inf"), 0.0, m_i)
        if LEARNED:
            to_fin = tl.where(l_s > 0, tl.exp2((m_ref - m_fin) * LOG2E), 0.0) * norm
        else:
            to_fin = tl.where(l_s > 0, tl.exp2((m_ref - m_fin) * LOG2E), 0.0) / l_div
        sink_mass = l_s * to_fin  # Σ_S p
        if LEARNED:
            sink_mass = sink_mass + m_learned  # all the mass kept apart: m_S + m_L
        if SINK_ACC:
            sink_part = acc_s * to_fin[:, None]  # Σ_S p V
            ground = sink_part + (1.0 - sink_mass)[:, None] * v_star
            # Where R has no finite score the ground state is ctx, which is the sink part exactly (R adds no
            # weight). Taken from the sink sums in every variant, so asking for the Gram never moves a top1 or full
            # output (low rank: the Gram takes the whole-ε path, evaluation V·P_r; equal within rounding).
            ground = tl.where(r_empty[:, None], sink_part, ground)
            ground = tl.where(bad[:, None], float("nan"), ground)
        else:
            ground = v_star  # unused: "full" without a Gram outputs ctx
        sink_mass = tl.where(r_empty, 1.0, sink_mass)
    elif LEARNED:
        ground = (1.0 - m_learned)[:, None] * v_star  # the learned sink's mass kept apart
    else:
        ground = v_star  # the spec: V[i*]
    if NEED_CTX and not LOWRANK_VP:
        eps = ctx - ground
        if HAS_SINK:
            eps = tl.where((r_empty & (~bad))[:, None], 0.0, eps)  # ground = ctx: ε = 0 by definition
        eps = tl.where(mask_m[:, None], eps, 0.0)
        if HAS_BIAS:
            eps = tl.where(empty[:, None], 0.0, eps)

    if MODE == 0:
        out = ground
    elif MODE == 1:
        out = ctx
    elif LOWRANK_VP:
        out = _lowrank_vp_epilogue(ctx, ground, v_star, w_base, stride_wt, offs_w, safe_idx, bad, mask_m, Basis,
                                   off_h, stride_ph, stride_pd, stride_pr, offs_dv, mask_dv, d_r, sink_part,
                                   sink_mass, r_empty, m_learned, HAS_SINK, SINK_ACC, LEARNED, DOT_PREC)
    else:
        # ground + (εP)Pᵀ, R_BLOCK basis columns at a time up to d_r: columns >= d_r are never read, and
        # one compiled kernel serves every rank of a sweep.
        out = ground
        offs_r = tl.arange(0, R_BLOCK)
        for r0 in range(0, d_r, R_BLOCK):
            cols_r = r0 + offs_r
            p_ptrs = Basis + off_h * stride_ph + offs_dv[:, None] * stride_pd + cols_r[None, :] * stride_pr
            P = tl.load(p_ptrs, mask=mask_dv[:, None] & (cols_r < d_r)[None, :], other=0.0)  # [DV_PAD, R_BLOCK]
            coeff = tl.dot(eps, P, input_precision=DOT_PREC)  # [BLOCK_M, R_BLOCK]
            out = tl.dot(coeff, tl.trans(P), out, input_precision=DOT_PREC)

    if PER_HEAD:
        # The program's flag: a head left plain outputs ctx; its statistics below are the same as any head's.
        crystal = tl.load(CrystalHeads + off_h)
        out = tl.where(crystal != 0, out, ctx)
    if HAS_BIAS:
        out = tl.where(empty[:, None], 0.0, out)
    o_ptrs = o_base + offs_m64[:, None] * stride_ot + offs_dv[None, :]
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=mask_mdv)

    if STORE_ARGMAX:
        a_ptrs = Argmax + off_b * stride_ab + off_h * stride_ah + offs_m64
        tl.store(a_ptrs, tl.where(bad, -1, arg_idx).to(tl.int64), mask=mask_m)
    if STORE_TOP1P:
        t_ptrs = Top1P + off_b * stride_ab + off_h * stride_ah + offs_m64
        if HAS_SINK:
            # p of the returned index: exp(s[i*ᴿ] − m) / l (R's best is not the softmax max in general).
            s_arg = tl.where(r_empty, m_i, m_r)
            if LEARNED:
                top1 = tl.exp2((s_arg - m_fin) * LOG2E) * norm
            else:
                top1 = tl.exp2((s_arg - m_fin) * LOG2E) / l_div
        elif LEARNED:
            top1 = norm  # p[i*] = e^(m_i − m) / l: the sink may be the softmax's max
        else:
            # The running max is the best score, whose term exp(m - m) = 1 is in l_i exactly: p[i*] = 1/l_i.
            top1 = 1.0 / l_div
        top1 = tl.where(bad, float("nan"), top1)
        if HAS_BIAS:
            top1 = tl.where(empty, 0.0, top1)
        tl.store(t_ptrs, top1, mask=mask_m)
    if STORE_SINK:
        s_ptrs = SinkMass + off_b * stride_ab + off_h * stride_ah + offs_m64
        if HAS_SINK:
            mass_out = tl.where(bad, float("nan"), sink_mass)
        elif LEARNED:
            mass_out = tl.where(bad, float("nan"), m_learned)
        else:
            mass_out = tl.where(bad, float("nan"), 0.0)
        if HAS_BIAS:
            mass_out = tl.where(empty, 0.0, mass_out)
        tl.store(s_ptrs, mass_out, mask=mask_m)
    if STORE_GRAM:
        # This block's Σ εεᵀ, reduced on the device into the head's fp32 [D, D] (no per-block buffer).
        g_base = Gram + off_h * (HEAD_DV * HEAD_DV)
        if SPLIT_GRAM and GRAM_COLS * 2 == DV_PAD:
            # 256 KiB of shared memory for a [256, 256] block: GRAM_COLS columns at a time, ε's column blocks cut
            # by reshape + split (exact).
            _gram_halves(g_base, tl.trans(eps), eps, 0, offs_dv, mask_dv, HEAD_DV, GRAM_COLS, DOT_PREC, BLOCK_M)
        elif SPLIT_GRAM and GRAM_COLS * 4 == DV_PAD:
            eps_t = tl.trans(eps)
            h0, h1 = _halves(eps, BLOCK_M, DV_PAD)
            _gram_halves(g_base, eps_t, h0, 0, offs_dv, mask_dv, HEAD_DV, GRAM_COLS, DOT_PREC, BLOCK_M)
            _gram_halves(g_base, eps_t, h1, 2 * GRAM_COLS, offs_dv, mask_dv, HEAD_DV, GRAM_COLS, DOT_PREC, BLOCK_M)
        elif SPLIT_GRAM and GRAM_COLS * 8 == DV_PAD:
            eps_t = tl.trans(eps)
            h0, h1 = _halves(eps, BLOCK_M, DV_PAD)
            q0, q1 = _halves(h0, BLOCK_M, DV_PAD // 2)
            _gram_halves(g_base, eps_t, q0, 0, offs_dv, mask_dv, HEAD_DV, GRAM_COLS, DOT_PREC, BLOCK_M)
            _gram_halves(g_base, eps_t, q1, 2 * GRAM_COLS, offs_dv, mask_dv, HEAD_DV, GRAM_COLS, DOT_PREC, BLOCK_M)
            q2, q3 = _halves(h1, BLOCK_M, DV_PAD // 2)
            _gram_halves(g_base, eps_t, q2, 4 * GRAM_COLS, offs_dv, mask_dv, HEAD_DV, GRAM_COLS, DOT_PREC, BLOCK_M)
            _gram_halves(g_base, eps_t, q3, 6 * GRAM_COLS, offs_dv, mask_dv, HEAD_DV, GRAM_COLS, DOT_PREC, BLOCK_M)
        else:  # whole, or one-hot column blocks
            _gram_block(g_base, eps, offs_dv, mask_dv, HEAD_DV, DV_PAD, GRAM_COLS, DOT_PREC)


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


def _launch_device(device: torch.device) -> contextlib.AbstractContextManager:
    """The context every kernel launch runs in: ``torch.cuda.device(device)`` for a CUDA device (Triton
    launches on the current device, not the tensors'), nothing for the CPU interpreter."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def project_values(v: Tensor, basis: Tensor, d_r: int, width: int) -> Tensor:
    """V·P_r per query head, ``[B, Hq, Tk, width]`` in v's dtype, contiguous, columns >= d_r zero.

    v ``[B, Hkv, Tk, Dv]``, basis ``[Hq, Dv, R]`` fp32 (query head h reads kv head ``h // (Hq // Hkv)``). Formed
    once per call in fp32 and rounded once to v's dtype (the dtype the key loop's P·V dot reads V in), so the
    kernel's loop reads ``width`` columns per key instead of Dv. Precomputed rather than re-projected per key
    tile: re-projecting would read all of V in every program (no bytes saved) and add Dv·d_r FLOPs per key per
    program (as much again as the narrow P·V of a BLOCK_M ≈ Dv block); the product costs one read of V and one
    write of B·Hq·Tk·width elements, shared by the cdiv(T, BLOCK_M) programs of each head.
    """
    B, Hkv, Tk, Dv = v.shape
    Hq = basis.shape[0]
    group = Hq // Hkv
    P = basis[:, :, :d_r].reshape(Hkv, group, Dv, d_r)
    vp = torch.zeros((B, Hq, Tk, width), device=v.device, dtype=v.dtype)
    # [B, Hkv, 1, Tk, Dv] @ [Hkv, G, Dv, d_r] -> [B, Hkv, G, Tk, d_r]: the kv head's V against each of its
    # query heads' bases (transformers' repeat_kv order), never a repeated copy of V.
    vp[..., :d_r] = torch.matmul(v.to(torch.float32).unsqueeze(2), P).reshape(B, Hq, Tk, d_r)
    return vp


# CUDA's limit on grid dimension y, where the launcher puts B·Hq (the query blocks are on x, so that
# neighbouring programs share a head's K/V in L2). Larger B·Hq is launched in chunks; a module constant
# so that a CPU test can lower it.
MAX_GRID_Y = 65535


def residual_attention_triton(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    mode: str,
    basis: Tensor | None = None,
    d_r: int | None = None,
    scale: float | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    return_argmax: bool = False,
    return_gram: bool = False,
    return_top1_prob: bool = False,
    out_layout: str = "bhtd",
    allow_tf32: bool = False,
    out: Tensor | None = None,
    sink_tokens: int = 0,
    return_sink_mass: bool = False,
    learned_sink: Tensor | None = None,
    attention_chunk: int | None = None,
    attn_mask: Tensor | None = None,
    crystal_heads: Tensor | None = None,
) -> ResidualAttentionResult:
    """Fused residual attention; same contract as ``nqpq_kernels.reference.residual_attention_reference``.

    q ``[B, Hq, T, D]``, k and v ``[B, Hkv, T, D]`` (``Hq % Hkv == 0``; the kernel reads kv head
    ``h // (Hq // Hkv)`` in place, never a repeated copy). D: any multiple of 16 up to 256. v may have
    another width Dv (MLA; also a multiple of 16 up to 256): out, the basis rows and the Gram are then Dv wide.
    Returns ``ResidualAttentionResult(out, argmax, gram, top1_prob, sink_mass)``: ``out`` in the input
    dtype, ``[B, Hq, T, D]`` (``out_layout="bhtd"``) or a contiguous ``[B, T, Hq, D]`` (``"bthd"``);
    ``argmax`` int64 ``[B, Hq, T]`` (-1 on a non-finite row); ``gram`` float64 ``[Hq, D, D]`` =
    Σ_{b,t} ε εᵀ (reduced on the device in fp32, per launch); ``top1_prob`` float32 ``[B, Hq, T]``
    = p[argmax] (1/l at the end of the online softmax without a sink; NaN on a non-finite row);
    ``sink_mass`` float32 ``[B, Hq, T]``. Unrequested fields are None.

    ``sink_tokens=n`` keeps the keys j < n apart (the reference's module docstring has the math): in the
    key tiles holding j < n a second accumulator sums Σ_S p V and Σ_S p under the same online rescaling,
    and the argmax skips j < n. Still one pass; n is a runtime argument.

    ``attention_chunk=C`` (Llama 4): query i sees keys j <= i with j // C == i // C; the key loop starts at the
    block's first row's chunk and masks per row, as under a sliding window (C is a runtime argument).

    ``learned_sink`` (float ``[Hq]``, or ``[B, Hq, T]`` one per query row): a zero-value key with that logit, kept
    apart like the sink (the reference's docstring); merged into the online softmax in the epilogue, the key loop
    is unchanged.

    ``attn_mask`` (SDPA's: bool, True = the key takes part, or float, added to the scores; broadcastable to
    ``[B, Hq, Tq, Tk]``): it alone decides visibility; k and v may then hold Tk != Tq keys. Passed to the kernel
    as an fp32 bias read through its strides (a broadcast dim is never copied; a bool mask becomes 0 / -inf), and
    every key tile is walked (no causal tile skipping).

    A KV cache (no ``attn_mask``, q holding Tq < Tk queries): query r sits at absolute position Tk − Tq + r; the
    kernel adds that offset (a runtime argument) to its causal, window and chunk bounds, so row blocks still start at
    the queries and the tiles below the diagonal block are walked unmasked. For Tq <= 16 the Triton backend runs the
    split-KV decode kernel instead (``nqpq_kernels.decode``).

    Inputs whose last dimension is strided (stride(-1) != 1) are copied to a contiguous layout first
    (the kernel's loads need unit stride along D); views such as transformers' transposed [B, T, H, D]
    projections are read in place.

    ``crystal_heads`` (bool ``[Hq]``; None: every head): the heads marked False output ctx, in the same launch (an
    int8 flag per query head read in the epilogue; ctx is accumulated for every head then).

    ``out`` (keyword-only, optional) is a preallocated output of the right shape,
    dtype and device with a unit last stride; mainly a test hook.
    """
    args = check_residual_attention_inputs(q, k, v, mode, basis, d_r, scale, sliding_window, softcap, sink_tokens,
                                           learned_sink, attention_chunk, attn_mask, crystal_heads)
    check_choice("out_layout", out_layout, OUT_LAYOUTS)
    _check_backend_device(q.device)
    B, H, T, Dqk = q.shape
    T_k = k.shape[2]
    # A KV cache (no attn_mask, Tq < Tk): query i sits at absolute position Tk − Tq + i, a runtime offset of the
    # causal, window and chunk bounds (Tq = Tk: offset 0, the plain causal call).
    q_off = T_k - T if attn_mask is None else 0
    D = args.value_dim  # out's width
    for width in (Dqk, D):
        if width not in SUPPORTED_HEAD_DIMS:
            raise ValueError(
                f'backend="triton" supports head dims that are multiples of 16 up to 256, got D={width}'
            )
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))

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

    # A window covering the whole sequence is plain causal attention: skip the window masks.
    windowed = args.sliding_window is not None and args.sliding_window < T_k
    chunk = args.attention_chunk or 0  # validated: None for C >= T (plain causal), never with a window
    meta, launch = kernel_meta(Dqk, q.dtype, mode, device.type, windowed=windowed or chunk > 0,
                               softcap=args.softcap is not None, return_argmax=return_argmax,
                               return_gram=return_gram, return_top1_prob=return_top1_prob,
                               return_sink_mass=return_sink_mass, sink=args.sink_tokens > 0,
                               allow_tf32=allow_tf32, value_dim=D, learned_sink=learned_sink is not None,
                               bias=attn_mask is not None, per_head=args.crystal_heads is not None,
                               lowrank_rank=args.d_r)
    n_m = triton.cdiv(T, meta["BLOCK_M"])

    argmax = torch.empty((B, H, T), device=device, dtype=torch.int64) if return_argmax else None
    top1_prob = torch.empty((B, H, T), device=device, dtype=torch.float32) if return_top1_prob else None
    gram32 = torch.zeros((H, D, D), device=device, dtype=torch.float32) if return_gram else None
    sink_mass = torch.empty((B, H, T), device=device, dtype=torch.float32) if return_sink_mass else None

    # The basis is read in place through its strides (a copy only if it is not fp32); the kernel
    # masks columns >= d_r, and d_r <= min(R, D), so no padding is needed.
    basis_f32 = basis.to(device=device, dtype=torch.float32) if mode == "lowrank" else None
    vp_args = {}
    if meta["LOWRANK_VP"]:
        vp = project_values(v, basis_f32, args.d_r, meta["DR_PAD"])
        vp_args = dict(VPr=vp, stride_wb=vp.stride(0), stride_wh=vp.stride(1), stride_wt=vp.stride(2))
    sink_args = {}
    sink_f32 = None
    if args.learned_sink is not None:
        # [B, Hq, T] read through its strides (one fp32 logit per head: (0, 1, 0), not copied per row).
        sink_f32 = args.learned_sink.to(dtype=torch.float32)
        sink_args = dict(stride_lb=sink_f32.stride(0), stride_lh=sink_f32.stride(1), stride_lt=sink_f32.stride(2))
    bias_args = {}
    if attn_mask is not None:
        # fp32, converted before the broadcast is expanded (a [1, 1, Tq, Tk] mask stays that size); the expanded
        # view's stride is 0 on every broadcast dim.
        bias = attn_mask.to(torch.float32) if attn_mask.dtype != torch.bool else \
            torch.zeros(attn_mask.shape, device=device, dtype=torch.float32).masked_fill_(~attn_mask, float("-inf"))
        bias = bias.reshape((1,) * (4 - bias.dim()) + tuple(bias.shape)).expand(args.attn_mask.shape)
        bias_args = dict(Bias=bias, stride_bb=bias.stride(0), stride_bh=bias.stride(1), stride_bm=bias.stride(2),
                         stride_bn=bias.stride(3))

    per_head_args = {}
    if args.crystal_heads is not None:
        per_head_args = dict(CrystalHeads=args.crystal_heads.to(torch.int8))

    # Unused pointer arguments get a valid tensor (the kernel never dereferences them).
    dummy = out
    n_bh = B * H
    # Triton launches on the *current* CUDA device: tensors on another GPU would be read through invalid
    # pointers (an error, or silently wrong values). Every launch runs under q's device (issue 21).
    with _launch_device(device):
        for bh_off in range(0, n_bh, MAX_GRID_Y):
            grid = (n_m, min(MAX_GRID_Y, n_bh - bh_off))
            _residual_attn_fwd[grid](
                q, k, v, out,
                argmax if argmax is not None else dummy,
                top1_prob if top1_prob is not None else dummy,
                basis_f32 if basis_f32 is not None else dummy,
                gram32 if gram32 is not None else dummy,
                sink_mass if sink_mass is not None else dummy,
                sink_f32 if sink_f32 is not None else dummy,
                q.stride(0), q.stride(1), q.stride(2),
                k.stride(0), k.stride(1), k.stride(2),
                v.stride(0), v.stride(1), v.stride(2),
                stride_ob, stride_oh, stride_ot,
                H * T, T,  # argmax / top1_prob / sink_mass are contiguous [B, Hq, T]
                *(basis_f32.stride() if basis_f32 is not None else (0, 0, 0)),
                H, args.group, T, bh_off, args.d_r, args.sliding_window if windowed else 0, chunk,
                args.sink_tokens,
                args.scale, args.softcap if args.softcap is not None else 1.0,
                **meta,
                **launch,
                **bias_args,
                **sink_args,
                **per_head_args,
                **vp_args,
                T_K=T_k, q_off=q_off,
            )

    gram = gram32.double() if return_gram else None
    return ResidualAttentionResult(out, argmax, gram, top1_prob, sink_mass)

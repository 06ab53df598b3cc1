"""The ``@triton.jit`` tile helpers of the prefill and decode kernels: fp32 tanh, the running argmax of a key tile,
the Gram's atomic column blocks and the two low-rank epilogues (through V·P_r, and with the whole ε).

The prefill kernel (``nqpq_kernels.prefill_kernel``, its key loop in ``nqpq_kernels.prefill_loop``) and the split-KV
decode kernel (``nqpq_kernels.decode_kernel``) call the same helpers, so the two agree on ties, rounding and
non-finite rows by construction: ``_tanh``, ``_tile_argmax``, ``_gram_block``, ``_lowrank_vp_epilogue`` and
``_lowrank_eps_epilogue`` serve both; ``_halves``, ``_gram_cols`` and ``_gram_halves`` (the [256, 256] Gram cut into
column blocks by reshape and split) only the prefill epilogue.
"""

from __future__ import annotations

import triton
import triton.language as tl


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
def _lowrank_eps_epilogue(ground, eps, Basis, off_h, stride_ph, stride_pd, stride_pr, offs_dv, mask_dv, d_r,
                          R_BLOCK: tl.constexpr, DOT_PREC: tl.constexpr):
    """Low rank with the whole ε (a Gram asked, or V·P_r not taken): ground + (ε P_r) P_rᵀ, R_BLOCK basis columns
    at a time up to d_r. Columns >= d_r are never read, and one compiled kernel serves every rank of a sweep."""
    out = ground
    offs_r = tl.arange(0, R_BLOCK)
    for r0 in range(0, d_r, R_BLOCK):
        cols_r = r0 + offs_r
        p_ptrs = Basis + off_h * stride_ph + offs_dv[:, None] * stride_pd + cols_r[None, :] * stride_pr
        P = tl.load(p_ptrs, mask=mask_dv[:, None] & (cols_r < d_r)[None, :], other=0.0)  # [DV_PAD, R_BLOCK]
        coeff = tl.dot(eps, P, input_precision=DOT_PREC)  # [rows, R_BLOCK]
        out = tl.dot(coeff, tl.trans(P), out, input_precision=DOT_PREC)
    return out

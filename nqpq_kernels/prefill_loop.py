"""The prefill kernel's key loop: walk a query block's key tiles with the online softmax, the running argmax and the
sink's second accumulator (``nqpq_kernels.prefill_kernel`` calls it once per range of tiles).

``_attn_fwd_inner`` walks one range of key tiles, masked or not (the causal diagonal, a window or chunk edge, the
sequence end), adding attn_mask's bias tile under ``HAS_BIAS`` and summing p·(V P_r) instead of p·V under ``VP``;
``_attn_fwd_range`` splits a range at the first tile boundary >= n (``sink_tokens=n``), so that only the tiles holding a
sink key carry the sink's bookkeeping. The kernel's module docstring has the math and why the state is what it is.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .tile_helpers import _tanh, _tile_argmax


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

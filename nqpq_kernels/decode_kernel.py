"""Split-KV decode kernels for residual attention: few queries (decode steps, speculative chunks) against a KV cache.

The prefill kernel (``nqpq_kernels.prefill_kernel``) gives every (b, query head) its own programs, each walking all the
keys: for Tq = 1 that is B·Hq programs reading the cache Hq / Hkv times over, too few to fill a card at small batch.
Here (Flash-Decoding's shape, with the argmax and the sink state carried through the merge):

1. ``_decode_split``: a grid of (B · Hkv · row blocks, KV splits). A program packs the GROUP·Tq query rows of one kv
   head (GROUP = Hq / Hkv query heads × Tq queries: row r is head ``hk·GROUP + r // Tq``, query ``r % Tq``) into one
   tile, so K and V are read once per kv group, and walks its split's key tiles with the online softmax. It writes,
   per row: the running max m, the sum l and the accumulator Σ exp(s − m) V (relative to m), the best score and its
   FIRST index (over R, the keys j >= n, with ``sink_tokens=n``), and with a sink S's best score and index and
   Σ_S exp(s − m), Σ_S exp(s − m) V.
2. ``_decode_combine``: a grid of (query blocks, B · Hq). It merges the splits in key order under one running max
   (a tie of best scores across splits keeps the smaller index: the first index of the row's maximum, as everywhere)
   and finishes the epilogue as the prefill kernel does: V[i*] gathered, the ground state, ε, the rank-d_r projection,
   top-1 probability, sink mass, the Gram, the output in either layout.

Low rank without a Gram (evaluation, ``VP``) goes through V·P_r as the prefill kernel's ``LOWRANK_VP`` does: the split
pass sums exp(s − m)·(V P_r) (DR_PAD columns of the prefill launcher's ``project_values`` product, per query head: a
program's packed rows span several heads, so each head's V·P_r tile is dotted with p restricted to its rows), the
combine merges those DR_PAD-wide partials like the others and runs the prefill kernel's ``_lowrank_vp_epilogue``
(V[i*] and (V P_r)[i*] gathered; with a sink its Σ_S p V, still summed on V, projected once).

Queries sit at absolute positions Tk − Tq + r (bottom-right aligned causal); windows and chunks bound the keys walked
(the launcher drops the tiles no row sees before splitting). The math is ``nqpq_kernels.reference``'s; the epilogue
lines follow the prefill kernel's, whose comments say why each one is as it is. Launch choices (keys per tile and per
split, warps): ``nqpq_kernels.launch.decode_config``; the launcher: ``nqpq_kernels.decode``.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .tile_helpers import _gram_block, _lowrank_eps_epilogue, _lowrank_vp_epilogue, _tanh, _tile_argmax

__all__ = ["N_PART_PLANES", "decode_combine", "decode_split"]

# Planes of the per-split fp32 statistics (PartF): the running max, the sum, and with a sink R's best score,
# Σ_S exp(s − m) and S's best score; PartI holds the best index and, with a sink, S's best index.
N_PART_PLANES = 5


@triton.jit
def _decode_tiles(
    acc, l_i, m_i, best_idx, m_r, acc_s, l_s, m_ref, m_s, idx_s,
    q, k_base, v_base, stride_kt, stride_vt, pos, row_lo, offs_n, offs_d, mask_d, offs_dv, mask_dv,
    scale, softcap, n_sink, lo, hi, T_K,
    w_base, stride_wh, stride_wt, offs_w, row_head, g_lo, g_hi,
    BLOCK_N: tl.constexpr, WINDOWED: tl.constexpr, SOFTCAP: tl.constexpr, NEED_CTX: tl.constexpr,
    DOT_PREC: tl.constexpr, DOT_F32: tl.constexpr, HAS_SINK: tl.constexpr, IN_SINK: tl.constexpr,
    SINK_ACC: tl.constexpr, VP: tl.constexpr,
):
    """Key tiles [lo, hi), every one masked (causal at each row's absolute position, the key count, the window or
    chunk): a decode tile is cheap next to its loads. The state is the prefill kernel's (``_attn_fwd_inner``).

    ``VP`` (low rank through V·P_r): acc sums p·(V P_r) on DR_PAD columns. V·P_r is per query head and the rows
    packed here belong to the group's heads [g_lo, g_hi) (``row_head``: each row's head in the group), so each head's
    [BLOCK_N, DR_PAD] tile is dotted with p restricted to its rows (the other rows' p is 0: exact)."""
    LOG2E_: tl.constexpr = 1.4426950408889634
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        cols = start_n + offs_n
        rows64 = cols.to(tl.int64)
        in_kv = cols < T_K
        k = tl.load(k_base + rows64[:, None] * stride_kt + offs_d[None, :], mask=in_kv[:, None] & mask_d[None, :],
                    other=0.0)
        if DOT_F32:
            k = k.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * scale
        if SOFTCAP:
            s = _tanh(s / softcap) * softcap
        valid = (cols[None, :] <= pos[:, None]) & in_kv[None, :]
        if WINDOWED:
            valid = valid & (cols[None, :] >= row_lo[:, None])
        s = tl.where(valid, s, float("-inf"))
        t_max = tl.max(s, 1)
        best_idx, m_r, m_s, idx_s = _tile_argmax(s, t_max, cols, n_sink, m_i, best_idx, m_r, m_s, idx_s,
                                                 HAS_SINK, IN_SINK)
        # The sum is always kept (a NaN score makes it NaN: the combine's non-finite flag, no separate one).
        m_new = tl.maximum(m_i, t_max)
        m_base = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2((m_i - m_base) * LOG2E_)
        p = tl.exp2((s - m_base[:, None]) * LOG2E_)
        l_i = l_i * alpha + tl.sum(p, 1)
        if IN_SINK:
            p_s = tl.where((cols < n_sink)[None, :], p, 0.0)
            l_s = l_s * alpha + tl.sum(p_s, 1)
            m_ref = m_base
        if NEED_CTX and VP:
            acc = acc * alpha[:, None]
            w_g = w_base  # head g_lo's rows; one head further per step
            for g in range(g_lo, g_hi):
                w = tl.load(w_g + rows64[:, None] * stride_wt + offs_w[None, :], mask=in_kv[:, None], other=0.0)
                if DOT_F32:
                    w = w.to(tl.float32)
                p_g = tl.where((row_head == g)[:, None], p, 0.0)
                acc = tl.dot(p_g.to(w.dtype), w, acc, input_precision=DOT_PREC)
                w_g += stride_wh
        if (NEED_CTX and not VP) or (IN_SINK and SINK_ACC):
            v = tl.load(v_base + rows64[:, None] * stride_vt + offs_dv[None, :],
                        mask=in_kv[:, None] & mask_dv[None, :], other=0.0)
            if DOT_F32:
                v = v.to(tl.float32)
            if NEED_CTX and not VP:
                acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PREC)
            if IN_SINK and SINK_ACC:
                acc_s = tl.dot(p_s.to(v.dtype), v, acc_s * alpha[:, None], input_precision=DOT_PREC)
        m_i = m_new
    return acc, l_i, m_i, best_idx, m_r, acc_s, l_s, m_ref, m_s, idx_s


@triton.jit(do_not_specialize=["q_off", "kv_lo", "split_len", "window", "chunk", "n_sink"])
def decode_split(
    Q, K, V, PartF, PartI, PartAcc, PartAccS,
    stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt, stride_vb, stride_vh, stride_vt,
    H, HKV, GROUP, T, T_K, q_off, kv_lo, split_len, n_splits, window, chunk, n_sink, scale, softcap,
    part_stride,  # elements between two planes of PartF / PartI: B·Hq·Tq·splits
    HEAD_D: tl.constexpr, D_PAD: tl.constexpr, HEAD_DV: tl.constexpr, DV_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr,  # packed rows (GROUP·Tq of one kv head, in row blocks)
    BLOCK_N: tl.constexpr,
    NEED_CTX: tl.constexpr, WINDOWED: tl.constexpr, SOFTCAP: tl.constexpr, DOT_PREC: tl.constexpr,
    DOT_F32: tl.constexpr, HAS_SINK: tl.constexpr, SINK_ACC: tl.constexpr,
    VPr=None,  # VP: V·P_r per query head [B, Hq, Tk, DR_PAD] in v's dtype (the prefill launcher's project_values)
    stride_wb=0, stride_wh=0, stride_wt=0,
    VP: tl.constexpr = False,  # low rank through V·P_r: PartAcc holds Σ exp(s − m)·(V P_r), DR_PAD wide
    DR_PAD: tl.constexpr = 16,
):
    LOG2E_: tl.constexpr = 1.4426950408889634
    n_rows = GROUP * T
    n_rb = tl.cdiv(n_rows, BLOCK_M)
    pid = tl.program_id(0)
    split = tl.program_id(1)
    off_bk = pid // n_rb
    off_b = (off_bk // HKV).to(tl.int64)
    off_hk = (off_bk % HKV).to(tl.int64)
    first_row = (pid % n_rb) * BLOCK_M
    r = first_row + tl.arange(0, BLOCK_M)
    row_ok = r < n_rows
    t = r % T  # query row; its head below
    h = off_hk * GROUP + (r // T).to(tl.int64)
    pos = t + q_off  # absolute position
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D_PAD)
    mask_d = offs_d < HEAD_D
    offs_dv = tl.arange(0, DV_PAD)
    mask_dv = offs_dv < HEAD_DV
    t64 = t.to(tl.int64)
    q = tl.load(Q + off_b * stride_qb + h[:, None] * stride_qh + t64[:, None] * stride_qt + offs_d[None, :],
                mask=row_ok[:, None] & mask_d[None, :], other=0.0)
    if DOT_F32:
        q = q.to(tl.float32)
    k_base = K + off_b * stride_kb + off_hk * stride_kh
    v_base = V + off_b * stride_vb + off_hk * stride_vh
    # V·P_r: the block's rows belong to the group's heads [g_lo, g_hi), row r to head r // T.
    offs_w = tl.arange(0, DR_PAD)
    row_head = r // T
    g_lo = first_row // T
    g_hi = (tl.minimum(first_row + BLOCK_M, n_rows) - 1) // T + 1
    if VP:  # the block's first head's V·P_r rows
        w_base = VPr + off_b * stride_wb + (off_hk * GROUP + g_lo) * stride_wh
    else:
        w_base = VPr
    if WINDOWED:
        chunk_safe = tl.maximum(chunk, 1)
        row_lo = tl.where(chunk > 0, (pos // chunk_safe) * chunk_safe, pos - window + 1)
    else:
        row_lo = pos

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, DR_PAD if VP else DV_PAD], dtype=tl.float32)
    best_idx = tl.full([BLOCK_M], 2147483647, dtype=tl.int32)
    m_r = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    m_s = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    idx_s = tl.full([BLOCK_M], 2147483647, dtype=tl.int32)
    l_s = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_ref = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc_s = tl.zeros([BLOCK_M, DV_PAD], dtype=tl.float32)

    lo = kv_lo + split * split_len  # a multiple of BLOCK_N: kv_lo and split_len are
    hi = tl.minimum(lo + split_len, T_K)
    if HAS_SINK:
        # The tiles holding a sink key (j < n) first, with the sink's bookkeeping; then the rest without it.
        sink_end = ((n_sink + BLOCK_N - 1) // BLOCK_N) * BLOCK_N
        cut = tl.minimum(tl.maximum(sink_end, lo), hi)
        acc, l_i, m_i, best_idx, m_r, acc_s, l_s, m_ref, m_s, idx_s = _decode_tiles(
            acc, l_i, m_i, best_idx, m_r, acc_s, l_s, m_ref, m_s, idx_s,
            q, k_base, v_base, stride_kt, stride_vt, pos, row_lo, offs_n, offs_d, mask_d, offs_dv, mask_dv,
            scale, softcap, n_sink, lo, cut, T_K, w_base, stride_wh, stride_wt, offs_w, row_head, g_lo, g_hi,
            BLOCK_N, WINDOWED, SOFTCAP, NEED_CTX, DOT_PREC, DOT_F32, HAS_SINK, True, SINK_ACC, VP,
        )
        lo = cut
    acc, l_i, m_i, best_idx, m_r, acc_s, l_s, m_ref, m_s, idx_s = _decode_tiles(
        acc, l_i, m_i, best_idx, m_r, acc_s, l_s, m_ref, m_s, idx_s,
        q, k_base, v_base, stride_kt, stride_vt, pos, row_lo, offs_n, offs_d, mask_d, offs_dv, mask_dv,
        scale, softcap, n_sink, lo, hi, T_K, w_base, stride_wh, stride_wt, offs_w, row_head, g_lo, g_hi,
        BLOCK_N, WINDOWED, SOFTCAP, NEED_CTX, DOT_PREC, DOT_F32, HAS_SINK, False, SINK_ACC, VP,
    )

    # Per row, relative to this split's max (0 where it saw no finite score: then l = 0 and acc = 0).
    prow = ((off_b * H + h) * T + t64) * n_splits + split  # [B, Hq, Tq, splits], flattened
    f_base = PartF + prow
    tl.store(f_base, m_i, mask=row_ok)
    tl.store(f_base + part_stride, l_i, mask=row_ok)
    i_base = PartI + prow
    tl.store(i_base, best_idx, mask=row_ok)
    m_fin = tl.where(m_i == float("-inf"), 0.0, m_i)
    if HAS_SINK:  # the sink sums were last rescaled at the last sink tile (m_ref): to this split's max
        to_fin = tl.where(l_s > 0, tl.exp2((m_ref - m_fin) * LOG2E_), 0.0)
        tl.store(f_base + 2 * part_stride, m_r, mask=row_ok)
        tl.store(f_base + 3 * part_stride, l_s * to_fin, mask=row_ok)
        tl.store(f_base + 4 * part_stride, m_s, mask=row_ok)
        tl.store(i_base + part_stride, idx_s, mask=row_ok)
    a_ptrs = prow[:, None] * HEAD_DV + offs_dv[None, :]
    a_mask = row_ok[:, None] & mask_dv[None, :]
    if NEED_CTX and VP:  # every DR_PAD column (V·P_r's padding columns sum to 0)
        tl.store(PartAcc + prow[:, None] * DR_PAD + offs_w[None, :], acc, mask=row_ok[:, None])
    elif NEED_CTX:
        tl.store(PartAcc + a_ptrs, acc, mask=a_mask)
    if HAS_SINK and SINK_ACC:
        tl.store(PartAccS + a_ptrs, acc_s * to_fin[:, None], mask=a_mask)


@triton.jit(do_not_specialize=["d_r"])
def decode_combine(
    V, Out, Argmax, Top1P, Basis, Gram, SinkMass, LearnedSink, PartF, PartI, PartAcc, PartAccS,
    stride_vb, stride_vh, stride_vt, stride_ob, stride_oh, stride_ot,
    stride_ph, stride_pd, stride_pr, stride_lb, stride_lh, stride_lt,
    H, GROUP, T, n_splits, part_stride, d_r,
    HEAD_DV: tl.constexpr, DV_PAD: tl.constexpr, BLOCK_T: tl.constexpr, R_BLOCK: tl.constexpr,
    GRAM_COLS: tl.constexpr, MODE: tl.constexpr, NEED_CTX: tl.constexpr, STORE_ARGMAX: tl.constexpr,
    STORE_TOP1P: tl.constexpr, STORE_GRAM: tl.constexpr, STORE_SINK: tl.constexpr, DOT_PREC: tl.constexpr,
    HAS_SINK: tl.constexpr, SINK_ACC: tl.constexpr, LEARNED: tl.constexpr,
    VPr=None,  # VP: the split pass's V·P_r [B, Hq, Tk, DR_PAD] ((V P_r)[i*] is gathered from it)
    stride_wb=0, stride_wh=0, stride_wt=0,
    VP: tl.constexpr = False,  # low rank through V·P_r: the partial accumulators are DR_PAD wide
    DR_PAD: tl.constexpr = 16,
):
    LOG2E_: tl.constexpr = 1.4426950408889634
    BIG: tl.constexpr = 2147483647
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // H).to(tl.int64)
    off_h = (pid_bh % H).to(tl.int64)
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    mask_m = offs_t < T
    t64 = offs_t.to(tl.int64)
    offs_dv = tl.arange(0, DV_PAD)
    mask_dv = offs_dv < HEAD_DV
    mask_mdv = mask_m[:, None] & mask_dv[None, :]
    row0 = ((off_b * H + off_h) * T + t64) * n_splits  # this row's split 0 in the partial buffers

    m_i = tl.full([BLOCK_T], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_T], dtype=tl.float32)
    offs_w = tl.arange(0, DR_PAD)
    acc = tl.zeros([BLOCK_T, DR_PAD if VP else DV_PAD], dtype=tl.float32)
    best_idx = tl.full([BLOCK_T], BIG, dtype=tl.int32)
    m_r = tl.full([BLOCK_T], float("-inf"), dtype=tl.float32)
    m_s = tl.full([BLOCK_T], float("-inf"), dtype=tl.float32)
    idx_s = tl.full([BLOCK_T], BIG, dtype=tl.int32)
    l_s = tl.zeros([BLOCK_T], dtype=tl.float32)
    acc_s = tl.zeros([BLOCK_T, DV_PAD], dtype=tl.float32)
    for sp in range(0, n_splits):
        prow = row0 + sp
        m_sp = tl.load(PartF + prow, mask=mask_m, other=float("-inf"))
        l_sp = tl.load(PartF + part_stride + prow, mask=mask_m, other=0.0)
        i_sp = tl.load(PartI + prow, mask=mask_m, other=BIG)
        # Splits come in key order: a best score equal to the one kept so far keeps the smaller index (first index).
        if HAS_SINK:
            mr_sp = tl.load(PartF + 2 * part_stride + prow, mask=mask_m, other=float("-inf"))
            take = (mr_sp > m_r) | ((mr_sp == m_r) & (i_sp < best_idx))
            m_r = tl.maximum(m_r, mr_sp)
            ms_sp = tl.load(PartF + 4 * part_stride + prow, mask=mask_m, other=float("-inf"))
            is_sp = tl.load(PartI + part_stride + prow, mask=mask_m, other=BIG)
            take_s = (ms_sp > m_s) | ((ms_sp == m_s) & (is_sp < idx_s))
            idx_s = tl.where(take_s, is_sp, idx_s)
            m_s = tl.maximum(m_s, ms_sp)
        else:
            take = (m_sp > m_i) | ((m_sp == m_i) & (i_sp < best_idx))
        best_idx = tl.where(take, i_sp, best_idx)
        m_new = tl.maximum(m_i, m_sp)
        m_base = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2((m_i - m_base) * LOG2E_)
        beta = tl.exp2((m_sp - m_base) * LOG2E_)  # 0 for a split that saw no finite score (its sums are 0)
        l_i = l_i * alpha + l_sp * beta
        a_ptrs = prow[:, None] * HEAD_DV + offs_dv[None, :]
        if NEED_CTX and VP:  # V·P_r's partials: DR_PAD wide
            acc_sp = tl.load(PartAcc + prow[:, None] * DR_PAD + offs_w[None, :], mask=mask_m[:, None], other=0.0)
            acc = acc * alpha[:, None] + acc_sp * beta[:, None]
        elif NEED_CTX:
            acc = acc * alpha[:, None] + tl.load(PartAcc + a_ptrs, mask=mask_mdv, other=0.0) * beta[:, None]
        if HAS_SINK:
            l_s = l_s * alpha + tl.load(PartF + 3 * part_stride + prow, mask=mask_m, other=0.0) * beta
            if SINK_ACC:
                acc_s = acc_s * alpha[:, None] + tl.load(PartAccS + a_ptrs, mask=mask_mdv, other=0.0) * beta[:, None]
        m_i = m_new

    # ---- epilogue: the prefill kernel's, with the sink sums already relative to the final max ---------------
    bad = (m_i == float("inf")) | (m_i == float("-inf")) | (l_i != l_i) | (m_i != m_i)
    v_base = V + off_b * stride_vb + (off_h // GROUP) * stride_vh
    if LEARNED:
        sink_l = tl.load(LearnedSink + off_b * stride_lb + off_h * stride_lh + t64 * stride_lt, mask=mask_m, other=0.0)
        bad = bad | (sink_l != sink_l) | (sink_l == float("inf"))
    if HAS_SINK:
        r_empty = m_r == float("-inf")
        arg_idx = tl.where(r_empty, idx_s, best_idx)
        safe_idx = tl.where(bad | (~mask_m) | r_empty, 0, best_idx)
    else:
        arg_idx = best_idx
        safe_idx = tl.where(bad | (~mask_m), 0, best_idx)
    v_star = tl.load(v_base + safe_idx.to(tl.int64)[:, None] * stride_vt + offs_dv[None, :], mask=mask_mdv,
                     other=0.0).to(tl.float32)
    v_star = tl.where(bad[:, None], float("nan"), v_star)
    if LEARNED:
        m_all = tl.where(bad, 0.0, tl.maximum(m_i, sink_l))
        c_real = tl.exp2((m_i - m_all) * LOG2E_)
        e_sink = tl.exp2((sink_l - m_all) * LOG2E_)
        l_tot = l_i * c_real + e_sink
        l_div = tl.where(l_tot > 0, l_tot, 1.0)
        norm = c_real / l_div
        m_learned = e_sink / l_div
    else:
        l_div = tl.where(l_i > 0, l_i, 1.0)
        norm = 1.0 / l_div
    if NEED_CTX:  # through V·P_r: P_rᵀ ctx, DR_PAD wide
        ctx = tl.where(bad[:, None], float("nan"), acc * norm[:, None])
    m_fin = tl.where(m_i == float("-inf"), 0.0, m_i)
    if VP:  # names the V·P_r epilogue reads in every variant (overwritten where a sink / learned sink defines them)
        sink_part = v_star
        if not LEARNED:
            m_learned = tl.zeros([BLOCK_T], dtype=tl.float32)
        if not HAS_SINK:
            sink_mass = tl.zeros([BLOCK_T], dtype=tl.float32)
            r_empty = tl.zeros([BLOCK_T], dtype=tl.int1)
    if HAS_SINK:
        sink_mass = l_s * norm  # Σ_S p
        if LEARNED:
            sink_mass = sink_mass + m_learned
        if SINK_ACC:
            sink_part = acc_s * norm[:, None]
            ground = sink_part + (1.0 - sink_mass)[:, None] * v_star
            ground = tl.where(r_empty[:, None], sink_part, ground)
            ground = tl.where(bad[:, None], float("nan"), ground)
        else:
            ground = v_star
        sink_mass = tl.where(r_empty, 1.0, sink_mass)
    elif LEARNED:
        ground = (1.0 - m_learned)[:, None] * v_star
    else:
        ground = v_star
    if NEED_CTX and not VP:
        eps = ctx - ground
        if HAS_SINK:
            eps = tl.where((r_empty & (~bad))[:, None], 0.0, eps)
        eps = tl.where(mask_m[:, None], eps, 0.0)

    if MODE == 0:
        out = ground
    elif MODE == 1:
        out = ctx
    elif VP:  # the prefill kernel's epilogue: ground + P_r (P_rᵀ ctx − P_rᵀ ground)
        w_base = VPr + off_b * stride_wb + off_h * stride_wh
        out = _lowrank_vp_epilogue(ctx, ground, v_star, w_base, stride_wt, offs_w, safe_idx, bad, mask_m, Basis,
                                   off_h, stride_ph, stride_pd, stride_pr, offs_dv, mask_dv, d_r, sink_part,
                                   sink_mass, r_empty, m_learned, HAS_SINK, SINK_ACC, LEARNED, DOT_PREC)
    else:
        out = _lowrank_eps_epilogue(ground, eps, Basis, off_h, stride_ph, stride_pd, stride_pr, offs_dv, mask_dv, d_r,
                                    R_BLOCK, DOT_PREC)
    o_ptrs = Out + off_b * stride_ob + off_h * stride_oh + t64[:, None] * stride_ot + offs_dv[None, :]
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=mask_mdv)

    r_ptrs = (off_b * H + off_h) * T + t64  # argmax / top1_prob / sink_mass: contiguous [B, Hq, Tq]
    if STORE_ARGMAX:
        tl.store(Argmax + r_ptrs, tl.where(bad, -1, arg_idx).to(tl.int64), mask=mask_m)
    if STORE_TOP1P:
        if HAS_SINK:
            s_arg = tl.where(r_empty, m_i, m_r)
            top1 = tl.exp2((s_arg - m_fin) * LOG2E_) * norm
        else:
            top1 = norm  # the best score is the max: p[i*] = e^0 · norm
        tl.store(Top1P + r_ptrs, tl.where(bad, float("nan"), top1), mask=mask_m)
    if STORE_SINK:
        if HAS_SINK:
            tl.store(SinkMass + r_ptrs, tl.where(bad, float("nan"), sink_mass), mask=mask_m)
        elif LEARNED:
            tl.store(SinkMass + r_ptrs, tl.where(bad, float("nan"), m_learned), mask=mask_m)
        else:
            tl.store(SinkMass + r_ptrs, tl.where(bad, float("nan"), 0.0), mask=mask_m)
    if STORE_GRAM:
        _gram_block(Gram + off_h * (HEAD_DV * HEAD_DV), eps, offs_dv, mask_dv, HEAD_DV, DV_PAD, GRAM_COLS, DOT_PREC)


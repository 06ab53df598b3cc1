"""Fused Triton forward (prefill) kernel for residual attention (EXP-Q03).

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

Where the parts live: the key loop (``_attn_fwd_inner``, ``_attn_fwd_range``) in ``nqpq_kernels.prefill_loop``; the
tile helpers shared with the decode kernel (tanh, tile argmax, Gram blocks, V·P_r epilogue) in
``nqpq_kernels.tile_helpers``; the launcher (input checks, block sizes, grid, outputs) in ``nqpq_kernels.prefill``.
The module never touches the CUDA driver at import time.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .prefill_loop import _attn_fwd_range
from .tile_helpers import _gram_block, _gram_halves, _halves, _lowrank_eps_epilogue, _lowrank_vp_epilogue


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
        out = _lowrank_eps_epilogue(ground, eps, Basis, off_h, stride_ph, stride_pd, stride_pr, offs_dv, mask_dv, d_r,
                                    R_BLOCK, DOT_PREC)

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

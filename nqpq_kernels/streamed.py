"""Residual attention on CPU in query blocks: the reference's numbers without its T × T buffer.

``residual_attention_reference`` holds every score of a call at once (``[B, Hq, Tq, Tk]`` fp32: 46 GB at T 32k
for SmolLM2's 9 heads). This path walks the queries in blocks of ``block_size`` rows. A block [s, e) is a call
with Tq = e − s queries against the keys it can see (the KV-cache semantics of ``nqpq_kernels.contract``: its rows sit
at absolute positions Tk − Tq + s ... Tk − Tq + e − 1), i.e. the keys [lo, hi) with hi = its last position + 1
and lo = 0, or the first key a window or a chunk leaves visible to its first row. Within a block the softmax is
exact (no online rescaling: every key a row sees is in the block's buffer), so the peak memory is one
``[B, Hq, block, hi − lo]`` fp32 buffer, O(T · block), and the numbers are the reference's up to fp32 rounding.

Every feature of the reference is covered, none is refused or routed back: GQA/MQA (one matmul per kv head over
its G query heads' rows, K and V never repeated), MLA widths, sliding windows and Llama 4 chunks (the block's key
range starts at the first key its first row sees; the masks are per absolute position), soft-cap, ``sink_tokens``
(the block's key columns below n), learned sinks per head or per row, ``attn_mask`` (every key, the block's mask
rows), non-finite rows, argmax / top-1 probability / sink mass, and the Gram (Σ ε εᵀ in float64, block by block).

Work saved against the reference (where the time goes on CPU: passes over the score buffer):
- the scale (and the soft-cap's 1/c) is folded into the block's queries, not applied to the scores;
- the causal mask touches only the block's last ``block`` key columns (the diagonal square); a window or a chunk
  its whole (narrow) key range;
- the maximum and its first index come from ``max_first_index`` (vectorized group maxima, then one group's
  argmax: torch's CPU max-with-index is ~20× slower than ``amax``; that group's columns come by ``index_select``
  from a window view, ~4× faster than ``gather``); full mode without an argmax, a Gram or sink
  tokens needs no index at all; with sink tokens the sink columns and the rest are searched apart (the latter is
  both the overall maximum and i*ᴿ);
- p = exp(s − m) as exp2((s − m) · log2 e), each step in place in the score buffer, left unnormalized:
  ctx = (p @ V) / Σp divides Tq × Dv numbers, not Tq × Tk. torch's CPU ``exp2`` runs ~3× faster than its ``exp``:
  the three passes took 0.27 ms where ``softmax`` took 0.33 and ``sub_`` + ``exp_`` 0.53 (144 × 4096 fp32, 1 thread,
  this machine's AVX-512 EPYC), p within 1e-6 relative of exp's. The scores, their maximum and its index stay in the
  model's units (log2 e folded into q would round exact ties apart), and the maximum's own p is exactly 1 (a fused
  c·s − c·m is not 0 there: a one-key row's top-1 probability came out above 1);
- low rank for evaluation (no Gram asked, 0 < d_r < Dv) through V·P_r: P_r P_rᵀ (ctx − ground) =
  P_r (p @ (V P_r) − P_rᵀ ground), so the P·V product runs on d_r columns instead of Dv (issue 35 item 1's
  identity) and ctx is never formed. V P_r is computed once per call, per query head; where ground is V[i*],
  P_rᵀ ground is (V P_r)[i*], a row gather. Below ``NARROW_TRANSPOSED`` columns the product runs transposed,
  (V P_r)ᵀ @ pᵀ: BLAS runs a [rows, Tk] @ [Tk, 8] product ~3× slower than the [8, Tk] @ [Tk, rows] one
  (0.64 ms against 2.0 for 3 × 3 heads × 48 rows × 4096 keys at d_r 8, where p @ V at Dv 64 takes 2.5);
- top1 without the probability or a sink needs no exp at all: i* alone.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

from .contract import OUT_LAYOUTS, ResidualAttentionResult, _as_int, check_choice, check_residual_attention_inputs
from .rowmax import max_first_index

# The score buffer of one block is at most about this many bytes (block rows are picked to fit it, between
# MIN_BLOCK and MAX_BLOCK rows). Measured on this machine's CPU (1 thread, Hq 9, Hkv 3, D 64, fp32): at T 4096
# 48 rows (7 MiB) ran best (256 rows: 2× slower, the buffer leaves the caches); at T 1024, 64 rows ran full mode
# ~1.5× faster than 224; 8 MiB keeps the peak well under the 64 MiB asked at T 4096.
BLOCK_BYTES = 8 * 2**20
MIN_BLOCK, MAX_BLOCK = 16, 64
# Low rank's p @ (V P_r) runs as (V P_r)ᵀ @ pᵀ below this many columns (the module docstring's measurement: at
# 3 × 3 heads × 48 rows × 4096 keys, 1 thread, transposed / plain ms: d_r 4 0.49 / 2.05, d_r 8 0.64 / 2.01,
# d_r 16 0.94 / 0.78, d_r 32 1.58 / 1.41).
NARROW_TRANSPOSED = 16
LOG2E = math.log2(math.e)


def default_block_size(B: int, Hq: int, Tq: int, key_span: int) -> int:
    """Query rows per block such that one fp32 score buffer ``[B, Hq, rows, key_span]`` stays near
    ``BLOCK_BYTES``: a multiple of 16 in [MIN_BLOCK, MAX_BLOCK], and no more than Tq."""
    rows = BLOCK_BYTES // max(1, B * Hq * key_span * 4)
    rows = max(MIN_BLOCK, min(MAX_BLOCK, rows // 16 * 16))
    return max(1, min(rows, Tq))


@functools.lru_cache(maxsize=32)
def _upper(rows: int, device: torch.device) -> Tensor:
    """bool ``[rows, rows]``: True above the diagonal (key j after query i in the block's diagonal square).
    Read-only."""
    return torch.ones(rows, rows, dtype=torch.bool, device=device).triu_(1)


def residual_attention_streamed(
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
    sink_tokens: int = 0,
    return_sink_mass: bool = False,
    learned_sink: Tensor | None = None,
    attention_chunk: int | None = None,
    attn_mask: Tensor | None = None,
    block_size: int | None = None,
    crystal_heads: Tensor | None = None,
) -> ResidualAttentionResult:
    """Residual attention in query blocks; the contract, keywords and result of ``residual_attention_reference``
    (same checks, same fields, the same numbers up to fp32 rounding), plus ``block_size``: query rows per block
    (an int >= 1; None: ``default_block_size``, about ``BLOCK_BYTES`` of scores per block).

    Peak extra memory: one fp32 ``[B, Hq, block, keys]`` buffer (keys: the keys a block sees, at most Tk) plus
    fp32 copies of k and v and O(B · Hq · block · Dv) per block, besides the outputs. Runs on any device; the
    ``"torch"`` backend uses it on CPU.
    """
    args = check_residual_attention_inputs(q, k, v, mode, basis, d_r, scale, sliding_window, softcap, sink_tokens,
                                           learned_sink, attention_chunk, attn_mask, crystal_heads)
    check_choice("out_layout", out_layout, OUT_LAYOUTS)
    B, Hq, Tq, Dqk = q.shape
    Hkv, Tk, G, Dv = k.shape[1], k.shape[2], args.group, args.value_dim
    offset = Tk - Tq if attn_mask is None else 0  # query row r sits at absolute position offset + r
    window = args.sliding_window if args.sliding_window is not None and args.sliding_window < Tk else None
    chunk = args.attention_chunk  # None when it covers every position
    if block_size is None:
        span = Tk if attn_mask is not None or (window is None and chunk is None) else \
            min(Tk, (window if window is not None else chunk) + 256)
        block_size = default_block_size(B, Hq, Tq, span)
    else:
        block_size = _as_int("block_size", block_size)
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1 (query rows per block), got {block_size}")

    n = args.sink_tokens
    d_r = args.d_r
    # Heads left plain (crystal_heads False) output ctx: [1, Hkv, G, 1, 1] to select per head; None: every head.
    plain_heads = None if args.crystal_heads is None else ~args.crystal_heads.view(1, Hkv, G, 1, 1)
    # Low rank for evaluation goes through V·P_r (d_r columns instead of Dv); with a Gram, or heads left plain, ctx
    # is needed whole. V P_r costs Tk·Dv·d_r per head whatever Tq is; it pays where it saves more on p @ V
    # (Tq·Tk·(Dv − d_r)): not for a decode step (Tq = 1), where it would re-project the whole cache each token.
    use_proj = (mode == "lowrank" and not return_gram and 0 < d_r < Dv and Tq * (Dv - d_r) > Dv * d_r
                and plain_heads is None)
    need_ctx = mode == "full" or return_gram or (mode == "lowrank" and d_r > 0 and not use_proj) \
        or plain_heads is not None
    # p (an exp pass over the scores) is needed for ctx, the projection, the top-1 probability, and any sink mass;
    # top1 without them needs i* alone.
    need_exp = need_ctx or use_proj or return_top1_prob or args.learned_sink is not None
    # i* (a gather-friendly first index of the maximum) is needed but for full mode's ctx alone.
    need_index = mode != "full" or return_gram or return_argmax or n > 0

    # fp32, contiguous [B, Hkv, Tk, D] copies (a no-op for contiguous fp32 inputs): every block reads a slice
    # of them, which a strided view (transformers' [B, T, H, D] projections) would copy again per block.
    kf = k.float().contiguous()
    vf = v.float().contiguous()
    P = vp = vp_t = None
    if mode == "lowrank" and d_r > 0:
        P = basis[:, :, :d_r].to(device=q.device, dtype=torch.float32).reshape(Hkv, G, Dv, d_r)
        if use_proj:  # V P_r, O(T · d_r): one product per call, every block reads its rows
            # One product per kv head with its G heads' P_r side by side (V is not repeated per query head), then
            # per head: vp [B, Hkv, G, Tk, d_r] (its rows gathered at i*) and, for the narrow product, (V P_r)ᵀ.
            vp_heads = torch.matmul(vf, P.permute(0, 2, 1, 3).reshape(Hkv, Dv, G * d_r)).view(B, Hkv, Tk, G, d_r)
            vp = vp_heads.permute(0, 1, 3, 2, 4).contiguous()
            if d_r < NARROW_TRANSPOSED:
                vp_t = vp_heads.permute(0, 1, 3, 4, 2).contiguous()  # [B, Hkv, G, d_r, Tk]
            del vp_heads
    # The scale (and the soft cap's 1/c: tanh reads s / c) folded into q: one pass over the queries, not the scores.
    q_mult = args.scale / args.softcap if args.softcap is not None else args.scale

    out_shape = (B, Hq, Tq, Dv) if out_layout == "bhtd" else (B, Tq, Hq, Dv)
    out = torch.empty(out_shape, device=q.device, dtype=q.dtype)
    argmax = torch.empty(B, Hq, Tq, dtype=torch.int64, device=q.device) if return_argmax else None
    top1_prob = torch.empty(B, Hq, Tq, dtype=torch.float32, device=q.device) if return_top1_prob else None
    sink_mass = torch.empty(B, Hq, Tq, dtype=torch.float32, device=q.device) if return_sink_mass else None
    gram_device = torch.device("cpu") if q.device.type == "mps" else q.device  # MPS has no float64
    gram = torch.zeros(Hq, Dv, Dv, dtype=torch.float64, device=gram_device) if return_gram else None
    neg_inf = float("-inf")
    # Flat row offsets of each (batch, kv head) in [B·Hkv·Tk, ·] and of each query head in [B·Hkv·G·Tk, ·]
    kv_row_base = torch.arange(0, B * Hkv * Tk, Tk, device=q.device).view(B, Hkv, 1, 1)
    head_row_base = torch.arange(0, B * Hq * Tk, Tk, device=q.device).view(B, Hkv, G, 1)

    for s0 in range(0, Tq, block_size):
        s1 = min(Tq, s0 + block_size)
        rows = s1 - s0
        first, last = offset + s0, offset + s1 - 1  # the block's first and last absolute positions
        if attn_mask is not None:
            lo, hi = 0, Tk
        else:
            lo, hi = 0, last + 1
            if window is not None:
                lo = max(0, first - window + 1)
            if chunk is not None:
                lo = first // chunk * chunk
        cols = hi - lo

        # Scores [B, Hkv, G·rows, cols]: one matmul per kv head over its G query heads' rows.
        qb = q[:, :, s0:s1].reshape(B, Hkv, G * rows, Dqk).float().mul(q_mult)
        s = torch.matmul(qb, kf[:, :, lo:hi].transpose(-1, -2))
        del qb
        if args.softcap is not None:
            s.tanh_().mul_(args.softcap)
        s5 = s.view(B, Hkv, G, rows, cols)
        if attn_mask is not None:
            mask = args.attn_mask[:, :, s0:s1].reshape(B, Hkv, G, rows, Tk)
            if mask.dtype == torch.bool:
                s5.masked_fill_(~mask, neg_inf)
            else:
                s5.add_(mask.float())
            del mask
        elif window is None and chunk is None:
            # Plain causal: only the diagonal square (keys first..last) holds hidden keys.
            s5[..., cols - rows:].masked_fill_(_upper(rows, q.device), neg_inf)
        else:
            i = torch.arange(first, last + 1, device=q.device)[:, None]
            j = torch.arange(lo, hi, device=q.device)[None, :]
            hidden = j > i
            if window is not None:
                hidden |= j <= i - window
            if chunk is not None:
                hidden |= (j // chunk) != (i // chunk)
            s5.masked_fill_(hidden, neg_inf)
            del hidden

        # The maximum, its first index, and with sink tokens i*ᴿ over the columns of keys >= n.
        n_loc = min(max(n - lo, 0), cols)  # this block's columns that are sink keys
        r_empty = i_star = None
        if n_loc == 0:
            m, i_star = max_first_index(s5) if need_index else (s5.amax(dim=-1), None)
            bad = ~torch.isfinite(m)  # the maximum propagates NaN: a row with a NaN score has m NaN
            no_key = m == neg_inf if attn_mask is not None else None  # only a mask makes a row empty
        elif n_loc == cols:  # every key the block sees is a sink key
            m, i_star = max_first_index(s5)
            bad = ~torch.isfinite(m)
            no_key = m == neg_inf if attn_mask is not None else None
            r_empty = torch.ones_like(bad)
        else:
            m_s, i_s = s5[..., :n_loc].max(dim=-1)  # n_loc columns: the plain max is cheap there
            m_r, i_r = max_first_index(s5[..., n_loc:])
            # The first maximum overall is in S on a tie (S comes first); where() would drop a NaN of either half.
            m = torch.where(m_s >= m_r, m_s, m_r)
            bad = ~torch.isfinite(m) | m_s.isnan() | m_r.isnan()
            r_empty = m_r == neg_inf
            no_key = (m_s == neg_inf) & r_empty
            # i*ᴿ, or on rows whose R has no finite score the overall first maximum (then in S)
            i_star = torch.where(r_empty, i_s, i_r + n_loc)
            del m_s, m_r, i_s, i_r

        sink_logit = m_learned = None
        if args.learned_sink is not None:
            sink_logit = args.learned_sink[:, :, s0:s1].float().reshape(B, Hkv, G, rows)
            sink_bad = ~(sink_logit < math.inf)  # a NaN or +inf logit: no softmax
            bad |= sink_bad
            if no_key is not None:
                no_key &= ~sink_bad
        # Under an attn_mask, a row with no visible key (every masked score -inf, none NaN: a pad query) is empty:
        # computed as a bad row, then a zero output, argmax -1, top1_prob and sink_mass 0, ε = 0.
        empty = no_key if attn_mask is not None and bool(no_key.any()) else None
        any_bad = bool(bad.any())  # most blocks have none: their NaN fills are skipped
        if i_star is not None and any_bad:
            i_star.masked_fill_(bad, 0)  # a valid index to gather with; the rows are NaN below

        # p = exp(s − m) = exp2((s − m) · log2 e) in the score buffer, unnormalized, with denom = Σp (+ the learned
        # sink's term): ctx = (p @ V) / denom.
        p = denom = m_all = None
        if need_exp or n_loc > 0:
            m_all = m if sink_logit is None else torch.maximum(m, sink_logit)
            # Bad rows get 0 as their shift (their results are overwritten): no inf − inf.
            m_all = m_all.masked_fill(bad, 0.0) if any_bad else m_all
            p = s5.sub_(m_all.unsqueeze(-1)).mul_(LOG2E).exp2_()
            denom = p.sum(dim=-1)
            if sink_logit is not None:
                sink_term = (sink_logit - m_all).mul_(LOG2E).exp2_()
                denom.add_(sink_term)
                m_learned = sink_term.div_(denom)

        vb = vf[:, :, lo:hi]  # [B, Hkv, cols, Dv]
        ctx = None
        if need_ctx:
            ctx = torch.matmul(p.view(B, Hkv, G * rows, cols), vb).view(B, Hkv, G, rows, Dv)
            ctx.div_(denom.unsqueeze(-1))
        v_star = None
        if i_star is not None:
            # V[i*] by flat row indices into the contiguous [B·Hkv·Tk, Dv] (a view; index_select is several times
            # faster than gather on an expanded view or advanced indexing).
            star_rows = i_star.add(kv_row_base if lo == 0 else kv_row_base + lo).view(-1)
            v_star = vf.view(B * Hkv * Tk, Dv).index_select(0, star_rows).view(B, Hkv, G, rows, Dv)

        mass = None  # all the mass kept apart: m_S + m_L
        if n_loc > 0:
            p_sink = p[..., :n_loc]
            mass = p_sink.sum(dim=-1).div_(denom)
            sink_ctx = torch.matmul(p_sink, vb[:, :, None, :n_loc]).div_(denom.unsqueeze(-1))
            if m_learned is not None:
                mass.add_(m_learned)
            ground = sink_ctx.add_(v_star.mul_((1.0 - mass).unsqueeze(-1)))
            # Rows whose R holds no finite score: ground = ctx (p is zero outside S there, so ctx = Σ_S p V).
            ground = torch.where(r_empty.unsqueeze(-1), ctx if ctx is not None else sink_ctx, ground)
            mass.masked_fill_(r_empty, 1.0)
        elif m_learned is not None:
            mass = m_learned
            ground = v_star.mul_((1.0 - m_learned).unsqueeze(-1)) if v_star is not None else None
        else:
            ground = v_star  # None in full mode without a Gram or an argmax: not needed
        # V[i*] itself (the mul_ above scaled v_star in place: not that)
        ground_is_v_star = n_loc == 0 and m_learned is None
        if any_bad:
            nan_rows = bad.unsqueeze(-1)
            if ground is not None:
                ground.masked_fill_(nan_rows, math.nan)
            if ctx is not None:
                ctx.masked_fill_(nan_rows, math.nan)

        if empty is not None:
            if ground is not None:
                ground.masked_fill_(empty.unsqueeze(-1), 0.0)
            if ctx is not None:
                ctx.masked_fill_(empty.unsqueeze(-1), 0.0)
            if mass is not None:
                mass = mass.masked_fill(empty, 0.0)
        if mode == "top1" or (mode == "lowrank" and d_r == 0):
            o = ground
        elif mode == "full":
            o = ctx
        elif use_proj:
            # P_r P_rᵀ (ctx − ground) = P_r (p @ (V P_r) / Σp − P_rᵀ ground); zero where ground = ctx.
            if vp_t is not None:  # (V P_r)ᵀ @ pᵀ, read back transposed: [B, Hkv, G, rows, d_r]
                coeff = torch.matmul(vp_t[..., lo:hi], p.transpose(-1, -2)).transpose(-1, -2)
            else:
                coeff = torch.matmul(p, vp[:, :, :, lo:hi])
            coeff.div_(denom.unsqueeze(-1))
            if ground_is_v_star:  # P_rᵀ V[i*] = (V P_r)[i*]: rows of [B·Hkv·G·Tk, d_r], Tk per query head
                head_rows = i_star.add(head_row_base if lo == 0 else head_row_base + lo).view(-1)
                coeff.sub_(vp.view(-1, d_r).index_select(0, head_rows).view(coeff.shape))
            else:
                coeff.sub_(torch.matmul(ground, P))
            if r_empty is not None:
                coeff.masked_fill_(r_empty.unsqueeze(-1), 0.0)
            if empty is not None:
                coeff.masked_fill_(empty.unsqueeze(-1), 0.0)
            o = ground.add_(torch.matmul(coeff, P.transpose(-1, -2)))
        else:
            o = ground + torch.matmul(torch.matmul(ctx - ground, P), P.transpose(-1, -2))
        if plain_heads is not None:
            o = torch.where(plain_heads, ctx, o)

        o = o.reshape(B, Hq, rows, Dv)
        if out_layout == "bhtd":
            out[:, :, s0:s1] = o
        else:
            out[:, s0:s1] = o.transpose(1, 2)
        if return_gram:
            eps = (ctx - ground).reshape(B, Hq, rows, Dv)
            eps64 = (eps.cpu() if eps.device.type == "mps" else eps).double()
            gram += torch.einsum("bhti,bhtj->hij", eps64, eps64)
            del eps, eps64
        if argmax is not None:
            argmax[:, :, s0:s1] = (i_star + lo).masked_fill_(bad, -1).reshape(B, Hq, rows)
        if top1_prob is not None:
            if n_loc > 0:  # p of the returned index, i*ᴿ
                top1 = p.gather(-1, i_star.unsqueeze(-1)).squeeze(-1).div_(denom)
            else:  # p[i*] = exp2(m − m_all) / denom (m_all = m but where a learned sink holds the maximum)
                top1 = (m - m_all).mul_(LOG2E).exp2_().div_(denom)
            top1 = top1.masked_fill_(bad, math.nan)
            if empty is not None:
                top1.masked_fill_(empty, 0.0)
            top1_prob[:, :, s0:s1] = top1.reshape(B, Hq, rows)
        if sink_mass is not None:
            if mass is None:
                mass = torch.zeros(B, Hkv, G, rows, device=q.device)
            mass = mass.masked_fill(bad, math.nan)
            if empty is not None:
                mass.masked_fill_(empty, 0.0)
            sink_mass[:, :, s0:s1] = mass.reshape(B, Hq, rows)
        # Freed before the next block's scores are allocated: one score buffer alive at a time.
        s = s5 = p = ctx = ground = o = v_star = None

    return ResidualAttentionResult(out, argmax, gram, top1_prob, sink_mass)

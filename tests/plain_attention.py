"""An independent float64 implementation of residual attention for the op tests: one (b, h) at a time.

It follows the definitions, not the package code: query head h reads kv head h // (Hq // Hkv); scores
s = q kᵀ · scale, soft-capped c·tanh(s/c), masked to i - w < j <= i; i* = first index of the row maximum of
s; p = softmax(s); ctx = p @ V; ε = ctx − V[i*]. A row whose visible scores contain NaN, or whose maximum is
±inf, is non-finite: NaN output, argmax −1, top1_prob NaN (and NaN Gram for its head).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch


class Plain(NamedTuple):
    out: torch.Tensor  # float64 [B, Hq, T, D]
    argmax: torch.Tensor  # int64 [B, Hq, T]
    gram: torch.Tensor  # float64 [Hq, D, D]
    top1_prob: torch.Tensor  # float64 [B, Hq, T]
    scores: torch.Tensor  # float64 [B, Hq, T, T], masked entries -inf
    bad: torch.Tensor  # bool [B, Hq, T]


def plain_scores(q, k, scale=None, sliding_window=None, softcap=None, attention_chunk=None):
    """float64 masked (capped) scores [B, Hq, T, T] and the non-finite-row mask [B, Hq, T]."""
    B, Hq, T, D = q.shape
    G = Hq // k.shape[1]
    scale = D**-0.5 if scale is None else scale
    out = torch.empty(B, Hq, T, T, dtype=torch.float64)
    bad = torch.zeros(B, Hq, T, dtype=torch.bool)
    i = torch.arange(T)[:, None]
    j = torch.arange(T)[None, :]
    visible = (j <= i) & (True if sliding_window is None else (j > i - sliding_window))
    if attention_chunk is not None:  # Llama 4's chunks: query i sees only the keys of its own chunk
        visible = visible & (j // attention_chunk == i // attention_chunk)
    for b in range(B):
        for h in range(Hq):
            s = q[b, h].double().cpu() @ k[b, h // G].double().cpu().T * scale
            if softcap is not None:
                s = softcap * torch.tanh(s / softcap)
            s = torch.where(visible, s, -math.inf)
            best = s.nan_to_num(nan=-math.inf, posinf=math.inf, neginf=-math.inf).amax(-1)
            bad[b, h] = torch.isnan(s).any(-1) | ~torch.isfinite(best)
            out[b, h] = s
    return out, bad


def plain(q, k, v, mode, basis=None, d_r=None, scale=None, sliding_window=None, softcap=None, idx=None,
          attention_chunk=None) -> Plain:
    """Everything the op returns, in float64. ``idx`` overrides i* (to follow another backend on near-ties)."""
    B, Hq, T, D = q.shape
    G = Hq // k.shape[1]
    scores, bad = plain_scores(q, k, scale, sliding_window, softcap, attention_chunk)
    out = torch.empty(B, Hq, T, D, dtype=torch.float64)
    arg = torch.empty(B, Hq, T, dtype=torch.long)
    top1 = torch.empty(B, Hq, T, dtype=torch.float64)
    gram = torch.zeros(Hq, D, D, dtype=torch.float64)
    nan = float("nan")
    for b in range(B):
        for h in range(Hq):
            s = scores[b, h].nan_to_num(nan=-math.inf, posinf=math.inf, neginf=-math.inf)
            i_star = torch.argmax(s, dim=-1)  # first maximal index
            if idx is not None:
                i_star = idx[b, h].cpu().clamp_min(0)
            p = torch.softmax(s, dim=-1)
            vv = v[b, h // G].double().cpu()
            ctx = p @ vv
            v_star = vv[i_star]
            row_bad = bad[b, h]
            ctx[row_bad] = nan
            v_star[row_bad] = nan
            eps = ctx - v_star
            if mode == "top1":
                o = v_star
            elif mode == "full":
                o = ctx
            else:
                P = basis[h, :, :d_r].double().cpu()
                o = v_star + eps @ P @ P.T
            out[b, h] = o
            arg[b, h] = torch.where(row_bad, -1, i_star)
            top1[b, h] = torch.where(row_bad, nan, p.max(dim=-1).values)
            gram[h] += eps.T @ eps
    return Plain(out, arg, gram, top1, scores, bad)


def top2_gap(scores: torch.Tensor) -> torch.Tensor:
    """Gap between the best and the second-best visible score of each row (inf with one visible key)."""
    s = scores.nan_to_num(nan=-math.inf)
    if s.shape[-1] == 1:
        return torch.full(s.shape[:-1], math.inf, dtype=s.dtype)
    top = s.topk(2, dim=-1).values
    gap = top[..., 0] - top[..., 1]
    return torch.where(torch.isfinite(top[..., 1]), gap, torch.full_like(gap, math.inf))


# Output tolerances against float64 (the output is in the input dtype).
TOL = {
    torch.float32: dict(atol=2e-5, rtol=1e-5),
    torch.float16: dict(atol=1e-2, rtol=5e-3),
    torch.bfloat16: dict(atol=6e-2, rtol=2e-2),
}
GRAM_RTOL = {torch.float32: 1e-4, torch.float16: 3e-3, torch.bfloat16: 2e-2}
CLEAR_GAP = 1e-3  # float64 top-2 score gap above which a row's argmax must match exactly


def check_against_plain(res, q, k, v, mode, basis=None, d_r=None, scale=None, sliding_window=None, softcap=None,
                        out_layout="bhtd", min_clear=0.9, attention_chunk=None):
    """Compare a ResidualAttentionResult with the float64 definitions, well-conditioned by construction.

    The argmax must equal the float64 one on every row whose top-2 score gap exceeds CLEAR_GAP (and those
    rows must be at least ``min_clear`` of the finite ones); elsewhere it must be a near-maximum. Outputs,
    top1_prob and the Gram are then compared with float64 math following the backend's own index, so a
    near-tie cannot decide the comparison. Non-finite rows must match exactly (NaN, -1, NaN).
    Returns the float64 ``Plain``.
    """
    dtype = q.dtype
    kw = dict(basis=basis, d_r=d_r, scale=scale, sliding_window=sliding_window, softcap=softcap,
              attention_chunk=attention_chunk)
    first = plain(q, k, v, mode, **kw)
    if res.argmax is not None:
        idx = res.argmax.cpu()
        assert idx.dtype == torch.int64 and idx.shape == q.shape[:3]
        assert torch.equal(idx[first.bad], torch.full_like(idx[first.bad], -1)), "non-finite rows need argmax -1"
        ok = ~first.bad
        gap = top2_gap(first.scores)
        clear = ok & (gap > CLEAR_GAP)
        assert int(clear.sum()) >= min_clear * int(ok.sum()), "test inputs are not well-conditioned"
        assert torch.equal(idx[clear], first.argmax[clear]), "argmax differs on rows with a clear maximum"
        T = q.shape[2]
        assert bool((idx[ok] >= 0).all()) and bool((idx <= torch.arange(T)).all()), "index out of range"
        s_at = first.scores.gather(-1, idx.clamp_min(0).unsqueeze(-1)).squeeze(-1)
        best = first.scores.nan_to_num(nan=-math.inf).amax(-1)
        assert bool((s_at[ok] >= best[ok] - CLEAR_GAP).all()), "argmax is not a near-maximum of the scores"
        want = plain(q, k, v, mode, idx=idx, **kw)
    else:
        want = first
    out = res.out
    if out_layout == "bthd":
        assert out.is_contiguous()
        out = out.transpose(1, 2)
    assert out.dtype == dtype and out.shape == q.shape
    torch.testing.assert_close(out.double().cpu(), want.out, **TOL[dtype], check_dtype=False, equal_nan=True)
    if res.top1_prob is not None:
        assert res.top1_prob.dtype == torch.float32 and res.top1_prob.shape == q.shape[:3]
        torch.testing.assert_close(res.top1_prob.double().cpu(), want.top1_prob, atol=2e-6, rtol=2e-5,
                                   equal_nan=True)
    if res.gram is not None:
        assert res.gram.dtype == torch.float64 and res.gram.shape == (q.shape[1], q.shape[3], q.shape[3])
        finite = torch.isfinite(want.gram).all(-1).all(-1)
        assert torch.equal(torch.isfinite(res.gram.cpu()).all(-1).all(-1), finite)
        if bool(finite.any()):
            g, w = res.gram.cpu()[finite], want.gram[finite]
            assert float((g - w).abs().max() / w.abs().max().clamp_min(1e-12)) < GRAM_RTOL[dtype]
    return first

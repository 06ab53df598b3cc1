"""Reference (eager PyTorch) residual attention: the CPU path and the oracle for the kernel.

Same signature as ``nqpq_kernels.residual_attention_triton`` so that tests and
users can swap the two. Semantics follow EXP-Q03, per query head h reading kv
head ``h // (Hq // Hkv)`` (transformers' ``repeat_kv`` order):

    s   = q kᵀ · scale                            (float32)
    s   = c · tanh(s / c)                         (with softcap=c, before masking: Gemma 2's order)
    s   = -inf where j > i, or j <= i - w         (causal; sliding_window=w)
    p   = softmax(s)
    i*  = first index of max_j s[j]               (argmax p is argmax s: exp is monotone; taking it on
                                                    s keeps it exact where p rounds two scores together)
    ctx = p @ V,   ε = ctx − V[i*]
    top1 → V[i*];  full → ctx;  lowrank → V[i*] + P_r P_rᵀ ε

The sink (``sink_tokens=n``; n = 0, the default, is the spec exactly and every number is today's):

    S   = the visible keys j < n,   R = the visible keys j >= n
    i*ᴿ = first index of max_{j∈R} s[j]          (the argmax skips the sink)
    m_S = Σ_{j∈S} p[j]                            (the sink mass; p is still the softmax over all visible keys)
    ground = Σ_{j∈S} p[j] V[j] + (1 − m_S) · V[i*ᴿ]     (the sink kept exactly, the rest of the mass on
                                                       its winner);  ground = ctx where R has no finite
                                                       score (every row t < n)
    ε = ctx − ground;   top1 → ground;  full → ctx;  lowrank → ground + P_r P_rᵀ ε

Chunked attention (``attention_chunk=C``, Llama 4): query i sees the keys j <= i with j // C == i // C, its own
chunk only. Under a sliding window or a chunk S holds only the sink keys the row still sees (often none: then
ground = V[i*ᴿ]).
``argmax`` is i*ᴿ (on rows where R has no finite score: the first maximum over all visible keys, a sink
key), ``top1_prob`` the softmax probability of that index, p[argmax], and ``sink_mass`` m_S (exactly 1 on
the rows where ground = ctx).

The learned sink (``learned_sink``: one logit s_h per query head, gpt-oss's ``sinks``, or one per query row
[B, Hq, T], Inkling 2's ``sink_proj`` of the row's hidden state; None, the default, is
every number of today bit for bit) is a key every row sees, with the raw logit s_h (not scaled, capped or
masked) and the value ZERO, as transformers' gpt-oss attention concatenates it to the scaled, capped, masked
scores, softmaxes, and drops its column:

    p   = softmax over the visible scores and s_h      (Σ_j p[j] + m_L = 1)
    m_L = p_sink = exp(s_h) / (exp(s_h) + Σ_j exp(s[j]))
    ctx = Σ_j p[j] V[j]                               (the model's own output: the sink adds no value)

It is always kept apart, like the ``sink_tokens`` keys: the argmax stays over the real keys (the rules above),
and with m_S the ``sink_tokens`` mass of this p,

    ground = Σ_{j∈S} p[j] V[j] + (1 − m_S − m_L) · V[i*ᴿ]     (sink_tokens = 0: ground = (1 − m_L) · V[i*])
    ε = ctx − ground;   top1 → ground;  full → ctx;  lowrank → ground + P_r P_rᵀ ε

(rows whose R has no finite score still have ground = ctx). ``top1_prob`` is p[argmax] in this softmax and
``sink_mass`` is m_S + m_L, all the mass kept apart.

An explicit mask (``attn_mask``, torch SDPA's: bool, True = the key takes part, or float, added; broadcast to
``[B, Hq, Tq, Tk]``) replaces the causal rule: s = q kᵀ · scale (capped) + mask (−inf where a bool mask is False),
over all Tk keys (k and v may hold Tk != Tq keys: keys the model appends); every rule above then reads "visible"
as "a finite score", and i* may be a key >= Tq.

Per-head crystallization (``crystal_heads``, bool ``[Hq]``; None = every head): a head marked False outputs ctx,
plain attention, whatever the mode; its argmax, top-1 probability, sink mass and Gram of ε are computed as for any
head (calibration reads the Gram of every head).

A KV cache (no ``attn_mask``, q holding Tq <= Tk queries): the queries are the last Tq of the Tk positions, query
row r at absolute position i = Tk − Tq + r (bottom-right aligned causal, as FlashAttention >= 2.1): every rule above
reads i, so row r of such a call equals row Tk − Tq + r of the whole Tk × Tk call. The windows, chunks, the sink
keys j < n and the argmax (a key index) are absolute; out, argmax, top1_prob and sink_mass have Tq rows and the
Gram sums over those Tq rows only.

Widths (multi-head latent attention): q and k may be Dqk wide and v Dv wide. The scores live in the q/k width
(the default scale is Dqk**-0.5); ctx, V[i*], ε, out, the basis ``[Hq, Dv, R]`` and the Gram ``[Hq, Dv, Dv]``
in the value width.

Non-finite rows: a row whose visible scores contain NaN, or whose maximum score is +inf or -inf (e.g. fp16
inputs that overflowed to inf), or whose head's learned sink logit is NaN or +inf, has no defined softmax. Its
output row is NaN in every mode, its argmax is -1, its top1_prob and sink_mass NaN, and the Gram of its head is
NaN. Every other row is computed as usual (a -inf score alone just gets zero weight; so does a -inf learned sink).
Under an ``attn_mask``, a row with no visible key (every masked score -inf, none NaN: a pad query of a padded batch)
is empty instead: a finite zero output in every mode, argmax -1, top1_prob and sink_mass 0, and ε = 0 (nothing in the
Gram), so that it joins no statistic.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from .contract import OUT_LAYOUTS, ResidualAttentionResult, check_choice, check_residual_attention_inputs


def visible_keys(T: int, sliding_window: int | None, device: torch.device | str,
                 attention_chunk: int | None = None, n_keys: int | None = None) -> Tensor:
    """bool ``[T, Tk]`` (Tk = ``n_keys``, default T): query row r, at absolute position i = Tk − T + r (the last T
    of Tk positions: bottom-right aligned causal, a KV cache), sees key j iff ``j <= i`` and (with a window w)
    ``j > i - w`` and (with a chunk C, Llama 4's chunked attention) ``j // C == i // C``. The one definition of
    visibility every path uses."""
    Tk = T if n_keys is None else n_keys
    i = torch.arange(Tk - T, Tk, device=device)  # the queries' absolute positions
    j = torch.arange(Tk, device=device)
    diff = i[:, None] - j[None, :]  # i - j
    visible = diff >= 0
    if sliding_window is not None and sliding_window < Tk:  # a window of Tk or more is plain causal (any int)
        visible &= diff < sliding_window
    if attention_chunk is not None and attention_chunk < Tk:  # so is a chunk of Tk or more
        visible &= (i // attention_chunk)[:, None] == (j // attention_chunk)[None, :]
    return visible


@functools.lru_cache(maxsize=16)
def _hidden_keys(T: int, sliding_window: int | None, device: torch.device,
                 attention_chunk: int | None = None, n_keys: int | None = None) -> Tensor:
    """``~visible_keys(T, sliding_window, device, attention_chunk, n_keys)``, built once per shape and device
    (read-only: never modify it).

    Every crystallized layer of every batch masks with it; rebuilding it per call cost 7 % of the op on CPU."""
    return ~visible_keys(T, sliding_window, device, attention_chunk, n_keys)


def residual_attention_reference(
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
    crystal_heads: Tensor | None = None,
) -> ResidualAttentionResult:
    """Residual attention in plain PyTorch, vectorized over batch and heads.

    q ``[B, Hq, T, D]``, k ``[B, Hkv, T, D]`` and v ``[B, Hkv, T, Dv]`` (``Hq % Hkv == 0``; Dv = D but for
    MLA). Returns a ``ResidualAttentionResult(out, argmax, gram, top1_prob, sink_mass)``: ``out`` in the input
    dtype, ``[B, Hq, T, Dv]`` (or ``[B, T, Hq, Dv]`` with ``out_layout="bthd"``); ``argmax`` int64
    ``[B, Hq, T]``; ``gram`` float64 ``[Hq, Dv, Dv]`` = Σ_{b,t} ε εᵀ; ``top1_prob`` float32
    ``[B, Hq, T]`` = p[argmax] (max_j p[j] for ``sink_tokens=0`` without a learned sink); ``sink_mass``
    float32 ``[B, Hq, T]`` = Σ_{j<n} p[j] + m_L (module docstring). Fields not asked for are None. Holds one
    fp32 ``[B, Hq, Tq, Tk]`` buffer (plus a transient bool one). On MPS, which has no float64, the Gram comes
    back on the CPU. ``crystal_heads`` (bool ``[Hq]``): the heads marked False output ctx (module docstring).
    """
    args = check_residual_attention_inputs(q, k, v, mode, basis, d_r, scale, sliding_window, softcap, sink_tokens,
                                           learned_sink, attention_chunk, attn_mask, crystal_heads)
    check_choice("out_layout", out_layout, OUT_LAYOUTS)
    B, Hq, T, Dqk = q.shape
    Tk = k.shape[2]  # >= T without an attn_mask: the queries are the last T positions
    D = args.value_dim  # everything after the scores is in v's width
    Hkv, G = k.shape[1], args.group
    # [B, Hkv, G, T, D] views: query head h = kv * G + g reads kv head kv, with no repeated K/V.
    qf = q.float().reshape(B, Hkv, G, T, Dqk)
    kf = k.float().unsqueeze(2)
    vf = v.float().unsqueeze(2)

    # One Tq×Tk buffer: scores, then p in place.
    s = torch.matmul(qf, kf.transpose(-1, -2)).mul_(args.scale)
    if args.softcap is not None:
        s.div_(args.softcap).tanh_().mul_(args.softcap)
    if args.attn_mask is None:
        s.masked_fill_(_hidden_keys(T, args.sliding_window, q.device, args.attention_chunk, Tk), float("-inf"))
    else:  # the mask alone: added to the scores (eager attention's order), or True = the key takes part
        mask = args.attn_mask.reshape(B, Hkv, G, T, Tk)  # a view where it can (a broadcast is never copied)
        if mask.dtype == torch.bool:
            s.masked_fill_(~mask, float("-inf"))
        else:
            s.add_(mask.float())
        del mask
    n = args.sink_tokens
    i_star = s.argmax(dim=-1)  # torch.argmax returns the first maximal index
    m = s.gather(-1, i_star.unsqueeze(-1))
    # torch.argmax returns the index of a NaN where a row has one, so a row with a NaN has a NaN m: when every m
    # is finite no score is NaN, and the whole-buffer NaN scan below is skipped (the same result, one pass less).
    bad = ~torch.isfinite(m.squeeze(-1))  # [B, Hkv, G, T]
    if bool(bad.any()):
        nan_rows = s.isnan().any(dim=-1)
        if bool(nan_rows.any()):
            s.nan_to_num_(nan=float("-inf"), posinf=float("inf"), neginf=float("-inf"))
            i_star = s.argmax(dim=-1)
            m = s.gather(-1, i_star.unsqueeze(-1))
        bad = nan_rows | ~torch.isfinite(m.squeeze(-1))
    else:
        nan_rows = bad  # all False
    # Under an attn_mask, a row with no visible key (every masked score -inf, none NaN: a pad query) is empty: a
    # zero output, argmax -1, top1_prob and sink_mass 0, nothing in the Gram. Computed as a bad row, zeroed at the end.
    empty = None
    if args.attn_mask is not None and bool(bad.any()):
        empty = (m.squeeze(-1) == float("-inf")) & ~nan_rows
    sink_logit = None
    if learned_sink is not None:
        # The learned sink's logit per row in the [B, Hkv, G, T, 1] layout (a view: one per head has row stride 0);
        # a NaN or +inf logit makes its row non-finite. m_all is the softmax's max over the real scores and it.
        sink_logit = args.learned_sink.to(dtype=torch.float32).reshape(B, Hkv, G, T, 1)
        sink_bad = ~(sink_logit < float("inf")).squeeze(-1)
        bad = bad | sink_bad
        if empty is not None:
            empty &= ~sink_bad
        m_all = torch.maximum(m, sink_logit)
    if empty is not None and not bool(empty.any()):
        empty = None
    if n > 0:
        # i*ᴿ over the keys j >= n; a row whose R holds no finite score (t < n) keeps the overall argmax,
        # and its ground state is ctx.
        if n < Tk:
            s_rest = s[..., n:]
            i_rest = s_rest.argmax(dim=-1)
            r_empty = s_rest.gather(-1, i_rest.unsqueeze(-1)).squeeze(-1) == float("-inf")
            i_star = torch.where(r_empty, i_star, i_rest + n)
            del s_rest
        else:  # every key is a sink key
            r_empty = torch.ones_like(nan_rows)
    # A head left plain (crystal_heads False) outputs ctx.
    need_ctx = mode != "top1" or return_gram or n > 0 or args.crystal_heads is not None
    # top1 without its probability (the sweep's top-1 replay) needs only i*; top1 with it only Σ_j exp(s_j - m);
    # with a learned sink the ground state needs its mass, so the denominator too.
    need_p = need_ctx or return_top1_prob or sink_logit is not None
    p = denom = None
    m_learned = None  # the learned sink's probability m_L, [B, Hkv, G, T, 1]
    if need_p:
        if sink_logit is None:
            p = s.sub_(m).exp_()  # the maximum's term is exp(0) = 1 exactly, so p[i*] = 1 / Σ_j exp(s_j - m)
            denom = p.sum(dim=-1, keepdim=True)
        else:
            p = s.sub_(m_all).exp_()
            sink_term = (sink_logit - m_all).exp_()
            denom = p.sum(dim=-1, keepdim=True).add_(sink_term)
            m_learned = sink_term.div_(denom)
        if need_ctx:
            p.div_(denom)
    top1_prob = None
    if return_top1_prob:
        if n > 0:  # p of the returned index, i*ᴿ (1 / denom only for the overall maximum)
            top1 = p.gather(-1, i_star.unsqueeze(-1)).squeeze(-1)
        elif sink_logit is not None:  # p[i*] = exp(m − m_all) / denom: the sink may be the softmax's max
            top1 = (m - m_all).exp_().div_(denom).squeeze(-1)
        else:
            top1 = denom.reciprocal_().squeeze(-1)
        top1_prob = top1.masked_fill_(bad, float("nan")).reshape(B, Hq, T)

    i_star.masked_fill_(bad, 0)  # a valid index to gather with; the rows are overwritten with NaN below
    v_star = torch.gather(vf.expand(B, Hkv, G, Tk, D), 3, i_star.unsqueeze(-1).expand(B, Hkv, G, T, D))
    v_star.masked_fill_(bad.unsqueeze(-1), float("nan"))

    sink_mass = None
    if n > 0:
        p_sink = p[..., :n]
        mass = p_sink.sum(dim=-1)  # [B, Hkv, G, T]
        if m_learned is not None:  # all the mass kept apart: m_S + m_L
            mass.add_(m_learned.squeeze(-1))
        sink_ctx = torch.matmul(p_sink, vf[..., :n, :])
        # ground = Σ_S p V + (1 − m_S) V[i*ᴿ]; ctx on the rows whose R holds no finite score.
        ground = sink_ctx.add_(v_star * (1.0 - mass).unsqueeze(-1))
        mass = mass.masked_fill_(r_empty, 1.0).masked_fill_(bad, float("nan"))
        if return_sink_mass:
            sink_mass = mass.reshape(B, Hq, T)
        del p_sink
    elif return_sink_mass:
        if m_learned is not None:
            sink_mass = m_learned.squeeze(-1).masked_fill(bad, float("nan")).reshape(B, Hq, T)
        else:
            sink_mass = torch.zeros(B, Hq, T, device=q.device, dtype=torch.float32)
            sink_mass.masked_fill_(bad.reshape(B, Hq, T), float("nan"))
    ctx = torch.matmul(p, vf).masked_fill_(bad.unsqueeze(-1), float("nan")) if need_ctx else None
    del p, s
    if n > 0:
        ground = torch.where(r_empty.unsqueeze(-1), ctx, ground).masked_fill_(bad.unsqueeze(-1), float("nan"))
    elif m_learned is not None:
        ground = v_star.mul_(1.0 - m_learned)  # the learned sink's mass kept apart: (1 − m_L) V[i*]
    else:
        ground = v_star  # the spec: V[i*]

    ground = ground.reshape(B, Hq, T, D)
    ctx = ctx.reshape(B, Hq, T, D) if need_ctx else None
    if empty is not None:  # rows with no visible key: zero, and ε = 0 (they join no statistic)
        empty4 = empty.reshape(B, Hq, T, 1)
        ground = ground.masked_fill(empty4, 0.0)
        ctx = ctx.masked_fill(empty4, 0.0) if need_ctx else None
        if top1_prob is not None:
            top1_prob.masked_fill_(empty4.squeeze(-1), 0.0)
        if sink_mass is not None:
            sink_mass = sink_mass.masked_fill(empty4.squeeze(-1), 0.0)
    if mode == "top1":
        out = ground
    elif mode == "full":
        out = ctx
    else:
        eps = ctx - ground
        P = basis[:, :, : args.d_r].to(device=q.device, dtype=torch.float32)  # [Hq, Dv, d_r]
        coeff = torch.einsum("bhtd,hdr->bhtr", eps, P)
        out = ground + torch.einsum("bhtr,hdr->bhtd", coeff, P)
    if args.crystal_heads is not None:  # the heads not chosen: plain attention
        out = torch.where(args.crystal_heads.view(1, Hq, 1, 1), out, ctx)

    gram = None
    if return_gram:
        eps = ctx - ground
        # MPS has no float64: the Gram is then summed, and returned, on the CPU.
        eps64 = (eps.cpu() if eps.device.type == "mps" else eps).double()
        gram = torch.einsum("bhti,bhtj->hij", eps64, eps64)

    out = out.to(q.dtype)
    out = out.transpose(1, 2).contiguous() if out_layout == "bthd" else out
    argmax = i_star.masked_fill_(bad, -1).reshape(B, Hq, T) if return_argmax else None
    return ResidualAttentionResult(out, argmax, gram, top1_prob, sink_mass)

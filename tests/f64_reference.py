"""An independent float64 implementation of the scan's and the crystallinity's definitions (test helper).

The model under test is copied to float64, and its attention runs through a function registered here
that computes every (batch, query head) with its own loop: masked scaled scores, softmax, i* = the
first index of the maximal score, the top-1 probability max_j p[j], ε = p @ V − V[i*], and, on the one
crystallized layer, V[i*] (top-1) or V[i*] + P_r P_rᵀ ε (low-rank). Nothing of nqpq is used.
The scores live in q/k's width and ctx, V[i*], ε and the Gram in v's (multi-head latent attention); a sliding
window the layer passes is applied, and so is a Llama 4 layer's chunk; a learned sink (``s_aux``, one logit s_h
per head) is a key every row sees with logit s_h and value zero: p is the softmax over the visible scores and
s_h, m_L = p_sink, and the ground state is (1 − m_L) V[i*] (Σ_{j<n} p_j V_j + (1 − m_S − m_L) V[i*ᴿ] with sink
tokens), the statistics' sink mass m_S + m_L. A module calling the function twice on the same q and k
(DiffLlama, once per half of V) has its rows counted once in the statistics; each call's ε joins the Gram. With
``sink_tokens = n > 0`` the ground state is Σ_{j<n} p_j V_j + (1 − Σ_{j<n} p_j) V[i*ᴿ] (i*ᴿ the first maximum
over j >= n; ctx on rows t < n) in place of V[i*], and the statistics are those of i*ᴿ and p[i*ᴿ].

Also the tiny GQA Llama the scan and crystallinity tests share, and ``sink_plain``: the op with the first
``sink_tokens`` keys kept apart (issue 19), defined row by row, with ``check_sink_against_f64``.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, LlamaConfig, LlamaForCausalLM
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

NAME = "nqpq_test_f64"
VARIANCE_TARGET = 0.90


def _f64_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    ref: F64Reference = module._nqpq_f64
    B, Hq, T, Dqk = query.shape
    Dv = value.shape[-1]  # multi-head latent attention: v narrower than q/k
    group = Hq // key.shape[1]  # query head h reads kv head h // group (transformers' repeat_kv order)
    window = kwargs.get("sliding_window")
    i = torch.arange(T)
    visible = i[:, None] >= i[None, :]
    if window is not None:
        visible &= (i[:, None] - i[None, :]) < window
    # Llama 4's chunked layers: the chunk is in the mask the model builds, not an argument; read it as the model
    # does, from its config (layer_types[layer] == "chunked_attention", attention_chunk_size C): j // C == i // C.
    layer_types = getattr(getattr(module, "config", None), "layer_types", None)
    if layer_types is not None and layer_types[module.layer_idx] == "chunked_attention":
        chunk = module.config.attention_chunk_size
        visible &= (i[:, None] // chunk) == (i[None, :] // chunk)
    if attention_mask is not None:
        allowed = attention_mask if attention_mask.dtype == torch.bool else attention_mask == 0
        assert torch.equal(allowed, visible.expand_as(allowed)), "the reference handles plain causal masks only"
    indices = kwargs.get("indices")  # DeepSeek V3.2's sparse selection: here it must select every key
    assert indices is None or indices.shape[-1] >= T, "the reference handles dense attention only"
    learned = kwargs.get("s_aux")  # [Hq] learned sink logits (gpt-oss), or None
    # The layer index the test numbers this module by (HRM: the high stack's modules count on after the low
    # stack's, whose layer_idx they share), else the model's own.
    layer = getattr(module, "_nqpq_f64_layer", module.layer_idx)
    # DiffLlama calls the function twice per forward with the same q and k (once per half of V): one softmax, so
    # its rows are counted once in the statistics, while each call's ε (its half of V) joins the Gram.
    repeat = getattr(module, "_nqpq_f64_last", (None, None))
    repeat = repeat[0] is query and repeat[1] is key
    module._nqpq_f64_last = (query, key)
    mode, P = ref.crystal.get(layer, (None, None))
    out = torch.empty(B, T, Hq, Dv, dtype=torch.float64)
    probs = torch.empty(B, Hq, T, T, dtype=torch.float64)
    for b in range(B):
        for h in range(Hq):
            q, k, v = query[b, h].double(), key[b, h // group].double(), value[b, h // group].double()
            s = (q @ k.T * scaling).masked_fill(~visible, -math.inf)
            if learned is None:
                p = torch.softmax(s, dim=-1)
                m_l = torch.zeros(T, dtype=torch.float64)
            else:  # a key every row sees, with logit s_h and value zero: it joins the softmax, not ctx
                both = torch.softmax(torch.cat([s, learned[h].double().expand(T, 1)], dim=-1), dim=-1)
                p, m_l = both[:, :T], both[:, T]
            n = ref.sink_tokens
            ctx = p @ v
            if n == 0:
                i_star = s.argmax(dim=-1)  # first index of the max score (real keys only)
                v_star = (1 - m_l)[:, None] * v[i_star]
                mass = m_l.clone()
            else:  # the sink kept apart: the winner among keys j >= n; rows t < n see only the sink
                i_star = torch.cat([s[:n].argmax(dim=-1), n + s[n:, n:].argmax(dim=-1)])
                mass = p[:, :n].sum(dim=-1) + m_l
                v_star = p[:, :n] @ v[:n] + (1 - mass)[:, None] * v[i_star]
                v_star[:n] = ctx[:n]
                mass[:n] = 1.0
            eps = ctx - v_star
            if mode is not None and not repeat:
                top = s[1:].topk(2, dim=-1).values  # row 0 sees one key: its argmax cannot flip
                ref.crystal_gaps.append(((top[:, 0] - top[:, 1]).min() / s[visible].abs().max()).item())
            if layer in ref.observed:
                # Conditioning: the top-2 score gap relative to the scores' size (rounding is relative).
                top = s[1:].topk(2, dim=-1).values  # row 0 sees one key: its argmax cannot flip
                ref.gaps.append(((top[:, 0] - top[:, 1]).min() / s[visible].abs().max()).item())
                if not repeat:
                    ref.stats.setdefault(layer, []).append((h, i_star, p.gather(-1, i_star[:, None])[:, 0], mass))
                if ref.grams is not None:
                    g = ref.grams.setdefault(layer, torch.zeros(Hq, Dv, Dv, dtype=torch.float64))
                    g[h] += eps.T @ eps
            heads = ref.crystal_heads.get(layer)  # None: every head of a crystallized layer
            if mode is None or (heads is not None and h not in heads):
                o = ctx
            elif mode == "top1":
                o = v_star
            else:
                o = v_star + eps @ P[h] @ P[h].T
            out[b, :, h], probs[b, h] = o, p
    return out, probs


class F64Reference:
    """A float64 copy of ``model`` whose attention is computed by the loop above."""

    def __init__(self, model: torch.nn.Module) -> None:
        if NAME not in AttentionInterface._global_mapping:
            AttentionInterface.register(NAME, _f64_attention)
            AttentionMaskInterface.register(NAME, ALL_MASK_ATTENTION_FUNCTIONS._global_mapping["sdpa"])
        self.model = copy.deepcopy(model).double().eval()
        self.model.set_attn_implementation(NAME)
        for module in self.model.modules():
            if hasattr(module, "layer_idx") and hasattr(module, "scaling"):  # the attention modules
                module._nqpq_f64 = self
        self.crystal: dict[int, tuple[str, torch.Tensor | None]] = {}
        self.crystal_heads: dict[int, set[int]] = {}  # layer → the query heads crystallized (absent: all)
        self.observed: set[int] = set()
        self.grams: dict[int, torch.Tensor] | None = None
        self.stats: dict[int, list] = {}
        self.gaps: list[float] = []  # per observed call: min top-2 score gap / max |score|
        self.crystal_gaps: list[float] = []  # the same, per (batch, head) of every crystallized call
        self.sink_tokens = 0  # keys j < sink_tokens kept exactly in the ground state (0: the spec's V[i*])

    @torch.no_grad()
    def block_losses(self, blocks: torch.Tensor) -> torch.Tensor:
        """Per-block mean next-token loss (float64) of the model as configured."""
        logits = self.model(input_ids=blocks, use_cache=False).logits.double()
        nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), blocks[:, 1:].reshape(-1),
                              reduction="none")
        return nll.view(blocks.shape[0], -1).mean(dim=1)

    def ppl(self, blocks: torch.Tensor) -> float:
        return math.exp(self.block_losses(blocks).mean().item())

    def baseline(self, blocks: torch.Tensor, calib_blocks: int, layers: Sequence[int]) -> float:
        """Baseline PPL; observes ``layers``: Grams on the first ``calib_blocks`` blocks, stats on all."""
        self.observed = set(layers)
        self.grams = {}
        self.block_losses(blocks[:calib_blocks])
        grams, self.grams = self.grams, None
        self.block_losses(blocks[calib_blocks:])
        self.observed = set()
        self.basis, self.r90, self.cv = {}, {}, {}
        for layer, gram in grams.items():
            evals, evecs = torch.linalg.eigh(gram)
            evals, evecs = evals.flip(-1).clamp(min=0), evecs.flip(-1)
            cv = evals.cumsum(-1) / evals.sum(-1, keepdim=True)
            self.basis[layer], self.cv[layer] = evecs, cv
            self.r90[layer] = (cv < VARIANCE_TARGET).sum(-1) + 1
        return self.ppl(blocks)

    def crystallinity(self) -> list[dict]:
        """Per (layer, head), from the rows the baseline observed, counted one by one."""
        out = []
        for layer in sorted(self.stats):
            per_head: dict[int, list[float]] = {}
            for h, i_star, top1, mass in self.stats[layer]:
                acc = per_head.setdefault(h, [0.0, 0, 0, 0, 0, 0.0, 0.0, 0])
                for t in range(i_star.numel()):
                    i = int(i_star[t])
                    acc[0] += float(top1[t])
                    acc[1] += i == 0
                    acc[2] += i == t
                    acc[3] += t >= 1 and i == t - 1
                    acc[4] += 1
                    acc[5] += float(mass[t])
                    if t >= self.sink_tokens:  # a row that sees a key beyond the sink
                        acc[6] += float(top1[t]) / (1 - float(mass[t]))
                        acc[7] += 1
            for h in sorted(per_head):
                top1, sink, self_, prev, rows, mass, share, share_rows = per_head[h]
                out.append({"layer": layer, "head": h, "top1_prob_mean": top1 / rows, "sink_frac": sink / rows,
                            "self_frac": self_ / rows, "prev_frac": prev / rows, "sink_mass_mean": mass / rows,
                            "winner_share_mean": share / share_rows})
        return out

    def layer_ppl(self, blocks: torch.Tensor, layer: int, mode: str, d_r: int | None = None,
                  heads: Sequence[int] | None = None) -> float:
        """PPL with only ``layer`` crystallized (``lowrank`` uses the basis from ``baseline``); ``heads``: only those
        query heads of it (None: all)."""
        P = self.basis[layer][:, :, :d_r] if mode == "lowrank" else None
        self.crystal = {layer: (mode, P)}
        self.crystal_heads = {} if heads is None else {layer: set(heads)}
        try:
            return self.ppl(blocks)
        finally:
            self.crystal, self.crystal_heads = {}, {}


def build_llama(vocab_size: int, seed: int = 0, sharpen: float = 12.0) -> LlamaForCausalLM:
    """Tiny random Llama with grouped-query attention (Hq 4, Hkv 2, D 16).

    q and k are scaled by ``sharpen`` (scores by its square): peaked rows as in trained models, so the
    top-1 probabilities and the sink/self/prev fractions are far from uniform.
    """
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         bos_token_id=0, eos_token_id=0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight *= sharpen
            layer.self_attn.k_proj.weight *= sharpen
    model.set_attn_implementation("eager")
    return model.float().eval()


# --------------------------------------------------------------------------- #
# The sink kept apart (sink_tokens=n): an independent float64 definition, one (b, h) and one row at a time
# --------------------------------------------------------------------------- #
class SinkPlain(NamedTuple):
    out: torch.Tensor  # float64 [B, Hq, T, D]
    argmax: torch.Tensor  # int64 [B, Hq, T]: i*ᴿ; on rows whose R has no finite score, the overall first max
    gram: torch.Tensor  # float64 [Hq, D, D]: Σ εεᵀ with ε = ctx − ground
    ctx_gram: torch.Tensor  # float64 [Hq, D, D]: Σ ctx ctxᵀ, the size ε's rounding is relative to
    top1_prob: torch.Tensor  # float64 [B, Hq, T]: p[argmax]
    sink_mass: torch.Tensor  # float64 [B, Hq, T]: Σ_{j∈S} p[j]
    gap: torch.Tensor  # float64 [B, Hq, T]: top-2 gap of the scores the argmax is taken over (inf: one key)
    scores: torch.Tensor  # float64 [B, Hq, T, T], invisible keys -inf
    bad: torch.Tensor  # bool [B, Hq, T]: non-finite rows
    empty: torch.Tensor | None = None  # bool [B, Hq, T]: rows with no visible key under an attn_mask (pad queries)


def sink_plain(q, k, v, mode, basis=None, d_r=None, scale=None, sliding_window=None, softcap=None, sink_tokens=0,
               idx=None, learned_sink=None, attention_chunk=None, attn_mask=None, crystal_heads=None) -> SinkPlain:
    """Residual attention with the first ``sink_tokens`` keys kept apart, in float64, from the definitions.

    v may be narrower or wider than q and k (MLA): out, ε and the Gram are v's width. ``learned_sink`` ([Hq] or
    [B, Hq, T] logits): a key every row sees with that raw logit and a zero value; p = softmax over the visible
    scores and the logit (its column then dropped), m_L = its probability, kept apart: ground = Σ_S p_j V_j +
    (1 − m_S − m_L) V[i*ᴿ], sink_mass = m_S + m_L; a NaN or +inf logit makes the row non-finite.

    Per row r, at absolute position t = Tk − Tq + r (without a mask k and v may hold Tk >= Tq keys: the queries
    are the last Tq positions, a KV cache): visible keys j <= t (and j > t − w with a window, j >= (t // C)·C with a
    chunk C);
    S = visible j < n, R = visible j >= n;
    p = softmax over all visible scores; i*ᴿ = first index of the largest score over R; ground = Σ_S p_j V_j
    + (1 − Σ_S p_j) V[i*ᴿ], or ctx where R has no finite score; ε = ctx − ground. A row with a NaN visible
    score or a ±inf best score is non-finite: NaN out, argmax −1, NaN top1_prob and sink_mass. ``idx``
    overrides the argmax (to follow another backend on near-ties). Nothing of nqpq is used.

    ``attn_mask`` (torch SDPA's: bool, True = the key takes part, or float, added to the capped scores; broadcast
    to [B, Hq, T, Tk]; k and v then hold Tk keys): it alone decides the keys of row t, in place of the causal rule.
    A row with no visible key under ``attn_mask`` (every masked score −inf, none NaN: a pad query) is empty: a zero
    output, argmax −1, top1_prob and sink_mass 0, nothing in the Gram.

    ``crystal_heads`` (a sequence of Hq bools, or None: every head): a head marked False outputs ctx in every mode;
    its argmax, probabilities and Gram are the same as any head's.
    """
    B, Hq, T, Dqk = q.shape
    D = v.shape[-1]
    G = Hq // k.shape[1]
    Tk = k.shape[2]
    if attn_mask is not None:
        attn_mask = attn_mask.cpu().expand(B, Hq, T, Tk)
    scale = Dqk**-0.5 if scale is None else scale
    n = sink_tokens
    nan = float("nan")
    out = torch.empty(B, Hq, T, D, dtype=torch.float64)
    arg = torch.empty(B, Hq, T, dtype=torch.long)
    top1 = torch.empty(B, Hq, T, dtype=torch.float64)
    mass = torch.empty(B, Hq, T, dtype=torch.float64)
    gap = torch.empty(B, Hq, T, dtype=torch.float64)
    gram = torch.zeros(Hq, D, D, dtype=torch.float64)
    ctx_gram = torch.zeros(Hq, D, D, dtype=torch.float64)
    scores = torch.full((B, Hq, T, Tk), -math.inf, dtype=torch.float64)
    bad = torch.zeros(B, Hq, T, dtype=torch.bool)
    empty = torch.zeros(B, Hq, T, dtype=torch.bool)
    for b in range(B):
        for h in range(Hq):
            qq, kk, vv = (x.double().cpu() for x in (q[b, h], k[b, h // G], v[b, h // G]))
            for r in range(T):
                t = r if attn_mask is not None else Tk - T + r  # the query's absolute position
                first_key = 0 if sliding_window is None else max(0, t - sliding_window + 1)
                if attention_chunk is not None:  # Llama 4's chunks: only the keys of t's own chunk
                    first_key = max(first_key, t // attention_chunk * attention_chunk)
                js = torch.arange(first_key, t + 1)
                if attn_mask is not None:  # the mask alone: its True keys, or every key with the mask added
                    row_mask = attn_mask[b, h, r]
                    js = torch.nonzero(row_mask)[:, 0] if row_mask.dtype == torch.bool else torch.arange(Tk)
                s = kk[js] @ qq[r] * scale
                if softcap is not None:
                    s = softcap * torch.tanh(s / softcap)
                if attn_mask is not None and attn_mask.dtype != torch.bool:
                    s = s + attn_mask[b, h, r].double()
                scores[b, h, r, js] = s
                sink = None if learned_sink is None else \
                    (learned_sink[h] if learned_sink.dim() == 1 else learned_sink[b, h, r]).double().cpu().reshape(1)
                sink_bad = sink is not None and not bool(sink[0] < math.inf)
                if attn_mask is not None and not sink_bad and (len(js) == 0 or bool((s == -math.inf).all())):
                    # No visible key (a pad query): a zero output, argmax -1, no probability, nothing in the Gram.
                    empty[b, h, r] = True
                    out[b, h, r], arg[b, h, r], top1[b, h, r], mass[b, h, r], gap[b, h, r] = 0.0, -1, 0.0, 0.0, math.inf
                    continue
                if len(js) == 0 or bool(torch.isnan(s).any()) or not bool(torch.isfinite(s.max())) or sink_bad:
                    bad[b, h, r] = True
                    out[b, h, r], arg[b, h, r], top1[b, h, r], mass[b, h, r], gap[b, h, r] = nan, -1, nan, nan, nan
                    gram[h] = nan
                    continue
                if sink is None:
                    p, m_l = torch.softmax(s, dim=0), 0.0
                else:  # the learned sink's column, softmaxed with the scores, then dropped
                    p_all = torch.softmax(torch.cat([s, sink]), dim=0)
                    p, m_l = p_all[:-1], p_all[-1]
                ctx = p @ vv[js]
                in_s, in_r = js < n, js >= n
                r_finite = bool(torch.isfinite(s[in_r]).any())
                pool = in_r if r_finite else torch.ones_like(in_r)  # the keys the argmax is taken over
                pool_s = torch.where(pool, s, -math.inf)
                pick = int(torch.nonzero(pool_s == pool_s.max())[0])  # the largest score, first index on ties
                top2 = pool_s.topk(min(2, len(js))).values
                gap[b, h, r] = top2[0] - top2[1] if len(top2) > 1 and bool(torch.isfinite(top2[1])) else math.inf
                if idx is not None:
                    pick = int(torch.nonzero(js == int(idx[b, h, r]))[0])
                if r_finite:
                    m_s = p[in_s].sum() + m_l  # all the mass kept apart
                    ground = p[in_s] @ vv[js[in_s]] + (1.0 - m_s) * vv[js[pick]]
                else:
                    ground, m_s = ctx, 1.0
                eps = ctx - ground
                if crystal_heads is not None and not bool(crystal_heads[h]):
                    o = ctx  # a head left plain
                elif mode == "top1":
                    o = ground
                elif mode == "full":
                    o = ctx
                else:
                    P = basis[h, :, :d_r].double().cpu()
                    o = ground + eps @ P @ P.T
                out[b, h, r], arg[b, h, r], top1[b, h, r], mass[b, h, r] = o, js[pick], p[pick], m_s
                gram[h] += torch.outer(eps, eps)
                ctx_gram[h] += torch.outer(ctx, ctx)
    return SinkPlain(out, arg, gram, ctx_gram, top1, mass, gap, scores, bad, empty)


# Tolerances against float64 for the output (in the input dtype), the probabilities, and the Gram.
SINK_TOL = {
    torch.float32: dict(atol=2e-5, rtol=1e-5),
    torch.float16: dict(atol=1e-2, rtol=5e-3),
    torch.bfloat16: dict(atol=6e-2, rtol=2e-2),
}
SINK_GRAM_RTOL = {torch.float32: 1e-4, torch.float16: 3e-3, torch.bfloat16: 2e-2}
SINK_CLEAR_GAP = 1e-3  # float64 top-2 gap above which the argmax must match exactly


def check_sink_against_f64(res, q, k, v, mode, basis=None, d_r=None, scale=None, sliding_window=None,
                           softcap=None, sink_tokens=0, out_layout="bhtd", min_clear=0.9,
                           learned_sink=None, attention_chunk=None, attn_mask=None, crystal_heads=None) -> SinkPlain:
    """Compare a ResidualAttentionResult (argmax, top1_prob and sink_mass asked for) with ``sink_plain``.

    The argmax must equal float64's on every row whose top-2 gap (over the keys it is taken over) exceeds
    SINK_CLEAR_GAP — at least ``min_clear`` of the finite rows, a property of the inputs — and be a
    near-maximum of those keys elsewhere; then outputs, top1_prob, sink_mass and the Gram are compared with
    float64 following the backend's own index. Returns the float64 result (with its own argmax).
    """
    dtype = q.dtype
    T = q.shape[2]
    kw = dict(basis=basis, d_r=d_r, scale=scale, sliding_window=sliding_window, softcap=softcap,
              sink_tokens=sink_tokens, learned_sink=learned_sink, attention_chunk=attention_chunk, attn_mask=attn_mask,
              crystal_heads=None if crystal_heads is None else crystal_heads.tolist())
    first = sink_plain(q, k, v, mode, **kw)
    idx = res.argmax.cpu()
    ok = ~first.bad & ~first.empty
    assert idx.dtype == torch.int64 and idx.shape == q.shape[:3]
    assert torch.equal(idx == -1, first.bad | first.empty), "non-finite and empty rows need argmax -1, and only they"
    clear = ok & (first.gap > SINK_CLEAR_GAP)
    assert int(clear.sum()) >= min_clear * int(ok.sum()), "test inputs are not well-conditioned"
    assert torch.equal(idx[clear], first.argmax[clear]), "argmax differs on rows with a clear maximum"
    rows = torch.arange(k.shape[2] - T, k.shape[2]).expand_as(idx)  # the queries' absolute positions
    if attn_mask is None:
        assert bool((idx <= rows).all()), "index out of range"
        r_rows = ok & (rows >= sink_tokens)  # R holds key t itself: the argmax is in R
        assert bool((idx[r_rows] >= sink_tokens).all()), "the argmax must skip the sink on rows t >= n"
    else:
        assert bool((idx < k.shape[2]).all()), "index out of range"
    s_at = first.scores.gather(-1, idx.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    s_best = first.scores.gather(-1, first.argmax.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    assert bool((s_at[ok] >= s_best[ok] - SINK_CLEAR_GAP).all()), "argmax is not a near-maximum"
    want = sink_plain(q, k, v, mode, idx=idx, **kw)
    out = res.out.transpose(1, 2) if out_layout == "bthd" else res.out
    assert out.dtype == dtype and out.shape == (*q.shape[:3], v.shape[-1])
    torch.testing.assert_close(out.double().cpu(), want.out, **SINK_TOL[dtype], check_dtype=False, equal_nan=True)
    assert res.top1_prob.dtype == torch.float32 and res.sink_mass.dtype == torch.float32
    for name in ("top1_prob", "sink_mass"):
        torch.testing.assert_close(getattr(res, name).double().cpu(), getattr(want, name), atol=2e-6, rtol=2e-5,
                                   equal_nan=True, msg=name)
    if res.gram is not None:
        finite = torch.isfinite(want.gram).all(-1).all(-1)
        assert torch.equal(torch.isfinite(res.gram.cpu()).all(-1).all(-1), finite)
        if bool(finite.any()):
            # ε = ctx − ground is a difference of two vectors of ctx's size, so its rounding is relative to ctx:
            # where ε vanishes in exact math (a row seeing one key of R: ground = ctx) the Gram is ~0 and only
            # that scale is meaningful.
            g, w, size = res.gram.cpu()[finite], want.gram[finite], want.ctx_gram[finite].abs().max()
            assert float((g - w).abs().max() / torch.maximum(w.abs().max(), size)) < SINK_GRAM_RTOL[dtype]
    return first


@torch.no_grad()
def f64_loglikelihood(ref: F64Reference, context: list[int], continuation: list[int]) -> float:
    """The float64 loglikelihood of ``continuation`` after ``context`` (token ids) under ``ref`` as configured."""
    ids = torch.tensor([context + continuation])
    logits = ref.model(input_ids=ids[:, :-1], use_cache=False).logits[0].double()
    logp = torch.log_softmax(logits, dim=-1)[len(context) - 1:]
    return float(logp.gather(-1, torch.tensor(continuation)[:, None]).sum())

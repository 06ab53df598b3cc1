"""The op's explicit mask (``attn_mask``: SDPA's bool mask or an additive float bias, Tk >= Tq keys) against float64,
in the reference and the Triton kernel (the CPU interpreter without CUDA), and the models whose attention modules
build masks of their own (Doge's dynamic mask, DeepSeek V4's compressed keys, Qwen4-exp's key selection) or pass a
score bias (Inkling's ``position_bias``), crystallized.

The float64 oracle is tests/f64_reference.py's ``sink_plain`` (row by row: the mask alone decides a row's keys;
a float mask is added to the capped scores), and for the models the census's per-head ``float64_reference``
(nqpq.model.census) on the q, k, v and mask each call received.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from f64_reference import check_sink_against_f64  # noqa: E402

from nqpq import residual_attention  # noqa: E402
from nqpq.errors import UnsupportedModelError  # noqa: E402
from nqpq.model import census, tiny_models  # noqa: E402
from nqpq.model.crystallize import crystallize  # noqa: E402
from nqpq.model.losses import lm_losses  # noqa: E402
from nqpq.model.parts import model_parts  # noqa: E402
from nqpq_kernels.dispatch import residual_attention_impl  # noqa: E402
from nqpq_kernels.reference import residual_attention_reference  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
MODES = ("top1", "full", "lowrank")


def triton_impl():
    """The kernel, or a skip where it cannot run (no CUDA and triton imported before TRITON_INTERPRET was set)."""
    pytest.importorskip("triton")
    from nqpq_kernels import prefill as ra_mod

    if DEV == "cpu" and not ra_mod.interpreter_active():
        pytest.skip("triton was imported before TRITON_INTERPRET=1 could be set; run with it in the environment")
    return ra_mod.residual_attention_triton


def make_mask(kind: str, B: int, Hq: int, T: int, Tk: int, seed: int = 0) -> torch.Tensor:
    """A mask of each form a model hands its attention function; every row keeps at least one key."""
    g = torch.Generator().manual_seed(50 + seed)
    keep = torch.rand(B, Hq, T, Tk, generator=g) > 0.35
    keep[..., torch.arange(T), torch.arange(T) % Tk] = True  # a key per row (its own position)
    if kind == "bool-bcast":  # [1, 1, T, Tk]: one mask for the batch and the heads
        return keep[:1, :1]
    if kind == "float-per-head":  # a learned bias per (b, h, query, key), -inf where hidden (Doge's dynamic mask)
        return (torch.randn(B, Hq, T, Tk, generator=g) * 1.5).masked_fill(~keep, -math.inf)
    if kind == "float-min":  # transformers' eager form: 0 / the dtype's minimum, [B, 1, T, Tk]
        return torch.zeros(B, 1, T, Tk).masked_fill(~keep[:, :1], torch.finfo(torch.float32).min)
    if kind == "bias-rows-bcast":  # [B, 1, 1, Tk]: one bias per key (broadcast over heads and queries)
        return torch.randn(B, 1, 1, Tk, generator=g)
    if kind == "bias-2d":  # [T, Tk]: the leading dims implied, as SDPA reads them
        return torch.randn(T, Tk, generator=g).masked_fill(~keep[0, 0], -math.inf)
    raise ValueError(kind)


MASKS = ("bool-bcast", "float-per-head", "float-min", "bias-rows-bcast", "bias-2d")


def qkv(B, Hq, Hkv, T, Tk, Dqk, Dv, dtype, seed=0):
    """q sharpened (scores ~ 3·N(0, 1)) so that most rows have a clear maximum."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, T, Dqk, generator=g) * 3.0 / Dqk**0.25
    k = torch.randn(B, Hkv, Tk, Dqk, generator=g) / Dqk**0.25
    v = torch.randn(B, Hkv, Tk, Dv, generator=g)
    return [t.to(DEV, dtype) for t in (q, k, v)]


def basis_for(Hq, Dv, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(Hq, Dv, Dv, generator=g, dtype=torch.float64))[0].float().to(DEV)


def run(impl, q, k, v, mode, mask, n=0, learned=None, softcap=None):
    Hq, Dv = q.shape[1], v.shape[3]
    basis = basis_for(Hq, Dv) if mode == "lowrank" else None
    d_r = Dv // 2 if mode == "lowrank" else None
    res = impl(q, k, v, mode=mode, basis=basis, d_r=d_r, softcap=softcap, sink_tokens=n, learned_sink=learned,
               attn_mask=mask, return_argmax=True, return_gram=True, return_top1_prob=True, return_sink_mass=True)
    check_sink_against_f64(res, q, k, v, mode, basis, d_r, softcap=softcap, sink_tokens=n, learned_sink=learned,
                           attn_mask=mask, min_clear=0.8)
    return res


# (B, Hq, Hkv, T, Tk, Dqk, Dv): equal keys and queries, keys appended (Tk > Tq), GQA, MLA widths
SHAPES = {"square-gqa": (2, 4, 2, 19, 19, 16, 16), "appended-keys": (2, 2, 1, 17, 25, 16, 16),
          "mla-appended": (1, 2, 2, 13, 20, 32, 16)}


@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("mode", MODES)
def test_reference_matches_f64(mode, shape, mask_kind):
    B, Hq, Hkv, T, Tk, Dqk, Dv = SHAPES[shape]
    q, k, v = qkv(B, Hq, Hkv, T, Tk, Dqk, Dv, torch.float32)
    mask = make_mask(mask_kind, B, Hq, T, Tk).to(DEV)
    res = run(residual_attention_reference, q, k, v, mode, mask)
    if Tk > T:  # the appended keys win some rows: V[i*] is then the appended key's value
        assert bool((res.argmax >= T).any())
    # The public op returns its implementation's numbers (on CPU the streamed path), checked against float64 (with
    # the Gram: low rank through ctx; tests/test_streamed.py checks its path through V·P_r under masks).
    run(residual_attention_impl("torch"), q, k, v, mode, mask)
    kw = dict(mode=mode, basis=basis_for(Hq, Dv) if mode == "lowrank" else None,
              d_r=Dv // 2 if mode == "lowrank" else None, attn_mask=mask)
    out = residual_attention(q, k, v, backend="torch", **kw)
    assert torch.equal(out, residual_attention_impl("torch")(q, k, v, **kw).out)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("n, learned", [(0, True), (3, False), (3, True)])
def test_reference_sinks_softcap_with_a_mask(mode, n, learned):
    B, Hq, Hkv, T, Tk, Dqk, Dv = SHAPES["appended-keys"]
    q, k, v = qkv(B, Hq, Hkv, T, Tk, Dqk, Dv, torch.float32, seed=1)
    sink = (torch.randn(Hq, generator=torch.Generator().manual_seed(7)) + 1.0).to(DEV) if learned else None
    run(residual_attention_reference, q, k, v, mode, make_mask("float-per-head", B, Hq, T, Tk).to(DEV), n, sink,
        softcap=4.0)


def test_eager_causal_mask_is_the_causal_op_bit_for_bit():
    """transformers' eager causal mask (0 / float32 min) through attn_mask gives today's causal numbers exactly."""
    q, k, v = qkv(2, 4, 2, 21, 21, 16, 16, torch.float32, seed=2)
    i = torch.arange(21)
    mask = torch.zeros(1, 1, 21, 21).masked_fill(i[None, :] > i[:, None], torch.finfo(torch.float32).min).to(DEV)
    for mode in MODES:
        kw = dict(mode=mode, basis=basis_for(4, 16) if mode == "lowrank" else None,
                  d_r=8 if mode == "lowrank" else None, return_argmax=True, return_gram=True, return_top1_prob=True)
        want = residual_attention_reference(q, k, v, **kw)
        got = residual_attention_reference(q, k, v, attn_mask=mask, **kw)
        for a, b in zip(got, want, strict=True):
            assert (a is None and b is None) or torch.equal(a, b)


def test_hidden_rows_are_empty_and_nan_bias_rows_non_finite():
    """A row whose keys are all hidden (bool False / -inf: a pad query) is empty: a finite zero output, argmax -1,
    top1_prob 0 (issue 34). A row whose bias holds a NaN has no softmax: NaN output, argmax -1. Only those rows;
    a -inf bias alone is a key of weight 0."""
    B, Hq, T, Tk = 1, 2, 9, 12
    q, k, v = qkv(B, Hq, Hq, T, Tk, 16, 16, torch.float32, seed=3)
    mask = make_mask("float-per-head", B, Hq, T, Tk, seed=3).to(DEV)
    mask[0, 0, 2] = -math.inf
    mask[0, 1, 5, 3] = math.nan
    impls = [residual_attention_reference, triton_impl()] if DEV == "cuda" or os.environ.get(
        "TRITON_INTERPRET") == "1" else [residual_attention_reference]
    for impl in impls:
        for mode in MODES:
            res = run(impl, q, k, v, mode, mask)
            bad = res.argmax == -1
            assert bad.sum() == 2 and bool(bad[0, 0, 2]) and bool(bad[0, 1, 5])
            assert bool((res.out[0, 0, 2] == 0).all()) and bool(res.out[0, 1, 5].isnan().all())
            assert bool(res.out[~bad].isfinite().all())
        res = impl(q, k, v, mode="top1", attn_mask=mask > -math.inf, return_argmax=True, return_top1_prob=True)
        assert bool(res.argmax[0, 0, 2] == -1) and int((res.argmax == -1).sum()) == 1  # as a bool mask
        assert float(res.top1_prob[0, 0, 2]) == 0.0 and bool((res.out[0, 0, 2] == 0).all())


@pytest.mark.parametrize("kw, exc, match", [
    (dict(attn_mask=torch.zeros(2, 3, 19, 19)), ValueError, "broadcast to"),
    (dict(attn_mask=torch.zeros(19, 18)), ValueError, "broadcast to"),
    (dict(attn_mask=torch.zeros(19, 19, dtype=torch.int64)), TypeError, "bool .* or floating point"),
    (dict(attn_mask=[[0.0]]), TypeError, "attn_mask must be a torch.Tensor"),
    (dict(attn_mask=torch.zeros(19, 19), sliding_window=4), ValueError, "defines visibility alone"),
    (dict(attn_mask=torch.zeros(19, 19), attention_chunk=4), ValueError, "defines visibility alone"),
])
def test_attn_mask_errors(kw, exc, match):
    q, k, v = qkv(2, 4, 2, 19, 19, 16, 16, torch.float32)
    if isinstance(kw["attn_mask"], torch.Tensor):
        kw = {**kw, "attn_mask": kw["attn_mask"].to(DEV)}
    with pytest.raises(exc, match=match):
        residual_attention(q, k, v, mode="top1", backend="torch", **kw)


def test_fewer_keys_than_queries_needs_a_mask():
    """Without a mask Tq <= Tk (a KV cache: tests/test_kv_cache.py); fewer keys than queries only with one."""
    q, k, v = qkv(1, 2, 2, 12, 9, 16, 16, torch.float32)
    with pytest.raises(ValueError, match="Tk < Tq only under an attn_mask"):
        residual_attention(q, k, v, mode="top1", backend="torch")


# --------------------------------------------------------------------------- kernel (interpreter-sized)
KERNEL_CASES = [
    # (mode, dtype, shape, mask kind, sink_tokens, learned sink)
    ("top1", torch.float32, "square-gqa", "float-per-head", 0, False),
    ("full", torch.float32, "appended-keys", "bool-bcast", 0, False),
    ("lowrank", torch.float32, "appended-keys", "float-min", 0, True),
    ("lowrank", torch.float32, "mla-appended", "bias-2d", 3, False),
    ("top1", torch.float32, "appended-keys", "bias-rows-bcast", 3, True),
    ("full", torch.float16, "square-gqa", "float-per-head", 0, True),
    ("lowrank", torch.float16, "appended-keys", "bool-bcast", 2, False),
]


@pytest.mark.parametrize("mode, dtype, shape, mask_kind, n, learned", KERNEL_CASES)
def test_attn_mask_kernel_matches_f64(mode, dtype, shape, mask_kind, n, learned):
    impl = triton_impl()
    B, Hq, Hkv, T, Tk, Dqk, Dv = SHAPES[shape]
    q, k, v = qkv(B, Hq, Hkv, T, Tk, Dqk, Dv, dtype, seed=4)
    mask = make_mask(mask_kind, B, Hq, T, Tk, seed=4).to(DEV)
    if dtype == torch.float16 and mask.is_floating_point():
        mask = mask.to(dtype)  # a model's mask comes in its dtype
    sink = (torch.randn(Hq, generator=torch.Generator().manual_seed(8)) + 1.0).to(DEV) if learned else None
    got = run(impl, q, k, v, mode, mask, n, sink)
    want = run(residual_attention_reference, q, k, v, mode, mask, n, sink)
    same = got.argmax == want.argmax
    assert float(same.float().mean()) > 0.95
    tol = dict(atol=2e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-2, rtol=5e-3)
    torch.testing.assert_close(got.out[same].float(), want.out[same].float(), **tol, equal_nan=True)


def test_attn_mask_kernel_other_tilings(monkeypatch):
    """Key tiles of other sizes (the appended keys straddling a tile, the sink in a partial tile)."""
    impl = triton_impl()
    from nqpq_kernels import launch as launch_mod

    monkeypatch.setattr(launch_mod, "pick_config", lambda *a, **k: dict(BLOCK_M=16, BLOCK_N=16, num_warps=4,
                                                                      num_stages=1))
    q, k, v = qkv(1, 2, 1, 23, 41, 16, 16, torch.float32, seed=5)
    mask = make_mask("float-per-head", 1, 2, 23, 41, seed=5).to(DEV)
    for mode in MODES:
        run(impl, q, k, v, mode, mask, n=5)


# --------------------------------------------------------------------------- models
def tiny_model(family: str, attn: str = "eager", **overrides):
    """The census's tiny config of ``family`` (its own defaults, shrunk), float32, eval."""
    config = tiny_models.tiny_config(family)
    for key, value in overrides.items():
        setattr(config, key, value)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = tiny_models.model_class(family)._from_config(config, attn_implementation=attn)
    return model.float().eval()


@torch.no_grad()
def logits_of(model, ids):
    return model(input_ids=ids, use_cache=False).logits


def ids_for(B=2, T=24, seed=0):
    return torch.randint(3, 200, (B, T), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def check_model(model, ids, layer=None, min_rel_change=1e-3):
    """Full mode on every attention layer is the model; top-1 and low-rank on ``layer`` (default: the last) equal
    the census's float64 per-head computation on each call's q, k, v and mask."""
    parts = model_parts(model)
    base = logits_of(model, ids)
    with crystallize(model, parts.attn_layers, mode="full", backend="torch"):
        assert census.rel_error(logits_of(model, ids), base) <= 1e-5
    li = parts.attn_layers[-1] if layer is None else layer
    geo = parts.geometry[li]
    basis = basis_for(geo.n_heads, geo.v_dim).cpu()
    d_r = max(1, geo.v_dim // 4)
    for mode in ("top1", "lowrank"):
        with crystallize(model, [li], mode=mode, basis={li: basis}, d_r=d_r, backend="torch"), \
                census.AttentionSpy(model) as spy:
            got_logits = logits_of(model, ids)
        assert census.rel_error(got_logits, base) > min_rel_change  # crystallizing moved the logits
        assert spy.calls
        for _module, q, k, v, scaling, kwargs, got in spy.calls:
            want, clear = census.float64_reference(
                q, k, v, scaling, kwargs.get("sliding_window"), kwargs.get("softcap"),
                kwargs.get("s_aux", kwargs.get("sinks")), mode, basis, d_r, None, kwargs["attention_mask"],
                kwargs.get("position_bias"))
            assert float(clear.float().mean()) > 0.5
            diff = (got.double() - want).abs().amax(-1)[clear].max() / want.abs().max()
            assert float(diff) <= 1e-5
    return spy.calls


def test_doge_dynamic_mask():
    """Doge: a learned per-key bias (A ≠ 0) and its top-k key selection (keep_window_size 8 < T) in the mask."""
    model = tiny_model("doge", keep_window_size=8)
    with torch.no_grad():
        for module in model_parts(model).attn.values():
            module.A.copy_(torch.linspace(-2.0, 2.0, module.A.numel()))
            module.dt_proj.weight.mul_(8.0)
    calls = check_model(model, ids_for())
    mask = calls[0][5]["attention_mask"]
    assert mask.shape[1] > 1 and bool((mask > torch.finfo(mask.dtype).min).sum(-1).le(8).all())  # sparse, per head


def test_doge_padding_still_refused():
    """The model's own padding mask, which Doge folds into its dynamic mask, is refused by name."""
    model = tiny_model("doge")
    ids = ids_for()
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    with crystallize(model, model_parts(model).attn_layers, mode="full", backend="torch"), \
            pytest.raises(ValueError, match="padding"):
        model(input_ids=ids, attention_mask=mask)


def test_deepseek_v4_compressed_keys():
    """DeepSeek V4's compressed layers: keys appended after the T tokens (K = V), the mask extended with their
    block bias, a learned sink and a sliding window."""
    calls = check_model(tiny_model("deepseek_v4"), ids_for())
    assert any(c[2].shape[2] > c[1].shape[2] for c in calls), "no call with appended keys"


def test_inkling_position_bias():
    model = tiny_model("inkling_text")
    calls = check_model(model, ids_for())
    assert all(c[5].get("position_bias") is not None for c in calls)
    # Its head reads the final hidden state divided by logits_mup_width_multiplier: nqpq's losses are the model's.
    ids = ids_for()
    with torch.no_grad():
        hidden = model.model(input_ids=ids).last_hidden_state
        got = lm_losses(model, hidden, ids)
    want = census.model_losses(logits_of(model, ids), ids)
    assert model.config.logits_mup_width_multiplier != 1.0
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    model.config.unpadded_vocab_size = model.config.vocab_size - 8
    with pytest.raises(UnsupportedModelError, match="unpadded_vocab_size"):
        model_parts(model)


def test_inkling2_per_row_learned_sinks():
    """Inkling 2 passes ``sinks`` [B, Hq, T, 1] (its sink_proj of each row's hidden state) and a position_bias: full
    mode is the model, top-1 / low-rank equal float64 with each row's own sink logit; the statistics report each
    row's learned-sink mass."""
    from nqpq.model.crystallize import observe_residuals

    model = tiny_model("inkling2_text")
    ids = ids_for()
    calls = check_model(model, ids)
    sinks = [c[5]["sinks"] for c in calls]
    assert all(s.shape == (*c[1].shape[:3], 1) for s, c in zip(sinks, calls, strict=True))
    parts = model_parts(model)
    li = parts.attn_layers[-1]
    assert parts.geometry[li].learned_sink
    stats = _Collect()
    with observe_residuals(model, [li], None, stats_acc=stats, backend="torch"), census.AttentionSpy(model) as spy:
        logits_of(model, ids)
    (_, _argmax, _top1, mass), = stats.items
    (_module, q, k, _v, scaling, kwargs, _out), = spy.calls
    # m_L of each row from the definition: exp(s) / (exp(s) + Σ_j exp(score_j)), scores + position bias + mask.
    G = q.shape[1] // k.shape[1]
    scores = q.double() @ k.double().repeat_interleave(G, dim=1).transpose(-1, -2) * scaling
    scores = scores + kwargs["position_bias"].double() + kwargs["attention_mask"].double()
    want = torch.cat([scores, kwargs["sinks"].double()], dim=-1).softmax(-1)[..., -1]
    torch.testing.assert_close(mass.double(), want, rtol=1e-5, atol=1e-6)
    assert float(want.std()) > 0.01  # the mass differs from row to row: a per-row logit, not a per-head one


def test_blt_window_only_in_the_model_mask():
    """BLT's local layers get their sliding window only from the mask the model builds (no sliding_window on the
    module or in the kwargs): nqpq reads it from that mask, and runs them exactly."""
    from nqpq.model.attention_args import _mask_window

    model = tiny_model("blt")
    window = model.config.local_attention_window_len
    assert window is not None and window < 24
    calls = check_model(model, ids_for())
    assert {_mask_window(c[5]["attention_mask"], c[1].shape[2]) for c in calls} >= {window}
    T = 12
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    for w in (1, 3, T - 1):
        sliding = causal & ~torch.ones(T, T, dtype=torch.bool).tril(-w)
        assert _mask_window(sliding.expand(2, 1, T, T), T) == w
        float_mask = torch.zeros(2, 1, T, T).masked_fill(~sliding, torch.finfo(torch.float32).min)
        assert _mask_window(float_mask, T) == w
    assert _mask_window(causal.expand(1, 1, T, T), T) is None  # plain causal: no window
    padded = causal.expand(2, 1, T, T).clone()
    padded[1, :, :, :3] = False
    assert _mask_window(padded, T) is None  # padding is no window (and stays refused)


def test_qwen4_exp_key_selection():
    check_model(tiny_model("qwen4_exp_text"), ids_for())


class _Collect:
    """A gram_acc / stats_acc: keeps what it is given."""

    def __init__(self):
        self.items = []

    def add(self, layer, *tensors, first_key_mass=None):
        self.items.append((layer, *tensors))


@pytest.mark.parametrize("family", ["deepseek_v4", "doge"])
def test_observed_gram_and_statistics_with_a_module_mask(family):
    """Calibration's Gram and the statistics under a module-built mask: Σ εεᵀ equals float64's ε = ctx − ground on
    each call's q, k, v and mask, every argmax is a key index < Tk (an appended key counts as none of crystallinity's
    sink / self / previous), and the model's output is left bit for bit."""
    from nqpq.model.crystallize import observe_residuals

    model = tiny_model(family, **({"keep_window_size": 8} if family == "doge" else {}))
    ids = ids_for()
    parts = model_parts(model)
    li = parts.attn_layers[-1]
    geo = parts.geometry[li]
    base = logits_of(model, ids)
    grams, stats = _Collect(), _Collect()
    with observe_residuals(model, [li], grams, stats_acc=stats, backend="torch"), census.AttentionSpy(model) as spy:
        assert torch.equal(logits_of(model, ids), base)
    eye = torch.eye(geo.v_dim).expand(geo.n_heads, -1, -1)
    want = torch.zeros(geo.n_heads, geo.v_dim, geo.v_dim, dtype=torch.float64)
    with torch.no_grad():
        for _module, q, k, v, scaling, kwargs, _out in spy.calls:
            args = (q, k, v, scaling, kwargs.get("sliding_window"), kwargs.get("softcap"), kwargs.get("s_aux"))
            rest = (None, kwargs["attention_mask"], kwargs.get("position_bias"))
            ground, _ = census.float64_reference(*args, "top1", None, None, *rest)
            ctx, _ = census.float64_reference(*args, "lowrank", eye, geo.v_dim, *rest)
            eps = ctx - ground  # [B, T, Hq, Dv]
            want += torch.einsum("bthi,bthj->hij", eps, eps)
    got = sum(g for _, g in grams.items)
    assert float((got - want).abs().max() / want.abs().max()) < 1e-4
    (_, argmax, top1, *mass), = stats.items
    Tk = spy.calls[0][2].shape[2]
    assert bool((argmax >= 0).all()) and bool((argmax < Tk).all()) and bool(((top1 > 0) & (top1 <= 1)).all())
    if geo.learned_sink:
        assert mass and bool(((mass[0] > 0) & (mass[0] < 1)).all())

"""Padded batches in the op (issue 34 item 4): under an ``attn_mask`` a row with no visible key (a pad query) gives a
finite zero output, argmax −1, top1_prob and sink_mass 0 and nothing in the Gram; a NaN score still gives NaN. Both
torch paths (the reference and the streamed CPU path) against tests/f64_reference.py's ``sink_plain``, and a left- or
right-padded row equal to the same sequence run alone."""

from __future__ import annotations

import math
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from f64_reference import check_sink_against_f64, sink_plain  # noqa: E402

from nqpq_kernels.reference import residual_attention_reference  # noqa: E402
from nqpq_kernels.streamed import residual_attention_streamed  # noqa: E402

IMPLS = {"reference": residual_attention_reference, "streamed": residual_attention_streamed}
MODES = ("top1", "full", "lowrank")
RETURNS = dict(return_argmax=True, return_gram=True, return_top1_prob=True, return_sink_mass=True)


def padded_mask(lengths: list[int], T: int, side: str, window: int | None = None) -> torch.Tensor:
    """bool [B, 1, T, T]: causal (+ window) over each row's real tokens; pad keys hidden; a left pad query sees
    nothing (as transformers builds it), a right pad query sees every real key before it."""
    i = torch.arange(T)
    causal = i[:, None] >= i[None, :]
    if window is not None:
        causal &= (i[:, None] - i[None, :]) < window
    rows = []
    for n in lengths:
        real = torch.zeros(T, dtype=torch.bool)
        if side == "left":
            real[T - n:] = True
        else:
            real[:n] = True
        rows.append(causal & real[None, :])
    return torch.stack(rows)[:, None]


def qkv(B, Hq, Hkv, T, D, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, T, D, generator=g) * 3.0 / D**0.25
    k = torch.randn(B, Hkv, T, D, generator=g) / D**0.25
    v = torch.randn(B, Hkv, T, D, generator=g)
    return q, k, v


def lowrank(mode, Hq, D):
    if mode != "lowrank":
        return {}
    basis = torch.linalg.qr(torch.randn(Hq, D, D, generator=torch.Generator().manual_seed(9),
                                        dtype=torch.float64))[0].float()
    return {"basis": basis, "d_r": D // 2}


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("opts", [{}, {"sink_tokens": 2, "learned_sink": True}], ids=["plain", "sinks"])
def test_pad_rows_are_zero_and_the_rest_float64(impl, side, mode, opts):
    B, Hq, Hkv, T, D = 3, 4, 2, 24, 16
    q, k, v = qkv(B, Hq, Hkv, T, D)
    mask = padded_mask([24, 17, 9], T, side)
    kw = dict(opts)
    if kw.get("learned_sink"):
        kw["learned_sink"] = torch.linspace(-1.0, 1.5, Hq)
    for form in (mask, torch.zeros(mask.shape).masked_fill(~mask, -math.inf)):  # bool, and a float -inf bias
        res = IMPLS[impl](q, k, v, mode=mode, **lowrank(mode, Hq, D), attn_mask=form, **kw, **RETURNS)
        want = check_sink_against_f64(res, q, k, v, mode, **lowrank(mode, Hq, D), attn_mask=form, **kw)
        empty = want.empty
        assert int(empty.sum()) == (Hq * (7 + 15) if side == "left" else 0)  # left pad queries see no key
        assert bool(torch.isfinite(res.out).all()) and bool(torch.isfinite(res.gram).all())
        assert bool((res.out[empty] == 0).all()) and bool((res.argmax[empty] == -1).all())
        assert bool((res.top1_prob[empty] == 0).all()) and bool((res.sink_mass[empty] == 0).all())


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("mode", MODES)
def test_a_padded_row_equals_the_sequence_alone(impl, side, mode):
    """Row b of a padded batch, on its real queries, equals the unpadded call on its n tokens (no mask: causal):
    the same output, the same argmax (shifted by the pad on the left) and the same Gram."""
    B, Hq, Hkv, T, D, n = 2, 4, 2, 20, 16, 11
    q, k, v = qkv(B, Hq, Hkv, T, D, seed=3)
    mask = padded_mask([T, n], T, side, window=6)
    real = slice(T - n, T) if side == "left" else slice(0, n)
    lr = lowrank(mode, Hq, D)
    res = IMPLS[impl](q, k, v, mode=mode, **lr, attn_mask=mask, **RETURNS)
    alone = IMPLS[impl](q[1:, :, real], k[1:, :, real], v[1:, :, real], mode=mode, **lr, sliding_window=6,
                        **RETURNS)
    torch.testing.assert_close(res.out[1:, :, real], alone.out, atol=1e-5, rtol=1e-5)
    shift = T - n if side == "left" else 0
    assert torch.equal(res.argmax[1:, :, real] - shift, alone.argmax)
    first = IMPLS[impl](q[:1], k[:1], v[:1], mode=mode, **lr, sliding_window=6, **RETURNS)
    # the Gram of the batch = the full row's + the padded row's real queries' (right pad queries see real keys:
    # they are rows of the op like any other, so only the left case adds nothing for its pads)
    if side == "left":
        torch.testing.assert_close(res.gram, first.gram + alone.gram, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("impl", list(IMPLS))
def test_a_nan_score_still_gives_nan(impl):
    B, Hq, Hkv, T, D = 2, 2, 1, 12, 16
    q, k, v = qkv(B, Hq, Hkv, T, D, seed=5)
    mask = padded_mask([12, 5], T, "left")
    q[0, 1, 7, 0] = float("nan")
    res = IMPLS[impl](q, k, v, mode="top1", attn_mask=mask, **RETURNS)
    assert bool(res.out[0, 1, 7].isnan().all()) and int(res.argmax[0, 1, 7]) == -1
    assert math.isnan(float(res.top1_prob[0, 1, 7]))
    assert bool(torch.isfinite(res.out[1]).all())
    want = sink_plain(q, k, v, "top1", attn_mask=mask)
    assert torch.equal(want.bad, res.argmax.eq(-1) & res.top1_prob.isnan())


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("opts", [{}, {"sink_tokens": 2, "learned_sink": True}], ids=["plain", "sinks"])
def test_the_kernel_gives_empty_pad_rows(mode, opts):
    """The Triton kernel's attn_mask path (the interpreter without CUDA): left pad queries empty, the rest float64."""
    pytest.importorskip("triton")
    from nqpq_kernels import prefill

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    if dev == "cpu" and not prefill.interpreter_active():
        pytest.skip("triton was imported before TRITON_INTERPRET=1 could be set")
    B, Hq, Hkv, T, D = 2, 2, 1, 16, 16
    q, k, v = (x.to(dev) for x in qkv(B, Hq, Hkv, T, D, seed=7))
    mask = padded_mask([16, 9], T, "left").to(dev)
    kw = dict(opts)
    if kw.get("learned_sink"):
        kw["learned_sink"] = torch.linspace(-1.0, 1.5, Hq, device=dev)
    lr = {key: val.to(dev) if isinstance(val, torch.Tensor) else val for key, val in lowrank(mode, Hq, D).items()}
    res = prefill.residual_attention_triton(q, k, v, mode=mode, **lr, attn_mask=mask, **kw, **RETURNS)
    want = check_sink_against_f64(res, q, k, v, mode, **lr, attn_mask=mask, **kw)
    assert int(want.empty.sum()) == Hq * 7 and bool((res.out[want.empty.to(dev)] == 0).all())
    assert bool((res.top1_prob[want.empty.to(dev)] == 0).all()) and bool(torch.isfinite(res.gram).all())

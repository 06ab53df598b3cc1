"""The op with a KV cache (issue 34 item 1): q holds Tq <= Tk queries and no mask, the last Tq positions
(bottom-right aligned causal), on the torch side, against the float64 definition of tests/f64_reference.py
(``sink_plain``, row by row at absolute position Tk − Tq + r), and against the last Tq rows of the whole call."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from f64_reference import SINK_CLEAR_GAP, check_sink_against_f64, sink_plain  # noqa: E402

from nqpq import residual_attention, residual_attention_reference  # noqa: E402
from nqpq.experiments.crystallinity import CrystallinityAccumulator  # noqa: E402
from nqpq_kernels.dispatch import resolve_backend  # noqa: E402
from nqpq_kernels.streamed import residual_attention_streamed  # noqa: E402

MODES = ("top1", "full", "lowrank")
IMPLS = {"reference": residual_attention_reference, "streamed": residual_attention_streamed}

# name: (B, Hq, Hkv, Tk, Dqk, Dv, options). Windows shorter than Tk, a chunk edge inside the last 17 positions
# (256 in 248..264), sink keys, learned sinks per head and per row, GQA / MQA / MLA widths.
CASES = {
    "gqa": (2, 4, 2, 300, 16, 16, {}),
    "mqa-window": (1, 4, 1, 300, 16, 16, {"sliding_window": 50}),
    "mla-softcap": (1, 2, 2, 200, 32, 16, {"softcap": 4.0}),
    "chunk-edge": (1, 4, 2, 265, 16, 16, {"attention_chunk": 128}),
    "sinks": (2, 4, 2, 120, 16, 16, {"sink_tokens": 4, "learned_sink": "head"}),
    "row-sinks-window": (1, 2, 1, 150, 16, 24, {"sink_tokens": 3, "learned_sink": "row", "sliding_window": 40}),
    "short": (1, 2, 2, 17, 16, 16, {"sink_tokens": 2}),  # Tq = Tk for Tq = 17: the whole call
}


def inputs(B, Hq, Hkv, Tq, Tk, Dqk, Dv, opts, seed=0):
    """q sharpened (scores ~ 3·N(0, 1)): most rows have a clear maximum, by construction."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, Tq, Dqk, generator=g) * 3.0 / Dqk**0.25
    k = torch.randn(B, Hkv, Tk, Dqk, generator=g) / Dqk**0.25
    v = torch.randn(B, Hkv, Tk, Dv, generator=g)
    kw = dict(opts)
    if kw.get("learned_sink") == "head":
        kw["learned_sink"] = torch.randn(Hq, generator=g) + 1.0
    elif kw.get("learned_sink") == "row":
        kw["learned_sink"] = torch.randn(B, Hq, Tq, generator=g) + 1.0
    return q, k, v, kw


def lowrank_args(mode, Hq, Dv):
    if mode != "lowrank":
        return {}
    basis = torch.linalg.qr(torch.randn(Hq, Dv, Dv, generator=torch.Generator().manual_seed(9),
                                        dtype=torch.float64))[0].float()
    return {"basis": basis, "d_r": Dv // 2}


RETURNS = dict(return_argmax=True, return_gram=True, return_top1_prob=True, return_sink_mass=True)


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("Tq", [1, 3, 17])
@pytest.mark.parametrize("mode", MODES)
def test_cached_queries_match_float64(mode, Tq, case, impl):
    """Out, argmax (absolute), top1_prob, sink_mass and the Gram over the Tq rows, against float64."""
    B, Hq, Hkv, Tk, Dqk, Dv, opts = CASES[case]
    q, k, v, kw = inputs(B, Hq, Hkv, Tq, Tk, Dqk, Dv, opts, seed=Tq)
    lr = lowrank_args(mode, Hq, Dv)
    res = IMPLS[impl](q, k, v, mode=mode, **lr, **kw, **RETURNS)
    assert res.out.shape == (B, Hq, Tq, Dv) and res.argmax.shape == (B, Hq, Tq)
    # Every row sees its own key, at its absolute position.
    assert bool((res.argmax <= torch.arange(Tk - Tq, Tk)).all())
    # check_sink_against_f64 also compares the Gram with float64's sum over exactly these Tq rows.
    want = check_sink_against_f64(res, q, k, v, mode, **lr, **kw)
    assert want.gram.shape == (Hq, Dv, Dv)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("mode", MODES)
def test_cached_rows_are_the_last_rows_of_the_whole_call(mode, case):
    """Rows of a Tq < Tk call equal the last Tq rows of the full Tk × Tk call (the reference, both sides): out,
    top1_prob and sink_mass to fp32 rounding, argmax exactly where float64 has a clear maximum."""
    B, Hq, Hkv, Tk, Dqk, Dv, opts = CASES[case]
    q_all, k, v, kw = inputs(B, Hq, Hkv, Tk, Tk, Dqk, Dv, {**opts, "learned_sink": None}, seed=3)
    if opts.get("learned_sink") == "head":
        kw["learned_sink"] = torch.linspace(-1.0, 2.0, Hq)
    lr = lowrank_args(mode, Hq, Dv)
    row_sink = torch.randn(B, Hq, Tk, generator=torch.Generator().manual_seed(4)) if opts.get(
        "learned_sink") == "row" else None
    whole = residual_attention_reference(q_all, k, v, mode=mode, **lr, **with_rows(kw, row_sink, 0, Tk), **RETURNS)
    f64 = sink_plain(q_all, k, v, mode, **lr, **with_rows(kw, row_sink, 0, Tk))
    for Tq in (1, 3, 17):
        if Tq > Tk:
            continue
        tail = slice(Tk - Tq, Tk)
        part = residual_attention_reference(q_all[:, :, tail], k, v, mode=mode, **lr,
                                            **with_rows(kw, row_sink, Tk - Tq, Tk), **RETURNS)
        clear = (f64.gap[:, :, tail] > SINK_CLEAR_GAP) & ~f64.bad[:, :, tail]
        assert int(clear.sum()) >= 0.9 * clear.numel()
        assert torch.equal(part.argmax[clear], whole.argmax[:, :, tail][clear])
        same = (part.argmax == whole.argmax[:, :, tail]).unsqueeze(-1)  # where both picked one key
        torch.testing.assert_close(torch.where(same, part.out, 0.0), torch.where(same, whole.out[:, :, tail], 0.0),
                                   atol=1e-5, rtol=1e-5)
        for name in ("top1_prob", "sink_mass"):
            a, b = getattr(part, name), getattr(whole, name)[:, :, tail]
            torch.testing.assert_close(torch.where(same[..., 0], a, 0.0), torch.where(same[..., 0], b, 0.0),
                                       atol=2e-6, rtol=2e-5)


def with_rows(kw, row_sink, start, stop):
    """``kw`` with the per-row learned sink's rows [start, stop) where the case has one."""
    return kw if row_sink is None else {**kw, "learned_sink": row_sink[:, :, start:stop]}


def test_crystallinity_counts_cached_rows_at_their_positions():
    """self/prev statistics of a cached call compare i* with the rows' absolute positions, each row once:
    counting the last Tq rows of the whole call (first_position = Tk − Tq) equals counting the cached call."""
    B, Hq, Hkv, Tk, Dqk, Dv = 2, 4, 2, 64, 16, 16
    g = torch.Generator().manual_seed(11)
    q = torch.randn(B, Hq, Tk, Dqk, generator=g)
    k = torch.randn(B, Hkv, Tk, Dqk, generator=g)
    k = k + 2.0 * q[:, :: Hq // Hkv]  # the first query head of each kv group attends to itself
    v = torch.randn(B, Hkv, Tk, Dv, generator=g)
    Tq = 17
    res = residual_attention_reference(q[:, :, Tk - Tq:], k, v, mode="top1", return_argmax=True,
                                       return_top1_prob=True)
    f64 = sink_plain(q[:, :, Tk - Tq:], k, v, "top1")
    clear = f64.gap > SINK_CLEAR_GAP
    assert int(clear.sum()) >= 0.9 * clear.numel() and torch.equal(res.argmax[clear], f64.argmax[clear])
    acc = CrystallinityAccumulator([0], Hq)
    acc.add(0, res.argmax, res.top1_prob, first_position=Tk - Tq)
    got = acc.results()
    pos = torch.arange(Tk - Tq, Tk)
    for h in range(Hq):  # the counts, each row once, at its absolute position
        a = res.argmax[:, h]
        assert got[h]["self_frac"] == pytest.approx(float((a == pos).double().mean()), abs=1e-12)
        assert got[h]["prev_frac"] == pytest.approx(float((a == pos - 1).double().mean()), abs=1e-12)
        assert got[h]["sink_frac"] == pytest.approx(float((a == 0).double().mean()), abs=1e-12)
        assert got[h]["top1_prob_mean"] == pytest.approx(float(f64.top1_prob[:, h].mean()), abs=2e-6)
    assert got[0]["self_frac"] > 0.5 and got[2]["self_frac"] > 0.5  # the construction's self-attending heads
    # Row-index positions (first_position = 0) would count none of them as self.
    plain = CrystallinityAccumulator([0], Hq)
    plain.add(0, res.argmax, res.top1_prob)
    assert plain.results()[0]["self_frac"] == 0
    with pytest.raises(ValueError, match="first_position"):
        acc.add(0, res.argmax, res.top1_prob, first_position=-1)


def test_more_queries_than_keys_is_refused():
    q = torch.randn(1, 2, 9, 16)
    k = v = torch.randn(1, 2, 8, 16)
    for backend in ("torch", "auto"):
        with pytest.raises(ValueError, match="Tq <= Tk"):
            residual_attention(q, k, v, mode="top1", backend=backend)


def test_auto_takes_triton_for_a_cache_and_both_backends_agree():
    """A KV cache runs on either backend (the Triton one's kernels: tests/test_decode.py); auto on CUDA is triton."""
    assert resolve_backend("auto", "cuda", 64, 64) == "triton"
    q = torch.randn(1, 2, 3, 16)
    k = v = torch.randn(1, 2, 10, 16)
    out = residual_attention(q, k, v, mode="full", backend="auto")
    torch.testing.assert_close(out, residual_attention_reference(q, k, v, mode="full").out, atol=1e-6, rtol=1e-6)
    pytest.importorskip("triton")
    from nqpq_kernels import prefill as ra_mod

    if not (torch.cuda.is_available() or ra_mod.interpreter_active()):
        pytest.skip("the kernel cannot run here (no CUDA, no interpreter)")
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    got = residual_attention(q.to(dev), k.to(dev), v.to(dev), mode="full", backend="triton")
    torch.testing.assert_close(got.cpu(), out, atol=2e-6, rtol=2e-5)

"""The streamed CPU path (nqpq/streamed.py, issue 35 item 2) against the T × T reference and float64.

Shapes that are not multiples of the block, blocks of 1, windows and chunks crossing block edges, sinks, learned
sinks, masks, KV caches (Tq < Tk), non-finite rows, half precision, and the memory bound (no T × T buffer)."""

from __future__ import annotations

import math

import pytest
import torch
from f64_reference import check_sink_against_f64

from nqpq import residual_attention, residual_attention_reference
from nqpq_kernels.dispatch import residual_attention_impl
from nqpq_kernels.streamed import default_block_size, max_first_index, residual_attention_streamed

MODES = ("top1", "full", "lowrank")
RETURNS = dict(return_argmax=True, return_top1_prob=True, return_sink_mass=True)

# name: (B, Hq, Hkv, Tq, Tk, Dqk, Dv, options)
CASES = {
    "mha": (2, 2, 2, 45, 45, 16, 16, {}),
    "gqa-window-crossing": (1, 4, 2, 50, 50, 16, 16, {"sliding_window": 9}),
    "mqa-chunk-crossing": (2, 4, 1, 41, 41, 16, 16, {"attention_chunk": 12}),
    "mla-softcap": (1, 2, 1, 33, 33, 32, 16, {"softcap": 5.0}),
    "sinks": (2, 4, 2, 37, 37, 16, 16, {"sink_tokens": 5, "learned_sink": "head"}),
    "row-sinks-window": (1, 2, 2, 40, 40, 16, 24, {"sink_tokens": 3, "learned_sink": "row", "sliding_window": 7}),
    "sink-chunk": (1, 2, 1, 30, 30, 16, 16, {"sink_tokens": 4, "attention_chunk": 8}),
    "cache": (2, 4, 2, 13, 70, 16, 16, {"sink_tokens": 2, "sliding_window": 20}),
    "cache-chunk": (1, 2, 1, 19, 77, 16, 16, {"attention_chunk": 32, "learned_sink": "row"}),
    "mask": (2, 2, 1, 21, 29, 16, 16, {"attn_mask": "float"}),
    "mask-bool-sinks": (1, 4, 2, 23, 23, 16, 16, {"attn_mask": "bool", "sink_tokens": 3, "learned_sink": "head"}),
    # rows of >= 128 keys: max_first_index's grouped search (with a tail past the last group of 64)
    "long": (1, 2, 2, 200, 200, 16, 16, {}),
    "long-sink-cache": (1, 2, 1, 40, 230, 16, 16, {"sink_tokens": 2, "learned_sink": "head"}),
}


def inputs(case, dtype=torch.float32, seed=0):
    """q sharpened (scores ~ 3·N(0, 1)): most rows have a clear maximum, by construction."""
    B, Hq, Hkv, Tq, Tk, Dqk, Dv, opts = CASES[case]
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, Tq, Dqk, generator=g) * 3.0 / Dqk**0.25
    k = torch.randn(B, Hkv, Tk, Dqk, generator=g) / Dqk**0.25
    v = torch.randn(B, Hkv, Tk, Dv, generator=g)
    kw = dict(opts)
    if kw.get("learned_sink") == "head":
        kw["learned_sink"] = torch.randn(Hq, generator=g) + 1.0
    elif kw.get("learned_sink") == "row":
        kw["learned_sink"] = torch.randn(B, Hq, Tq, generator=g) + 1.0
    if kw.get("attn_mask") is not None:
        keep = torch.rand(B, Hq, Tq, Tk, generator=g) > 0.3
        keep[..., torch.arange(Tq), torch.arange(Tq)] = True  # a key per row
        if kw["attn_mask"] == "bool":
            kw["attn_mask"] = keep[:, :1]
        else:
            kw["attn_mask"] = (torch.randn(B, Hq, Tq, Tk, generator=g)).masked_fill(~keep, -math.inf)
    return [t.to(dtype) for t in (q, k, v)], kw


def lowrank_args(mode, Hq, Dv, d_r=None):
    if mode != "lowrank":
        return {}
    basis = torch.linalg.qr(torch.randn(Hq, Dv, Dv, generator=torch.Generator().manual_seed(9),
                                        dtype=torch.float64))[0].float()
    return {"basis": basis, "d_r": Dv // 2 if d_r is None else d_r}


@pytest.mark.parametrize("gram", [False, True])
@pytest.mark.parametrize("block", [1, 7, 16, None])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("mode", MODES)
def test_streamed_matches_float64_and_reference(mode, case, block, gram):
    """Every output against float64 (with the Gram: low rank through ctx; without: through V·P_r), and against
    the T × T reference: the same argmax where float64 has a clear maximum, the same numbers to fp32 rounding."""
    (q, k, v), kw = inputs(case)
    lr = lowrank_args(mode, q.shape[1], v.shape[3])
    res = residual_attention_streamed(q, k, v, mode=mode, **lr, **kw, **RETURNS, return_gram=gram, block_size=block)
    first = check_sink_against_f64(res, q, k, v, mode, **lr, **kw, min_clear=0.8)
    ref = residual_attention_reference(q, k, v, mode=mode, **lr, **kw, **RETURNS, return_gram=gram)
    clear = (first.gap > 1e-3) & ~first.bad
    assert torch.equal(res.argmax[clear], ref.argmax[clear])
    same = (res.argmax == ref.argmax)
    for name in ("out", "top1_prob", "sink_mass"):
        a, b = getattr(res, name), getattr(ref, name)
        m = same.unsqueeze(-1) if name == "out" else same
        torch.testing.assert_close(torch.where(m, a, 0.0), torch.where(m, b, 0.0), atol=1e-5, rtol=1e-5, msg=name)
    if gram:
        # Each row once: the Gram of the reference (same rows, another summation order).
        scale = ref.gram.abs().amax() + 1.0
        assert float((res.gram - ref.gram).abs().amax() / scale) < 1e-5


@pytest.mark.parametrize("cols", [5, 127, 128, 129, 200, 1000, 1024])
def test_max_first_index_is_max_with_the_first_index(cols):
    """Integer scores: many exact ties, where only the first index is right."""
    g = torch.Generator().manual_seed(cols)
    x = torch.randint(0, 6, (2, 3, 40, cols), generator=g).float()
    x[0, 0, 0, -1] = 10.0  # a maximum in the tail (past the last whole group)
    x[0, 0, 1] = 2.0  # a row of equal scores: index 0
    m, i = max_first_index(x)
    for r in range(40):
        row = x[1, 2, r]
        assert int(i[1, 2, r]) == int((row == row.max()).nonzero()[0])
    assert torch.equal(m, x.amax(dim=-1)) and torch.equal(i, x.argmax(dim=-1))
    assert int(i[0, 0, 0]) == cols - 1 and int(i[0, 0, 1]) == 0
    x[1, 1, 7, 3] = math.nan
    assert bool(max_first_index(x)[0][1, 1, 7].isnan())


@pytest.mark.parametrize("d_r", [0, 1, 8, 16])
def test_lowrank_through_v_p_r_every_rank(d_r):
    """d_r = 0 is top1's ground state; 0 < d_r < Dv goes through V·P_r; d_r = Dv through ctx (= full)."""
    (q, k, v), kw = inputs("sinks")
    lr = lowrank_args("lowrank", q.shape[1], v.shape[3], d_r)
    res = residual_attention_streamed(q, k, v, mode="lowrank", **lr, **kw, **RETURNS, block_size=10)
    check_sink_against_f64(res, q, k, v, "lowrank", **lr, **kw)
    if d_r == 0:
        top1 = residual_attention_streamed(q, k, v, mode="top1", **kw, block_size=10).out
        assert torch.equal(res.out, top1)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mode", MODES)
def test_half_precision(mode, dtype):
    (q, k, v), kw = inputs("row-sinks-window", dtype=dtype, seed=2)
    lr = lowrank_args(mode, q.shape[1], v.shape[3])
    res = residual_attention_streamed(q, k, v, mode=mode, **lr, **kw, **RETURNS, return_gram=True, block_size=6)
    assert res.out.dtype == dtype
    check_sink_against_f64(res, q, k, v, mode, **lr, **kw, min_clear=0.8)


def test_non_finite_rows():
    """NaN scores and a NaN learned sink: those rows only are NaN (argmax −1), in any block; an all-hidden row (a pad
    query) is empty: a finite zero output, argmax −1, top1_prob 0, nothing in its head's Gram (issue 34)."""
    (q, k, v), kw = inputs("mask-bool-sinks")
    q[0, 1, 4, 0] = math.nan
    mask = kw["attn_mask"].expand(1, 4, 23, 23).clone()
    mask[0, 2, 9] = False
    kw["attn_mask"] = mask
    sink = kw["learned_sink"].view(1, 4, 1).expand(1, 4, 23).clone()
    sink[0, 3, 15] = math.nan
    kw["learned_sink"] = sink
    for mode in MODES:
        lr = lowrank_args(mode, 4, 16)
        for block in (1, 5, 23):
            res = residual_attention_streamed(q, k, v, mode=mode, **lr, **kw, **RETURNS, return_gram=True,
                                              block_size=block)
            check_sink_against_f64(res, q, k, v, mode, **lr, **kw, min_clear=0.8)
            bad = res.argmax == -1
            assert int(bad.sum()) == 3 and bool(bad[0, 1, 4]) and bool(bad[0, 2, 9]) and bool(bad[0, 3, 15])
            nan = bad.clone()
            nan[0, 2, 9] = False  # the empty row
            assert bool(res.out[nan].isnan().all()) and bool(res.out[~nan].isfinite().all())
            assert bool((res.out[0, 2, 9] == 0).all()) and float(res.top1_prob[0, 2, 9]) == 0.0
            assert bool(res.gram[[1, 3]].isnan().all()) and bool(res.gram[[0, 2]].isfinite().all())


def test_out_layout_and_strided_inputs():
    """[B, T, H, D] views of one packed projection (what transformers hands over) and out_layout='bthd'."""
    B, T, H, D = 2, 37, 3, 16
    packed = torch.randn(B, T, 3 * H * D, generator=torch.Generator().manual_seed(4))
    q, k, v = (x.view(B, T, H, D).transpose(1, 2) for x in packed.split(H * D, dim=2))
    lr = lowrank_args("lowrank", H, D)
    a = residual_attention_streamed(q, k, v, mode="lowrank", **lr, block_size=8)
    b = residual_attention_streamed(*(x.contiguous() for x in (q, k, v)), mode="lowrank", **lr, block_size=8)
    c = residual_attention_streamed(q, k, v, mode="lowrank", **lr, block_size=8, out_layout="bthd")
    assert torch.equal(a.out, b.out) and c.out.is_contiguous() and torch.equal(c.out, a.out.transpose(1, 2))
    ref = residual_attention_reference(q, k, v, mode="lowrank", **lr)
    torch.testing.assert_close(a.out, ref.out, atol=1e-5, rtol=1e-5)


def test_block_size_is_checked_and_defaulted():
    (q, k, v), _ = inputs("mha")
    for bad, exc in ((0, ValueError), (-3, ValueError), (2.5, TypeError), (True, TypeError)):
        with pytest.raises(exc, match="block_size"):
            residual_attention_streamed(q, k, v, mode="full", block_size=bad)
    assert default_block_size(1, 9, 4096, 4096) == 48  # 8 MiB of fp32 scores: 9 heads × 48 rows × 4096 keys
    assert default_block_size(1, 9, 1024, 1024) == 64  # the ceiling
    assert default_block_size(1, 1, 5, 5) == 5  # never more rows than queries
    assert default_block_size(64, 32, 32768, 32768) == 16  # the floor: a block still holds 16 rows


def test_torch_backend_runs_it_on_cpu():
    (q, k, v), kw = inputs("gqa-window-crossing")
    out = residual_attention(q, k, v, mode="full", backend="torch", **kw)
    assert torch.equal(out, residual_attention_streamed(q, k, v, mode="full", **kw).out)
    assert residual_attention_impl("torch")(q, k, v, mode="full", **kw).out.shape == out.shape


def test_memory_is_linear_in_t():
    """The peak of the CPU allocator during a call grows about linearly in T (blocks), not as T² (the reference):
    torch's CPU memory profiler records every allocation of torch's CPU allocator, which tracemalloc cannot see."""
    from torch.profiler import ProfilerActivity, profile

    def peak(T, fn):
        g = torch.Generator().manual_seed(0)
        q = torch.randn(1, 4, T, 16, generator=g)
        k, v = torch.randn(1, 2, T, 16, generator=g), torch.randn(1, 2, T, 16, generator=g)
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn(q, k, v)
        # Peak of the running sum of allocations (+) and frees (−) in the order they happened.
        events = sorted((e for e in prof.events() if e.self_cpu_memory_usage != 0), key=lambda e: e.time_range.start)
        total = best = 0
        for e in events:
            total += e.self_cpu_memory_usage
            best = max(best, total)
        return best

    def streamed(q, k, v):
        return residual_attention_streamed(q, k, v, mode="full", return_top1_prob=True, block_size=64)

    def reference(q, k, v):
        return residual_attention_reference(q, k, v, mode="full", return_top1_prob=True)

    s1, s2 = peak(1024, streamed), peak(2048, streamed)
    r2 = peak(2048, reference)
    scores_2048 = 4 * 2048 * 2048 * 4  # the reference's fp32 [1, 4, T, T] buffer
    assert r2 >= scores_2048  # the profiler sees the T × T buffer
    # One block's scores [1, 4, 64, T] plus the outputs: 2× the keys is about 2× the memory, and far below T².
    assert s2 < 2.5 * s1 and s2 < scores_2048 / 8


@pytest.mark.parametrize("d_r", [1, 2, 4])
@pytest.mark.parametrize("case", ["gqa-window-crossing", "mqa-chunk-crossing", "sinks", "cache", "mask", "long"])
def test_lowrank_heads_side_by_side(case, d_r):
    """Low rank through V·P_r with the G query heads' P_r side by side (G·d_r <= Dv / 2: one product per kv head,
    the other heads' columns dropped on the way back) and per head (G·d_r > Dv / 2), with the ground state's
    (V P_r)[i*] gathered (no sink) or P_rᵀ ground multiplied (sinks), in blocks that cut windows and chunks."""
    (q, k, v), kw = inputs(case)
    lr = lowrank_args("lowrank", q.shape[1], v.shape[3], d_r)
    for block in (5, None):
        res = residual_attention_streamed(q, k, v, mode="lowrank", **lr, **kw, **RETURNS, block_size=block)
        check_sink_against_f64(res, q, k, v, "lowrank", **lr, **kw, min_clear=0.8)

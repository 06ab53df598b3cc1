"""The Triton kernels with a KV cache (issue 34 item 2): the split-KV decode kernel (``nqpq_kernels.decode``) and the
prefill kernel with its query offset, Tq < Tk queries and no mask (query r at absolute position Tk − Tq + r), against
the float64 definition of tests/f64_reference.py, against each other, and on exact ties across KV splits.

Run in Triton's interpreter without a card (fp32 and fp16: bf16 dots are wrong there), and on a card. The
interpreter's decode config (``launch.DECODE_INTERPRETER_CONFIG``) cuts the keys in 64-key splits of 16-key tiles
and packs at most 32 query rows per program, so Tk of a few hundred crosses several splits (300 and 265 are
multiples of neither) and GROUP·Tq = 34 or 68 crosses row blocks; on a card the fixture below shortens the splits.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from f64_reference import SINK_CLEAR_GAP, check_sink_against_f64, sink_plain  # noqa: E402

from nqpq_kernels import dispatch, launch  # noqa: E402
from nqpq_kernels.dispatch import residual_attention, resolve_backend  # noqa: E402
from nqpq_kernels.launch import DECODE_MAX_QUERIES, decode_config, use_decode_kernel  # noqa: E402

prefill = pytest.importorskip("nqpq_kernels.prefill")
if not (torch.cuda.is_available() or prefill.interpreter_active()):
    pytest.skip("the Triton kernels cannot run here (no CUDA, no interpreter)", allow_module_level=True)

from nqpq_kernels.decode import residual_attention_decode  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
MODES = ("top1", "full", "lowrank")
KERNELS = {"decode": residual_attention_decode, "prefill": prefill.residual_attention_triton}


@pytest.fixture(autouse=True)
def short_splits(monkeypatch):
    """On a card, splits of 64 keys and more (the CUDA rule's 256 would give these Tk one split): the merge across
    splits is what is tested. The interpreter's config has 64-key splits of its own."""
    monkeypatch.setattr(launch, "MIN_KEYS_PER_SPLIT", 64)
    monkeypatch.setattr(launch, "TARGET_PROGRAMS", 1 << 20)


def split_len(q, k, v) -> int:
    """The keys per split the launcher picks for this call (no window: splits start at key 0)."""
    B, Hq, Tq, D = q.shape
    return decode_config(max(16, D, v.shape[-1]), q.dtype, q.device, rows=Hq // k.shape[1] * Tq,
                         kv_programs=B * k.shape[1], first_visible=0, n_keys=k.shape[2], need_v=True)["split_len"]

# name: (B, Hq, Hkv, Tk, Dqk, Dv, options): GQA / MQA / MLA widths, windows shorter than Tk, a chunk edge inside the
# last 17 positions (256 in 248..264), sink keys (70: across the first split boundary), learned sinks per head and
# per row.
CASES = {
    "gqa": (2, 4, 2, 300, 16, 16, {}),
    "mqa-window": (1, 4, 1, 300, 16, 16, {"sliding_window": 50}),
    "mla-softcap": (1, 2, 2, 200, 32, 16, {"softcap": 4.0}),
    "chunk-edge": (1, 4, 2, 265, 16, 16, {"attention_chunk": 128}),
    "sinks": (2, 4, 2, 120, 16, 16, {"sink_tokens": 4, "learned_sink": "head"}),
    "row-sinks-window": (1, 2, 1, 150, 16, 32, {"sink_tokens": 3, "learned_sink": "row", "sliding_window": 40}),
    "long-sink": (1, 2, 1, 200, 16, 16, {"sink_tokens": 70}),
}
# Low rank through V·P_r only: eight query heads on one kv head, so GROUP·Tq = 40 rows at Tq = 5 cross the
# interpreter's 32-row blocks inside a head (rows of head 6 in both blocks).
VP_CASES = {**CASES, "mqa8-rowblocks": (1, 8, 1, 180, 16, 16, {"softcap": 5.0})}
RETURNS = dict(return_argmax=True, return_gram=True, return_top1_prob=True, return_sink_mass=True)


def inputs(case, Tq, seed=0, dtype=torch.float32):
    """q sharpened (scores ~ 3·N(0, 1)): most rows have a clear maximum, by construction."""
    B, Hq, Hkv, Tk, Dqk, Dv, opts = VP_CASES[case]
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, Tq, Dqk, generator=g) * 3.0 / Dqk**0.25
    k = torch.randn(B, Hkv, Tk, Dqk, generator=g) / Dqk**0.25
    v = torch.randn(B, Hkv, Tk, Dv, generator=g)
    kw = dict(opts)
    if kw.get("learned_sink") == "head":
        kw["learned_sink"] = (torch.randn(Hq, generator=g) + 1.0).to(DEV)
    elif kw.get("learned_sink") == "row":
        kw["learned_sink"] = (torch.randn(B, Hq, Tq, generator=g) + 1.0).to(DEV)
    return *(t.to(DEV, dtype) for t in (q, k, v)), kw


def lowrank_args(mode, Hq, Dv):
    if mode != "lowrank":
        return {}
    basis = torch.linalg.qr(torch.randn(Hq, Dv, Dv, generator=torch.Generator().manual_seed(9),
                                        dtype=torch.float64))[0].float()
    return {"basis": basis.to(DEV), "d_r": Dv // 2}


def run_and_check(kernel, case, mode, Tq, dtype=torch.float32, seed=None):
    q, k, v, kw = inputs(case, Tq, seed=Tq if seed is None else seed, dtype=dtype)
    lr = lowrank_args(mode, q.shape[1], v.shape[-1])
    res = KERNELS[kernel](q, k, v, mode=mode, **lr, **kw, **RETURNS)
    assert res.out.shape == (*q.shape[:3], v.shape[-1]) and res.out.dtype == dtype
    cpu = {name: (t.cpu() if isinstance(t, torch.Tensor) else t) for name, t in {**lr, **kw}.items()}
    # out, argmax (absolute), top1_prob, sink_mass and the Gram over the Tq rows against float64
    check_sink_against_f64(res, q.cpu(), k.cpu(), v.cpu(), mode, **cpu)
    return res


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("Tq", [1, 3, 17])
@pytest.mark.parametrize("mode", MODES)
def test_decode_matches_float64(mode, Tq, case):
    run_and_check("decode", case, mode, Tq)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("Tq", [1, 40])
@pytest.mark.parametrize("mode", MODES)
def test_prefill_with_offset_matches_float64(mode, Tq, case):
    """The prefill kernel with Tq < Tk: the query offset in its causal, window and chunk bounds (Tq = 40 spans two
    query blocks of the interpreter's 32 rows, neither aligned to the key tiles)."""
    run_and_check("prefill", case, mode, Tq)


@pytest.mark.parametrize("kernel", list(KERNELS))
@pytest.mark.parametrize("case", ["gqa", "sinks", "row-sinks-window"])
@pytest.mark.parametrize("mode", ["top1", "lowrank"])
def test_half_precision_matches_float64(mode, case, kernel):
    run_and_check(kernel, case, mode, 3, dtype=torch.float16)


@pytest.mark.parametrize("case", ["mqa-window", "chunk-edge", "sinks", "long-sink"])
@pytest.mark.parametrize("mode", MODES)
def test_decode_equals_prefill_rows(mode, case):
    """The two kernels on the same cached call: the same argmax where float64 has a clear maximum, the same numbers
    to fp32 rounding where they picked the same key, the same Gram."""
    q, k, v, kw = inputs(case, 5, seed=21)
    lr = lowrank_args(mode, q.shape[1], v.shape[-1])
    dec = residual_attention_decode(q, k, v, mode=mode, **lr, **kw, **RETURNS)
    pre = prefill.residual_attention_triton(q, k, v, mode=mode, **lr, **kw, **RETURNS)
    f64 = sink_plain(q.cpu(), k.cpu(), v.cpu(), mode, **{n: t.cpu() if isinstance(t, torch.Tensor) else t
                                                          for n, t in {**lr, **kw}.items()})
    clear = (f64.gap > SINK_CLEAR_GAP) & ~f64.bad
    assert int(clear.sum()) >= 0.9 * clear.numel()
    assert torch.equal(dec.argmax.cpu()[clear], pre.argmax.cpu()[clear])
    same = (dec.argmax == pre.argmax).unsqueeze(-1)
    torch.testing.assert_close(torch.where(same, dec.out, 0.0), torch.where(same, pre.out, 0.0), atol=2e-5, rtol=2e-5)
    for name in ("top1_prob", "sink_mass"):
        a, b = getattr(dec, name), getattr(pre, name)
        torch.testing.assert_close(torch.where(same[..., 0], a, 0.0), torch.where(same[..., 0], b, 0.0),
                                   atol=2e-6, rtol=2e-5)
    if bool(same.all()):
        scale = float(f64.ctx_gram.abs().max())
        assert float((dec.gram - pre.gram).abs().max()) < 1e-4 * scale


def vp_ranks(Dv: int) -> dict:
    """d_r from 1 to Dv: DR_PAD 16, the middle (DR_PAD 32 where Dv is 32), and the whole width."""
    return {"one": 1, "mid": Dv // 2 + 1, "full": Dv}


def run_vp_decode(case, Tq, rank, dtype=torch.float32, seed=None):
    """The decode kernel's evaluation call (low rank without a Gram: through V·P_r) against float64."""
    q, k, v, kw = inputs(case, Tq, seed=Tq if seed is None else seed, dtype=dtype)
    B, Hq, _, Dqk = q.shape
    Dv = v.shape[-1]
    lr = lowrank_args("lowrank", Hq, Dv)
    lr["d_r"] = vp_ranks(Dv)[rank]
    plan = launch.decode_plan(Dqk, Dv, dtype, "lowrank", q.device.type, group=Hq // k.shape[1], n_queries=Tq,
                              n_keys=k.shape[2], kv_programs=B * k.shape[1], lowrank_rank=lr["d_r"])
    assert plan.split_meta["VP"] and plan.combine_meta["VP"] or DEV == "cuda"
    res = residual_attention_decode(q, k, v, mode="lowrank", **lr, **kw, return_argmax=True, return_top1_prob=True,
                                    return_sink_mass=True)
    cpu = {name: (t.cpu() if isinstance(t, torch.Tensor) else t) for name, t in {**lr, **kw}.items()}
    check_sink_against_f64(res, q.cpu(), k.cpu(), v.cpu(), "lowrank", **cpu)
    return res, (q, k, v, kw, lr)


@pytest.mark.parametrize("rank", ["one", "mid", "full"])
@pytest.mark.parametrize("Tq", [1, 5, 16])
@pytest.mark.parametrize("case", list(VP_CASES))
def test_decode_lowrank_vp_matches_float64(case, Tq, rank):
    """Low rank through V·P_r in the split pass (per-head V·P_r tiles of the packed rows) and the combine (partial
    V·P_r sums merged, V[i*] and (V P_r)[i*] gathered, the sink's ground state): every decode variant, d_r 1..Dv."""
    run_vp_decode(case, Tq, rank)


@pytest.mark.parametrize("case", ["gqa", "sinks", "row-sinks-window", "mqa8-rowblocks"])
def test_decode_lowrank_vp_half_precision(case):
    run_vp_decode(case, 5, "mid", dtype=torch.float16)


@pytest.mark.parametrize("case", ["gqa", "long-sink", "row-sinks-window"])
def test_decode_lowrank_vp_equals_whole_eps_and_prefill(case):
    """The same call through V·P_r in the decode kernel, through the whole ε (a Gram asked for) in the decode kernel,
    and through V·P_r in the prefill kernel: the same numbers to fp32 rounding where they picked the same key."""
    res, (q, k, v, kw, lr) = run_vp_decode(case, 4, "mid", seed=31)
    whole = residual_attention_decode(q, k, v, mode="lowrank", **lr, **kw, return_argmax=True, return_gram=True)
    pre = prefill.residual_attention_triton(q, k, v, mode="lowrank", **lr, **kw, return_argmax=True)
    for other in (whole, pre):
        same = (res.argmax == other.argmax).unsqueeze(-1)
        assert float(same.float().mean()) > 0.9
        torch.testing.assert_close(torch.where(same, res.out, 0.0), torch.where(same, other.out, 0.0), atol=2e-5,
                                   rtol=2e-5)


def tie_inputs(Tk, Tq, first, second):
    """Integer q and k (every score exact in fp32, whatever the summation order or the tile a key sits in): every
    row holds the same query, keys ``first`` and ``second`` are equal and score 4 above any other key (they match
    the query's signs and add 4 on column 0, where the other keys hold 0): an exact tie of every row's maximum."""
    g = torch.Generator().manual_seed(5)
    D = 16
    query = torch.randint(-1, 2, (D,), generator=g).float()
    query[0] = 1.0
    k = torch.randint(-1, 2, (1, 1, Tk, D), generator=g).float()
    k[..., 0] = 0.0
    k[:, :, first] = query.sign()
    k[:, :, first, 0] = 4.0
    k[:, :, second] = k[:, :, first]
    q = query.expand(1, 2, Tq, D).contiguous()
    v = torch.randn(1, 1, Tk, D, generator=g)
    return q.to(DEV), k.to(DEV), v.to(DEV)


@pytest.mark.parametrize("sink_tokens", [0, 2])
@pytest.mark.parametrize("kernel", list(KERNELS))
def test_ties_across_splits_take_the_first_index(kernel, sink_tokens):
    """Keys tie exactly for every row's maximum across splits (0 and 2, 1 and 2, the last key of split 0 and the first
    of split 1, two splits apart): the argmax is the first, V of it what top1 returns; as the reference has it."""
    Tk, Tq = 200, 3
    q, k, v = tie_inputs(Tk, Tq, 0, 1)
    n = split_len(q, k, v)
    assert n < 100  # ties below cross splits
    for first, second in ((20, 150), (n + 5, 2 * n + 3), (n - 1, n)):
        q, k, v = tie_inputs(Tk, Tq, first, second)
        s = (q @ k.transpose(-1, -2))[0, 0, 0]
        assert float(s[first]) == float(s[second]) == float(s.max()) and int((s == s.max()).sum()) == 2
        res = KERNELS[kernel](q, k, v, mode="top1", scale=1.0, sink_tokens=sink_tokens, return_argmax=True,
                              return_top1_prob=True)
        assert bool((res.argmax == first).all()), (first, second, res.argmax)
        if sink_tokens == 0:
            torch.testing.assert_close(res.out[0, :, :], v[0, 0, first].expand(2, Tq, -1))
        ref = residual_attention(q, k, v, mode="top1", scale=1.0, sink_tokens=sink_tokens, backend="torch",
                                 return_argmax=True, return_top1_prob=True)
        assert torch.equal(ref[1], res.argmax)  # the reference's first index, too
        torch.testing.assert_close(res.top1_prob, ref[2], atol=2e-6, rtol=2e-5)


def test_sink_rows_tie_across_splits():
    """Rows whose R is empty fall back to S's first maximum: with every key a sink key (130 >= Tk) and a tie of
    keys 10 and one in the next split, every row returns 10 with sink mass 1."""
    Tk, Tq = 128, 2
    q, k, v = tie_inputs(Tk, Tq, 0, 1)
    assert split_len(q, k, v) + 6 < Tk
    q, k, v = tie_inputs(Tk, Tq, 10, split_len(q, k, v) + 6)
    for kernel in KERNELS.values():
        res = kernel(q, k, v, mode="top1", scale=1.0, sink_tokens=130, return_argmax=True, return_sink_mass=True)
        assert bool((res.argmax == 10).all())
        assert bool((res.sink_mass == 1.0).all())


def test_non_finite_rows():
    """A NaN key in the second split: rows that see it are NaN with argmax -1, as the reference has them."""
    q, k, v, kw = inputs("mqa-window", 3, seed=2)
    k[:, :, 280] = float("nan")  # seen by every row (window 50 at positions 297..299)
    k2 = k.clone()
    k2[:, :, 280] = 0.0
    res = residual_attention_decode(q, k, v, mode="full", return_argmax=True, return_top1_prob=True, **kw)
    assert bool((res.argmax == -1).all()) and bool(res.out.isnan().all()) and bool(res.top1_prob.isnan().all())
    ok = residual_attention_decode(q, k2, v, mode="full", return_argmax=True, **kw)
    assert bool((ok.argmax >= 0).all()) and bool(ok.out.isfinite().all())


def test_layouts_and_out():
    """bthd output and a preallocated out, as the prefill kernel takes them."""
    q, k, v, kw = inputs("gqa", 2, seed=4)
    want = residual_attention_decode(q, k, v, mode="full", **kw).out
    got = residual_attention_decode(q, k, v, mode="full", out_layout="bthd", **kw).out
    assert got.shape == (2, 2, 4, 16) and got.is_contiguous()
    torch.testing.assert_close(got.transpose(1, 2), want, atol=0, rtol=0)
    buf = torch.empty_like(want)
    assert residual_attention_decode(q, k, v, mode="full", out=buf, **kw).out is buf
    torch.testing.assert_close(buf, want, atol=0, rtol=0)
    with pytest.raises(ValueError, match="attn_mask"):
        residual_attention_decode(q, k, v, mode="full", attn_mask=torch.ones(1, 1, 2, 300, dtype=torch.bool,
                                                                             device=DEV))


def test_dispatch_routes_cached_calls(monkeypatch):
    """The triton backend: few cached queries → the decode kernel, more (or a mask) → the prefill kernel; auto takes
    triton for cached calls on CUDA."""
    assert resolve_backend("auto", "cuda", 64, 64) == "triton"
    assert use_decode_kernel(1, 10, masked=False) and use_decode_kernel(DECODE_MAX_QUERIES, 100, masked=False)
    assert not use_decode_kernel(DECODE_MAX_QUERIES + 1, 100, masked=False)
    assert not use_decode_kernel(4, 4, masked=False) and not use_decode_kernel(1, 10, masked=True)
    import nqpq_kernels.decode as decode_mod

    calls = []
    real_dec, real_pre = decode_mod.residual_attention_decode, prefill.residual_attention_triton
    monkeypatch.setattr(decode_mod, "residual_attention_decode", lambda *a, **kw: calls.append("decode") or
                        real_dec(*a, **kw))
    monkeypatch.setattr(prefill, "residual_attention_triton", lambda *a, **kw: calls.append("prefill") or
                        real_pre(*a, **kw))
    k = torch.randn(1, 1, 40, 16, device=DEV)
    for Tq, want in ((1, "decode"), (DECODE_MAX_QUERIES, "decode"), (DECODE_MAX_QUERIES + 1, "prefill"),
                     (40, "prefill")):
        q = torch.randn(1, 2, Tq, 16, device=DEV)
        out = residual_attention(q, k, k, mode="full", backend="triton")
        torch.testing.assert_close(out, dispatch.residual_attention_torch(q.cpu(), k.cpu(), k.cpu(), mode="full").out
                                   .to(DEV), atol=2e-5, rtol=2e-5)
        assert calls[-1] == want, (Tq, calls)

"""The static report's bookkeeping (no compile: compiling for sm_90 stays off the test paths)."""

import itertools

from benchmarks import sm90
from nqpq_kernels import launch as launch_mod
from nqpq_kernels import prefill_kernel


def test_variants_cover_the_launcher_choices():
    names = [v.name for v in sm90.variants()]
    assert len(names) == len(set(names))
    have = {(v.dtype, v.D, v.mode, v.gram) for v in sm90.variants()}
    for dtype, D, mode, gram in itertools.product(("bf16", "fp32"), (64, 128, 256), ("top1", "full", "lowrank"),
                                                  (False, True)):
        assert (dtype, D, mode, gram) in have
    flags = {(v.features, v.sink, v.learned, v.Dv is not None) for v in sm90.variants()}
    assert (True, True, True, False) in flags and (True, True, True, True) in flags
    # attn_mask: every mode × Gram for each dtype and padded width, once with every other feature; never a window.
    biased = {(v.dtype, v.D, v.mode, v.gram) for v in sm90.variants() if v.bias}
    assert biased == have - {(dtype, 192, mode, gram) for dtype, _, mode, gram in have}
    assert any(v.bias and v.sink and v.learned and v.features for v in sm90.variants())
    assert {v.D for v in sm90.variants() if v.bias and v.T} == {64, 128}
    assert {(v.dtype, v.D) for v in sm90.variants() if v.per_row} == {(dtype, D) for dtype in ("bf16", "fp32")
                                                                      for D in (64, 128, 192, 256)}


def test_bias_launch_arguments():
    """A bias variant passes the launcher's [B, 1, T, T] fp32 mask strides (heads broadcast) and Tk = T; the anchor
    compiled beside it takes the same bias."""
    v = sm90.Variant("bf16", 128, "full", bias=True, T=sm90.UNALIGNED_T)
    values = sm90.residual_values(v)
    T = sm90.UNALIGNED_T
    assert (values["stride_bb"], values["stride_bh"], values["stride_bm"], values["stride_bn"]) == (T * T, 0, T, 1)
    assert values["T"] == values["T_K"] == T
    assert sm90.residual_values(v._replace(bias=False))["T_K"] == T  # the key count, with or without a mask
    per_row = sm90.residual_values(sm90.Variant("bf16", 128, "top1", learned=True, per_row=True))
    per_head = sm90.residual_values(sm90.Variant("bf16", 128, "top1", learned=True))
    B, Hq, _, T = sm90.GEOMETRY[128]
    assert (per_row["stride_lb"], per_row["stride_lh"], per_row["stride_lt"]) == (Hq * T, T, 1)
    assert (per_head["stride_lb"], per_head["stride_lh"], per_head["stride_lt"]) == (0, 1, 0)
    row = dict(dtype="bf16", D=128, Dv=128, BLOCK_M=64, BLOCK_N=64, num_warps=8, num_stages=3, bias=True, T=T)
    assert sm90._anchor_key(row)[-2:] == (True, T)


def test_specialization_is_the_launchers():
    """Aligned pointers and multiple-of-16 ints are marked divisible, 1 becomes a constant, do_not_specialize
    arguments (d_r, window, n_sink, bh_off) stay plain i32."""
    v = sm90.Variant("bf16", 64, "lowrank", gram=True)
    meta, _ = launch_mod.kernel_meta(64, __import__("torch").bfloat16, "lowrank", "cuda", return_gram=True)
    fn = prefill_kernel._residual_attn_fwd
    pointers = {"Q": None, "K": None, "V": None, "Out": None, "Argmax": "*i64", "Top1P": "*fp32", "Basis": "*fp32",
                "Gram": "*fp32", "SinkMass": "*fp32", "LearnedSink": "*fp32"}
    sig, consts, attrs = sm90._specialize(fn, sm90.residual_values(v), meta, pointers, "bf16")
    idx = {name: (i,) for i, name in enumerate(fn.arg_names)}
    assert sig["Q"] == "*bf16" and attrs[idx["Q"]] == [["tt.divisibility", 16]]
    assert consts["GROUP"] == 1 and consts["stride_pr"] == 1  # MHA; the basis is contiguous
    assert sig["T"] == "i32" and attrs[idx["T"]] == [["tt.divisibility", 16]]  # T = 256
    assert sig["H"] == "i32" and idx["H"] not in attrs  # H = 12
    for name in ("d_r", "window", "n_sink", "bh_off"):
        assert sig[name] == "i32" and idx[name] not in attrs


def test_check_names_every_miss():
    base = dict(variant="x", dtype="bf16", D=64, Dv=64, BLOCK_M=64, stack_bytes=0, local_loads=0, local_stores=0,
                mma_sync_dots=0, hgmma_16bit=8, anchor_local_loads=0, anchor_local_stores=0)
    assert sm90.check([base]) == []
    assert len(sm90.check([dict(base, stack_bytes=8, local_stores=2)])) == 1
    assert len(sm90.check([dict(base, BLOCK_M=32)])) == 1
    assert len(sm90.check([dict(base, mma_sync_dots=1)])) == 1
    big = dict(base, D=256, Dv=256, local_loads=4, anchor_local_loads=4)
    assert sm90.check([big]) == [] and len(sm90.check([dict(big, local_loads=5)])) == 1
    assert len(sm90.check([dict(base, error="boom")])) == 1


def test_cached_and_decode_variants():
    """The prefill kernel with a query offset (Tq < Tk) and both decode kernels, every mode for each dtype and padded
    width; the cached prefill passes Tq-row strides for q/out and Tk for k/v."""
    vs = sm90.variants()
    cached = [v for v in vs if v.queries and not v.decode]
    assert {(v.dtype, v.D, v.mode) for v in cached} == {(dt, D, m) for dt in ("bf16", "fp32") for D in (64, 128, 256)
                                                        for m in ("full", "lowrank")}
    values = sm90.residual_values(cached[0])
    B, Hq, Hkv, T = sm90.GEOMETRY[cached[0].D]
    assert values["T"] == sm90.CACHED_TQ and values["T_K"] == T and values["stride_kh"] == T * cached[0].D
    assert values["stride_qh"] == sm90.CACHED_TQ * cached[0].D
    dec = {(v.dtype, v.D, v.mode, v.kernel) for v in vs if v.decode}
    for dtype, D, mode, kernel in itertools.product(("bf16", "fp32"), (64, 128, 256), ("top1", "full", "lowrank"),
                                                    ("split", "combine")):
        assert (dtype, D, mode, kernel) in dec
    assert {v.queries for v in vs if v.decode} == {1, launch_mod.DECODE_MAX_QUERIES}
    row = dict(variant="d", kernel="decode split", dtype="bf16", D=128, Dv=128, BLOCK_M=16, stack_bytes=0,
               local_loads=0, local_stores=0, mma_sync_dots=2, hgmma_16bit=0)
    assert sm90.check([row]) == []  # mma.sync and 16 rows are the decode kernels' own
    assert len(sm90.check([dict(row, local_stores=2)])) == 1
    assert sm90.check([dict(row, dtype="fp32", local_stores=2)]) == []  # reported, not a target


def test_vp_variants_prefill_and_decode():
    """Low rank through V·P_r: the prefill kernel at d_r 8 and 32 (16-bit D 64/128), both decode kernels at d_r 8 and
    32 (alone, every feature at one query and at a 16-query chunk) and at d_r 8 for every other width and fp32; a
    decode V·P_r row passes the launcher's [B, Hq, Tk, DR_PAD] strides."""
    vs = sm90.variants()
    for D, rank in itertools.product((64, 128), (8, 32)):
        assert sm90.Variant("bf16", D, "lowrank", rank=rank) in vs
        for kernel in ("split", "combine"):
            assert sm90.Variant("bf16", D, "lowrank", T=sm90.DECODE_TK, rank=rank, queries=1, kernel=kernel) in vs
    dec = [v for v in vs if v.decode and v.rank]
    assert {(v.dtype, v.D) for v in dec} == {(dt, D) for dt in ("bf16", "fp32") for D in (64, 128, 192, 256)}
    assert {v.queries for v in dec} == {1, launch_mod.DECODE_MAX_QUERIES}
    assert all(v.features and v.sink and v.learned for v in dec if v.queries > 1)
    import torch

    v = sm90.Variant("bf16", 128, "lowrank", T=sm90.DECODE_TK, rank=32, queries=1, kernel="split")
    B, Hq, Hkv, Tk = v.geometry
    plan = launch_mod.decode_plan(128, 128, torch.bfloat16, "lowrank", "cuda", group=Hq // Hkv, n_queries=1,
                                  n_keys=Tk, kv_programs=B * Hkv, lowrank_rank=32)
    assert plan.split_meta["VP"] and plan.combine_meta["DR_PAD"] == 32
    values = sm90.decode_values(v, plan)
    assert (values["stride_wb"], values["stride_wh"], values["stride_wt"]) == (Hq * Tk * 32, Tk * 32, 32)

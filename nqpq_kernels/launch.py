"""The kernel's launch table: block sizes, warps and stages per call, as a table of rules.

``pick_config`` reads the table; ``kernel_meta`` turns one call's features into the kernel's compile-time constants
and launch options (shared by the launcher, ``benchmarks.tune --compile-only`` and ``benchmarks.sm90``).

The table is two lists read top to bottom: ``BASE_RULES`` (the first rule that matches gives the starting config)
and ``ADJUSTMENTS`` (every rule that matches, in order, overrides some keys). Each rule carries its one-line why; the
measurements behind it (ptxas's registers and local memory per variant from ``python -m benchmarks.sm90``, the H100
timings of ``benchmarks.tune``) are in ``benchmarks/results/launch_table.md``. Nothing here touches the CUDA driver:
the table is plain Python, evaluated inside the launcher.

Keys of a config: ``BLOCK_M`` (query rows per program), ``BLOCK_N`` (keys per tile), ``num_warps``, ``num_stages``;
optional ``R_BLOCK`` (basis columns per projection step, default 64), ``GRAM_COLS`` (Gram columns per atomic step,
default 128) and ``SPLIT_GRAM`` (ε's column blocks cut by reshape + split; default: one-hot products).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import triton

MODE_IDS = {"top1": 0, "full": 1, "lowrank": 2}

# The interpreter ignores num_warps / num_stages; BLOCK_M > BLOCK_N exercises both key stages, and a 256-wide Gram is
# cut in two column blocks by reshape + split, as CUDA's D 256 rules cut it (in 4 or 8).
INTERPRETER_CONFIG = dict(BLOCK_M=32, BLOCK_N=16, num_warps=4, num_stages=1, SPLIT_GRAM=True)


@dataclass(frozen=True)
class LaunchCase:
    """What the table reads of one call on CUDA."""

    width: int  # the padded head dim: the wider of q/k's and v's (16, 32, 64, 128 or 256)
    half: bool  # 16-bit inputs (fp16 / bf16); else fp32
    mode: str  # "top1", "full" or "lowrank"
    gram: bool  # the Gram Σ εεᵀ is accumulated (calibration)
    sink: bool  # sink_tokens > 0: a second [BLOCK_M, D] accumulator and the sink's argmax state
    bias: bool  # an attn_mask: an fp32 [BLOCK_M, BLOCK_N] bias tile per key tile
    narrow_v: bool  # v's padded width is <= 128 (MLA's v beside 192-wide q/k); False when v's width is not given
    vp: bool = False  # low rank through V·P_r: a [BLOCK_M, DR_PAD] accumulator and narrow epilogue dots

    @property
    def heavy(self) -> bool:
        """The fp32 [*, D] x [D, D] epilogue dots run: the low-rank projection or the Gram."""
        # Through V·P_r without a sink the epilogue is two narrow dots; with one it also projects the sink's
        # [BLOCK_M, D] sum, and the whole-ε tiles (BLOCK_N 32) are what keeps it free of local memory.
        return (self.mode == "lowrank" and (not self.vp or self.sink)) or self.gram


@dataclass(frozen=True)
class Rule:
    """``when`` the call matches, ``config`` (a dict, or a function of the case giving one) applies; ``why`` says why
    in one line (its measurements: benchmarks/results/launch_table.md)."""

    when: Callable[[LaunchCase], bool]
    config: dict | Callable[[LaunchCase], dict]
    why: str

    def apply(self, case: LaunchCase) -> dict:
        return self.config(case) if callable(self.config) else dict(self.config)


def _wide(c: LaunchCase) -> bool:
    return c.width > 128  # D 144..256 padded to 256 (Gemma 2's 256, MLA's 192/128)


def _mid(c: LaunchCase) -> bool:
    return 64 < c.width <= 128  # D 80..128 (80 and 96 padded to 128)


# The first rule that matches gives the starting config.
BASE_RULES: tuple[Rule, ...] = (
    Rule(lambda c: _wide(c) and c.half and c.gram and c.narrow_v,
         lambda c: dict(BLOCK_M=64, BLOCK_N=16 if c.sink else 32, num_warps=8, num_stages=2 if c.sink else 1,
                        GRAM_COLS=64, R_BLOCK=16),
         "MLA's 128-wide Gram: 64 rows keep every dot on wgmma and the Gram whole; a sink spills at 32 keys"),
    Rule(lambda c: _wide(c) and c.half and c.gram,
         lambda c: dict(BLOCK_M=16 if c.mode == "lowrank" else 32, BLOCK_N=16 if c.mode == "lowrank" else 32,
                        num_warps=8, num_stages=2 if c.sink else 1, GRAM_COLS=64, R_BLOCK=16, SPLIT_GRAM=True),
         "a 256-wide Gram fits only in narrow row blocks (32 rows, low-rank 16), 64 columns at a time, split"),
    Rule(lambda c: _wide(c) and c.half,
         lambda c: dict(BLOCK_M=32 if c.mode == "lowrank" or c.sink else 64, BLOCK_N=32, num_warps=8,
                        num_stages=2),
         "D 256, 16-bit: 64 rows; 32 for low-rank or a sink (64 spilled)"),
    Rule(lambda c: _wide(c),
         lambda c: dict(BLOCK_M=32, BLOCK_N=32, num_warps=8, num_stages=2 if c.sink else 1, R_BLOCK=16,
                        GRAM_COLS=128 if c.narrow_v else 32),
         "D 256, fp32: 32 x 32, the projection 16 columns at a time; two stages with a sink (one spilled KiBs)"),
    Rule(lambda c: c.half and c.width <= 64,
         dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3),
         "D <= 64, 16-bit: the fastest of 20 configs on an H100 (benchmarks.tune, full and low-rank, T 256 and 1024)"),
    Rule(lambda c: c.half,
         dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3),
         "D 80..128, 16-bit: the D 128 row of the tutorial's table (not measured for the padded dims)"),
    Rule(lambda c: c.width <= 64,
         lambda c: dict(BLOCK_M=64, BLOCK_N=32, num_warps=8, num_stages=1 if c.gram and not c.sink else 2,
                        R_BLOCK=16),
         "D <= 64, fp32: 8 warps (4 spilled even the plain anchor); one stage for a Gram without a sink"),
    Rule(lambda c: True,
         lambda c: dict(BLOCK_M=64 if c.mode == "top1" and not c.gram else 32, BLOCK_N=32, num_warps=8,
                        num_stages=2, R_BLOCK=16),
         "D 80..128, fp32: 32 rows once P @ V is accumulated (64 spilled up to 1.6 KiB)"),
)

# Every rule that matches, in this order, overrides the keys it names.
ADJUSTMENTS: tuple[Rule, ...] = (
    Rule(lambda c: _wide(c) and not c.half and c.bias, dict(BLOCK_N=16),
         "D 256, fp32, attn_mask: the bias tile spilled at 32 keys"),
    Rule(lambda c: _wide(c) and not c.half and c.gram and not c.narrow_v,
         dict(BLOCK_M=16, BLOCK_N=16, SPLIT_GRAM=True),
         "D 256, fp32, a 256-wide Gram: 16 x 16 and split (one-hot selection spilled KiBs)"),
    Rule(lambda c: _wide(c) and not c.half and c.narrow_v and c.sink and c.heavy, dict(BLOCK_N=16),
         "MLA, fp32, a sink and the low-rank/Gram epilogue: 32 keys spilled"),
    Rule(lambda c: not _wide(c) and not c.half and c.width <= 64 and c.sink and c.gram, dict(BLOCK_M=32),
         "D <= 64, fp32, Gram + sink: 64 rows spilled whatever the stages"),
    Rule(lambda c: _mid(c) and not c.half and c.sink and c.mode == "top1", dict(BLOCK_N=16),
         "D 128, fp32, top1 with a sink: 64 rows spilled at 32 keys"),
    Rule(lambda c: _mid(c) and not c.half and c.bias, dict(BLOCK_N=16),
         "D 128, fp32, attn_mask: the bias tile spilled at 32 keys"),
    Rule(lambda c: c.width == 128 and c.half and c.heavy, dict(BLOCK_M=64),
         "D 128, 16-bit, the low-rank/Gram epilogue: at most 64 rows"),
    Rule(lambda c: not _wide(c) and c.half and c.sink, dict(BLOCK_M=64, num_warps=8),
         "16-bit with a sink: its second accumulator fits 64 rows over 8 warps (wgmma's M of 64 kept)"),
    Rule(lambda c: not _wide(c) and c.half and c.sink and c.heavy, dict(BLOCK_N=32),
         "16-bit, a sink and the low-rank/Gram epilogue: 32 keys per tile (64 spilled)"),
    Rule(lambda c: c.width == 128 and c.half and c.sink, dict(BLOCK_N=32),
         "D 128, 16-bit, a sink: 32 keys per tile (full spilled 8 B at 64 keys, 255 registers)"),
    Rule(lambda c: c.width == 128 and c.half and c.bias, dict(BLOCK_M=64),
         "D 128, 16-bit, attn_mask: 64 rows (128 spilled at unaligned lengths)"),
    Rule(lambda c: c.width == 128 and c.half and c.bias and c.sink and c.heavy, dict(BLOCK_N=16),
         "D 128, 16-bit, attn_mask, a sink and the low-rank/Gram epilogue: 16 keys per tile"),
)


def pick_config(D: int, dtype: torch.dtype, mode: str, return_gram: bool, device: torch.device,
                sink: bool = False, value_width: int | None = None, bias: bool = False, vp: bool = False) -> dict:
    """Block sizes / launch options for a padded head dim ``D`` (the wider of q/k and v): ``INTERPRETER_CONFIG`` off
    CUDA, the rule table on CUDA. ``sink``: sink_tokens > 0. ``value_width``: v's padded width (None: not given).
    ``bias``: an attn_mask. ``vp``: low rank through V·P_r (the narrow epilogue)."""
    if device.type != "cuda":
        return dict(INTERPRETER_CONFIG)
    case = LaunchCase(width=D, half=dtype in (torch.float16, torch.bfloat16), mode=mode, gram=return_gram,
                      sink=sink, bias=bias, narrow_v=value_width is not None and value_width <= 128, vp=vp)
    cfg = next(rule for rule in BASE_RULES if rule.when(case)).apply(case)
    for rule in ADJUSTMENTS:
        if rule.when(case):
            cfg.update(rule.apply(case))
    return cfg


def padded_head_dim(D: int) -> int:
    """The kernel's tile width for a head dim: the next power of two, at least 16."""
    return max(16, triton.next_power_of_2(D))


def vp_compiles_clean(value_dim: int, qk_dim: int, dtype: torch.dtype, d_r: int, *, sink: bool = False,
                      learned_sink: bool = False, bias: bool = False) -> bool:
    """Whether the V·P_r low-rank variant compiles for sm_90 without local memory (``python -m benchmarks.sm90``,
    the ``vp`` rows): always for 16-bit q/k and v up to 128 wide; elsewhere (fp32, D 256, MLA's 192) only at
    d_r <= 16 without a sink, a learned sink or a mask: there the [BLOCK_M, 32+] fp32 accumulator or the sink's
    projection spilled KiBs, and the whole-ε path (which did not) runs instead. The interpreter runs V·P_r always
    (the same code; its tests cover every variant)."""
    narrow = padded_head_dim(max(value_dim, qk_dim)) <= 128
    if dtype in (torch.float16, torch.bfloat16) and narrow:
        return True
    return padded_head_dim(d_r) == 16 and not (sink or learned_sink or bias)


def kernel_meta(
    D: int,
    dtype: torch.dtype,
    mode: str,
    device_type: str,
    *,
    windowed: bool = False,
    softcap: bool = False,
    return_argmax: bool = False,
    return_gram: bool = False,
    return_top1_prob: bool = False,
    return_sink_mass: bool = False,
    sink: bool = False,
    allow_tf32: bool = False,
    value_dim: int | None = None,
    learned_sink: bool = False,
    bias: bool = False,
    per_head: bool = False,
    lowrank_rank: int | None = None,
) -> tuple[dict, dict]:
    """The kernel's compile-time constants and launch options for one call: ``(constexprs, {num_warps,
    num_stages})``. One place, shared by the launcher, ``benchmarks.tune --compile-only`` and ``benchmarks.sm90``.

    ``D`` is q/k's width, ``value_dim`` v's (None: D). ``sink``: sink_tokens > 0. Only that flag is compiled
    in; the number of sink keys is a runtime argument, so one compiled kernel serves every n >= 1 and n = 0
    runs the kernel without any sink code. ``learned_sink``: a learned sink logit per head is passed.
    ``bias``: an attn_mask is passed (read as an fp32 bias tile per key tile; every key tile is walked).
    ``per_head``: some query heads are left plain (a flag per head read in the epilogue; they output ctx, so ctx is
    accumulated for every head, and low rank keeps the whole-ε path).
    ``lowrank_rank``: d_r of a low-rank call. Without a Gram (evaluation) the kernel then goes through V·P_r
    (``LOWRANK_VP``): the key loop's P·V dot runs on ``DR_PAD`` = max(16, next power of two >= d_r) columns
    of the launcher's V·P_r product instead of V's; calibration (a Gram) keeps the whole ε. None: the whole-ε
    path (what ``benchmarks.tune`` / ``benchmarks.sm90`` compile unless they name a rank).
    """
    lowrank_vp = mode == "lowrank" and not return_gram and lowrank_rank is not None and not per_head
    if lowrank_vp and device_type == "cuda":
        lowrank_vp = vp_compiles_clean(D if value_dim is None else value_dim, D, dtype, lowrank_rank, sink=sink,
                                       learned_sink=learned_sink, bias=bias)
    need_ctx = mode != "top1" or return_gram or per_head
    d_pad = padded_head_dim(D)
    dv = D if value_dim is None else value_dim
    dv_pad = padded_head_dim(dv)
    # The tiles hold a [BLOCK_N, D_PAD] K and a [BLOCK_N, DV_PAD] V tile and a [BLOCK_M, DV_PAD] accumulator:
    # the table is read at the wider of the two.
    cfg = pick_config(max(d_pad, dv_pad), dtype, mode, return_gram, torch.device(device_type), sink=sink,
                      value_width=dv_pad, bias=bias, vp=lowrank_vp)
    assert cfg["BLOCK_M"] % cfg["BLOCK_N"] == 0, "BLOCK_M must be a multiple of BLOCK_N (diagonal stage)"
    # fp32 inputs: exact fp32 dots ("ieee") unless tf32 is asked for. 16-bit inputs: the main dots
    # run on the inputs' own type (input_precision is moot there, pass Triton's default), and the
    # fp32 epilogue (projection, Gram) uses tf32: its 10-bit mantissa is at least the output's.
    # One precision serves both: the key loop's dots and the epilogue's.
    precision = "ieee" if dtype == torch.float32 and not allow_tf32 else "tf32"
    meta = dict(
        HEAD_D=D,
        D_PAD=d_pad,
        HEAD_DV=dv,
        DV_PAD=dv_pad,
        R_BLOCK=min(dv_pad, cfg.get("R_BLOCK", 64)),
        GRAM_COLS=min(dv_pad, cfg.get("GRAM_COLS", 128)),
        BLOCK_M=cfg["BLOCK_M"],
        BLOCK_N=cfg["BLOCK_N"],
        MODE=MODE_IDS[mode],
        # The sink masses (Σ_S p, m_L) need the softmax denominator.
        NEED_L=need_ctx or return_top1_prob or sink or learned_sink,
        NEED_CTX=need_ctx,
        WINDOWED=windowed,
        SOFTCAP=softcap,
        STORE_ARGMAX=return_argmax,
        STORE_TOP1P=return_top1_prob,
        STORE_GRAM=return_gram,
        STORE_SINK=return_sink_mass,
        DOT_PREC=precision,
        # Triton's CPU interpreter computes bf16 tl.dot wrongly (numpy has no bfloat16), so there
        # the operands are upcast to fp32; compiled kernels always dot in the input dtype.
        DOT_F32=device_type != "cuda" and dtype == torch.bfloat16,
        HAS_SINK=sink,
        # The second [BLOCK_M, D] accumulator (Σ_S p V) costs registers: only where the ground state is used,
        # i.e. not for "full" without a Gram. Registers and spills per variant: python -m benchmarks.sm90.
        SINK_ACC=sink and (mode != "full" or return_gram),
        PER_HEAD=per_head,
        LEARNED=learned_sink,
        HAS_BIAS=bias,
        # The Gram's column blocks of ε cut by reshape + split (else selected by one-hot products).
        SPLIT_GRAM=cfg.get("SPLIT_GRAM", False),
        LOWRANK_VP=lowrank_vp,
        DR_PAD=padded_head_dim(lowrank_rank) if lowrank_vp else 16,
    )
    return meta, dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])


# --------------------------------------------------------------------------- #
# The split-KV decode kernel (nqpq_kernels.decode_kernel)
# --------------------------------------------------------------------------- #
# The most queries the dispatcher sends to the decode kernel (a decode step, a speculative chunk); more go to the
# prefill kernel with its query offset, whose row blocks are full from Tq ~ BLOCK_M on.
DECODE_MAX_QUERIES = 16
# The interpreter: 16-key tiles, 64-key splits (so the tests' Tk of a few hundred cross several splits) and row
# blocks of at most 32 packed rows (GROUP·Tq beyond it exercises the row-block grid).
DECODE_INTERPRETER_CONFIG = dict(BLOCK_N=16, KEYS_PER_SPLIT=64, MAX_ROWS=32, num_warps=4, num_stages=1)
# On CUDA (no card measured yet: benchmarks/gpu_session.sh times it; registers and spills per variant from
# python -m benchmarks.sm90 are in benchmarks/results/launch_table.md): a split is at least MIN_KEYS_PER_SPLIT keys
# (below it the partial results' round trip costs more than the keys), and the splits are as many as fill
# TARGET_PROGRAMS programs (two waves of an H100's 132 SMs, Flash-Decoding's rule of filling the card).
MIN_KEYS_PER_SPLIT = 256
TARGET_PROGRAMS = 264


def use_decode_kernel(n_queries: int, n_keys: int, masked: bool) -> bool:
    """Whether the Triton backend runs a call with the split-KV decode kernel: a KV cache (no mask, Tq < Tk) of at
    most ``DECODE_MAX_QUERIES`` queries."""
    return not masked and n_queries < n_keys and n_queries <= DECODE_MAX_QUERIES


def decode_config(width: int, dtype: torch.dtype, device: torch.device, *, rows: int, kv_programs: int,
                  first_visible: int, n_keys: int, need_v: bool) -> dict:
    """Tiles, splits and warps of one decode call. ``width``: the padded head dim (the wider of q/k and v);
    ``rows``: the packed query rows of a kv head (GROUP·Tq); ``kv_programs``: B·Hkv; keys [first_visible, n_keys)
    are the ones some row sees; ``need_v``: the split pass reads V (ctx, a Gram or a sink), not K alone.

    Returns BLOCK_M (packed rows per program, >= 16 for tl.dot), BLOCK_N, the key range's aligned start kv_lo, the
    keys per split (a multiple of BLOCK_N) and the number of splits, warps and stages of the split pass, the combine's
    BLOCK_T, warps, R_BLOCK and GRAM_COLS."""
    half = dtype in (torch.float16, torch.bfloat16)
    if device.type != "cuda":
        cfg = dict(DECODE_INTERPRETER_CONFIG)
        max_rows, per_split = cfg.pop("MAX_ROWS"), cfg.pop("KEYS_PER_SPLIT")
    else:
        # 16-bit D <= 128: 64-key tiles; D 256 or fp32: 32 (a [rows, D] accumulator and a [keys, D] V tile per
        # stage); 4 warps: a decode tile is 16-64 rows.
        cfg = dict(BLOCK_N=64 if half and width <= 128 else 32, num_warps=4, num_stages=2 if need_v else 3)
        max_rows = 64 if width <= 128 else 32
        per_split = None
    cfg["BLOCK_M"] = min(max_rows, max(16, triton.next_power_of_2(rows)))
    if device.type == "cuda" and cfg["BLOCK_M"] >= 64:
        # 64 packed rows (a speculative chunk of a GQA group) hold a [64, D] accumulator, and a sink's second one:
        # 8 warps and 32-key tiles (D 128 with every feature spilled 48 B at 4 warps, 8 B at 8 warps and 64 keys:
        # benchmarks/results/launch_table.md).
        cfg.update(num_warps=8, BLOCK_N=32)
    block_n = cfg["BLOCK_N"]
    kv_lo = (first_visible // block_n) * block_n
    n_tiles = triton.cdiv(n_keys - kv_lo, block_n)
    if per_split is None:
        row_blocks = triton.cdiv(rows, cfg["BLOCK_M"])
        most = max(1, (n_keys - kv_lo) // MIN_KEYS_PER_SPLIT)
        splits = min(most, max(1, triton.cdiv(TARGET_PROGRAMS, kv_programs * row_blocks)))
        per_split = triton.cdiv(n_tiles, splits) * block_n
    else:
        per_split = max(block_n, per_split // block_n * block_n)
    cfg.update(kv_lo=kv_lo, split_len=per_split, n_splits=triton.cdiv(n_tiles * block_n, per_split), BLOCK_T=16,
               combine_warps=4 if width <= 128 else 8, R_BLOCK=16 if width > 64 else 32,
               GRAM_COLS=width if width <= 64 else 64)
    return cfg


# The decode launcher (``nqpq_kernels.decode``) goes through V·P_r on a card only once V·P_r is kept beside the KV
# cache. Formed per call, as now, a decode step reads the whole V (to form V P_r), writes Hq·Tk·DR_PAD elements and
# reads them back: more bytes than the whole-ε path's one read of K and V (at GQA 3, d_r 8, bf16: ~448 B per key and
# kv head against 256). The interpreter runs it always, so the kernel stays tested, and ``decode_plan`` (and the
# sm_90 report) still plan it for the day a cache keeps the product.
DECODE_VP_ON_CUDA = False


def decode_vp_compiles_clean(value_dim: int, qk_dim: int, dtype: torch.dtype, *, sink: bool) -> bool:
    """Whether the decode kernels' V·P_r variant runs on a card (``python -m benchmarks.sm90``, the decode ``vp``
    rows): 16-bit at every width (d_r 8 and 32, with every feature: no local memory); fp32 without a sink, or with one
    at D <= 64 (fp32 D 128/256 and MLA with a sink spilled 0.2-1.9 KiB in the split pass or the combine); elsewhere
    the whole-ε path. The interpreter runs V·P_r always (its tests cover every variant)."""
    if dtype in (torch.float16, torch.bfloat16):
        return True
    return not sink or padded_head_dim(max(value_dim, qk_dim)) <= 64


@dataclass(frozen=True)
class DecodePlan:
    """One decode call's launch: the split pass's and the combine's compile-time constants and launch options, and
    the runtime split geometry."""

    split_meta: dict
    split_launch: dict
    combine_meta: dict
    combine_launch: dict
    kv_lo: int  # first key walked (a multiple of BLOCK_N)
    split_len: int  # keys per split (a multiple of BLOCK_N)
    n_splits: int
    row_blocks: int  # programs per kv head and split (GROUP·Tq rows, BLOCK_M at a time)
    block_t: int  # query rows per combine program


def decode_plan(
    D: int,
    value_dim: int,
    dtype: torch.dtype,
    mode: str,
    device_type: str,
    *,
    group: int,
    n_queries: int,
    n_keys: int,
    kv_programs: int,
    first_visible: int = 0,
    windowed: bool = False,
    softcap: bool = False,
    return_argmax: bool = False,
    return_gram: bool = False,
    return_top1_prob: bool = False,
    return_sink_mass: bool = False,
    sink: bool = False,
    learned_sink: bool = False,
    allow_tf32: bool = False,
    lowrank_rank: int | None = None,
) -> DecodePlan:
    """The decode kernels' constants and launch for one call (shared by ``nqpq_kernels.decode`` and
    ``benchmarks.sm90``). ``D``/``value_dim``: q/k's and v's widths; ``group`` = Hq / Hkv; ``kv_programs`` = B·Hkv;
    ``first_visible``: the first key some query sees (a window's or chunk's start; 0 otherwise).
    ``lowrank_rank``: d_r of a low-rank call; without a Gram it goes through V·P_r (``VP``) where
    ``decode_vp_compiles_clean`` says so, as the prefill kernel's ``LOWRANK_VP``."""
    vp = mode == "lowrank" and not return_gram and lowrank_rank is not None
    if vp and device_type == "cuda":
        vp = decode_vp_compiles_clean(value_dim, D, dtype, sink=sink)
    dr_pad = padded_head_dim(lowrank_rank) if vp else 16
    need_ctx = mode != "top1" or return_gram
    d_pad, dv_pad = padded_head_dim(D), padded_head_dim(value_dim)
    cfg = decode_config(max(d_pad, dv_pad), dtype, torch.device(device_type), rows=group * n_queries,
                        kv_programs=kv_programs, first_visible=first_visible, n_keys=n_keys, need_v=need_ctx or sink)
    # As kernel_meta: exact fp32 dots unless tf32 is asked for; bf16 dots upcast in the interpreter only.
    precision = "ieee" if dtype == torch.float32 and not allow_tf32 else "tf32"
    dot_f32 = device_type != "cuda" and dtype == torch.bfloat16
    sink_acc = sink and (mode != "full" or return_gram)
    split_meta = dict(HEAD_D=D, D_PAD=d_pad, HEAD_DV=value_dim, DV_PAD=dv_pad, BLOCK_M=cfg["BLOCK_M"],
                      BLOCK_N=cfg["BLOCK_N"], NEED_CTX=need_ctx, WINDOWED=windowed, SOFTCAP=softcap,
                      DOT_PREC=precision, DOT_F32=dot_f32, HAS_SINK=sink, SINK_ACC=sink_acc, VP=vp, DR_PAD=dr_pad)
    combine_meta = dict(HEAD_DV=value_dim, DV_PAD=dv_pad, BLOCK_T=cfg["BLOCK_T"], R_BLOCK=min(dv_pad, cfg["R_BLOCK"]),
                        GRAM_COLS=min(dv_pad, cfg["GRAM_COLS"]), MODE=MODE_IDS[mode], NEED_CTX=need_ctx,
                        STORE_ARGMAX=return_argmax, STORE_TOP1P=return_top1_prob, STORE_GRAM=return_gram,
                        STORE_SINK=return_sink_mass, DOT_PREC=precision, HAS_SINK=sink, SINK_ACC=sink_acc,
                        LEARNED=learned_sink, VP=vp, DR_PAD=dr_pad)
    return DecodePlan(split_meta, dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"]), combine_meta,
                      dict(num_warps=cfg["combine_warps"], num_stages=1), cfg["kv_lo"], cfg["split_len"],
                      cfg["n_splits"], triton.cdiv(group * n_queries, cfg["BLOCK_M"]), cfg["BLOCK_T"])

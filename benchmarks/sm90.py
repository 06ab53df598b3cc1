"""Static report for Hopper without a card: what ptxas makes of every kernel variant the launcher can pick.

    python -m benchmarks.sm90                      # every variant, writes benchmarks/results/sm90_static.csv
    python -m benchmarks.sm90 --only "bf16 D64 "   # variants whose name matches the regular expression
    python -m benchmarks.sm90 --check              # exit 1 unless every 16-bit D <= 128 variant has no local
                                                   # memory, keeps wgmma for QKᵀ and PV and BLOCK_M >= 64, and
                                                   # D = 256 / fp32 use no more local memory than the anchor

No GPU is needed: each variant is compiled by ``triton.compile`` for ``GPUTarget("cuda", 90, 32)`` (sm_90a) at
the block sizes, warps and stages ``kernel_meta`` gives it, and its cubin is read with the tools the Triton wheel
ships (``cuobjdump -res-usage``: registers, stack frame; ``nvdisasm``: LDL/STL local loads/stores and HGMMA,
the wgmma instructions). From the TTGIR: how many dots became ``warp_group_dot`` (wgmma) and how many stayed
``tt.dot`` (mma.sync). Beside each variant, a plain causal FlashAttention-2 forward with the same online argmax
(first index of the running maximum; ``_plain_fa2_argmax_fwd`` below) compiled at the same tiles, warps and
stages: the anchor of what the compiler does with attention alone.

Variants: mode × dtype (fp16 compiles like bf16) × padded D × Gram × (window, soft cap, top1_prob) × sink_tokens
× learned sink (one logit per head; with every feature also one per query row) × MLA widths (q/k 192, v 128:
DeepSeek-V2/V3's heads), and with an attn_mask (``bias``: the kernel's HAS_BIAS variant, a [B, 1, T, T] fp32 mask
broadcast over heads; no window with it) every mode × Gram and once every other feature, the 16-bit D <= 128 ones
also at an unaligned T (1001). A bias row's anchor takes the same bias (every key tile walked, the bias tile
added); low rank through V·P_r (``vpN``: the rank) in the prefill kernel and in both passes of the split-KV
decode kernel (``decode split`` / ``decode combine`` rows, Tk = DECODE_TK, one query or a 16-query chunk), and the
prefill kernel with a query offset (``Tq100``). Compiles run in ``--jobs`` processes (Triton caches them: a rerun
of unchanged variants takes seconds).
Run with TRITON_INTERPRET unset.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import NamedTuple

import triton
import triton.language as tl

RESULTS = Path(__file__).resolve().parent / "results"
ARCH = 90
SASS_TOOLS = Path(triton.__file__).resolve().parent / "backends" / "nvidia" / "bin"


# --------------------------------------------------------------------------- #
# The anchor: plain causal FlashAttention-2 forward with an online argmax (first index of the running max)
# --------------------------------------------------------------------------- #
@triton.jit
def _plain_tiles(acc, l_i, m_i, best_idx, q, k_base, v_base, stride_kt, stride_vt, offs_m, offs_n, offs_d,
                 scale, lo, hi, T, BLOCK_N: tl.constexpr, MASKED: tl.constexpr, DOT_PREC: tl.constexpr,
                 ARGMAX: tl.constexpr, bias_rows=None, row_ok=None, stride_bn=0, BIAS: tl.constexpr = False):
    LOG2E: tl.constexpr = 1.4426950408889634
    BIG: tl.constexpr = 2147483647
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        cols = start_n + offs_n
        rows64 = cols.to(tl.int64)
        if MASKED:
            k = tl.load(k_base + rows64[:, None] * stride_kt + offs_d[None, :], mask=(cols < T)[:, None], other=0.0)
        else:
            k = tl.load(k_base + rows64[:, None] * stride_kt + offs_d[None, :])
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * scale
        if BIAS:  # an additive fp32 bias tile read through its strides (SDPA's attn_mask), as the kernel reads it
            b_ptrs = bias_rows[:, None] + rows64[None, :] * stride_bn
            s = s + tl.load(b_ptrs, mask=row_ok[:, None] & (cols < T)[None, :], other=0.0)
            s = tl.where((cols < T)[None, :], s, float("-inf"))
        elif MASKED:
            s = tl.where((cols[None, :] <= offs_m[:, None]) & (cols[None, :] < T), s, float("-inf"))
        if ARGMAX == 2:  # one reduction: the tile max and its first position
            t_max, t_pos = tl.max(s, 1, return_indices=True, return_indices_tie_break_left=True)
            best_idx = tl.where(t_max > m_i, start_n + t_pos, best_idx)
        elif ARGMAX == 1:  # the max, then the first column reaching it
            t_max = tl.max(s, 1)
            t_idx = tl.min(tl.where(s == t_max[:, None], cols[None, :], BIG), 1)
            best_idx = tl.where(t_max > m_i, t_idx, best_idx)  # tiles in key order: a tie keeps the earlier index
        else:
            t_max = tl.max(s, 1)
        m_new = tl.maximum(m_i, t_max)
        m_base = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2((m_i - m_base) * LOG2E)
        p = tl.exp2((s - m_base[:, None]) * LOG2E)
        l_i = l_i * alpha + tl.sum(p, 1)
        if MASKED:
            v = tl.load(v_base + rows64[:, None] * stride_vt + offs_d[None, :], mask=(cols < T)[:, None], other=0.0)
        else:
            v = tl.load(v_base + rows64[:, None] * stride_vt + offs_d[None, :])
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PREC)
        m_i = m_new
    return acc, l_i, m_i, best_idx


@triton.jit
def _plain_fa2_argmax_fwd(Q, K, V, Out, Argmax, stride_qb, stride_qh, stride_qt, H, T, scale,
                          HEAD_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                          DOT_PREC: tl.constexpr, ARGMAX: tl.constexpr,
                          Bias=None, stride_bb=0, stride_bh=0, stride_bm=0, stride_bn=0, BIAS: tl.constexpr = False):
    """Causal softmax(q kᵀ · scale) V and the first index of each row's maximal score; q, k, v, out [B, H, T, D]
    sharing strides. The same tile walk as the residual kernel: tiles below the diagonal block unmasked, the
    diagonal block masked. With ``BIAS`` (the kernel's attn_mask variant): every key tile [0, T) walked, each
    masked past the last key, with an fp32 [B, H, T, T] bias tile (read through its strides) added to the scores."""
    start_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // H).to(tl.int64)
    off_h = (pid_bh % H).to(tl.int64)
    base = off_b * stride_qb + off_h * stride_qh
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_D)
    mask_m = offs_m < T
    offs_m64 = offs_m.to(tl.int64)
    q = tl.load(Q + base + offs_m64[:, None] * stride_qt + offs_d[None, :], mask=mask_m[:, None], other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_D], dtype=tl.float32)
    best_idx = tl.full([BLOCK_M], 2147483647, dtype=tl.int32)
    lo = start_m * BLOCK_M
    if BIAS:
        bias_rows = Bias + off_b * stride_bb + off_h * stride_bh + offs_m64 * stride_bm
        acc, l_i, m_i, best_idx = _plain_tiles(acc, l_i, m_i, best_idx, q, K + base, V + base, stride_qt, stride_qt,
                                               offs_m, offs_n, offs_d, scale, 0, T, T, BLOCK_N, True, DOT_PREC,
                                               ARGMAX, bias_rows, mask_m, stride_bn, True)
    else:
        acc, l_i, m_i, best_idx = _plain_tiles(acc, l_i, m_i, best_idx, q, K + base, V + base, stride_qt, stride_qt,
                                               offs_m, offs_n, offs_d, scale, 0, lo, T, BLOCK_N, False, DOT_PREC,
                                               ARGMAX)
        acc, l_i, m_i, best_idx = _plain_tiles(acc, l_i, m_i, best_idx, q, K + base, V + base, stride_qt, stride_qt,
                                               offs_m, offs_n, offs_d, scale, lo, tl.minimum(lo + BLOCK_M, T), T,
                                               BLOCK_N, True, DOT_PREC, ARGMAX)
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(Out + base + offs_m64[:, None] * stride_qt + offs_d[None, :], out.to(Out.dtype.element_ty),
             mask=mask_m[:, None])
    tl.store(Argmax + off_b * H * T + off_h * T + offs_m64, best_idx.to(tl.int64), mask=mask_m)


# --------------------------------------------------------------------------- #
# Variants
# --------------------------------------------------------------------------- #
class Variant(NamedTuple):
    dtype: str  # "bf16" or "fp32" (fp16 compiles like bf16)
    D: int  # q/k width (padded to a power of two inside the kernel)
    mode: str
    gram: bool = False
    features: bool = False  # sliding window + soft cap + top1_prob (each only adds code)
    sink: bool = False  # sink_tokens > 0, with its mass stored
    learned: bool = False  # a learned sink logit per head
    Dv: int | None = None  # v's width (MLA); None: D
    bias: bool = False  # an attn_mask (fp32 additive bias, every key tile walked); features then lack the window
    T: int | None = None  # the sequence length, when not GEOMETRY's (an unaligned one: no divisibility by 16)
    per_row: bool = False  # with learned: one logit per query row ([B, Hq, T], Inkling 2), not one per head
    rank: int | None = None  # low rank through V·P_r at this d_r (evaluation, no Gram): P·V on DR_PAD columns
    queries: int | None = None  # a KV cache: this many queries (the last ones) against the T keys; None: Tq = T
    kernel: str = "prefill"  # "prefill" (the fused kernel), or the decode kernels' "split" pass and "combine"

    @property
    def name(self) -> str:
        parts = [self.dtype, f"D{self.D}" + (f"/v{self.Dv}" if self.Dv else ""), self.mode]
        parts += [flag for flag, on in (("gram", self.gram),
                                        ("softcap+top1p" if self.bias else "window+softcap+top1p", self.features),
                                        ("sink", self.sink),
                                        ("learned/row" if self.per_row else "learned", self.learned),
                                        ("bias", self.bias)) if on]
        parts += [f"vp{self.rank}"] if self.rank else []
        parts += [f"T{self.T}"] if self.T else []
        parts += [f"Tq{self.queries}"] if self.queries else []
        return " ".join(parts + ([f"decode {self.kernel}"] if self.decode else []))

    @property
    def decode(self) -> bool:
        return self.kernel != "prefill"

    @property
    def geometry(self) -> tuple[int, int, int, int]:
        """(B, Hq, Hkv, T) it is compiled for."""
        B, Hq, Hkv, T = GEOMETRY[self.D]
        return B, Hq, Hkv, self.T or T


def variants() -> list[Variant]:
    """Every mode × Gram for each dtype and padded width, then the optional features, the sinks, and MLA."""
    out = []
    for dtype in ("bf16", "fp32"):
        for D in (64, 128, 256):
            for mode in ("top1", "full", "lowrank"):
                for gram in (False, True):
                    out.append(Variant(dtype, D, mode, gram))
            out += [
                Variant(dtype, D, "top1", sink=True),
                Variant(dtype, D, "full", sink=True),
                Variant(dtype, D, "lowrank", features=True),
                Variant(dtype, D, "lowrank", gram=True, features=True, sink=True),
                Variant(dtype, D, "top1", learned=True),
                Variant(dtype, D, "lowrank", gram=True, features=True, sink=True, learned=True),
            ]
        out += [Variant(dtype, 192, mode, gram=mode == "lowrank", Dv=128) for mode in ("top1", "full", "lowrank")]
        out.append(Variant(dtype, 192, "lowrank", gram=True, features=True, sink=True, learned=True, Dv=128))
    # attn_mask (a model's own mask or position bias; no window or chunk with it): every mode × Gram, and every
    # other feature at once.
    for dtype in ("bf16", "fp32"):
        for D in (64, 128, 256):
            out += [Variant(dtype, D, mode, gram, bias=True) for mode in ("top1", "full", "lowrank")
                    for gram in (False, True)]
            out.append(Variant(dtype, D, "lowrank", gram=True, features=True, sink=True, learned=True, bias=True))
    # A learned logit per query row (Inkling 2) with every other feature.
    out += [Variant(dtype, D, "lowrank", gram=True, features=True, sink=True, learned=True, per_row=True,
                    Dv=128 if D == 192 else None) for dtype in ("bf16", "fp32") for D in (64, 128, 256, 192)]
    # Low rank through V·P_r (what evaluation runs: no Gram) where the launcher picks it
    # (nqpq_kernels.launch.vp_compiles_clean): 16-bit D <= 128 at d_r 8 (DR_PAD 16) and 32, alone and with every
    # feature, with an attn_mask; elsewhere at d_r 8 alone.
    for D in (64, 128):
        out += [Variant("bf16", D, "lowrank", rank=8), Variant("bf16", D, "lowrank", rank=32),
                Variant("bf16", D, "lowrank", features=True, sink=True, learned=True, rank=8),
                Variant("bf16", D, "lowrank", features=True, sink=True, learned=True, bias=True, rank=8)]
    out += [Variant("bf16", 256, "lowrank", rank=8), Variant("bf16", 192, "lowrank", Dv=128, rank=8)]
    out += [Variant("fp32", D, "lowrank", rank=8) for D in (64, 128, 256)]
    # A model's own mask comes at any prompt length: the 16-bit D <= 128 ones at an unaligned T too (T, Tk and the
    # bias's row stride not multiples of 16: scalar bias loads).
    out += [v._replace(T=UNALIGNED_T) for v in out if v.bias and v.dtype == "bf16" and v.D <= 128]
    # A KV cache through the prefill kernel (its query offset): a chunk of CACHED_TQ queries against the T keys.
    out += [Variant(dtype, D, mode, gram=gram, features=gram, sink=gram, learned=gram, queries=CACHED_TQ)
            for dtype in ("bf16", "fp32") for D in (64, 128, 256)
            for mode, gram in (("full", False), ("lowrank", True))]
    return out + decode_variants()


def decode_variants() -> list[Variant]:
    """The split-KV decode kernels (split pass and combine) at DECODE_TK keys: every mode for each dtype and padded
    width, a Gram, a sink in top1 (S's sums beside K), every feature at once, at one query (a decode step) and at
    DECODE_MAX_QUERIES (a speculative chunk: GROUP·Tq rows per program); MLA widths."""
    from nqpq_kernels.launch import DECODE_MAX_QUERIES

    out = []
    for dtype in ("bf16", "fp32"):
        for D in (64, 128, 256):
            base = [Variant(dtype, D, mode) for mode in ("top1", "full", "lowrank")]
            base += [Variant(dtype, D, "full", gram=True), Variant(dtype, D, "top1", sink=True)]
            every = Variant(dtype, D, "lowrank", gram=True, features=True, sink=True, learned=True)
            base += [every, every._replace(per_row=True, queries=DECODE_MAX_QUERIES)]
            out += base
        out += [Variant(dtype, 192, "lowrank", gram=True, features=True, sink=True, learned=True, Dv=128)]
    # Low rank through V·P_r (evaluation: no Gram) where the launcher picks it (launch.decode_vp_compiles_clean):
    # 16-bit D <= 128 at d_r 8 (DR_PAD 16) and 32, alone and with every feature (one query, and a 16-query chunk with
    # a logit per row); elsewhere at d_r 8 alone (the whole-ε path where the rule says so).
    for D in (64, 128):
        vp_every = Variant("bf16", D, "lowrank", features=True, sink=True, learned=True, rank=8)
        out += [Variant("bf16", D, "lowrank", rank=8), Variant("bf16", D, "lowrank", rank=32), vp_every,
                vp_every._replace(per_row=True, queries=DECODE_MAX_QUERIES)]
    out += [Variant(dtype, D, "lowrank", rank=8, Dv=128 if D == 192 else None) for dtype, D in
            (("bf16", 256), ("bf16", 192), ("fp32", 64), ("fp32", 128), ("fp32", 256), ("fp32", 192))]
    out += [Variant(dtype, D, "lowrank", features=True, sink=True, learned=True, rank=8, Dv=128 if D == 192 else None)
            for dtype, D in (("bf16", 256), ("bf16", 192), ("fp32", 64), ("fp32", 128), ("fp32", 256), ("fp32", 192))]
    return [v._replace(T=DECODE_TK, queries=v.queries or 1, kernel=kernel) for v in out
            for kernel in ("split", "combine")]


# --------------------------------------------------------------------------- #
# Compilation and the cubin's numbers
# --------------------------------------------------------------------------- #
# The geometry whose strides a variant is compiled for: Triton specializes a launch on its integer arguments
# (a value of 1 becomes a constant, a multiple of 16 is marked divisible by 16) and on 16-byte aligned pointers,
# and that decides vector loads and address arithmetic. (B, Hq, Hkv, T) per q/k width: GPT-2 small at the sweep's
# T 256, Llama-3-8B, Gemma 2, DeepSeek-V3 (MLA, no GQA).
GEOMETRY = {64: (8, 12, 12, 256), 128: (4, 32, 8, 1024), 192: (4, 16, 16, 1024), 256: (4, 8, 4, 1024)}
UNALIGNED_T = 1001
CACHED_TQ = 100  # the prefill kernel's cached variants: 100 queries (not a multiple of 16) against T keys
DECODE_TK = 4096  # the decode variants' cache length
# --unspecialized: compile as ``benchmarks.tune --compile-only`` did (every int a plain i32, no pointer alignment),
# which is not what a launch compiles: scalar loads and per-element address tensors, and spills that a launch
# does not have (issue 26's table was made that way).
SPECIALIZE = True


def _specialize(fn, values: dict, constexprs: dict, pointers: dict, elem: str) -> tuple[dict, dict, dict]:
    """(signature, constexprs, attrs) of a launch with these argument values, as Triton's launcher builds them:
    pointers 16-byte aligned, ints equal to 1 constant, multiples of 16 divisible; ``do_not_specialize`` left
    alone."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend

    # A JITFunction keeps do_not_specialize; an InterpretedFunction (TRITON_INTERPRET=1, e.g. under the tests'
    # conftest) keeps its decorator's kwargs.
    dns = set(getattr(fn, "do_not_specialize", None) or getattr(fn, "kwargs", {}).get("do_not_specialize", ()))
    dns |= {fn.arg_names[i] for i in dns if isinstance(i, int)}
    sig, consts, attrs = {}, dict(constexprs), {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in pointers:
            sig[name] = pointers[name] or f"*{elem}"
            if SPECIALIZE:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in ("scale", "softcap"):
            sig[name] = "fp32"
        elif name in dns or not SPECIALIZE:
            sig[name] = "i32"
        else:
            kind, spec = native_specialize_impl(BaseBackend, values[name], False, True, True)
            if kind == "constexpr":
                sig[name] = "constexpr"
                consts[name] = spec
            else:
                sig[name] = kind
                if spec == "D":
                    attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, consts, attrs


def _compile(fn, values: dict, constexprs: dict, pointers: dict, elem: str, options: dict):
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig, consts, attrs = _specialize(fn, values, constexprs, pointers, elem)
    src = ASTSource(fn=fn, signature=sig, constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()},
                    attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", ARCH, 32), options=options)


def residual_values(v: Variant) -> dict:
    """The integer arguments the launcher passes for contiguous [B, H, T, D] q, k, v and out at GEOMETRY."""
    B, Hq, Hkv, Tk = v.geometry
    T = v.queries or Tk  # queries; the keys are Tk
    Dv = v.Dv or v.D
    values = dict(stride_qb=Hq * T * v.D, stride_qh=T * v.D, stride_qt=v.D,
                  stride_kb=Hkv * Tk * v.D, stride_kh=Tk * v.D, stride_kt=v.D,
                  stride_vb=Hkv * Tk * Dv, stride_vh=Tk * Dv, stride_vt=Dv,
                  stride_ob=Hq * T * Dv, stride_oh=T * Dv, stride_ot=Dv,
                  stride_ab=Hq * T, stride_ah=T, H=Hq, GROUP=Hq // Hkv, T=T)
    # The basis [Hq, Dv, Dv] fp32, contiguous; (0, 0, 0) when there is none.
    values.update(dict(zip(("stride_ph", "stride_pd", "stride_pr"),
                           (Dv * Dv, Dv, 1) if v.mode == "lowrank" else (0, 0, 0), strict=True)))
    # A learned sink: one logit per head (gpt-oss), read as [B, Hq, T] with strides (0, 1, 0); or one per query
    # row, a contiguous [B, Hq, T].
    lstrides = ((Hq * T, T, 1) if v.per_row else (0, 1, 0)) if v.learned else (0, 0, 0)
    values.update(dict(zip(("stride_lb", "stride_lh", "stride_lt"), lstrides, strict=True)))
    values.update(bias_values(v))
    values["CrystalHeads"] = None  # per-head crystallization off (every variant crystallizes every head): its default
    # V·P_r [B, Hq, T, DR_PAD], contiguous (the launcher's product); none (the defaults) otherwise.
    dr_pad = max(16, triton.next_power_of_2(v.rank)) if v.rank else 0
    values.update(dict(VPr=None, stride_wb=Hq * T * dr_pad, stride_wh=T * dr_pad, stride_wt=dr_pad))
    return values


def bias_values(v: Variant) -> dict:
    """The bias arguments and the key count T_K: without an attn_mask no bias (its defaults) and the geometry's T
    keys; with one, the launcher's fp32 view of a [B, 1, T, T] mask (transformers' 4-D masks) expanded over the heads
    (stride 0), keys as many as queries."""
    B, Hq, _, T = v.geometry
    if not v.bias:
        return dict(Bias=None, stride_bb=0, stride_bh=0, stride_bm=0, stride_bn=0, T_K=T)
    return dict(stride_bb=T * T, stride_bh=0, stride_bm=T, stride_bn=1, T_K=T)


def cubin_stats(kernel) -> dict:
    """Registers, stack frame, local loads/stores, wgmma instructions and dots of a compiled kernel."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(kernel.asm["cubin"])
        usage = subprocess.run([str(SASS_TOOLS / "cuobjdump"), "-res-usage", path], capture_output=True,
                               text=True, check=True).stdout
        sass = subprocess.run([str(SASS_TOOLS / "nvdisasm"), path], capture_output=True, text=True,
                              check=True).stdout
    regs = re.search(r"REG:(\d+)", usage)
    stack = re.search(r"STACK:(\d+)", usage)
    ttgir = kernel.asm["ttgir"]
    return {
        "registers": int(regs.group(1)) if regs else -1,
        "stack_bytes": int(stack.group(1)) if stack else -1,
        "local_loads": len(re.findall(r"\bLDL(\.[A-Z0-9]+)*\b", sass)),
        "local_stores": len(re.findall(r"\bSTL(\.[A-Z0-9]+)*\b", sass)),
        "shared_bytes": kernel.metadata.shared,
        "hgmma_16bit": len(re.findall(r"\bHGMMA\.\S*\.(?:BF16|F16)\b", sass)),
        "hgmma_tf32": len(re.findall(r"\bHGMMA\.\S*\.TF32\b", sass)),
        "wgmma_dots": len(re.findall(r"ttng\.warp_group_dot ", ttgir)),
        "mma_sync_dots": len(re.findall(r"= tt\.dot ", ttgir)),
    }


def _elem(dtype: str) -> str:
    return {"bf16": "bf16", "fp16": "fp16", "fp32": "fp32"}[dtype]


def decode_values(v: Variant, plan) -> dict:
    """The integer arguments the decode launcher passes for contiguous q [B, Hq, Tq, D], k and v [B, Hkv, Tk, D],
    out [B, Hq, Tq, Dv] and its split geometry (``plan``: ``launch.decode_plan``'s)."""
    B, Hq, Hkv, Tk = v.geometry
    Tq, Dv = v.queries, v.Dv or v.D
    part_stride = B * Hq * Tq * plan.n_splits
    # V·P_r [B, Hq, Tk, DR_PAD], contiguous (the launcher's product); none (the defaults) otherwise.
    dr_pad = plan.split_meta["DR_PAD"]
    vp = dict(VPr=None, stride_wb=Hq * Tk * dr_pad, stride_wh=Tk * dr_pad, stride_wt=dr_pad)
    if v.kernel == "split":
        return dict(**vp, stride_qb=Hq * Tq * v.D, stride_qh=Tq * v.D, stride_qt=v.D,
                    stride_kb=Hkv * Tk * v.D, stride_kh=Tk * v.D, stride_kt=v.D,
                    stride_vb=Hkv * Tk * Dv, stride_vh=Tk * Dv, stride_vt=Dv,
                    H=Hq, HKV=Hkv, GROUP=Hq // Hkv, T=Tq, T_K=Tk, n_splits=plan.n_splits, part_stride=part_stride)
    lstrides = ((Hq * Tq, Tq, 1) if v.per_row else (0, 1, 0)) if v.learned else (0, 0, 0)
    return dict(**vp, stride_vb=Hkv * Tk * Dv, stride_vh=Tk * Dv, stride_vt=Dv,
                stride_ob=Hq * Tq * Dv, stride_oh=Tq * Dv, stride_ot=Dv,
                **dict(zip(("stride_ph", "stride_pd", "stride_pr"),
                           (Dv * Dv, Dv, 1) if v.mode == "lowrank" else (0, 0, 0), strict=True)),
                **dict(zip(("stride_lb", "stride_lh", "stride_lt"), lstrides, strict=True)),
                H=Hq, GROUP=Hq // Hkv, T=Tq, n_splits=plan.n_splits, part_stride=part_stride)


def compile_decode_variant(v: Variant) -> dict:
    """A decode kernel (the split pass or the combine) at the launcher's plan for v's geometry (Tk = DECODE_TK)."""
    import torch

    from nqpq_kernels import decode_kernel
    from nqpq_kernels import launch as launch_mod

    B, Hq, Hkv, Tk = v.geometry
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[v.dtype]
    plan = launch_mod.decode_plan(v.D, v.Dv or v.D, dtype, v.mode, "cuda", group=Hq // Hkv, n_queries=v.queries,
                                  n_keys=Tk, kv_programs=B * Hkv, windowed=v.features, softcap=v.features,
                                  return_argmax=True, return_gram=v.gram, return_top1_prob=v.features,
                                  return_sink_mass=v.sink or v.learned, sink=v.sink, learned_sink=v.learned,
                                  lowrank_rank=v.rank)
    if v.kernel == "split":
        fn, meta, launch = decode_kernel.decode_split, plan.split_meta, plan.split_launch
        pointers = {"Q": None, "K": None, "V": None, "PartF": "*fp32", "PartI": "*i32", "PartAcc": "*fp32",
                    "PartAccS": "*fp32"}
        tiles = (meta["BLOCK_M"], meta["BLOCK_N"])
    else:
        fn, meta, launch = decode_kernel.decode_combine, plan.combine_meta, plan.combine_launch
        pointers = {"V": None, "Out": None, "Argmax": "*i64", "Top1P": "*fp32", "Basis": "*fp32", "Gram": "*fp32",
                    "SinkMass": "*fp32", "LearnedSink": "*fp32", "PartF": "*fp32", "PartI": "*i32",
                    "PartAcc": "*fp32", "PartAccS": "*fp32"}
        tiles = (meta["BLOCK_T"], 0)
    if meta["VP"]:
        pointers["VPr"] = None  # V·P_r in v's dtype
    row = {"variant": v.name, "dtype": v.dtype, "D": v.D, "Dv": v.Dv or v.D, "mode": v.mode, "gram": v.gram,
           "window_softcap_top1p": v.features, "sink_tokens": v.sink, "learned_sink": v.learned, "bias": False,
           "T": Tk, "vp_rank": v.rank if meta["VP"] else "", "queries": v.queries, "kernel": f"decode {v.kernel}",
           "geometry_B_Hq_Hkv_T": "x".join(map(str, v.geometry)), "BLOCK_M": tiles[0], "BLOCK_N": tiles[1],
           "splits": plan.n_splits, **launch}
    try:
        row.update(cubin_stats(_compile(fn, decode_values(v, plan), meta, pointers, _elem(v.dtype), launch)))
    except Exception as err:  # a lowering failure is a result: the row names it
        row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
    return row


def compile_variant(v: Variant) -> dict:
    if v.decode:
        return compile_decode_variant(v)
    import torch

    from nqpq_kernels import launch as launch_mod
    from nqpq_kernels import prefill_kernel

    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[v.dtype]
    meta, launch = launch_mod.kernel_meta(v.D, dtype, v.mode, "cuda", windowed=v.features and not v.bias,
                                          softcap=v.features,
                                          return_argmax=True, return_gram=v.gram, return_top1_prob=v.features,
                                          return_sink_mass=v.sink or v.learned, sink=v.sink, value_dim=v.Dv,
                                          learned_sink=v.learned, bias=v.bias, lowrank_rank=v.rank)
    pointers = {"Q": None, "K": None, "V": None, "Out": None, "Argmax": "*i64", "Top1P": "*fp32",
                "Basis": "*fp32", "Gram": "*fp32", "SinkMass": "*fp32", "LearnedSink": "*fp32"}
    if v.bias:
        pointers["Bias"] = "*fp32"
    if v.rank:
        pointers["VPr"] = None  # V·P_r in v's dtype
    row = {"variant": v.name, "dtype": v.dtype, "D": v.D, "Dv": v.Dv or v.D, "mode": v.mode, "gram": v.gram,
           "window_softcap_top1p": v.features, "sink_tokens": v.sink, "learned_sink": v.learned, "bias": v.bias,
           "T": v.geometry[3], "vp_rank": v.rank if meta["LOWRANK_VP"] else "",
           "queries": v.queries or v.geometry[3], "kernel": "prefill",
           "geometry_B_Hq_Hkv_T": "x".join(map(str, v.geometry)),
           "BLOCK_M": meta["BLOCK_M"], "BLOCK_N": meta["BLOCK_N"], **launch}
    try:
        row.update(cubin_stats(_compile(prefill_kernel._residual_attn_fwd, residual_values(v), meta, pointers,
                                        _elem(v.dtype), launch)))
    except Exception as err:  # a lowering failure is a result: the row names it
        row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
    return row


def compile_anchor(key: tuple) -> dict:
    """The plain FA2 + online argmax at (dtype, padded D, BLOCK_M, BLOCK_N, num_warps, num_stages, bias, T), at
    the GEOMETRY of its width (MHA, B·H from it) and the variant's T; with ``bias`` it takes the same attn_mask
    as the kernel's bias rows (an fp32 bias tile added to every key tile's scores, every key tile walked)."""
    dtype, d_pad, block_m, block_n, warps, stages, bias, seq = key
    meta = dict(HEAD_D=d_pad, BLOCK_M=block_m, BLOCK_N=block_n, DOT_PREC="ieee" if dtype == "fp32" else "tf32",
                ARGMAX=1, BIAS=bias)
    B, H, _, _ = GEOMETRY[d_pad]
    T = seq  # the variant's
    values = dict(stride_qb=H * T * d_pad, stride_qh=T * d_pad, stride_qt=d_pad, H=H, T=T)
    values.update(bias_values(Variant(dtype, d_pad, "full", bias=bias, T=seq)))
    values.pop("T_K")
    pointers = {"Q": None, "K": None, "V": None, "Out": None, "Argmax": "*i64"}
    if bias:
        pointers["Bias"] = "*fp32"
    try:
        return cubin_stats(_compile(_plain_fa2_argmax_fwd, values, meta, pointers, _elem(dtype),
                                    dict(num_warps=warps, num_stages=stages)))
    except Exception as err:
        return {"error": f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"}


def _anchor_key(row: dict) -> tuple:
    d_pad = max(16, triton.next_power_of_2(max(row["D"], row["Dv"])))
    return (row["dtype"], d_pad, row["BLOCK_M"], row["BLOCK_N"], row["num_warps"], row["num_stages"], row["bias"],
            row["T"])


def check(rows: list[dict]) -> list[str]:
    """The issue-26 targets; one line per variant that misses one."""
    problems = []
    for r in rows:
        if "error" in r:
            problems.append(f"{r['variant']}: does not compile ({r['error']})")
            continue
        local = r["local_loads"] + r["local_stores"]
        if r.get("kernel", "prefill").startswith("decode"):
            # The decode kernels: 16-64 packed rows, below wgmma's 64 (mma.sync); no anchor. 16-bit D <= 128: no
            # local memory; the others are reported.
            if r["dtype"] != "fp32" and max(r["D"], r["Dv"]) <= 128 and (r["stack_bytes"] or local):
                problems.append(f"{r['variant']}: {r['stack_bytes']} B stack, {local} local loads/stores")
            continue
        if r["dtype"] != "fp32" and max(r["D"], r["Dv"]) <= 128:
            if r["stack_bytes"] or local:
                problems.append(f"{r['variant']}: {r['stack_bytes']} B stack, {local} local loads/stores")
            if r["BLOCK_M"] < 64:
                problems.append(f"{r['variant']}: BLOCK_M {r['BLOCK_M']} < 64")
            if r["mma_sync_dots"] or r["hgmma_16bit"] == 0:
                problems.append(f"{r['variant']}: QKᵀ / PV not all on wgmma")
        else:
            anchor = r.get("anchor_local_loads", 0) + r.get("anchor_local_stores", 0)
            if local > anchor:
                problems.append(f"{r['variant']}: {local} local loads/stores, the anchor {anchor}")
    return problems


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(RESULTS / "sm90_static.csv"))
    p.add_argument("--only", default=None, help="only the variants whose name matches this regular expression")
    p.add_argument("--jobs", type=int, default=2, help="compile processes")
    p.add_argument("--check", action="store_true", help="exit 1 if a variant misses the issue-26 targets")
    p.add_argument("--unspecialized", action="store_true",
                   help="compile without the launcher's argument specialization (how issue 26 measured)")
    args = p.parse_args(argv)
    global SPECIALIZE
    SPECIALIZE = not args.unspecialized
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("error: benchmarks.sm90 compiles for sm_90: unset TRITON_INTERPRET (the interpreter's kernels "
              "cannot be compiled)", file=sys.stderr)
        return 2
    todo = [v for v in variants() if args.only is None or re.search(args.only, v.name)]
    if not todo:
        print(f"error: no variant name matches {args.only!r}", file=sys.stderr)
        return 2
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        rows = list(pool.map(compile_variant, todo))
        keys = sorted({_anchor_key(r) for r in rows if r["kernel"] == "prefill"})
        anchors = dict(zip(keys, pool.map(compile_anchor, keys), strict=True))
    from benchmarks.common import write_csv

    for r in rows:
        a = anchors[_anchor_key(r)] if r["kernel"] == "prefill" else {}
        r.update({f"anchor_{k}": val for k, val in a.items() if k in ("registers", "stack_bytes", "local_loads",
                                                                     "local_stores", "error")})
        r.update({"specialized": SPECIALIZE,
                  "arch": f"sm_{ARCH}a", "triton": triton.__version__})
    write_csv(args.out, rows)
    print(f"{'variant':62} {'tiles':>9} {'w/s':>4} {'regs':>4} {'stack':>5} {'LDL+STL':>7} {'smem KiB':>8} "
          f"{'wgmma':>5} {'anchor stack/LDL+STL':>20}")
    for r in rows:
        if "error" in r:
            print(f"{r['variant']:62} ERROR {r['error']}")
            continue
        a_local = r.get("anchor_local_loads", 0) + r.get("anchor_local_stores", 0)
        anchor = f"{r.get('anchor_stack_bytes', '?')} / {a_local}" if r["kernel"] == "prefill" else "-"
        print(f"{r['variant']:62} {r['BLOCK_M']:>4}/{r['BLOCK_N']:<4} {r['num_warps']}/{r['num_stages']} "
              f"{r['registers']:>4} {r['stack_bytes']:>5} {r['local_loads'] + r['local_stores']:>7} "
              f"{r['shared_bytes'] // 1024:>8} {r['wgmma_dots']:>5} {anchor:>20}")
    print(f"wrote {args.out}")
    if args.check:
        problems = check(rows)
        for line in problems:
            print("MISS", line)
        return 1 if problems else 0
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

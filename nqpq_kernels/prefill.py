"""The launcher of the prefill kernel (``nqpq_kernels.prefill_kernel``): ``residual_attention_triton``, any Tq <= Tk.

It checks the inputs (the shared contract, then the Triton backend's device and head dims), allocates the outputs,
picks the block sizes from the plain rule table of ``nqpq_kernels.launch`` (evaluated here, at call time: the module
never touches the CUDA driver at import time), forms V·P_r for evaluation low rank, turns attn_mask into an fp32 bias
read through its strides, and launches a grid of ``(cdiv(T, BLOCK_M), B * Hq)`` programs, B·Hq chunked over CUDA's
grid-y limit. The device check, the launch context and ``project_values`` serve the decode launcher
(``nqpq_kernels.decode``) too.
"""

from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from .contract import (
    OUT_LAYOUTS,
    TRITON_HEAD_DIMS,
    ResidualAttentionResult,
    check_choice,
    check_residual_attention_inputs,
)
from .launch import kernel_meta
from .prefill_kernel import _residual_attn_fwd
from .prefill_loop import _attn_fwd_inner

__all__ = ["MAX_GRID_Y", "SUPPORTED_HEAD_DIMS", "residual_attention_triton"]

SUPPORTED_HEAD_DIMS = TRITON_HEAD_DIMS


def _interpret_mode() -> bool:
    """True when Triton runs in its CPU interpreter (read at call time)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def interpreter_active() -> bool:
    """True when the kernel (and triton.language's own jit helpers) were built for the interpreter.

    Triton reads TRITON_INTERPRET when a function is decorated, i.e. when triton and this module
    are imported, so setting the variable later has no effect.
    """
    return all(
        type(f).__name__ == "InterpretedFunction" for f in (_residual_attn_fwd, _attn_fwd_inner, tl.zeros)
    )


def _check_backend_device(device: torch.device) -> None:
    if device.type == "cuda":
        return
    if device.type == "cpu" and _interpret_mode():
        if not interpreter_active():
            raise RuntimeError(
                'backend="triton" on CPU: TRITON_INTERPRET=1 is set but triton (or nqpq_kernels) was '
                "imported before it was; set TRITON_INTERPRET=1 in the environment before importing "
                'triton, or use backend="torch".'
            )
        return
    raise RuntimeError(
        f'backend="triton" needs CUDA tensors (or CPU tensors with TRITON_INTERPRET=1 set before '
        f"triton is imported); got tensors on {device}. Use backend=\"torch\" for the reference path."
    )


def _launch_device(device: torch.device) -> contextlib.AbstractContextManager:
    """The context every kernel launch runs in: ``torch.cuda.device(device)`` for a CUDA device (Triton
    launches on the current device, not the tensors'), nothing for the CPU interpreter."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def project_values(v: Tensor, basis: Tensor, d_r: int, width: int) -> Tensor:
    """V·P_r per query head, ``[B, Hq, Tk, width]`` in v's dtype, contiguous, columns >= d_r zero.

    v ``[B, Hkv, Tk, Dv]``, basis ``[Hq, Dv, R]`` fp32 (query head h reads kv head ``h // (Hq // Hkv)``). Formed
    once per call in fp32 and rounded once to v's dtype (the dtype the key loop's P·V dot reads V in), so the
    kernel's loop reads ``width`` columns per key instead of Dv. Precomputed rather than re-projected per key
    tile: re-projecting would read all of V in every program (no bytes saved) and add Dv·d_r FLOPs per key per
    program (as much again as the narrow P·V of a BLOCK_M ≈ Dv block); the product costs one read of V and one
    write of B·Hq·Tk·width elements, shared by the cdiv(T, BLOCK_M) programs of each head.
    """
    B, Hkv, Tk, Dv = v.shape
    Hq = basis.shape[0]
    group = Hq // Hkv
    P = basis[:, :, :d_r].reshape(Hkv, group, Dv, d_r)
    vp = torch.zeros((B, Hq, Tk, width), device=v.device, dtype=v.dtype)
    # [B, Hkv, 1, Tk, Dv] @ [Hkv, G, Dv, d_r] -> [B, Hkv, G, Tk, d_r]: the kv head's V against each of its
    # query heads' bases (transformers' repeat_kv order), never a repeated copy of V.
    vp[..., :d_r] = torch.matmul(v.to(torch.float32).unsqueeze(2), P).reshape(B, Hq, Tk, d_r)
    return vp


# CUDA's limit on grid dimension y, where the launcher puts B·Hq (the query blocks are on x, so that
# neighbouring programs share a head's K/V in L2). Larger B·Hq is launched in chunks; a module constant
# so that a CPU test can lower it.
MAX_GRID_Y = 65535


def residual_attention_triton(
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
    allow_tf32: bool = False,
    out: Tensor | None = None,
    sink_tokens: int = 0,
    return_sink_mass: bool = False,
    learned_sink: Tensor | None = None,
    attention_chunk: int | None = None,
    attn_mask: Tensor | None = None,
    crystal_heads: Tensor | None = None,
) -> ResidualAttentionResult:
    """Fused residual attention; same contract as ``nqpq_kernels.reference.residual_attention_reference``.

    q ``[B, Hq, T, D]``, k and v ``[B, Hkv, T, D]`` (``Hq % Hkv == 0``; the kernel reads kv head
    ``h // (Hq // Hkv)`` in place, never a repeated copy). D: any multiple of 16 up to 256. v may have
    another width Dv (MLA; also a multiple of 16 up to 256): out, the basis rows and the Gram are then Dv wide.
    Returns ``ResidualAttentionResult(out, argmax, gram, top1_prob, sink_mass)``: ``out`` in the input
    dtype, ``[B, Hq, T, D]`` (``out_layout="bhtd"``) or a contiguous ``[B, T, Hq, D]`` (``"bthd"``);
    ``argmax`` int64 ``[B, Hq, T]`` (-1 on a non-finite row); ``gram`` float64 ``[Hq, D, D]`` =
    Σ_{b,t} ε εᵀ (reduced on the device in fp32, per launch); ``top1_prob`` float32 ``[B, Hq, T]``
    = p[argmax] (1/l at the end of the online softmax without a sink; NaN on a non-finite row);
    ``sink_mass`` float32 ``[B, Hq, T]``. Unrequested fields are None.

    ``sink_tokens=n`` keeps the keys j < n apart (the reference's module docstring has the math): in the
    key tiles holding j < n a second accumulator sums Σ_S p V and Σ_S p under the same online rescaling,
    and the argmax skips j < n. Still one pass; n is a runtime argument.

    ``attention_chunk=C`` (Llama 4): query i sees keys j <= i with j // C == i // C; the key loop starts at the
    block's first row's chunk and masks per row, as under a sliding window (C is a runtime argument).

    ``learned_sink`` (float ``[Hq]``, or ``[B, Hq, T]`` one per query row): a zero-value key with that logit, kept
    apart like the sink (the reference's docstring); merged into the online softmax in the epilogue, the key loop
    is unchanged.

    ``attn_mask`` (SDPA's: bool, True = the key takes part, or float, added to the scores; broadcastable to
    ``[B, Hq, Tq, Tk]``): it alone decides visibility; k and v may then hold Tk != Tq keys. Passed to the kernel
    as an fp32 bias read through its strides (a broadcast dim is never copied; a bool mask becomes 0 / -inf), and
    every key tile is walked (no causal tile skipping).

    A KV cache (no ``attn_mask``, q holding Tq < Tk queries): query r sits at absolute position Tk − Tq + r; the
    kernel adds that offset (a runtime argument) to its causal, window and chunk bounds, so row blocks still start at
    the queries and the tiles below the diagonal block are walked unmasked. For Tq <= 16 the Triton backend runs the
    split-KV decode kernel instead (``nqpq_kernels.decode``).

    Inputs whose last dimension is strided (stride(-1) != 1) are copied to a contiguous layout first
    (the kernel's loads need unit stride along D); views such as transformers' transposed [B, T, H, D]
    projections are read in place.

    ``crystal_heads`` (bool ``[Hq]``; None: every head): the heads marked False output ctx, in the same launch (an
    int8 flag per query head read in the epilogue; ctx is accumulated for every head then).

    ``out`` (keyword-only, optional) is a preallocated output of the right shape,
    dtype and device with a unit last stride; mainly a test hook.
    """
    args = check_residual_attention_inputs(q, k, v, mode, basis, d_r, scale, sliding_window, softcap, sink_tokens,
                                           learned_sink, attention_chunk, attn_mask, crystal_heads)
    check_choice("out_layout", out_layout, OUT_LAYOUTS)
    _check_backend_device(q.device)
    B, H, T, Dqk = q.shape
    T_k = k.shape[2]
    # A KV cache (no attn_mask, Tq < Tk): query i sits at absolute position Tk − Tq + i, a runtime offset of the
    # causal, window and chunk bounds (Tq = Tk: offset 0, the plain causal call).
    q_off = T_k - T if attn_mask is None else 0
    D = args.value_dim  # out's width
    for width in (Dqk, D):
        if width not in SUPPORTED_HEAD_DIMS:
            raise ValueError(
                f'backend="triton" supports head dims that are multiples of 16 up to 256, got D={width}'
            )
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))

    device = q.device
    out_shape = (B, H, T, D) if out_layout == "bhtd" else (B, T, H, D)
    if out is None:
        out = torch.empty(out_shape, device=device, dtype=q.dtype)
    else:
        if not isinstance(out, Tensor):
            raise TypeError(f"out must be a torch.Tensor, got {type(out).__name__}")
        if tuple(out.shape) != out_shape or out.dtype != q.dtype or out.device != device:
            raise ValueError(
                f"out must be {out_shape} {q.dtype} on {device}, got {tuple(out.shape)} "
                f"{out.dtype} on {out.device}"
            )
        if out.stride(-1) != 1:
            raise ValueError(f"out must have stride(-1) == 1, got strides {tuple(out.stride())}")
    if out_layout == "bhtd":
        stride_ob, stride_oh, stride_ot = out.stride(0), out.stride(1), out.stride(2)
    else:
        stride_ob, stride_oh, stride_ot = out.stride(0), out.stride(2), out.stride(1)

    # A window covering the whole sequence is plain causal attention: skip the window masks.
    windowed = args.sliding_window is not None and args.sliding_window < T_k
    chunk = args.attention_chunk or 0  # validated: None for C >= T (plain causal), never with a window
    meta, launch = kernel_meta(Dqk, q.dtype, mode, device.type, windowed=windowed or chunk > 0,
                               softcap=args.softcap is not None, return_argmax=return_argmax,
                               return_gram=return_gram, return_top1_prob=return_top1_prob,
                               return_sink_mass=return_sink_mass, sink=args.sink_tokens > 0,
                               allow_tf32=allow_tf32, value_dim=D, learned_sink=learned_sink is not None,
                               bias=attn_mask is not None, per_head=args.crystal_heads is not None,
                               lowrank_rank=args.d_r)
    n_m = triton.cdiv(T, meta["BLOCK_M"])

    argmax = torch.empty((B, H, T), device=device, dtype=torch.int64) if return_argmax else None
    top1_prob = torch.empty((B, H, T), device=device, dtype=torch.float32) if return_top1_prob else None
    gram32 = torch.zeros((H, D, D), device=device, dtype=torch.float32) if return_gram else None
    sink_mass = torch.empty((B, H, T), device=device, dtype=torch.float32) if return_sink_mass else None

    # The basis is read in place through its strides (a copy only if it is not fp32); the kernel
    # masks columns >= d_r, and d_r <= min(R, D), so no padding is needed.
    basis_f32 = basis.to(device=device, dtype=torch.float32) if mode == "lowrank" else None
    vp_args = {}
    if meta["LOWRANK_VP"]:
        vp = project_values(v, basis_f32, args.d_r, meta["DR_PAD"])
        vp_args = dict(VPr=vp, stride_wb=vp.stride(0), stride_wh=vp.stride(1), stride_wt=vp.stride(2))
    sink_args = {}
    sink_f32 = None
    if args.learned_sink is not None:
        # [B, Hq, T] read through its strides (one fp32 logit per head: (0, 1, 0), not copied per row).
        sink_f32 = args.learned_sink.to(dtype=torch.float32)
        sink_args = dict(stride_lb=sink_f32.stride(0), stride_lh=sink_f32.stride(1), stride_lt=sink_f32.stride(2))
    bias_args = {}
    if attn_mask is not None:
        # fp32, converted before the broadcast is expanded (a [1, 1, Tq, Tk] mask stays that size); the expanded
        # view's stride is 0 on every broadcast dim.
        bias = attn_mask.to(torch.float32) if attn_mask.dtype != torch.bool else \
            torch.zeros(attn_mask.shape, device=device, dtype=torch.float32).masked_fill_(~attn_mask, float("-inf"))
        bias = bias.reshape((1,) * (4 - bias.dim()) + tuple(bias.shape)).expand(args.attn_mask.shape)
        bias_args = dict(Bias=bias, stride_bb=bias.stride(0), stride_bh=bias.stride(1), stride_bm=bias.stride(2),
                         stride_bn=bias.stride(3))

    per_head_args = {}
    if args.crystal_heads is not None:
        per_head_args = dict(CrystalHeads=args.crystal_heads.to(torch.int8))

    # Unused pointer arguments get a valid tensor (the kernel never dereferences them).
    dummy = out
    n_bh = B * H
    # Triton launches on the *current* CUDA device: tensors on another GPU would be read through invalid
    # pointers (an error, or silently wrong values). Every launch runs under q's device (issue 21).
    with _launch_device(device):
        for bh_off in range(0, n_bh, MAX_GRID_Y):
            grid = (n_m, min(MAX_GRID_Y, n_bh - bh_off))
            _residual_attn_fwd[grid](
                q, k, v, out,
                argmax if argmax is not None else dummy,
                top1_prob if top1_prob is not None else dummy,
                basis_f32 if basis_f32 is not None else dummy,
                gram32 if gram32 is not None else dummy,
                sink_mass if sink_mass is not None else dummy,
                sink_f32 if sink_f32 is not None else dummy,
                q.stride(0), q.stride(1), q.stride(2),
                k.stride(0), k.stride(1), k.stride(2),
                v.stride(0), v.stride(1), v.stride(2),
                stride_ob, stride_oh, stride_ot,
                H * T, T,  # argmax / top1_prob / sink_mass are contiguous [B, Hq, T]
                *(basis_f32.stride() if basis_f32 is not None else (0, 0, 0)),
                H, args.group, T, bh_off, args.d_r, args.sliding_window if windowed else 0, chunk,
                args.sink_tokens,
                args.scale, args.softcap if args.softcap is not None else 1.0,
                **meta,
                **launch,
                **bias_args,
                **sink_args,
                **per_head_args,
                **vp_args,
                T_K=T_k, q_off=q_off,
            )

    gram = gram32.double() if return_gram else None
    return ResidualAttentionResult(out, argmax, gram, top1_prob, sink_mass)

"""The launcher of the split-KV decode kernels (``nqpq_kernels.decode_kernel``): few queries against a KV cache."""

from __future__ import annotations

import torch
import triton
from torch import Tensor

from .contract import (
    OUT_LAYOUTS,
    TRITON_HEAD_DIMS,
    ResidualAttentionResult,
    check_choice,
    check_residual_attention_inputs,
)
from .decode_kernel import N_PART_PLANES, decode_combine, decode_split
from .launch import DECODE_VP_ON_CUDA, decode_plan
from .prefill import _check_backend_device, _launch_device, project_values

__all__ = ["residual_attention_decode"]


def residual_attention_decode(
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
) -> ResidualAttentionResult:
    """Residual attention of Tq <= Tk queries against a KV cache by split-KV: the same contract, keywords and result
    as ``residual_attention_triton`` (q ``[B, Hq, Tq, D]``, k and v ``[B, Hkv, Tk, D]``; query r at absolute
    position Tk − Tq + r), for few queries (dispatch picks it for Tq <= ``launch.DECODE_MAX_QUERIES``; any Tq runs).
    No ``attn_mask``: a mask decides visibility alone, which the prefill kernel's HAS_BIAS walk runs."""
    args = check_residual_attention_inputs(q, k, v, mode, basis, d_r, scale, sliding_window, softcap, sink_tokens,
                                           learned_sink, attention_chunk, attn_mask)
    check_choice("out_layout", out_layout, OUT_LAYOUTS)
    if attn_mask is not None:
        raise ValueError("the split-KV decode kernel runs the implicit (bottom-right causal) mask only; with an "
                         "attn_mask call residual_attention_triton")
    _check_backend_device(q.device)
    B, H, T, Dqk = q.shape
    Hkv, T_k = k.shape[1], k.shape[2]
    D = args.value_dim
    for width in (Dqk, D):
        if width not in TRITON_HEAD_DIMS:
            raise ValueError(f'backend="triton" supports head dims that are multiples of 16 up to 256, got D={width}')
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    device = q.device
    out_shape = (B, H, T, D) if out_layout == "bhtd" else (B, T, H, D)
    if out is None:
        out = torch.empty(out_shape, device=device, dtype=q.dtype)
    elif (not isinstance(out, Tensor) or tuple(out.shape) != out_shape or out.dtype != q.dtype
          or out.device != device or out.stride(-1) != 1):
        raise ValueError(f"out must be a {out_shape} {q.dtype} tensor on {device} with stride(-1) == 1")
    o_strides = (out.stride(0), out.stride(1), out.stride(2)) if out_layout == "bhtd" else \
        (out.stride(0), out.stride(2), out.stride(1))

    q_off = T_k - T
    windowed = args.sliding_window is not None and args.sliding_window < T_k
    chunk = args.attention_chunk or 0
    # The first key any row sees: the split grid covers [kv_lo, Tk) only (a window's or chunk's start).
    first_visible = max(0, q_off - args.sliding_window + 1) if windowed else (q_off // chunk) * chunk if chunk else 0
    sink = args.sink_tokens > 0
    plan = decode_plan(Dqk, D, q.dtype, mode, device.type, group=args.group, n_queries=T, n_keys=T_k,
                       kv_programs=B * Hkv, first_visible=first_visible, windowed=windowed or chunk > 0,
                       softcap=args.softcap is not None, return_argmax=return_argmax, return_gram=return_gram,
                       return_top1_prob=return_top1_prob, return_sink_mass=return_sink_mass, sink=sink,
                       learned_sink=args.learned_sink is not None, allow_tf32=allow_tf32,
                       lowrank_rank=args.d_r if mode == "lowrank" and (device.type != "cuda" or DECODE_VP_ON_CUDA)
                       else None)
    n_splits = plan.n_splits
    need_ctx, sink_acc = plan.split_meta["NEED_CTX"], plan.split_meta["SINK_ACC"]  # V read: P·V, Σ_S p V

    rows = B * H * T * n_splits
    f32 = dict(device=device, dtype=torch.float32)
    part_f = torch.empty((N_PART_PLANES if sink else 2, rows), **f32)
    part_i = torch.empty((2 if sink else 1, rows), device=device, dtype=torch.int32)
    vp = plan.split_meta["VP"]  # low rank through V·P_r: the partial accumulators are DR_PAD wide
    dr_pad = plan.split_meta["DR_PAD"]
    part_acc = torch.empty((rows, dr_pad if vp else D), **f32) if need_ctx else part_f
    part_acc_s = torch.empty((rows, D), **f32) if sink_acc else part_f

    argmax = torch.empty((B, H, T), device=device, dtype=torch.int64) if return_argmax else None
    top1_prob = torch.empty((B, H, T), **f32) if return_top1_prob else None
    gram32 = torch.zeros((H, D, D), **f32) if return_gram else None
    sink_mass = torch.empty((B, H, T), **f32) if return_sink_mass else None
    basis_f32 = basis.to(device=device, dtype=torch.float32) if mode == "lowrank" else None
    sink_f32 = args.learned_sink.to(torch.float32) if args.learned_sink is not None else None
    vp_args = {}
    if vp:  # the prefill launcher's product, [B, Hq, Tk, DR_PAD]: the split pass reads it, the combine gathers
        vpr = project_values(v, basis_f32, args.d_r, dr_pad)
        vp_args = dict(VPr=vpr, stride_wb=vpr.stride(0), stride_wh=vpr.stride(1), stride_wt=vpr.stride(2))
    dummy = part_f
    with _launch_device(device):
        decode_split[(B * Hkv * plan.row_blocks, n_splits)](
            q, k, v, part_f, part_i, part_acc, part_acc_s,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2),
            H, Hkv, args.group, T, T_k, q_off, plan.kv_lo, plan.split_len, n_splits,
            args.sliding_window if windowed else 0, chunk, args.sink_tokens, args.scale,
            args.softcap if args.softcap is not None else 1.0, rows,
            **plan.split_meta, **plan.split_launch, **vp_args,
        )
        decode_combine[(triton.cdiv(T, plan.block_t), B * H)](
            v, out, argmax if argmax is not None else dummy, top1_prob if top1_prob is not None else dummy,
            basis_f32 if basis_f32 is not None else dummy, gram32 if gram32 is not None else dummy,
            sink_mass if sink_mass is not None else dummy, sink_f32 if sink_f32 is not None else dummy,
            part_f, part_i, part_acc, part_acc_s,
            v.stride(0), v.stride(1), v.stride(2), *o_strides,
            *(basis_f32.stride() if basis_f32 is not None else (0, 0, 0)),
            *(sink_f32.stride() if sink_f32 is not None else (0, 0, 0)),
            H, args.group, T, n_splits, rows, args.d_r,
            **plan.combine_meta, **plan.combine_launch, **vp_args,
        )
    gram = gram32.double() if return_gram else None
    return ResidualAttentionResult(out, argmax, gram, top1_prob, sink_mass)

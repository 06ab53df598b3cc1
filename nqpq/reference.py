"""Reference (eager PyTorch) residual attention: the CPU path and the oracle for the kernel.

Same signature as ``nqpq_kernels.residual_attention_triton`` so that tests and
users can swap the two. Semantics follow EXP-Q03 exactly:

    p   = causal softmax(q kᵀ · scale)           (float32)
    i*  = argmax_j p[j]                           (first index on ties)
    ctx = p @ V,   ε = ctx − V[i*]
    top1 → V[i*];  full → ctx;  lowrank → V[i*] + P_r P_rᵀ ε
"""

from __future__ import annotations

import torch
from torch import Tensor

from .validate import check_residual_attention_inputs


def residual_attention_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    mode: str,
    basis: Tensor | None = None,
    d_r: int | None = None,
    scale: float | None = None,
    return_argmax: bool = False,
    return_gram: bool = False,
    out_layout: str = "bhtd",
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Residual attention in plain PyTorch, vectorized over batch and heads.

    Returns ``(out, argmax, gram)``: ``out`` in the input dtype, ``[B, H, T, D]``
    (or ``[B, T, H, D]`` with ``out_layout="bthd"``); ``argmax`` int64
    ``[B, H, T]`` or None; ``gram`` float64 ``[H, D, D]`` = Σ_{b,t} ε εᵀ or None.
    """
    d_r, scale = check_residual_attention_inputs(q, k, v, mode, basis, d_r, scale)
    if out_layout not in ("bhtd", "bthd"):
        raise ValueError(f"out_layout must be 'bhtd' or 'bthd', got {out_layout!r}")
    B, H, T, D = q.shape
    qf, kf, vf = q.float(), k.float(), v.float()

    # One T×T buffer for the scores, one for p; the scores are freed before p @ V.
    scores = torch.matmul(qf, kf.transpose(-1, -2)).mul_(scale)
    above_diagonal = torch.ones(T, T, dtype=torch.bool, device=q.device).triu_(1)
    scores.masked_fill_(above_diagonal, float("-inf"))
    p = torch.softmax(scores, dim=-1)
    del scores
    i_star = p.argmax(dim=-1)  # torch.argmax returns the first maximal index
    v_star = torch.gather(vf, 2, i_star.unsqueeze(-1).expand(B, H, T, D))

    need_ctx = mode != "top1" or return_gram
    ctx = torch.matmul(p, vf) if need_ctx else None
    del p

    if mode == "top1":
        out = v_star
    elif mode == "full":
        out = ctx
    else:
        eps = ctx - v_star
        P = basis[:, :, :d_r].to(device=q.device, dtype=torch.float32)  # [H, D, d_r]
        coeff = torch.einsum("bhtd,hdr->bhtr", eps, P)
        out = v_star + torch.einsum("bhtr,hdr->bhtd", coeff, P)

    gram = None
    if return_gram:
        eps64 = (ctx - v_star).double()
        gram = torch.einsum("bhti,bhtj->hij", eps64, eps64)

    out = out.to(q.dtype)
    out = out.transpose(1, 2).contiguous() if out_layout == "bthd" else out
    return out, (i_star if return_argmax else None), gram

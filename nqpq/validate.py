"""Input checks shared by every backend of residual attention.

One place decides what a valid call is, so the reference path and the Triton
kernel reject the same inputs with the same messages.
"""

from __future__ import annotations

import torch
from torch import Tensor

MODES = ("top1", "full", "lowrank")
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_residual_attention_inputs(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mode: str,
    basis: Tensor | None,
    d_r: int | None,
    scale: float | None,
) -> tuple[int, float]:
    """Validate a residual-attention call; return the resolved ``(d_r, scale)``.

    ``d_r`` resolves to 0 for ``top1``, ``D`` for ``full`` (neither reads it)
    and must be given for ``lowrank``.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be [B, H, T, D], got shape {tuple(t.shape)}")
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} dtype must be float32, float16 or bfloat16, got {t.dtype}")
    if q.shape != k.shape or q.shape != v.shape:
        raise ValueError(
            "q, k, v must have the same shape [B, H, T, D] (causal self-attention), got "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    B, H, T, D = q.shape
    if T == 0 or D == 0:
        raise ValueError(f"q, k, v must have T >= 1 and D >= 1, got shape {tuple(q.shape)}")

    if mode == "lowrank":
        if d_r is None:
            raise ValueError("mode='lowrank' needs d_r (0..D)")
        if basis is None:
            raise ValueError("mode='lowrank' needs basis [H, D, R] with R >= d_r")
    if d_r is None:
        d_r = 0 if mode == "top1" else D
    if isinstance(d_r, bool) or not isinstance(d_r, int):
        raise TypeError(f"d_r must be an int, got {type(d_r).__name__}")
    if not 0 <= d_r <= D:
        raise ValueError(f"d_r must be in 0..D (D={D}), got {d_r}")

    if basis is not None and mode == "lowrank":
        if not isinstance(basis, Tensor) or basis.dim() != 3:
            raise ValueError(f"basis must be a tensor [H, D, R], got {getattr(basis, 'shape', basis)}")
        if basis.shape[0] != H or basis.shape[1] != D:
            raise ValueError(
                f"basis must be [H={H}, D={D}, R], got {tuple(basis.shape)}"
            )
        if basis.shape[2] < d_r:
            raise ValueError(f"basis has R={basis.shape[2]} columns, fewer than d_r={d_r}")
        if not basis.is_floating_point():
            raise TypeError(f"basis must be floating point, got {basis.dtype}")
        if basis.device != q.device:
            raise ValueError(f"basis is on {basis.device} but q is on {q.device}")

    if scale is None:
        scale = D**-0.5
    scale = float(scale)
    if not scale > 0 or scale != scale:
        raise ValueError(f"scale must be a positive number, got {scale}")
    return d_r, scale

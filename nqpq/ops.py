"""The public residual-attention op and its backend dispatch."""

from __future__ import annotations

import os

from torch import Tensor

from .reference import residual_attention_reference

BACKENDS = ("auto", "torch", "triton")


def resolve_backend(backend: str, device_type: str) -> str:
    """Map ``auto`` to the Triton kernel on CUDA and the reference elsewhere."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if device_type == "cuda" else "torch"
    if backend == "triton" and device_type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(
            f"backend='triton' needs CUDA tensors (got {device_type}) or TRITON_INTERPRET=1 set before "
            "the kernel is imported; use backend='torch' for the reference path"
        )
    return backend


def residual_attention_impl(backend: str):
    """The function that runs residual attention for a resolved backend."""
    if backend == "triton":
        from nqpq_kernels import (
            residual_attention_triton,  # imported lazily: keeps CPU start-up free of Triton
        )

        return residual_attention_triton
    return residual_attention_reference


def residual_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    mode: str,
    basis: Tensor | None = None,
    d_r: int | None = None,
    scale: float | None = None,
    backend: str = "auto",
    return_argmax: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Causal residual attention, SDPA-like: q, k, v ``[B, H, T, D]`` → ``[B, H, T, D]``.

    ``mode``: ``"top1"`` → V[i*]; ``"full"`` → p @ V; ``"lowrank"`` → V[i*] + P_r P_rᵀ (p@V − V[i*])
    with ``P_r = basis[:, :, :d_r]`` (``basis`` ``[H, D, R]``, R ≥ d_r). ``scale`` defaults to D**-0.5.
    Computes in float32 and returns the input dtype. With ``return_argmax`` also returns i* ``[B, H, T]``.
    """
    impl = residual_attention_impl(resolve_backend(backend, q.device.type))
    out, i_star, _ = impl(
        q, k, v, mode=mode, basis=basis, d_r=d_r, scale=scale, return_argmax=return_argmax
    )
    return (out, i_star) if return_argmax else out

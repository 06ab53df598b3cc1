"""Fused Triton kernels for nqpq (installed as ``nqpq_kernels``)."""

from .residual_attention import MAX_GRID_Y, SUPPORTED_HEAD_DIMS, residual_attention_triton

__all__ = ["MAX_GRID_Y", "SUPPORTED_HEAD_DIMS", "residual_attention_triton"]

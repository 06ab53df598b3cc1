"""Fused Triton kernels for nqpq (installed as ``nqpq_kernels``)."""

from .residual_attention import SUPPORTED_HEAD_DIMS, residual_attention_triton

__all__ = ["SUPPORTED_HEAD_DIMS", "residual_attention_triton"]

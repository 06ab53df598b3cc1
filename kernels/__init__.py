"""Fused Triton kernels for nqpq (installed as ``nqpq_kernels``)."""

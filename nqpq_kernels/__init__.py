"""Residual attention, the op on its own: it needs torch, and triton for the fused kernel; never transformers, datasets
or the research package ``nqpq``.

- ``contract``: what a valid call is (the input checks every backend shares), ``ResidualAttentionResult``, ``MODES``;
- ``reference``: the plain PyTorch reference (float32, any device), ``residual_attention_reference``;
- ``dispatch``: ``residual_attention``, the SDPA-like op that picks a backend (the Triton kernel on CUDA);
- ``prefill``: the launcher of the fused Triton kernel, ``residual_attention_triton`` (any Tq <= Tk: a KV cache by a
  query offset); the kernel itself is ``prefill_kernel``, its key loop ``prefill_loop``, and the ``@triton.jit`` tile
  helpers it shares with the decode kernel ``tile_helpers``;
- ``decode_kernel`` / ``decode``: the split-KV decode kernels for few cached queries and their launcher,
  ``residual_attention_decode`` (the Triton backend picks it for Tq <= 16);
- ``launch``: the kernel's launch table (block sizes, warps, stages) as rules;
- ``key_mass``: ``key_mass``, the probability each row puts on one key (the first: Gu et al.'s α₁), from the op's
  argmax and top-1 probability, whatever backend computed them.

Importing the package needs neither CUDA nor Triton's driver: the kernel module is imported on first use of
``residual_attention_triton`` (or of the Triton backend), so ``TRITON_INTERPRET=1`` set before that first use still
takes effect.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .contract import MODES, OUT_LAYOUTS, TRITON_HEAD_DIMS, ResidualAttentionResult
from .dispatch import BACKENDS, residual_attention, resolve_backend
from .key_mass import key_mass
from .reference import residual_attention_reference

if TYPE_CHECKING:  # for type checkers only: at run time the kernel module loads on first use (__getattr__)
    from .prefill import MAX_GRID_Y, residual_attention_triton

# Loaded with the Triton kernel's launcher module on first access.
_LAZY = {"residual_attention_triton", "MAX_GRID_Y"}
SUPPORTED_HEAD_DIMS = TRITON_HEAD_DIMS  # every multiple of 16 up to 256

__all__ = [
    "BACKENDS", "MAX_GRID_Y", "MODES", "OUT_LAYOUTS", "ResidualAttentionResult", "SUPPORTED_HEAD_DIMS",
    "TRITON_HEAD_DIMS", "key_mass", "residual_attention", "residual_attention_reference", "residual_attention_triton",
    "resolve_backend",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from . import prefill

        return getattr(prefill, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

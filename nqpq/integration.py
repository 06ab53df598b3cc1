"""GPT-2 integration through transformers' attention interface.

``crystallize(model, layers, mode=...)`` swaps the model's attention
implementation name for ``"nqpq_<original>"``, a function registered in
``AttentionInterface`` that runs residual attention on the chosen layers and
hands every other layer to the model's original implementation (and, through
``AttentionMaskInterface``, keeps the original mask construction). No
``forward`` method is replaced; leaving the context restores the original name.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from transformers import AttentionInterface

from .ops import residual_attention_impl, resolve_backend
from .validate import MODES

try:  # transformers ≥ 4.53
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
except ImportError:  # pragma: no cover - older transformers build masks without the interface
    ALL_MASK_ATTENTION_FUNCTIONS = AttentionMaskInterface = None

_PREFIX = "nqpq_"
_SPEC_ATTR = "_nqpq_layer_spec"


@dataclass
class LayerSpec:
    """What a crystallized attention module computes."""

    layer: int
    mode: str
    basis: Tensor | None  # [H, D, R] float32 on the model's device, or None
    d_r: int | None
    backend: str
    gram_sink: object | None = None  # anything with .add(layer, gram[H, D, D] float64)
    observe: bool = False  # keep the model's own output; only feed gram_sink


def transformer_blocks(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks of a GPT-2 model (``GPT2LMHeadModel`` or ``GPT2Model``)."""
    body = getattr(model, "transformer", model)
    blocks = getattr(body, "h", None)
    if not isinstance(blocks, nn.ModuleList):
        raise TypeError(f"expected a GPT-2 model with .transformer.h blocks, got {type(model).__name__}")
    return blocks


def _check_causal_mask(mask: Tensor | None, T: int) -> None:
    """Accept no mask (causality is ours to apply) or exactly the causal mask; refuse anything else."""
    if mask is None:
        return
    allowed = mask if mask.dtype == torch.bool else mask == 0
    causal = torch.ones(T, T, dtype=torch.bool, device=mask.device).tril_()
    if allowed.shape[-2:] != (T, T) or not torch.equal(allowed, causal.expand_as(allowed)):
        raise ValueError(
            "crystallized attention supports plain causal masking only: the model was given a padding "
            "or custom attention mask. Score unpadded blocks (no attention_mask with zeros)."
        )


def _crystal_attention_for(original: str):
    """The attention function registered as ``nqpq_<original>``."""

    def attention(
        module: nn.Module,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attention_mask: Tensor | None,
        scaling: float | None = None,
        dropout: float = 0.0,
        **kwargs,
    ) -> tuple[Tensor, None]:
        spec: LayerSpec | None = getattr(module, _SPEC_ATTR, None)
        if spec is None or spec.observe:
            from transformers.models.gpt2.modeling_gpt2 import eager_attention_forward

            fallback = AttentionInterface._global_mapping.get(original, eager_attention_forward)
            result = fallback(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
            if spec is not None:  # observing: the same q, k, v through the residual op, for ε only
                _check_causal_mask(attention_mask, query.shape[2])
                impl = residual_attention_impl(resolve_backend(spec.backend, query.device.type))
                _, _, gram = impl(query, key, value, mode="top1", scale=scaling, return_gram=True)
                spec.gram_sink.add(spec.layer, gram)
            return result
        if dropout > 0.0:
            raise ValueError("crystallized attention is inference-only: call model.eval() (dropout > 0)")
        T = query.shape[2]
        if key.shape[2] != T:
            raise ValueError(
                f"crystallized attention scores whole sequences; got {T} queries for {key.shape[2]} keys "
                "(a KV cache / generation is not supported)"
            )
        _check_causal_mask(attention_mask, T)
        impl = residual_attention_impl(resolve_backend(spec.backend, query.device.type))
        out, _, gram = impl(
            query, key, value, mode=spec.mode, basis=spec.basis, d_r=spec.d_r, scale=scaling,
            return_gram=spec.gram_sink is not None, out_layout="bthd",
        )
        if gram is not None:
            spec.gram_sink.add(spec.layer, gram)
        return out, None  # [B, T, H, D], the layout transformers expects back

    return attention


def _register(original: str) -> str:
    name = _PREFIX + original
    if name not in AttentionInterface._global_mapping:
        AttentionInterface.register(name, _crystal_attention_for(original))
        if AttentionMaskInterface is not None and original in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping:
            AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS._global_mapping[original])
    return name


def _set_implementation(model: nn.Module, name: str) -> None:
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(name)
    else:  # pragma: no cover - transformers without the setter
        model.config._attn_implementation = name


@dataclass
class Crystallization:
    """A live patch: what ``uncrystallize`` needs to restore the model."""

    model: nn.Module
    original: str
    layers: tuple[int, ...]


def crystallize_layers(
    model: nn.Module,
    layers: Sequence[int],
    *,
    mode: str,
    basis: Mapping[int, Tensor] | None = None,
    d_r: int | None = None,
    backend: str = "auto",
    gram_sink: object | None = None,
) -> Crystallization:
    """Make ``layers`` of a GPT-2 model use residual attention; undo with ``uncrystallize``.

    ``basis`` maps layer → ``[H, D, R]`` (e.g. ``ResidualBasis.basis``), needed for ``lowrank``.
    ``gram_sink`` (optional) receives Σ εεᵀ of every call, for calibration.
    """
    blocks = transformer_blocks(model)
    config = model.config
    n_layer, n_head = len(blocks), config.n_head
    head_dim = config.n_embd // n_head
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    layers = tuple(layers)
    if not layers:
        raise ValueError("choose at least one layer to crystallize")
    for li in layers:
        if isinstance(li, bool) or not isinstance(li, int) or not 0 <= li < n_layer:
            raise ValueError(f"layer index {li!r} out of range: the model has layers 0..{n_layer - 1}")
    if len(set(layers)) != len(layers):
        raise ValueError(f"layer indices repeat: {layers}")
    if mode == "lowrank":
        if d_r is None or isinstance(d_r, bool) or not isinstance(d_r, int) or not 0 <= d_r <= head_dim:
            raise ValueError(f"d_r must be an int in 0..{head_dim} (the head dimension), got {d_r!r}")
        missing = [li for li in layers if basis is None or li not in basis]
        if missing:
            raise ValueError(f"mode='lowrank' needs a residual basis for layers {missing}")
    device = next(model.parameters()).device
    backend_name = resolve_backend(backend, device.type)

    original = config._attn_implementation
    if original is None or original.startswith(_PREFIX):
        raise RuntimeError("this model is already crystallized; leave the current context first")
    for li in layers:
        layer_basis = None
        if mode == "lowrank":
            layer_basis = basis[li].to(device=device, dtype=torch.float32)
            if layer_basis.shape[:2] != (n_head, head_dim):
                raise ValueError(
                    f"basis for layer {li} must be [H={n_head}, D={head_dim}, R], got {tuple(layer_basis.shape)}"
                )
        spec = LayerSpec(li, mode, layer_basis, d_r, backend_name, gram_sink)
        setattr(blocks[li].attn, _SPEC_ATTR, spec)
    _set_implementation(model, _register(original))
    return Crystallization(model, original, layers)


def uncrystallize(patch: Crystallization) -> None:
    """Restore the model exactly: original implementation name, no layer specs left."""
    for block in transformer_blocks(patch.model):
        if hasattr(block.attn, _SPEC_ATTR):
            delattr(block.attn, _SPEC_ATTR)
    _set_implementation(patch.model, patch.original)


@contextmanager
def observe_residuals(
    model: nn.Module, layers: Sequence[int], gram_sink: object, *, backend: str = "auto"
) -> Iterator[Crystallization]:
    """Collect Σ εεᵀ of ``layers`` into ``gram_sink`` while the model computes exactly its own attention."""
    patch = crystallize_layers(model, layers, mode="top1", backend=backend, gram_sink=gram_sink)
    for li in patch.layers:
        getattr(transformer_blocks(model)[li].attn, _SPEC_ATTR).observe = True
    try:
        yield patch
    finally:
        uncrystallize(patch)


@contextmanager
def crystallize(
    model: nn.Module,
    layers: Sequence[int],
    *,
    mode: str,
    basis: Mapping[int, Tensor] | None = None,
    d_r: int | None = None,
    backend: str = "auto",
    gram_sink: object | None = None,
) -> Iterator[Crystallization]:
    """Context manager form of ``crystallize_layers`` / ``uncrystallize``."""
    patch = crystallize_layers(
        model, layers, mode=mode, basis=basis, d_r=d_r, backend=backend, gram_sink=gram_sink
    )
    try:
        yield patch
    finally:
        uncrystallize(patch)

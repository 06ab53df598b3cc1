"""What a crystallized attention module carries while it is patched (``nqpq.model.crystallize``): its
``LayerSpec`` (mode, basis, backend, the accumulators it feeds), the ``Observer``s that watch its calls, how a
call's results feed those accumulators, and the forward hooks that keep its per-forward state.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field

from torch import Tensor, nn


@dataclass
class LayerSpec:
    """What a crystallized attention module computes, and what to restore afterwards."""

    layer: int
    mode: str
    basis: Tensor | None  # [Hq, D, R] float32 on the layer's execution device (device maps), or None
    d_r: int | None
    backend: str
    original: str  # the model-wide attention implementation name
    config: object  # the module's own config, put back by uncrystallize
    gram_acc: object | None = None  # anything with .add(layer, gram[Hq, D, D] float64)
    # anything with .add(layer, argmax[B, Hq, T], top1_prob[B, Hq, T], [sink_mass,] first_key_mass=[B, Hq, T])
    stats_acc: object | None = None
    observe: bool = False  # keep the model's own output; only feed the accumulators
    sink_tokens: int = 0  # the first keys kept exactly in the ground state (nqpq.residual_attention)
    observers: tuple[Observer, ...] = ()  # with observe: one op call per observer, each feeding its accumulators
    # The (query, key) of the module's calls in its current forward: a call on the same q and k as an earlier one
    # is another part of V of the same attention (DiffLlama), and feeds no statistics. Reset by a forward pre-hook.
    calls: list[tuple[Tensor, Tensor]] = field(default_factory=list)
    hooks: list = field(default_factory=list)  # the module's forward hooks, removed by uncrystallize
    # The attention mask the module itself was given in its current forward (None if none), set by its forward
    # pre-hook: a mask the module hands its attention function that is not this one is the module's own making
    # (Doge's dynamic mask, Qwen4-exp's key selection, DeepSeek V4's compressed keys), accepted as it is when this
    # one, the model's, is plain causal (never a padding mask).
    received_mask: Tensor | None = None
    # Llama 4's chunked layers: query i sees keys j <= i with j // C == i // C. Not an argument the model passes
    # (it is in the mask it builds), so read from the layer's geometry; the mask is checked against it.
    attention_chunk: int | None = None
    # The position_ids the module itself was given in its current forward (None if none), set by its forward
    # pre-hook: the queries' positions where a family does not pass them on to its attention function.
    received_positions: Tensor | None = None
    # Per-head crystallization: bool [Hq] on the layer's device, True for the heads that run ``mode``, False for plain
    # attention (the op's ``crystal_heads``); None: every head.
    heads: Tensor | None = None


@dataclass(frozen=True)
class Observer:
    """One observation of a layer's attention: the op run with ``sink_tokens`` on the q, k, v the layer received,
    its Σ εεᵀ fed to ``gram_acc`` and its argmax / top-1 probability / sink mass to ``stats_acc``."""

    sink_tokens: int = 0
    gram_acc: object | None = None  # anything with .add(layer, gram[Hq, D, D] float64)
    stats_acc: object | None = None  # anything with .add(layer, argmax, top1_prob, [sink_mass,] first_key_mass=...)


def _forget_calls(spec: LayerSpec):
    """A forward (pre-)hook emptying ``spec.calls``: the q/k it held belong to the forward that ended."""
    def forget(*_) -> None:
        spec.calls.clear()
        spec.received_mask = None
        spec.received_positions = None
    return forget


def _receive_mask(spec: LayerSpec, module: nn.Module):
    """A forward pre-hook recording in ``spec.received_mask`` the attention mask the module is called with."""
    signature = inspect.signature(module.forward)

    def receive(_module, args, kwargs) -> None:
        try:
            mask = signature.bind_partial(*args, **kwargs).arguments.get("attention_mask")
        except TypeError:  # a call its signature does not describe: read the keyword
            mask = kwargs.get("attention_mask")
        spec.received_mask = mask if isinstance(mask, Tensor) else None
        pos = kwargs.get("position_ids")
        spec.received_positions = pos if isinstance(pos, Tensor) else None
    return receive

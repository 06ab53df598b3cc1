"""Crystallized attention inside any decoder-only transformers model, through its attention interface.

``crystallize(model, layers, mode=...)`` gives the attention module of each chosen layer its own copy of
the config whose implementation name is ``"nqpq_<original>"``, a function registered in
``AttentionInterface`` that runs residual attention (``nqpq.model.crystal_attention``: what it computes, the masks and
arguments it accepts). The model-wide name is left alone, so every other layer, the mask construction, and the
model's own special paths (GPT-2's ``reorder_and_upcast_attn``, which it takes only when the name is exactly
``"eager"``; the flash wrappers, which read the name to load a kernel) stay exactly as they were. No ``forward`` is
replaced; leaving the context restores each module's own config.

A layer may run several self-attention modules (LongCat-Flash: two attention blocks per layer; see
``ModelParts.attention_modules``): crystallizing the layer crystallizes each, with the layer's mode and basis, each
module's calls attentions of their own (statistics fed per call, every ε joining the layer's Gram), as are the
repeated calls of a module run more than once per forward (HRM's recurrent stacks).

What a patched module carries (``LayerSpec``, ``Observer``, its hooks) is in ``nqpq.model.layer_spec``; the checks of
the arguments and masks a model hands its attention function in ``nqpq.model.attention_args``.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from nqpq_kernels.contract import MODES, check_choice
from nqpq_kernels.dispatch import resolve_backend

from .crystal_attention import SPEC_ATTR, register_attention
from .devices import execution_device
from .geometry import LayerGeometry
from .layer_spec import LayerSpec, Observer, _forget_calls, _receive_mask
from .parts import ModelParts, as_index, layer_heads, model_parts


def check_sink_tokens(sink_tokens: object) -> int:
    """``sink_tokens`` as an int >= 0 (numpy/torch integers accepted; bools and floats refused by type)."""
    n = as_index(sink_tokens, "sink_tokens")
    if n < 0:
        raise ValueError(f"sink_tokens must be >= 0 (keys j < sink_tokens are the sink), got {n}")
    return n


@dataclass
class Crystallization:
    """A live patch: what ``uncrystallize`` needs to restore the model."""

    model: nn.Module
    original: str
    layers: tuple[int, ...]
    parts: ModelParts  # the model's parts, as crystallize_layers found them
    # layer → the query heads crystallized (sorted), None where every head is
    heads: dict[int, tuple[int, ...] | None] = field(default_factory=dict)


def crystallize_layers(
    model: nn.Module,
    layers: Sequence[int] | Mapping[int, Sequence[int]],
    *,
    mode: str,
    basis: Mapping[int, Tensor] | None = None,
    d_r: int | None = None,
    backend: str = "auto",
    gram_acc: object | None = None,
    stats_acc: object | None = None,
    observe: bool = False,
    sink_tokens: int = 0,
    observers: Sequence[Observer] = (),
    parts: ModelParts | None = None,
) -> Crystallization:
    """Make ``layers`` of a decoder-only model use residual attention; undo with ``uncrystallize``.

    ``layers`` is a list of layer indices, every head of each crystallized, or a mapping layer → query heads
    (``{25: [0, 1]}``: heads 0 and 1 of layer 25 run ``mode``, its other heads plain attention, in the same op call;
    every head's statistics and Gram still feed the sinks). Anything read otherwise (nested lists, repeats, bools,
    out of range, an empty list of heads) is refused with a ``LayerChoiceError`` (an ``NqpqError`` and a
    ``ValueError``) naming it (``nqpq.model.parts.layer_heads``).

    ``basis`` maps layer → ``[Hq, Dv, R]`` (e.g. ``ResidualBasis.basis``; Dv the layer's value width, which
    multi-head latent attention makes differ from q/k's), needed for ``lowrank``; ``d_r`` is at most each
    chosen layer's Dv. Learned attention sinks (``s_aux``) go to the op as ``learned_sink``.
    ``gram_acc`` (optional) receives Σ εεᵀ of every call, for calibration; ``stats_acc`` the argmax and
    top-1 probability. ``observe=True`` keeps the model's own attention output (only the accumulators are fed).
    ``sink_tokens=n`` keeps the first n keys exactly in the ground state (``nqpq.residual_attention``; 0 is the
    spec). With ``observe=True``, ``observers`` lists further observations of the same attention calls (e.g. one
    per sink setting); ``gram_acc``/``stats_acc`` are then the first, with ``sink_tokens``.
    Everything is checked before anything is attached: a refused call leaves the model as it was.
    With ``output_attentions=True`` a crystallized layer of an eager model reports its probabilities p (the
    softmax of its masked, scaled, soft-capped scores); under other implementations, whose layers report no
    weights, it refuses rather than shift the layer indices of the attentions tuple.
    ``parts``: the model's ``model_parts``, when the caller has them already (a run finds them once); found here
    otherwise.
    """
    if parts is None:
        parts = model_parts(model)
    check_choice("mode", mode, MODES)
    chosen_heads = layer_heads(layers, parts.n_layers, parts.query_heads)
    layers = tuple(chosen_heads)
    parts.check_attention_layers(layers)
    if mode == "lowrank":
        if d_r is not None:
            d_r = as_index(d_r, "d_r")
        D = parts.smallest("v_dim", layers)
        if d_r is None or not 0 <= d_r <= D:
            raise ValueError(f"d_r must be an int in 0..{D} (the value head dimension D_v"
                             f"{' of the narrowest chosen layer' if parts.largest('v_dim', layers) > D else ''}), "
                             f"got {d_r!r}")
        missing = [li for li in layers if basis is None or li not in basis]
        if missing:
            raise ValueError(f"mode='lowrank' needs a residual basis for layers {missing}")
    if any(hasattr(a, SPEC_ATTR) for li in parts.attn_layers for a in parts.attention_modules(li)):
        raise RuntimeError("this model is already crystallized; leave the current context first")
    n_sink = check_sink_tokens(sink_tokens)
    watchers = tuple(observers)
    if observe:
        if gram_acc is not None or stats_acc is not None:
            watchers = (Observer(n_sink, gram_acc, stats_acc), *watchers)
        for ob in watchers:
            if not isinstance(ob, Observer):
                raise TypeError(f"observers must be nqpq.model.crystallize.Observer, got {type(ob).__name__}")
            check_sink_tokens(ob.sink_tokens)
    elif watchers:
        raise ValueError("observers are for observe=True (a crystallized layer feeds gram_acc/stats_acc itself)")
    original = model.config._attn_implementation
    if original is None:
        raise RuntimeError("the model has no attention implementation set (config._attn_implementation is None)")
    specs = {}
    for li in layers:
        # Each layer computes on its own device under a device map (nqpq.model.devices): its basis lives there and
        # its backend is resolved for it (a map over cuda and cpu runs the kernel on one, the reference on the other).
        device = execution_device(parts.attn[li])
        geo = parts.geometry[li]
        Hq, D = geo.n_heads, geo.v_dim
        backend_name = _layer_backend(backend, device.type, geo)
        layer_basis = None
        if mode == "lowrank":
            if not isinstance(basis[li], Tensor):
                raise TypeError(f"basis for layer {li} must be a torch.Tensor, got {type(basis[li]).__name__}")
            layer_basis = basis[li].to(device=device, dtype=torch.float32)
            if layer_basis.dim() != 3 or layer_basis.shape[:2] != (Hq, D) or layer_basis.shape[2] < d_r:
                raise ValueError(
                    f"basis for layer {li} must be [H={Hq}, D={D}, R] with R >= d_r={d_r} (D: the value head "
                    f"width D_v), got {tuple(layer_basis.shape)}"
                )
        specs[li] = LayerSpec(li, mode, layer_basis, d_r, backend_name, original, parts.attn[li].config,
                              gram_acc, stats_acc, observe, n_sink, watchers, attention_chunk=geo.attention_chunk,
                              heads=_head_flags(chosen_heads[li], Hq, device))

    # Nothing can fail past this point but the copies themselves; any exception undoes what was attached.
    name = register_attention(original)
    patch = Crystallization(model, original, layers, parts, chosen_heads)
    try:
        for li, layer_spec in specs.items():
            # A layer of several self-attentions (LongCat-Flash's two blocks): each module its own spec (its config
            # to restore, its calls), the same layer, mode and basis.
            for k, attn in enumerate(parts.attention_modules(li)):
                spec = layer_spec if k == 0 else dataclasses.replace(layer_spec, config=attn.config, calls=[], hooks=[])
                own = copy.deepcopy(attn.config)
                own._attn_implementation = name
                setattr(attn, SPEC_ATTR, spec)
                attn.config = own
                # Each forward of the module starts (and ends) with no calls seen: see LayerSpec.calls.
                spec.hooks = [attn.register_forward_pre_hook(_forget_calls(spec)),
                              attn.register_forward_hook(_forget_calls(spec)),
                              attn.register_forward_pre_hook(_receive_mask(spec, attn), with_kwargs=True)]
    except BaseException:
        uncrystallize(patch)
        raise
    return patch


def _head_flags(heads: tuple[int, ...] | None, n_heads: int, device: torch.device) -> Tensor | None:
    """The op's ``crystal_heads`` for a layer: bool ``[Hq]`` on its device, True for the chosen query heads; None
    where every head is chosen (the all-heads path)."""
    if heads is None or len(heads) == n_heads:
        return None
    flags = torch.zeros(n_heads, dtype=torch.bool)
    flags[list(heads)] = True
    return flags.to(device)


def _layer_backend(backend: str, device_type: str, geo: LayerGeometry) -> str:
    """The backend for one layer: the kernel only where it takes both its widths (q/k and v)."""
    return resolve_backend(backend, device_type, geo.qk_dim, geo.v_dim)


def uncrystallize(patch: Crystallization) -> None:
    """Restore the model exactly: each crystallized module's own config back, no layer specs left."""
    parts = patch.parts
    for attn in (a for li in parts.attn_layers for a in parts.attention_modules(li)):
        spec = getattr(attn, SPEC_ATTR, None)
        if spec is not None:
            attn.config = spec.config
            for handle in spec.hooks:
                handle.remove()
            spec.calls.clear()
            delattr(attn, SPEC_ATTR)


@contextmanager
def observe_residuals(
    model: nn.Module,
    layers: Sequence[int],
    gram_acc: object | None,
    *,
    backend: str = "auto",
    stats_acc: object | None = None,
    sink_tokens: int = 0,
    observers: Sequence[Observer] = (),
    parts: ModelParts | None = None,
) -> Iterator[Crystallization]:
    """Collect Σ εεᵀ of ``layers`` into ``gram_acc`` (and, with ``stats_acc``, each call's argmax and top-1
    probability, and sink mass) while the model computes exactly its own attention. ``sink_tokens`` is the
    op's for these accumulators; ``observers`` adds further observations of the same calls (another sink setting
    each)."""
    if gram_acc is None and stats_acc is None and not observers:
        raise ValueError("observe_residuals needs a gram_acc, a stats_acc, or observers")
    patch = crystallize_layers(model, layers, mode="top1", backend=backend, gram_acc=gram_acc,
                               stats_acc=stats_acc, observe=True, sink_tokens=sink_tokens, observers=observers,
                               parts=parts)
    try:
        yield patch
    finally:
        uncrystallize(patch)


@contextmanager
def crystallize(
    model: nn.Module,
    layers: Sequence[int] | Mapping[int, Sequence[int]],
    *,
    mode: str,
    basis: Mapping[int, Tensor] | None = None,
    d_r: int | None = None,
    backend: str = "auto",
    gram_acc: object | None = None,
    stats_acc: object | None = None,
    sink_tokens: int = 0,
    parts: ModelParts | None = None,
) -> Iterator[Crystallization]:
    """Context manager form of ``crystallize_layers`` / ``uncrystallize``: ``layers`` a list of layers (every head)
    or a mapping layer → query heads (the others plain attention)."""
    patch = crystallize_layers(
        model, layers, mode=mode, basis=basis, d_r=d_r, backend=backend, gram_acc=gram_acc,
        stats_acc=stats_acc, sink_tokens=sink_tokens, parts=parts,
    )
    try:
        yield patch
    finally:
        uncrystallize(patch)

"""Crystallized attention inside any decoder-only transformers model, through its attention interface.

``crystallize(model, layers, mode=...)`` gives the attention module of each chosen layer its own copy of
the config whose implementation name is ``"nqpq_<original>"``, a function registered in
``AttentionInterface`` that runs residual attention. The model-wide name is left alone, so every other
layer, the mask construction, and the model's own special paths (GPT-2's ``reorder_and_upcast_attn``,
which it takes only when the name is exactly ``"eager"``; the flash wrappers, which read the name to load
a kernel) stay exactly as they were. No ``forward`` is replaced; leaving the context restores each
module's own config.

The function accepts exactly the masks meaning "causal", "causal plus this layer's sliding window" or "causal
in this layer's chunks" (Llama 4's chunked layers: the chunk size is read from the layer's geometry), over the keys of
a KV cache (dynamic, sliding-window past the window, static) and the non-pad keys of a left- or right-padded batch
(``nqpq.model.cache_layout`` reads the positions and hands the op an explicit mask only where it is needed),
grouped-query k/v (handed to the op with their Hkv heads, never repeated), Gemma 2's ``softcap``, the
model's ``scaling``, q/k and v of different widths (multi-head latent attention: the basis and the Gram live
in v's width), learned attention sinks (``s_aux``: gpt-oss, Granite SWA, MiMo-V2-Flash, Flint; handed to the op
as ``learned_sink``) and DeepSeek V3.2's sparse ``indices`` where they select every key (dense attention); any
other argument that would change the math is refused by name.

A layer may run several self-attention modules (LongCat-Flash: two attention blocks per layer; see
``ModelParts.attention_modules``): crystallizing the layer crystallizes each, with the layer's mode and basis, each
module's calls attentions of their own (statistics fed per call, every ε joining the layer's Gram), as are the
repeated calls of a module run more than once per forward (HRM's recurrent stacks).

A module may call its attention function more than once per forward on the same q and k (DiffLlama: once per
half of V). Those calls are one attention with one softmax and one argmax, and each call's V is a part of the
layer's value: its output is exact per call (full, top-1, low-rank with the layer's basis), each call's ε
joins the layer's Gram (the basis shared by the parts fits all of them), and the statistics (argmax, top-1
probability, sink mass: the same for every part) are fed once, from the first call.

What a patched module carries (``LayerSpec``, ``Observer``, its hooks) is in ``nqpq.model.layer_spec``; the checks of
the arguments and masks a model hands its attention function in ``nqpq.model.attention_args``.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from nqpq_kernels.contract import MODES, check_choice
from nqpq_kernels.dispatch import residual_attention_impl, resolve_backend

from ..errors import UnsupportedModelError
from .attention_args import (
    _attentions_requested,
    _check_dense,
    _check_kwargs,
    _learned_sink,
    _mask_window,
    _plain_mask,
    _probabilities,
    _score_mask,
)
from .cache_layout import CallLayout, call_backend, call_layout, feed, first_key_mass, run_op
from .devices import execution_device
from .geometry import LayerGeometry
from .layer_spec import LayerSpec, Observer, _forget_calls, _receive_mask
from .parts import ModelParts, as_index, layer_heads, model_parts

_PREFIX = "nqpq_"
_SPEC_ATTR = "_nqpq_layer_spec"


def check_sink_tokens(sink_tokens: object) -> int:
    """``sink_tokens`` as an int >= 0 (numpy/torch integers accepted; bools and floats refused by type)."""
    n = as_index(sink_tokens, "sink_tokens")
    if n < 0:
        raise ValueError(f"sink_tokens must be >= 0 (keys j < sink_tokens are the sink), got {n}")
    return n


def _module_eager(module: nn.Module):
    """The eager attention function the module's own code falls back to (each family has its own)."""
    fn = inspect.unwrap(type(module).forward).__globals__.get("eager_attention_forward")
    if fn is None:
        raise UnsupportedModelError(f"{type(module).__name__}: no eager_attention_forward next to its forward")
    return fn


def _own_attention(module: nn.Module, spec: LayerSpec, query, key, value, attention_mask, scaling, dropout, kwargs):
    """Exactly what the module computes uncrystallized, under its own config."""
    nqpq_config = module.config
    module.config = spec.config  # e.g. the flash wrappers read module.config._attn_implementation
    try:
        if spec.original == "eager" and getattr(module, "reorder_and_upcast_attn", False):
            # GPT-2 takes its upcast path instead of the interface when the name is exactly "eager".
            return module._upcast_and_reordered_attn(query, key, value, attention_mask)
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        fn = ALL_ATTENTION_FUNCTIONS.get_interface(spec.original, _module_eager(module))
        return fn(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    finally:
        module.config = nqpq_config


def _crystal_attention(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[Tensor, Tensor | None]:
    """The function registered as ``nqpq_<original>``: residual attention for the module's LayerSpec."""
    spec: LayerSpec | None = getattr(module, _SPEC_ATTR, None)
    if spec is None:
        raise RuntimeError(f"{type(module).__name__} carries nqpq's attention config but no layer spec")
    _check_kwargs(module, kwargs)
    window, softcap = kwargs.get("sliding_window"), kwargs.get("softcap")
    learned_sink = _learned_sink(module, kwargs, query)
    B, _, T, _ = query.shape
    Tk = key.shape[2]
    chunk = spec.attention_chunk
    position_bias = kwargs.get("position_bias")
    if window is None and chunk is None and attention_mask is not None and attention_mask is spec.received_mask:
        window = _mask_window(attention_mask, T)  # a window only the model's mask holds (BLT's local layers)
    own = (attention_mask is not None and attention_mask is not spec.received_mask
           and not (Tk == T and _plain_mask(attention_mask, T, window, chunk)))
    layout = None
    if own or position_bias is not None:  # a mask or a bias of the module's own making: whole sequences only
        attn_mask = _score_mask(module, spec, attention_mask, position_bias, T, Tk, window, chunk)
        if attn_mask is not None:  # the mask alone decides visibility: it holds the window / chunk already
            window = chunk = None
    else:  # the model's mask: causal, with a KV cache, a static cache and / or padding (nqpq.model.cache_layout)
        attn_mask = None
        layout = call_layout(attention_mask, B, T, Tk, window, chunk, _position_ids(kwargs, spec))
    _check_dense(module, kwargs.get("indices"), T)
    cached = layout is not None and layout.mask is None and T < layout.n_keys
    impl = residual_attention_impl(call_backend(spec.backend, query, value, cached))
    # Another part of V of an attention already counted in this forward (DiffLlama): the same argmax, top-1
    # probability and sink mass, so no statistics; its ε still joins the Gram.
    repeat = any(q is query and k is key for q, k in spec.calls)
    spec.calls.append((query, key))
    stats = spec.stats_acc is not None and not repeat
    common = dict(scale=scaling, sliding_window=window, softcap=softcap, attention_chunk=chunk, attn_mask=attn_mask,
                  learned_sink=learned_sink)
    if spec.observe:  # the model's own output, bit for bit; the same q, k, v through the op for the sinks
        result = _own_attention(module, spec, query, key, value, attention_mask, scaling, dropout, kwargs)
        for ob in spec.observers:
            watch = ob.stats_acc is not None and not repeat
            if ob.gram_acc is None and not watch:
                continue
            _check_positions(module, spec, layout, kwargs, T, ob.sink_tokens, watch)
            res = run_op(impl, layout, query, key, value, ob.sink_tokens, common, mode="top1",
                          return_gram=ob.gram_acc is not None, return_argmax=watch, return_top1_prob=watch,
                          return_sink_mass=watch and (ob.sink_tokens > 0 or learned_sink is not None))
            first_key = first_key_mass(query, key, res, layout, common) if watch else None
            feed(spec.layer, ob.gram_acc, ob.stats_acc if watch else None, res, layout, first_key)
        return result
    if dropout > 0.0:
        raise ValueError("crystallized attention is inference-only: call model.eval() (dropout > 0)")
    _check_positions(module, spec, layout, kwargs, T, spec.sink_tokens, stats)
    weights = None
    if _attentions_requested(kwargs):
        if spec.original != "eager":
            raise ValueError(
                f"output_attentions=True: the model's '{spec.original}' attention returns no weights, so the "
                "attentions tuple would skip layers; load the model with attn_implementation='eager'"
            )
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5  # the op's default too
        weights = _layout_probabilities(query, key, scale, window, softcap, learned_sink, chunk, attn_mask, layout)
    res = run_op(
        impl, layout, query, key, value, spec.sink_tokens, common, mode=spec.mode, basis=spec.basis, d_r=spec.d_r,
        crystal_heads=spec.heads, return_gram=spec.gram_acc is not None, return_argmax=stats, return_top1_prob=stats,
        return_sink_mass=stats and (spec.sink_tokens > 0 or learned_sink is not None), out_layout="bthd",
    )
    first_key = first_key_mass(query, key, res, layout, common) if stats else None
    feed(spec.layer, spec.gram_acc, spec.stats_acc if stats else None, res, layout, first_key)
    return res.out, weights  # [B, T, Hq, Dv], the layout transformers expects back


def _position_ids(kwargs: dict, spec: LayerSpec) -> Tensor | None:
    """The queries' positions in their own sequences, where the model passes them (to the attention function, or
    to the module's forward)."""
    pos = kwargs.get("position_ids")
    return pos if isinstance(pos, Tensor) else spec.received_positions


def _check_positions(module: nn.Module, spec: LayerSpec, layout: CallLayout | None, kwargs: dict, T: int,
                     sink_tokens: int, stats: bool) -> None:
    """Refuse a cached call of a windowed or chunked layer whose positions cannot be read: a sliding cache drops
    keys, so its slots are not positions, and without ``position_ids`` the sink keys, the chunks and the statistics
    (which read positions) would be wrong."""
    if layout is None or T == layout.n_keys or _position_ids(kwargs, spec) is not None:
        return
    if (kwargs.get("sliding_window") is not None or spec.attention_chunk is not None) and (
            sink_tokens > 0 or stats or spec.attention_chunk is not None):
        raise ValueError(
            f"{type(module).__name__} passes no position_ids with a KV cache on a windowed layer: a sliding cache "
            "drops keys, so nqpq cannot read the positions that sink_tokens, chunks and statistics need"
        )


def _layout_probabilities(query: Tensor, key: Tensor, scale: float, window: int | None, softcap: float | None,
                          learned_sink: Tensor | None, chunk: int | None, attn_mask: Tensor | None,
                          layout: CallLayout | None) -> Tensor:
    """``_probabilities`` on the call's layout: [B, Hq, T, Tk], zero on the key slots after the last query's."""
    if layout is None:
        return _probabilities(query, key, scale, window, softcap, learned_sink, chunk, attn_mask)
    p = _probabilities(query, key[:, :, :layout.n_keys], scale, layout.window, softcap, learned_sink, layout.chunk,
                       layout.mask)
    p = p.nan_to_num(0.0)  # pad queries (no visible key): no probabilities
    return torch.nn.functional.pad(p, (0, key.shape[2] - layout.n_keys))


def _register(original: str) -> str:
    # Imported here, not at module level: transformers probes a package named "kernels" while it imports,
    # and from a checkout of this repository that is our kernel folder, which imports nqpq.
    from transformers import AttentionInterface

    name = _PREFIX + original
    if name not in AttentionInterface._global_mapping:
        AttentionInterface.register(name, _crystal_attention)
    return name


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
    if any(hasattr(a, _SPEC_ATTR) for li in parts.attn_layers for a in parts.attention_modules(li)):
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
    name = _register(original)
    patch = Crystallization(model, original, layers, parts, chosen_heads)
    try:
        for li, layer_spec in specs.items():
            # A layer of several self-attentions (LongCat-Flash's two blocks): each module its own spec (its config
            # to restore, its calls), the same layer, mode and basis.
            for k, attn in enumerate(parts.attention_modules(li)):
                spec = layer_spec if k == 0 else dataclasses.replace(layer_spec, config=attn.config, calls=[], hooks=[])
                own = copy.deepcopy(attn.config)
                own._attn_implementation = name
                setattr(attn, _SPEC_ATTR, spec)
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
        spec = getattr(attn, _SPEC_ATTR, None)
        if spec is not None:
            attn.config = spec.config
            for handle in spec.hooks:
                handle.remove()
            spec.calls.clear()
            delattr(attn, _SPEC_ATTR)


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

"""The attention function a crystallized module runs: ``crystal_attention``, registered in transformers'
``AttentionInterface`` as ``"nqpq_<original>"`` (``register_attention``), residual attention for the module's
``LayerSpec`` (``nqpq.model.crystallize`` attaches the spec and points the module's own config at that name).

The function accepts exactly the masks meaning "causal", "causal plus this layer's sliding window" or "causal
in this layer's chunks" (Llama 4's chunked layers: the chunk size is read from the layer's geometry), over the keys of
a KV cache (dynamic, sliding-window past the window, static) and the non-pad keys of a left- or right-padded batch
(``nqpq.model.cache_layout`` reads the positions and hands the op an explicit mask only where it is needed),
grouped-query k/v (handed to the op with their Hkv heads, never repeated), Gemma 2's ``softcap``, the
model's ``scaling``, q/k and v of different widths (multi-head latent attention: the basis and the Gram live
in v's width), learned attention sinks (``s_aux``: gpt-oss, Granite SWA, MiMo-V2-Flash, Flint; handed to the op
as ``learned_sink``) and DeepSeek V3.2's sparse ``indices`` where they select every key (dense attention); any
other argument that would change the math is refused by name.

A module may call its attention function more than once per forward on the same q and k (DiffLlama: once per
half of V). Those calls are one attention with one softmax and one argmax, and each call's V is a part of the
layer's value: its output is exact per call (full, top-1, low-rank with the layer's basis), each call's ε
joins the layer's Gram (the basis shared by the parts fits all of them), and the statistics (argmax, top-1
probability, sink mass: the same for every part) are fed once, from the first call. An observing module
(``observe=True``) returns the model's own attention output, bit for bit, and runs the op beside it for the sinks.

The checks of the arguments and masks a model hands its attention function are in ``nqpq.model.attention_args``.
"""

from __future__ import annotations

import inspect

import torch
from torch import Tensor, nn

from nqpq_kernels.dispatch import residual_attention_impl

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
from .layer_spec import LayerSpec

_PREFIX = "nqpq_"
SPEC_ATTR = "_nqpq_layer_spec"  # the attribute of a patched module holding its LayerSpec


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


def crystal_attention(
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
    spec: LayerSpec | None = getattr(module, SPEC_ATTR, None)
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


def register_attention(original: str) -> str:
    """The name of ``crystal_attention`` registered for a model whose attention implementation is ``original``
    (``"nqpq_<original>"``), registered once."""
    # Imported here, not at module level: transformers probes a package named "kernels" while it imports,
    # and from a checkout of this repository that is our kernel folder, which imports nqpq.
    from transformers import AttentionInterface

    name = _PREFIX + original
    if name not in AttentionInterface._global_mapping:
        AttentionInterface.register(name, crystal_attention)
    return name

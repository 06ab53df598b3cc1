"""Crystallized attention inside any decoder-only transformers model, through its attention interface.

``crystallize(model, layers, mode=...)`` gives the attention module of each chosen layer its own copy of
the config whose implementation name is ``"nqpq_<original>"``, a function registered in
``AttentionInterface`` that runs residual attention. The model-wide name is left alone, so every other
layer, the mask construction, and the model's own special paths (GPT-2's ``reorder_and_upcast_attn``,
which it takes only when the name is exactly ``"eager"``; the flash wrappers, which read the name to load
a kernel) stay exactly as they were. No ``forward`` is replaced; leaving the context restores each
module's own config.

The function accepts exactly the masks meaning "causal", "causal plus this layer's sliding window" or "causal
in this layer's chunks" (Llama 4's chunked layers: the chunk size is read from the layer's geometry),
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
from nqpq_kernels.reference import _hidden_keys, visible_keys

from ..errors import UnsupportedModelError
from .devices import execution_device
from .geometry import LayerGeometry
from .parts import as_index, layer_heads, model_parts

_PREFIX = "nqpq_"
_SPEC_ATTR = "_nqpq_layer_spec"

# Arguments the models hand their attention function that do not change what a causal self-attention over
# whole, unpadded sequences computes. Anything else with a value is refused by name (packed-sequence
# ``cu_seq_lens_*``, ...): never silently ignored.
_NEUTRAL_KWARGS = frozenset({
    "position_ids", "use_cache", "cache_position", "output_attentions", "output_hidden_states", "return_dict",
    "past_key_values", "cache", "layer_idx",
    "logits_to_keep",  # which positions the LM head keeps: passed down with the model's kwargs by some families
})
# s_aux / sinks: learned sink logits, [Hq] (gpt-oss's s_aux) or [B, Hq, T, 1] (Inkling 2's per-row sinks), the op's
# learned_sink; indices: DeepSeek V3.2's / GLM-DSA's selected keys
# per row [B, T, k], passed when the implementation name is not eager/sdpa (ours): dense when k >= T;
# position_bias: an additive score bias [B, Hq, T, Tk] (Inkling's relative logits), part of the op's attn_mask.
_HANDLED_KWARGS = frozenset({"sliding_window", "softcap", "is_causal", "s_aux", "sinks", "indices", "position_bias"})


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
    gram_sink: object | None = None  # anything with .add(layer, gram[Hq, D, D] float64)
    stats_sink: object | None = None  # anything with .add(layer, argmax[B, Hq, T], top1_prob[B, Hq, T])
    observe: bool = False  # keep the model's own output; only feed the sinks
    sink_tokens: int = 0  # the first keys kept exactly in the ground state (nqpq.residual_attention)
    observers: tuple[Observer, ...] = ()  # with observe: one op call per observer, each feeding its sinks
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
    # Per-head crystallization: bool [Hq] on the layer's device, True = the head runs ``mode``, False = plain
    # attention (the op's ``crystal_heads``); None: every head.
    heads: Tensor | None = None


@dataclass(frozen=True)
class Observer:
    """One observation of a layer's attention: the op run with ``sink_tokens`` on the q, k, v the layer received,
    its Σ εεᵀ fed to ``gram_sink`` and its argmax / top-1 probability / sink mass to ``stats_sink``."""

    sink_tokens: int = 0
    gram_sink: object | None = None  # anything with .add(layer, gram[Hq, D, D] float64)
    stats_sink: object | None = None  # anything with .add(layer, argmax, top1_prob, sink_mass)


def check_sink_tokens(sink_tokens: object) -> int:
    """``sink_tokens`` as an int >= 0 (numpy/torch integers accepted; bools and floats refused by type)."""
    n = as_index(sink_tokens, "sink_tokens")
    if n < 0:
        raise ValueError(f"sink_tokens must be >= 0 (keys j < sink_tokens are the sink), got {n}")
    return n


def _check_mask(mask: Tensor | None, T: int, window: int | None, chunk: int | None = None) -> None:
    """Accept no mask, or exactly the causal (+ window, or + chunk) mask the layer computes; refuse anything else."""
    if mask is None:  # causality (and the window or the chunk, the layer's own) is ours to apply
        return
    if mask.dim() == 2:  # a flash-style [B, T] key mask: only "no padding" is accepted
        if mask.shape[-1] == T and bool(mask.bool().all()):
            return
    else:
        allowed = mask if mask.dtype == torch.bool else mask == 0
        want = visible_keys(T, window, mask.device, chunk)
        if allowed.dim() == 4 and allowed.shape[-2:] == (T, T) and torch.equal(allowed, want.expand_as(allowed)):
            return
    what = "causal" if window is None else f"causal with a sliding window of {window}"
    what += "" if chunk is None else f" in chunks of {chunk}"
    raise ValueError(
        f"crystallized attention supports plain {what} masking only: the model was given a padding or custom "
        f"attention mask ({tuple(mask.shape)} {mask.dtype}). Score unpadded blocks (no attention_mask with zeros)."
    )


def _plain_mask(mask: Tensor | None, T: int, window: int | None, chunk: int | None) -> bool:
    """Whether ``mask`` is no mask, or exactly the causal (+ window, or + chunk) mask of T keys the layer computes."""
    if mask is None:
        return True
    if mask.dim() == 2:  # a flash-style [B, T] key mask: only "no padding"
        return mask.shape[-1] == T and bool(mask.bool().all())
    allowed = mask if mask.dtype == torch.bool else mask == 0
    want = visible_keys(T, window, mask.device, chunk)
    return allowed.dim() == 4 and allowed.shape[-2:] == (T, T) and torch.equal(allowed, want.expand_as(allowed))


def _mask_window(mask: Tensor | None, T: int) -> int | None:
    """The sliding window w < T of a mask that is exactly causal + window w (the same for every batch row and head),
    else None. BLT's local layers get their window only this way: the model builds the mask from a sub-config
    the attention module never reads, and passes no ``sliding_window``."""
    if mask is None or mask.dim() != 4 or mask.shape[-2:] != (T, T) or T < 2:
        return None
    allowed = mask if mask.dtype == torch.bool else mask == 0
    w = int(allowed[0, 0, -1].sum())  # the last row sees its w most recent keys
    if w < 1 or w >= T or not torch.equal(allowed, visible_keys(T, w, mask.device).expand_as(allowed)):
        return None
    return w


def _score_mask(module: nn.Module, spec: LayerSpec, attention_mask: Tensor | None, position_bias: Tensor | None,
                T: int, Tk: int, window: int | None, chunk: int | None) -> Tensor | None:
    """The op's ``attn_mask`` for this call, or None for the plain causal path (the mask checked either way).

    None when the call is plain causal attention over its own T keys (the layer's window / chunk). Otherwise the
    mask the module built itself (not the one it was given: that one must be plain, so a user's padding mask is
    still refused) and/or its ``position_bias``, combined as transformers' eager attention combines them:
    scores + position_bias + mask (a bool mask: -inf where False; no mask: the layer's causal visibility)."""
    own = (attention_mask is not None and attention_mask is not spec.received_mask
           and not (Tk == T and _plain_mask(attention_mask, T, window, chunk)))
    received = spec.received_mask
    cached = received is not None and received.dim() == 4 and received.shape[-1] != T  # the model's mask: past keys
    if (not own and Tk != T) or cached:
        raise ValueError(
            f"crystallized attention scores whole sequences; got {T} queries for {Tk} keys "
            "(a KV cache / generation is not supported)"
        )
    if not own:
        _check_mask(attention_mask, T, window, chunk)  # the plain causal mask, or refused (padding, custom)
        if position_bias is None:
            return None
        attention_mask = ~_hidden_keys(T, window, position_bias.device, chunk)
    else:
        _check_mask(spec.received_mask, T, window, chunk)  # what the module made its mask from: no padding
        if attention_mask.dim() != 4 or attention_mask.shape[-2:] != (T, Tk):
            raise ValueError(
                f"{type(module).__name__} builds an attention mask of shape {tuple(attention_mask.shape)}; "
                f"crystallized attention takes [B, H, T={T}, Tk={Tk}] masks only"
            )
    if position_bias is None:
        return attention_mask.detach()
    position_bias = position_bias.detach()
    if attention_mask.dtype == torch.bool:
        return position_bias.masked_fill(~attention_mask, float("-inf"))
    return position_bias + attention_mask.detach()


def _check_kwargs(module: nn.Module, kwargs: dict) -> None:
    # None or False: the feature is off (e.g. MoE models pass output_router_logits=False).
    unknown = sorted(k for k, v in kwargs.items()
                     if k not in _NEUTRAL_KWARGS | _HANDLED_KWARGS and v is not None and v is not False)
    if unknown:
        raise UnsupportedModelError(
            f"crystallized attention does not implement the attention argument(s) {unknown} that "
            f"{type(module).__name__} passes; they would change the result, so nqpq refuses this model"
        )
    if kwargs.get("is_causal", True) is not True or getattr(module, "is_causal", True) is not True:
        raise UnsupportedModelError(f"{type(module).__name__} asks for non-causal attention; nqpq is causal only")
    indices = kwargs.get("indices")
    if indices is not None and not (isinstance(indices, Tensor) and indices.dim() == 3):
        raise UnsupportedModelError(
            f"{type(module).__name__} passes indices of an unknown form ({type(indices).__name__}); nqpq refuses")


def _check_dense(module: nn.Module, indices: Tensor | None, T: int) -> None:
    """DeepSeek V3.2's indexer selects min(index_topk, T) keys per row: with all T selected the attention is the
    dense causal one nqpq computes; a sparse selection (T > index_topk) is refused by name."""
    if indices is not None and indices.shape[-1] < T:
        raise ValueError(
            f"{type(module).__name__} selects {indices.shape[-1]} of {T} keys per row (sparse attention: DSA's "
            f"index_topk < the sequence length); crystallized attention computes dense causal attention only: "
            f"score blocks of at most {indices.shape[-1]} tokens"
        )


def _attentions_requested(kwargs: dict) -> bool:
    """Whether this forward collects attention weights (``output_attentions=True``)."""
    if kwargs.get("output_attentions"):
        return True
    try:  # transformers ≥ 5 pops the flag and collects the weights with hooks
        from transformers.utils.output_capturing import _active_collector
    except ImportError:  # pragma: no cover - older transformers pass output_attentions down
        return False
    collected = _active_collector.get()
    return collected is not None and "attentions" in collected


def _probabilities(query: Tensor, key: Tensor, scale: float, window: int | None, softcap: float | None,
                   learned_sink: Tensor | None = None, chunk: int | None = None,
                   attn_mask: Tensor | None = None) -> Tensor:
    """The attention probabilities p [B, Hq, T, Tk] (fp32 softmax, query dtype) that crystallized layers report
    for ``output_attentions``; grouped kv heads are broadcast, not copied. A learned sink joins the softmax and
    is dropped from p (its probability is what the rows lack of 1), as the models report it. ``attn_mask`` (the
    op's) replaces the causal mask: added to the scores, or -inf where a bool mask is False."""
    B, Hq, T, D = query.shape
    Hkv, Tk = key.shape[1], key.shape[2]
    q = query.float().view(B, Hkv, Hq // Hkv, T, D)
    scores = (q @ key.float()[:, :, None].transpose(-1, -2)).view(B, Hq, T, Tk) * scale
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    if attn_mask is None:
        scores = scores.masked_fill(~visible_keys(T, window, query.device, chunk), float("-inf"))
    elif attn_mask.dtype == torch.bool:
        scores = scores.masked_fill(~attn_mask, float("-inf"))
    else:
        scores = scores + attn_mask.float()
    if learned_sink is None:
        return scores.softmax(-1).to(query.dtype)
    sink = learned_sink.float()
    sink = (sink.view(1, Hq, 1, 1) if sink.dim() == 1 else sink.unsqueeze(-1)).expand(B, Hq, T, 1)
    return torch.cat([scores, sink], dim=-1).softmax(-1)[..., :Tk].to(query.dtype)


def _learned_sink(module: nn.Module, kwargs: dict, query: Tensor) -> Tensor | None:
    """The op's ``learned_sink`` from what the module passes: gpt-oss's ``s_aux`` [Hq] (one logit per head) or
    Inkling 2's ``sinks`` [B, Hq, T, 1] (one per query row, from its hidden state); None without either."""
    sink = kwargs.get("s_aux")
    if sink is None:
        sink = kwargs.get("sinks")
        if sink is not None:
            B, Hq, T = query.shape[:3]
            if not (isinstance(sink, Tensor) and tuple(sink.shape) in ((Hq,), (B, Hq, T, 1))):
                raise UnsupportedModelError(
                    f"{type(module).__name__} passes sinks of an unknown form "
                    f"({tuple(sink.shape) if isinstance(sink, Tensor) else type(sink).__name__}); nqpq refuses")
            sink = sink.squeeze(-1) if sink.dim() == 4 else sink
    return None if sink is None else sink.detach().to(query.device)


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
    T = query.shape[2]
    chunk = spec.attention_chunk
    if window is None and chunk is None and attention_mask is not None and attention_mask is spec.received_mask:
        window = _mask_window(attention_mask, T)  # a window only the model's mask holds (BLT's local layers)
    attn_mask = _score_mask(module, spec, attention_mask, kwargs.get("position_bias"), T, key.shape[2], window,
                            chunk)
    if attn_mask is not None:  # the mask alone decides visibility: it holds the window / chunk already
        window = chunk = None
    _check_dense(module, kwargs.get("indices"), T)
    impl = residual_attention_impl(resolve_backend(spec.backend, query.device.type, query.shape[-1], value.shape[-1]))
    # Another part of V of an attention already counted in this forward (DiffLlama): the same argmax, top-1
    # probability and sink mass, so no statistics; its ε still joins the Gram.
    repeat = any(q is query and k is key for q, k in spec.calls)
    spec.calls.append((query, key))
    stats = spec.stats_sink is not None and not repeat
    if spec.observe:  # the model's own output, bit for bit; the same q, k, v through the op for the sinks
        result = _own_attention(module, spec, query, key, value, attention_mask, scaling, dropout, kwargs)
        for ob in spec.observers:
            watch = ob.stats_sink is not None and not repeat
            if ob.gram_sink is None and not watch:
                continue
            res = impl(query, key, value, mode="top1", scale=scaling, sliding_window=window, softcap=softcap,
                       attention_chunk=chunk, attn_mask=attn_mask, sink_tokens=ob.sink_tokens,
                       learned_sink=learned_sink,
                       return_gram=ob.gram_sink is not None,
                       return_argmax=watch, return_top1_prob=watch,
                       return_sink_mass=watch and (ob.sink_tokens > 0 or learned_sink is not None))
            _feed(spec.layer, ob.gram_sink, ob.stats_sink if watch else None, res)
        return result
    if dropout > 0.0:
        raise ValueError("crystallized attention is inference-only: call model.eval() (dropout > 0)")
    weights = None
    if _attentions_requested(kwargs):
        if spec.original != "eager":
            raise ValueError(
                f"output_attentions=True: the model's '{spec.original}' attention returns no weights, so the "
                "attentions tuple would skip layers; load the model with attn_implementation='eager'"
            )
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5  # the op's default too
        weights = _probabilities(query, key, scale, window, softcap, learned_sink, chunk, attn_mask)
    res = impl(
        query, key, value, mode=spec.mode, basis=spec.basis, d_r=spec.d_r, scale=scaling,
        sliding_window=window, softcap=softcap, sink_tokens=spec.sink_tokens, learned_sink=learned_sink,
        attention_chunk=chunk, attn_mask=attn_mask, crystal_heads=spec.heads,
        return_gram=spec.gram_sink is not None, return_argmax=stats, return_top1_prob=stats,
        return_sink_mass=stats and (spec.sink_tokens > 0 or learned_sink is not None), out_layout="bthd",
    )
    _feed(spec.layer, spec.gram_sink, spec.stats_sink if stats else None, res)
    return res.out, weights  # [B, T, Hq, Dv], the layout transformers expects back


def _feed(layer: int, gram_sink, stats_sink, res) -> None:
    if gram_sink is not None:
        gram_sink.add(layer, res.gram)
    if stats_sink is not None:
        if res.sink_mass is None:
            stats_sink.add(layer, res.argmax, res.top1_prob)
        else:
            stats_sink.add(layer, res.argmax, res.top1_prob, res.sink_mass)


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
    gram_sink: object | None = None,
    stats_sink: object | None = None,
    observe: bool = False,
    sink_tokens: int = 0,
    observers: Sequence[Observer] = (),
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
    ``gram_sink`` (optional) receives Σ εεᵀ of every call, for calibration; ``stats_sink`` the argmax and
    top-1 probability. ``observe=True`` keeps the model's own attention output (only the sinks are fed).
    ``sink_tokens=n`` keeps the first n keys exactly in the ground state (``nqpq.residual_attention``; 0 is the
    spec). With ``observe=True``, ``observers`` lists further observations of the same attention calls (e.g. one
    per sink setting); ``gram_sink``/``stats_sink`` are then the first, with ``sink_tokens``.
    Everything is checked before anything is attached: a refused call leaves the model as it was.
    With ``output_attentions=True`` a crystallized layer of an eager model reports its probabilities p (the
    softmax of its masked, scaled, soft-capped scores); under other implementations, whose layers report no
    weights, it refuses rather than shift the layer indices of the attentions tuple.
    """
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
        if gram_sink is not None or stats_sink is not None:
            watchers = (Observer(n_sink, gram_sink, stats_sink), *watchers)
        for ob in watchers:
            if not isinstance(ob, Observer):
                raise TypeError(f"observers must be nqpq.model.crystallize.Observer, got {type(ob).__name__}")
            check_sink_tokens(ob.sink_tokens)
    elif watchers:
        raise ValueError("observers are for observe=True (a crystallized layer feeds gram_sink/stats_sink itself)")
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
                              gram_sink, stats_sink, observe, n_sink, watchers, attention_chunk=geo.attention_chunk,
                              heads=_head_flags(chosen_heads[li], Hq, device))

    # Nothing can fail past this point but the copies themselves; any exception undoes what was attached.
    name = _register(original)
    patch = Crystallization(model, original, layers, chosen_heads)
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


def _forget_calls(spec: LayerSpec):
    """A forward (pre-)hook emptying ``spec.calls``: the q/k it held belong to the forward that ended."""
    def forget(*_) -> None:
        spec.calls.clear()
        spec.received_mask = None
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
    return receive


def uncrystallize(patch: Crystallization) -> None:
    """Restore the model exactly: each crystallized module's own config back, no layer specs left."""
    parts = model_parts(patch.model)
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
    gram_sink: object | None,
    *,
    backend: str = "auto",
    stats_sink: object | None = None,
    sink_tokens: int = 0,
    observers: Sequence[Observer] = (),
) -> Iterator[Crystallization]:
    """Collect Σ εεᵀ of ``layers`` into ``gram_sink`` (and, with ``stats_sink``, each call's argmax and top-1
    probability, and sink mass) while the model computes exactly its own attention. ``sink_tokens`` is the
    op's for these sinks; ``observers`` adds further observations of the same calls (another sink setting each)."""
    if gram_sink is None and stats_sink is None and not observers:
        raise ValueError("observe_residuals needs a gram_sink, a stats_sink, or observers")
    patch = crystallize_layers(model, layers, mode="top1", backend=backend, gram_sink=gram_sink,
                               stats_sink=stats_sink, observe=True, sink_tokens=sink_tokens, observers=observers)
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
    gram_sink: object | None = None,
    stats_sink: object | None = None,
    sink_tokens: int = 0,
) -> Iterator[Crystallization]:
    """Context manager form of ``crystallize_layers`` / ``uncrystallize``: ``layers`` a list of layers (every head)
    or a mapping layer → query heads (the others plain attention)."""
    patch = crystallize_layers(
        model, layers, mode=mode, basis=basis, d_r=d_r, backend=backend, gram_sink=gram_sink,
        stats_sink=stats_sink, sink_tokens=sink_tokens,
    )
    try:
        yield patch
    finally:
        uncrystallize(patch)

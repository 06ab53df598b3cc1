"""The pieces of a decoder-only Hugging Face model that nqpq needs, found without a table of class names.

transformers already says most of it: ``get_decoder()`` is the body (under a multimodal wrapper: its language
model), ``get_output_embeddings()`` the LM head, ``config.get_text_config(decoder=True)`` the text config with
the layer count, the logit soft-caps and the sliding windows. What it does not say directly is found
structurally:

- the decoder layers are the body's ``nn.ModuleList`` with ``num_hidden_layers`` entries; where that count is of
  something else (Blenderbot: its encoder's layers; LongCat-Flash: attention blocks; HRM: layer calls of its
  recurrent forward) or missing (BLT), the lists of transformers' layer class (``GradientCheckpointingLayer``) under
  the body, one index over all of them in module order (HRM's low then high stack; BLT's local encoder, global
  transformer, local decoder);
- a layer's attention module is the submodule whose ``forward`` looks its function up in
  ``ALL_ATTENTION_FUNCTIONS`` (that lookup is what crystallization hooks into). A layer without one is not an
  attention layer (the linear-attention, SSM or recurrent layers of a hybrid); a model without any does not go
  through the attention interface and is refused. Beside its causal self-attention a layer may hold an attention
  over other states that takes no mask (Inkling 2's over earlier blocks): that one keeps the model's own function.
  A cross-attention beside the self-attention, or two causal self-attentions in one layer, are refused by name;
- the geometry is read per attention layer from its module (Gemma 4: head_dim per layer; dots3: heads per
  layer; DeepSeek's multi-head latent attention: q/k heads wider than v heads);
- what the body applies after its last layer (a final norm, with or without parameters, registered anywhere)
  is found by ``after_layers`` from one forward's own values;
- what the causal LM applies between the body's output and the LM head (a BERT-style prediction head's dense,
  activation and LayerNorm) is found by ``head_transform``: among the modules beside the body and the head, the
  one that maps the body's output to what the head receives bit for bit in the model's own forward.
"""

from __future__ import annotations

import inspect
import operator
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from transformers.utils import ModelOutput

from .devices import execution_device, input_device
from .errors import NqpqError

# The name the attention modules of transformers look their attention function up in.
_INTERFACE_LOOKUP = "ALL_ATTENTION_FUNCTIONS"
# The keyword under which transformers' attention modules hand their function a learned sink logit per head.
_SINK_KWARGS = ("s_aux", "sinks")  # gpt-oss's per-head logits, Inkling 2's per-row ones


class UnsupportedModelError(NqpqError):
    """The model cannot be crystallized: not decoder-only, attention outside the interface, or an unsupported
    attention feature."""


@dataclass(frozen=True)
class LayerGeometry:
    """The attention geometry of one layer, as its module hands q, k, v to the attention function."""

    n_heads: int  # query heads Hq
    n_kv_heads: int  # key/value heads Hkv (Hq % Hkv == 0)
    qk_dim: int  # width of q and k (multi-head latent attention: nope + rope width)
    v_dim: int  # width of v, ctx, V[i*], ε, the residual basis and the Gram
    sliding_window: int | None  # keys i − w < j <= i, or None for full causal
    learned_sink: bool  # the module adds a learned logit to the softmax (gpt-oss s_aux per head, Inkling 2 per row)
    attention_chunk: int | None = None  # Llama 4's chunked layers: keys j <= i with j // C == i // C, or None


@dataclass(frozen=True)
class ModelParts:
    """Where things are in a decoder-only causal LM, and the attention geometry of each attention layer.

    Layer indices are the model's own (``layers[i]``); ``attn_layers`` are those whose attention goes through
    the interface (a hybrid has gaps), ``attn`` and ``geometry`` are keyed by them. A layer may run several causal
    self-attentions of one geometry (LongCat-Flash: two attention blocks per layer): ``attn`` holds the first,
    ``attn_more`` the others, and crystallizing the layer crystallizes them all (``attention_modules``).
    """

    family: str  # model_type of the text model (Gemma 3's wrapper: gemma3_text)
    wrapper: str | None  # the multimodal wrapper's model_type when the text model sits inside one, else None
    layers: nn.ModuleList  # every decoder layer
    attn_layers: tuple[int, ...]  # the layers with an attention module going through the interface
    attn: dict[int, nn.Module]  # attention layer → its attention module
    geometry: dict[int, LayerGeometry]  # attention layer → its geometry
    body: nn.Module  # the base (text) model: body(input_ids=..., use_cache=False).last_hidden_state
    lm_head: nn.Module  # model.get_output_embeddings()
    logit_scale: float | None  # logits → logits · scale (Cohere: logit_scale; Granite: 1 / logits_scaling)
    final_logit_softcap: float | None  # logits → c·tanh(logits / c) (Gemma 2)
    n_layers: int  # len(layers)
    max_positions: int | None
    attn_softcap: float | None  # scores → c·tanh(s / c) before masking (Gemma 2)
    default_layers: tuple[int, ...]  # the last quarter of the attention layers (GPT-2 small: 9, 10, 11)
    # What the causal LM applies to the body's last_hidden_state before the LM head: None (the head takes it as it
    # is), or a BERT-style prediction head's transform (``head_transform``); lm_losses applies it.
    head_transform: Callable[[Tensor], Tensor] | None = None
    attn_more: dict[int, tuple[nn.Module, ...]] = field(default_factory=dict)  # layer → its further self-attentions

    def attention_modules(self, layer: int) -> tuple[nn.Module, ...]:
        """Every causal self-attention module of attention layer ``layer``, in the layer's order: ``attn[layer]``,
        then the further ones of a layer that runs several (LongCat-Flash's second attention block)."""
        return (self.attn[layer], *self.attn_more.get(layer, ()))

    def largest(self, field: str, layers: tuple[int, ...] | None = None) -> int:
        """The largest ``LayerGeometry.field`` over ``layers`` (default: every attention layer), for sizing."""
        return max(getattr(self.geometry[li], field) for li in (self.attn_layers if layers is None else layers))

    def smallest(self, field: str, layers: tuple[int, ...] | None = None) -> int:
        """The smallest ``LayerGeometry.field`` over ``layers`` (default: every attention layer), for bounds."""
        return min(getattr(self.geometry[li], field) for li in (self.attn_layers if layers is None else layers))

    def check_attention_layers(self, layers, what: str = "layer") -> None:
        """Raise ``UnsupportedModelError`` naming the attention layers when one of ``layers`` is not one."""
        bad = [li for li in layers if li not in self.attn]
        if bad:
            raise UnsupportedModelError(
                f"{what} {bad[0]} is not an attention layer of this {self.family} model: its attention layers "
                f"are {_ranges(self.attn_layers)} (of layers 0..{self.n_layers - 1})"
            )


def _ranges(indices: tuple[int, ...]) -> str:
    """``0-3, 5, 7-9``: a compact list of layer indices."""
    out, run = [], []
    for i in indices:
        if run and i != run[-1] + 1:
            out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
            run = []
        run.append(i)
    if run:
        out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
    return ", ".join(out)


def as_index(value: object, what: str) -> int:
    """``value`` as a Python int, accepting numpy/torch integer scalars; bools and non-integers are refused."""
    is_bool = isinstance(value, bool) or (isinstance(value, Tensor) and value.dtype == torch.bool)
    try:
        if not is_bool:
            return operator.index(value)  # int, numpy integer, one-element integer tensor; numpy bool raises
    except TypeError:
        pass
    raise ValueError(f"{what} must be an int, got {type(value).__name__}")


def _forward_code(module: nn.Module):
    forward = inspect.unwrap(type(module).forward)
    return getattr(forward, "__code__", None)


def _uses_attention_interface(module: nn.Module) -> bool:
    code = _forward_code(module)
    return code is not None and _INTERFACE_LOOKUP in code.co_names


def _passes_learned_sink(module: nn.Module) -> bool:
    """Whether the module's forward hands its attention function ``s_aux=`` or ``sinks=`` (a keyword name of one of
    its calls)."""
    code = _forward_code(module)
    if code is None:
        return False
    return any(c in _SINK_KWARGS or (isinstance(c, tuple) and any(k in c for k in _SINK_KWARGS))
               for c in code.co_consts)


def _decoder_layers(body: nn.Module, n_layers: int | None, name: str) -> nn.ModuleList:
    """The body's decoder layers: its one ``nn.ModuleList`` of ``num_hidden_layers`` entries, else (a config whose
    ``num_hidden_layers`` counts something else, or none) the layers transformers marks as such."""
    found = []
    if n_layers is not None:
        found = [m for m in body.children() if isinstance(m, nn.ModuleList) and len(m) == n_layers]
        if not found:  # nested one level down (BERT-style models keep them in body.encoder.layer)
            found = [m for child in body.children() for m in child.children()
                     if isinstance(m, nn.ModuleList) and len(m) == n_layers]
    if len(found) == 1:
        return found[0]
    stacks = _layer_stacks(body) if not found else []
    if len(stacks) == 1:
        return stacks[0]
    if stacks:  # several stacks of layers (HRM's high- and low-level modules): one index over all, in module order
        return nn.ModuleList([layer for stack in stacks for layer in stack])
    raise UnsupportedModelError(
        f"{name}: cannot find its decoder layers (one nn.ModuleList of num_hidden_layers={n_layers} modules in "
        f"{type(body).__name__}, or of transformers' decoder layers); found {len(found)}"
    )


def _layer_stacks(body: nn.Module) -> list[nn.ModuleList]:
    """The ``nn.ModuleList``s under ``body`` whose entries are transformers' layers (``GradientCheckpointingLayer``:
    the class every decoder layer of transformers derives from) with at least one attention module among them, in
    module order; never one inside a layer. Where ``num_hidden_layers`` does not count the modules: Blenderbot's
    counts its encoder's layers, LongCat-Flash's its attention blocks (two per layer), HRM's the layer calls of its
    recurrent forward (two stacks run in cycles)."""
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer
    except ImportError:  # pragma: no cover - transformers before the class
        return []
    stacks: list[nn.ModuleList] = []

    def visit(module: nn.Module) -> None:
        for child in module.children():
            if isinstance(child, GradientCheckpointingLayer) or _own_head(child):
                continue
            if (isinstance(child, nn.ModuleList) and len(child)
                    and all(isinstance(m, GradientCheckpointingLayer) for m in child)
                    and any(_uses_attention_interface(m) for layer in child for m in layer.modules())):
                stacks.append(child)
            else:
                visit(child)

    visit(body)
    return stacks


def _own_head(module: nn.Module) -> bool:
    """Whether ``module`` is a language model of its own inside the body, with its own LM head (BLT's entropy
    patcher, run before the body's layers to choose the patch boundaries): its layers are not the body's."""
    get = getattr(module, "get_output_embeddings", None)
    try:
        return callable(get) and isinstance(get(), nn.Module)
    except Exception:  # noqa: BLE001 - a model that cannot say has none
        return False


def _text_body(model: nn.Module, text_config, n_layers: int | None, name: str) -> nn.Module:
    """The base text model: ``get_decoder()``, or (a causal LM whose ``base_model_prefix`` does not name its base
    model: Llama 4) the one submodule holding the decoder layers under the text config."""
    body = model.get_decoder() if hasattr(model, "get_decoder") else None
    # ModernBERT-decoder names its LM head ``decoder``, which get_decoder() then returns.
    if isinstance(body, nn.Module) and body is not model and body is not model.get_output_embeddings():
        return body
    holders = [m for m in model.modules() if m is not model
               and any(isinstance(c, nn.ModuleList) and len(c) == n_layers for c in m.children())]
    own = [m for m in holders if getattr(m, "config", None) is text_config]
    found = own if own else holders
    if len(found) != 1:
        raise UnsupportedModelError(
            f"{name}: get_decoder() does not give the base model under the LM head, and {len(found)} of its "
            f"submodules hold {n_layers} layers"
        )
    return found[0]


def _is_cross_attention(module: nn.Module) -> bool:
    """Whether the module attends to another sequence (its forward takes the states it attends to)."""
    own = getattr(module, "is_cross_attention", None)
    if isinstance(own, bool):  # GPT-2's attention takes encoder_hidden_states but says which one it is
        return own
    try:
        params = inspect.signature(type(module).forward).parameters
    except (TypeError, ValueError):
        return False
    return any(p in params for p in ("cross_attention_states", "encoder_hidden_states"))


def _takes_other_states(module: nn.Module) -> bool:
    """Whether the module's forward takes states to attend to besides its own (Bart-style ``key_value_states``:
    the same class serves as self- and cross-attention, told apart by ``is_causal``)."""
    try:
        params = inspect.signature(type(module).forward).parameters
    except (TypeError, ValueError):
        return False
    return _is_cross_attention(module) or "key_value_states" in params


def _takes_mask(module: nn.Module) -> bool:
    """Whether the module's forward takes an attention mask: every attention over a layer's tokens does; one over
    something else (Inkling 2's block attention residuals: a learned query over the stacked states of earlier
    blocks, per position, maskless) does not."""
    try:
        params = inspect.signature(type(module).forward).parameters
    except (TypeError, ValueError):
        return True
    return "attention_mask" in params or any(p.kind is p.VAR_POSITIONAL for p in params.values())


def _attention_modules(layer: nn.Module, index: int, name: str) -> tuple[nn.Module, ...]:
    """The layer's self-attention modules: none for a layer without one (a hybrid's SSM layer, or Mllama's
    cross-attention layers, which attend to image states and which a text-only forward skips), usually one.

    A layer with several modules going through the interface keeps its causal attentions over its tokens (one, or
    LongCat-Flash's two attention blocks); a non-causal one that takes no attention mask attends over something
    other than the tokens (Inkling 2's attention over the states of earlier blocks) and is left to run the model's
    own function. A cross-attention beside the self-attention (Bart-style decoder layers) or a bidirectional one
    are refused by name."""
    found = [m for m in layer.modules() if _uses_attention_interface(m)]
    if len(found) > 1:
        names = {id(m): n for n, m in layer.named_modules()}
        label = {id(m): f"{names[id(m)]} ({type(m).__name__})" for m in found}
        causal = [m for m in found if getattr(m, "is_causal", True) is not False]
        others = [m for m in found if m not in causal]
        cross = [m for m in others if _takes_other_states(m)]
        if len(causal) == 1 and cross:
            raise UnsupportedModelError(
                f"{name}: layer {index} ({type(layer).__name__}) holds a cross-attention, "
                f"{label[id(cross[0])]}, beside its self-attention {label[id(causal[0])]} (an encoder-decoder's "
                "decoder layer); nqpq handles decoder-only causal LMs"
            )
        token = [m for m in found if _takes_mask(m)]
        if not causal or cross or token != causal:
            raise UnsupportedModelError(
                f"{name}: layer {index} ({type(layer).__name__}) has {len(found)} attention modules going through "
                f"transformers' AttentionInterface ({', '.join(label.values())}): {len(causal)} causal, {len(cross)} "
                "taking other states to attend to (a cross-attention); nqpq needs causal self-attentions"
            )
        found = causal  # the others (no mask, not causal) attend over something else: the model's own function
    return tuple(found) if found and not _is_cross_attention(found[0]) else ()


def _get(owner, key: str):
    """``getattr(owner, key, None)``, also None where a config refuses the read (dots3's per-layer values)."""
    try:
        return getattr(owner, key, None)
    except Exception:  # noqa: BLE001
        return None


def _int_attr(owners, keys, index: int) -> int | None:
    """The first positive int among ``owner.key`` (a per-layer list is indexed by the layer)."""
    for owner in owners:
        for key in keys:
            value = _get(owner, key)
            if isinstance(value, (list, tuple)) and len(value) > index:
                value = value[index]
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    return None


def _layer_geometry(attn: nn.Module, config, index: int, name: str) -> LayerGeometry:
    """The geometry the layer's attention module hands the attention function, read from the module first (it
    knows its own layer: Gemma 4's head_dim, dots3's head counts), then from the config."""
    own = getattr(attn, "config", None)
    owners = (attn,) if own is None or own is config else (attn, own)
    head_dim = _int_attr(owners + (config,), ("head_dim", "head_size", "attention_head_size"), index)
    # Multi-head latent attention (DeepSeek V2/V3, MiniCPM3, ...): the module names both widths; its config's
    # head_dim is then the rotary width, not a head width.
    qk_dim = _int_attr((attn,), ("qk_head_dim",), index) or head_dim
    v_dim = _int_attr((attn,), ("v_head_dim",), index) or head_dim
    n_heads = _int_attr((attn,), ("num_heads", "num_attention_heads", "n_heads"), index) or _int_attr(
        owners[1:] + (config,), ("num_attention_heads",), index)
    n_kv = _int_attr((attn,), ("num_key_value_heads", "num_kv_heads", "n_kv_heads"), index)
    groups = _int_attr((attn,), ("num_key_value_groups",), index)
    if n_kv is None and groups is not None and n_heads is not None:
        n_kv = n_heads // groups
    if n_kv is None:
        n_kv = _int_attr(owners[1:] + (config,), ("num_key_value_heads",), index) or n_heads
    if None in (qk_dim, v_dim, n_heads):
        raise UnsupportedModelError(
            f"{name}: cannot read layer {index}'s attention geometry from {type(attn).__name__} "
            f"(heads {n_heads}, q/k width {qk_dim}, v width {v_dim})"
        )
    if n_kv < 1 or n_heads % n_kv:
        raise UnsupportedModelError(
            f"{name}: layer {index} has {n_heads} query heads, not a multiple of {n_kv} kv heads")
    # The code passes s_aux on every layer; MiMo-V2-Flash's full-attention layers pass None (their ``sinks``).
    learned_sink = _passes_learned_sink(attn) and getattr(attn, "sinks", True) is not None
    return LayerGeometry(n_heads, n_kv, qk_dim, v_dim, _layer_window(attn, config, index), learned_sink,
                         _layer_chunk(attn, config, index))


def _logit_scale(config) -> float | None:
    """The factor the causal LM's own forward multiplies its logits by, from the config attributes transformers
    reads for it: Cohere's ``logit_scale`` (``logits * logit_scale``), Granite's ``logits_scaling``
    (``logits / logits_scaling``), Inkling's ``logits_mup_width_multiplier`` (``lm_head(hidden / multiplier)``).
    Without it the sweep's perplexities would not be the model's."""
    scale = getattr(config, "logit_scale", None)
    divisor = getattr(config, "logits_scaling", None)
    if scale is not None and divisor is not None:
        raise UnsupportedModelError(f"{type(config).__name__} has both logit_scale and logits_scaling")
    # Inkling divides the final hidden state by logits_mup_width_multiplier before its (bias-free) head: the logits
    # divided by it.
    mup = getattr(config, "logits_mup_width_multiplier", None)
    mup = 1.0 if mup is None else 1.0 / float(mup)
    if divisor is not None:
        return mup / float(divisor)
    if scale is None:
        return None if mup == 1.0 else mup
    return float(scale) * mup


def _layer_window(attn: nn.Module, config, index: int) -> int | None:
    """The sliding window the layer's attention hands the attention function, as transformers decides it."""
    # Per layer on the module (Gemma 2, Qwen2/3: None on full-attention layers), else model-wide (Mistral).
    window = attn.sliding_window if hasattr(attn, "sliding_window") else _get(config, "sliding_window")
    layer_types = _get(config, "layer_types")
    if layer_types is not None and index < len(layer_types) and layer_types[index] != "sliding_attention":
        window = None  # a full-attention layer, whatever its module keeps (EXAONE 4 keeps the window on every one)
    return None if isinstance(window, bool) or not isinstance(window, int) else int(window)


def _layer_chunk(attn: nn.Module, config, index: int) -> int | None:
    """The chunk size C of a layer of type ``"chunked_attention"`` (Llama 4: its mask is transformers'
    ``create_chunked_causal_mask``, query i sees keys j <= i with j // C == i // C), else None. Read as the
    model's forward reads it: ``layer_types[index]`` and ``attention_chunk_size`` of the config it builds masks
    from (the layer's own config first: a multimodal wrapper keeps both in its text config)."""
    own = getattr(attn, "config", None)
    for owner in (own, config):
        if owner is None:
            continue
        layer_types = _get(owner, "layer_types")
        if layer_types is None or index >= len(layer_types):
            continue
        if layer_types[index] != "chunked_attention":
            return None
        chunk = _get(owner, "attention_chunk_size")
        if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
            raise UnsupportedModelError(
                f"layer {index} is a chunked-attention layer but its config has no attention_chunk_size >= 1 "
                f"(got {chunk!r})")
        return int(chunk)
    return None


def _first_of(config, key: str, text_config):
    """``key`` from the model's config, else from its text config (a multimodal wrapper keeps it there)."""
    value = _get(config, key)
    return _get(text_config, key) if value is None else value


def model_parts(model: nn.Module) -> ModelParts:
    """The layers, attention modules, head and per-layer geometry of a decoder-only causal LM.

    Raises ``UnsupportedModelError`` for encoder-only and encoder-decoder models, models whose attention does
    not go through transformers' ``AttentionInterface``, cross-attention, and bidirectional attention.
    """
    name = type(model).__name__
    config = getattr(model, "config", None)
    if config is None or not hasattr(model, "get_output_embeddings"):
        raise UnsupportedModelError(f"{name} is not a Hugging Face transformers model")
    if getattr(config, "is_encoder_decoder", False):
        raise UnsupportedModelError(f"{name} is an encoder-decoder model; nqpq handles decoder-only causal LMs")
    if hasattr(model, "can_generate") and not model.can_generate():
        raise UnsupportedModelError(
            f"{name} is not a causal (generative) language model: a base model without its LM head, or an "
            "encoder-only model; nqpq handles decoder-only causal LMs, loaded with AutoModelForCausalLM"
        )
    lm_head = model.get_output_embeddings()
    if lm_head is None:
        raise UnsupportedModelError(
            f"{name} has no language-model head (an encoder-only or base model); load it with AutoModelForCausalLM"
        )
    if isinstance(lm_head, nn.AdaptiveLogSoftmaxWithLoss):
        raise UnsupportedModelError(
            f"{name}: its LM head is an adaptive softmax (AdaptiveLogSoftmaxWithLoss: XLM's asm=True), not a Linear "
            "giving logits over the vocabulary; nqpq forms the loss from a Linear LM head's logits"
        )
    if not isinstance(lm_head, nn.Linear):  # Musicgen Melody: one head per codebook (a ModuleList)
        raise UnsupportedModelError(
            f"{name}: its LM head is a {type(lm_head).__name__}, not one Linear giving logits over the vocabulary; "
            "nqpq forms the loss from a Linear LM head's logits"
        )
    text_config = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    n_layers = _get(text_config, "num_hidden_layers")  # None (BLT): the layers are found structurally
    n_layers = n_layers if isinstance(n_layers, int) and not isinstance(n_layers, bool) else None
    body = _text_body(model, text_config, n_layers, name)
    layers = _decoder_layers(body, n_layers, name)
    found = {i: _attention_modules(layer, i, name) for i, layer in enumerate(layers)}
    attn = {i: modules[0] for i, modules in found.items() if modules}
    attn_more = {i: modules[1:] for i, modules in found.items() if len(modules) > 1}
    if not attn:
        raise UnsupportedModelError(
            f"{name}: its attention does not go through transformers' AttentionInterface, which nqpq hooks into "
            "(no module of its decoder layers looks its attention function up there)"
        )
    shared = {}
    for i, modules in found.items():
        for a in modules:
            shared.setdefault(id(a), []).append(i)
    shared = [layers_ for layers_ in shared.values() if len(layers_) > 1]
    if shared:
        raise UnsupportedModelError(
            f"{name}: layers {shared[0]} share one attention module (a shared transformer block); crystallizing one "
            "of them would crystallize them all, and nqpq crystallizes one layer's own module"
        )
    if not all(getattr(a, "is_causal", True) for modules in found.values() for a in modules):
        raise UnsupportedModelError(f"{name}: its attention is bidirectional; nqpq handles causal attention only")
    transform = head_transform(model, body, lm_head, config, text_config)
    geometry = {i: _layer_geometry(a, text_config, i, name) for i, a in attn.items()}
    unpadded = getattr(text_config, "unpadded_vocab_size", None)  # Inkling drops the head's padding rows' logits
    if unpadded is not None and isinstance(lm_head, nn.Linear) and unpadded < lm_head.out_features:
        raise UnsupportedModelError(
            f"{name}: its LM head's logits are cut to unpadded_vocab_size={unpadded} of {lm_head.out_features}; "
            "nqpq's losses use the whole head"
        )
    for i, more in attn_more.items():  # one basis and one geometry per layer: its attention blocks must share it
        other = [g for g in (_layer_geometry(a, text_config, i, name) for a in more) if g != geometry[i]]
        if other:
            raise UnsupportedModelError(
                f"{name}: layer {i} runs {len(more) + 1} self-attentions of different geometries ({geometry[i]} and "
                f"{other[0]}); nqpq crystallizes a layer's attentions with one basis"
            )
    attn_layers = tuple(attn)
    max_positions = _get(text_config, "max_position_embeddings")
    n_default = max(1, len(attn_layers) // 4)
    wrapper = None if text_config is config else str(config.model_type)
    return ModelParts(
        family=str(text_config.model_type),
        wrapper=wrapper,
        layers=layers,
        attn_layers=attn_layers,
        attn=attn,
        geometry=geometry,
        body=body,
        lm_head=lm_head,
        logit_scale=_logit_scale(text_config) if wrapper is None else _logit_scale_of(config, text_config),
        # Gemma 2: final_logit_softcapping; RecurrentGemma: logits_soft_cap (the same c·tanh(logits / c)).
        final_logit_softcap=_first_of(config, "final_logit_softcapping", text_config)
        or _first_of(config, "logits_soft_cap", text_config),
        n_layers=len(layers),
        max_positions=None if not isinstance(max_positions, int) else max_positions,
        attn_softcap=_first_of(text_config, "attn_logit_softcapping", config),
        default_layers=attn_layers[-n_default:],
        head_transform=transform,
        attn_more=attn_more,
    )


def _logit_scale_of(config, text_config) -> float | None:
    """A wrapper's logit scale: its own attributes if it has any, else its text model's."""
    own = _logit_scale(config)
    return own if own is not None else _logit_scale(text_config)


def after_layers(parts: ModelParts, last_output: Tensor, final_hidden: Tensor) -> Callable[[Tensor], Tensor]:
    """What the body applies to its last layer's output to give ``last_hidden_state``, found from one forward:
    ``last_output`` (the last layer's output) and ``final_hidden`` (the body's ``last_hidden_state``) of the
    same call. Nothing (the identity), or the one child module of the body that maps the one to the other bit
    for bit (a final norm with or without parameters, registered before or after the layers: OPT, OLMo).
    """
    if last_output.shape == final_hidden.shape and torch.equal(last_output, final_hidden):
        return _identity
    skip = {id(parts.layers)}
    embeddings = parts.body.get_input_embeddings() if hasattr(parts.body, "get_input_embeddings") else None
    if embeddings is not None:
        skip.add(id(embeddings))
    tried = []
    for child_name, child in parts.body.named_children():
        if id(child) in skip or isinstance(child, (nn.ModuleList, nn.ModuleDict, nn.Embedding)):
            continue
        if any(m is parts.layers for m in child.modules()):
            # The module around the layers (BERT's encoder): calling it would run every layer again, under the
            # recording hooks of the replay's capture.
            continue
        tried.append(child_name)
        try:
            with torch.no_grad():
                out = child(last_output)
        except Exception:  # noqa: BLE001 - a child that does not take a hidden state is not the final step
            continue
        if isinstance(out, Tensor) and out.shape == final_hidden.shape and torch.equal(out, final_hidden):
            return child
    raise UnsupportedModelError(
        f"{type(parts.body).__name__}: cannot tell what it applies after its last layer (none of its children "
        f"{tried} maps the last layer's output to its last_hidden_state); its layers cannot be replayed"
    )


def _identity(hidden: Tensor) -> Tensor:
    return hidden


# ---------------------------------------------------------------------------------------------- head transform

# The probe of ``head_transform``: one sequence of this many positions, a fixed seed for its hidden state.
_PROBE_TOKENS = 5
_PROBE_SEED = 0


@dataclass
class _ProbeOutput(ModelOutput):
    """The stubbed body's output in ``head_transform``'s probe: the given last_hidden_state, None for any other
    field the model's forward passes on (its cache, hidden states, attentions)."""

    last_hidden_state: Tensor | None = None

    def __getattr__(self, key: str):
        if key.startswith("_"):
            raise AttributeError(key)
        return None


class _HeadInput(Exception):  # noqa: N818 - a signal, not an error
    """Raised by the LM head's pre-hook inside ``UpToHead``: carries what the head was handed, so its GEMM over the
    vocabulary never runs."""

    def __init__(self, hidden: Tensor):
        super().__init__()
        self.hidden = hidden


class UpToHead:
    """A prediction head holding the LM head (BERT's ``cls``, RoBERTa's ``lm_head``), run up to its call of the LM
    head: ``UpToHead(holder, lm_head)(hidden)`` is what ``holder(hidden)`` hands ``lm_head`` (BERT: its dense,
    activation and LayerNorm). The holder's own forward computes it, whatever it does before the head."""

    def __init__(self, holder: nn.Module, lm_head: nn.Module):
        self.holder, self.lm_head = holder, lm_head

    def __call__(self, hidden: Tensor) -> Tensor:
        def stop(module, args, kwargs):
            raise _HeadInput(args[0] if args else next(iter(kwargs.values())))

        # A torch pre-hook runs before accelerate's wrapper of the head's forward: an offloaded head is not loaded.
        handle = self.lm_head.register_forward_pre_hook(stop, with_kwargs=True)
        try:
            self.holder(hidden)
        except _HeadInput as got:
            self._finish_hooks()
            return got.hidden
        finally:
            handle.remove()
        raise UnsupportedModelError(f"{type(self.holder).__name__} did not call its LM head")

    def _finish_hooks(self) -> None:
        """The accelerate hooks of the modules around the head, whose forward the stop left: their post-forward (an
        offloaded module's own weights, BERT's output bias, back off the device) as a completed call would run it."""
        for module in self.holder.modules():
            hook = getattr(module, "_hf_hook", None)
            if hook is not None and module is not self.lm_head and any(m is self.lm_head for m in module.modules()):
                hook.post_forward(module, None)

    def __repr__(self) -> str:
        return f"UpToHead({type(self.holder).__name__} up to its {type(self.lm_head).__name__})"


def head_transform(model: nn.Module, body: nn.Module, lm_head: nn.Module, config=None,
                   text_config=None) -> Callable[[Tensor], Tensor] | None:
    """What ``model``'s forward applies to the body's ``last_hidden_state`` before its LM head: None where the head
    takes it as it is, else the one module (or ``UpToHead`` of the one module holding the head) that computes it.

    The usual causal LM (the head a child of the model, nothing else beside the body with parameters) is taken as
    it is, without running anything. Otherwise the candidates are the model's children with parameters beside the
    body and the head (ELECTRA's ``generator_predictions``, ModernBERT-decoder's ``lm_head``), a child holding the
    head taken up to its call of the head (BERT's ``cls``, RoBERTa's ``lm_head``, XLM's ``pred_layer``); the model's
    own forward, with the body stubbed to return a fixed hidden state h (no attention runs: an active
    crystallization sees nothing), says which: the head must be called once, its output must be the model's logits
    (where the model has no logit scale or soft-cap), and exactly one candidate (or nothing) must map h to what the
    head received, bit for bit. Anything else is refused.
    """
    name = type(model).__name__
    outside = [(child_name, child) for child_name, child in model.named_children()
               if child is not lm_head and not any(m is body for m in child.modules())
               and any(True for _ in child.parameters())]
    if any(child is lm_head for child in model.children()) and not outside:
        return None
    candidates = [(child_name, UpToHead(child, lm_head) if any(m is lm_head for m in child.modules()) else child)
                  for child_name, child in outside]
    h, received, calls, head_out, logits = _probe_head(model, body, lm_head, text_config or config, name)
    if calls != 1:
        raise UnsupportedModelError(
            f"{name}: its forward calls its LM head {calls} times on one hidden state; nqpq needs one call")
    plain = config is None or (_logit_scale_of(config, text_config or config) is None and not (
        _first_of(config, "final_logit_softcapping", text_config) or _first_of(config, "logits_soft_cap", text_config)))
    if plain and not _equal(head_out, logits):
        raise UnsupportedModelError(
            f"{name}: its logits are not its LM head's output (something acts after the head); nqpq forms the loss "
            "from the LM head's logits")
    if _equal(received, h):
        return None
    matches = []
    for child_name, candidate in candidates:
        try:
            with torch.no_grad():
                out = candidate(h)
        except Exception:  # noqa: BLE001 - a child that does not take the hidden state is not the transform
            continue
        if _equal(out, received):
            matches.append((child_name, candidate))
    if len(matches) != 1:
        raise UnsupportedModelError(
            f"{name}: cannot tell what it applies between its base model and its LM head "
            f"({len(matches)} of its modules {[n for n, _ in candidates]} map the base model's output to what the "
            "head receives); nqpq needs the LM head applied to the base model's output, or to one module's output")
    return matches[0][1]


def _equal(a: object, b: object) -> bool:
    """Two tensors of the same shape and dtype with the same values (on whichever devices)."""
    return (isinstance(a, Tensor) and isinstance(b, Tensor) and a.shape == b.shape and a.dtype == b.dtype
            and bool(torch.equal(a.to(b.device), b)))


def _probe_head(model: nn.Module, body: nn.Module, lm_head: nn.Module, text_config, name: str):
    """The model's own forward from a body output to its logits, with ``body`` stubbed to return a fixed hidden
    state h ``[1, 5, hidden_size]``: (h, what the LM head received, how often it was called, its output, the
    model's logits)."""
    width = _get(text_config, "hidden_size")
    params = [p for p in body.parameters() if p.is_floating_point()]
    if not isinstance(width, int) or not params:
        raise UnsupportedModelError(
            f"{name}: its config gives no hidden_size of its base model's output; cannot find what it applies "
            "between its base model and its LM head")
    generator = torch.Generator().manual_seed(_PROBE_SEED)
    h = torch.randn(1, _PROBE_TOKENS, width, generator=generator).to(execution_device(lm_head), params[0].dtype)
    vocab = _get(text_config, "vocab_size")
    ids = (torch.arange(_PROBE_TOKENS) % (vocab if isinstance(vocab, int) and vocab > 0 else 1))[None]
    seen: list = []

    def record(module, args, kwargs, out):
        seen.append((args[0] if args else next(iter(kwargs.values())), out))

    def stub(*args, **kwargs):
        return _ProbeOutput(last_hidden_state=h)

    own = body.__dict__.get("forward")  # accelerate's hook keeps its wrapper there
    body.forward = stub
    handle = lm_head.register_forward_hook(record, with_kwargs=True)
    try:
        with torch.no_grad():
            out = model(input_ids=ids.to(input_device(model)), use_cache=False)
    except UnsupportedModelError:
        raise
    except Exception as err:  # noqa: BLE001 - the stubbed body's output lacked something the forward reads
        raise UnsupportedModelError(
            f"{name}: cannot run its forward from a given base-model output to find what it applies between its "
            f"base model and its LM head ({type(err).__name__}: {err})") from err
    finally:
        handle.remove()
        if own is None:
            del body.forward
        else:
            body.forward = own
    logits = getattr(out, "logits", None)
    if logits is None and isinstance(out, (tuple, list)) and out:
        logits = out[0]
    received, head_out = seen[0] if seen else (None, None)
    return h, received, len(seen), head_out, logits

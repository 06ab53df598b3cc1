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
- the geometry is read per attention layer from its module (``nqpq.model.geometry``; Gemma 4: head_dim per layer;
  dots3: heads per layer; DeepSeek's multi-head latent attention: q/k heads wider than v heads);
- what the body applies after its last layer (a final norm, with or without parameters, registered anywhere)
  is found by ``nqpq.model.lm_head.after_layers`` from one forward's own values;
- what the causal LM applies between the body's output and the LM head (a BERT-style prediction head's dense,
  activation and LayerNorm) is found by ``nqpq.model.lm_head.head_transform``: among the modules beside the body and the
  head, the one that maps the body's output to what the head receives bit for bit in the model's own forward.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..errors import UnsupportedModelError

# The readers of a choice of layers (and heads) live in .choices; imported here by the names every caller uses.
from .choices import as_index, layer_heads, layer_indices  # noqa: F401
from .geometry import LayerGeometry, config_value, first_of, layer_geometry, uses_attention_interface
from .lm_head import head_transform, logit_scale

__all__ = ["ModelParts", "UnsupportedModelError", "as_index", "layer_indices", "model_parts"]


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

    def query_heads(self, layer: int) -> int:
        """Hq of attention layer ``layer`` (``UnsupportedModelError`` if it is not one): what a choice of heads is
        checked against."""
        self.check_attention_layers([layer])
        return self.geometry[layer].n_heads

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
                    and any(uses_attention_interface(m) for layer in child for m in layer.modules())):
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
    found = [m for m in layer.modules() if uses_attention_interface(m)]
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
    n_layers = config_value(text_config, "num_hidden_layers")  # None (BLT): the layers are found structurally
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
    geometry = {i: layer_geometry(a, text_config, i, name) for i, a in attn.items()}
    unpadded = getattr(text_config, "unpadded_vocab_size", None)  # Inkling drops the head's padding rows' logits
    if unpadded is not None and isinstance(lm_head, nn.Linear) and unpadded < lm_head.out_features:
        raise UnsupportedModelError(
            f"{name}: its LM head's logits are cut to unpadded_vocab_size={unpadded} of {lm_head.out_features}; "
            "nqpq's losses use the whole head"
        )
    for i, more in attn_more.items():  # one basis and one geometry per layer: its attention blocks must share it
        other = [g for g in (layer_geometry(a, text_config, i, name) for a in more) if g != geometry[i]]
        if other:
            raise UnsupportedModelError(
                f"{name}: layer {i} runs {len(more) + 1} self-attentions of different geometries ({geometry[i]} and "
                f"{other[0]}); nqpq crystallizes a layer's attentions with one basis"
            )
    attn_layers = tuple(attn)
    max_positions = config_value(text_config, "max_position_embeddings")
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
        logit_scale=logit_scale(config, None if wrapper is None else text_config),
        # Gemma 2: final_logit_softcapping; RecurrentGemma: logits_soft_cap (the same c·tanh(logits / c)).
        final_logit_softcap=first_of(config, "final_logit_softcapping", text_config)
        or first_of(config, "logits_soft_cap", text_config),
        n_layers=len(layers),
        max_positions=None if not isinstance(max_positions, int) else max_positions,
        attn_softcap=first_of(text_config, "attn_logit_softcapping", config),
        default_layers=attn_layers[-n_default:],
        head_transform=transform,
        attn_more=attn_more,
    )


def config_parts(config) -> ModelParts | None:
    """``model_parts`` of the model ``config`` describes, built on the meta device (no memory, no weights): the
    geometry the loaded model will have, for checks made before loading. None where that model cannot be built or
    read this way; the checks after loading then decide alone."""
    from transformers import AutoModelForCausalLM

    from ..sources.loading import quiet_transformers

    try:
        with torch.device("meta"), quiet_transformers():
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=False)
        return model_parts(model)
    except Exception:  # a shortcut only: whatever fails here (an op the meta device lacks), the load still checks
        return None

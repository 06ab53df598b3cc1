"""The pieces of a decoder-only Hugging Face model that nqpq needs, found without a table of class names.

transformers already says most of it: ``get_decoder()`` is the body, ``get_output_embeddings()`` the LM
head, the config carries the head counts (``attribute_map`` maps GPT-2's ``n_head`` and friends), the
logit soft-caps and the sliding windows. What it does not say directly is found structurally:

- the decoder layers are the body's ``nn.ModuleList`` with ``config.num_hidden_layers`` entries;
- a layer's attention module is the submodule whose ``forward`` looks its function up in
  ``ALL_ATTENTION_FUNCTIONS`` (that lookup is what crystallization hooks into; a model without it does
  not go through the attention interface and is refused);
- the final norm is the one child of the body with parameters registered after the layers.

``head_dim`` comes from the attention module (Gemma 2: 256, not hidden 2304 / 8 heads).
"""

from __future__ import annotations

import inspect
import operator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .errors import NqpqError

# The name the attention modules of transformers look their attention function up in.
_INTERFACE_LOOKUP = "ALL_ATTENTION_FUNCTIONS"


class UnsupportedModelError(NqpqError):
    """The model cannot be crystallized: not decoder-only, attention outside the interface, or an unsupported
    attention feature."""


@dataclass(frozen=True)
class ModelParts:
    """Where things are in a decoder-only causal LM, and its attention geometry."""

    family: str  # config.model_type
    layers: nn.ModuleList  # the decoder layers
    attn: list[nn.Module]  # the attention module of each layer
    body: nn.Module  # the base model: body(input_ids=..., use_cache=False).last_hidden_state
    final_norm: nn.Module  # applied to the last layer's output
    lm_head: nn.Module  # model.get_output_embeddings()
    logit_scale: float | None  # logits → logits · scale (Cohere: logit_scale; Granite: 1 / logits_scaling)
    final_logit_softcap: float | None  # logits → c·tanh(logits / c) (Gemma 2)
    n_layers: int
    n_heads: int  # query heads Hq
    n_kv_heads: int  # key/value heads Hkv (Hq % Hkv == 0)
    head_dim: int  # D
    max_positions: int | None
    sliding_window: list[int | None]  # per layer: keys i − w < j <= i, or None for full causal
    attn_softcap: float | None  # scores → c·tanh(s / c) before masking (Gemma 2)
    default_layers: tuple[int, ...]  # the last quarter of the layers (GPT-2 small: 9, 10, 11)


def as_index(value: object, what: str) -> int:
    """``value`` as a Python int, accepting numpy/torch integer scalars; bools and non-integers are refused."""
    is_bool = isinstance(value, bool) or (isinstance(value, Tensor) and value.dtype == torch.bool)
    try:
        if not is_bool:
            return operator.index(value)  # int, numpy integer, one-element integer tensor; numpy bool raises
    except TypeError:
        pass
    raise ValueError(f"{what} must be an int, got {type(value).__name__}")


def _uses_attention_interface(module: nn.Module) -> bool:
    forward = inspect.unwrap(type(module).forward)
    code = getattr(forward, "__code__", None)
    return code is not None and _INTERFACE_LOOKUP in code.co_names


def _decoder_layers(body: nn.Module, n_layers: int, name: str) -> nn.ModuleList:
    found = [m for m in body.children() if isinstance(m, nn.ModuleList) and len(m) == n_layers]
    if len(found) != 1:
        raise UnsupportedModelError(
            f"{name}: cannot find its decoder layers (one nn.ModuleList of config.num_hidden_layers={n_layers} "
            f"modules in {type(body).__name__}); found {len(found)}"
        )
    return found[0]


def _attention_module(layer: nn.Module, index: int, name: str) -> nn.Module:
    found = [m for m in layer.modules() if _uses_attention_interface(m)]
    if len(found) != 1:
        raise UnsupportedModelError(
            f"{name}: layer {index} ({type(layer).__name__}) has {len(found)} attention modules going through "
            "transformers' AttentionInterface; nqpq needs exactly one (attention computed outside the "
            "interface cannot be crystallized)"
        )
    return found[0]


def _final_norm(body: nn.Module, layers: nn.ModuleList, name: str) -> nn.Module:
    children = list(body.children())
    after = [m for m in children[children.index(layers) + 1 :] if any(True for _ in m.parameters())]
    if len(after) != 1:
        raise UnsupportedModelError(
            f"{name}: expected one module with parameters (the final norm) after the decoder layers in "
            f"{type(body).__name__}, found {[type(m).__name__ for m in after]}"
        )
    return after[0]


def _head_dim(attn: nn.Module, config) -> int | None:
    """The head dimension the attention module reshapes to (GPT-NeoX calls it head_size)."""
    for owner, key in ((attn, "head_dim"), (attn, "head_size"), (config, "head_dim")):
        value = getattr(owner, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _logit_scale(config) -> float | None:
    """The factor the causal LM's own forward multiplies its logits by, from the config attributes transformers
    reads for it: Cohere's ``logit_scale`` (``logits * logit_scale``), Granite's ``logits_scaling``
    (``logits / logits_scaling``). Without it the sweep's perplexities would not be the model's."""
    scale = getattr(config, "logit_scale", None)
    divisor = getattr(config, "logits_scaling", None)
    if scale is not None and divisor is not None:
        raise UnsupportedModelError(f"{type(config).__name__} has both logit_scale and logits_scaling")
    if divisor is not None:
        return 1.0 / float(divisor)
    return None if scale is None else float(scale)


def _layer_window(attn: nn.Module, config, index: int) -> int | None:
    """The sliding window the layer's attention hands the attention function, as transformers decides it."""
    # Per layer on the module (Gemma 2, Qwen2/3: None on full-attention layers), else model-wide (Mistral).
    window = attn.sliding_window if hasattr(attn, "sliding_window") else getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None and layer_types[index] != "sliding_attention":
        window = None  # a full-attention layer, whatever its module keeps (EXAONE 4 keeps the window on every one)
    return None if window is None else int(window)


def model_parts(model: nn.Module) -> ModelParts:
    """The layers, attention modules, norm, head and geometry of a decoder-only causal LM.

    Raises ``UnsupportedModelError`` for encoder-only and encoder-decoder models, models whose attention does
    not go through transformers' ``AttentionInterface``, and bidirectional attention.
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
    if not getattr(model, "_supports_attention_backend", False):
        raise UnsupportedModelError(
            f"{name}: its attention does not go through transformers' AttentionInterface, which nqpq hooks into"
        )
    body = model.get_decoder() if hasattr(model, "get_decoder") else None
    if not isinstance(body, nn.Module) or body is model:
        raise UnsupportedModelError(f"{name}: get_decoder() does not give the base model under the LM head")
    n_layers = int(config.num_hidden_layers)
    layers = _decoder_layers(body, n_layers, name)
    attn = [_attention_module(layer, i, name) for i, layer in enumerate(layers)]
    if not all(getattr(a, "is_causal", True) for a in attn):
        raise UnsupportedModelError(f"{name}: its attention is bidirectional; nqpq handles causal attention only")

    n_heads = int(config.num_attention_heads)
    n_kv_heads = getattr(config, "num_key_value_heads", None)
    n_kv_heads = n_heads if n_kv_heads is None else int(n_kv_heads)
    head_dims = {_head_dim(a, config) for a in attn}
    if len(head_dims) != 1 or None in head_dims:
        raise UnsupportedModelError(f"{name}: cannot read one head_dim from its attention modules ({head_dims})")
    head_dim = int(head_dims.pop())
    for a in attn:  # DeepSeek's multi-head latent attention: q/k heads wider than v heads, no single head_dim
        dims = {k: getattr(a, k) for k in ("qk_head_dim", "v_head_dim") if isinstance(getattr(a, k, None), int)}
        if any(d != head_dim for d in dims.values()):
            raise UnsupportedModelError(
                f"{name}: its attention has heads of different widths ({dims}, head_dim {head_dim}); nqpq needs "
                "one head dimension D shared by q, k and v"
            )
    if n_kv_heads < 1 or n_heads % n_kv_heads:
        raise UnsupportedModelError(f"{name}: {n_heads} query heads are not a multiple of {n_kv_heads} kv heads")
    max_positions = getattr(config, "max_position_embeddings", None)
    n_default = max(1, n_layers // 4)
    return ModelParts(
        family=str(config.model_type),
        layers=layers,
        attn=attn,
        body=body,
        final_norm=_final_norm(body, layers, name),
        lm_head=lm_head,
        logit_scale=_logit_scale(config),
        final_logit_softcap=getattr(config, "final_logit_softcapping", None),
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        head_dim=head_dim,
        max_positions=None if max_positions is None else int(max_positions),
        sliding_window=[_layer_window(a, config, i) for i, a in enumerate(attn)],
        attn_softcap=getattr(config, "attn_logit_softcapping", None),
        default_layers=tuple(range(n_layers - n_default, n_layers)),
    )

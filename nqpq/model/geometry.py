"""The attention geometry of each decoder layer, read from its attention module first and its config second.

A layer's attention module knows its own layer (Gemma 4's head_dim, dots3's head counts, DeepSeek's multi-head
latent attention with q/k heads wider than v heads), so it is asked before the config. What the module's forward
code passes to the attention function (a learned sink) is read from that code, not from a table of names.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

from torch import nn

from ..errors import UnsupportedModelError

# The name the attention modules of transformers look their attention function up in.
_INTERFACE_LOOKUP = "ALL_ATTENTION_FUNCTIONS"

# The keywords under which transformers' attention modules hand their function learned sink logits.
_SINK_KWARGS = ("s_aux", "sinks")  # gpt-oss's per-head logits, Inkling 2's per-row ones


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


def forward_code(module: nn.Module):
    forward = inspect.unwrap(type(module).forward)
    return getattr(forward, "__code__", None)


def uses_attention_interface(module: nn.Module) -> bool:
    code = forward_code(module)
    return code is not None and _INTERFACE_LOOKUP in code.co_names


def _passes_learned_sink(module: nn.Module) -> bool:
    """Whether the module's forward hands its attention function ``s_aux=`` or ``sinks=`` (a keyword name of one of
    its calls)."""
    code = forward_code(module)
    if code is None:
        return False
    return any(c in _SINK_KWARGS or (isinstance(c, tuple) and any(k in c for k in _SINK_KWARGS))
               for c in code.co_consts)


def config_value(owner, key: str):
    """``getattr(owner, key, None)``, also None where a config refuses the read (dots3's per-layer values)."""
    try:
        return getattr(owner, key, None)
    except Exception:  # noqa: BLE001
        return None


def first_of(config, key: str, text_config):
    """``key`` from the model's config, else from its text config (a multimodal wrapper keeps it there)."""
    value = config_value(config, key)
    return config_value(text_config, key) if value is None else value


def _int_attr(owners, keys, index: int) -> int | None:
    """The first positive int among ``owner.key`` (a per-layer list is indexed by the layer)."""
    for owner in owners:
        for key in keys:
            value = config_value(owner, key)
            if isinstance(value, (list, tuple)) and len(value) > index:
                value = value[index]
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    return None


def layer_geometry(attn: nn.Module, config, index: int, name: str) -> LayerGeometry:
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


def _layer_window(attn: nn.Module, config, index: int) -> int | None:
    """The sliding window the layer's attention hands the attention function, as transformers decides it."""
    # Per layer on the module (Gemma 2, Qwen2/3: None on full-attention layers), else model-wide (Mistral).
    window = attn.sliding_window if hasattr(attn, "sliding_window") else config_value(config, "sliding_window")
    layer_types = config_value(config, "layer_types")
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
        layer_types = config_value(owner, "layer_types")
        if layer_types is None or index >= len(layer_types):
            continue
        if layer_types[index] != "chunked_attention":
            return None
        chunk = config_value(owner, "attention_chunk_size")
        if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
            raise UnsupportedModelError(
                f"layer {index} is a chunked-attention layer but its config has no attention_chunk_size >= 1 "
                f"(got {chunk!r})")
        return int(chunk)
    return None

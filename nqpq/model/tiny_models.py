"""A tiny random model of every causal-LM family transformers ships: the family's default config shrunk
(``tiny_config``: widths, layers, heads and per-layer patterns cut down, the family's own structure kept) and its
causal-LM class (``model_class``). The census (``nqpq.model.census``, ``python -m benchmarks.census``) and the tests
of the model families build their models from them. transformers is imported inside the functions: importing this
module costs nothing.
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only: transformers is imported where it is used
    from transformers import PretrainedConfig

VOCAB = 256
MAX_LAYERS = 6  # enough for the attention layer of the usual hybrid patterns (Jamba: offset 4)

# Config attributes the census shrinks, when the family's default config has them with an int value.
_SIZES = {
    "hidden_size": 64, "d_model": 64, "n_embd": 64, "embed_dim": 64, "dim": 64,
    "intermediate_size": 96, "ffn_dim": 96, "n_inner": 96, "ffn_hidden_size": 96, "d_ff": 96,
    "num_attention_heads": 4, "n_head": 4, "n_heads": 4, "num_heads": 4, "encoder_attention_heads": 4,
    "decoder_attention_heads": 4, "head_dim": 16, "kv_channels": 16, "attention_head_dim": 16,
    "vocab_size": VOCAB, "max_position_embeddings": 128, "n_positions": 128, "n_ctx": 128, "seq_length": 128,
    "sliding_window": 8, "attention_window_size": 8, "attention_chunk_size": 8,
    # mixture of experts
    "num_experts": 4, "num_local_experts": 4, "n_routed_experts": 4, "moe_num_experts": 4, "num_routed_experts": 4,
    "num_experts_per_tok": 2, "moe_topk": 2, "top_k": 2, "num_experts_per_token": 2, "moe_k": 2,
    "moe_intermediate_size": 32, "expert_intermediate_size": 32, "shared_expert_intermediate_size": 32,
    "moe_shared_expert_intermediate_size": 32, "n_shared_experts": 1, "num_shared_experts": 1, "n_group": 1,
    "topk_group": 1,
    # multi-head latent attention: q/k heads 16 + 8 wide, v heads 16
    "q_lora_rank": 16, "kv_lora_rank": 16, "qk_rope_head_dim": 8, "qk_nope_head_dim": 16, "v_head_dim": 16,
    # index_topk at least the census's 24 tokens: DSA then attends densely, as it does on blocks up to index_topk
    "index_head_dim": 16, "index_n_heads": 2, "index_topk": 32,
    # linear attention, SSM and recurrent layers of hybrids
    "linear_num_key_heads": 2, "linear_num_value_heads": 4, "linear_key_head_dim": 16, "linear_value_head_dim": 16,
    "mamba_d_state": 16, "state_size": 16, "ssm_state_size": 16, "mamba_n_heads": 4, "mamba_d_head": 16,
    "mamba_head_dim": 16, "mamba_n_groups": 1, "n_groups": 1, "mamba_expand": 2, "mamba_d_ssm": 128,
    "time_step_rank": 8, "lru_width": 64, "num_linear_heads": 4,
    # multimodal towers, never run on text
    "vision_hidden_size": 64, "projector_hidden_size": 64, "text_hidden_size": 64,
    # per-layer inputs (Gemma 3n/4), byte-latent and XLM vocabularies, Kimi's linear heads
    "vocab_size_per_layer_input": VOCAB, "hidden_size_per_layer_input": 16, "n_words": VOCAB,
    "encoder_hash_byte_group_vocab": 64, "hidden_size_global": 64, "linear_head_dim": 16, "qk_head_dim": 24,
    "local_attention_window_len": 8, "adapter_in_dim": 64, "index_num_heads": 2, "num_expert_group": 1,
    "linear_num_heads": 4,
}
# Attributes some families' defaults leave None for their checkpoints to fill (a model cannot be built without).
_FILL_NONE = {"head_dim": 16, "num_key_value_heads": 2, "num_experts_per_tok": 2, "n_routed_experts": 4,
              "n_shared_experts": 1, "moe_intermediate_size": 32, "rotary_dim": 8,
              # Qwen4-exp's indexer
              "indexer_n_heads": 2, "indexer_kv_heads": 1, "indexer_head_dim": 16, "indexer_budget": 8,
              "indexer_compress_ratio": 2}
# What a few families need to construct beyond their defaults (their defaults describe no buildable model).
_FAMILY_KWARGS = {
    "lfm2_moe": {"layer_types": ["conv", "conv", "full_attention", "conv", "conv", "full_attention"]},
    "bamba": {"attn_layer_indices": [2, 5]},
    "zamba2": {"layers_block_type": ["linear_attention", "linear_attention", "hybrid"] * 2},
    "granitemoehybrid": {"layer_types": ["linear_attention", "linear_attention", "attention"] * 2},
    # the last two layers reuse the keys and values of the last layer of their type before them
    "gemma3n_text": {"layer_types": ["sliding_attention", "full_attention"] * 3, "num_kv_shared_layers": 2},
    "gemma3n": {"text_config": {"layer_types": ["sliding_attention", "full_attention"] * 3,
                                "num_kv_shared_layers": 2}},
    # Zamba ties every hybrid layer's shared transformer to the first one's: the default pattern's first 6 layers
    # hold one hybrid layer, and the tie then has no other layer to match (post_init refuses it). Two, as at scale.
    "zamba": {"layers_block_type": ["linear_attention", "linear_attention", "hybrid"] * 2},
    # Its default config leaves the per-layer-type rotary parameters to the checkpoint (the rotary module reads
    # rope_parameters[layer type]); text positions are the same on the three M-RoPE axes, split 4/2/2 of 8.
    "cohere_compass_text": {"rope_parameters": {"full_attention": {
        "rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 2, 2]}}},
    # Its attention reads attn_config.rope_theta, which DbrxAttentionConfig no longer declares, and clamps q, k, v
    # to ±clip_qkv unconditionally (torch.clamp refuses two None bounds); the checkpoints' attn_config (and
    # transformers' own DBRX test) carry both. Entries for a sub-config join that sub-config.
    "dbrx": {"attn_config": {"rope_theta": 500000.0, "clip_qkv": 8.0}},
    # Axial position embeddings: the widths of the two axes sum to hidden_size (the default's 64 + 192 of 256).
    "reformer": {"axial_pos_embds_dim": [16, 48]},
    # X-MOD routes every token through one language adapter: the input's, else the config's default language,
    # which the default config leaves unset (users call set_default_language); its one language, as set there.
    "xmod": {"default_language": "en_XX"},
}
# What a few families' default configs need to be valid at all (the config refuses its own defaults).
_DEFAULT_KWARGS = {
    # Gemma 4's assistant (drafter) builds a default gemma4_text config with per-layer inputs, which it then
    # refuses (its inputs are the target model's embedding and hidden state): no per-layer inputs, as checkpoints.
    "gemma4_assistant": {"text_config": {"hidden_size_per_layer_input": 0, "vocab_size_per_layer_input": 0}},
}
# Sizes some configs take as keyword arguments only (not fields): Gemma 4's full-attention head width.
_POPPED = {"global_head_dim": 32}
_LAYER_KEYS = ("num_hidden_layers", "n_layer", "n_layers", "num_layers", "decoder_layers", "encoder_layers")
_TOKEN_IDS = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}


def _shrunk_kwargs(default, text: bool) -> dict:
    """Keyword arguments that shrink ``default`` (a config instance) and keep its family's own structure."""
    values = default.to_dict()
    kwargs: dict = {}
    for key, value in values.items():
        if isinstance(value, bool) or not isinstance(value, (int, type(None))):
            continue
        if value is None and key in _FILL_NONE:
            kwargs[key] = _FILL_NONE[key]
        elif key in _SIZES and value is not None and value > 0:
            kwargs[key] = _SIZES[key] if key == "head_dim" else min(value, _SIZES[key])
        elif key in _LAYER_KEYS:
            kwargs[key] = min(value, MAX_LAYERS if text else 1)
        elif key in _TOKEN_IDS and text:
            kwargs[key] = _TOKEN_IDS[key]
    if "qk_rope_head_dim" in kwargs and "head_dim" in values:  # MLA configs keep the rotary width as head_dim
        kwargs["head_dim"] = kwargs["qk_rope_head_dim"]
    # Head counts: GQA where the family is grouped, MHA where it is not.
    heads = kwargs.get("num_attention_heads")
    kv = values.get("num_key_value_heads")
    if heads and isinstance(kv, int) and not isinstance(kv, bool):
        kwargs["num_key_value_heads"] = heads if kv >= values.get("num_attention_heads", kv) else 2
    n_layers = next((kwargs[k] for k in _LAYER_KEYS if k in kwargs), None)
    for key, value in values.items():  # per-layer lists: the first n_layers of the family's own pattern
        old_n = next((values[k] for k in _LAYER_KEYS if k in values), None)
        if n_layers and isinstance(value, list) and old_n and len(value) == old_n and key not in kwargs:
            kwargs[key] = value[:n_layers]
    if "rotary_dim" in values and isinstance(values["rotary_dim"], int):  # GPT-J, CodeGen: at most the head width
        kwargs["rotary_dim"] = 8
    # Mamba-2 heads tile the expanded width: heads · head width = expand · hidden.
    for heads, width, expand in (("mamba_n_heads", "mamba_d_head", "mamba_expand"),
                                 ("num_heads", "head_dim", "expand")):
        if all(isinstance(values.get(k), int) for k in (heads, width, expand)) and (
                "state_size" in values or "mamba_d_state" in values):
            kwargs[width] = 16
            kwargs[heads] = values[expand] * kwargs.get("hidden_size", values.get("hidden_size", 64)) // 16
    for key, value in _POPPED.items():  # keyword-only sizes a config's __init__ pops (Gemma 4: global_head_dim)
        try:
            source = inspect.getsource(inspect.getmodule(type(default)))
        except (OSError, TypeError):
            break
        if f'"{key}"' in source:
            kwargs[key] = value
    # A count of layers that is the whole stack stays the whole stack (the Gemma 4 assistants share the key/value
    # states of every layer with their target model).
    old_n = next((values[k] for k in _LAYER_KEYS if k in values), None)
    if n_layers and old_n and values.get("num_kv_shared_layers") == old_n:
        kwargs["num_kv_shared_layers"] = n_layers
    if "first_k_dense_replace" in values and isinstance(values["first_k_dense_replace"], int):
        kwargs["first_k_dense_replace"] = min(values["first_k_dense_replace"], 1)
    return kwargs


def model_class(model_type: str) -> type:
    """The causal-LM class transformers maps ``model_type`` to."""
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return getattr(transformers, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type])


def tiny_config(model_type: str) -> PretrainedConfig:
    """The family's default config, shrunk (sub-configs too: the text config like the model, towers to 1 layer)."""
    cls = model_class(model_type).config_class  # Musicgen's causal LM takes its decoder's config, not the model's
    default = cls(**_DEFAULT_KWARGS.get(model_type, {}))
    # is_decoder: what a user sets to run a BERT-style model as a causal LM (their default is bidirectional).
    family = _FAMILY_KWARGS.get(model_type, {})
    kwargs = {**_shrunk_kwargs(default, text=True), "is_decoder": True, **family}
    for name in getattr(cls, "sub_configs", {}) or {}:
        sub = getattr(default, name, None)
        if sub is None or not hasattr(sub, "to_dict"):
            continue
        text = name in ("text_config", "language_config", "llm_config", "decoder_config")
        extra = family.get(name, {})  # the family's own entries for this sub-config (DBRX: attn_config.rope_theta)
        # The instance the parent built, shrunk; without its per-layer overrides (Gemma 4's per_layer_config): keyed
        # by the indices of the full stack, they are derived from the fields the shrinking sets (rebuilt, not kept).
        built = {k: v for k, v in sub.to_dict().items() if k != "per_layer_config"}
        try:
            small = type(sub)(**{**built, **_shrunk_kwargs(sub, text=text), **extra})
        except Exception:  # noqa: BLE001 - else the sub-config's own defaults, shrunk
            small = type(sub)(**_shrunk_kwargs(type(sub)(), text=text), **extra)
        for key, value in vars(sub).items():  # values the parent set on it outside its fields
            if key not in vars(small):
                setattr(small, key, value)
        kwargs[name] = small
    return cls(**kwargs)

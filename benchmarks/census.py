"""Every causal LM the installed transformers ships, tried as a new user would: exact, or refused by name.

    python -m benchmarks.census                       # every family, writes benchmarks/results/census.md
    python -m benchmarks.census --families llama gpt2 --out -   # a few, table to stdout

For each entry of ``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`` a tiny random config is built from the family's own
defaults (shrunk: hidden 64, 4 heads of 16, at most 6 layers, 4 experts, ...), the model is built from it in
float32 and run on 2 × 24 random tokens, no mask, under eager (at the default weight scale and with the
attention weights made sharper) and sdpa (default scale). A family whose forward takes more than a row of tokens
is fed what it takes (``model_inputs``; Musicgen: one row per codebook; the Gemma 4 assistants: their target
model's state). Outcomes:

- EXACT: full mode on the last attention layer and on every attention layer gives the model's logits
  (rel ≤ 1e-5, max |Δ| / max |logit|); the prefix replay (``PrefixRunner``, every layer from the first attention
  layer up, crystallized in full mode) gives the losses of the model's own logits; top-1 and low-rank on the last
  attention layer equal a float64 per-head computation on the q, k, v that layer handed its attention function.
- REFUSED: nqpq declined with a one-line reason (quoted).
- WRONG: it ran and differed (which check, by how much).
- CRASH: an exception that is not nqpq's refusal (type and message), or the worker died or hung.
- UNBUILT: the census could not build the family (its config, its model, or the model's own forward failed):
  not a verdict on nqpq.

Families run in worker subprocesses (one family after another; a worker that dies or hangs is replaced and the
family charged a CRASH), ``--jobs`` at a time.
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import selectors
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

TOL = 1e-5
T, B = 24, 2
VOCAB = 256
MAX_LAYERS = 6  # enough for the attention layer of the usual hybrid patterns (Jamba: offset 4)
SHARPEN = 4.0  # the "sharp" weight scale: every Linear inside an attention module times this
FAMILY_TIMEOUT_S = 180.0
RESULTS = Path(__file__).resolve().parent / "results" / "census.md"
OUTCOMES = ("EXACT", "REFUSED", "WRONG", "CRASH", "UNBUILT")

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


# ---------------------------------------------------------------------------------------------- tiny configs

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


def _model_class(model_type: str):
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return getattr(transformers, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type])


def tiny_config(model_type: str):
    """The family's default config, shrunk (sub-configs too: the text config like the model, towers to 1 layer)."""
    cls = _model_class(model_type).config_class  # Musicgen's causal LM takes its decoder's config, not the model's
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


# ---------------------------------------------------------------------------------------------- checks

def _rel(got, want) -> float:
    import torch

    got, want = got.double(), want.double()
    if got.shape != want.shape:
        return math.inf
    if not bool(torch.isfinite(got).all() and torch.isfinite(want).all()):
        return math.inf if not torch.equal(got.isnan(), want.isnan()) else 0.0
    return (got - want).abs().max().item() / max(want.abs().max().item(), 1e-30)


def _chunk_of(module, layer: int) -> int | None:
    """The chunk size of a Llama 4 chunked-attention layer, read from the module's config as the model's forward
    reads it to build the mask (not from nqpq's geometry: the reference stays independent), else None."""
    config = module.config
    types = getattr(config, "layer_types", None)
    if types is None or layer >= len(types) or types[layer] != "chunked_attention":
        return None
    return config.attention_chunk_size


def _reference(q, k, v, scale, window, softcap, s_aux, mode, basis, d_r, chunk=None, mask=None, position_bias=None):
    """The float64 per-head definition of top-1 / low-rank on one call's q [B, Hq, T, Dqk], k [B, Hkv, Tk, Dqk],
    v [B, Hkv, Tk, Dv]; a learned sink (``s_aux`` [Hq], or Inkling 2's ``sinks`` [B, Hq, T, 1]) is a key of value
    zero whose mass joins the ground state.
    ``mask``, the attention mask the call received (the model's, or one its attention module built), is applied as
    transformers' eager attention applies it: scores (+ ``position_bias``) + mask, or -inf where a bool mask is
    False; it alone decides the keys a row sees (a key masked to the float32 minimum, as transformers masks, is
    hidden). Without one: causal over Tk = T keys (the window, the chunk).
    Returns (out [B, T, Hq, Dv], mask [B, T, Hq] of the rows whose argmax has a clear margin)."""
    import torch

    Bq, Hq, Tq, _ = q.shape
    G = Hq // k.shape[1]
    kk = k.double().repeat_interleave(G, dim=1)
    vv = v.double().repeat_interleave(G, dim=1)
    s = q.double() @ kk.transpose(-1, -2) * scale
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    if position_bias is not None:
        s = s + position_bias.double()
    if mask is None:
        i = torch.arange(Tq)
        visible = i[None, :] <= i[:, None]
        if window is not None:
            visible &= i[None, :] > i[:, None] - window
        if chunk is not None:  # Llama 4's chunked layers: only the keys of the query's own chunk
            visible &= i[None, :] // chunk == i[:, None] // chunk
    elif mask.dtype == torch.bool:
        visible = mask.expand_as(s)
    else:
        s = s + mask.double()
        visible = (s > torch.finfo(torch.float32).min / 2).expand_as(s)
    s = s.masked_fill(~visible, float("-inf"))
    if s_aux is not None:
        sink = s_aux.double()  # one logit per head (gpt-oss), or per row [B, Hq, T, 1] (Inkling 2's sinks)
        sink = (sink.view(1, Hq, 1, 1) if sink.dim() == 1 else sink.reshape(Bq, Hq, Tq, 1)).expand(Bq, Hq, Tq, 1)
        p = torch.cat([s, sink], dim=-1).softmax(-1)
        mass, p = p[..., -1:], p[..., :-1]
    else:
        p, mass = s.softmax(-1), torch.zeros(Bq, Hq, Tq, 1, dtype=torch.float64)
    ctx = p @ vv
    top2 = s.topk(min(2, s.shape[-1]), dim=-1)
    star = s.argmax(-1, keepdim=True)  # the first maximum, as the op takes it
    ground = (1 - mass) * vv.gather(2, star.expand(-1, -1, -1, vv.shape[-1]))
    out = ground
    if mode == "lowrank":
        P = basis[:, :, :d_r].double()  # [Hq, Dv, r]
        out = ground + ((ctx - ground) @ P) @ P.transpose(-1, -2)
    # Rows 1..: a clear maximum (row 0 sees one key). Margin relative to the call's largest |score|.
    gap = (top2.values[..., 0] - top2.values[..., -1]) if s.shape[-1] > 1 else torch.ones(Bq, Hq, Tq)
    finite = s.masked_fill(~visible, 0).abs().amax()
    # A row whose visible scores are all equal (Zaya's keys are zero at init) ties in every precision: first key.
    flat = s.masked_fill(~visible, float("inf")).amin(-1) == top2.values[..., 0]
    clear = (gap > 1e-4 * max(finite.item(), 1e-30)) | (visible.sum(-1) == 1) | flat
    return out.permute(0, 2, 1, 3), clear.permute(0, 2, 1)


class _Spy:
    """Records the crystallized calls of a model (inside ``crystallize``): q, k, v, their kwargs and the output."""

    def __init__(self, model):
        from transformers import AttentionInterface

        self.name = "nqpq_" + model.config._attn_implementation
        self.mapping = AttentionInterface._global_mapping
        self.calls: list = []

    def __enter__(self):
        self.real = self.mapping[self.name]

        def spy(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
            out = self.real(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
            self.calls.append((module, query, key, value, scaling, {**kwargs, "attention_mask": attention_mask},
                               out[0]))
            return out

        self.mapping[self.name] = spy
        return self

    def __exit__(self, *exc):
        self.mapping[self.name] = self.real


def model_inputs(model, ids) -> dict:
    """What the model's forward takes for the token ids ``ids``: the ids, except for a drafter that runs on its target
    model's state (a config with ``backbone_hidden_size``: the Gemma 4 assistants). That one is fed as transformers'
    candidate generator feeds it: one query per row, its input the target's token embedding beside the target's
    last hidden state, and every layer's keys and values the target's of its layer type, for the ``T`` tokens before
    it (random here, seeded, like the model's weights: the census has no target model)."""
    import torch

    backbone = getattr(model.config, "backbone_hidden_size", None)
    if backbone is None:
        return {"input_ids": ids}
    g = torch.Generator().manual_seed(1)
    n_rows, n_keys = ids.shape
    shapes = {}  # layer type → (kv heads, head width) of the layers that reuse the target's key/value states
    for module in model.modules():
        if getattr(module, "is_kv_shared_layer", False):
            kv_heads = module.config.num_attention_heads // module.num_key_value_groups
            shapes[module.layer_type] = (kv_heads, module.head_dim)
    return {
        "inputs_embeds": torch.randn(n_rows, 1, 2 * backbone, generator=g),
        "shared_kv_states": {kind: (torch.randn(n_rows, h, n_keys, d, generator=g),
                                    torch.randn(n_rows, h, n_keys, d, generator=g))
                             for kind, (h, d) in shapes.items()},
        "position_ids": torch.full((n_rows, 1), n_keys - 1, dtype=torch.long),  # the last target token's, as there
    }


def _logits(model, inputs: dict):
    import torch

    with torch.no_grad():
        return model(**inputs, use_cache=False).logits


def _model_losses(logits, ids):
    import torch.nn.functional as F

    return F.cross_entropy(logits[:, :-1].double().flatten(0, 1), ids[:, 1:].flatten(), reduction="none").view(
        ids.shape[0], -1).mean(1)


def _checks(model, parts, ids, tag: str, modes: bool) -> dict[str, float]:
    """rel errors of every check under the model's current implementation and weights, on the token ids ``ids``
    (fed as ``model_inputs`` feeds them)."""
    import torch

    from nqpq import PrefixRunner, crystallize

    out: dict[str, float] = {}
    attn = parts.attn_layers
    inputs = model_inputs(model, ids)
    base = _logits(model, inputs)
    with crystallize(model, [attn[-1]], mode="full", backend="torch"):
        out[f"{tag} full last"] = _rel(_logits(model, inputs), base)
    with crystallize(model, attn, mode="full", backend="torch"):
        out[f"{tag} full all"] = _rel(_logits(model, inputs), base)
    want = _model_losses(base, ids)
    starts = sorted({attn[0], attn[-1]})
    runner = PrefixRunner(model, ids, [slice(0, ids.shape[0])], start=starts)
    out[f"{tag} replay baseline"] = _rel(runner.capture_baseline(), want)
    for s in starts:
        with crystallize(model, [li for li in attn if li >= s], mode="full", backend="torch"):
            out[f"{tag} replay full from {s}"] = _rel(runner.losses(start=s), want)
    if modes:
        # The last attention layer, and the last chunked one where it is another (Llama 4's last layer is a full one).
        chunked = [li for li in attn if parts.geometry[li].attention_chunk is not None]
        for li in sorted({attn[-1], *chunked[-1:]}):
            geo = parts.geometry[li]
            g = torch.Generator().manual_seed(li)
            basis = torch.linalg.qr(torch.randn(geo.n_heads, geo.v_dim, geo.v_dim, generator=g))[0]
            d_r = max(1, geo.v_dim // 4)
            for mode in ("top1", "lowrank"):
                with (crystallize(model, [li], mode=mode, basis={li: basis}, d_r=d_r, backend="torch"),
                      _Spy(model) as spy):
                    _logits(model, inputs)
                if not spy.calls:
                    raise RuntimeError(f"layer {li} was crystallized but its attention function was never called")
                worst = 0.0
                for module, q, k, v, scaling, kwargs, got in spy.calls:
                    scale = scaling if scaling is not None else q.shape[-1] ** -0.5
                    want_out, clear = _reference(q, k, v, scale, kwargs.get("sliding_window"), kwargs.get("softcap"),
                                                 kwargs.get("s_aux", kwargs.get("sinks")), mode, basis, d_r,
                                                 _chunk_of(module, li),
                                                 kwargs["attention_mask"], kwargs.get("position_bias"))
                    if clear.float().mean().item() < 0.5:
                        raise RuntimeError(f"{tag} {mode}: fewer than half the rows have a clear argmax")
                    diff = (got.double() - want_out).abs().amax(-1)[clear]
                    worst = max(worst, diff.max().item() / max(want_out.abs().max().item(), 1e-30))
                out[f"{tag} {mode} layer {li}"] = worst
    return out


def _sharpen(parts) -> None:
    import torch

    with torch.no_grad():
        for module in parts.attn.values():
            for sub in module.modules():
                if isinstance(sub, torch.nn.Linear):
                    sub.weight.mul_(SHARPEN)


def _nqpq_refusal(err: BaseException) -> bool:
    """Whether ``err`` is nqpq declining with a message: an NqpqError, or a ValueError/TypeError raised by nqpq's
    own code (a checked argument, an unsupported mask), never one from transformers or torch."""
    from nqpq.errors import NqpqError

    if isinstance(err, NqpqError):
        return True
    if not isinstance(err, (ValueError, TypeError)):
        return False
    frames = traceback.extract_tb(err.__traceback__)
    here = str(Path(__file__).resolve().parent.parent / "nqpq")
    return bool(frames) and frames[-1].filename.startswith(here)


def one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text[:400]


class _NoTimm:
    """Stands in for ``AutoModel`` in a multimodal model's module while it is built: a sub-model whose class needs
    timm (not installed here: it pulls torchvision; Gemma 3n's vision tower) is built as an empty module that
    refuses to run. The census scores text only, so the tower is never called; everything else is the real code."""

    def __init__(self, auto):
        self.auto = auto

    def from_config(self, config, *args, **kwargs):
        import torch

        try:
            return self.auto.from_config(config, *args, **kwargs)
        except ImportError as err:
            if "timm" not in str(err):
                raise

            class TimmTowerNotBuilt(torch.nn.Module):
                def forward(self, *args, **kwargs):
                    raise RuntimeError(f"{type(config).__name__}'s tower was not built (timm is not installed)")

            return TimmTowerNotBuilt()


def _build(model_type: str, config):
    """The family's model from ``config`` (eager attention, seed 0); a timm tower (only under a multimodal wrapper)
    left unbuilt when timm is missing. Returns (model, the note for the table's structure column)."""
    import torch

    cls = _model_class(model_type)
    module = sys.modules[cls.__module__]
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            return cls._from_config(config, attn_implementation="eager"), ""
    except ImportError as err:
        if "timm" not in str(err) or not hasattr(module, "AutoModel"):
            raise
    auto = module.AutoModel
    module.AutoModel = _NoTimm(auto)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            return cls._from_config(config, attn_implementation="eager"), "vision tower not built (needs timm)"
    finally:
        module.AutoModel = auto


def census_family(model_type: str) -> dict:
    """One family's outcome: {family, cls, outcome, detail, attn_layers, errors}."""
    import torch
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    from nqpq.model.parts import model_parts

    row = {"family": model_type, "cls": MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type], "outcome": None,
           "detail": "", "structure": "", "errors": {}}
    try:
        config = tiny_config(model_type)
    except Exception as err:  # noqa: BLE001
        return {**row, "outcome": "UNBUILT", "detail": f"config: {type(err).__name__}: {one_line(err)}"}
    try:
        model, note = _build(model_type, config)
        model = model.float().eval()
        head = model.get_output_embeddings()
        vocab = head.weight.shape[0] if isinstance(getattr(head, "weight", None), torch.Tensor) else VOCAB
        # Musicgen's decoders take one row of codes per codebook: [B · num_codebooks, T] (their documented shape).
        rows = B * getattr(config, "num_codebooks", 1)
        ids = torch.randint(3, min(vocab, VOCAB), (rows, T), generator=torch.Generator().manual_seed(0))
        _logits(model, model_inputs(model, ids))
    except Exception as err:  # noqa: BLE001
        return {**row, "outcome": "UNBUILT", "detail": f"model: {type(err).__name__}: {one_line(err)}"}
    errors: dict[str, float] = {}
    try:
        parts = model_parts(model)
        geos = {(g.n_heads, g.n_kv_heads, g.qk_dim, g.v_dim) for g in parts.geometry.values()}
        gaps = len(parts.attn_layers) < parts.n_layers
        row["structure"] = "; ".join(filter(None, [
            note,
            f"wrapper {parts.wrapper} → {parts.family}" if parts.wrapper else "",
            f"attention layers {list(parts.attn_layers)} of {parts.n_layers}" if gaps else "",
            "per-layer geometry" if len(geos) > 1 else "",
            "learned sinks" if any(g.learned_sink for g in parts.geometry.values()) else "",
            "q/k width ≠ v width" if any(g.qk_dim != g.v_dim for g in parts.geometry.values()) else "",
            "attention chunks" if any(g.attention_chunk for g in parts.geometry.values()) else "",
            "a transform before the LM head" if parts.head_transform is not None else "",
        ]))
        errors.update(_checks(model, parts, ids, "eager", modes=True))
        _sharpen(parts)
        errors.update(_checks(model, parts, ids, "eager sharp", modes=True))
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                sdpa = _model_class(model_type)._from_config(config, attn_implementation="sdpa")
        except (ValueError, ImportError):  # the family has no sdpa path: eager alone decides
            sdpa = None
        if sdpa is not None:
            errors.update(_checks(sdpa.float().eval(), model_parts(sdpa), ids, "sdpa", modes=False))
    except Exception as err:  # noqa: BLE001 - classified: nqpq's refusal, or a crash
        if _nqpq_refusal(err):
            return {**row, "outcome": "REFUSED", "detail": one_line(err), "errors": errors}
        else:
            where = traceback.extract_tb(err.__traceback__)[-1]
            return {**row, "outcome": "CRASH", "errors": errors,
                    "detail": f"{type(err).__name__}: {one_line(err)} ({Path(where.filename).name}:{where.lineno})"}
    bad = {k: v for k, v in errors.items() if not v <= TOL}
    if bad:
        return {**row, "outcome": "WRONG", "errors": errors,
                "detail": ", ".join(f"{k} {v:.1e}" for k, v in bad.items())}
    return {**row, "outcome": "EXACT", "errors": errors, "detail": f"max rel {max(errors.values()):.1e}"}


# ---------------------------------------------------------------------------------------------- workers

def _worker(families: list[str]) -> None:
    """Run ``families`` one after another, one JSON line per event on stdout."""
    import torch

    torch.set_num_threads(1)
    import warnings

    warnings.filterwarnings("ignore")
    from transformers.utils import logging

    logging.set_verbosity_error()
    for family in families:
        print(json.dumps({"start": family}), flush=True)
        t = time.perf_counter()
        try:
            row = census_family(family)
        except Exception as err:  # noqa: BLE001 - the census itself must go on
            row = {"family": family, "outcome": "CRASH", "detail": f"{type(err).__name__}: {one_line(err)}"}
        row["seconds"] = round(time.perf_counter() - t, 2)
        print(json.dumps({"done": row}), flush=True)


def run_census(families: list[str], jobs: int = 2, timeout: float = FAMILY_TIMEOUT_S, say=print) -> list[dict]:
    """Every family's row, each run in a worker subprocess; a worker that dies or hangs costs its family a CRASH."""
    todo = list(families)
    results: dict[str, dict] = {}
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    root = str(Path(__file__).resolve().parent.parent)
    running: dict = {}  # proc → {"queue": [...], "current": str | None, "since": float}
    sel = selectors.DefaultSelector()

    def launch(queue: list[str]) -> None:
        if not queue:
            return
        proc = subprocess.Popen([sys.executable, "-m", "benchmarks.census", "--worker", *queue], cwd=root, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        running[proc] = {"queue": list(queue), "current": None, "since": time.monotonic()}
        sel.register(proc.stdout, selectors.EVENT_READ, proc)

    def finish(proc, reason: str | None) -> None:
        state = running.pop(proc)
        sel.unregister(proc.stdout)
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        rest = [f for f in state["queue"] if f not in results]
        if reason is not None and state["current"] is not None:
            fam = state["current"]
            results[fam] = {"family": fam, "outcome": "CRASH", "detail": reason, "errors": {}}
            say(f"  {fam:28s} CRASH {reason}")
            rest = [f for f in rest if f != fam]
        launch(rest)

    shares = [todo[i::jobs] for i in range(jobs)]
    for share in shares:
        launch(share)
    while running:
        for key, _ in sel.select(timeout=1.0):
            proc = key.data
            line = proc.stdout.readline()
            if not line:
                code = proc.wait()
                finish(proc, None if code == 0 and running[proc]["current"] is None
                       else f"the worker died (exit status {code}) on this family")
                continue
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                continue  # a family printed something of its own
            state = running[proc]
            if "start" in event:
                state["current"], state["since"] = event["start"], time.monotonic()
            elif "done" in event:
                row = event["done"]
                results[row["family"]] = row
                state["current"] = None
                say(f"  {row['family']:28s} {row['outcome']:8s} {row['seconds']:6.1f}s  {row['detail'][:150]}")
        now = time.monotonic()
        for proc, state in list(running.items()):
            if state["current"] is not None and now - state["since"] > timeout:
                finish(proc, f"no result within {timeout:.0f} s (hung)")
    return [results[f] for f in families if f in results]


# ---------------------------------------------------------------------------------------------- the table

def render(rows: list[dict], seconds: float, jobs: int) -> str:
    import torch
    import transformers

    counts = {o: sum(r["outcome"] == o for r in rows) for o in OUTCOMES}
    lines = [
        "# Census: every causal LM of the installed transformers",
        "",
        f"transformers {transformers.__version__}, torch {torch.__version__}; {len(rows)} families of "
        "`MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`; "
        f"{seconds:.0f} s with {jobs} worker processes. Reproduce: `python -m benchmarks.census`.",
        "",
        "Each family: a tiny random config from its own defaults (shrunk), float32, 2 × 24 random tokens, no mask. "
        f"EXACT: every check ≤ {TOL:g} relative (max |Δ| / max |reference|): full mode on the last attention layer "
        "and on every attention layer vs the model's logits, the prefix replay (every layer from the first attention "
        "layer, crystallized in full mode) vs the losses of the model's logits (eager, eager with sharper attention "
        "weights, sdpa), and top-1 / low-rank on the last attention layer vs a float64 per-head computation on the "
        "q, k, v it received (eager, both weight scales). UNBUILT: the census could not build or run the family "
        "itself (not a verdict on nqpq).",
        "",
        "| outcome | families |",
        "|---|---|",
        *(f"| {o} | {counts[o]} |" for o in OUTCOMES),
        "",
        "| family | class | outcome | structure | detail |",
        "|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: (OUTCOMES.index(r["outcome"]), r["family"])):
        detail = r.get("detail", "").replace("|", "\\|")
        lines.append(f"| {r['family']} | {r.get('cls', '')} | {r['outcome']} | {r.get('structure', '')} | {detail} |")
    return "\n".join(lines) + "\n"


def read_table(path: Path = RESULTS) -> dict[str, str]:
    """family → outcome, from a committed census table."""
    out = {}
    for line in path.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 3 and cells[2] in OUTCOMES and cells[0] not in ("outcome", "family"):
            out[cells[0]] = cells[2]
    return out


def write_whole(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def all_families() -> list[str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return list(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--families", nargs="+", default=None, help="default: every entry of the causal-LM mapping")
    p.add_argument("--jobs", type=int, default=2, help="worker processes (default 2)")
    p.add_argument("--timeout", type=float, default=FAMILY_TIMEOUT_S, help="seconds per family before it is a hang")
    p.add_argument("--out", default=str(RESULTS), help="the table (markdown); '-' for stdout")
    p.add_argument("--json", default=None, help="also write the rows as JSON here")
    p.add_argument("--worker", nargs="*", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker is not None:
        _worker(args.worker)
        return 0
    families = args.families or all_families()
    unknown = sorted(set(families) - set(all_families()))
    if unknown:
        print(f"error: not in this transformers' causal-LM mapping: {unknown}", file=sys.stderr)
        return 2
    t = time.perf_counter()
    rows = run_census(families, jobs=max(1, args.jobs), timeout=args.timeout)
    seconds = time.perf_counter() - t
    text = render(rows, seconds, args.jobs)
    if args.json:
        write_whole(Path(args.json), json.dumps(rows, indent=1))
    if args.out == "-":
        print(text)
    else:
        write_whole(Path(args.out), text)
        counts = {o: sum(r["outcome"] == o for r in rows) for o in OUTCOMES}
        print(f"{counts} in {seconds:.0f} s → {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

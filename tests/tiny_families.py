"""Tiny random models (fixed seeds) of the families with multi-head latent attention, learned attention sinks and
DiffLlama's two-call differential attention, Llama 4's chunked attention, and HRM's two recurrent stacks of layers
(test helper).

Each is built from the family's own config class with shrunk sizes (float32, eval mode, eager attention), and
its attention sharpened so that crystallizing a layer changes the logits far beyond rounding: the query and key
projections are scaled (scores by the square) and the learned sinks drawn large enough to hold a real share of
every row's softmax.
"""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM

VOCAB = 96
_MOE = dict(moe_intermediate_size=32, n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1, n_group=1,
            topk_group=1, first_k_dense_replace=1)
# q/k of width qk_nope + qk_rope = 24, v of width 12: the widths differ, and neither is the rotary width.
_MLA = dict(kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=12)
_BASE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
             max_position_embeddings=128, bos_token_id=0, eos_token_id=0, pad_token_id=0, tie_word_embeddings=False)

CONFIGS: dict[str, dict] = {
    "deepseek_v2": dict(_BASE, num_key_value_heads=4, **_MOE, **_MLA),
    "deepseek_v3": dict(_BASE, num_key_value_heads=4, **_MOE, **_MLA),
    # V3.2's indexer selects index_topk keys per row: dense (every key) while T <= index_topk.
    "deepseek_v32": dict(_BASE, num_key_value_heads=4, index_n_heads=2, index_head_dim=16, index_topk=64, **_MOE,
                         **_MLA),
    "minicpm3": dict(_BASE, num_key_value_heads=4, **_MLA),
    "glm4_moe_lite": dict(_BASE, num_key_value_heads=4, **_MOE, **_MLA),
    "gpt_oss": dict(_BASE, num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=2,
                    sliding_window=8, layer_types=["sliding_attention", "full_attention", "sliding_attention"]),
    "granite_swa": dict(_BASE, num_key_value_heads=2, sliding_window=8,
                        layer_types=["sliding_attention", "full_attention", "sliding_attention"]),
    "granitemoe_swa": dict(_BASE, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                           sliding_window=8, layer_types=["sliding_attention", "full_attention", "sliding_attention"]),
    # Sliding layers: twice the kv heads of the full layers, and learned sinks; v (12) narrower than q/k (16).
    "mimo_v2_flash": dict(_BASE, num_key_value_heads=2, head_dim=16, v_head_dim=12, sliding_window=8,
                          moe_intermediate_size=32, n_routed_experts=4, num_experts_per_tok=2,
                          layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                          mlp_layer_types=["dense", "sparse", "sparse"]),
    "flint": dict(_BASE, num_key_value_heads=2, head_dim=16),
    "diffllama": dict(_BASE, num_key_value_heads=2),
    # Llama 4: chunked attention (chunks of 8 < T) on layers 0-2, a NoPE full-attention layer 3; MoE and dense MLPs.
    "llama4_text": dict(_BASE, num_hidden_layers=4, num_key_value_heads=2, head_dim=16, intermediate_size_mlp=64,
                        num_local_experts=4, num_experts_per_tok=1, interleave_moe_layer_step=2,
                        attention_chunk_size=8),
    # HRM: two stacks of 2 layers (low- and high-level), each module called once per cycle: the low stack 2 × 2
    # times per forward, the high stack 2 times, with the other stack's output added in between.
    "hrm_text": dict(_BASE, num_hidden_layers=2, head_dim=16, H_cycles=2, L_cycles=2),
}


def _shrunk(family: str, **extra) -> dict:
    """The shared small sizes, those the family's config has, and its per-layer type lists cut to three layers."""
    default = AutoConfig.for_model(family)
    sizes = {k: v for k, v in {**_BASE, **_MOE, **_MLA, **extra}.items() if hasattr(default, k)}
    for key in ("layer_types", "mlp_layer_types"):
        if getattr(default, key, None) is not None:
            sizes[key] = (list(getattr(default, key)) * 3)[:3]
    return sizes


# The other MLA families (V3.2-style indexers dense at T <= index_topk; HY-V4 with learned sinks as well).
for _family in ("glm_moe_dsa", "youtu", "hy_v4", "axk1", "axk2", "sarvam_mla"):
    CONFIGS[_family] = _shrunk(_family, num_key_value_heads=4, index_n_heads=2, index_head_dim=16, index_topk=64)
MLA_FAMILIES = ("deepseek_v2", "deepseek_v3", "deepseek_v32", "minicpm3", "glm4_moe_lite", "glm_moe_dsa", "youtu",
                "hy_v4", "axk1", "axk2", "sarvam_mla")
SINK_FAMILIES = ("gpt_oss", "granite_swa", "granitemoe_swa", "mimo_v2_flash", "flint")


def build_family(family: str, seed: int = 0, sharpen: float = 4.0, sink_std: float = 2.0,
                 attn: str = "eager", vocab_size: int = VOCAB, **config_overrides) -> torch.nn.Module:
    """A tiny random ``family`` causal LM (float32, eval), its q/k projections scaled by ``sharpen`` and its learned
    sinks (if any) drawn N(0, ``sink_std``²); ``config_overrides`` replace entries of ``CONFIGS[family]``."""
    config = AutoConfig.for_model(family, **{**CONFIGS[family], "vocab_size": vocab_size, **config_overrides})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        # The eager experts loop: the grouped-matmul one has no float64 (the float64 reference copies the model).
        model = AutoModelForCausalLM.from_config(config, attn_implementation=attn, experts_implementation="eager")
        with torch.no_grad():
            for name, param in model.named_parameters():
                leaf = name.rsplit(".", 2)[-2] if name.count(".") >= 1 else name
                if leaf in ("q_proj", "k_proj", "q_b_proj", "kv_b_proj", "kv_a_proj_with_mqa") and name.endswith(
                        "weight"):
                    param *= sharpen
                elif name.endswith(".sinks"):
                    param.normal_(0.0, sink_std)
    return model.float().eval()

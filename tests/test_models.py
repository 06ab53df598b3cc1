"""Every supported family, on tiny random configs built here (no hub): model_parts, crystallization against a
float64 per-head implementation, prefix replay against a full forward, kernel (interpreter) against reference,
and the clear refusals.

Argmax conditioning: every comparison of i* across two precisions asserts, on the float64 scores of the very
calls it compares, that each row's top-2 gap exceeds REL_SCORE_MARGIN of the call's largest |score| (see
conftest), with seeds that meet it. Each model's attention is also sharpened (every attention module's scale is
multiplied by SHARPEN), so rows are peaked as in trained models while the residual ε stays ~30 % of the
attention output.
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import pytest
import tiny_families
import torch
import transformers as tf
from conftest import REL_SCORE_MARGIN
from transformers import AttentionInterface

from nqpq import PrefixRunner, block_losses, crystallize
from nqpq.errors import UnsupportedModelError
from nqpq.experiments.calibration import GramAccumulator
from nqpq.model.crystallize import observe_residuals
from nqpq.model.geometry import LayerGeometry
from nqpq.model.lm_head import after_layers
from nqpq.model.parts import model_parts

VOCAB, T, B = 96, 40, 2
SHARPEN = 256.0
SHARPEN_QK_NORM = 16.0  # Qwen3 normalises q and k per head: its scores start ~16x larger
COMMON = dict(vocab_size=VOCAB, max_position_embeddings=64, bos_token_id=0, eos_token_id=0, pad_token_id=0)
LLAMA_LIKE = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4)

# family → (config, attention implementation the model is built with, what the config exercises)
FAMILIES = {
    "llama": (lambda: tf.LlamaConfig(num_key_value_heads=2, **LLAMA_LIKE, **COMMON), "eager"),  # GQA 4/2
    "qwen2": (lambda: tf.Qwen2Config(num_key_value_heads=2, **LLAMA_LIKE, **COMMON), "sdpa"),
    "qwen3": (lambda: tf.Qwen3Config(num_key_value_heads=1, head_dim=32, **LLAMA_LIKE, **COMMON), "eager"),  # MQA
    "mistral": (lambda: tf.MistralConfig(num_key_value_heads=2, sliding_window=8, **LLAMA_LIKE, **COMMON), "sdpa"),
    "gemma2": (lambda: tf.Gemma2Config(  # softcaps, sliding/full alternating, head_dim 32 != 64 / 4
        hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        head_dim=32, query_pre_attn_scalar=32, sliding_window=8, attn_logit_softcapping=50.0,
        final_logit_softcapping=3.0, **COMMON), "eager"),
    "phi3": (lambda: tf.Phi3Config(  # fused qkv, D = 96
        hidden_size=192, intermediate_size=96, num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=1,
        **COMMON), "sdpa"),
    "gpt_neox": (lambda: tf.GPTNeoXConfig(  # partial rotary, parallel residual
        hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4, rotary_pct=0.25,
        use_parallel_residual=True, **COMMON), "eager"),
    "gpt2": (lambda: tf.GPT2Config(n_embd=64, n_layer=3, n_head=4, vocab_size=VOCAB, n_positions=64,
                                   bos_token_id=0, eos_token_id=0), "sdpa"),
}
GEOMETRY = {  # (Hq, Hkv, D, per-layer windows) as the configs above define them
    "llama": (4, 2, 16, [None] * 3), "qwen2": (4, 2, 16, [None] * 3), "qwen3": (4, 1, 32, [None] * 3),
    "mistral": (4, 2, 16, [8] * 3), "gemma2": (4, 2, 32, [8, None, 8, None]), "phi3": (2, 1, 96, [None] * 3),
    "gpt_neox": (4, 4, 16, [None] * 3), "gpt2": (4, 4, 16, [None] * 3),
}


# Weight seeds whose test inputs meet the argmax margin in every compared call (0 unless it did not).
SEEDS = {"gpt_neox": 1}


def build(family: str, attn: str | None = None, seed: int | None = None) -> torch.nn.Module:
    config_fn, default_attn = FAMILIES[family]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEEDS.get(family, 0) if seed is None else seed)
        model = tf.AutoModelForCausalLM.from_config(config_fn(), attn_implementation=attn or default_attn)
    model = model.float().eval()
    for module in model_parts(model).attn.values():
        # The scale every family hands its attention function.
        module.scaling *= SHARPEN_QK_NORM if family == "qwen3" else SHARPEN
    return model


@pytest.fixture(scope="module", params=list(FAMILIES))
def family_model(request):
    return request.param, build(request.param)


def token_blocks(n: int = 5, seed: int = 0) -> torch.Tensor:
    return torch.randint(1, VOCAB, (n, T), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def logits(model, ids):
    return model(input_ids=ids, use_cache=False).logits


def layer_window(config, layer: int) -> int | None:
    """The window transformers applies to ``layer``, read from the config."""
    types = getattr(config, "layer_types", None)
    if types is not None and types[layer] != "sliding_attention":
        return None
    return getattr(config, "sliding_window", None)


@contextmanager
def recorded_calls(model):
    """Record (module, q, k, v, scaling, output) of every crystallized attention call (inside ``crystallize``)."""
    name = "nqpq_" + model.config._attn_implementation
    real = AttentionInterface._global_mapping[name]
    calls = []

    def spy(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        out = real(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
        calls.append((module, query, key, value, scaling, out[0]))
        return out

    AttentionInterface._global_mapping[name] = spy
    try:
        yield calls
    finally:
        AttentionInterface._global_mapping[name] = real


def hand_attention(q, k, v, scale, window, softcap, mode, basis=None, d_r=None):
    """Residual attention by its definition, float64, one (batch, head) at a time; also the smallest top-2 score
    gap relative to the largest |score| of the call."""
    Bq, Hq, Tq, D = q.shape
    group = Hq // k.shape[1]
    i = torch.arange(Tq)
    allowed = i[None, :] <= i[:, None]
    if window is not None:
        allowed &= i[None, :] > i[:, None] - window
    out = torch.empty(Bq, Tq, Hq, D, dtype=torch.float64)
    gap, size = math.inf, 0.0
    for b in range(Bq):
        for h in range(Hq):
            kh, vh = k[b, h // group].double(), v[b, h // group].double()
            s = q[b, h].double() @ kh.T * scale
            if softcap is not None:
                s = softcap * torch.tanh(s / softcap)
            s = s.masked_fill(~allowed, -math.inf)
            top = s.topk(2, dim=-1).values
            gap = min(gap, (top[:, 0] - top[:, 1]).min().item())  # inf on rows that see one key
            size = max(size, s[allowed].abs().max().item())
            p = s.softmax(-1)
            v_star, ctx = vh[s.argmax(-1)], p @ vh
            if mode == "top1":
                out[b, :, h] = v_star
            elif mode == "full":
                out[b, :, h] = ctx
            else:
                P = basis[h, :, :d_r].double()
                out[b, :, h] = v_star + (ctx - v_star) @ P @ P.T
    return out, gap / size


def random_basis(Hq: int, D: int, layers, seed: int = 1) -> dict[int, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {li: torch.linalg.qr(torch.randn(Hq, D, D, generator=g))[0] for li in layers}


def test_model_parts_geometry(family_model):
    family, model = family_model
    parts = model_parts(model)
    Hq, Hkv, D, windows = GEOMETRY[family]
    assert (parts.family, parts.wrapper) == (family, None)
    assert parts.n_layers == len(parts.layers) == len(parts.attn) == model.config.num_hidden_layers
    assert parts.attn_layers == tuple(range(parts.n_layers)) == tuple(parts.geometry)
    assert [parts.geometry[li] for li in parts.attn_layers] == [
        LayerGeometry(Hq, Hkv, D, D, w, False) for w in windows]
    assert parts.lm_head is model.get_output_embeddings()
    assert parts.default_layers == tuple(range(parts.n_layers - max(1, parts.n_layers // 4), parts.n_layers))
    assert (parts.attn_softcap, parts.final_logit_softcap) == ((50.0, 3.0) if family == "gemma2" else (None, None))
    assert parts.logit_scale is None
    # after_layers finds the final norm: what the body applies to the last layer's output.
    with torch.no_grad():
        ids = token_blocks(1)
        out = model(input_ids=ids, output_hidden_states=True, use_cache=False)
        last_layer = parts.layers[-1]
        seen = []
        handle = last_layer.register_forward_hook(lambda m, a, o: seen.append(o[0] if isinstance(o, tuple) else o))
        try:
            model(input_ids=ids, use_cache=False)
        finally:
            handle.remove()
        final = after_layers(parts, seen[0], out.hidden_states[-1])
        assert isinstance(final, torch.nn.Module) and any(True for _ in final.parameters())
        torch.testing.assert_close(final(seen[0]), out.hidden_states[-1], rtol=0, atol=0)


@torch.no_grad()
def test_full_mode_equals_model(family_model, monkeypatch):
    """The glue: full mode through the plain T × T reference (the op's definition, whose sums run in the order the
    model's own eager attention runs them) gives the model's logits. The torch backend's CPU path (streamed, query
    blocks, grouped heads) sums in another order: on a tiny random Phi-3 its logits sit 3e-5 from eager's, both
    about 1e-4 from a float64 run of the model; it is checked against float64 in tests/test_streamed.py and on
    whole models by the census."""
    from nqpq_kernels import dispatch, reference

    monkeypatch.setattr(dispatch, "residual_attention_torch", reference.residual_attention_reference)
    _, model = family_model
    ids = token_blocks(B)
    base = logits(model, ids)
    n = model_parts(model).n_layers
    with crystallize(model, range(n), mode="full", backend="torch"):
        got = logits(model, ids)
    torch.testing.assert_close(got, base, rtol=1e-5, atol=1e-5)


@torch.no_grad()
@pytest.mark.parametrize("mode", ["top1", "lowrank"])
def test_residual_modes_match_float64(family_model, mode):
    """Every crystallized call's output equals the definition computed in float64 on the same q, k, v."""
    family, model = family_model
    parts = model_parts(model)
    layers = list(range(parts.n_layers))
    geo = parts.geometry[0]
    d_r = geo.v_dim // 4
    basis = random_basis(geo.n_heads, geo.v_dim, layers)
    with crystallize(model, layers, mode=mode, basis=basis, d_r=d_r, backend="torch"), \
            recorded_calls(model) as calls:
        logits(model, token_blocks(B))
    assert len(calls) == len(layers)
    softcap = getattr(model.config, "attn_logit_softcapping", None)
    for module, q, k, v, scale, got in calls:
        li = next(i for i, a in parts.attn.items() if a is module)
        assert k.shape[1] == parts.geometry[li].n_kv_heads  # grouped k/v reach the op unrepeated
        want, gap = hand_attention(q, k, v, scale, layer_window(model.config, li), softcap, mode, basis[li], d_r)
        assert gap > REL_SCORE_MARGIN, f"{family} layer {li}: near-tie in the test inputs (gap {gap:.1e}·max|s|)"
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5, msg=f"{family} layer {li} {mode}")


@torch.no_grad()
def test_block_losses_equal_the_models_own_loss(family_model):
    """lm_losses uses the family's LM head and final logit soft-cap (Gemma 2) exactly as the model's forward does."""
    _, model = family_model
    blocks = token_blocks(3)
    want = torch.tensor([model(input_ids=b[None], labels=b[None], use_cache=False).loss.item() for b in blocks],
                        dtype=torch.float64)
    torch.testing.assert_close(block_losses(model, blocks, 3), want, rtol=1e-5, atol=0)


@torch.no_grad()
def test_sliding_window_is_the_one_each_layer_passes():
    """ModelParts.sliding_window (results.json's geometry) is the window each layer hands its attention function.
    EXAONE 4 keeps config.sliding_window on every attention module and passes it only on its sliding layers."""
    config = tf.Exaone4Config(num_key_value_heads=2, sliding_window=8, **LLAMA_LIKE | {"num_hidden_layers": 4},
                              **COMMON)
    assert config.layer_types == ["sliding_attention"] * 3 + ["full_attention"]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = tf.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    parts = model_parts(model)
    name = "nqpq_" + model.config._attn_implementation
    seen = {}
    with crystallize(model, range(parts.n_layers), mode="full", backend="torch"):
        real = AttentionInterface._global_mapping[name]

        def spy(module, *args, **kwargs):
            seen[next(i for i, a in parts.attn.items() if a is module)] = kwargs.get("sliding_window")
            return real(module, *args, **kwargs)

        AttentionInterface._global_mapping[name] = spy
        try:
            logits(model, token_blocks(1))
        finally:
            AttentionInterface._global_mapping[name] = real
    windows = [parts.geometry[i].sliding_window for i in range(parts.n_layers)]
    assert [seen[i] for i in range(parts.n_layers)] == windows == [8, 8, 8, None]


@pytest.mark.parametrize("family", ["cohere", "granite"])
@torch.no_grad()
def test_block_losses_apply_the_models_logit_scale(family):
    """Cohere multiplies its logits by logit_scale, Granite divides them by logits_scaling: the losses (and so every
    perplexity of a sweep or scan) are the model's own, not those of unscaled logits."""
    config = {
        "cohere": lambda: tf.CohereConfig(num_key_value_heads=2, logit_scale=0.5, **LLAMA_LIKE, **COMMON),
        "granite": lambda: tf.GraniteConfig(num_key_value_heads=2, logits_scaling=4.0, **LLAMA_LIKE, **COMMON),
    }[family]()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = tf.AutoModelForCausalLM.from_config(config, attn_implementation="eager").float().eval()
    assert model_parts(model).logit_scale == {"cohere": 0.5, "granite": 0.25}[family]
    blocks = token_blocks(3)
    want = torch.tensor([model(input_ids=b[None], labels=b[None], use_cache=False).loss.item() for b in blocks],
                        dtype=torch.float64)
    torch.testing.assert_close(block_losses(model, blocks, 3), want, rtol=1e-5, atol=0)


@torch.no_grad()
def test_prefix_replay_equals_full_forward(family_model):
    """Replayed losses (from each recorded start, plain and crystallized) equal a full forward of the model."""
    _, model = family_model
    parts = model_parts(model)
    blocks = token_blocks(5)
    starts = (1, parts.n_layers - 1)
    runner = PrefixRunner(model, blocks, [slice(0, 2), slice(2, 4), slice(4, 5)], start=starts)
    baseline = runner.capture_baseline()
    torch.testing.assert_close(baseline, block_losses(model, blocks, 2), rtol=1e-6, atol=0)
    for start in starts:
        torch.testing.assert_close(runner.losses(start=start), baseline, rtol=1e-6, atol=0)
        with crystallize(model, range(start, parts.n_layers), mode="top1", backend="torch"):
            # Same batches, same arithmetic: replay and full forward compute identical attention inputs.
            torch.testing.assert_close(runner.losses(start=start), block_losses(model, blocks, 2), rtol=1e-6, atol=0)
    with pytest.raises(ValueError, match=r"start=0 was not recorded"):
        runner.losses(start=0)


@torch.no_grad()
def test_calibration_grams_and_stats_per_query_head(family_model):
    """observe_residuals: the model's own output bit for bit, Σ εεᵀ per query head and per-call argmax / top-1 p
    equal to the float64 definition."""
    family, model = family_model
    parts = model_parts(model)
    layers = [0, parts.n_layers - 1]
    ids = token_blocks(B)
    base = logits(model, ids)

    class Stats:
        calls = []

        def add(self, layer, argmax, top1_prob, first_key_mass=None):
            self.calls.append((layer, argmax, top1_prob))

    grams, stats = GramAccumulator(), Stats()
    with observe_residuals(model, layers, grams, backend="torch", stats_acc=stats), recorded_calls(model) as calls:
        assert torch.equal(logits(model, ids), base)
    softcap = getattr(model.config, "attn_logit_softcapping", None)
    for (module, q, k, v, scale, _), (layer, argmax, top1_prob) in zip(calls, stats.calls, strict=True):
        li = next(i for i, a in parts.attn.items() if a is module)
        assert li == layer
        Hq, Hkv, D = parts.geometry[li].n_heads, parts.geometry[li].n_kv_heads, parts.geometry[li].v_dim
        window = layer_window(model.config, li)
        top1, gap = hand_attention(q, k, v, scale, window, softcap, "top1")
        full, _ = hand_attention(q, k, v, scale, window, softcap, "full")
        assert gap > REL_SCORE_MARGIN
        eps = (full - top1).permute(2, 0, 1, 3).reshape(Hq, -1, D)  # [Hq, B·T, D]
        want = eps.transpose(1, 2) @ eps
        # ε is formed in fp32 by the op (~1e-7 of |V| per element): compare on the scale of the Gram.
        torch.testing.assert_close(grams.grams[li], want, rtol=0, atol=1e-5 * want.abs().max().item())
        assert argmax.shape == top1_prob.shape == (B, Hq, T)
        G = Hq // Hkv
        for h in range(Hq):  # V[i*] of the reported argmax is the top-1 row
            rows = v[:, h // G].double().gather(1, argmax[:, h, :, None].expand(-1, -1, D))
            torch.testing.assert_close(rows, top1[:, :, h], rtol=0, atol=0)
        assert bool(((top1_prob > 0) & (top1_prob <= 1)).all())
    assert len(calls) == len(layers)


@torch.no_grad()
@pytest.mark.parametrize(("family", "layers"), [("llama", [2]), ("gemma2", [0, 1])])
def test_kernel_equals_reference(family, layers):
    """The fused kernel (Triton's interpreter on CPU) gives the reference's model output: GQA, a sliding window
    shorter than T, soft-capped scores, D = 32 (kept small: the interpreter is slow)."""
    pytest.importorskip("triton")
    from nqpq_kernels.dispatch import resolve_backend

    try:
        resolve_backend("triton", "cpu")
    except RuntimeError as err:
        pytest.skip(f"Triton kernel not runnable here: {err}")
    model = build(family)
    parts = model_parts(model)
    basis = random_basis(parts.geometry[layers[0]].n_heads, parts.geometry[layers[0]].v_dim, layers)
    ids = token_blocks(1)
    softcap = getattr(model.config, "attn_logit_softcapping", None)
    got = {}
    for backend in ("torch", "triton"):
        with crystallize(model, layers, mode="lowrank", basis=basis, d_r=5, backend=backend), \
                recorded_calls(model) as calls:
            got[backend] = logits(model, ids)
        assert len(calls) == len(layers)
        for module, q, k, v, scale, _ in calls:
            li = next(i for i, a in parts.attn.items() if a is module)
            _, gap = hand_attention(q, k, v, scale, layer_window(model.config, li), softcap, "top1")
            assert gap > REL_SCORE_MARGIN
    torch.testing.assert_close(got["triton"], got["torch"], rtol=1e-5, atol=1e-5)


def test_flash_attention_2_config_crystallizes():
    """A model configured for flash_attention_2 (forced: flash-attn is not installed) crystallizes: the crystallized
    modules get their own implementation and the model-wide name stays 'flash_attention_2'."""
    eager = build("llama", attn="eager")
    flash = build("llama", attn="eager")
    flash.config._attn_implementation = "flash_attention_2"
    ids = token_blocks(B)
    n = model_parts(flash).n_layers
    for mode in ("full", "top1"):
        with crystallize(eager, range(n), mode=mode, backend="torch"):
            want = logits(eager, ids)
        with crystallize(flash, range(n), mode=mode, backend="torch"):
            assert flash.config._attn_implementation == "flash_attention_2"
            got = logits(flash, ids)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert flash.config._attn_implementation == "flash_attention_2"
    assert all(a.config is flash.config for a in model_parts(flash).attn.values())


def test_padding_accepted_and_custom_masks_refused():
    """Left padding through the model's mask (issue 34): the padded row's real positions equal its sequence alone
    (positions from the mask, as generate builds them); a mask that is not causal + the window is refused by name."""
    model = build("mistral", attn="eager")
    ids = token_blocks(B)
    with torch.no_grad(), crystallize(model, [1], mode="full", backend="torch"):
        torch.testing.assert_close(model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits,
                                   logits(model, ids), rtol=0, atol=0)
        mask = torch.ones_like(ids)
        mask[0, :3] = 0
        padded = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
        torch.testing.assert_close(padded[:1, 3:], logits(model, ids[:1, 3:]), rtol=1e-4, atol=1e-4)
        T = ids.shape[1]
        with pytest.raises(ValueError, match="causal with a sliding window of 8"):
            model(input_ids=ids, attention_mask=torch.zeros(ids.shape[0], 1, T, T))  # bidirectional


@pytest.mark.parametrize("name", ["bloom", "t5", "bert", "gpt2-base"])
def test_unsupported_models_refused(name):
    models = {
        "bloom": lambda: tf.BloomForCausalLM(tf.BloomConfig(n_layer=2, hidden_size=32, n_head=4, vocab_size=50)),
        "t5": lambda: tf.T5ForConditionalGeneration(
            tf.T5Config(num_layers=2, d_model=32, num_heads=4, d_kv=8, d_ff=32, vocab_size=50)),
        "bert": lambda: tf.BertForMaskedLM(tf.BertConfig(
            num_hidden_layers=2, hidden_size=32, num_attention_heads=4, intermediate_size=32, vocab_size=50)),
        "gpt2-base": lambda: tf.GPT2Model(tf.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=50)),
    }
    expected = {"bloom": "AttentionInterface", "t5": "encoder-decoder", "bert": "not a causal",
                "gpt2-base": "not a causal"}
    model = models[name]()
    with pytest.raises(UnsupportedModelError, match=expected[name]):
        model_parts(model)
    with pytest.raises(UnsupportedModelError, match=expected[name]), crystallize(model, [0], mode="top1"):
        pass


def test_latent_attention_widths_read_per_layer():
    """DeepSeek V3's multi-head latent attention: q/k heads of 24 (nope 16 + rope 8), v heads of 8; the config's
    head_dim is the rotary width, not a head width."""
    model = tf.DeepseekV3ForCausalLM(tf.DeepseekV3Config(
        num_hidden_layers=2, hidden_size=32, intermediate_size=32, num_attention_heads=4, num_key_value_heads=4,
        q_lora_rank=None, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=8,
        n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, first_k_dense_replace=1, n_group=1,
        topk_group=1, vocab_size=50))
    parts = model_parts(model)
    assert [parts.geometry[li] for li in (0, 1)] == [LayerGeometry(4, 4, 24, 8, None, False)] * 2


@torch.no_grad()
def test_learned_sinks_read_from_the_module():
    """gpt-oss hands its attention function s_aux (one learned logit per head): the geometry says so."""
    config = tf.GptOssConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                             head_dim=8, intermediate_size=32, vocab_size=50, num_local_experts=2,
                             num_experts_per_tok=1, max_position_embeddings=64)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = tf.GptOssForCausalLM(config).eval()
    parts = model_parts(model)
    assert all(parts.geometry[li].learned_sink for li in parts.attn_layers)
    assert {parts.geometry[li].n_heads for li in parts.attn_layers} == {4}


def census_model(family: str, attn: str = "eager") -> torch.nn.Module:
    """A tiny random model of ``family`` from its own default config, shrunk as the census shrinks it."""
    from nqpq.model.tiny_models import tiny_config

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = tf.AutoModelForCausalLM.from_config(tiny_config(family), attn_implementation=attn)
    return model.float().eval()


def census_blocks(n: int = 3) -> torch.Tensor:
    return torch.randint(3, 256, (n, 24), generator=torch.Generator().manual_seed(0))


@torch.no_grad()
def test_hybrid_attention_layers_keep_the_models_indices():
    """Qwen3-Next: linear-attention layers and attention layers; the attention layers are the candidates under the
    model's own indices, the others are refused by name, and the replay runs the linear-attention layers too."""
    model = census_model("qwen3_next")
    parts = model_parts(model)
    types = model.config.layer_types
    assert parts.attn_layers == tuple(i for i, t in enumerate(types) if t == "full_attention") == (3,)
    assert parts.default_layers == (3,)
    with pytest.raises(UnsupportedModelError, match=r"layer 0 is not an attention layer .* attention layers are 3 "):
        crystallize_layers_for(model, [0])
    blocks = census_blocks()
    runner = PrefixRunner(model, blocks, [slice(0, 2), slice(2, 3)], start=(0, 3))
    baseline = runner.capture_baseline()
    torch.testing.assert_close(baseline, block_losses(model, blocks, 2), rtol=1e-6, atol=0)
    for start in (0, 3):
        with crystallize(model, [3], mode="top1", backend="torch"):
            torch.testing.assert_close(runner.losses(start=start), block_losses(model, blocks, 2), rtol=1e-6, atol=0)


def crystallize_layers_for(model, layers):
    with crystallize(model, layers, mode="full", backend="torch"):
        pass


@torch.no_grad()
@pytest.mark.parametrize(("family", "wrapper", "text"), [("gemma3", "gemma3", "gemma3_text"),
                                                         ("got_ocr2", "got_ocr2", "qwen2")])
def test_multimodal_wrapper_scores_its_text_model(family, wrapper, text):
    """Gemma 3's ForConditionalGeneration (what AutoModelForCausalLM gives for Gemma 3 4B-27B): its language model's
    layers and its LM head; the losses are the wrapper's own on text, replayed or not."""
    model = census_model(family)
    parts = model_parts(model)
    assert (parts.wrapper, parts.family) == (wrapper, text)
    assert parts.lm_head is model.get_output_embeddings()
    blocks = census_blocks()
    want = torch.tensor([model(input_ids=b[None], labels=b[None], use_cache=False).loss.item() for b in blocks],
                        dtype=torch.float64)
    torch.testing.assert_close(block_losses(model, blocks, 3), want, rtol=1e-5, atol=0)
    runner = PrefixRunner(model, blocks, [slice(0, 3)], start=parts.attn_layers[-1])
    torch.testing.assert_close(runner.capture_baseline(), want, rtol=1e-5, atol=0)


@torch.no_grad()
def test_per_layer_head_dim():
    """Gemma 4: full-attention layers have wider heads (global_head_dim) than sliding ones; each layer's geometry
    is its own and each layer takes a basis of its own width."""
    model = census_model("gemma4_text")
    parts = model_parts(model)
    widths = {li: parts.geometry[li].v_dim for li in parts.attn_layers}
    types = model.config.layer_types
    assert widths == {li: 32 if types[li] == "full_attention" else 16 for li in parts.attn_layers}
    assert len(set(widths.values())) == 2
    layers = list(parts.attn_layers)
    basis = {li: random_basis(parts.geometry[li].n_heads, widths[li], [li])[li] for li in layers}
    ids = census_blocks(2)
    with crystallize(model, layers, mode="lowrank", basis=basis, d_r=4, backend="torch"), \
            recorded_calls(model) as calls:
        logits(model, ids)
    assert {v.shape[-1] for _, _, _, v, _, _ in calls} == {16, 32}


@torch.no_grad()
@pytest.mark.parametrize("family", ["olmo", "opt"])
def test_what_follows_the_layers_is_replayed(family):
    """OLMo's final LayerNorm has no parameters; OPT registers its final norm before its layers: the replay applies
    what the body applies after its last layer, found from the baseline forward."""
    model = census_model(family)
    parts = model_parts(model)
    blocks = census_blocks()
    runner = PrefixRunner(model, blocks, [slice(0, 3)], start=parts.attn_layers[-1])
    baseline = runner.capture_baseline()
    assert runner._via_body is False  # the direct replay (layers, then the final step) where it is the model
    torch.testing.assert_close(baseline, block_losses(model, blocks, 3), rtol=1e-6, atol=0)
    torch.testing.assert_close(runner.losses(), baseline, rtol=0, atol=0)


@torch.no_grad()
def test_hybrid_sweep_and_scan_take_the_attention_layers():
    """The sweep's --layers defaults to the last quarter of the attention layers, the scan covers the attention
    layers, and asking for another layer is a one-line error (CLI exit 2) naming the attention layers."""
    from nqpq.errors import NqpqError
    from nqpq.experiments.config import SweepConfig
    from nqpq.experiments.scan import run_scan
    from nqpq.experiments.sweep import run_sweep

    model = census_model("qwen3_next")
    ids = torch.randint(3, 256, (400,), generator=torch.Generator().manual_seed(1))
    common = dict(d_r=(1, 4), n_blocks=4, seq_len=24, calib_blocks=2, device="cpu", batch_size=2, progress=False,
                  backend="torch")
    results = run_sweep(SweepConfig(**common), model=model, ids=ids, log=lambda *_: None)
    assert results["config"]["layers"] == [3] and results["config"]["attn_layers"] == [3]
    scan = run_scan(SweepConfig(**common), model=model, ids=ids, log=lambda *_: None)
    assert [row["layer"] for row in scan["layers"]] == [3]
    with pytest.raises(NqpqError, match=r"--layers 1 is not an attention layer .* attention layers are 3 "):
        run_sweep(SweepConfig(layers=(1,), **common), model=model, ids=ids, log=lambda *_: None)


@pytest.mark.parametrize(("family", "expected"), [
    # Bart-style decoder layers: one attention class for both, the cross-attention the non-causal one; Blenderbot's
    # num_hidden_layers counts its encoder's layers, so its decoder layers are found as transformers' layers.
    ("blenderbot", r"layer 0 \(BlenderbotDecoderLayer\) holds a cross-attention, encoder_attn \(BlenderbotAttention\), "
                   r"beside its self-attention self_attn \(BlenderbotAttention\)"),
    ("bart", r"layer 0 \(BartDecoderLayer\) holds a cross-attention, encoder_attn \(BartAttention\)"),
])
def test_layers_with_several_attentions_refused_by_name(family, expected):
    model = census_model(family)
    with pytest.raises(UnsupportedModelError, match=expected):
        model_parts(model)


@torch.no_grad()
def test_attention_over_block_states_runs_the_models_own_function():
    """Inkling 2's layers mix the states of earlier blocks with an attention of their own (a learned query over the
    stacked block states, maskless, not causal) beside the causal self-attention over the tokens: the self-attention
    is the layer's attention module, and the block attentions run the model's own function under crystallization."""
    model = census_model("inkling2_text")
    parts = model_parts(model)
    layers = model.model.layers
    assert parts.attn_layers == tuple(range(len(layers)))
    assert [parts.attn[li] for li in parts.attn_layers] == [layer.self_attn for layer in layers]
    block_attention = layers[1].attention_input
    g = torch.Generator().manual_seed(0)
    hidden = model.config.get_text_config().hidden_size
    blocks, partial = torch.randn(2, 5, 1, hidden, generator=g), torch.randn(2, 5, hidden, generator=g)
    want = block_attention(blocks, partial)
    with crystallize(model, parts.attn_layers, mode="top1", backend="torch"):
        assert layers[1].self_attn.config._attn_implementation == "nqpq_eager"
        assert block_attention.config._attn_implementation == "eager"
        got = block_attention(blocks, partial)
    assert all(torch.equal(a, b) for a, b in zip(got, want))


def blt_model(window: int | None) -> torch.nn.Module:
    """The census's tiny BLT (1 local encoder layer, 1 global layer over patches, 6 local decoder layers, an entropy
    patcher), its local layers' sliding window ``window`` (None: full causal attention over the bytes)."""
    from nqpq.model.tiny_models import tiny_config

    config = tiny_config("blt")
    config.local_attention_window_len = config.encoder_config.sliding_window = window
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = tf.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    return model.float().eval()


@torch.no_grad()
def test_byte_latent_transformer_layers():
    """BLT's config has no num_hidden_layers: its layers are those of its local encoder, global transformer and local
    decoder, in the order its forward runs them; the entropy patcher (a language model of its own, run first to set
    the patch boundaries) holds none. Full mode on every layer equals the model, and the prefix replay (its own
    forward: the cross-attentions between the stacks are not layers) gives the model's losses, crystallized too."""
    model = blt_model(None)
    body = model.model
    parts = model_parts(model)
    stacks = [body.local_encoder.layers, body.global_transformer.layers, body.local_decoder.layers]
    assert list(parts.layers) == [layer for stack in stacks for layer in stack]
    assert parts.attn_layers == tuple(range(8))
    blocks = census_blocks()
    want = block_losses(model, blocks, 3)
    with crystallize(model, parts.attn_layers, mode="full", backend="torch"):
        torch.testing.assert_close(block_losses(model, blocks, 3), want, rtol=1e-5, atol=0)
    runner = PrefixRunner(model, blocks, [slice(0, 3)], start=(1, 7))
    torch.testing.assert_close(runner.capture_baseline(), want, rtol=1e-6, atol=0)
    for start in (1, 7):  # the global layer (over patches), the last local decoder layer (over bytes)
        with crystallize(model, range(start, 8), mode="top1", backend="torch"):
            crystal = block_losses(model, blocks, 3)
            torch.testing.assert_close(runner.losses(start=start), crystal, rtol=1e-6, atol=0)
        assert float((crystal - want).abs().max()) > 1e-4


@torch.no_grad()
@pytest.mark.parametrize("mode", ["top1", "lowrank"])
def test_layer_of_two_attention_blocks(mode):
    """LongCat-Flash runs two attention blocks per layer (num_hidden_layers counts the blocks: twice the layers).
    Crystallizing a layer crystallizes both, with the layer's mode and basis: full mode equals the model, top-1 and
    low-rank equal float64 on each block (the blocks' layer_idx: 2·layer and 2·layer + 1), and the prefix replay
    gives the model's losses."""
    from f64_reference import F64Reference

    from nqpq.model.tiny_models import tiny_config

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        # The eager experts loop: the grouped-matmul one has no float64 (the float64 reference copies the model).
        model = tf.AutoModelForCausalLM.from_config(tiny_config("longcat_flash"), attn_implementation="eager",
                                                    experts_implementation="eager").float().eval()
    parts = model_parts(model)
    layers = model.model.layers
    assert model.config.num_hidden_layers == 2 * len(layers) == 2 * parts.n_layers
    assert all(parts.attention_modules(li) == tuple(layers[li].self_attn) for li in parts.attn_layers)
    ids = torch.randint(3, 256, (2, 24), generator=torch.Generator().manual_seed(1))  # clear maxima in both blocks
    base = logits(model, ids)
    with crystallize(model, parts.attn_layers, mode="full", backend="torch"):
        torch.testing.assert_close(logits(model, ids), base, rtol=1e-5, atol=1e-5 * float(base.abs().max()))
    li = parts.attn_layers[-1]
    geo = parts.geometry[li]
    basis = random_basis(geo.n_heads, geo.v_dim, [li])[li]
    d_r = geo.v_dim // 2
    with crystallize(model, [li], mode=mode, basis={li: basis}, d_r=d_r, backend="torch"):
        assert all(hasattr(a, "_nqpq_layer_spec") for a in parts.attention_modules(li))
        got = logits(model, ids)
    assert not any(hasattr(a, "_nqpq_layer_spec") for a in parts.attention_modules(li))
    ref = F64Reference(model)
    P = basis.double()[:, :, :d_r] if mode == "lowrank" else None
    ref.crystal = {2 * li: (mode, P), 2 * li + 1: (mode, P)}
    want = logits(ref.model, ids)
    assert len(ref.crystal_gaps) == 2 * ids.shape[0] * geo.n_heads  # both blocks, once each
    assert min(ref.crystal_gaps) > REL_SCORE_MARGIN, "a near-tie in the test inputs: choose another seed"
    err = float((got.double() - want).abs().max() / want.abs().max())
    assert err <= 2e-5 and float((got - base).abs().max() / base.abs().max()) > 1e-3, err
    blocks = census_blocks()
    runner = PrefixRunner(model, blocks, [slice(0, 3)], start=li)
    torch.testing.assert_close(runner.capture_baseline(), block_losses(model, blocks, 3), rtol=1e-6, atol=0)
    with crystallize(model, [li], mode=mode, basis={li: basis}, d_r=d_r, backend="torch"):
        torch.testing.assert_close(runner.losses(), block_losses(model, blocks, 3), rtol=1e-6, atol=0)


def _early_view(parts) -> tuple:
    """What the checks before loading read of a ModelParts (nqpq.experiments.config.check_before_loading)."""
    return (parts.family, parts.n_layers, parts.attn_layers, parts.default_layers, parts.max_positions,
            parts.geometry)


@pytest.mark.parametrize("family", [*FAMILIES, *sorted(tiny_families.CONFIGS)])
def test_geometry_before_loading_is_the_loaded_models(family):
    """config_parts (the model its config describes, built on the meta device: no weights) gives the geometry the
    model has once built: the flags checked before loading are checked against the model that will run."""
    from nqpq.model.parts import config_parts

    model = build(family) if family in FAMILIES else tiny_families.build_family(family)
    early = config_parts(model.config)
    assert early is not None, family
    # No weight is allocated: every projection is on the meta device (a few families draw small per-head vectors
    # with an explicit generator, which the device context does not move; they are not weights read from a file).
    assert all(m.weight.is_meta for m in early.body.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Embedding)))
    assert _early_view(early) == _early_view(model_parts(model)), family

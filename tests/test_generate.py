"""Crystallized models that generate (issue 34 items 3 and 4): ``model.generate`` with the model's own cache (dynamic,
the sliding-window caches of Mistral / Gemma 2 past their window, a static cache) under ``crystallize`` gives the
logits of a forward that recomputes the whole sequence (fp32 tolerance) and its tokens wherever the margin is clear;
padded batches equal each sequence alone; statistics collected while generating count each row once."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from nqpq.experiments.calibration import GramAccumulator
from nqpq.experiments.crystallinity import CrystallinityAccumulator
from nqpq.model.crystallize import crystallize, observe_residuals

VOCAB = 96
_BASE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, max_position_embeddings=128, bos_token_id=1, eos_token_id=2,
             pad_token_id=0, tie_word_embeddings=False)
_SLIDING = ["sliding_attention", "full_attention", "sliding_attention"]
# Mistral and Gemma 2 slide a window of 6 keys: shorter than a prompt plus what is generated.
FAMILIES = {
    "llama": dict(_BASE),
    "mistral": dict(_BASE, sliding_window=6),
    "gemma2": dict(_BASE, sliding_window=6, layer_types=_SLIDING, attn_logit_softcapping=20.0,
                   final_logit_softcapping=30.0, query_pre_attn_scalar=16),
    "qwen3": dict(_BASE),
}
LAYERS = [0, 1, 2]
NEW = 12
ATOL = 2e-4  # fp32 logits, cached against recomputed (sums in another order)


def build(family: str, attn: str = "eager", seed: int = 0) -> torch.nn.Module:
    """A tiny random ``family`` model, its q/k projections scaled (peaked attention: crystallizing moves logits)."""
    config = AutoConfig.for_model(family, **FAMILIES[family])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, attn_implementation=attn)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                param *= 3.0
    model.generation_config.eos_token_id = None  # every step generates: no stop, no EOS suppression to account for
    return model.float().eval()


def bases(model, d: int = 16) -> dict[int, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    return {li: torch.linalg.qr(torch.randn(4, d, d, generator=g, dtype=torch.float64))[0].float() for li in LAYERS}


CRYSTALS = {
    "top1": dict(mode="top1"),
    "lowrank": dict(mode="lowrank", d_r=4),
    "top1-sink2": dict(mode="top1", sink_tokens=2),
    "full": dict(mode="full"),
}


def crystal(model, name: str):
    kw = dict(CRYSTALS[name])
    if kw["mode"] == "lowrank":
        kw["basis"] = bases(model)
    return crystallize(model, LAYERS, **kw)


def prompt(n: int = 5, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, VOCAB, (1, n), generator=torch.Generator().manual_seed(seed))


def generate(model, ids: torch.Tensor, mask: torch.Tensor | None = None, **kw):
    out = model.generate(input_ids=ids, attention_mask=mask if mask is not None else torch.ones_like(ids),
                         max_new_tokens=NEW, do_sample=False, output_logits=True,
                         return_dict_in_generate=True, pad_token_id=0, **kw)
    return out.sequences, torch.stack(out.logits, dim=1)  # [B, T + NEW], [B, NEW, V]


def check_against_recompute(model, seq: torch.Tensor, logits: torch.Tensor, n_prompt: int) -> None:
    """Each generated step's logits equal the recompute of the whole sequence up to it (one causal forward of the
    final sequence holds every step's recompute: row t sees tokens <= t only), and so does each token where the
    recomputed top-2 margin is clear."""
    with torch.no_grad():
        full = model(input_ids=seq[:, :-1], use_cache=False).logits[:, n_prompt - 1:]
    torch.testing.assert_close(logits, full, atol=ATOL, rtol=1e-4)
    top2 = full.topk(2, dim=-1).values
    clear = (top2[..., 0] - top2[..., 1]) > 1e-3
    assert bool(clear.float().mean() > 0.8)
    assert torch.equal(seq[:, n_prompt:][clear], full.argmax(-1)[clear])


@pytest.mark.parametrize("name", list(CRYSTALS))
@pytest.mark.parametrize("family", list(FAMILIES))
def test_generate_with_a_cache_equals_the_recompute(family, name):
    model = build(family)
    ids = prompt()
    with crystal(model, name):
        seq, logits = generate(model, ids)
        check_against_recompute(model, seq, logits, ids.shape[1])
    if name == "full":  # full is the model's own attention: its own generate
        own_seq, own_logits = generate(model, ids)
        torch.testing.assert_close(logits, own_logits, atol=ATOL, rtol=1e-4)
    else:  # the crystallized layers change the model far beyond rounding
        with torch.no_grad():
            own = model(input_ids=seq[:, :-1]).logits[:, ids.shape[1] - 1:]
        assert float((own - logits).abs().max()) > 0.1


def test_the_recompute_loop_step_by_step():
    """Literally: a loop that recomputes the whole sequence each step (use_cache=False, greedy) gives the cached
    generate's tokens and logits, Mistral past its window under top1 with two sink tokens."""
    model = build("mistral")
    ids = prompt(7, seed=3)
    with crystal(model, "top1-sink2"):
        seq, logits = generate(model, ids)
        cur = ids
        with torch.no_grad():
            for step in range(NEW):
                last = model(input_ids=cur, use_cache=False).logits[:, -1]
                torch.testing.assert_close(logits[:, step], last, atol=ATOL, rtol=1e-4)
                cur = torch.cat([cur, last.argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(cur, seq)


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_a_static_cache(family):
    model = build(family)
    ids = prompt()
    with crystal(model, "lowrank"):
        seq, logits = generate(model, ids, cache_implementation="static")
        check_against_recompute(model, seq, logits, ids.shape[1])


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_a_left_padded_batch_equals_each_prompt_alone(family, attn):
    model = build(family, attn=attn)
    prompts = [prompt(n, seed=10 + n)[0] for n in (7, 4, 2)]
    T = max(len(p) for p in prompts)
    ids = torch.zeros(3, T, dtype=torch.long)
    mask = torch.zeros(3, T, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, T - len(p):], mask[b, T - len(p):] = p, 1
    with crystal(model, "top1-sink2"):
        seq, logits = generate(model, ids, mask)
        for b, p in enumerate(prompts):
            one_seq, one_logits = generate(model, p[None])
            assert torch.equal(seq[b, T:], one_seq[0, len(p):])
            torch.testing.assert_close(logits[b], one_logits[0], atol=ATOL, rtol=1e-4)


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_a_right_padded_scoring_batch_equals_each_alone(family):
    model = build(family)
    seqs = [prompt(n, seed=20 + n)[0] for n in (11, 8, 3)]
    T = max(len(s) for s in seqs)
    ids = torch.zeros(3, T, dtype=torch.long)
    mask = torch.zeros(3, T, dtype=torch.long)
    for b, s in enumerate(seqs):
        ids[b, :len(s)], mask[b, :len(s)] = s, 1
    with crystal(model, "lowrank"), torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
        for b, s in enumerate(seqs):
            alone = model(input_ids=s[None]).logits[0]
            torch.testing.assert_close(logits[b, :len(s)], alone, atol=ATOL, rtol=1e-4)


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_statistics_while_generating_count_each_row_once(family):
    """Crystallinity and Grams collected through generate (a cache: one row per step after the prompt) equal those of
    one forward of the sequence the model processed; a left-padded batch counts its real rows only, at their own
    positions."""
    model = build(family)
    ids = prompt(6, seed=4)
    acc, grams = CrystallinityAccumulator(LAYERS, 4, sink_tokens=2), GramAccumulator()
    with observe_residuals(model, LAYERS, grams, stats_acc=acc, sink_tokens=2):
        seq, _ = generate(model, ids)
    whole_acc, whole_grams = CrystallinityAccumulator(LAYERS, 4, sink_tokens=2), GramAccumulator()
    with observe_residuals(model, LAYERS, whole_grams, stats_acc=whole_acc, sink_tokens=2), torch.no_grad():
        model(input_ids=seq[:, :-1], use_cache=False)  # the last token is generated, never fed
    assert_same_statistics(acc, whole_acc, grams, whole_grams)

    # A left-padded batch of this prompt and a shorter one counts what the two counted alone.
    short = prompt(3, seed=8)
    ids2 = torch.zeros(2, 6, dtype=torch.long)
    ids2[0], ids2[1, 3:] = ids[0], short[0]
    mask = (torch.arange(6) >= torch.tensor([[0], [3]])).long()
    batch_acc, batch_grams = CrystallinityAccumulator(LAYERS, 4, sink_tokens=2), GramAccumulator()
    with observe_residuals(model, LAYERS, batch_grams, stats_acc=batch_acc, sink_tokens=2):
        generate(model, ids2, mask)
    alone_acc, alone_grams = CrystallinityAccumulator(LAYERS, 4, sink_tokens=2), GramAccumulator()
    with observe_residuals(model, LAYERS, alone_grams, stats_acc=alone_acc, sink_tokens=2):
        generate(model, ids)
        generate(model, short)
    assert_same_statistics(batch_acc, alone_acc, batch_grams, alone_grams)


def assert_same_statistics(acc, want_acc, grams, want_grams) -> None:
    got, want = acc.results(), want_acc.results()
    rows = {li: float(s[0, 4]) for li, s in acc._sums.items()}
    assert rows == {li: float(s[0, 4]) for li, s in want_acc._sums.items()}  # each row counted once
    for a, b in zip(got, want, strict=True):
        for key in ("top1_prob_mean", "sink_mass_mean", "winner_share_mean"):
            assert a[key] == pytest.approx(b[key], abs=1e-5), key
        for key in ("sink_frac", "self_frac", "prev_frac"):
            assert a[key] == pytest.approx(b[key], abs=1.5 / rows[a["layer"]]), key  # one near-tie at most
    for li in LAYERS:
        torch.testing.assert_close(grams.grams[li], want_grams.grams[li], atol=1e-6, rtol=1e-4)

"""The census (benchmarks/census.py): every causal LM of the installed transformers is exact or refused by name.

The full census is a CI tier of its own (minutes; run once, with NQPQ_CENSUS=1): any WRONG or CRASH fails, and so
does a family that the committed table (benchmarks/results/census.md) lists as EXACT and that no longer is, or one
it lists as built (any outcome but UNBUILT) that the census can no longer build.
The checks below it run always: the census classifies a known-good family, a refused one, and sees an error.
"""

from __future__ import annotations

import os
import warnings

import pytest
import torch

from benchmarks import census
from nqpq.model import census as census_kit
from nqpq.model import tiny_models


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def test_exact_and_refused_families_are_classified():
    llama = census.census_family("llama")
    assert llama["outcome"] == "EXACT", llama
    # Every check ran: full (last, all), replay (baseline, from each start), top-1 and low-rank.
    assert {"eager full last", "eager full all", "eager replay baseline", "eager top1 layer 5",
            "eager lowrank layer 5", "eager sharp top1 layer 5", "sdpa full all"} <= set(llama["errors"])
    bloom = census.census_family("bloom")
    assert bloom["outcome"] == "REFUSED" and "AttentionInterface" in bloom["detail"], bloom


def test_census_sees_a_small_error(monkeypatch):
    """A 1 % scale error in the op's output is WRONG, not EXACT: the tolerance is far below it."""
    import nqpq.model.crystal_attention as integration

    real = integration.residual_attention_impl

    def off_by_one_percent(backend):
        impl = real(backend)

        def wrong(*args, **kwargs):
            res = impl(*args, **kwargs)
            res.out.mul_(1.01)
            return res
        return wrong

    monkeypatch.setattr(integration, "residual_attention_impl", off_by_one_percent)
    row = census.census_family("llama")
    assert row["outcome"] == "WRONG", row


def test_reference_is_the_definition():
    """The census's float64 reference on a hand-made call: one query head, clear winner, learned sink of mass m."""
    q = torch.tensor([[[[0.0], [1.0], [1.0]]]])  # [B=1, H=1, T=3, D=1]
    k = torch.tensor([[[[0.0], [2.0], [0.0]]]])
    v = torch.tensor([[[[1.0], [3.0], [5.0]]]])
    out, clear = census_kit.float64_reference(q, k, v, 1.0, None, None, None, "top1", None, None)
    assert out[0, :, 0, 0].tolist() == [1.0, 3.0, 3.0]  # row 2: keys 0..2 score 0, 2, 0 → V[1]
    assert bool(clear.all())
    sink = torch.tensor([0.5])
    out, _ = census_kit.float64_reference(q, k, v, 1.0, None, None, sink, "top1", None, None)
    m = torch.tensor([0.0, 2.0, 0.0]).exp().sum().add(torch.tensor(0.5).exp()).reciprocal() * torch.tensor(0.5).exp()
    torch.testing.assert_close(out[0, 2, 0, 0], ((1 - m) * 3.0).double())

    # Llama 4's chunks of 2: row 2 starts a chunk and sees only key 2.
    out, _ = census_kit.float64_reference(q, k, v, 1.0, None, None, None, "top1", None, None, chunk=2)
    assert out[0, :, 0, 0].tolist() == [1.0, 3.0, 5.0]


def test_llama4_chunked_layers_are_exact():
    """Llama 4 (chunked attention on most layers): exact, with top-1 / low-rank checked on a chunked layer."""
    row = census.census_family("llama4_text")
    assert row["outcome"] == "EXACT" and "attention chunks" in row["structure"], row
    assert {"eager top1 layer 5", "eager lowrank layer 5"} <= set(row["errors"])

def test_gemma3n_wrapper_without_timm():
    """Gemma 3n's wrapper builds its vision tower with timm: without timm the census builds the wrapper with that
    tower left out (the text path is the real code) and nqpq runs its language model exactly."""
    row = census.census_family("gemma3n")
    assert row["outcome"] == "EXACT" and "wrapper gemma3n → gemma3n_text" in row["structure"], row
    try:
        import timm  # noqa: F401
    except ImportError:
        assert "vision tower not built (needs timm)" in row["structure"], row


def test_families_are_fed_what_their_forward_takes():
    """Musicgen (one row of codes per codebook) and a Gemma 4 assistant (its target model's embedding, hidden state
    and key/value states) build and run under the census: nqpq's verdict on them, not UNBUILT."""
    for family in ("musicgen", "gemma4_assistant"):
        row = census.census_family(family)
        assert row["outcome"] != "UNBUILT", row
    config = tiny_models.tiny_config("gemma4_assistant")
    model = tiny_models.model_class("gemma4_assistant")._from_config(config, attn_implementation="eager").eval()
    ids = torch.randint(3, tiny_models.VOCAB, (census.B, census.T))
    inputs = census_kit.model_inputs(model, ids)
    assert inputs["inputs_embeds"].shape == (census.B, 1, 2 * config.backbone_hidden_size)
    assert {k.shape[2] for k, _ in inputs["shared_kv_states"].values()} == {census.T}
    assert census_kit.logits_of(model, inputs).shape[:2] == (census.B, 1)


@pytest.mark.skipif(os.environ.get("NQPQ_CENSUS") != "1", reason="the full census is its own CI tier: NQPQ_CENSUS=1")
def test_census_every_family_exact_or_refused():
    rows = census.run_census(census.all_families(), jobs=2, say=lambda _line: None)
    bad = [f"{r['family']}: {r['outcome']} {r['detail']}" for r in rows if r["outcome"] in ("WRONG", "CRASH")]
    assert not bad, "\n".join(bad)
    committed = census.read_table()
    now = {r["family"]: r["outcome"] for r in rows}
    lost = [f"{f}: {now.get(f, 'missing')}" for f, o in committed.items() if o == "EXACT" and now.get(f) != "EXACT"]
    assert not lost, "families the committed census lists as EXACT and that no longer are:\n" + "\n".join(lost)
    unbuilt = [f"{r['family']}: {r['detail']}" for r in rows
               if r["outcome"] == "UNBUILT" and committed.get(r["family"], "UNBUILT") != "UNBUILT"]
    assert not unbuilt, "families the committed census built and that it no longer can:\n" + "\n".join(unbuilt)

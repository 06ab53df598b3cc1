"""Per-head crystallization in whole models: ``crystallize(model, {layer: heads})`` equals the float64 per-head
computation (tests/f64_reference.py's F64Reference with ``crystal_heads``: the chosen heads top-1 / low-rank, the
others plain attention) on tiny GQA models — a Llama with Hkv < Hq and gpt-oss (GQA, learned sinks, a sliding
window) — on the torch path and the Triton kernel (the interpreter on CPU); the query heads of one kv group are
chosen differently. ``calibrate`` reads a mapping as crystallize does and fits every head.
"""

from __future__ import annotations

import pytest
import torch
from conftest import REL_SCORE_MARGIN
from f64_reference import F64Reference, build_llama
from test_families import REL_TOL, B, assert_rel_close, logits, random_basis, token_ids
from tiny_families import VOCAB, build_family

from nqpq import calibrate
from nqpq.errors import LayerChoiceError
from nqpq.model.crystallize import crystallize
from nqpq.model.parts import model_parts

FAMILIES = ("llama", "gpt_oss")
# Heads 0 and 1 read kv head 0, heads 2 and 3 kv head 1: one of each group crystallized.
HEADS = (0, 3)


def build(family: str) -> torch.nn.Module:
    return build_llama(VOCAB) if family == "llama" else build_family(family)


def _backend_or_skip(backend: str) -> str:
    if backend == "triton":
        from nqpq_kernels.dispatch import resolve_backend

        try:
            resolve_backend("triton", "cuda" if torch.cuda.is_available() else "cpu")
        except RuntimeError as err:
            pytest.skip(f"Triton kernel not runnable here: {err}")
    return backend


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("mode", ["top1", "lowrank"])
@pytest.mark.parametrize("family", FAMILIES)
def test_chosen_heads_of_a_layer_match_float64(family, mode, backend):
    backend = _backend_or_skip(backend)
    dev = "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"
    model = build(family)
    ref = F64Reference(model)
    model.to(dev)
    parts = model_parts(model)
    layer = parts.attn_layers[-1]
    geo = parts.geometry[layer]
    assert geo.n_kv_heads < geo.n_heads == 4
    ids = token_ids()
    basis = random_basis(geo.n_heads, geo.v_dim)
    d_r = geo.v_dim // 2
    base = logits(model, ids.to(dev)).cpu()
    with crystallize(model, {layer: list(HEADS)}, mode=mode, basis={layer: basis}, d_r=d_r,
                     backend=backend) as patch:
        got = logits(model, ids.to(dev)).cpu()
    assert patch.layers == (layer,) and patch.heads == {layer: HEADS}
    with crystallize(model, [layer], mode=mode, basis={layer: basis}, d_r=d_r, backend=backend):
        every = logits(model, ids.to(dev)).cpu()
    ref.crystal = {layer: (mode, basis.double()[:, :, :d_r] if mode == "lowrank" else None)}
    ref.crystal_heads = {layer: set(HEADS)}
    ref.crystal_gaps.clear()
    want = logits(ref.model, ids)
    assert len(ref.crystal_gaps) == B * geo.n_heads
    assert min(ref.crystal_gaps) > REL_SCORE_MARGIN, "a near-tie in the test inputs: choose another seed"
    assert_rel_close(got, want)
    # Far beyond the tolerance from both the model and the layer with every head crystallized: the comparison
    # tells the heads apart.
    for other in (base, every):
        assert float((got - other).abs().max() / other.abs().max()) > 100 * REL_TOL


def test_every_head_listed_is_the_whole_layer():
    model = build("llama")
    layer = model_parts(model).attn_layers[-1]
    ids = token_ids()
    with crystallize(model, {layer: [3, 2, 1, 0]}, mode="top1", backend="torch") as patch:
        listed = logits(model, ids)
    assert patch.heads == {layer: (0, 1, 2, 3)}
    with crystallize(model, [layer], mode="top1", backend="torch") as patch:
        whole = logits(model, ids)
    assert patch.heads == {layer: None}
    assert torch.equal(listed, whole)


def test_calibrate_reads_a_mapping_as_crystallize_does():
    """The basis of every head is fitted whatever heads are named (the Gram is every head's); the heads are
    checked against the layer's query heads."""
    model = build("gpt_oss")
    layers = list(model_parts(model).attn_layers)
    blocks = torch.cat([token_ids(1), token_ids(2)])
    by_list = calibrate(model, blocks, layers, backend="torch")
    by_heads = calibrate(model, blocks, {layers[0]: [1], layers[-1]: [0, 2]}, backend="torch")
    assert sorted(by_heads.basis) == [layers[0], layers[-1]]
    for li in by_heads.basis:
        assert torch.equal(by_heads.basis[li], by_list.basis[li])
    with pytest.raises(LayerChoiceError, match=r"layer \d has query heads 0\.\.3$"):
        calibrate(model, blocks, {layers[0]: [4]}, backend="torch")

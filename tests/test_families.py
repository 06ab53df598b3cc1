"""Multi-head latent attention, learned attention sinks, DiffLlama's two-call attention and HRM's recurrent stacks,
against float64.

Tiny random models of each family (tests/tiny_families.py, fixed seeds): full mode on every attention layer equals
the model's own logits; top-1 and low-rank on one layer equal tests/f64_reference.py's per-head float64
computation from the q/k/v that layer received (scores in q/k's width, ε and the basis in v's; the learned sink a
zero-value key in the softmax); the calibration Grams and the crystallinity statistics equal float64's, with
DiffLlama's rows counted once per layer.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import REL_SCORE_MARGIN
from f64_reference import F64Reference
from tiny_families import MLA_FAMILIES, SINK_FAMILIES, VOCAB, build_family

from nqpq import PrefixRunner, block_losses
from nqpq.experiments.calibration import gram_passes
from nqpq.experiments.crystallinity import CrystallinityAccumulator
from nqpq.model.crystallize import crystallize, observe_residuals
from nqpq.model.parts import model_parts

FAMILIES = (*MLA_FAMILIES, *SINK_FAMILIES, "diffllama", "llama4_text")
B, T = 2, 24
# fp32 against float64 through three layers (MoE routers included): rounding is ~1e-7 relative to the logits;
# a crystallized layer moves them by 1e-2 or more (asserted), so the comparison is far from both.
REL_TOL = 2e-5


def token_ids(seed: int = 1) -> torch.Tensor:
    """[B, T] ids, no token twice in a row: in a layer without positions (Flint's NoPE layers) a repeated token
    repeats a key, and its exact score tie would hide a near-tie check behind a zero gap."""
    g = torch.Generator().manual_seed(seed)
    return torch.stack([1 + torch.randperm(VOCAB - 1, generator=g)[:T] for _ in range(B)])


@torch.no_grad()
def logits(model, ids) -> torch.Tensor:
    return model(input_ids=ids, use_cache=False).logits.double()


def assert_rel_close(got: torch.Tensor, want: torch.Tensor, rel: float = REL_TOL) -> None:
    err = float((got - want).abs().max() / want.abs().max())
    assert err <= rel, f"max |got − want| / max |want| = {err:.2e} > {rel:.0e}"


def random_basis(n_heads: int, dim: int, seed: int = 3) -> torch.Tensor:
    """[Hq, dim, dim] orthonormal columns (fixed seed): the low-rank check needs a basis, not a good one."""
    g = torch.randn(n_heads, dim, dim, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    return torch.linalg.qr(g).Q.float()


@pytest.mark.parametrize("family", FAMILIES)
def test_full_mode_on_every_layer_equals_the_model(family):
    model = build_family(family)
    ids = token_ids()
    want = logits(model, ids)
    parts = model_parts(model)
    with crystallize(model, parts.attn_layers, mode="full"):
        got = logits(model, ids)
    assert_rel_close(got, want, 1e-5)


@pytest.mark.parametrize("mode", ["top1", "lowrank"])
@pytest.mark.parametrize("family", FAMILIES)
def test_crystallized_layer_matches_float64(family, mode):
    model = build_family(family)
    ids = token_ids()
    parts = model_parts(model)
    base = logits(model, ids)
    ref = F64Reference(model)
    # The first layer (a sliding-window one in the SWA families: window 8 < T) and the last.
    for layer in (parts.attn_layers[0], parts.attn_layers[-1]):
        check_layer_against_f64(model, ref, parts.geometry[layer], layer, mode, ids, base)


def check_layer_against_f64(model, ref, geo, layer: int, mode: str, ids, base, calls: int = 1) -> None:
    """``layer`` crystallized in ``mode`` (a random basis in the value width, d_r = D_v / 2) gives the logits of
    the float64 reference model crystallized the same way; its module is called ``calls`` times per forward."""
    basis = random_basis(geo.n_heads, geo.v_dim)  # [Hq, D_v, D_v]: the value width, not q/k's
    d_r = geo.v_dim // 2
    with crystallize(model, [layer], mode=mode, basis={layer: basis}, d_r=d_r, backend="torch"):
        got = logits(model, ids)
    ref.crystal = {layer: (mode, basis.double()[:, :, :d_r] if mode == "lowrank" else None)}
    ref.crystal_gaps.clear()
    want = logits(ref.model, ids)
    assert len(ref.crystal_gaps) == calls * B * geo.n_heads, "the float64 layer was not called once per call"
    assert min(ref.crystal_gaps) > REL_SCORE_MARGIN, "a near-tie in the test inputs: choose another seed"
    assert_rel_close(got, want)
    # Crystallizing the layer matters far beyond the tolerance: the comparison is not between two baselines.
    assert float((got - base).abs().max() / base.abs().max()) > 100 * REL_TOL


def test_mla_geometry_and_rank_bound():
    """q/k 24 wide, v 12: the basis is [Hq, 12, R], d_r goes up to 12 (the value width) and not beyond."""
    model = build_family("deepseek_v3")
    parts = model_parts(model)
    layer = parts.attn_layers[-1]
    geo = parts.geometry[layer]
    assert (geo.qk_dim, geo.v_dim) == (24, 12)
    basis = random_basis(geo.n_heads, 12)
    ids = token_ids()
    with crystallize(model, [layer], mode="lowrank", basis={layer: basis}, d_r=12):
        got = logits(model, ids)
    with crystallize(model, [layer], mode="full"):
        full = logits(model, ids)
    assert_rel_close(got, full, 1e-5)  # d_r = D_v: the whole residual is kept
    with pytest.raises(ValueError, match=r"0\.\.12 \(the value head dimension D_v\)"):
        crystallize(model, [layer], mode="lowrank", basis={layer: basis}, d_r=13).__enter__()
    with pytest.raises(ValueError, match=r"\[H=4, D=12, R\]"):
        crystallize(model, [layer], mode="lowrank", basis={layer: random_basis(geo.n_heads, 24)}, d_r=4).__enter__()


# The kernel takes widths that are multiples of 16: MLA with q/k 32 (nope 16 + rope 16) and v 16 for it.
TRITON_CASES = {"gpt_oss": {}, "deepseek_v3": dict(qk_nope_head_dim=16, qk_rope_head_dim=16, v_head_dim=16),
                "mimo_v2_flash": dict(head_dim=32, v_head_dim=16), "llama4_text": {}}


@pytest.mark.parametrize("family", sorted(TRITON_CASES))
def test_triton_kernel_in_the_model_matches_float64(family):
    """The Triton kernel (compiled on CUDA, the interpreter on CPU) in place of the reference: top-1 and low-rank on
    one layer, and full mode against the model, with MLA widths and learned sinks."""
    from nqpq_kernels.dispatch import resolve_backend

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        resolve_backend("triton", dev)
    except RuntimeError as err:
        pytest.skip(f"Triton kernel not runnable here: {err}")
    model = build_family(family, **TRITON_CASES[family])
    ref = F64Reference(model)  # a float64 copy on the CPU
    model.to(dev)
    ids = token_ids()
    parts = model_parts(model)
    # MiMo: its sink layer; Llama 4: a chunked one.
    layer = parts.attn_layers[0] if family in ("mimo_v2_flash", "llama4_text") else parts.attn_layers[-1]
    geo = parts.geometry[layer]
    assert geo.qk_dim != geo.v_dim or geo.learned_sink or geo.attention_chunk
    base = logits(model, ids.to(dev)).cpu()
    with crystallize(model, [layer], mode="full", backend="triton"):
        assert_rel_close(logits(model, ids.to(dev)).cpu(), base, 1e-5)
    basis = random_basis(geo.n_heads, geo.v_dim)
    d_r = geo.v_dim // 2
    for mode in ("top1", "lowrank"):
        with crystallize(model, [layer], mode=mode, basis={layer: basis}, d_r=d_r, backend="triton"):
            got = logits(model, ids.to(dev)).cpu()
        ref.crystal = {layer: (mode, basis.double()[:, :, :d_r] if mode == "lowrank" else None)}
        ref.crystal_gaps.clear()
        want = logits(ref.model, ids)
        assert min(ref.crystal_gaps) > REL_SCORE_MARGIN, "a near-tie in the test inputs: choose another seed"
        assert_rel_close(got, want)


def test_learned_sink_with_sink_tokens_matches_float64():
    """gpt-oss with the first two keys kept apart as well: ground = Σ_{j<2} p_j V_j + (1 − m_S − m_L) V[i*ᴿ]."""
    model = build_family("gpt_oss")
    ids = token_ids()
    parts = model_parts(model)
    ref = F64Reference(model)
    ref.sink_tokens = 2
    for layer in parts.attn_layers:
        with crystallize(model, [layer], mode="top1", sink_tokens=2, backend="torch"):
            got = logits(model, ids)
        ref.crystal = {layer: ("top1", None)}
        want = logits(ref.model, ids)
        assert_rel_close(got, want)


@pytest.mark.parametrize("family, n", [("diffllama", 0), ("gpt_oss", 0), ("gpt_oss", 2), ("mimo_v2_flash", 0),
                                       ("deepseek_v3", 0), ("llama4_text", 0), ("llama4_text", 3)])
def test_grams_and_crystallinity_match_float64(family, n):
    """Calibration Grams ([Hq, D_v, D_v]) and crystallinity on every attention layer (with n sink tokens kept apart
    besides the learned sink); DiffLlama's two calls per layer are one attention: its rows are counted once, and
    both halves of V join the layer's Gram."""
    model = build_family(family)
    parts = model_parts(model)
    layers = list(parts.attn_layers)
    batches = [token_ids(1), token_ids(2)]
    grams = gram_passes(model, batches, layers, (n,), backend="torch")[n]
    acc = CrystallinityAccumulator(layers, {li: parts.geometry[li].n_heads for li in layers}, sink_tokens=n)
    with torch.no_grad(), observe_residuals(model, layers, None, stats_acc=acc, backend="torch", sink_tokens=n):
        for batch in batches:
            model(input_ids=batch, use_cache=False)

    ref = F64Reference(model)
    ref.observed, ref.grams, ref.sink_tokens = set(layers), {}, n
    for batch in batches:
        logits(ref.model, batch)
    assert min(ref.gaps) > REL_SCORE_MARGIN, "a near-tie in the test inputs: choose another seed"
    for li in layers:
        geo = parts.geometry[li]
        assert grams[li].shape == (geo.n_heads, geo.v_dim, geo.v_dim)
        assert_rel_close(grams[li], ref.grams[li], 1e-5)
        # Every row counted once: B·T per batch and head, also where the layer calls its attention twice.
        assert acc._sums[li][:, 4].tolist() == [float(len(batches) * B * T)] * geo.n_heads
    got, want = acc.results(), ref.crystallinity()
    assert [(e["layer"], e["head"]) for e in got] == [(e["layer"], e["head"]) for e in want]
    for g, w in zip(got, want):
        for key, value in w.items():
            assert math.isclose(g[key], value, rel_tol=1e-5, abs_tol=1e-6), (g["layer"], g["head"], key)
    if family in SINK_FAMILIES:  # the learned sink holds a real share of the sink layers' rows, and only theirs
        sink_layers = {li for li in layers if parts.geometry[li].learned_sink}
        assert sink_layers
        for li in layers:
            masses = [e["sink_mass_mean"] for e in got if e["layer"] == li]
            if li in sink_layers:
                assert min(masses) > 0 and sum(masses) / len(masses) > 0.05, (li, masses)
            else:  # MiMo-V2-Flash's full-attention layers have no sink
                assert max(masses) == 0, (li, masses)


def test_diffllama_calls_its_attention_twice_per_layer():
    """The premise of the once-per-layer counting: DiffLlama's module calls the function twice, on the same q and k."""
    model = build_family("diffllama")
    parts = model_parts(model)
    layer = parts.attn_layers[-1]
    seen = []

    class Count:
        def add(self, li, argmax, top1_prob, sink_mass=None, first_key_mass=None):
            seen.append(("stats", li))

    class Gram:
        def add(self, li, gram):
            seen.append(("gram", li))

    with torch.no_grad(), crystallize(model, [layer], mode="top1", gram_acc=Gram(), stats_acc=Count()):
        model(input_ids=token_ids(), use_cache=False)
    assert seen == [("gram", layer), ("stats", layer), ("gram", layer)]


def test_sparse_dsa_selection_is_refused_by_name():
    """DeepSeek V3.2 with index_topk 8 < T: sparse attention, which nqpq does not compute; refused, not ignored."""
    model = build_family("deepseek_v32")
    for module in model.modules():
        if hasattr(module, "index_topk"):
            module.index_topk = 8
    layer = model_parts(model).attn_layers[-1]
    with crystallize(model, [layer], mode="full"), pytest.raises(ValueError, match=r"selects 8 of 24 keys"):
        logits(model, token_ids())


@pytest.mark.parametrize("family", ["deepseek_v3", "gpt_oss"])
def test_sweep_and_scan_end_to_end(family, tokenizer, tmp_path, capsys):
    """`nqpq sweep` and `nqpq scan` on a saved tiny MLA model and a tiny gpt-oss (learned sinks, a sliding layer):
    exit 0, results.json naming both widths, d_r up to D_v and not beyond, finite perplexities."""
    from conftest import wikitext_text

    from nqpq.cli import main

    model_dir, text = tmp_path / family, tmp_path / "wiki.valid.raw"
    build_family(family, vocab_size=len(tokenizer)).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    text.write_text(wikitext_text(seed=3), encoding="utf-8")
    parts = model_parts(build_family(family, vocab_size=len(tokenizer)))
    layer = parts.attn_layers[-1]
    geo = parts.geometry[layer]
    common = ["--model", str(model_dir), "--text-file", str(text), "--n-blocks", "4", "--seq-len", "24",
              "--calib-blocks", "2", "--calib-from", "eval", "--device", "cpu", "--batch-size", "2", "--no-progress"]

    out = tmp_path / "sweep"
    assert main(["sweep", *common, "--layers", str(layer), "--d-r", "1", "4", str(geo.v_dim), "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    cfg = results["config"]
    assert (cfg["qk_dim"], cfg["v_dim"]) == (geo.qk_dim, geo.v_dim)
    assert [c["d_r"] for c in results["curve"]] == [1, 4, geo.v_dim]
    assert all(math.isfinite(c["ppl"]) for c in results["curve"])
    # d_r = D_v keeps the whole residual: the baseline's perplexity.
    assert results["curve"][-1]["ppl"] == pytest.approx(results["ppl_baseline"], rel=1e-5)
    if geo.learned_sink:
        assert all(e["sink_mass_mean"] > 0 for e in results["crystallinity"])
    report = capsys.readouterr().out
    widths = f"D={geo.v_dim}" if geo.qk_dim == geo.v_dim else f"D_qk={geo.qk_dim}, D_v={geo.v_dim}"
    widths += ", learned sinks" if geo.learned_sink else ""
    assert widths in report
    assert cfg["learned_sink"] is geo.learned_sink
    assert main(["sweep", *common, "--layers", str(layer), "--d-r", str(geo.v_dim + 1),
                 "--out", str(tmp_path / "bad")]) == 2
    assert f"1..{geo.v_dim}" in capsys.readouterr().err

    out = tmp_path / "scan"
    assert main(["scan", *common, "--d-r", "2", "--out", str(out)]) == 0
    assert f"{widths}; " in capsys.readouterr().out
    scan = json.loads((out / "results.json").read_text())
    assert [e["layer"] for e in scan["layers"]] == list(parts.attn_layers)
    assert all(math.isfinite(e["ppl_top1"]) for e in scan["layers"])


def test_output_attentions_with_a_learned_sink_are_the_models():
    """A crystallized gpt-oss layer reports the model's own probabilities: the learned sink in the softmax, dropped
    from p (each row sums to 1 − m_L)."""
    model = build_family("gpt_oss")
    ids = token_ids()
    layers = model_parts(model).attn_layers
    with torch.no_grad():
        want = model(input_ids=ids, use_cache=False, output_attentions=True).attentions
        with crystallize(model, layers, mode="full"):
            got = model(input_ids=ids, use_cache=False, output_attentions=True).attentions
    assert len(got) == len(want) == len(layers)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-6, rtol=1e-5)
        assert float(w.sum(-1).max()) < 1 - 1e-3  # the sink took a share: the check is not the plain softmax


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_llama4_chunked_layers(attn):
    """Llama 4: layers 0-2 are chunked (C = 8 < T = 24: query i sees keys j <= i with j // 8 == i // 8), layer 3 is a
    NoPE full-attention layer. The geometry says so; the chunked mask the model builds is accepted (eager, sdpa) and
    full mode equals the model; top-1 on a chunked layer with two sink keys kept apart equals float64 (rows of later
    chunks see no sink key)."""
    model = build_family("llama4_text", attn=attn)
    parts = model_parts(model)
    assert [parts.geometry[li].attention_chunk for li in parts.attn_layers] == [8, 8, 8, None]
    ids = token_ids()
    want = logits(model, ids)
    for layers in ([0], [3], list(parts.attn_layers)):
        with crystallize(model, layers, mode="full"):
            assert_rel_close(logits(model, ids), want, 1e-5)
    ref = F64Reference(model)
    ref.sink_tokens = 2
    with crystallize(model, [1], mode="top1", sink_tokens=2, backend="torch"):
        got = logits(model, ids)
    ref.crystal = {1: ("top1", None)}
    assert_rel_close(got, logits(ref.model, ids))
    # The mask is checked against the layer's chunk: taken for a plain causal layer, the chunked mask is refused.
    with crystallize(model, [0], mode="full", backend="torch"):
        parts.attn[0]._nqpq_layer_spec.attention_chunk = None
        with pytest.raises(ValueError, match="plain causal masking only"):
            logits(model, ids)


def test_llama4_sweep_end_to_end(tokenizer, tmp_path, capsys):
    """`nqpq sweep` on a saved tiny Llama 4, crystallizing a chunked layer: exit 0, results.json and the printed report
    name the chunk, d_r = D gives the baseline's perplexity."""
    from conftest import wikitext_text

    from nqpq.cli import main

    model_dir, text = tmp_path / "llama4", tmp_path / "wiki.valid.raw"
    build_family("llama4_text", vocab_size=len(tokenizer)).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    text.write_text(wikitext_text(seed=3), encoding="utf-8")
    out = tmp_path / "sweep"
    assert main(["sweep", "--model", str(model_dir), "--text-file", str(text), "--n-blocks", "4", "--seq-len", "24",
                 "--calib-blocks", "2", "--calib-from", "eval", "--device", "cpu", "--batch-size", "2",
                 "--no-progress", "--layers", "2", "--d-r", "1", "16", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["attention_chunk"] == {"2": 8}
    assert all(math.isfinite(c["ppl"]) for c in results["curve"])
    assert results["curve"][-1]["ppl"] == pytest.approx(results["ppl_baseline"], rel=1e-5)
    assert "attention chunks 8" in capsys.readouterr().out  # the report's model line


def hrm_reference(model) -> F64Reference:
    """The float64 copy of a tiny HRM, its modules numbered as the model's code lays them out: the low stack's
    layers 0..n-1, then the high stack's n..2n-1 (both stacks' modules carry layer_idx 0..n-1)."""
    ref = F64Reference(model)
    body = ref.model.model
    n = len(body.L_module.layers)
    for i, layer in enumerate([*body.L_module.layers, *body.H_module.layers]):
        layer.self_attn._nqpq_f64_layer = i
    assert n == model.config.num_layers_per_stack
    return ref


@torch.no_grad()
def test_hrm_layers_are_both_stacks():
    """HRM: num_hidden_layers counts the layer calls of its recurrent forward (2 per stack × H_cycles·(L_cycles+1)),
    not modules; its layers are the low stack's then the high stack's, every one an attention layer."""
    model = build_family("hrm_text")
    body = model.model
    parts = model_parts(model)
    assert model.config.num_hidden_layers == 2 * 2 * 3
    assert list(parts.layers) == [*body.L_module.layers, *body.H_module.layers]
    assert parts.n_layers == 4 and parts.attn_layers == (0, 1, 2, 3)
    assert [parts.attn[li] for li in parts.attn_layers] == [layer.self_attn for layer in parts.layers]


@pytest.mark.parametrize("mode", ["top1", "lowrank"])
def test_hrm_crystallized_layer_matches_float64_on_every_call(mode):
    """A crystallized HRM layer is crystallized on every call of its module (the low stack's 2 × 2 per forward, the
    high stack's 2): top-1 and low-rank equal float64 on each; full mode on every layer equals the model."""
    model = build_family("hrm_text")
    ids = token_ids()
    parts = model_parts(model)
    base = logits(model, ids)
    with crystallize(model, parts.attn_layers, mode="full"):
        assert_rel_close(logits(model, ids), base, 1e-5)
    ref = hrm_reference(model)
    calls = {0: 4, 1: 4, 2: 2, 3: 2}  # per forward: L_cycles · H_cycles for the low stack, H_cycles for the high
    for layer in (0, 3):
        check_layer_against_f64(model, ref, parts.geometry[layer], layer, mode, ids, base, calls[layer])


def test_hrm_grams_and_crystallinity_count_every_call():
    """Each call of an HRM layer's module is an attention: its rows join the statistics and its ε the Gram."""
    model = build_family("hrm_text")
    parts = model_parts(model)
    layers = list(parts.attn_layers)
    batches = [token_ids(1), token_ids(2)]
    grams = gram_passes(model, batches, layers, (0,), backend="torch")[0]
    acc = CrystallinityAccumulator(layers, {li: parts.geometry[li].n_heads for li in layers})
    with torch.no_grad(), observe_residuals(model, layers, None, stats_acc=acc, backend="torch"):
        for batch in batches:
            model(input_ids=batch, use_cache=False)
    ref = hrm_reference(model)
    ref.observed, ref.grams = set(layers), {}
    for batch in batches:
        logits(ref.model, batch)
    assert min(ref.gaps) > REL_SCORE_MARGIN, "a near-tie in the test inputs: choose another seed"
    calls = {0: 4, 1: 4, 2: 2, 3: 2}
    for li in layers:
        assert_rel_close(grams[li], ref.grams[li], 1e-5)
        assert acc._sums[li][:, 4].tolist() == [float(calls[li] * len(batches) * B * T)] * parts.geometry[li].n_heads
    got, want = acc.results(), ref.crystallinity()
    assert [(e["layer"], e["head"]) for e in got] == [(e["layer"], e["head"]) for e in want]
    for g, w in zip(got, want):
        for key, value in w.items():
            assert math.isclose(g[key], value, rel_tol=1e-5, abs_tol=1e-6), (g["layer"], g["head"], key)


@torch.no_grad()
def test_hrm_prefix_replay_runs_the_recurrent_forward():
    """HRM's body adds one stack's output to the other's input between cycles: the prefix replay runs its own forward
    with the calls before the start layer's first served from the baseline, and gives the model's losses, plain and
    crystallized from a low-stack and a high-stack layer."""
    model = build_family("hrm_text")
    blocks = torch.cat([token_ids(1), token_ids(2)])
    runner = PrefixRunner(model, blocks, [slice(0, 2), slice(2, 4)], start=(1, 2))
    baseline = runner.capture_baseline()
    torch.testing.assert_close(baseline, block_losses(model, blocks, 2), rtol=1e-6, atol=0)
    assert runner._via_body
    for start in (1, 2):
        torch.testing.assert_close(runner.losses(start=start), baseline, rtol=1e-6, atol=0)
        with crystallize(model, range(start, 4), mode="top1", backend="torch"):
            want = block_losses(model, blocks, 2)
            torch.testing.assert_close(runner.losses(start=start), want, rtol=1e-6, atol=0)
        # Crystallizing moves the losses ~50x the comparison's tolerance (rtol 1e-6 of losses ~4.6).
        assert float((want - baseline).abs().max()) > 1e-4

"""Gu et al. (ICLR 2025)'s attention-sink metric: the first-key mass per row (``nqpq_kernels.key_mass``) from each
backend's result, the heads' α₁ and Sink₁^ε of the accumulator and of the scan, each against float64 softmax
probabilities (``output_attentions`` of the model in float64 for the models), and the CLI's ``--preset gu2025``."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from nqpq.experiments.crystallinity import CrystallinityAccumulator
from nqpq.model.crystallize import observe_residuals
from nqpq.results.crystallinity_table import format_sink_metrics, sink_metrics
from nqpq_kernels import key_mass
from nqpq_kernels.dispatch import triton_residual_attention
from nqpq_kernels.reference import residual_attention_reference
from nqpq_kernels.streamed import residual_attention_streamed

BACKENDS = {"reference": residual_attention_reference, "streamed": residual_attention_streamed,
            "triton": triton_residual_attention}  # triton: the prefill kernel, the decode kernel for few cached rows
B, HQ, HKV, T, D = 2, 4, 2, 40, 16


def f64_key_probability(q, k, *, key_slot=0, scale=None, sliding_window=None, attention_chunk=None, softcap=None,
                        learned_sink=None, attn_mask=None) -> torch.Tensor:
    """float64 [B, Hq, Tq]: the softmax probability of key ``key_slot`` (an int or one per batch row), written out:
    the whole [Tq, Tk] score matrix, masked, softmaxed (with the learned sink's logit as an extra column)."""
    Bq, Hq, Tq, Dq = q.shape
    Tk = k.shape[2]
    s = q.double() @ k.double().repeat_interleave(Hq // k.shape[1], dim=1).transpose(-1, -2)
    s = s * (Dq ** -0.5 if scale is None else scale)
    if softcap is not None:
        s = torch.tanh(s / softcap) * softcap
    if attn_mask is None:
        i = torch.arange(Tk - Tq, Tk)[:, None]
        j = torch.arange(Tk)[None, :]
        seen = j <= i
        if sliding_window is not None:
            seen &= i - j < sliding_window
        if attention_chunk is not None:
            seen &= i // attention_chunk == j // attention_chunk
        s = s.masked_fill(~seen, -math.inf)
    elif attn_mask.dtype == torch.bool:
        s = s.masked_fill(~attn_mask, -math.inf)
    else:
        s = s + attn_mask.double()
    empty = torch.isneginf(s).all(dim=-1)
    if learned_sink is not None:
        s = torch.cat([s, learned_sink.double().view(1, Hq, 1, 1).expand(Bq, Hq, Tq, 1)], dim=-1)
    p = torch.softmax(s, dim=-1)
    slots = torch.as_tensor(key_slot).expand(Bq)
    first = torch.stack([p[b, :, :, int(slots[b])] for b in range(Bq)])
    return torch.where(empty, 0.0, first)  # a row that sees no key puts nothing anywhere


def _inputs(dtype=torch.float32, Tq=T, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, HQ, Tq, D, generator=g) * 1.5
    k = torch.randn(B, HKV, T, D, generator=g) * 1.5
    k[:, :, 0] += 2 * q.mean(dim=(1, 2))[:, None]  # key 0 a sink-like key: sizeable mass on many rows
    v = torch.randn(B, HKV, T, D, generator=g)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def _padding_mask() -> torch.Tensor:
    """bool [B, 1, T, T]: row 0 causal; row 1 left-padded by 5 (its pad queries see nothing: empty rows)."""
    causal = torch.ones(T, T).tril().bool()
    mask = causal[None, None].repeat(B, 1, 1, 1)
    mask[1, :, :, :5] = False
    mask[1, :, :5, :] = False
    return mask


def _float_mask() -> torch.Tensor:
    """float [1, HQ, T, T]: a per-head bias on the causal keys (ALiBi-like), -inf above the diagonal, and key 0
    hidden (a very negative finite value, as transformers' float masks) from the rows 30 and beyond."""
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    slopes = torch.tensor([0.0, 0.05, 0.1, 0.3])[:, None, None]
    mask = torch.where(j <= i, -slopes * (i - j), -math.inf)
    mask[:, 30:, 0] = torch.finfo(torch.float32).min
    return mask[None]


CASES = {
    "causal_gqa": {},
    "window": {"sliding_window": 6},
    "chunk": {"attention_chunk": 16},
    "softcap": {"softcap": 3.0},
    "sink_tokens": {"sink_tokens": 2},
    "learned_sink": {"learned_sink": torch.tensor([-1.0, 0.5, 2.0, 4.0])},
    "kv_cache": {"Tq": 3},
    "kv_cache_window": {"Tq": 3, "sliding_window": 39},  # the last row (position 39) no longer sees key 0
    "padding_mask": {"attn_mask": _padding_mask(), "key_slot": torch.tensor([0, 5])},
    "float_mask": {"attn_mask": _float_mask()},
    "fp16": {"dtype": torch.float16},
}


@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("case", list(CASES))
def test_first_key_mass_equals_float64(backend, case):
    """p[t, first key] from each backend's argmax and top-1 probability equals the float64 softmax; a row whose
    window, chunk or mask hides the key gets exactly 0."""
    kw = dict(CASES[case])
    dtype, Tq, key_slot = kw.pop("dtype", torch.float32), kw.pop("Tq", T), kw.pop("key_slot", 0)
    q, k, v = _inputs(dtype, Tq)
    res = BACKENDS[backend](q, k, v, mode="top1", return_argmax=True, return_top1_prob=True, **kw)
    geometry = {name: kw[name] for name in ("sliding_window", "attention_chunk", "softcap", "attn_mask") if name in kw}
    got = key_mass(q, k, res.argmax, res.top1_prob, key_slot=key_slot, **geometry)
    want = f64_key_probability(q, k, key_slot=key_slot, learned_sink=kw.get("learned_sink"), **geometry)
    assert got.dtype == torch.float32 and got.shape == (B, HQ, Tq)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    assert float(want.max()) > 0.1  # the key holds real mass somewhere: not a comparison of zeros
    assert bool((got[want == 0] == 0).all())  # hidden: exactly 0
    if case == "window":
        assert bool((got[:, :, 6:] == 0).all())
    if case == "kv_cache_window":
        assert bool((got[:, :, -1] == 0).all()) and bool((got[:, :, :-1] > 0).all())


def test_first_key_mass_of_a_non_finite_row_is_nan():
    q, k, v = _inputs()
    q[0, 1, 7] = math.nan
    res = residual_attention_reference(q, k, v, mode="top1", return_argmax=True, return_top1_prob=True)
    got = key_mass(q, k, res.argmax, res.top1_prob)
    assert math.isnan(got[0, 1, 7]) and int(torch.isnan(got).sum()) == 1


def _tiny_llama():
    from conftest import build_tokenizer
    from f64_reference import build_llama

    return build_llama(len(build_tokenizer()))


def _f64_alphas(model, blocks: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """float64 [L, Hq, B, T]: p[t, 0] from output_attentions of the model in float64 (eager attention)."""
    ref = copy.deepcopy(model).double()
    with torch.no_grad():
        out = ref(input_ids=blocks, attention_mask=attention_mask, output_attentions=True, use_cache=False)
    return torch.stack([a[..., 0].permute(1, 0, 2) for a in out.attentions])


@torch.no_grad()
def test_accumulator_alpha_and_sink_rate_equal_output_attentions_in_float64():
    model = _tiny_llama()
    layers = list(range(model.config.num_hidden_layers))
    blocks = torch.randint(1, 300, (3, 24), generator=torch.Generator().manual_seed(1))
    acc = CrystallinityAccumulator(layers, model.config.num_attention_heads)
    with observe_residuals(model, layers, None, stats_acc=acc):
        model(input_ids=blocks, use_cache=False)
    alphas = _f64_alphas(model, blocks).mean(dim=(2, 3))  # [L, Hq]: α₁ per head
    got = acc.results()
    for e in got:
        assert e["first_key_mass_mean"] == pytest.approx(float(alphas[e["layer"], e["head"]]), rel=1e-5, abs=1e-7)
    ranked = alphas.flatten().sort().values
    middle = float(ranked[len(ranked) // 2 - 1] + ranked[len(ranked) // 2]) / 2  # splits the heads in two halves
    for eps in (0.3, middle):
        assert (alphas - eps).abs().min() > 1e-5, f"a head's α₁ sits at ε = {eps}: the test cannot tell > from <="
        shares = [(alphas[li] > eps).double().mean() for li in layers]
        metrics = sink_metrics(got, eps)
        assert metrics["sink_rate"] == pytest.approx(float(sum(shares) / len(layers)), abs=1e-12)
        assert [m["sink_rate"] for m in metrics["layers"]] == pytest.approx([float(s) for s in shares], abs=1e-12)
    assert sink_metrics(got, middle)["sink_rate"] == 0.5


@torch.no_grad()
def test_learned_sink_and_window_model_alpha_equals_output_attentions_in_float64():
    """gpt-oss (a learned sink per head; sliding layers of window 8): α₁ is p[t, 0] of the model's own softmax over the
    keys and the sink, 0 on the rows whose window has moved past the first token, as its float64 attentions say."""
    from tiny_families import build_family

    model = build_family("gpt_oss")
    layers = [0, 1, 2]
    blocks = torch.randint(1, 96, (2, 20), generator=torch.Generator().manual_seed(4))
    acc = CrystallinityAccumulator(layers, model.config.num_attention_heads)
    with observe_residuals(model, layers, None, stats_acc=acc):
        model(input_ids=blocks, use_cache=False)
    first = _f64_alphas(model, blocks)  # [L, Hq, B, T]
    assert bool((first[0, :, :, 8:] == 0).all()) and bool((first[1, :, :, 8:] > 0).all())  # window 8, then full
    for e in acc.results():
        assert e["first_key_mass_mean"] == pytest.approx(float(first[e["layer"], e["head"]].mean()), rel=1e-5,
                                                         abs=1e-7)


@torch.no_grad()
def test_padded_batch_reads_each_sequences_first_token():
    """Left padding: α₁ is the mass on each sequence's first real token (slot 5 of a row padded by 5), averaged over
    the real rows only; equal to float64 attentions of the sequences run alone."""
    model = _tiny_llama()
    g = torch.Generator().manual_seed(2)
    seqs = [torch.randint(1, 300, (20,), generator=g), torch.randint(1, 300, (15,), generator=g)]
    ids = torch.zeros(2, 20, dtype=torch.int64)
    mask = torch.zeros(2, 20, dtype=torch.int64)
    for b, s in enumerate(seqs):
        ids[b, 20 - len(s):], mask[b, 20 - len(s):] = s, 1
    acc = CrystallinityAccumulator([1, 3], model.config.num_attention_heads)
    with observe_residuals(model, [1, 3], None, stats_acc=acc):  # each sequence at its own positions
        model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(dim=1) - 1).clamp(min=0), use_cache=False)
    per_seq = [_f64_alphas(model, s[None])[[1, 3], :, 0] for s in seqs]  # [2 layers, Hq, len]
    want = torch.cat(per_seq, dim=-1).mean(dim=-1)
    for e in acc.results():
        assert e["first_key_mass_mean"] == pytest.approx(float(want[[1, 3].index(e["layer"]), e["head"]]),
                                                         rel=1e-5, abs=1e-7)


def test_accumulator_checks_and_omits_alpha_not_fed():
    acc = CrystallinityAccumulator([0], 2)
    argmax = torch.zeros(1, 2, 3, dtype=torch.int64)
    top1 = torch.full((1, 2, 3), 0.5)
    with pytest.raises(ValueError, match="first_key_mass must be a float tensor"):
        acc.add(0, argmax, top1, first_key_mass=torch.zeros(1, 2, 4))
    acc.add(0, argmax, top1)
    assert "first_key_mass_mean" not in acc.results()[0]
    assert sink_metrics(acc.results()) is None and format_sink_metrics(None) == []
    acc.add(0, argmax, top1, first_key_mass=top1)
    with pytest.raises(RuntimeError, match="rows came with a first-key mass"):
        acc.results()


def test_sink_metrics_table_and_nan():
    entries = [{"layer": li, "head": h, "sink_frac": f, "first_key_mass_mean": a}
               for li, h, a, f in ((2, 0, 0.9, 1.0), (2, 1, 0.3, 0.5), (5, 0, 0.31, 0.0), (5, 1, 0.1, 0.0))]
    m = sink_metrics(entries, 0.3)
    assert [e["sink_rate"] for e in m["layers"]] == [0.5, 0.5]  # 0.3 is not above ε = 0.3
    assert m["sink_rate"] == 0.5 and m["first_token_argmax_share"] == pytest.approx(0.375)
    assert format_sink_metrics(m)[2:] == ["     2 |  0.6000  50.0%  75.0%", "     5 |  0.2050  50.0%   0.0%",
                                          " model: Sink1^0.3 = 50.00 % (mean over layers); first-token argmax "
                                          "share = 37.50 %"]
    entries[3]["first_key_mass_mean"] = math.nan
    m = sink_metrics(entries, 0.3)
    assert m["layers"][0]["sink_rate"] == 0.5 and math.isnan(m["layers"][1]["sink_rate"])
    assert math.isnan(m["sink_rate"])


def test_preset_fills_and_refuses(capsys):
    from nqpq.cli import build_parser, main
    from nqpq.cli_commands import apply_preset

    args = build_parser().parse_args(["scan", "--preset", "gu2025"])
    apply_preset(args)
    assert (args.seq_len, args.n_blocks, args.layers, args.sink_eps) == (64, 100, None, 0.3)
    args = build_parser().parse_args(["scan", "--preset", "gu2025", "--seq-len", "64", "--sink-eps", "0.3"])
    apply_preset(args)  # the preset's own values may be given
    args = build_parser().parse_args(["scan", "--sink-eps", "0.5"])
    apply_preset(args)
    assert (args.seq_len, args.n_blocks, args.layers, args.sink_eps) == (256, 30, None, 0.5)
    for extra, message in ((["--seq-len", "128"], "--preset gu2025 fixes --seq-len (64); got 128"),
                           (["--layers", "3"], "--preset gu2025 fixes --layers (every layer); got [3]")):
        assert main(["scan", "--demo", "--preset", "gu2025", *extra, "--no-progress"]) == 2
        assert capsys.readouterr().err.strip() == f"nqpq: error: {message}"
    assert main(["scan", "--demo", "--sink-eps", "1.5", "--no-progress"]) == 2
    assert "--sink-eps 1.5: must be in [0, 1)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        build_parser().parse_args(["scan", "--preset", "gu2024"])


@torch.no_grad()
def test_scan_alpha_and_sink_rate_on_smollm2_equal_float64(tmp_path):
    """The scan on SmolLM2 (two layers, 2 blocks of 64 tokens): every head's α₁ and the Sink₁^ε per layer and
    over the scanned layers equal output_attentions of the model in float64 (eager)."""
    from conftest import real_data
    from real_model import smollm2_files

    from nqpq.experiments.config import SweepConfig
    from nqpq.experiments.scan import run_scan
    from nqpq.sources.checkpoints import load_model, load_tokenizer
    from nqpq.sources.text import ids_for_blocks, rows_from_file

    folder = smollm2_files()[1]
    model = load_model(str(folder), "cpu", torch.float32)
    model.set_attn_implementation("eager")
    # WikiText validation, SmolLM2's tokenizer (no BOS): 2 scored blocks and 1 held-out calibration block of 64.
    ids = ids_for_blocks(rows_from_file(real_data().wiki_valid), load_tokenizer(str(folder)), 3 * 64)
    layers = (0, 24)
    cfg = SweepConfig(model="smollm2", layers=layers, d_r=(1,), n_blocks=2, seq_len=64, calib_blocks=1,
                      batch_size=2, device="cpu", backend="torch", progress=False)
    lines: list[str] = []
    results = run_scan(cfg, model=model, ids=ids, log=lines.append)
    alphas = _f64_alphas(model, ids[:128].view(2, 64))[list(layers)].mean(dim=(2, 3))  # [2, Hq]
    for e in results["crystallinity"]:
        assert e["first_key_mass_mean"] == pytest.approx(float(alphas[layers.index(e["layer"]), e["head"]]),
                                                         rel=1e-5, abs=1e-7)
    assert (alphas - 0.3).abs().min() > 1e-4  # no head at the threshold
    shares = (alphas > 0.3).double().mean(dim=1)
    sink = results["attention_sink"]
    assert [m["sink_rate"] for m in sink["layers"]] == pytest.approx(shares.tolist(), abs=1e-12)
    assert sink["sink_rate"] == pytest.approx(float(shares.mean()), abs=1e-12)
    assert 0 < sink["sink_rate"] < 1  # some heads sink, some don't: the comparison is not of all-0 or all-1 shares
    assert all(line in lines for line in format_sink_metrics(sink))

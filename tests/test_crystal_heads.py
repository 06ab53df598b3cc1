"""Per-head crystallization in the op (``crystal_heads``): the heads not chosen output plain attention, every head still
gives its statistics (the Gram of ε included), on every backend, against the float64 per-head definition
(``f64_reference.sink_plain`` with ``crystal_heads``) across the features that meet in one call: GQA with the query
heads of one kv group chosen differently, sink tokens, learned sinks, windows, chunks, MLA widths, masks.

Without CUDA the Triton kernel runs in Triton's CPU interpreter (TRITON_INTERPRET=1, set before triton is imported).
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from f64_reference import check_sink_against_f64  # noqa: E402

from nqpq_kernels import residual_attention  # noqa: E402
from nqpq_kernels.reference import residual_attention_reference  # noqa: E402
from nqpq_kernels.streamed import residual_attention_streamed  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _triton(q, k, v, **kw):
    from nqpq_kernels.prefill import interpreter_active, residual_attention_triton

    if DEV == "cpu" and not interpreter_active():
        pytest.skip("triton was imported before TRITON_INTERPRET=1 could be set; run with it in the environment")
    return residual_attention_triton(q, k, v, **kw)


BACKENDS = {
    "reference": residual_attention_reference,
    # Blocks of 16 query rows: the per-head selection must hold in every block, not only the first.
    "streamed": lambda q, k, v, **kw: residual_attention_streamed(q, k, v, block_size=16, **kw),
    "triton": _triton,
}


def qkv(B, Hq, Hkv, T, D, dtype, Dv=None, seed=0):
    """Random q, k, v with q scaled for clear maxima (the argmax is compared exactly on clear rows)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, T, D, generator=g) * 2.0
    k = torch.randn(B, Hkv, T, D, generator=g)
    v = torch.randn(B, Hkv, T, Dv or D, generator=g)
    return [t.to(device=DEV, dtype=dtype) for t in (q, k, v)]


def basis_for(Hq, Dv, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(Hq, Dv, Dv, generator=g, dtype=torch.float64))[0].float().to(DEV)


# name → (B, Hq, Hkv, T, D, Dv, dtype, features); Hq 4 over Hkv 2: heads 0, 1 share kv head 0 and 2, 3 kv head 1.
CASES = {
    "gqa": (2, 4, 2, 37, 16, None, torch.float32, {}),
    "gqa-fp16-sink": (1, 4, 2, 40, 16, None, torch.float16, {"sink_tokens": 2}),
    "mqa-window": (1, 4, 1, 45, 16, None, torch.float32, {"sliding_window": 7}),
    "learned-sink-per-head": (1, 4, 2, 33, 16, None, torch.float32, {"learned_sink": "head"}),
    "learned-sink-per-row-sink-tokens": (1, 4, 4, 33, 16, None, torch.float32,
                                         {"learned_sink": "row", "sink_tokens": 1}),
    "mla-widths-chunk": (1, 4, 2, 40, 32, 16, torch.float32, {"attention_chunk": 16}),
    "mask-softcap": (1, 4, 2, 30, 16, None, torch.float32, {"attn_mask": "bool", "softcap": 20.0}),
}
# The query heads of one kv group chosen differently (heads 0 and 3 crystallized, 1 and 2 plain).
CHOSEN = [True, False, False, True]


def features(spec, B, Hq, T, dtype):
    opts = dict(spec)
    g = torch.Generator().manual_seed(5)
    if opts.get("learned_sink") == "head":
        opts["learned_sink"] = torch.randn(Hq, generator=g).to(DEV)
    elif opts.get("learned_sink") == "row":
        opts["learned_sink"] = torch.randn(B, Hq, T, generator=g).to(DEV)
    if opts.get("attn_mask") == "bool":
        keep = torch.rand(B, 1, T, T, generator=g) > 0.3
        keep |= torch.eye(T, dtype=torch.bool)  # every row sees a key
        opts["attn_mask"] = (keep & torch.ones(T, T, dtype=torch.bool).tril()).to(DEV)
    return opts


@pytest.mark.parametrize("mode", ["top1", "lowrank"])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("backend", list(BACKENDS))
def test_chosen_heads_equal_float64(backend, case, mode):
    B, Hq, Hkv, T, D, Dv, dtype, spec = CASES[case]
    q, k, v = qkv(B, Hq, Hkv, T, D, dtype, Dv, seed=len(case))
    opts = features(spec, B, Hq, T, dtype)
    width = Dv or D
    basis = basis_for(Hq, width) if mode == "lowrank" else None
    d_r = 5 if mode == "lowrank" else None
    heads = torch.tensor(CHOSEN, device=DEV)
    run = BACKENDS[backend]
    kw = dict(mode=mode, basis=basis, d_r=d_r, return_argmax=True, return_gram=True, return_top1_prob=True,
              return_sink_mass=True, **opts)
    res = run(q, k, v, crystal_heads=heads, **kw)
    check_sink_against_f64(res, q, k, v, mode, basis, d_r, crystal_heads=heads,
                           min_clear=0.8 if "softcap" in spec else 0.9,
                           **{key: val for key, val in opts.items()})
    # The heads left plain are exactly "full"'s output where the kernel computed the same ctx; the statistics
    # (argmax, probabilities, sink mass, the Gram of ε) are those of the call without a choice, for every head.
    whole = run(q, k, v, **kw)
    for name in ("argmax", "top1_prob", "sink_mass", "gram"):
        torch.testing.assert_close(getattr(res, name), getattr(whole, name), atol=0, rtol=0, equal_nan=True, msg=name)
    full = run(q, k, v, **{**kw, "mode": "full", "basis": None, "d_r": None})
    plain = ~heads
    torch.testing.assert_close(res.out[:, plain].float(), full.out[:, plain].float(), atol=1e-6 if dtype ==
                               torch.float32 else 1e-3, rtol=1e-5 if dtype == torch.float32 else 1e-3)


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_all_true_or_full_is_the_whole_call_bit_for_bit(backend):
    """An all-True choice, and any choice in mode "full", resolve to the call without one: the same numbers."""
    q, k, v = qkv(1, 4, 2, 20, 16, torch.float32)
    run = BACKENDS[backend]
    a = run(q, k, v, mode="top1", return_argmax=True)
    b = run(q, k, v, mode="top1", return_argmax=True, crystal_heads=torch.ones(4, dtype=torch.bool, device=DEV))
    assert torch.equal(a.out, b.out) and torch.equal(a.argmax, b.argmax)
    f = run(q, k, v, mode="full")
    g = run(q, k, v, mode="full", crystal_heads=torch.tensor(CHOSEN, device=DEV))
    assert torch.equal(f.out, g.out)


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_no_head_chosen_outputs_plain_attention(backend):
    """Every head left plain (a whole kv group too): the output is "full"'s, in top-1 and low-rank alike."""
    q, k, v = qkv(1, 4, 2, 20, 16, torch.float32)
    none = torch.zeros(4, dtype=torch.bool, device=DEV)
    run = BACKENDS[backend]
    full = run(q, k, v, mode="full").out
    for mode, basis, d_r in (("top1", None, None), ("lowrank", basis_for(4, 16), 3)):
        out = run(q, k, v, mode=mode, basis=basis, d_r=d_r, crystal_heads=none).out
        torch.testing.assert_close(out, full, atol=1e-6, rtol=1e-5)
    # One whole kv group plain (heads 2, 3), the other crystallized: the op of the first group's heads alone.
    half = torch.tensor([True, True, False, False], device=DEV)
    out = run(q, k, v, mode="top1", crystal_heads=half).out
    top1 = run(q, k, v, mode="top1").out
    torch.testing.assert_close(out[:, :2], top1[:, :2], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out[:, 2:], full[:, 2:], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("heads,error,match", [
    ([True, False], ValueError, r"crystal_heads must be \[Hq=4\]"),
    ("list", TypeError, "crystal_heads must be a bool torch.Tensor"),
    ("int", TypeError, "crystal_heads must be a bool torch.Tensor"),
])
def test_bad_choice_is_named(heads, error, match):
    q, k, v = qkv(1, 4, 2, 8, 16, torch.float32)
    if heads == "list":
        heads = [True, False, True, False]
    elif heads == "int":
        heads = torch.tensor([1, 0, 1, 0], device=DEV)
    else:
        heads = torch.tensor(heads, device=DEV)
    with pytest.raises(error, match=match):
        residual_attention(q, k, v, mode="top1", backend="torch", crystal_heads=heads)


@pytest.mark.parametrize("Tq", [1, 3])
def test_chosen_heads_with_a_kv_cache_on_the_triton_router(Tq):
    """A cached call of few queries (what the router sends to the split-KV decode kernel) with heads left plain runs
    the prefill kernel's query offset instead (the decode kernel has no per-head mode): equal to float64."""
    from nqpq_kernels.dispatch import triton_residual_attention
    from nqpq_kernels.prefill import interpreter_active

    if DEV == "cpu" and not interpreter_active():
        pytest.skip("triton was imported before TRITON_INTERPRET=1 could be set; run with it in the environment")
    q, k, v = qkv(1, 4, 2, 40, 16, torch.float32, seed=11)
    q = q[:, :, -Tq:]
    heads = torch.tensor(CHOSEN, device=DEV)
    basis = basis_for(4, 16)
    res = triton_residual_attention(q, k, v, mode="lowrank", basis=basis, d_r=5, crystal_heads=heads,
                                    return_argmax=True, return_top1_prob=True, return_sink_mass=True)
    check_sink_against_f64(res, q, k, v, "lowrank", basis, 5, crystal_heads=heads)

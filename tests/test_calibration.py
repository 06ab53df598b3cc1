"""Streamed Gram calibration against the spec's stacked-residual SVD."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import HEAD_DIM, N_HEAD, assert_clear_argmax, relative_top2_gap, score_margins

from nqpq import GramAccumulator, ResidualBasis, basis_from_grams, calibrate, crystallize, make_blocks

LAYERS = (1, 3)
SEQ_LEN = 48


@torch.no_grad()
def spec_residuals(model, blocks, layers):
    """ε rows per (layer, head), collected as the spec does: a hook on .attn recomputing q, k, v (float64 here).

    Also returns the smallest top-2 score gap seen: i* is taken here in float64 and by nqpq in fp32.
    """
    rows, gaps = {}, []

    def make_hook(li):
        def hook(module, args, kwargs, output):
            hidden = args[0] if args else kwargs["hidden_states"]
            B, T, C = hidden.shape
            q, k, v = (x.view(B, T, N_HEAD, HEAD_DIM).permute(0, 2, 1, 3).double()
                       for x in module.c_attn(hidden).split(C, dim=2))
            scores = (q @ k.transpose(-1, -2)) / math.sqrt(HEAD_DIM)
            scores = scores.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), -math.inf)
            gaps.append(relative_top2_gap(scores))
            p = scores.softmax(-1)
            v_star = torch.gather(v, 2, p.argmax(-1).unsqueeze(-1).expand(-1, -1, -1, HEAD_DIM))
            eps = p @ v - v_star
            for b in range(B):
                for h in range(N_HEAD):
                    rows.setdefault((li, h), []).append(eps[b, h])
        return hook

    handles = [model.transformer.h[li].attn.register_forward_hook(make_hook(li), with_kwargs=True) for li in layers]
    try:
        for blk in blocks:
            model(input_ids=blk.unsqueeze(0), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return {key: torch.cat(chunks) for key, chunks in rows.items()}, gaps


def projector(basis, r):
    P = basis[:, :r].double()
    return P @ P.T


@pytest.fixture
def calib_blocks(token_ids):
    return make_blocks(token_ids, SEQ_LEN, 4)


def test_calibrate_matches_spec_svd(model, calib_blocks):
    got = calibrate(model, calib_blocks, LAYERS, batch_size=2, backend="torch")
    assert got.layers == list(LAYERS)
    residuals, gaps = spec_residuals(model, calib_blocks, LAYERS)
    assert_clear_argmax(gaps)
    checked_subspaces = 0
    for (li, h), E in residuals.items():
        assert E.shape == (4 * SEQ_LEN, HEAD_DIM)
        _, S, Vt = torch.linalg.svd(E, full_matrices=False)
        var = S**2
        cv = var.cumsum(0) / var.sum()
        evals = got.eigenvalues[li][h]
        assert evals.dtype == torch.float64 and evals.shape == (HEAD_DIM,)
        assert torch.all(evals[:-1] >= evals[1:])
        torch.testing.assert_close(evals, var, rtol=1e-5, atol=0)
        torch.testing.assert_close(got.cumulative_variance[li][h], cv, rtol=0, atol=1e-6)
        assert int(got.r90[li][h]) == int((cv < 0.90).sum()) + 1
        basis = got.basis[li][h]
        assert basis.dtype == torch.float32 and basis.shape == (HEAD_DIM, HEAD_DIM)
        torch.testing.assert_close(basis.double().T @ basis.double(), torch.eye(HEAD_DIM, dtype=torch.float64),
                                   rtol=0, atol=1e-5)
        for r in range(1, HEAD_DIM):
            if (var[r - 1] - var[r]) / var[r - 1] > 1e-3:  # the top-r subspace is well defined
                torch.testing.assert_close(projector(basis, r), projector(Vt.T, r), rtol=0, atol=1e-5,
                                           msg=f"layer {li} head {h} r={r}")
                checked_subspaces += 1
    assert checked_subspaces >= len(residuals) * (HEAD_DIM - 1) // 2


def test_gram_streaming_is_batch_independent(eager_model, calib_blocks):
    def grams(batch_size):
        sink = GramAccumulator()
        with torch.no_grad(), crystallize(eager_model, LAYERS, mode="full", backend="torch", gram_acc=sink):
            for s in range(0, len(calib_blocks), batch_size):
                eager_model.transformer(input_ids=calib_blocks[s:s + batch_size], use_cache=False)
        return sink.grams

    with score_margins(eager_model, LAYERS) as gaps:  # batch 4 and batch 1 round differently: no near-ties
        at_once, one_by_one = grams(4), grams(1)
    assert_clear_argmax(gaps)
    assert sorted(at_once) == list(LAYERS)
    for li in LAYERS:
        assert at_once[li].dtype == torch.float64 and at_once[li].shape == (N_HEAD, HEAD_DIM, HEAD_DIM)
        torch.testing.assert_close(at_once[li], one_by_one[li], rtol=1e-5, atol=1e-6 * at_once[li].abs().max().item())

    with score_margins(eager_model, LAYERS) as gaps:
        a = calibrate(eager_model, calib_blocks, LAYERS, batch_size=4, backend="torch")
        b = calibrate(eager_model, calib_blocks, LAYERS, batch_size=1, backend="torch")
    assert_clear_argmax(gaps)
    for li in LAYERS:
        top = a.eigenvalues[li][:, :1]
        torch.testing.assert_close(a.eigenvalues[li], b.eigenvalues[li], rtol=1e-5, atol=1e-6 * top.max().item())
        assert torch.equal(a.r90[li], b.r90[li])


def test_calibration_leaves_model_untouched(eager_model, calib_blocks):
    ids = calib_blocks[:2]
    with torch.no_grad():
        before = eager_model(input_ids=ids).logits
        calibrate(eager_model, calib_blocks, LAYERS, backend="torch")
        assert eager_model.config._attn_implementation == "eager"
        assert torch.equal(eager_model(input_ids=ids).logits, before)


def test_gram_accumulator_sums_without_aliasing():
    g1 = torch.randn(2, 3, 3, dtype=torch.float64)
    g2 = torch.randn(2, 3, 3).float()
    acc = GramAccumulator()
    acc.add(5, g1)
    acc.add(5, g2)
    acc.add(7, g2)
    torch.testing.assert_close(acc.grams[5], g1 + g2.double())
    assert acc.grams[7].dtype == torch.float64
    assert acc.grams[5].data_ptr() != g1.data_ptr()
    assert torch.equal(g1, g1.clone())  # the caller's tensor was not summed into


def test_basis_from_grams_on_known_spectrum():
    D = 8
    Q, _ = torch.linalg.qr(torch.randn(D, D, dtype=torch.float64, generator=torch.Generator().manual_seed(0)))
    lam = torch.tensor([50.0, 20.0, 10.0, 8.0, 4.0, 2.0, 1.0, 0.5], dtype=torch.float64)
    order = torch.tensor([3, 0, 7, 1, 5, 2, 6, 4])  # eigenvalues given in no particular order
    G = Q[:, order] @ torch.diag(lam[order]) @ Q[:, order].T
    got = basis_from_grams({2: torch.stack([G, 4 * G])})
    for h, scale in ((0, 1.0), (1, 4.0)):
        torch.testing.assert_close(got.eigenvalues[2][h], lam * scale)
        cv = lam.cumsum(0) / lam.sum()
        torch.testing.assert_close(got.cumulative_variance[2][h], cv)
        assert int(got.r90[2][h]) == 4  # 80/95.5 < 0.9 <= 88/95.5
        cos = (got.basis[2][h].double() * Q).sum(0).abs()  # each column is ± the matching eigenvector
        torch.testing.assert_close(cos, torch.ones(D, dtype=torch.float64), rtol=0, atol=1e-6)


def test_residual_basis_save_load_roundtrip(eager_model, calib_blocks, tmp_path):
    basis = calibrate(eager_model, calib_blocks[:2], LAYERS, backend="torch")
    path = tmp_path / "basis.pt"
    basis.save(str(path))
    loaded = ResidualBasis.load(str(path))
    assert loaded.layers == basis.layers
    for field in ("basis", "eigenvalues", "cumulative_variance", "r90"):
        a, b = getattr(basis, field), getattr(loaded, field)
        assert sorted(a) == sorted(b)
        for li in a:
            assert b[li].dtype == a[li].dtype and torch.equal(a[li], b[li])


def test_calibrate_refuses_1d_ids(eager_model, token_ids):
    """Issue 10: 1-D ids are not blocks (they were read as 4-token sequences)."""
    with pytest.raises(ValueError, match=r"blocks must be \[N, T\] token ids.*\(\d+,\)"):
        calibrate(eager_model, token_ids[:64], LAYERS, backend="torch")
    with pytest.raises(ValueError, match="batch_size must be at least 1"):
        calibrate(eager_model, token_ids[:64].view(2, 32), LAYERS, batch_size=0, backend="torch")


def test_float64_sums_live_on_the_cpu_for_mps():
    """Issue 14: devices without float64 (Apple MPS) accumulate the Gram on the CPU; others on the device."""
    from nqpq.experiments.calibration import float64_device

    assert float64_device(torch.device("mps")) == torch.device("cpu")
    assert float64_device(torch.device("cuda", 1)) == torch.device("cuda", 1)
    assert float64_device(torch.device("cpu")) == torch.device("cpu")

"""Perplexity, block losses, chunked LM head and the prefix-reusing runner."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import assert_clear_argmax, score_margins

from nqpq import PrefixRunner, block_losses, calibrate, crystallize, make_blocks, perplexity
from nqpq.model.losses import lm_losses

SEQ_LEN, N_BLOCKS = 32, 8


def rel(a, b):
    return abs(a - b) / abs(b)


@torch.no_grad()
def spec_perplexity(model, ids, seq_len, n_blocks):
    """The spec's definition: one block at a time, labels = the block, exp(mean of block losses)."""
    losses = []
    for b in range(n_blocks):
        blk = ids[b * seq_len:(b + 1) * seq_len].unsqueeze(0)
        losses.append(model(input_ids=blk, labels=blk).loss.item())
    return math.exp(sum(losses) / len(losses))


def test_make_blocks():
    ids = torch.arange(100)
    blocks = make_blocks(ids, 30, 3)
    assert blocks.shape == (3, 30) and torch.equal(blocks.flatten(), ids[:90])
    with pytest.raises(ValueError, match=r"n_blocks=4 blocks of 30 tokens need 120 tokens; the text has 100"):
        make_blocks(ids, 30, 4)
    with pytest.raises(ValueError, match="seq_len must be at least 2"):
        make_blocks(ids, 1, 3)
    with pytest.raises(ValueError, match="n_blocks must be at least 1"):
        make_blocks(ids, 10, 0)
    with pytest.raises(ValueError, match="1-D"):
        make_blocks(ids.view(10, 10), 5, 2)


def test_perplexity_matches_spec_definition(model, token_ids):
    want = spec_perplexity(model, token_ids, SEQ_LEN, N_BLOCKS)
    got = perplexity(model, token_ids, SEQ_LEN, N_BLOCKS)
    assert rel(got, want) <= 1e-6
    assert 1 < got < 1e4


def test_batch_size_does_not_matter(model, token_ids):
    ppl = [perplexity(model, token_ids, SEQ_LEN, N_BLOCKS, batch_size=bs) for bs in (1, 3, 8)]
    assert rel(ppl[1], ppl[0]) <= 1e-6 and rel(ppl[2], ppl[0]) <= 1e-6
    blocks = make_blocks(token_ids, SEQ_LEN, N_BLOCKS)
    one, three = block_losses(model, blocks, 1), block_losses(model, blocks, 3)
    assert one.dtype == torch.float64 and one.shape == (N_BLOCKS,)
    torch.testing.assert_close(three, one, rtol=1e-6, atol=0)


@torch.no_grad()
def test_chunked_lm_head(eager_model, token_ids):
    blocks = make_blocks(token_ids, SEQ_LEN, 3)
    hidden = eager_model.transformer(input_ids=blocks, use_cache=False).last_hidden_state
    whole = lm_losses(eager_model, hidden, blocks)
    vocab = eager_model.lm_head.out_features
    for max_logits in (1, vocab, 7 * vocab + 3):  # one row per chunk, exact rows, ragged last chunk
        torch.testing.assert_close(lm_losses(eager_model, hidden, blocks, max_logits=max_logits), whole,
                                   rtol=1e-6, atol=0)
    for b in range(3):
        want = eager_model(input_ids=blocks[b:b + 1], labels=blocks[b:b + 1]).loss.double()
        assert rel(whole[b].item(), want.item()) <= 1e-6


@pytest.mark.parametrize("layers", [(2, 3), (1, 3)])
def test_prefix_runner_matches_full_forward(model, token_ids, layers):
    blocks = make_blocks(token_ids, SEQ_LEN, N_BLOCKS)
    batches = [slice(0, 3), slice(3, 6), torch.tensor([6, 7])]
    runner = PrefixRunner(model, blocks, batches, start=min(layers))
    baseline = runner.capture_baseline()
    torch.testing.assert_close(baseline, block_losses(model, blocks, 1), rtol=1e-6, atol=0)

    basis = calibrate(model, blocks[:2], layers, backend="torch").basis
    for mode, d_r in (("top1", None), ("full", None), ("lowrank", 2), ("lowrank", 16)):
        # Batches of 3 and of 4 round differently; every row's argmax must be clear of that.
        with crystallize(model, layers, mode=mode, basis=basis, d_r=d_r, backend="torch"), \
                score_margins(model, layers) as gaps:
            replayed = runner.losses()
            want = block_losses(model, blocks, 4)
        assert_clear_argmax(gaps)
        torch.testing.assert_close(replayed, want, rtol=1e-6, atol=0, msg=f"{mode} d_r={d_r}")
    # Replaying without crystallization gives the baseline back.
    torch.testing.assert_close(runner.losses(), baseline, rtol=1e-6, atol=0)


def test_prefix_runner_without_batches(eager_model, token_ids):
    """Under torchrun a rank may be given no blocks at all: it contributes empty losses."""
    runner = PrefixRunner(eager_model, make_blocks(token_ids, SEQ_LEN, 2), [], start=1)
    for losses in (runner.capture_baseline(), runner.losses()):
        assert losses.shape == (0,) and losses.dtype == torch.float64


@torch.no_grad()
@torch.no_grad()
def test_config_without_return_dict(eager_model, token_ids):
    """A checkpoint whose config says return_dict=False (its body then returns tuples) scores as any other."""
    blocks = make_blocks(token_ids, SEQ_LEN, 3)
    want = block_losses(eager_model, blocks, 2)
    previous, eager_model.config.return_dict = eager_model.config.return_dict, False
    try:
        torch.testing.assert_close(block_losses(eager_model, blocks, 2), want, rtol=0, atol=0)
        runner = PrefixRunner(eager_model, blocks, [slice(0, 2), slice(2, 3)], start=2)
        torch.testing.assert_close(runner.capture_baseline(), want, rtol=0, atol=0)
    finally:
        eager_model.config.return_dict = previous


def test_lm_losses_form_fp32_logits(eager_model):
    """Issue 14 (5): a 16-bit model's logits are formed in fp32, not rounded to 16 bits before the loss."""
    model = eager_model.half()
    g = torch.Generator().manual_seed(0)
    hidden = (torch.randn(2, 16, model.config.n_embd, generator=g) * 60).half()  # |logits| ~ 10-40
    labels = torch.randint(0, model.config.vocab_size, (2, 16), generator=g)
    logits64 = hidden[:, :-1].double() @ model.lm_head.weight.double().T
    want = torch.nn.functional.cross_entropy(logits64.flatten(0, 1), labels[:, 1:].flatten(), reduction="none")
    want = want.view(2, 15).mean(1)
    assert logits64.abs().max() > 8  # where fp16 logits would be rounded to steps of 1/128 or coarser
    torch.testing.assert_close(lm_losses(model, hidden, labels), want, rtol=1e-6, atol=1e-6)


@torch.no_grad()
def test_prefix_runner_keeps_one_copy_of_layer_arguments(model, token_ids):
    """Issue 14 (8): batches of one shape share one recorded mask / position set; the record serves every start."""
    blocks = make_blocks(token_ids, SEQ_LEN, 7)
    runner = PrefixRunner(model, blocks, [slice(0, 3), slice(3, 6), slice(6, 7)], start=[3, 1])
    baseline = runner.capture_baseline()
    assert runner.starts == (1, 3) and runner.start == 1
    assert runner._args[0] is runner._args[1]  # same shape [3, T]: one record
    assert runner._args[2] is not runner._args[0]  # the ragged last batch has its own
    assert all(set(h) == {1, 3} for h in runner._hidden)
    for start in (1, 3):
        torch.testing.assert_close(runner.losses(start=start), baseline, rtol=1e-6, atol=0)
    with pytest.raises(ValueError, match="start=2 was not recorded"):
        runner.losses(start=2)
    with pytest.raises(ValueError, match="out of range"):
        PrefixRunner(model, blocks, [slice(0, 3)], start=4)


@torch.no_grad()
def test_prefix_runner_record_off_device_budget(eager_model, token_ids):
    """Hidden states over the record budget go to host memory; the replay is unchanged."""
    blocks = make_blocks(token_ids, SEQ_LEN, 4)
    runner = PrefixRunner(eager_model, blocks, [slice(0, 2), slice(2, 4)], start=2, record_budget=0)
    baseline = runner.capture_baseline()
    assert all(h[2].device.type == "cpu" for h in runner._hidden)
    torch.testing.assert_close(runner.losses(), baseline, rtol=1e-6, atol=0)


def test_bad_batch_sizes(eager_model, token_ids):
    """Issue 10: batch_size 0 (or not an int) is a clear error, not range()'s."""
    for bad in (0, -1):
        with pytest.raises(ValueError, match="batch_size must be at least 1"):
            perplexity(eager_model, token_ids, SEQ_LEN, 2, batch_size=bad)
    with pytest.raises(ValueError, match="batch_size must be an int"):
        perplexity(eager_model, token_ids, SEQ_LEN, 2, batch_size=1.5)


# The capped case keeps logits near its cap (Gemma 2's 30), where fp32 rounding shows: with scale 0.5 they stay
# under 13 and fp32 F.cross_entropy would pass the checks too (no teeth).
# 50,257 (GPT-2's vocabulary) is not a multiple of 8: lm_losses pads the head's rows (nqpq.model.losses.fp32_head).
@pytest.mark.parametrize("vocab", [50_000, 50_257])
@pytest.mark.parametrize("scale, cap", [(None, None), (1.5, 30.0)])
@torch.no_grad()
def test_lm_losses_exact_on_a_large_vocabulary(scale, cap, vocab):
    """Issue 26 (4): lm_losses takes the loss of the fp32 logits with an fp32 log-sum-exp whose pieces (max, sum of
    exps, target logit) are combined in float64, and means in float64. Against a float64 cross-entropy of the very
    same fp32 logits, each token's loss is within the rounding bound of that computation (u = 2^-24: u·|z − m| for
    each shift, 2u for each exp, 2u per level of a pairwise sum over V terms, so u·(E_p[m − z] + 2 + 2·log2 V)),
    and the blocks' PPL within 1e-6 relative (the requirement), where fp32 F.cross_entropy is off by more on both
    counts (its per-token errors are larger and biased)."""
    from types import SimpleNamespace

    width, n_blocks, seq_len = 64, 2, 65
    g = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(width, vocab, bias=True)
    head.weight.copy_(torch.randn(vocab, width, generator=g) * 0.3)
    head.bias.copy_(torch.randn(vocab, generator=g))
    hidden = torch.randn(n_blocks, seq_len, width, generator=g) * 2  # logits spread over tens, as trained LMs'
    labels = torch.randint(0, vocab, (n_blocks, seq_len), generator=g)
    parts = SimpleNamespace(lm_head=head, logit_scale=scale, final_logit_softcap=cap)
    got = lm_losses(head, hidden, labels, parts=parts)  # one chunk holds every row: the same fp32 GEMM as below
    # Each token alone: a block of two positions [its hidden state, anything] -> its label; the same rows in the
    # same order, so the same fp32 logits.
    n_tok = n_blocks * (seq_len - 1)
    tok_hidden = torch.stack([hidden[:, :-1].reshape(-1, width), torch.zeros(n_tok, width)], dim=1)
    tok_labels = torch.stack([torch.zeros(n_tok, dtype=labels.dtype), labels[:, 1:].reshape(-1)], dim=1)
    got_tok = lm_losses(head, tok_hidden, tok_labels, parts=parts)

    # The reference: the same fp32 logits (same ops, same shapes), their cross-entropy in float64.
    logits = torch.nn.functional.linear(hidden[:, :-1].reshape(-1, width), head.weight, head.bias)
    if scale is not None:
        logits = logits * scale
    if cap is not None:
        logits = torch.tanh(logits / cap) * cap
    assert logits.abs().max() > 20
    targets = labels[:, 1:].reshape(-1)
    z = logits.double()
    exact = torch.nn.functional.cross_entropy(z, targets, reduction="none")
    want = exact.view(n_blocks, seq_len - 1).mean(dim=1)
    gap = ((z.max(dim=1, keepdim=True).values - z) * z.softmax(dim=1)).sum(dim=1)  # E_p[m - z] per token
    bound = 2.0**-24 * (gap + 2 + 2 * math.ceil(math.log2(vocab)))
    assert got.dtype == torch.float64 and got_tok.dtype == torch.float64
    assert ((got_tok - exact).abs() <= bound).all()
    assert ((got - want).abs() <= 1e-6).all()  # exp of a mean loss: 1e-6 relative in PPL
    # The fp32 cross-entropy this replaced fails both on these very logits: the checks above have teeth.
    fp32 = torch.nn.functional.cross_entropy(logits, targets, reduction="none").double()
    assert ((fp32 - exact).abs() > bound).any()
    assert ((fp32.view(n_blocks, seq_len - 1).mean(dim=1) - want).abs() > 1e-6).any()


@pytest.mark.parametrize("bias", [True, False])
@torch.no_grad()
def test_lm_losses_padded_head_rows_carry_no_probability(bias):
    """The zero rows ``fp32_head`` pads an odd vocabulary with give logit 0; lm_losses must drop them, not score
    them. With every real logit far below 0 (a bias of -60; a head without bias: negative weights on positive
    states), a padding logit left in would hold almost all the probability; the losses equal a float64
    cross-entropy over the real vocabulary only. A changed weight is picked up (the padded copy is rebuilt)."""
    from types import SimpleNamespace

    from nqpq.model.losses import fp32_head

    vocab, width = 1_003, 16
    g = torch.Generator().manual_seed(1)
    head = torch.nn.Linear(width, vocab, bias=bias)
    head.weight.copy_(torch.rand(vocab, width, generator=g) * -4.0 - (0.0 if bias else 2.0))
    if bias:
        head.bias.copy_(torch.full((vocab,), -60.0) + torch.randn(vocab, generator=g))
    hidden = torch.rand(2, 9, width, generator=g) + (0.0 if bias else 1.0)
    labels = torch.randint(0, vocab, (2, 9), generator=g)
    parts = SimpleNamespace(lm_head=head, logit_scale=None, final_logit_softcap=None)

    def want() -> torch.Tensor:
        logits = torch.nn.functional.linear(hidden[:, :-1].double(), head.weight.double(),
                                            None if head.bias is None else head.bias.double())
        return torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels[:, 1:], reduction="none").mean(1)

    assert fp32_head(head)[0].shape[0] == 1_008
    torch.testing.assert_close(lm_losses(head, hidden, labels, parts=parts), want(), rtol=1e-6, atol=0)
    head.weight.mul_(0.5)  # in place: the same storage, a new version
    torch.testing.assert_close(lm_losses(head, hidden, labels, parts=parts), want(), rtol=1e-6, atol=0)

"""Perplexity: blocks, the exact per-block loss, and the straightforward evaluator (the prefix-reusing one the
sweep uses is ``nqpq.model.replay.PrefixRunner``).

Definition (the spec's): over blocks b = 0 .. n_blocks − 1 of ``seq_len`` tokens,
each block is scored with labels = the block (shifted next-token loss, seq_len − 1
predictions); PPL = exp(mean over blocks of each block's mean loss).
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import UnsupportedModelError
from ..results.stats import ppl_from_losses
from .devices import execution_device, input_device, weights_on_device
from .parts import ModelParts, as_index, model_parts

# Logits are formed this many elements at a time (fp32: 256 MiB), so the LM head
# never materialises [batch, T, vocab] at once.
MAX_LOGIT_ELEMENTS = 1 << 26


def text_tokens_per_block(seq_len: int, bos_id: int | None) -> int:
    """Text tokens one block holds: ``seq_len``, or ``seq_len - 1`` when each block starts with BOS."""
    return seq_len - (bos_id is not None)


def make_blocks(ids: Tensor, seq_len: int, n_blocks: int, *, bos_id: int | None = None,
                first_block: int = 0) -> Tensor:
    """``[n_blocks, seq_len]`` consecutive blocks of a 1-D token tensor, starting at block ``first_block``.

    Without ``bos_id`` (the spec's blocks): block b is ``ids[(first_block + b)·seq_len : ... + seq_len]``.
    With ``bos_id`` (for models trained to see BOS first: Gemma, Llama 3): every block starts with it and
    holds ``seq_len − 1`` text tokens, block b = ``[bos_id] + ids[(first_block + b)·(seq_len − 1) : ...]``;
    ``ids`` are then the text's tokens without special tokens. BOS is position 0, never a scored target
    (the loss scores positions 1..seq_len − 1).
    """
    if ids.dim() != 1:
        raise ValueError(f"ids must be 1-D token ids, got shape {tuple(ids.shape)}")
    if seq_len < 2:
        raise ValueError(f"seq_len must be at least 2 (one prediction per block), got {seq_len}")
    if n_blocks < 1:
        raise ValueError(f"n_blocks must be at least 1, got {n_blocks}")
    if first_block < 0:
        raise ValueError(f"first_block must be >= 0, got {first_block}")
    per_block = text_tokens_per_block(seq_len, bos_id)
    available = ids.numel() // per_block
    if first_block + n_blocks > available:
        what = f"{seq_len} tokens" if bos_id is None else f"BOS + {per_block} text tokens"
        raise ValueError(
            f"n_blocks={n_blocks} blocks of {what}{f' after {first_block} others' if first_block else ''} need "
            f"{(first_block + n_blocks) * per_block} tokens; "
            f"the text has {ids.numel()} tokens ({available} blocks)"
        )
    text = ids[first_block * per_block : (first_block + n_blocks) * per_block].view(n_blocks, per_block)
    if bos_id is None:
        return text
    return torch.cat([torch.full((n_blocks, 1), int(bos_id), dtype=ids.dtype), text], dim=1)


def lm_losses(
    model: nn.Module,
    hidden: Tensor,
    labels: Tensor,
    max_logits: int = MAX_LOGIT_ELEMENTS,
    parts: ModelParts | None = None,
) -> Tensor:
    """Per-block mean next-token loss ``[N]`` (float64) from final hidden states ``[N, T, C]``.

    The logits are formed in fp32 whatever the model's dtype (16-bit logits would round |logit| ~ 64 to
    steps of 0.25–0.5 before the loss): the LM head's weight is upcast once per call and the hidden states
    one chunk of ``max_logits`` logits at a time. The model's logit scale (Cohere, Granite) and final logit
    soft-cap (Gemma 2) are applied, as its own forward does.

    The loss of those fp32 logits: loss = m + log s − z_target with m = max_j z_j (exact in fp32) and
    s = Σ_j exp(z_j − m), taken in fp32 in place on the chunk (a max, a subtract, an exp and a sum: no
    temporary the size of the logits); m, log s and z_target are then combined in float64, and every mean
    over tokens is taken in float64. Error per token: ~u·(E_p[m − z] + log2 V) absolute, u = 2^-24 (the
    shift z − m rounds by u·|z − m|, exp by ~u, the sum by ~u per level), never the ~u·|m| of an fp32
    ``m + log s`` or of fp32 log-softmax values near |logit| ~ 40; summing per-token losses in float64 keeps
    that error from growing with the token count. Measured on 2040 tokens (``python -m benchmarks.logits
    --device cpu --dtypes fp32``, against the float64 cross-entropy of the same fp32 logits, 2 CPU cores shared
    with other jobs, two runs: the times are noisy, the errors deterministic):

    ======================================  =====================  ======================  ===================
    path                                    SmolLM2-135M's logits  peaked synthetic over   time vs fp32
                                            (V 49152): per token   GPT-2's V 50257: per    F.cross_entropy
                                            max / PPL rel. error   token max / PPL rel.
    ======================================  =====================  ======================  ===================
    fp32 ``F.cross_entropy``                2.0e-5 / 7.8e-6        2.2e-5 / 2.7e-6         1
    fp32 ``torch.logsumexp`` − target       2.1e-6 / 1.7e-8        1.9e-6 / 1.1e-8         1.2–1.7x
    float64 exp / sum / log (issue 17)      1.6e-14 / 5e-17        1.2e-14 / 6e-17         2.1–3.8x
    this                                    5.7e-7 / 1.9e-8        5.3e-7 / 1.7e-8         0.40–0.62x (*)
    ======================================  =====================  ======================  ===================

    The requirement is 1e-6 relative in PPL (issue 26). fp32 ``F.cross_entropy`` misses it by a systematic
    bias (its per-token errors average −7.8e-6 and −2.7e-6 here); ``torch.logsumexp`` rounds each loss at the
    logits' magnitude and allocates a shifted copy; the float64 path pays for converting copies. This writes
    nothing the size of the logits. (*) One run measured 1.57x on the peaked logits under load; with the GEMM
    (GPT-2's head on 2040 tokens) the whole ``lm_losses`` took 0.95x the fp32 head + ``F.cross_entropy``, where
    issue 17's float64 loss took 1.18x (``benchmarks/results/logits_cpu.csv``, then and now).
    """
    parts = parts or model_parts(model)
    transform = getattr(parts, "head_transform", None)  # a bare head description (benchmarks.logits) has none
    if transform is not None:
        # A BERT-style prediction head's transform (dense, activation, LayerNorm) first, as the model's forward
        # applies it: in the model's dtype, where its modules compute (a device map moves the result back).
        hidden = transform(hidden).to(hidden.device)
    N, T, C = hidden.shape
    flat_hidden = hidden[:, :-1].reshape(-1, C)
    flat_labels = labels[:, 1:].reshape(-1).to(hidden.device)
    head = parts.lm_head
    if not isinstance(head, nn.Linear):
        raise UnsupportedModelError(f"the LM head is a {type(head).__name__}; nqpq expects an nn.Linear")
    vocab = head.weight.shape[0]
    weight, bias = fp32_head(head)
    scale, cap = parts.logit_scale, parts.final_logit_softcap
    chunk = max(1, max_logits // weight.shape[0])
    nll = torch.empty(flat_labels.numel(), dtype=torch.float64, device=hidden.device)
    for s in range(0, flat_labels.numel(), chunk):
        logits = F.linear(flat_hidden[s : s + chunk].float(), weight, bias)  # a fresh chunk: ours to overwrite
        if scale is not None:
            logits.mul_(scale)
        if cap is not None:
            logits.div_(cap).tanh_().mul_(cap)
        if weight.shape[0] > vocab:  # the padding rows: no logit at all (exp(-inf - m) adds exactly 0 to the sum)
            logits[:, vocab:] = float("-inf")
        nll[s : s + chunk] = _fp32_logit_losses(logits, flat_labels[s : s + chunk])
    return nll.view(N, T - 1).mean(dim=1)


# GEMM row count the padded head weight is rounded up to (see ``fp32_head``).
HEAD_ROWS_MULTIPLE = 8
_padded_heads: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def fp32_head(head: nn.Linear) -> tuple[Tensor, Tensor | None]:
    """The LM head's weight and bias in fp32, the weight's rows (the vocabulary) padded with zero rows to a
    multiple of ``HEAD_ROWS_MULTIPLE`` when they are not one already; ``lm_losses`` gives the padding logits
    −inf, so the loss is over the real vocabulary only.

    Why: an odd row count is a slow shape for the BLAS GEMM. GPT-2's head (50,257 rows) on 2,040 tokens took
    1.21 s on 2 CPU cores where the same GEMM over 50,264 rows took 0.93 s (MKL, torch 2.13; the same for
    50,304 = 64·786); vocabularies that are multiples of 8 (SmolLM2's 49,152, Llama 3's 128,256, Gemma 3's
    262,144) are used as they are. The real rows give the same fp32 logits (bit-equal in those runs). The copy
    is kept for the module (rebuilt when the weight changes) unless accelerate offloads the head, whose weight is
    loaded only for the call.
    """
    weight, bias = head.weight, head.bias
    rows = weight.shape[0]
    padded_rows = -(-rows // HEAD_ROWS_MULTIPLE) * HEAD_ROWS_MULTIPLE
    if padded_rows == rows:
        return weight.float(), None if bias is None else bias.float()
    key = (weight.data_ptr(), weight._version, weight.dtype, weight.device,
           None if bias is None else (bias.data_ptr(), bias._version))
    cached = _padded_heads.get(head)
    if cached is not None and cached[0] == key:
        return cached[1], cached[2]
    with torch.no_grad():  # a copy of the weights, never part of a graph
        padded = weight.new_zeros(padded_rows, weight.shape[1], dtype=torch.float32)
        padded[:rows].copy_(weight)
        padded_bias = None
        if bias is not None:
            padded_bias = bias.new_zeros(padded_rows, dtype=torch.float32)
            padded_bias[:rows].copy_(bias)
    if getattr(head, "_hf_hook", None) is None:
        _padded_heads[head] = (key, padded, padded_bias)
    return padded, padded_bias


def _fp32_logit_losses(logits: Tensor, targets: Tensor) -> Tensor:
    """Per-row cross-entropy (float64) of fp32 ``logits`` ``[rows, V]``, overwriting them (see ``lm_losses``).

    One pass each for the max, the shift, the exp and the sum, all in place: on CPU the cost of an fp32
    log-sum-exp is in memory passes and fresh allocations (``torch.logsumexp`` allocates a shifted copy,
    ``F.cross_entropy`` writes a log-softmax), not in the arithmetic. Row-blocks that fit in cache measured
    slower on 2 cores (per-call overhead and thread start-up outweigh the saved memory traffic).
    """
    target = logits.gather(1, targets[:, None])[:, 0].double()
    row_max = logits.amax(dim=1, keepdim=True)
    # z − m ≤ 0 is exact when z is within a factor of 2 of m (the terms that carry the sum); exp runs in place.
    sum_exp = logits.sub_(row_max).exp_().sum(dim=1)
    return row_max[:, 0].double() + sum_exp.double().log() - target


def check_batch_size(batch_size: object) -> int:
    """``batch_size`` as an int of at least 1 (numpy/torch integers accepted), or a ValueError."""
    size = as_index(batch_size, "batch_size")
    if size < 1:
        raise ValueError(f"batch_size must be at least 1, got {size}")
    return size


@torch.no_grad()
def block_losses(model: nn.Module, blocks: Tensor, batch_size: int = 1) -> Tensor:
    """Per-block mean loss ``[N]`` of the model as it stands (any crystallization applies)."""
    batch_size = check_batch_size(batch_size)
    parts = model_parts(model)
    device = input_device(model)
    out = []
    for s in range(0, blocks.shape[0], batch_size):
        batch = blocks[s : s + batch_size].to(device)
        # return_dict=True: a saved config may say return_dict=False, and the body would then return a tuple.
        hidden = parts.body(input_ids=batch, use_cache=False, return_dict=True).last_hidden_state
        out.append(head_losses(model, hidden, batch, parts))
    return cat_losses(out)


def head_losses(model: nn.Module, hidden: Tensor, labels: Tensor, parts: ModelParts) -> Tensor:
    """``lm_losses`` where the LM head computes: under a device map the final hidden state may sit on another
    device than the head (moved there), and an offloaded head's weight is loaded for the call (``lm_losses``
    reads the weight itself rather than calling the module, so accelerate's hook would not)."""
    device = execution_device(parts.lm_head)
    with weights_on_device(parts.lm_head):
        return lm_losses(model, hidden.to(device), labels.to(device), parts=parts)


def perplexity(model: nn.Module, ids: Tensor, seq_len: int, n_blocks: int, batch_size: int = 1) -> float:
    """The spec's perplexity of ``model`` on the first ``n_blocks`` blocks of ``ids``."""
    batch_size = check_batch_size(batch_size)
    return ppl_from_losses(block_losses(model, make_blocks(ids, seq_len, n_blocks), batch_size))


def cat_losses(losses: list[Tensor]) -> Tensor:
    """Concatenated per-block losses on the CPU; empty for a rank that was given no blocks (torchrun)."""
    return torch.cat(losses).cpu() if losses else torch.zeros(0, dtype=torch.float64)



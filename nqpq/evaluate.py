"""Perplexity: the straightforward evaluator and the prefix-reusing one the sweep uses.

Definition (the spec's): over blocks b = 0 .. n_blocks − 1 of ``seq_len`` tokens,
each block is scored with labels = the block (shifted next-token loss, seq_len − 1
predictions); PPL = exp(mean over blocks of each block's mean loss).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .integration import transformer_blocks

# Logits are formed this many elements at a time (fp32: 256 MiB), so the LM head
# never materialises [batch, T, vocab] at once.
MAX_LOGIT_ELEMENTS = 1 << 26


def make_blocks(ids: Tensor, seq_len: int, n_blocks: int) -> Tensor:
    """``[n_blocks, seq_len]`` consecutive blocks of a 1-D token tensor."""
    if ids.dim() != 1:
        raise ValueError(f"ids must be 1-D token ids, got shape {tuple(ids.shape)}")
    if seq_len < 2:
        raise ValueError(f"seq_len must be at least 2 (one prediction per block), got {seq_len}")
    if n_blocks < 1:
        raise ValueError(f"n_blocks must be at least 1, got {n_blocks}")
    available = ids.numel() // seq_len
    if n_blocks > available:
        raise ValueError(
            f"n_blocks={n_blocks} blocks of {seq_len} tokens need {n_blocks * seq_len} tokens; "
            f"the text has {ids.numel()} tokens ({available} blocks)"
        )
    return ids[: n_blocks * seq_len].view(n_blocks, seq_len)


def lm_losses(model: nn.Module, hidden: Tensor, labels: Tensor, max_logits: int = MAX_LOGIT_ELEMENTS) -> Tensor:
    """Per-block mean next-token loss ``[N]`` (float64) from final hidden states ``[N, T, C]``."""
    N, T, C = hidden.shape
    flat_hidden = hidden[:, :-1].reshape(-1, C)
    flat_labels = labels[:, 1:].reshape(-1).to(hidden.device)
    vocab = model.lm_head.out_features
    chunk = max(1, max_logits // vocab)
    nll = torch.empty(flat_labels.numel(), dtype=torch.float32, device=hidden.device)
    for s in range(0, flat_labels.numel(), chunk):
        logits = model.lm_head(flat_hidden[s : s + chunk]).float()
        nll[s : s + chunk] = F.cross_entropy(logits, flat_labels[s : s + chunk], reduction="none")
    return nll.view(N, T - 1).double().mean(dim=1)


@torch.no_grad()
def block_losses(model: nn.Module, blocks: Tensor, batch_size: int = 1) -> Tensor:
    """Per-block mean loss ``[N]`` of the model as it stands (any crystallization applies)."""
    device = next(model.parameters()).device
    out = []
    for s in range(0, blocks.shape[0], batch_size):
        batch = blocks[s : s + batch_size].to(device)
        hidden = model.transformer(input_ids=batch, use_cache=False).last_hidden_state
        out.append(lm_losses(model, hidden, batch))
    return torch.cat(out).cpu()


def perplexity(model: nn.Module, ids: Tensor, seq_len: int, n_blocks: int, batch_size: int = 1) -> float:
    """The spec's perplexity of ``model`` on the first ``n_blocks`` blocks of ``ids``."""
    return ppl_from_losses(block_losses(model, make_blocks(ids, seq_len, n_blocks), batch_size))


class PrefixRunner:
    """Evaluates many configurations that differ only from layer ``start`` up.

    ``capture_baseline`` runs the untouched model once per batch, records the hidden
    states entering block ``start`` together with the exact arguments the model hands
    its blocks (mask, positions, ...), and returns the baseline losses. ``losses`` then
    replays only blocks ``start..`` + final norm + LM head from that record, under
    whatever crystallization is active: the same computation as a full forward pass,
    without the unchanged lower layers.
    """

    def __init__(self, model: nn.Module, blocks: Tensor, batches: Sequence[slice], start: int) -> None:
        self.model = model
        self.blocks = blocks
        self.batches = list(batches)
        self.start = start
        self.device = next(model.parameters()).device
        self._record: list[tuple[Tensor, tuple, dict]] = []

    @torch.no_grad()
    def capture_baseline(self, progress=None, context_for=None) -> Tensor:
        """Baseline losses of every batch; ``context_for(i)`` may wrap batch ``i`` (e.g. to observe residuals)."""
        layer = transformer_blocks(self.model)[self.start]
        seen: list = []

        def grab(module, args, kwargs):
            seen.append((args[0], tuple(args[1:]), dict(kwargs)))

        handle = layer.register_forward_pre_hook(grab, with_kwargs=True)
        losses = []
        try:
            for i, sl in enumerate(self.batches):
                batch = self.blocks[sl].to(self.device)
                with context_for(i) if context_for is not None else contextlib.nullcontext():
                    hidden = self.model.transformer(input_ids=batch, use_cache=False).last_hidden_state
                losses.append(lm_losses(self.model, hidden, batch))
                self._record.append(seen.pop())
                if progress is not None:
                    progress.update(batch.shape[0])
        finally:
            handle.remove()
        return _cat_losses(losses)

    @torch.no_grad()
    def upper_hidden(self, i: int) -> Tensor:
        """Final hidden states (blocks ``start..`` + final norm) of batch ``i``."""
        hidden, rest, kwargs = self._record[i]
        blocks = transformer_blocks(self.model)
        for block in blocks[self.start :]:
            out = block(hidden, *rest, **kwargs)
            hidden = out[0] if isinstance(out, tuple) else out
        return self.model.transformer.ln_f(hidden)

    @torch.no_grad()
    def losses(self, progress=None) -> Tensor:
        out = []
        for i, sl in enumerate(self.batches):
            out.append(lm_losses(self.model, self.upper_hidden(i), self.blocks[sl]))
            if progress is not None:
                progress.update(out[-1].numel())
        return _cat_losses(out)


def _cat_losses(losses: list[Tensor]) -> Tensor:
    """Concatenated per-block losses on the CPU; empty for a rank that was given no blocks (torchrun)."""
    return torch.cat(losses).cpu() if losses else torch.zeros(0, dtype=torch.float64)


def ppl_from_losses(losses: Tensor) -> float:
    """exp(mean over blocks of each block's mean loss)."""
    return math.exp(losses.double().mean().item())

"""LM-head benchmark (issue 14 item 5, issue 17 item 6): what the sweep's exact losses cost.

The sweep's per-block loss (``nqpq.evaluate.lm_losses``) forms the logits in fp32 whatever the model's
dtype, because 16-bit logits round |logit| ~ 64 to steps of 0.25–0.5 before the loss, and takes the
cross-entropy of those fp32 logits in float64 (an fp32 log-sum-exp errs by ~1e-7 per token over a 50k
vocabulary). This script times, on the same hidden states:

- ``head_in_dtype`` (16-bit dtypes): the LM head in the model's dtype, then ``.float()`` and an fp32 loss;
- ``fp32_lse``: lm_losses before issue 17: fp32 logits, fp32 ``F.cross_entropy``;
- ``lm_losses``: nqpq's path (fp32 logits, row max in fp32, exp / sum / log in float64);
- ``out_dtype`` (CUDA only, where torch offers it): a 16-bit GEMM with fp32 output, a candidate for GPUs.

Errors: ``max_abs_loss_err``, per block against everything in float64 (hidden states and head too);
``max_rel_token_err``, per token against the float64 cross-entropy of the very same fp32 logits (the
error of the loss alone, what issue 17 item 6 is about).

    python -m benchmarks.logits --device cpu
    python -m benchmarks.logits --device cpu --dtypes fp32 --vocab 49152 --hidden 576   # SmolLM2's head
    python -m benchmarks.logits --device cuda --vocab 128256 --hidden 4096   # Llama-3-8B's head
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.common import run_tags, write_csv
from nqpq.evaluate import MAX_LOGIT_ELEMENTS, lm_losses

RESULTS = Path(__file__).resolve().parent / "results"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _parts(head: nn.Linear) -> SimpleNamespace:
    """What lm_losses reads from a model's parts: its LM head, no logit scale and no final soft-cap."""
    return SimpleNamespace(lm_head=head, logit_scale=None, final_logit_softcap=None)


def _chunked(hidden: torch.Tensor, labels: torch.Tensor, vocab: int, logits_fn) -> torch.Tensor:
    N, T, C = hidden.shape
    flat, target = hidden[:, :-1].reshape(-1, C), labels[:, 1:].reshape(-1)
    chunk = max(1, MAX_LOGIT_ELEMENTS // vocab)
    nll = torch.cat([F.cross_entropy(logits_fn(flat[s : s + chunk]), target[s : s + chunk], reduction="none")
                     for s in range(0, target.numel(), chunk)])
    return nll.view(N, T - 1).double().mean(dim=1)


def _timed(fn, device: torch.device, repeats: int) -> tuple[torch.Tensor, float]:
    result = fn()  # warm-up (allocator, kernels)
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t = time.perf_counter()
        result = fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - t)
    return result, best


@torch.no_grad()
def bench(device: torch.device, dtype: torch.dtype, vocab: int, hidden_size: int, blocks: int, seq_len: int,
          repeats: int, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    head = nn.Linear(hidden_size, vocab, bias=False)
    nn.init.normal_(head.weight, std=0.02, generator=g)
    head = head.to(device=device, dtype=dtype)
    # Hidden states scaled so that |logits| reaches tens, where 16-bit rounding shows (as in trained models).
    hidden = (torch.randn(blocks, seq_len, hidden_size, generator=g) * 8).to(device=device, dtype=dtype)
    labels = torch.randint(0, vocab, (blocks, seq_len), generator=g).to(device)
    exact = _chunked(hidden.double(), labels, vocab, lambda h: F.linear(h, head.weight.double()))

    def fp32_lse(h, y):  # lm_losses as it was before issue 17: the same fp32 logits, an fp32 cross-entropy
        return _chunked(h, y, vocab, lambda x: F.linear(x.float(), head.weight.float()))

    paths = {}
    if dtype != torch.float32:  # in fp32 the model's-dtype head is the fp32 one
        paths["head_in_dtype"] = lambda: _chunked(hidden, labels, vocab, lambda h: head(h).float())
    paths["fp32_lse"] = lambda: fp32_lse(hidden, labels)
    paths["lm_losses"] = lambda: lm_losses(head, hidden, labels, parts=_parts(head))
    if device.type == "cuda":
        paths["out_dtype"] = lambda: _chunked(
            hidden, labels, vocab, lambda h: torch.mm(h, head.weight.T, out_dtype=torch.float32))

    # Per-token losses of the fp32 logits' two treatments, against float64 of those very logits: each token as
    # a block of two positions ([its hidden state, anything] → its label), so lm_losses' own code gives them.
    C = hidden.shape[-1]
    tok_hidden = torch.stack([hidden[:, :-1].reshape(-1, C), hidden[:, 1:].reshape(-1, C)], dim=1)
    tok_labels = torch.stack([labels[:, :-1].reshape(-1), labels[:, 1:].reshape(-1)], dim=1)
    same_logits = _chunked(tok_hidden, tok_labels, vocab, lambda x: F.linear(x.float(), head.weight.float()).double())
    token_losses = {"fp32_lse": lambda: fp32_lse(tok_hidden, tok_labels),
                    "lm_losses": lambda: lm_losses(head, tok_hidden, tok_labels, parts=_parts(head))}

    rows, base_s = [], None
    for name, fn in paths.items():
        try:
            losses, seconds = _timed(fn, device, repeats)
        except (RuntimeError, NotImplementedError, TypeError) as err:  # out_dtype missing in this torch build
            print(f"  {name}: unavailable ({type(err).__name__})")
            continue
        base_s = seconds if name == "fp32_lse" else base_s
        token_err = None
        if name in token_losses:
            per_token = token_losses[name]().cpu()
            token_err = float(((per_token - same_logits.cpu()).abs() / same_logits.cpu().abs()).max())
        rows.append({**run_tags(device), "dtype": str(dtype).removeprefix("torch."), "vocab": vocab,
                     "hidden": hidden_size, "tokens": blocks * (seq_len - 1), "path": name,
                     "seconds": round(seconds, 5), "max_abs_loss_err": float((losses.cpu() - exact.cpu()).abs().max()),
                     "max_rel_token_err": token_err})
    for row in rows:
        row["vs_fp32_lse"] = round(row["seconds"] / base_s, 3)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    p.add_argument("--vocab", type=int, default=50257, help="LM head rows (default: GPT-2's vocabulary)")
    p.add_argument("--hidden", type=int, default=768, help="hidden size (default: GPT-2 small)")
    p.add_argument("--blocks", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=None, help="CSV path (default: benchmarks/results/logits_<device>.csv)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    rows = []
    for name in args.dtypes:
        for row in bench(device, DTYPES[name], args.vocab, args.hidden, args.blocks, args.seq_len, args.repeats):
            rows.append(row)
            token = "" if row["max_rel_token_err"] is None else f"  per-token rel. error {row['max_rel_token_err']:.1e}"
            print(f"{row['dtype']:>9} {row['path']:>13}: {row['seconds'] * 1e3:9.1f} ms  "
                  f"({row['vs_fp32_lse']:.2f}x fp32_lse)  max |block loss error| {row['max_abs_loss_err']:.1e}{token}")
    out = args.out or str(RESULTS / f"logits_{device.type}.csv")
    write_csv(out, rows)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

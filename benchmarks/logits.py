"""LM-head benchmark (issue 14 item 5): what forming the sweep's logits in fp32 costs.

The sweep's per-block loss (``nqpq.evaluate.lm_losses``) forms the logits in fp32 whatever the model's
dtype, because 16-bit logits round |logit| ~ 64 to steps of 0.25–0.5 before the loss. This script times
that path against the one it replaced (the LM head in the model's dtype, then ``.float()``) on the same
hidden states, and reports each path's largest loss error against float64:

- ``head_in_dtype``: the old path, logits rounded to the model's dtype;
- ``lm_losses``: nqpq's path (weight upcast once per call, hidden states per chunk, fp32 GEMM);
- ``out_dtype`` (CUDA only, where torch offers it): a 16-bit GEMM with fp32 output, a candidate for GPUs.

    python -m benchmarks.logits --device cpu
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
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


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

    paths = {
        "head_in_dtype": lambda: _chunked(hidden, labels, vocab, lambda h: head(h).float()),
        "lm_losses": lambda: lm_losses(head, hidden, labels, parts=_parts(head)),
    }
    if device.type == "cuda":
        paths["out_dtype"] = lambda: _chunked(
            hidden, labels, vocab, lambda h: torch.mm(h, head.weight.T, out_dtype=torch.float32))
    rows, base_s = [], None
    for name, fn in paths.items():
        try:
            losses, seconds = _timed(fn, device, repeats)
        except (RuntimeError, NotImplementedError, TypeError) as err:  # out_dtype missing in this torch build
            print(f"  {name}: unavailable ({type(err).__name__})")
            continue
        base_s = seconds if name == "head_in_dtype" else base_s
        rows.append({**run_tags(device), "dtype": str(dtype).removeprefix("torch."), "vocab": vocab,
                     "hidden": hidden_size, "tokens": blocks * (seq_len - 1), "path": name,
                     "seconds": round(seconds, 5), "vs_head_in_dtype": round(seconds / base_s, 3),
                     "max_abs_loss_err": float((losses.cpu() - exact.cpu()).abs().max())})
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
            print(f"{row['dtype']:>9} {row['path']:>10}: {row['seconds'] * 1e3:9.1f} ms  "
                  f"({row['vs_head_in_dtype']:.2f}x the 16-bit head)  max |loss error| {row['max_abs_loss_err']:.1e}")
    out = args.out or str(RESULTS / f"logits_{device.type}.csv")
    write_csv(out, rows)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""LM-head benchmark (issue 14 item 5, issue 17 item 6, issue 26 item 4): what the sweep's exact losses cost.

The sweep's per-block loss (``nqpq.model.losses.lm_losses``) forms the logits in fp32 whatever the model's
dtype, because 16-bit logits round |logit| ~ 64 to steps of 0.25–0.5 before the loss, and takes the
cross-entropy of those fp32 logits to within 1e-6 relative in PPL of float64 (fp32 ``F.cross_entropy`` is
~1e-5 off at 50k tokens). Two parts, both on by default.

The head (GEMM and loss; random head, ``--vocab`` x ``--hidden``), on the same hidden states:

- ``head_in_dtype`` (16-bit dtypes): the LM head in the model's dtype, then ``.float()`` and an fp32 loss;
- ``fp32_lse``: lm_losses before issue 17: fp32 logits, fp32 ``F.cross_entropy``;
- ``lm_losses``: nqpq's path (fp32 logits, then its loss: see the second part);
- ``out_dtype`` (CUDA only, where torch offers it): a 16-bit GEMM with fp32 output, a candidate for GPUs.

Errors: ``max_abs_loss_err``, per block against everything in float64 (hidden states and head too);
``max_abs_token_err``, per token against the float64 cross-entropy of the very same fp32 logits (the
error of the loss alone; absolute, as a token's loss may be ~0).

The loss alone (``--losses``), on given fp32 logits ``[2040, V]``: ``smollm2``, SmolLM2-135M's real logits
(vocabulary 49152; the converted model from ``nqpq.sources.fetch``) on 8 x 256 tokens of WikiText validation;
``peaked``, synthetic logits over GPT-2's vocabulary (50257): N(0, 2.5²) with one token per row raised by
5–20, the label that token 40% of the time (a random GPT-2 model's logits are flat, not an LM's). Paths:

- ``cross_entropy_fp32``: ``F.cross_entropy`` in fp32 (it writes a log-softmax the size of the logits);
- ``logsumexp_fp32``: ``torch.logsumexp`` in fp32 minus the target logit, in fp32 (rounded at |logit|);
- ``float64_exp_sum``: lm_losses of issue 17: fp32 max, exp / sum / log in float64 on a copy;
- ``lm_losses``: nqpq's (``nqpq.model.losses._fp32_logit_losses``): fp32 max, shift, exp and sum in place,
  combined in float64.

Each against ``F.cross_entropy`` of the float64 logits: max and mean per-token error, and the PPL's
relative error (exp of the mean over all tokens, summed in float64).

    python -m benchmarks.logits --device cpu
    python -m benchmarks.logits --device cpu --dtypes fp32 --vocab 49152 --hidden 576   # SmolLM2's head
    python -m benchmarks.logits --device cuda --vocab 128256 --hidden 4096   # Llama-3-8B's head
    python -m benchmarks.logits --dtypes --losses peaked   # the loss alone, synthetic logits only
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.common import run_tags, write_csv
from nqpq.model.losses import MAX_LOGIT_ELEMENTS, _fp32_logit_losses, lm_losses

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
            token_err = float((token_losses[name]().cpu() - same_logits.cpu()).abs().max())
        rows.append({**run_tags(device), "dtype": str(dtype).removeprefix("torch."), "vocab": vocab,
                     "hidden": hidden_size, "tokens": blocks * (seq_len - 1), "path": name,
                     "seconds": round(seconds, 5), "max_abs_loss_err": float((losses.cpu() - exact.cpu()).abs().max()),
                     "max_abs_token_err": token_err})
    for row in rows:
        row["vs_fp32_lse"] = round(row["seconds"] / base_s, 3)
    return rows


def smollm2_logits(n_blocks: int = 8, seq_len: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """SmolLM2-135M's fp32 logits ``[n_blocks·(seq_len − 1), 49152]`` and labels on WikiText validation's first
    tokens (the converted model from ``nqpq.sources.fetch``; as the sweep's blocks: no BOS)."""
    from benchmarks.real_sweep import DEFAULT_TEXT, default_model
    from nqpq.model.losses import make_blocks
    from nqpq.model.parts import model_parts
    from nqpq.sources.checkpoints import load_model, load_tokenizer
    from nqpq.sources.text import ids_for_blocks, rows_from_file

    name = default_model()
    model = load_model(name, "cpu", torch.float32)
    ids = ids_for_blocks(rows_from_file(str(DEFAULT_TEXT)), load_tokenizer(name), n_blocks * seq_len)
    blocks = make_blocks(ids, seq_len, n_blocks)
    parts = model_parts(model)
    hidden = parts.body(input_ids=blocks, use_cache=False, return_dict=True).last_hidden_state
    logits = F.linear(hidden[:, :-1].reshape(-1, hidden.shape[-1]), parts.lm_head.weight.float())
    return logits, blocks[:, 1:].reshape(-1)


def peaked_logits(n: int = 2040, vocab: int = 50257, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Synthetic LM-like fp32 logits ``[n, vocab]``: N(0, 2.5²), one token per row raised by 5–20, and labels that
    are that token 40% of the time (else uniform)."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, vocab, generator=g) * 2.5
    peak = torch.randint(0, vocab, (n,), generator=g)
    logits[torch.arange(n), peak] += 5 + 15 * torch.rand(n, generator=g)
    keep = torch.rand(n, generator=g) < 0.4
    return logits, torch.where(keep, peak, torch.randint(0, vocab, (n,), generator=g))


def _float64_exp_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """lm_losses' loss of issue 17: fp32 row max, then exp / sum / log in float64 on copies of half a chunk's bytes."""
    rows64 = max(1, MAX_LOGIT_ELEMENTS // (2 * logits.shape[1]))
    row_max = logits.amax(dim=1, keepdim=True)
    sum_exp = torch.empty(logits.shape[0], dtype=torch.float64)
    for r in range(0, logits.shape[0], rows64):
        shifted = logits[r : r + rows64].double()
        sum_exp[r : r + rows64] = shifted.sub_(row_max[r : r + rows64]).exp_().sum(dim=1)
    return row_max[:, 0].double() + sum_exp.log() - logits.gather(1, targets[:, None])[:, 0].double()


LOSSES = {
    "cross_entropy_fp32": lambda z, y: F.cross_entropy(z, y, reduction="none").double(),
    "logsumexp_fp32": lambda z, y: (torch.logsumexp(z, dim=1) - z.gather(1, y[:, None])[:, 0]).double(),
    "float64_exp_sum": _float64_exp_sum,
    "lm_losses": _fp32_logit_losses,  # overwrites its logits: timed on a fresh copy
}


@torch.no_grad()
def bench_losses(name: str, logits: torch.Tensor, labels: torch.Tensor, repeats: int) -> list[dict]:
    """Each loss path on the same fp32 logits (the loss alone, chunked as lm_losses chunks), best of ``repeats``."""
    exact = F.cross_entropy(logits.double(), labels, reduction="none")
    chunk = max(1, MAX_LOGIT_ELEMENTS // logits.shape[1])
    rows = []
    for path, fn in LOSSES.items():
        best = float("inf")
        for _ in range(repeats + 1):  # the first call warms up
            seconds, parts = 0.0, []
            for s in range(0, logits.shape[0], chunk):
                z = logits[s : s + chunk].clone()  # lm_losses owns a fresh GEMM output; the copy is not timed
                t = time.perf_counter()
                parts.append(fn(z, labels[s : s + chunk]))
                seconds += time.perf_counter() - t
            best = min(best, seconds)
        err = torch.cat(parts) - exact
        ppl_rel = abs(math.expm1(float(err.mean())))  # PPL = exp(mean loss): relative error = expm1(mean error)
        rows.append({**run_tags(logits.device), "dtype": "float32", "vocab": logits.shape[1], "tokens": labels.numel(),
                     "logits": name, "path": path, "seconds": round(best, 5),
                     "max_abs_token_err": float(err.abs().max()), "mean_token_err": float(err.mean()),
                     "ppl_rel_err": ppl_rel})
    for row in rows:
        row["vs_cross_entropy_fp32"] = round(row["seconds"] / rows[0]["seconds"], 3)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtypes", nargs="*", default=list(DTYPES), choices=list(DTYPES),
                   help="head dtypes of the first part (none: skip it)")
    p.add_argument("--losses", nargs="*", default=["smollm2", "peaked"], choices=["smollm2", "peaked"],
                   help="logits of the second part, the loss alone (CPU; none: skip it)")
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
            token = "" if row["max_abs_token_err"] is None else f"  per-token error {row['max_abs_token_err']:.1e}"
            print(f"{row['dtype']:>9} {row['path']:>13}: {row['seconds'] * 1e3:9.1f} ms  "
                  f"({row['vs_fp32_lse']:.2f}x fp32_lse)  max |block loss error| {row['max_abs_loss_err']:.1e}{token}")
    for name in args.losses:
        logits, labels = smollm2_logits() if name == "smollm2" else peaked_logits()
        print(f"the loss alone, {name} logits {tuple(logits.shape)}:")
        for row in bench_losses(name, logits, labels, args.repeats):
            rows.append(row)
            print(f"  {row['path']:>18}: {row['seconds'] * 1e3:8.1f} ms ({row['vs_cross_entropy_fp32']:.2f}x "
                  f"cross_entropy_fp32)  per token max {row['max_abs_token_err']:.1e} mean {row['mean_token_err']:+.1e}"
                  f"  PPL {row['ppl_rel_err']:.1e} relative")
        del logits
    out = args.out or str(RESULTS / f"logits_{device.type}.csv")
    write_csv(out, rows)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

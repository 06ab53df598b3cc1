"""Scan benchmark: ``nqpq scan`` against the naive loop, in the same run, on GPT-2 small geometry.

The naive loop is what one writes without the scan: for every layer L, calibrate L's residual
basis (a forward over the calibration blocks), then one full forward over every block per
configuration (top-1, and low-rank at each d_r), plus one baseline forward. The scan does one
baseline pass (hidden states entering every layer, every Gram and the crystallinity statistics
on the way) and replays each layer's configurations from L upward. Both get the same model
(RANDOM weights: timing only), tokens and device; their perplexities must agree.

    python -m benchmarks.scan --device cpu            # ~2 min on 2 busy cores
    python -m benchmarks.scan --device cuda --n-blocks 64 --seq-len 256
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch

from benchmarks.common import run_tags, write_csv
from nqpq import SweepConfig, calibrate, crystallize, make_blocks
from nqpq.experiments.scan import run_scan
from nqpq.model.losses import block_losses
from nqpq.results.stats import ppl_from_losses
from nqpq.sources.checkpoints import demo_model

RESULTS = Path(__file__).resolve().parent / "results"


def naive_scan(model, blocks: torch.Tensor, layers, d_rs, calib_blocks: int, batch_size: int, backend: str) -> dict:
    """Full forward per configuration: {"ppl_baseline", "layers": [{"layer", "ppl_top1", "ppl": [per d_r]}]}."""
    ppl_fp = ppl_from_losses(block_losses(model, blocks, batch_size))
    out = []
    for layer in layers:
        basis = calibrate(model, blocks[:calib_blocks], [layer], batch_size=batch_size, backend=backend)
        with crystallize(model, [layer], mode="top1", backend=backend):
            top1 = ppl_from_losses(block_losses(model, blocks, batch_size))
        ppls = []
        for d_r in d_rs:
            with crystallize(model, [layer], mode="lowrank", basis=basis.basis, d_r=d_r, backend=backend):
                ppls.append(ppl_from_losses(block_losses(model, blocks, batch_size)))
        out.append({"layer": layer, "ppl_top1": top1, "ppl": ppls})
    return {"ppl_baseline": ppl_fp, "layers": out}


def timed(device: str, fn):
    """(result, wall seconds, this process's CPU seconds)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t, cpu = time.perf_counter(), time.process_time()
    result = fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return result, time.perf_counter() - t, time.process_time() - cpu


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--backend", default="auto", choices=["auto", "torch", "triton"])
    p.add_argument("--n-blocks", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--calib-blocks", type=int, default=1)
    p.add_argument("--layers", type=int, nargs="+", default=list(range(12)))
    p.add_argument("--d-r", type=int, nargs="+", default=[8])
    p.add_argument("--batch-size", type=int, default=None, help="blocks per batch, both sides (default: all)")
    p.add_argument("--repeats", type=int, default=2,
                   help="alternating timed runs of each; the fastest counts (a shared machine's noise only adds)")
    p.add_argument("--out", default=None, help="CSV path (default: benchmarks/results/scan_<device>.csv)")
    args = p.parse_args(argv)

    dtype = getattr(torch, args.dtype)
    model = demo_model(50257, 42, args.device, dtype)
    # Random token ids: the timing does not depend on the text, and the weights are random anyway.
    ids = torch.randint(0, 50257, (args.n_blocks * args.seq_len,), generator=torch.Generator().manual_seed(0))
    source = "random token ids"
    blocks = make_blocks(ids, args.seq_len, args.n_blocks)
    batch_size = args.batch_size or args.n_blocks
    layers, d_rs = sorted(args.layers), sorted(set(args.d_r))
    print(f"[scan bench] GPT-2 small geometry, RANDOM weights (timing only); {source}; "
          f"{args.n_blocks}x{args.seq_len} tokens; layers {layers}; d_r {d_rs}; {args.device} {args.dtype}")

    cfg = SweepConfig(model="gpt2-small-geometry (random)", layers=tuple(layers), d_r=tuple(d_rs),
                      n_blocks=args.n_blocks, seq_len=args.seq_len, calib_blocks=args.calib_blocks,
                      calib_from="eval",  # the spec's calibration: the comparison is with its numbers
                      device=args.device, dtype=args.dtype, backend=args.backend, batch_size=batch_size,
                      progress=False)
    # Warm-up (kernel compilation, allocator growth) on one block and one layer, outside the timing.
    warm = SweepConfig(**{**cfg.__dict__, "n_blocks": 1, "calib_blocks": 1, "layers": tuple(layers[-1:])})
    run_scan(warm, model=model, ids=ids, log=lambda *_: None)

    scan_runs, naive_runs = [], []
    for _ in range(args.repeats):
        ours, *scan_t = timed(args.device, lambda: run_scan(cfg, model=model, ids=ids, log=lambda *_: None))
        naive, *naive_t = timed(args.device, lambda: naive_scan(model, blocks, layers, d_rs, args.calib_blocks,
                                                                batch_size, args.backend))
        scan_runs.append(scan_t)
        naive_runs.append(naive_t)
    (scan_s, scan_cpu), (naive_s, naive_cpu) = min(scan_runs), min(naive_runs)
    ratio = naive_s / scan_s
    print(f"  nqpq scan  : {scan_s:8.2f} s wall, {scan_cpu:8.2f} s CPU  (fastest of {args.repeats})")
    print(f"  naive loop : {naive_s:8.2f} s wall, {naive_cpu:8.2f} s CPU")
    print(f"  speed-up   : {ratio:8.2f} x wall, {naive_cpu / scan_cpu:.2f} x CPU")

    pairs = [(ours["ppl_baseline"], naive["ppl_baseline"])]
    for o, n in zip(ours["layers"], naive["layers"], strict=True):
        pairs.append((o["ppl_top1"], n["ppl_top1"]))
        pairs += [(c["ppl"], q) for c, q in zip(o["curve"], n["ppl"], strict=True)]
    max_rel = max(abs(a - b) / abs(b) for a, b in pairs)
    print(f"  max relative PPL difference scan vs naive: {max_rel:.2e}")
    if not math.isfinite(max_rel) or max_rel > 1e-4:
        print("  WARNING: the two disagree beyond rounding")

    n_layers, k = model.config.n_layer, len(d_rs)
    row = {**run_tags(args.device), "dtype": args.dtype, "backend": args.backend, "n_blocks": args.n_blocks,
           "seq_len": args.seq_len, "calib_blocks": args.calib_blocks, "layers": " ".join(map(str, layers)),
           "d_r": " ".join(map(str, d_rs)), "batch_size": batch_size, "n_model_layers": n_layers,
           "configs_per_layer": k + 1, "repeats": args.repeats, "scan_s": round(scan_s, 3),
           "naive_s": round(naive_s, 3), "speedup": round(ratio, 2), "scan_cpu_s": round(scan_cpu, 3),
           "naive_cpu_s": round(naive_cpu, 3), "speedup_cpu": round(naive_cpu / scan_cpu, 2),
           "max_rel_ppl_diff": f"{max_rel:.2e}", "data": source, "weights": "random"}
    out = args.out or str(RESULTS / f"scan_{args.device.split(':')[0]}_{args.dtype}.csv")
    write_csv(out, [row])
    print(f"  wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

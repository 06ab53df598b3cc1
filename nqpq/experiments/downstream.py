"""``nqpq eval``: downstream tasks through lm-evaluation-harness, the unmodified model and each crystallized
configuration side by side, compared item by item.

The run: lm-eval's ``simple_evaluate`` over ``HFLM(pretrained=model, tokenizer=tokenizer, batch_size=1)`` for the
unmodified model, then once per configuration (a mode, and for ``lowrank`` a rank d_r) inside ``nqpq.crystallize``
(every head of ``--layers``, or the heads ``--heads`` chooses, as the sweep chooses them), on the same task objects
(each task's documents are read once). Loglikelihood tasks (``multiple_choice``, ``loglikelihood``,
``loglikelihood_rolling``) and ``generate_until`` tasks (``model.generate`` with the model's KV cache, the
crystallized layers answering each step).

The pieces: ``lm_eval_tasks`` (lm-eval, its tasks and per-item numbers), ``side_by_side`` (configurations, model,
basis and heads, shared with ``nqpq generate``), ``nqpq.results.paired`` (the paired differences, intervals and
verdicts) and ``nqpq.results.eval_report`` (the report, the plot, results.json).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch

from ..errors import NqpqError
from ..results.eval_report import print_eval_report
from ..results.paired import BASELINE, TaskScores, compare_task
from ..results.stats import BOOTSTRAP_RESAMPLES, CI_LEVEL
from .lm_eval_tasks import load_tasks, make_lm, quiet_lm_eval, require_lm_eval, task_info, task_manager, task_scores
from .side_by_side import (
    SideBySideSettings,
    calibrates,
    check_model_before_loading,
    check_modes,
    configurations,
    crystal_choice,
    load_named_model,
    model_check_config,
    resolve_device,
    sweep_config,
)

EVAL_FORMAT_VERSION = 1


@dataclass
class EvalConfig(SideBySideSettings):
    """Every setting of an ``nqpq eval`` run (the CLI flags, one for one): the shared ones and the tasks."""

    tasks: Sequence[str] = ()
    include_path: str | None = None  # a folder of lm-eval task YAMLs (local tasks)
    limit: int | None = None  # the first N documents of each task (None: all)


def check_eval_flags(cfg: EvalConfig) -> None:
    """Every check that needs neither the model nor lm-eval's task index (bad flags fail in seconds)."""
    from .config import check_flags

    tasks = list(cfg.tasks)
    if not tasks or any(not t.strip() for t in tasks):
        raise NqpqError("--tasks: name at least one task, comma-separated (e.g. --tasks hellaswag,arc_easy)")
    if len(set(tasks)) != len(tasks):
        raise NqpqError(f"--tasks repeats a task: {','.join(tasks)}")
    if cfg.limit is not None and cfg.limit < 1:
        raise NqpqError(f"--limit {cfg.limit}: must be at least 1 (documents per task)")
    if cfg.include_path is not None and not os.path.isdir(cfg.include_path):
        raise NqpqError(f"--include-path {cfg.include_path!r}: no such directory (a folder of lm-eval task YAMLs)")
    check_modes(cfg.modes, cfg.d_r, cfg.basis)
    if os.environ.get("WORLD_SIZE", "1") != "1":
        raise NqpqError("nqpq eval runs in one process (lm-eval scores a model passed to it on one rank); do not "
                        "launch it with torchrun")
    # The model, calibration, device and --heads flags (its syntax, its layers among --layers), as the sweep checks
    # them.
    check_flags(sweep_config(cfg))


def run_eval(
    cfg: EvalConfig,
    *,
    model: torch.nn.Module | None = None,
    tokenizer=None,
    log: Callable[[str], None] | None = None,
) -> dict:
    """Run the tasks of ``cfg`` on the model and on each configuration; print the report; return the results dict.

    Pass ``model`` (a decoder-only causal LM, on the device you want) and ``tokenizer`` to skip loading;
    ``cfg.model`` then only labels the run. Raises ``NqpqError`` for bad settings, unknown tasks or a missing
    lm-eval. Writing files is the caller's job (``nqpq.results.eval_report.write_eval_results``).
    """
    from ..model.crystallize import crystallize
    from ..model.devices import input_device
    from ..model.parts import model_parts
    from .config import check_model_fit

    say = log or print
    if (model is None) != (tokenizer is None):
        raise NqpqError("run_eval: pass model and tokenizer together (or neither, to load cfg.model)")
    lm_eval = require_lm_eval()
    check_eval_flags(cfg)
    if model is None:
        check_model_before_loading(cfg)  # as the sweep: the model's config answers, before tasks or weights load
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    quiet_lm_eval()
    manager = task_manager(cfg.tasks, cfg.include_path)
    loaded = load_tasks(manager, cfg.tasks)
    infos = {name: task_info(task) for name, task in loaded["tasks"].items()}
    timings["tasks_s"] = time.perf_counter() - t0

    scfg = sweep_config(cfg)
    device = resolve_device(cfg.device) if model is None else input_device(model)  # a model passed in stays put
    torch.manual_seed(cfg.seed)
    t = time.perf_counter()
    checkpoint, model_name, tok_name = None, cfg.model, "given by the caller"
    if model is None:
        say(f"[eval] Loading {cfg.model}...")
        named = load_named_model(cfg.model, cfg.tokenizer, cfg.dtype, device, say)
        model, tokenizer, model_name, checkpoint, tok_name = (named.model, named.tokenizer, named.name,
                                                              named.checkpoint, named.tokenizer_name)
    model.eval()
    parts = model_parts(model)
    layers = tuple(parts.default_layers if cfg.layers is None else cfg.layers)
    d_rs = sorted(set(cfg.d_r or ()))
    calibrating = calibrates(cfg)
    # The sweep's checks of --layers, --d-r and --heads; --seq-len only matters when calibration blocks are cut.
    check_model_fit(model_check_config(cfg), parts, layers, d_rs)
    timings["load_s"] = time.perf_counter() - t

    t = time.perf_counter()
    choice = crystal_choice(scfg, model, parts, layers, tokenizer, tok_name, device, cfg.modes, cfg.basis, say)
    crystal, heads, basis, basis_record = choice.crystal, choice.heads, choice.basis, choice.basis_record
    if basis is not None:
        # Attach and detach once at the largest rank: a basis of another model's shape, or narrower than a --d-r,
        # is refused now, before any task runs.
        with crystallize(model, crystal, mode="lowrank", basis=basis.basis, d_r=max(d_rs), backend=cfg.backend,
                         parts=parts):
            pass
    if calibrating or heads is not None:
        timings["calibration_s"] = time.perf_counter() - t

    lm = make_lm(model, tokenizer, cfg.progress)
    configs = configurations(cfg.modes, d_rs)

    def evaluate(label: str) -> dict[str, TaskScores]:
        t = time.perf_counter()
        say(f"[eval] {label}: {', '.join(infos)}")
        results = lm_eval.simple_evaluate(
            model=lm, tasks=list(loaded["tasks"].values()), task_manager=manager, limit=cfg.limit,
            log_samples=True, bootstrap_iters=0, random_seed=cfg.seed, numpy_random_seed=cfg.seed,
            torch_random_seed=cfg.seed, fewshot_random_seed=cfg.seed)
        timings[f"{label}_s"] = time.perf_counter() - t
        return {name: task_scores(results, info) for name, info in infos.items()}

    base = evaluate(BASELINE)
    runs: dict[str, dict[str, TaskScores]] = {}
    for c in configs:
        with crystallize(model, crystal, mode=c.mode, basis=None if basis is None else basis.basis, d_r=c.d_r,
                         backend=cfg.backend, parts=parts):
            runs[c.name] = evaluate(c.name)
    tasks = {name: compare_task(info, base[name], {c: runs[c][name] for c in runs}, cfg.seed)
             for name, info in infos.items()}
    timings["total_s"] = time.perf_counter() - t0

    results = {
        "kind": "eval", "format_version": EVAL_FORMAT_VERSION,
        "config": _results_config(cfg, model, parts, layers, d_rs, configs, device, model_name, tok_name,
                                  checkpoint, basis_record),
        "heads": None if heads is None else heads.results(),
        "bootstrap": {"method": "paired percentile bootstrap over the documents of each task (the metric's "
                                "aggregate recomputed on each resample, model and configuration on the same "
                                "documents)", "resamples": BOOTSTRAP_RESAMPLES, "level": CI_LEVEL, "seed": cfg.seed},
        "tasks": tasks, "timings": timings,
    }
    print_eval_report(results, say)
    return results


def _results_config(cfg: EvalConfig, model, parts, layers, d_rs, configs, device, model_name, tok_name, checkpoint,
                    basis_record) -> dict:
    import lm_eval

    from ..results.provenance import geometry_config, versions

    config = {k: v for k, v in asdict(cfg).items() if k not in ("progress", "out")}
    config.update(model=model_name, tasks=list(cfg.tasks), layers=list(layers), modes=list(cfg.modes),
                  d_r=list(d_rs), configurations=[c.name for c in configs], tokenizer=tok_name,
                  device=str(device), dtype=str(next(model.parameters()).dtype).removeprefix("torch."),
                  batch_size=1, basis=basis_record, checkpoint=checkpoint,
                  heads=cfg.heads if cfg.heads is None or isinstance(cfg.heads, str) else {
                      str(li): list(h) for li, h in cfg.heads.items()},
                  include_path=None if cfg.include_path is None else os.path.basename(os.path.normpath(
                      cfg.include_path)),
                  **geometry_config(parts, layers), **versions(device), lm_eval=lm_eval.__version__)
    return config

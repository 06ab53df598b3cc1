"""``nqpq eval``: downstream tasks through lm-evaluation-harness, the unmodified model and each crystallized
configuration side by side, compared item by item.

The run: lm-eval's ``simple_evaluate`` over ``HFLM(pretrained=model, tokenizer=tokenizer, batch_size=1)`` for the
unmodified model, then once per configuration (a mode, and for ``lowrank`` a rank d_r) inside ``nqpq.crystallize``,
on the same task objects (each task's documents are read once). Loglikelihood tasks only (``multiple_choice``,
``loglikelihood``, ``loglikelihood_rolling``); ``generate_until`` tasks need generation under crystallized
attention (a KV cache), which is another issue.

Batch size 1: each item's numbers then depend on that item alone, never on the items lm-eval happens to batch with
it, so the model's and a configuration's numbers pair item by item. (lm-eval right-pads batches and, for a causal
LM, passes no attention mask; crystallized attention refuses padding masks today, and padded batches are another
issue.)

Statistics: every configuration scores the same documents (paired by lm-eval's doc id; their prompt hashes must
agree). For each task metric, the difference configuration − model comes with a 95 % percentile bootstrap interval
over the documents: one resample draws n document indices with replacement (``results.stats.resample_indices``, seeded
by ``--seed``), the metric's own aggregate is recomputed for the model and for the configuration on the same
indices, and the interval is the 2.5th and 97.5th percentiles of the differences
(``results.stats.percentile_interval``). For a metric that is a mean over items (accuracy) the aggregate is the
resample's mean; for a corpus-level metric it is recomputed from the resampled items' sums, as lm-eval computes it
over the whole set: ``perplexity`` exp(−mean loglikelihood); ``word_perplexity`` / ``byte_perplexity`` exp(−Σ
loglikelihood / Σ words (bytes)); ``bits_per_byte`` −Σ loglikelihood / Σ bytes / ln 2. Any other aggregation is
called, as lm-eval defines it, on each resample's items. The verdict: the interval excludes 0 → "better" or "worse"
(by the metric's direction), else "no measurable change".
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from types import ModuleType
from typing import TYPE_CHECKING

import numpy as np
import torch

from nqpq_kernels.contract import MODES

from ..errors import NqpqError, one_line
from ..results.stats import BOOTSTRAP_RESAMPLES, CI_LEVEL, percentile_interval, resample_indices

if TYPE_CHECKING:  # lm-eval is optional: imported where it is used
    from lm_eval.api.task import Task
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

LM_EVAL_MISSING = "nqpq eval needs lm-evaluation-harness: pip install -e '.[eval]'"
EVAL_FORMAT_VERSION = 1
# The output types whose requests are loglikelihoods: what nqpq eval runs today.
LOGLIKELIHOOD_TYPES = ("multiple_choice", "loglikelihood", "loglikelihood_rolling")
# lm-eval's aggregations (lm_eval.api.metrics) that nqpq recomputes vectorized on every resample.
_VECTOR_AGGREGATIONS = ("mean", "perplexity", "weighted_perplexity", "bits_per_byte")
BASELINE = "model"  # the name of the unmodified model's column
NO_CHANGE, BETTER, WORSE, CHANGED, NO_INTERVAL = ("no measurable change", "better", "worse", "changed",
                                                   "no interval")
PLOT_NAME = "eval_deltas.png"
# A difference interval within ±ROUNDING_REL × |the model's value| is rounding, not a change (see ``judge``): float32
# loglikelihoods of the same computation through another kernel differ by ~1e-7 relative (≤ 6e-6 on SmolLM2's
# shortest choices), far below any difference a task can resolve.
ROUNDING_REL = 1e-5


@dataclass
class EvalConfig:
    """Every setting of an ``nqpq eval`` run (the CLI flags, one for one)."""

    model: str = "gpt2"
    tasks: Sequence[str] = ()
    include_path: str | None = None  # a folder of lm-eval task YAMLs (local tasks)
    limit: int | None = None  # the first N documents of each task (None: all)
    layers: Sequence[int] | None = None  # None: the model's default layers (the sweep's)
    modes: Sequence[str] = ("top1",)
    d_r: Sequence[int] | None = None  # ranks of the lowrank configurations (needed with lowrank, only with it)
    basis: str | None = None  # a ResidualBasis.save file; None: fitted on the sweep's calibration blocks
    tokenizer: str | None = None
    # The basis's calibration blocks, spelled as the sweep spells them: by default the --calib-blocks blocks of
    # --seq-len tokens after the sweep's --n-blocks scored blocks of its text (the basis `nqpq sweep` fits with the
    # same flags); with --calib-text-file / --calib-text, the first blocks of that text.
    text_file: str | None = None
    text: str | None = None
    n_blocks: int = 30
    seq_len: int = 256
    calib_blocks: int = 4
    calib_text_file: str | None = None
    calib_text: str | None = None
    bos: bool | None = None
    device: str | None = None
    dtype: str = "float32"
    backend: str = "auto"
    seed: int = 42
    out: str | None = None
    progress: bool = True


@dataclass(frozen=True)
class Configuration:
    """One crystallized configuration: a mode, and the rank d_r of a lowrank one."""

    mode: str
    d_r: int | None = None

    @property
    def name(self) -> str:
        return self.mode if self.d_r is None else f"{self.mode} d_r={self.d_r}"


@dataclass
class TaskScores:
    """One task's outcome under one configuration: lm-eval's aggregate per metric and each document's items."""

    metrics: dict[str, float]  # lm-eval's aggregate per metric key ("acc", "acc,<filter>" for another filter)
    doc_ids: list[int]
    prompt_hashes: list[str]
    items: dict[str, list]  # per metric key: each document's per-item value (a number, or (loglikelihood, weight))
    loglikelihoods: list[list[float]]  # per document: the loglikelihood of each request (each choice)


@dataclass
class TaskInfo:
    """What the comparison needs to know about a task: its type and its metrics' aggregations and directions."""

    name: str
    output_type: str
    aggregations: dict[str, Callable] = field(default_factory=dict)  # metric name -> lm-eval aggregation function
    higher_is_better: dict[str, bool | None] = field(default_factory=dict)


def require_lm_eval() -> ModuleType:
    """The ``lm_eval`` module, or an ``NqpqError`` naming the extra to install."""
    try:
        import lm_eval
        import lm_eval.models.huggingface  # noqa: F401 - HFLM, imported here so a broken install fails here
    except ImportError as err:
        raise NqpqError(LM_EVAL_MISSING) from err
    return lm_eval


def configurations(modes: Sequence[str], d_rs: Sequence[int] | None) -> list[Configuration]:
    """The configurations to run, in the order the modes are given; lowrank once per rank, ranks ascending."""
    out = []
    for mode in modes:
        if mode == "lowrank":
            out += [Configuration("lowrank", d) for d in sorted(set(d_rs or ()))]
        else:
            out.append(Configuration(mode))
    return out


def check_modes(modes: Sequence[str], d_r: Sequence[int] | None, basis: str | None) -> None:
    """The checks of ``--mode``, ``--d-r`` and ``--basis`` (nqpq eval's and nqpq generate's)."""
    if not modes:
        raise NqpqError("--mode: give at least one of " + ", ".join(MODES))
    bad = [m for m in modes if m not in MODES]
    if bad:
        raise NqpqError(f"--mode {' '.join(bad)}: each must be one of {', '.join(MODES)}")
    if len(set(modes)) != len(modes):
        raise NqpqError(f"--mode repeats a mode: {' '.join(modes)}")
    if "lowrank" in modes and not d_r:
        raise NqpqError("--mode lowrank needs --d-r (the residual ranks to run, e.g. --d-r 8 32)")
    if "lowrank" not in modes and d_r:
        raise NqpqError("--d-r: ranks are for --mode lowrank, which is not among the modes")
    if basis is not None:
        if "lowrank" not in modes:
            raise NqpqError("--basis: a residual basis is for --mode lowrank, which is not among the modes")
        if not os.path.isfile(basis):
            raise NqpqError(f"--basis {basis!r}: no such file (a basis.pt written by nqpq sweep --out, or "
                            "ResidualBasis.save)")


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
    check_flags(sweep_config(cfg))  # the model, calibration and device flags, as the sweep checks them


def sweep_config(cfg: EvalConfig):
    """The ``SweepConfig`` of the run's model and calibration flags: the sweep's own checks, calibration blocks and
    results' calibration record come from it."""
    from .config import SweepConfig

    return SweepConfig(
        model=cfg.model, text_file=cfg.text_file, text=cfg.text, tokenizer=cfg.tokenizer,
        layers=None if cfg.layers is None else tuple(cfg.layers),
        d_r=None if not cfg.d_r else tuple(sorted(set(cfg.d_r))), n_blocks=cfg.n_blocks, seq_len=cfg.seq_len,
        calib_blocks=cfg.calib_blocks, calib_from="heldout", calib_text_file=cfg.calib_text_file,
        calib_text=cfg.calib_text, calib_draws=1, device=cfg.device, dtype=cfg.dtype, backend=cfg.backend,
        seed=cfg.seed, out=None, progress=cfg.progress, bos=cfg.bos,
    )


# --------------------------------------------------------------------------------------------------------------- #
# Tasks
# --------------------------------------------------------------------------------------------------------------- #
def task_manager(names: Sequence[str], include_path: str | None) -> TaskManager:
    """lm-eval's ``TaskManager`` that knows ``names``, or an ``NqpqError`` naming the unknown ones.

    Indexing lm-eval's own task folder takes tens of seconds; when every name is a plain task of ``include_path``
    (no group or tag, which may name built-in tasks), the local folder alone is indexed."""
    from lm_eval.tasks import TaskManager

    if include_path is not None:
        local = TaskManager(include_path=include_path, include_defaults=False)
        if all(name in local.all_subtasks for name in names):
            return local
    manager = TaskManager(include_path=include_path)
    unknown = [name for name in names if name not in manager.all_tasks]
    if unknown:
        where = f"lm-eval's {len(manager.all_tasks)} tasks" + (
            f" and those in --include-path {include_path!r}" if include_path else
            " (a local task needs --include-path DIR, the folder of its YAML)")
        raise NqpqError(f"--tasks: unknown task{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}: not among "
                        f"{where}")
    return manager


def load_tasks(manager: TaskManager, names: Sequence[str]) -> dict:
    """The tasks ``names`` name (groups and tags expanded into their tasks), each loaded once with its documents;
    an ``NqpqError`` for a task that cannot be loaded or is not a loglikelihood task."""
    import datasets

    from ..sources.hub import hub_reachable

    # Use cached datasets if there are any, without minutes of retries (nqpq.sources.text does too).
    if not hub_reachable():
        datasets.config.HF_HUB_OFFLINE = True
    try:
        loaded = manager.load(list(names))
    except Exception as err:  # datasets and lm-eval raise many types for a missing or unreadable dataset
        hint = ("" if hub_reachable() else
                " (the Hugging Face hub is unreachable and nothing is cached: a hub task needs it to download its "
                "dataset once; a local task needs --include-path)")
        raise NqpqError(f"--tasks {','.join(names)}: lm-eval could not load the task: {type(err).__name__}: "
                        f"{one_line(err)}{hint}") from err
    for name, task in loaded["tasks"].items():
        kind = task.get_config("output_type")
        if kind not in LOGLIKELIHOOD_TYPES:
            raise NqpqError(f"--tasks: {name} is a {kind} task; nqpq eval runs loglikelihood tasks "
                            f"({', '.join(LOGLIKELIHOOD_TYPES)}): generation under crystallized attention needs a "
                            "KV cache, which is another issue")
    return loaded


def task_info(task: Task) -> TaskInfo:
    """A loaded task's name, output type, and its metrics' aggregation functions and directions."""
    return TaskInfo(task.task_name, task.get_config("output_type"), dict(task.aggregation()),
                    dict(task.higher_is_better()))


def _metric_key(metric: str, filter_name: str) -> str:
    return metric if filter_name == "none" else f"{metric},{filter_name}"


def _split_key(key: str) -> tuple[str, str]:
    metric, _, filter_name = key.partition(",")
    return metric, filter_name or "none"


def _loglikelihoods(filtered_resps: list) -> list[float]:
    """Each request's loglikelihood: (ll, is_greedy) pairs for (multiple-choice) loglikelihood, ll for rolling."""
    return [float(r[0]) if isinstance(r, (tuple, list)) else float(r) for r in filtered_resps]


def task_scores(results: dict, info: TaskInfo) -> TaskScores:
    """One task's ``TaskScores`` from ``simple_evaluate``'s results (run with ``log_samples=True``), documents in
    doc-id order."""
    task_results = results["results"][info.name]
    samples = sorted(results["samples"][info.name], key=lambda s: (s["filter"], s["doc_id"]))
    filters = list(dict.fromkeys(s["filter"] for s in samples))
    metrics: dict[str, float] = {}
    items: dict[str, list] = {}
    for filter_name in filters:
        for metric in info.aggregations:
            key = _metric_key(metric, filter_name)
            value = task_results.get(f"{metric},{filter_name}")
            if value is None:
                continue
            metrics[key] = float(value)
            items[key] = [_json_item(s[metric]) for s in samples if s["filter"] == filter_name]
    first = [s for s in samples if s["filter"] == filters[0]]
    return TaskScores(metrics, [int(s["doc_id"]) for s in first], [s["prompt_hash"] for s in first], items,
                      [_loglikelihoods(s["filtered_resps"]) for s in first])


def _json_item(value):
    """A per-item metric value as JSON holds it: a number, or a list for lm-eval's tuples."""
    if isinstance(value, np.ndarray):  # e.g. brier_score's (gold, probabilities)
        value = value.tolist()
    if isinstance(value, (tuple, list)):
        return [_json_item(v) for v in value]
    if isinstance(value, (bool, np.bool_)):
        return float(value)
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    return value


# --------------------------------------------------------------------------------------------------------------- #
# Paired bootstrap over documents
# --------------------------------------------------------------------------------------------------------------- #
def aggregation_name(fn: Callable) -> str:
    """lm-eval's name of an aggregation function (``mean``, ``weighted_perplexity``, ...), or its qualified name."""
    module = getattr(fn, "__module__", "")
    name = getattr(fn, "__name__", type(fn).__name__)
    return name if module == "lm_eval.api.metrics" else f"{module}.{name}"


def resampled_aggregate(items: Sequence, aggregation: Callable, indices: np.ndarray) -> np.ndarray:
    """``[n_resamples]``: the metric's aggregate over each resample's items (``indices`` ``[n_resamples, n]``).

    lm-eval's mean / perplexity / weighted_perplexity / bits_per_byte are recomputed from the resampled items'
    sums, vectorized; any other aggregation is called on each resample's list of items."""
    name = aggregation_name(aggregation)
    if name in _VECTOR_AGGREGATIONS:
        values = np.asarray(items, dtype=np.float64)
        if name == "mean":
            return values[indices].mean(axis=1)
        if name == "perplexity":
            return np.exp(-values[indices].mean(axis=1))
        ll, weight = values[:, 0][indices].sum(axis=1), values[:, 1][indices].sum(axis=1)
        if name == "weighted_perplexity":
            return np.exp(-ll / weight)
        return -ll / weight / math.log(2)  # bits_per_byte
    items = [tuple(x) if isinstance(x, list) else x for x in items]  # lm-eval's aggregations unpack tuples
    return np.array([aggregation([items[i] for i in row]) for row in indices], dtype=np.float64)


def paired_interval(base_items: Sequence, config_items: Sequence, aggregation: Callable,
                    indices: np.ndarray | None) -> list[float] | None:
    """95 % interval of aggregate(config) − aggregate(model), both on the same resampled documents; None without
    an interval (fewer than two documents, or a non-finite resample)."""
    if indices is None:
        return None
    diff = resampled_aggregate(config_items, aggregation, indices) - resampled_aggregate(base_items, aggregation,
                                                                                          indices)
    return percentile_interval(diff)


def judge(ci: Sequence[float] | None, higher_is_better: bool | None, model_value: float | None = None) -> str:
    """The verdict on a difference: its interval excludes 0 (better / worse by the metric's direction) or not.

    An interval within ±ROUNDING_REL·|model_value| is float32 rounding, not a change: full mode computes the same
    numbers as the model through another kernel, and a rounding bias shared by every document could otherwise put
    a hair-thin interval on one side of 0."""
    if ci is None:
        return NO_INTERVAL
    lo, hi = ci
    if lo <= 0.0 <= hi:
        return NO_CHANGE
    if model_value is not None and math.isfinite(model_value) and max(abs(lo), abs(hi)) <= ROUNDING_REL * abs(
            model_value):
        return NO_CHANGE
    if higher_is_better is None:
        return CHANGED
    return BETTER if (lo > 0) == bool(higher_is_better) else WORSE


def compare_task(info: TaskInfo, base: TaskScores, runs: dict[str, TaskScores], seed: int) -> dict:
    """results.json's entry for one task: metrics per configuration, paired differences and intervals, verdicts,
    and each document's items (doc ids, loglikelihoods, per-metric values) for every configuration."""
    for name, scores in runs.items():
        if scores.doc_ids != base.doc_ids or scores.prompt_hashes != base.prompt_hashes:
            raise NqpqError(f"{info.name}: configuration {name} scored other documents than the model; the "
                            "comparison needs the same items (is the task's document order deterministic?)")
    n = len(base.doc_ids)
    indices = resample_indices(n, seed)
    metrics = {}
    for key in base.metrics:
        metric, _ = _split_key(key)
        metrics[key] = {"aggregation": aggregation_name(info.aggregations[metric]),
                        "higher_is_better": info.higher_is_better.get(metric)}
    differences: dict[str, dict] = {}
    for name, scores in runs.items():
        differences[name] = {}
        for key, meta in metrics.items():
            aggregation = info.aggregations[_split_key(key)[0]]
            ci = paired_interval(base.items[key], scores.items[key], aggregation, indices)
            differences[name][key] = {"delta": scores.metrics[key] - base.metrics[key], "ci95": ci,
                                      "verdict": judge(ci, meta["higher_is_better"], base.metrics[key])}
    items = {"doc_ids": base.doc_ids,
             **{name: {"loglikelihoods": s.loglikelihoods, "values": s.items}
                for name, s in {BASELINE: base, **runs}.items()}}
    return {"output_type": info.output_type, "n_items": n, "metrics": metrics,
            "primary_metric": next(iter(metrics)),
            "scores": {name: s.metrics for name, s in {BASELINE: base, **runs}.items()},
            "differences": differences, "items": items}


# --------------------------------------------------------------------------------------------------------------- #
# The run
# --------------------------------------------------------------------------------------------------------------- #
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
    lm-eval. Writing files is the caller's job (``write_eval_results``).
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
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    _quiet_lm_eval()
    manager = task_manager(cfg.tasks, cfg.include_path)
    loaded = load_tasks(manager, cfg.tasks)
    infos = {name: task_info(task) for name, task in loaded["tasks"].items()}
    timings["tasks_s"] = time.perf_counter() - t0

    scfg = sweep_config(cfg)
    device = _device(cfg) if model is None else input_device(model)  # a model passed in stays where it is
    torch.manual_seed(cfg.seed)
    t = time.perf_counter()
    checkpoint, model_name, tok_name = None, cfg.model, "given by the caller"
    if model is None:
        say(f"[eval] Loading {cfg.model}...")
        model, tokenizer, model_name, checkpoint, tok_name = _load_model(cfg, device, say)
    model.eval()
    parts = model_parts(model)
    layers = tuple(parts.default_layers if cfg.layers is None else cfg.layers)
    d_rs = sorted(set(cfg.d_r or ()))
    calibrating = "lowrank" in cfg.modes and cfg.basis is None
    # The sweep's checks of --layers and --d-r; --seq-len only matters when calibration blocks are cut.
    check_model_fit(scfg if calibrating else dataclasses.replace(scfg, seq_len=2), parts, layers, d_rs)
    timings["load_s"] = time.perf_counter() - t

    basis, basis_record = None, None
    if "lowrank" in cfg.modes:
        t = time.perf_counter()
        basis, basis_record = resolve_basis(cfg.basis, scfg, model, parts, tokenizer, tok_name, layers, device, say)
        # Attach and detach once at the largest rank: a basis of another model's shape, or narrower than a --d-r,
        # is refused now, before any task runs.
        with crystallize(model, layers, mode="lowrank", basis=basis.basis, d_r=max(d_rs), backend=cfg.backend,
                         parts=parts):
            pass
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
        with crystallize(model, layers, mode=c.mode, basis=None if basis is None else basis.basis, d_r=c.d_r,
                         backend=cfg.backend, parts=parts):
            runs[c.name] = evaluate(c.name)
    tasks = {name: compare_task(info, base[name], {c: runs[c][name] for c in runs}, cfg.seed)
             for name, info in infos.items()}
    timings["total_s"] = time.perf_counter() - t0

    results = {
        "kind": "eval", "format_version": EVAL_FORMAT_VERSION,
        "config": _results_config(cfg, model, parts, layers, d_rs, configs, device, model_name, tok_name,
                                  checkpoint, basis_record),
        "bootstrap": {"method": "paired percentile bootstrap over the documents of each task (the metric's "
                                "aggregate recomputed on each resample, model and configuration on the same "
                                "documents)", "resamples": BOOTSTRAP_RESAMPLES, "level": CI_LEVEL, "seed": cfg.seed},
        "tasks": tasks, "timings": timings,
    }
    print_eval_report(results, say)
    return results


def _device(cfg: EvalConfig) -> torch.device:
    name = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise NqpqError(f"--device {name}: CUDA is not available on this machine (use --device cpu)")
    return torch.device(name)


def _load_model(cfg: EvalConfig, device: torch.device, say: Callable[[str], None]):
    """The model and tokenizer of ``--model`` as the sweep loads them (a registry name fetched first), and how
    results name them (never by a local path)."""
    from ..model.devices import refuse_tensor_parallel
    from ..sources.checkpoints import load_model, load_tokenizer, parse_dtype
    from ..sources.fetch import model_file
    from ..sources.gguf import gguf_file_info, gguf_label, is_gguf
    from ..sources.registry import is_registry_name

    path = model_file(cfg.model, say)
    checkpoint, model_name = None, cfg.model
    if is_gguf(path):
        checkpoint = gguf_file_info(path, cfg.model if is_registry_name(cfg.model) else None)
        model_name = gguf_label(checkpoint)
    tokenizer = load_tokenizer(cfg.tokenizer or path)
    model = load_model(path, str(device), parse_dtype(cfg.dtype))
    refuse_tensor_parallel(model)
    return model, tokenizer, model_name, checkpoint, cfg.tokenizer or model_name


def resolve_basis(basis_file: str | None, scfg, model, parts, tokenizer, tok_name: str, layers: Sequence[int],
                  device: torch.device, say: Callable[[str], None]):
    """The low-rank basis of ``layers`` and results.json's record of it: ``basis_file`` (a ``ResidualBasis.save``
    file, checked to hold every layer), or fitted on the sweep's calibration text (``_fit_basis``). Shared by
    ``nqpq eval`` and ``nqpq generate``."""
    if basis_file is None:
        return _fit_basis(scfg, model, parts, tokenizer, tok_name, layers, device, say)
    from .calibration import ResidualBasis

    try:
        basis = ResidualBasis.load(basis_file)
    except Exception as err:  # torch.load raises many types for a file that is not a basis
        raise NqpqError(f"--basis {basis_file!r} is not a residual basis (ResidualBasis.save / nqpq sweep's "
                        f"basis.pt): {type(err).__name__}: {one_line(err)}") from err
    missing = [li for li in layers if li not in basis.basis]
    if missing:
        raise NqpqError(f"--basis {basis_file!r} holds layers {basis.layers}, not {missing} of --layers")
    return basis, {"source": "file", "file": os.path.basename(basis_file)}


def _fit_basis(scfg, model, parts, tokenizer, tok_name: str, layers: Sequence[int], device: torch.device,
               say: Callable[[str], None]):
    """The residual basis of ``layers`` fitted on the sweep's calibration blocks (``calibration_sets`` /
    ``fit_bases``, the sweep's code path), and results.json's record of where it came from."""
    from ..model.losses import text_tokens_per_block
    from ..sources.text import check_ids_fit, choose_bos, ids_for_blocks, text_rows
    from .config import calibration_source, text_blocks_needed
    from .setup import RunInputs, calib_text_ids, calibration_config, calibration_sets, fit_bases

    bos_id = choose_bos(tokenizer, scfg.bos)
    if calibration_source(scfg) == "text":
        ids, source = torch.zeros(0, dtype=torch.long), None
        calib_ids, calib_text = calib_text_ids(scfg, tokenizer, bos_id)
        check_ids_fit(calib_ids, model, len(tokenizer))
    else:  # the sweep's held-out blocks: after its --n-blocks scored blocks of its text
        rows, source = text_rows(scfg.text_file, scfg.text, False)
        ids = ids_for_blocks(rows, tokenizer, text_blocks_needed(scfg) * text_tokens_per_block(scfg.seq_len, bos_id))
        check_ids_fit(ids, model, len(tokenizer))
        calib_ids, calib_text = None, None
    run = RunInputs(model, ids, device, say, True, source, tok_name, bos_id, calib_ids, calib_text)
    (cal,) = calibration_sets(scfg, run)
    say(f"[eval] Fitting the residual basis on {scfg.calib_blocks} blocks of {scfg.seq_len} tokens...")
    basis = fit_bases(model, parts, layers, cal, {}, (0,), 4, scfg.backend)[0]
    return basis, {"source": "calibration", "calibration": {**calibration_config(scfg, run), "seq_len": scfg.seq_len,
                                                            "bos": bos_id is not None}}


def _results_config(cfg: EvalConfig, model, parts, layers, d_rs, configs, device, model_name, tok_name, checkpoint,
                    basis_record) -> dict:
    import lm_eval

    from ..results.report import geometry_config, versions

    config = {k: v for k, v in asdict(cfg).items() if k not in ("progress", "out")}
    config.update(model=model_name, tasks=list(cfg.tasks), layers=list(layers), modes=list(cfg.modes),
                  d_r=list(d_rs), configurations=[c.name for c in configs], tokenizer=tok_name,
                  device=str(device), dtype=str(next(model.parameters()).dtype).removeprefix("torch."),
                  batch_size=1, basis=basis_record, checkpoint=checkpoint,
                  include_path=None if cfg.include_path is None else os.path.basename(os.path.normpath(
                      cfg.include_path)),
                  **geometry_config(parts, layers), **versions(device), lm_eval=lm_eval.__version__)
    return config


def _quiet_lm_eval() -> None:
    """lm-eval logs every default it fills in at WARNING; nqpq prints what the run did itself."""
    import logging

    for name in ("lm_eval", "lm-eval"):
        logging.getLogger(name).setLevel(logging.ERROR)


def make_lm(model: torch.nn.Module, tokenizer, progress: bool = True) -> HFLM:
    """lm-eval's ``HFLM`` over the loaded ``model`` at batch size 1. Its per-window progress bars of
    ``loglikelihood_rolling`` (one bar per document in lm-eval 0.4.13) are hidden; with ``progress=False`` every bar
    of its requests is."""
    from lm_eval.models.huggingface import HFLM

    class _NqpqHFLM(HFLM):
        _in_rolling = False

        def loglikelihood(self, requests, disable_tqdm: bool = False):
            return super().loglikelihood(requests, disable_tqdm=disable_tqdm or not progress)

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            self._in_rolling = True
            try:
                return super().loglikelihood_rolling(requests, disable_tqdm=disable_tqdm or not progress)
            finally:
                self._in_rolling = False

        def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs: int | None = None):
            quiet = disable_tqdm or self._in_rolling or not progress
            return super()._loglikelihood_tokens(requests, disable_tqdm=quiet, override_bs=override_bs)

    return _NqpqHFLM(pretrained=model, tokenizer=tokenizer, batch_size=1)


# --------------------------------------------------------------------------------------------------------------- #
# Report, results.json and the plot
# --------------------------------------------------------------------------------------------------------------- #
def _num(value: float | None, signed: bool = False) -> str:
    """4 decimals, or 6 significant digits for large values (perplexities of random models run to 1e9)."""
    if value is None or not math.isfinite(value):
        return "n/a"
    sign = "+" if signed else ""
    return format(value, f"{sign}.6g" if abs(value) >= 1e4 else f"{sign}.4f")


def _ci(ci: Sequence[float] | None) -> str:
    return "no interval" if ci is None else f"[{_num(ci[0], True)}, {_num(ci[1], True)}]"


def print_eval_report(results: dict, say: Callable[[str], None] = print) -> None:
    """Per task: every metric of the model and of each configuration, the paired difference with its 95 % interval
    and verdict, then a verdict line on the task's primary metric."""
    cfg = results["config"]
    say(f"[eval] {cfg['model']}: layers {' '.join(map(str, cfg['layers']))} crystallized; lm-eval "
        f"{cfg['lm_eval']}, batch size 1; differences are configuration − model on the same documents, 95 % paired "
        f"bootstrap intervals ({results['bootstrap']['resamples']} resamples, seed {results['bootstrap']['seed']})")
    for name, task in results["tasks"].items():
        say(f"[eval] {name} ({task['output_type']}, {task['n_items']} documents)")
        arrows = {key: key + {True: " ↑", False: " ↓"}.get(meta["higher_is_better"], "")
                  for key, meta in task["metrics"].items()}
        rows = [("metric", "configuration", "value", "Δ vs model", "95 % CI", "verdict")]
        for key in task["metrics"]:
            for config, scores in task["scores"].items():
                if config == BASELINE:
                    rows.append((arrows[key], config, _num(scores[key]), "", "", ""))
                    continue
                d = task["differences"][config][key]
                rows.append((arrows[key], config, _num(scores[key]), _num(d["delta"], True), _ci(d["ci95"]),
                             d["verdict"]))
        widths = [max(len(row[i]) for row in rows) for i in range(5)]
        for row in rows:
            say("  " + f"{row[0]:<{widths[0]}}  {row[1]:<{widths[1]}}  {row[2]:>{widths[2]}}  {row[3]:>{widths[3]}}  "
                f"{row[4]:<{widths[4]}}  {row[5]}".rstrip())
        primary = task["primary_metric"]
        verdicts = "; ".join(f"{config} {d[primary]['verdict']} ({_num(d[primary]['delta'], True)}, 95 % CI "
                             f"{_ci(d[primary]['ci95'])})" for config, d in task["differences"].items())
        say(f"  verdict on {primary}: {verdicts}")


def plot_eval(results: dict, path: str) -> None:
    """Per task (a row) and metric (a panel): each configuration's difference against the model with its 95 %
    interval, a line at 0."""
    from ..results.plots import _pyplot, error_bars

    plt = _pyplot()
    tasks = results["tasks"]
    n_cols = max(len(t["metrics"]) for t in tasks.values())
    configs = results["config"]["configurations"]
    fig, axes = plt.subplots(len(tasks), n_cols, squeeze=False,
                             figsize=(4.2 * n_cols, 0.45 * len(configs) * len(tasks) + 1.6 * len(tasks) + 0.8))
    for row, (name, task) in enumerate(tasks.items()):
        for col in range(n_cols):
            ax = axes[row][col]
            if col >= len(task["metrics"]):
                ax.axis("off")
                continue
            key, meta = list(task["metrics"].items())[col]
            deltas = [task["differences"][c][key]["delta"] for c in configs]
            cis = [task["differences"][c][key]["ci95"] for c in configs]
            colors = [{BETTER: "tab:green", WORSE: "tab:red"}.get(task["differences"][c][key]["verdict"], "tab:grey")
                      for c in configs]
            ys = list(range(len(configs)))
            xerr = error_bars(deltas, cis)
            for y, x, color, k in zip(ys, deltas, colors, range(len(configs))):
                ax.errorbar([x], [y], xerr=None if xerr is None else [[xerr[0][k]], [xerr[1][k]]], fmt="o",
                            color=color, capsize=4)
            ax.axvline(0.0, color="black", lw=0.8)
            ax.set_yticks(ys, configs)
            ax.set_ylim(len(configs) - 0.5, -0.5)  # the first configuration on top, half a row of margin
            direction = {True: "higher is better", False: "lower is better"}.get(meta["higher_is_better"], "")
            ax.set_xlabel(f"Δ {key} vs model" + (f" ({direction})" if direction else ""))
            ax.set_title(f"{name}: {key} ({task['n_items']} docs)", fontsize=9)
    fig.suptitle(f"nqpq eval {results['config']['model']}\nlayers {' '.join(map(str, results['config']['layers']))} "
                 "crystallized: difference against the model with its 95 % paired interval", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_eval_results(out_dir: str, results: dict) -> list[str]:
    """Write results.json and the plot into ``out_dir``, each whole: both are made in a staging folder inside
    ``out_dir`` first, then moved in place (``os.replace``); on any failure neither is written."""
    os.makedirs(out_dir, exist_ok=True)
    staging = tempfile.mkdtemp(dir=out_dir, prefix=".nqpq-")
    try:
        with open(os.path.join(staging, "results.json"), "w") as f:
            json.dump(results, f, indent=2, allow_nan=True)
        plot_eval(results, os.path.join(staging, PLOT_NAME))
        written = []
        for name in ("results.json", PLOT_NAME):
            os.replace(os.path.join(staging, name), os.path.join(out_dir, name))
            written.append(os.path.join(out_dir, name))
        return written
    finally:
        shutil.rmtree(staging, ignore_errors=True)

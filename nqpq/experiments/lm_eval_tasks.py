"""``nqpq eval``'s lm-evaluation-harness plumbing: lm-eval found (an optional extra), the tasks named found and
loaded once, lm-eval's ``HFLM`` over a loaded model, and each document's per-item numbers read back from
``simple_evaluate``'s logged samples (``TaskScores``, what ``nqpq.results.paired`` compares).

Tasks: loglikelihood tasks (``multiple_choice``, ``loglikelihood``, ``loglikelihood_rolling``) and ``generate_until``
tasks, whose requests ``HFLM.generate_until`` answers with ``model.generate`` (the model's own KV cache; inside
``nqpq.crystallize`` the crystallized layers answer each cached step, see ``nqpq.model.crystallize``).

Batch size 1: each item's numbers then depend on that item alone, never on the items lm-eval happens to batch with
it, so the model's and a configuration's numbers pair item by item. lm-eval right-pads loglikelihood batches (a
causal LM gets no mask: the pads sit after the real tokens) and left-pads generation batches with a mask; at batch
size 1 nothing is padded.
"""

from __future__ import annotations

from collections.abc import Sequence
from types import ModuleType
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..errors import NqpqError, one_line
from ..results.paired import GENERATE_UNTIL, TaskInfo, TaskScores, metric_key

if TYPE_CHECKING:  # lm-eval is optional: imported where it is used
    from lm_eval.api.task import Task
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

LM_EVAL_MISSING = "nqpq eval needs lm-evaluation-harness: pip install -e '.[eval]'"
# The output types whose requests are loglikelihoods.
LOGLIKELIHOOD_TYPES = ("multiple_choice", "loglikelihood", "loglikelihood_rolling")
TASK_TYPES = (*LOGLIKELIHOOD_TYPES, GENERATE_UNTIL)  # what nqpq eval runs


def require_lm_eval() -> ModuleType:
    """The ``lm_eval`` module, or an ``NqpqError`` naming the extra to install."""
    try:
        import lm_eval
        import lm_eval.models.huggingface  # noqa: F401 - HFLM, imported here so a broken install fails here
    except ImportError as err:
        raise NqpqError(LM_EVAL_MISSING) from err
    return lm_eval


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
    an ``NqpqError`` for a task that cannot be loaded or whose output type nqpq eval does not run."""
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
        if kind not in TASK_TYPES:
            raise NqpqError(f"--tasks: {name} is a {kind} task; nqpq eval runs {', '.join(TASK_TYPES)} tasks")
    return loaded


def task_info(task: Task) -> TaskInfo:
    """A loaded task's name, output type, and its metrics' aggregation functions and directions."""
    return TaskInfo(task.task_name, task.get_config("output_type"), dict(task.aggregation()),
                    dict(task.higher_is_better()))


def _loglikelihoods(filtered_resps: list) -> list[float]:
    """Each request's loglikelihood: (ll, is_greedy) pairs for (multiple-choice) loglikelihood, ll for rolling."""
    return [float(r[0]) if isinstance(r, (tuple, list)) else float(r) for r in filtered_resps]


def _generation(resps: list) -> str:
    """The text generated for a generate_until document (its one request's one response, before any filter)."""
    (request,) = resps
    return request[0] if isinstance(request, (tuple, list)) else request


def _answer(filtered_resps):
    """A generate_until document's answer after a filter: the one request's (a filter such as take_first leaves
    one), or the filter's list as it is."""
    if isinstance(filtered_resps, (tuple, list)) and len(filtered_resps) == 1:
        return _json_item(filtered_resps[0])
    return _json_item(filtered_resps)


def task_scores(results: dict, info: TaskInfo) -> TaskScores:
    """One task's ``TaskScores`` from ``simple_evaluate``'s results (run with ``log_samples=True``), documents in
    doc-id order."""
    task_results = results["results"][info.name]
    logged = results["samples"][info.name]
    filters = list(dict.fromkeys(s["filter"] for s in logged))  # the task's order (its first filter: the verdict's)
    samples = sorted(logged, key=lambda s: (filters.index(s["filter"]), s["doc_id"]))
    metrics: dict[str, float] = {}
    items: dict[str, list] = {}
    for filter_name in filters:
        for metric in info.aggregations:
            key = metric_key(metric, filter_name)
            value = task_results.get(f"{metric},{filter_name}")
            if value is None:
                continue
            metrics[key] = float(value)
            items[key] = [_json_item(s[metric]) for s in samples if s["filter"] == filter_name]
    first = [s for s in samples if s["filter"] == filters[0]]
    doc_ids, hashes = [int(s["doc_id"]) for s in first], [s["prompt_hash"] for s in first]
    if info.output_type == GENERATE_UNTIL:
        answers = {f: [_answer(s["filtered_resps"]) for s in samples if s["filter"] == f] for f in filters}
        return TaskScores(metrics, doc_ids, hashes, items, [_generation(s["resps"]) for s in first], answers)
    return TaskScores(metrics, doc_ids, hashes, items, [_loglikelihoods(s["filtered_resps"]) for s in first])


def _json_item(value):
    """A per-item value as JSON holds it: a number or a string, or a list for lm-eval's tuples."""
    if isinstance(value, np.ndarray):  # e.g. brier_score's (gold, probabilities)
        value = value.tolist()
    if isinstance(value, (tuple, list)):
        return [_json_item(v) for v in value]
    if isinstance(value, (bool, np.bool_)):
        return float(value)
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    return value


def quiet_lm_eval() -> None:
    """lm-eval logs every default it fills in (and each left truncation) at WARNING; nqpq prints what the run did
    itself."""
    import logging

    for name in ("lm_eval", "lm-eval"):
        logging.getLogger(name).setLevel(logging.ERROR)


def make_lm(model: torch.nn.Module, tokenizer, progress: bool = True, batch_size: int = 1) -> HFLM:
    """lm-eval's ``HFLM`` over the loaded ``model`` (``nqpq eval`` runs batch size 1; a larger one pads: tests use it
    to check padded batches). Its per-window progress bars of ``loglikelihood_rolling`` (one bar per document in
    lm-eval 0.4.13) are hidden; with ``progress=False`` every bar of its requests is."""
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

        def generate_until(self, requests, disable_tqdm: bool = False):
            return super().generate_until(requests, disable_tqdm=disable_tqdm or not progress)

    return _NqpqHFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)

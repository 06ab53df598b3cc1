"""``nqpq eval``'s statistics: per task and metric, the difference configuration − model on the same documents, its
95 % paired bootstrap interval, and the verdict.

Every configuration scores the same documents (paired by lm-eval's doc id; their prompt hashes must agree). For each
task metric, the difference configuration − model comes with a 95 % percentile bootstrap interval over the documents:
one resample draws n document indices with replacement (``stats.resample_indices``, seeded by ``--seed``), the
metric's own aggregate is recomputed for the model and for the configuration on the same indices, and the interval
is the 2.5th and 97.5th percentiles of the differences (``stats.percentile_interval``). Document-to-document
variation, which both share, cancels: this is not two independent standard errors.

For a metric that is a mean over items (accuracy, exact match) the aggregate is the resample's mean; for a
corpus-level metric it is recomputed from the resampled items' sums, as lm-eval computes it over the whole set:
``perplexity`` exp(−mean loglikelihood); ``word_perplexity`` / ``byte_perplexity`` exp(−Σ loglikelihood / Σ words
(bytes)); ``bits_per_byte`` −Σ loglikelihood / Σ bytes / ln 2. Any other aggregation is called, as lm-eval defines
it, on each resample's items. The verdict: the interval excludes 0 → "better" or "worse" (by the metric's
direction), else "no measurable change".

Pure statistics on numbers and strings lm-eval produced: nothing here imports lm-eval, a model or the experiments.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from ..errors import NqpqError
from .stats import percentile_interval, resample_indices

BASELINE = "model"  # the name of the unmodified model's column
NO_CHANGE, BETTER, WORSE, CHANGED, NO_INTERVAL = ("no measurable change", "better", "worse", "changed",
                                                   "no interval")
GENERATE_UNTIL = "generate_until"  # lm-eval's output type of generation tasks: their items are generated texts
# lm-eval's aggregations (lm_eval.api.metrics) recomputed vectorized on every resample.
_VECTOR_AGGREGATIONS = ("mean", "perplexity", "weighted_perplexity", "bits_per_byte")
# A difference interval within ±ROUNDING_REL × |the model's value| is rounding, not a change (see ``judge``): float32
# loglikelihoods of the same computation through another kernel differ by ~1e-7 relative (≤ 6e-6 on SmolLM2's
# shortest choices), far below any difference a task can resolve.
ROUNDING_REL = 1e-5


@dataclass
class TaskInfo:
    """What the comparison needs to know about a task: its type and its metrics' aggregations and directions."""

    name: str
    output_type: str
    aggregations: dict[str, Callable] = field(default_factory=dict)  # metric name -> lm-eval aggregation function
    higher_is_better: dict[str, bool | None] = field(default_factory=dict)


@dataclass
class TaskScores:
    """One task's outcome under one configuration: lm-eval's aggregate per metric and each document's items.

    ``outputs`` holds what the model produced per document: the loglikelihood of each request (each choice) for a
    loglikelihood task, the generated text (as lm-eval decoded and cut it at a stop sequence) for a generate_until
    task, whose ``answers`` hold, per filter, the answer each filter extracted from it."""

    metrics: dict[str, float]  # lm-eval's aggregate per metric key ("acc"; "exact_match,strict-match" for a filter)
    doc_ids: list[int]
    prompt_hashes: list[str]
    items: dict[str, list]  # per metric key: each document's per-item value (a number, or (loglikelihood, weight))
    outputs: list  # per document: [loglikelihood per request], or the generated text
    answers: dict[str, list] | None = None  # generate_until: per filter, each document's filtered answer


def metric_key(metric: str, filter_name: str) -> str:
    """results.json's key of a metric under a filter: the metric alone for lm-eval's ``none`` filter."""
    return metric if filter_name == "none" else f"{metric},{filter_name}"


def split_key(key: str) -> tuple[str, str]:
    """(metric, filter) of a ``metric_key``."""
    metric, _, filter_name = key.partition(",")
    return metric, filter_name or "none"


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
    an interval (too few documents, or a non-finite resample)."""
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
    and each document's items (doc ids; loglikelihoods or generated texts and answers; per-metric values) for every
    configuration."""
    for name, scores in runs.items():
        if scores.doc_ids != base.doc_ids or scores.prompt_hashes != base.prompt_hashes:
            raise NqpqError(f"{info.name}: configuration {name} scored other documents than the model; the "
                            "comparison needs the same items (is the task's document order deterministic?)")
    n = len(base.doc_ids)
    indices = resample_indices(n, seed)
    metrics = {}
    for key in base.metrics:
        metric, _ = split_key(key)
        metrics[key] = {"aggregation": aggregation_name(info.aggregations[metric]),
                        "higher_is_better": info.higher_is_better.get(metric)}
    differences: dict[str, dict] = {}
    for name, scores in runs.items():
        differences[name] = {}
        for key, meta in metrics.items():
            aggregation = info.aggregations[split_key(key)[0]]
            ci = paired_interval(base.items[key], scores.items[key], aggregation, indices)
            differences[name][key] = {"delta": scores.metrics[key] - base.metrics[key], "ci95": ci,
                                      "verdict": judge(ci, meta["higher_is_better"], base.metrics[key])}
    everyone = {BASELINE: base, **runs}
    if info.output_type == GENERATE_UNTIL:
        outputs = {name: {"generations": s.outputs, "answers": s.answers, "values": s.items}
                   for name, s in everyone.items()}
    else:
        outputs = {name: {"loglikelihoods": s.outputs, "values": s.items} for name, s in everyone.items()}
    return {"output_type": info.output_type, "n_items": n, "metrics": metrics,
            "primary_metric": next(iter(metrics)),
            "scores": {name: s.metrics for name, s in everyone.items()},
            "differences": differences, "items": {"doc_ids": base.doc_ids, **outputs}}

"""``--heads``: which query heads of the crystallized layers a sweep or scan crystallizes (the others stay plain
attention, in the same op call: ``nqpq.model.crystallize`` with a mapping layer → heads).

Two forms, one flag:

- by index, ``27:0,1,2 28:3`` (``SweepConfig.heads`` may also be a mapping ``{27: [0, 1, 2], 28: [3]}``): those heads
  of those layers; every layer named must be one of ``--layers``, and a layer of ``--layers`` not named is left
  plain (not crystallized at all);
- by a crystallinity rule, ``top1_prob>=0.7``: a statistic of ``nqpq.experiments.crystallinity`` (``top1_prob``,
  ``sink_frac``, ``self_frac``, ``prev_frac``, ``sink_mass``, ``winner_share``, ``first_key_mass`` (α₁, the mean
  attention on the block's first token, Gu et al.'s sink score): its per-head means), a comparison
  (``>=``, ``>``, ``<=``, ``<``) and a number, measured per head of ``--layers`` on the calibration text (the first
  calibration set: held-out blocks, another text, or the first scored blocks with ``--calib-from eval``) with the
  headline sink setting; the heads where it holds are crystallized.

The choice is checked before loading where the config answers it (the syntax, the layers against ``--layers``, the
head indices against the config's query heads), and recorded in results.json's ``heads``: the form, the rule, the
heads chosen per layer and, for a rule, the measured value of every head of ``--layers``.
"""

from __future__ import annotations

import math
import operator
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from ..errors import LayerChoiceError, NqpqError
from ..model.crystallize import observe_residuals
from ..model.devices import input_device
from ..model.parts import layer_heads, model_parts
from .calibration import _stop_above, _StopForward
from .crystallinity import CrystallinityAccumulator

# The rule's keys: the crystallinity statistics, named without "_mean".
RULE_STATS = {"top1_prob": "top1_prob_mean", "sink_frac": "sink_frac", "self_frac": "self_frac",
              "prev_frac": "prev_frac", "sink_mass": "sink_mass_mean", "winner_share": "winner_share_mean",
              "first_key_mass": "first_key_mass_mean"}
_OPS = {">=": operator.ge, ">": operator.gt, "<=": operator.le, "<": operator.lt}
_RULE_RE = re.compile(r"\s*([a-z0-9_]+)\s*(>=|<=|>|<)\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*")
_INDEX_RE = re.compile(r"(\d+):(\d+(?:,\d+)*)")


@dataclass(frozen=True)
class HeadRule:
    """A crystallinity rule: the heads whose ``stat`` (a key of ``RULE_STATS``) compares true with ``threshold``."""

    stat: str
    op: str
    threshold: float

    @property
    def text(self) -> str:
        return f"{self.stat}{self.op}{self.threshold:g}"

    def holds(self, value: float) -> bool:
        """Whether a head with this measured value is chosen (a NaN value never is)."""
        return not math.isnan(value) and _OPS[self.op](value, self.threshold)


HeadSpec = HeadRule | dict[int, tuple[int, ...]]


def parse_heads(heads: object) -> HeadSpec | None:
    """``SweepConfig.heads`` read: None, a ``HeadRule``, or ``{layer: heads}`` by index (heads sorted, checked for
    repeats and emptiness; not yet against a model). An ``NqpqError`` naming the flag for anything else."""
    if heads is None:
        return None
    if isinstance(heads, Mapping):
        return _checked_indices(heads, None, None)
    if not isinstance(heads, str):
        raise NqpqError(f"--heads must be a string (27:0,1,2 28:3, or a rule such as top1_prob>=0.7) or a mapping "
                        f"layer -> heads, got {type(heads).__name__}")
    text = heads.strip()
    rule = _RULE_RE.fullmatch(text)
    if rule:
        stat, op, number = rule.groups()
        if stat not in RULE_STATS:
            raise NqpqError(f"--heads {text!r}: unknown statistic {stat!r}; known: {', '.join(RULE_STATS)}")
        return HeadRule(stat, op, float(number))
    tokens = text.split()
    if tokens and all(_INDEX_RE.fullmatch(tok) for tok in tokens):
        chosen: dict[int, list[int]] = {}
        for tok in tokens:
            layer, heads_text = tok.split(":")
            if int(layer) in chosen:
                raise NqpqError(f"--heads {text!r}: layer {int(layer)} is named twice (list its heads once: "
                                f"{int(layer)}:0,1,2)")
            chosen[int(layer)] = [int(h) for h in heads_text.split(",")]
        return _checked_indices(chosen, None, None)
    raise NqpqError(f"--heads {text!r}: give heads by index (LAYER:HEAD,HEAD ..., e.g. 27:0,1,2 28:3) or a rule "
                    f"STAT>=X (STAT one of {', '.join(RULE_STATS)}; >=, >, <=, <), e.g. top1_prob>=0.7")


def _checked_indices(heads: Mapping, n_layers: int | None,
                     n_heads: Callable[[int], int] | None) -> dict[int, tuple[int, ...]]:
    try:
        return layer_heads(heads, n_layers, n_heads, "--heads")  # type: ignore[return-value]
    except LayerChoiceError as err:
        raise NqpqError(str(err)) from None


def check_heads(heads: object, layers: Sequence[int] | None, parts=None) -> HeadSpec | None:
    """``--heads`` parsed and checked against ``--layers`` (when known: given, or the model's default) and, with
    ``parts`` (``nqpq.model.parts.ModelParts``, from the config or the loaded model), the layers' query heads."""
    spec = parse_heads(heads)
    if isinstance(spec, dict):
        if parts is not None:
            spec = _checked_indices(spec, parts.n_layers, parts.query_heads)
        if layers is not None:
            outside = sorted(set(spec) - set(layers))
            if outside:
                raise NqpqError(f"--heads names layers {outside} that are not among --layers {list(layers)}: "
                                "heads are chosen within the crystallized layers")
    return spec


def check_head_indices(heads: object, n_layers: int, n_heads: Callable[[int], int]) -> None:
    """``--heads`` by index checked against a geometry known before loading (the registry's ``n_layers`` and query
    heads per layer): the same message as the check against the loaded model. A rule is not checked here."""
    spec = parse_heads(heads)
    if isinstance(spec, dict):
        _checked_indices(spec, n_layers, n_heads)


@dataclass
class HeadChoice:
    """The heads a run crystallizes: ``mapping`` (layer → query heads, only layers with at least one) for
    ``crystallize``, and what results.json records of it."""

    mapping: dict[int, tuple[int, ...]]
    spec: HeadSpec
    values: dict[int, list[float]] | None = None  # a rule: the measured value of every head of --layers
    measured_on: dict | None = None  # a rule: where the statistics were measured

    def results(self) -> dict:
        """results.json's ``heads``."""
        rule = self.spec if isinstance(self.spec, HeadRule) else None
        return {
            "by": "rule" if rule else "index",
            "rule": rule.text if rule else None,
            "stat": RULE_STATS[rule.stat] if rule else None,
            "chosen": {str(li): list(h) for li, h in sorted(self.mapping.items())},
            "n_chosen": sum(len(h) for h in self.mapping.values()),
            "values": None if self.values is None else {str(li): v for li, v in sorted(self.values.items())},
            "measured_on": self.measured_on,
        }

    def line(self) -> str:
        """The report's line: the heads chosen per layer, and how."""
        how = f"rule {self.spec.text}" if isinstance(self.spec, HeadRule) else "index"
        chosen = " ".join(f"{li}:{','.join(map(str, h))}" for li, h in sorted(self.mapping.items()))
        return f"heads ({how}): {self.results()['n_chosen']} crystallized — {chosen}"


def choose_heads(spec: HeadSpec, parts, layers: Sequence[int],
                 measure: Callable[[], list[dict]], measured_on: dict) -> HeadChoice:
    """The run's ``HeadChoice``: indices as given (checked against the model), or the heads of ``layers`` where the
    rule holds on ``measure()``'s crystallinity statistics; an ``NqpqError`` when a rule chooses no head."""
    if isinstance(spec, dict):
        return HeadChoice(_checked_indices(spec, parts.n_layers, parts.query_heads), spec)
    stats = measure()
    values: dict[int, list[float]] = {li: [float("nan")] * parts.query_heads(li) for li in layers}
    for row in stats:
        if row["layer"] in values:
            values[row["layer"]][row["head"]] = float(row[RULE_STATS[spec.stat]])
    mapping = {li: tuple(h for h, x in enumerate(v) if spec.holds(x)) for li, v in values.items()}
    mapping = {li: h for li, h in mapping.items() if h}
    if not mapping:
        finite = [x for v in values.values() for x in v if not math.isnan(x)]
        span = f"{min(finite):.3f}..{max(finite):.3f}" if finite else "none finite"
        raise NqpqError(f"--heads {spec.text}: no head of --layers {list(layers)} meets the rule on the calibration "
                        f"text ({spec.stat} ranges {span} there)")
    return HeadChoice(mapping, spec, values, measured_on)


@torch.no_grad()
def measure_crystallinity(model: torch.nn.Module, blocks: torch.Tensor, layers: Sequence[int], batch_size: int,
                          backend: str, sink_tokens: int, n_heads: Mapping[int, int]) -> list[dict]:
    """The crystallinity statistics of ``layers`` on ``blocks`` ``[N, T]`` (the model's own attention kept; the
    body runs up to the highest layer only, as a calibration pass). Under torchrun every rank counts every block:
    the sums are added across ranks (a collective), and the means, ratios of sums, are those of one rank."""
    parts = model_parts(model)
    acc = CrystallinityAccumulator(layers, dict(n_heads), sink_tokens=sink_tokens)
    device = input_device(model)
    with observe_residuals(model, layers, None, backend=backend, stats_acc=acc, sink_tokens=sink_tokens), \
            _stop_above(parts, max(layers)):
        for s in range(0, blocks.shape[0], batch_size):
            try:
                parts.body(input_ids=blocks[s:s + batch_size].to(device), use_cache=False, return_dict=True)
            except _StopForward:
                pass
    return acc.results()


def heads_for_run(cfg, model: torch.nn.Module, parts, layers: Sequence[int], calibration, source: str,
                  scored: torch.Tensor, batch_size: int, sink_tokens: int) -> HeadChoice | None:
    """The run's ``HeadChoice`` for ``cfg.heads`` (None without the flag): a rule is measured on ``calibration``
    (``nqpq.experiments.sweep.CalibrationSet``; its blocks, or the first ``cfg.calib_blocks`` of ``scored`` for
    ``--calib-from eval``; ``source``: ``calibration_source(cfg)``) with ``sink_tokens`` kept apart."""
    spec = check_heads(cfg.heads, layers, parts)
    if spec is None:
        return None
    blocks = calibration.blocks if calibration.blocks is not None else scored[:cfg.calib_blocks]
    measured_on = {"source": source, "first_block": calibration.first_block,
                   "blocks": int(blocks.shape[0]), "seq_len": int(blocks.shape[1]), "sink_tokens": sink_tokens}
    return choose_heads(spec, parts, layers, lambda: measure_crystallinity(
        model, blocks, layers, batch_size, cfg.backend, sink_tokens, {li: parts.query_heads(li) for li in layers}),
        measured_on)

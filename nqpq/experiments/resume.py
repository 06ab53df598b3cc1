"""An interrupted sweep or scan keeps what it finished; ``--resume`` finishes it with the same results.

The checkpoint is a directory inside ``--out``: ``OUT/.nqpq-partial/`` (inside rather than beside, so a run whose
``--out`` is ``.`` or ``/`` has a place for it too, and removing ``OUT`` removes everything the run made). It holds

- ``baseline.pt`` (``torch.save``): the first unit, the baseline pass and the calibration: the per-block baseline
  losses, the crystallinity statistics and the residual bases of every calibration draw and sink setting. The bases
  are stored, not recomputed on resume: they are the exact float32 bases results.json's numbers and ``basis.pt``
  came from, and refitting them would repeat the observed baseline pass and the calibration passes, whose sums
  (Σ εεᵀ over batches, across ranks) need not round the same way twice.
- ``state.json``: what the checkpoint belongs to (kind, nqpq version, the flags, the run's results.json ``config``
  as resolved after loading, a fingerprint of the model's weights and of the token ids) and the per-block losses
  of every finished configuration (top-1, full, each low-rank d_r per basis and sink setting; in a scan, each of
  those per layer), with the timings so far. Losses are float64 written with ``repr``-exact JSON floats.

Each file is written whole to a temporary file in that directory and ``os.replace``-d over the old one (atomic on
POSIX), ``baseline.pt`` before the ``state.json`` that names it, after each finished unit, by the main rank only.
An interrupt at any moment leaves the previous checkpoint or the new one, never a torn file.

On resume every unit the checkpoint holds is taken from it and only the others run, so results.json equals an
uninterrupted run's apart from its timings: everything after the losses (PPLs, intervals, verdicts) is computed
from them by the same code. The baseline forward pass itself runs again (unobserved: the replay of every
configuration needs its record of hidden states), the calibration does not. A resume checks, and refuses with one
line naming the first difference: the kind, the nqpq version, the flags (before the model loads), then the
resolved ``config`` (model, text, device, dtype, versions, geometry, ...) and the fingerprints. A run without
``--resume`` refuses an ``--out`` that holds a checkpoint; ``--resume`` without one is refused too (there is
nothing to resume, and starting afresh silently would hide a mistyped ``--out``).

SIGTERM is turned into an interrupt (``nqpq.experiments.interrupts.sigterm_interrupts``) so that a scheduler's kill
keeps the checkpoint as Ctrl-C does; the CLI exits 130 for SIGINT and 143 for SIGTERM (128 + the signal's number).
The checkpoint's files, fingerprints and comparisons are in ``nqpq.experiments.checkpoint_files``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from ..errors import NqpqError
from . import distributed
from .calibration import ResidualBasis
from .checkpoint_files import (
    BASELINE_FILE,
    FORMAT_VERSION,
    NOT_COMPARED,
    STATE_FILE,
    as_json,
    atomic_write,
    broadcast,
    checkpoint_path,
    done_count,
    first_difference,
    flag_view,
    nqpq_version,
    read_state,
    short_repr,
    tokens_fingerprint,
    weights_fingerprint,
)
from .config import SweepConfig


class Checkpoint:
    """The checkpoint of one sweep or scan run in ``out_dir`` (see the module docstring).

    ``resume``: take the finished configurations of the checkpoint there (it must exist); else the run starts
    afresh (and refuses an ``out_dir`` holding one). Every rank of a torchrun run holds one; only rank 0 reads
    and writes files, and every rank learns the state from it (``begin`` is a collective).
    """

    def __init__(self, out_dir: str, kind: str, cfg: SweepConfig, *, resume: bool = False) -> None:
        if kind not in ("sweep", "scan"):
            raise ValueError(f"kind must be 'sweep' or 'scan', got {kind!r}")
        self.path = checkpoint_path(out_dir)
        self.kind, self.resume = kind, resume
        self._flags = flag_view(cfg)
        self._cfg_batch_size = cfg.batch_size
        self._state: dict | None = None  # what state.json holds (rank 0), once begun
        self._losses: dict[str, torch.Tensor] = {}  # finished configurations (every rank)
        self._baseline: tuple | None = None  # (losses, bases, crystallinity) once finished (every rank)
        self._timings: dict | None = None
        self._stored_batch_size: int | None = None

    # -- before the model loads (the CLI, on the main rank) ---------------------------------------------------
    def check(self) -> None:
        """Refuse, before anything loads: ``--resume`` without a checkpoint or with other flags, or a fresh run
        into an ``--out`` that holds one."""
        state = read_state(self.path)
        if state is None:
            if self.resume:
                raise NqpqError(f"--resume: no checkpoint in {self.path} (nothing to resume; run without --resume)")
            return
        if not self.resume:
            raise NqpqError(f"--out holds the checkpoint of an interrupted {state.get('kind', 'run')} "
                            f"({done_count(state)} of {state.get('total', '?')} configurations done) in "
                            f"{self.path}: add --resume to finish it, or remove that directory to start afresh")
        self._check_identity(state)
        self._stored_batch_size = state["config"].get("batch_size")

    def _refuse(self, what: str, old: Any, new: Any) -> None:
        raise NqpqError(f"--resume: {what} is {short_repr(new)} here but {short_repr(old)} in the checkpoint "
                        f"{self.path} (rerun with the checkpoint's settings, or remove that directory to start afresh)")

    def _check_identity(self, state: dict) -> None:
        if state.get("kind") != self.kind:
            self._refuse("the command", state.get("kind"), self.kind)
        if state.get("nqpq_version") != nqpq_version():
            self._refuse("the nqpq version", state.get("nqpq_version"), nqpq_version())
        stored = state.get("flags", {})
        for key in list(self._flags) + [k for k in stored if k not in self._flags]:
            if stored.get(key) != self._flags.get(key):  # a flag is named whole (--d-r [1, 8], not its 2nd value)
                self._refuse(f"--{key.replace('_', '-')}", stored.get(key), self._flags.get(key))

    # -- inside the run (every rank) --------------------------------------------------------------------------
    def batch_size(self, chosen: int) -> int:
        """The batch size to run with: ``chosen``, or when resuming a run whose batch size was automatic, the one it
        chose (free memory may suggest another now; blocks batched otherwise may round otherwise). Collective."""
        if not self.resume or self._cfg_batch_size is not None:
            return chosen
        if distributed.is_main() and self._stored_batch_size is None:
            state = read_state(self.path)
            self._stored_batch_size = None if state is None else state.get("config", {}).get("batch_size")
        stored = broadcast(self._stored_batch_size)
        return chosen if stored is None else int(stored)

    def begin(self, config: dict, model: torch.nn.Module, tokens: Sequence[torch.Tensor], total: int,
              timings: dict, say: Callable[[str], None]) -> None:
        """Check (resuming) or start the checkpoint of a run: ``config`` its results.json config, ``tokens`` the
        blocks it scores and calibrates on, ``total`` its number of configurations, ``timings`` the dict the run
        fills (saved with each unit; restored on resume, so configurations taken from the checkpoint keep the
        seconds they took). Prints ``resuming: N of M configurations done``. Collective under torchrun."""
        identity = {"config": as_json({k: v for k, v in config.items() if k not in NOT_COMPARED}),
                    "fingerprint": {"weights": weights_fingerprint(model), "tokens": tokens_fingerprint(tokens)}}
        error, payload = None, None
        if distributed.is_main():
            try:
                payload = self._open(identity, total)
            except NqpqError as err:
                error = str(err)
        error, payload = broadcast((error, payload))
        if error is not None:
            raise NqpqError(error)
        self._timings = timings
        if payload is None:
            return
        losses, baseline, stored_timings = payload
        self._losses = {k: torch.tensor(v, dtype=torch.float64) for k, v in losses.items()}
        self._baseline = baseline
        for key, value in stored_timings.items():
            timings.setdefault(key, value)
        say(f"resuming: {done_count({'baseline': baseline is not None, 'losses': losses})} of {total} "
            f"configurations done ({self.path})")

    def _open(self, identity: dict, total: int) -> tuple | None:
        """Rank 0: the stored units of the checkpoint (resuming; checked against ``identity``), or None."""
        base = {"format": FORMAT_VERSION, "kind": self.kind, "nqpq_version": nqpq_version(), "flags": self._flags,
                **identity, "total": total}
        if not self.resume:
            # A fresh run: a leftover directory without a state.json (an interrupt between baseline.pt and the
            # first state.json) holds nothing to resume.
            if read_state(self.path) is not None:
                self.check()  # refuses
            shutil.rmtree(self.path, ignore_errors=True)
            self._state = {**base, "baseline": False, "losses": {}, "timings": {}}
            return None
        state = read_state(self.path)
        if state is None:
            self.check()  # refuses
        self._check_identity(state)
        for key in ("config", "fingerprint"):
            found = first_difference(state.get(key, {}), identity[key])
            if found:
                what, old, new = found
                label = {"weights": "the model's weights (fingerprint)",
                         "tokens": "the token ids of the text (fingerprint)"}.get(what, f"config {what}")
                self._refuse(label, old, new)
        if state.get("total") != total:
            self._refuse("the number of configurations", state.get("total"), total)
        baseline = None
        if state.get("baseline"):
            try:
                stored = torch.load(os.path.join(self.path, BASELINE_FILE), map_location="cpu", weights_only=True)
            except (OSError, RuntimeError, EOFError) as err:
                raise NqpqError(f"{self.path}/{BASELINE_FILE} cannot be read ({err}): remove {self.path} to start "
                                "afresh") from err
            bases = [{int(n): ResidualBasis(**fields) for n, fields in per_sink.items()}
                     for per_sink in stored["bases"]]
            crystallinity = {int(n): c for n, c in stored["crystallinity"].items()}
            baseline = (stored["losses"].to(torch.float64), bases, crystallinity)
        self._state = {**state, **base}  # the same identity, now in this run's key order
        losses = {k: v["values"] for k, v in state.get("losses", {}).items()}
        return losses, baseline, dict(state.get("timings", {}))

    # -- the units ----------------------------------------------------------------------------------------------
    @property
    def resumed_baseline(self) -> tuple[torch.Tensor, list[dict[int, ResidualBasis]], dict[int, list[dict]]] | None:
        """(baseline per-block losses, bases per calibration draw {sink setting: basis}, crystallinity {sink setting:
        per-head statistics}) from the checkpoint, or None: the run computes them (and calls ``save_baseline``)."""
        return self._baseline

    def save_baseline(self, losses: torch.Tensor, bases: Sequence[Mapping[int, ResidualBasis]],
                      crystallinity: Mapping[int, list[dict]]) -> None:
        """The first unit finished: keep it (main rank), baseline.pt before the state.json that names it."""
        self._baseline = (losses, list(bases), dict(crystallinity))
        if not distributed.is_main():
            return
        payload = {"losses": losses.detach().cpu(), "crystallinity": dict(crystallinity),
                   "bases": [{n: {k: getattr(b, k) for k in ("basis", "eigenvalues", "cumulative_variance", "r90")}
                              for n, b in per_sink.items()} for per_sink in bases]}
        os.makedirs(self.path, exist_ok=True)
        atomic_write(self.path, BASELINE_FILE, lambda temp: torch.save(payload, temp))
        self._state["baseline"] = True
        self._write_state()

    def losses(self, key: str, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        """The per-block losses of configuration ``key``: the checkpoint's, or ``compute()`` (then kept)."""
        if key in self._losses:
            return self._losses[key].clone()
        value = compute()
        self._losses[key] = value
        if distributed.is_main():
            self._state["losses"][key] = {"dtype": str(value.dtype).removeprefix("torch."),
                                          "values": value.detach().cpu().tolist()}
            self._write_state()
        return value

    def _write_state(self) -> None:
        self._state["timings"] = dict(self._timings or {})
        text = json.dumps(self._state, indent=1)

        def write(temp: str) -> None:
            with open(temp, "w", encoding="utf-8") as f:
                f.write(text)

        os.makedirs(self.path, exist_ok=True)
        atomic_write(self.path, STATE_FILE, write)

    # -- after the run (the CLI, on the main rank) --------------------------------------------------------------
    def kept(self) -> tuple[int, int] | None:
        """(configurations done, of how many) the checkpoint on disk holds, or None where there is none."""
        try:
            state = read_state(self.path)
        except NqpqError:
            return None
        return None if state is None else (done_count(state), int(state.get("total", 0)))

    def remove(self) -> None:
        """The run's results are written: the checkpoint goes, state.json first (a removal cut short leaves no
        checkpoint that a later run would offer to resume)."""
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(self.path, STATE_FILE))
        shutil.rmtree(self.path, ignore_errors=True)

    def discard_incomplete(self) -> None:
        """After an interrupt: a directory without a state.json (nothing finished, or an interrupt between
        baseline.pt and its state.json) keeps nothing resumable, so it goes."""
        if self.kept() is None:
            shutil.rmtree(self.path, ignore_errors=True)


def interrupted_line(checkpoint: Checkpoint | None, err: BaseException) -> str:
    """The CLI's one line after an interrupt: what was kept, and how to finish."""
    what = "terminated (SIGTERM)" if getattr(err, "signum", signal.SIGINT) == signal.SIGTERM else "interrupted"
    kept = checkpoint.kept() if checkpoint is not None else None
    if kept is None:
        return f"nqpq: {what}; nothing written"
    done, total = kept
    return (f"nqpq: {what}; kept {done} of {total} configurations in {checkpoint.path}: rerun the same command with "
            "--resume to finish it")

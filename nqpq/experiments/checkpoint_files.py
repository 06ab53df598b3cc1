"""What the checkpoint of an interrupted sweep or scan (``nqpq.experiments.resume``) is made of: where it lives and
its files' names, state.json read back, each file written atomically, the settings it compares, the fingerprints of
the model's weights and of the token ids, the first difference between two JSON values (what a refused resume
names), and rank 0's word passed to every rank under torchrun."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict
from typing import Any

import torch

from ..errors import NqpqError
from . import distributed
from .config import SweepConfig

CHECKPOINT_DIR = ".nqpq-partial"
STATE_FILE = "state.json"
BASELINE_FILE = "baseline.pt"
FORMAT_VERSION = 1
# Settings that only say how the run is shown or where it is written, not what it computes.
NOT_COMPARED = ("progress", "out")


def checkpoint_path(out_dir: str) -> str:
    """Where the checkpoint of a run writing ``out_dir`` lives: inside it."""
    return os.path.join(out_dir, CHECKPOINT_DIR)


def flag_view(cfg: SweepConfig) -> dict:
    """The settings a checkpoint must share with its resume, as JSON holds them (tuples as lists)."""
    return as_json({k: v for k, v in asdict(cfg).items() if k not in NOT_COMPARED})


def as_json(obj: Any) -> Any:
    """``obj`` as JSON reads it back (tuples as lists; what JSON cannot hold as its repr)."""
    return json.loads(json.dumps(obj, default=repr))


def nqpq_version() -> str:
    """The running nqpq's version, which a checkpoint must share with its resume."""
    from ..version import __version__

    return __version__


def weights_fingerprint(model: torch.nn.Module) -> str:
    """A sha256 over every parameter's and buffer's name, shape, dtype, float64 sum and norm (on its own device: no
    copy to the host). Sums are rounded to 10 significant digits so that a different summation order (another
    thread count) cannot change it; a changed checkpoint changes it. Offloaded (meta) tensors count by shape only."""
    digest = hashlib.sha256()
    with torch.no_grad():
        tensors = list(model.named_parameters()) + list(model.named_buffers())
        for name, t in tensors:
            digest.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
            if t.device.type == "meta" or t.numel() == 0:
                continue
            x = t if t.is_floating_point() else t.to(torch.float64)
            total = torch.sum(x, dtype=torch.float64).item()
            norm = torch.linalg.vector_norm(x, dtype=torch.float64).item()
            digest.update(f"{total:.10e}:{norm:.10e}".encode())
    return digest.hexdigest()


def tokens_fingerprint(tokens: Sequence[torch.Tensor]) -> str:
    """A sha256 of the token ids the run scores and calibrates on (each block tensor in order)."""
    digest = hashlib.sha256()
    for t in tokens:
        digest.update(f"{tuple(t.shape)}".encode())
        digest.update(t.detach().to("cpu", torch.int64).contiguous().numpy().tobytes())
    return digest.hexdigest()


def first_difference(old: Any, new: Any, path: str = "") -> tuple[str, Any, Any] | None:
    """The first (path, old, new) where two JSON values differ, in the new value's key order."""
    if isinstance(old, dict) and isinstance(new, dict):
        for key in list(new) + [k for k in old if k not in new]:
            if key not in old or key not in new:
                return f"{path}{key}", old.get(key, "(absent)"), new.get(key, "(absent)")
            found = first_difference(old[key], new[key], f"{path}{key}.")
            if found:
                return found
        return None
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        for i, (a, b) in enumerate(zip(old, new)):
            found = first_difference(a, b, f"{path}{i}.")
            if found:
                return found
        return None
    return None if old == new else (path.rstrip("."), old, new)


def short_repr(value: Any, limit: int = 60) -> str:
    """``repr(value)``, cut to ``limit`` characters for a one-line error."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def atomic_write(directory: str, name: str, write: Callable[[str], None]) -> None:
    """``write(temp path)`` then an ``os.replace`` onto ``directory/name``: the file is the old one or the new one."""
    fd, temp = tempfile.mkstemp(dir=directory, prefix=f".{name}.")
    os.close(fd)
    try:
        write(temp)
        with open(temp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(temp, os.path.join(directory, name))
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(temp)


def broadcast(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (torchrun); the object itself in one process."""
    import torch.distributed as dist

    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return obj
    box = [obj if distributed.is_main() else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def read_state(path: str) -> dict | None:
    """The checkpoint's state.json, or None where there is none; NqpqError where it cannot be read."""
    file = os.path.join(path, STATE_FILE)
    try:
        with open(file, encoding="utf-8") as f:
            state = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise NqpqError(f"{file} cannot be read as JSON ({err}): remove {path} to start afresh") from err
    if not isinstance(state, dict) or state.get("format") != FORMAT_VERSION:
        raise NqpqError(f"{file} is not a checkpoint this nqpq reads (format {FORMAT_VERSION}): remove {path} to "
                        "start afresh")
    return state


def done_count(state: Mapping) -> int:
    """How many configurations (the baseline and calibration counting as one) a state holds."""
    return int(bool(state.get("baseline"))) + len(state.get("losses", {}))

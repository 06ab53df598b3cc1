"""Where each part of a model computes, for models spread over devices with a device map (accelerate).

A model loaded with ``from_pretrained(device_map=...)`` carries accelerate's ``AlignDevicesHook`` on its
modules: each hook names the module's *execution device* and moves the module's inputs there (and, for
offloaded modules, its weights, which otherwise sit on the ``meta`` device). A parameter's ``.device`` is
therefore not where a module computes (``meta`` for a disk-offloaded layer; ``cpu`` for a CPU-offloaded
one that runs on ``cuda:0``). Everything nqpq places by hand (residual bases, recorded hidden states, the
LM head's inputs) asks ``execution_device`` instead. On a model without hooks it is the parameters' device.

Also here: parsing and checking ``--device-map`` / ``--max-memory`` (no model needed), and the refusal of
tensor-parallel models.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Iterator, Mapping

import torch
from torch import nn

from ..errors import NqpqError

DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")
# What a device-map entry may name: a GPU index, cpu, disk, or an explicit torch device (accelerate's own set).
_PLACE_RE = re.compile(r"cpu|disk|cuda(:\d+)?|mps|xpu(:\d+)?")
_SIZE_RE = re.compile(r"\d+(\.\d+)?\s*([KMGT]i?B)?", re.IGNORECASE)


def _as_device(dev: object) -> torch.device:
    if isinstance(dev, torch.device):
        return dev
    if isinstance(dev, int):  # accelerate names GPUs by index
        return torch.device("cuda", dev)
    return torch.device(str(dev))


def execution_device(module: nn.Module) -> torch.device:
    """The device ``module`` computes on: its accelerate hook's execution device, else its first real tensor's."""
    hook = getattr(module, "_hf_hook", None)
    for h in getattr(hook, "hooks", (hook,)):  # a SequentialHook holds several
        dev = getattr(h, "execution_device", None)
        if dev is not None:
            return _as_device(dev)
    for t in (*module.parameters(), *module.buffers()):
        if t.device.type != "meta":
            return t.device
    raise NqpqError(f"{type(module).__name__}: every weight is on the meta device and no accelerate hook says where "
                    "it computes; load the model with its weights (or through from_pretrained(device_map=...))")


def input_device(model: nn.Module) -> torch.device:
    """Where the token ids go: the input embedding's execution device (the first device of a device map)."""
    return execution_device(model.get_input_embeddings())


def compute_devices(model: nn.Module) -> list[torch.device]:
    """Every device some module of ``model`` computes on, in order of first use (``cpu`` for offloaded ones)."""
    seen: dict[torch.device, None] = {}
    for module in model.modules():
        hooked = getattr(module, "_hf_hook", None) is not None
        if hooked or any(True for _ in module.parameters(recurse=False)):
            seen.setdefault(execution_device(module), None)
    return list(seen) or [input_device(model)]


@contextlib.contextmanager
def weights_on_device(module: nn.Module) -> Iterator[None]:
    """Within the context, an offloaded module's weights are real tensors on its execution device (accelerate
    loads them and puts them back on leaving); a module without offloaded weights is left alone.

    Needed wherever nqpq reads a weight itself instead of calling the module (``lm_losses`` reads the LM head).
    """
    hook = getattr(module, "_hf_hook", None)
    if hook is None or not getattr(hook, "offload", False):
        yield
        return
    from accelerate.utils import align_module_device  # present: it installed the hook

    with align_module_device(module):
        yield


def refuse_tensor_parallel(model: nn.Module) -> None:
    """Tensor-parallel models (loaded with ``tp_plan``: heads split across ranks, DTensor weights) are refused.

    Every model class carries a default ``_tp_plan``; what marks a model as really split is ``tp_size`` or a
    device mesh set by ``from_pretrained(tp_plan=...)``, or a DTensor parameter.
    """
    from torch.distributed.tensor import DTensor

    split = getattr(model, "tp_size", None) or getattr(model, "_device_mesh", None) is not None
    if split or any(isinstance(p, DTensor) for p in model.parameters()):
        raise NqpqError("tensor-parallel models (tp_plan, DTensor weights) are not supported: load the model "
                        "with a device map instead (--device-map auto, or from_pretrained(device_map='auto'))")


def parse_device_map(value: str | Mapping | None) -> str | dict | None:
    """``--device-map``: a strategy name, a JSON file mapping module names to devices, or a dict (Python API).

    Returns the strategy or the checked dict; bad input raises a one-line ``NqpqError``.
    """
    if value is None:
        return None
    if isinstance(value, Mapping):
        return _check_map(dict(value), "device_map")
    value = str(value)
    if value in DEVICE_MAP_STRATEGIES:
        return value
    if not value.endswith(".json") and not os.path.isfile(value):
        raise NqpqError(f"--device-map {value!r}: use one of {', '.join(DEVICE_MAP_STRATEGIES)} or a JSON file "
                        "mapping module names to devices (0, 1, ..., \"cpu\", \"disk\")")
    try:
        with open(value, encoding="utf-8") as f:
            mapping = json.load(f)
    except (OSError, UnicodeDecodeError) as err:
        raise NqpqError(f"--device-map {value!r}: cannot read the file: {err}") from err
    except json.JSONDecodeError as err:
        raise NqpqError(f"--device-map {value!r}: not valid JSON: {err}") from err
    if not isinstance(mapping, dict):
        raise NqpqError(f"--device-map {value!r}: the JSON must be an object mapping module names to devices, "
                        f"got a {type(mapping).__name__}")
    return _check_map(mapping, f"--device-map {value!r}")


def _check_map(mapping: dict, what: str) -> dict:
    if not mapping:
        raise NqpqError(f"{what}: the device map is empty")
    for name, place in mapping.items():
        if not isinstance(name, str):
            raise NqpqError(f"{what}: module names must be strings, got {name!r}")
        ok = (isinstance(place, int) and not isinstance(place, bool) and place >= 0) or (
            isinstance(place, str) and _PLACE_RE.fullmatch(place))
        if not ok:
            raise NqpqError(f"{what}: {name!r} -> {place!r}: a device is a GPU index (0, 1, ...), \"cpu\", \"disk\" "
                            "or \"cuda:N\"")
    if not torch.cuda.is_available():
        gpu = [n for n, p in mapping.items() if isinstance(p, int) or str(p).startswith("cuda")]
        if gpu:
            raise NqpqError(f"{what}: {gpu[0]!r} -> {mapping[gpu[0]]!r} needs CUDA, which this machine does not "
                            "have (use \"cpu\" or \"disk\")")
    return mapping


def parse_max_memory(value: str | Mapping | list | tuple | None) -> dict | None:
    """``--max-memory``: ``0=70GiB 1=70GiB cpu=200GiB`` (one or more ``DEVICE=SIZE``) or a JSON object, or a
    dict (Python API). Sizes are bytes or accelerate's strings (``70GiB``, ``500MB``)."""
    if value is None:
        return None
    if isinstance(value, Mapping):
        items = list(value.items())
    else:
        words = [value] if isinstance(value, str) else list(value)
        text = " ".join(str(w) for w in words).strip()
        if text.startswith("{"):
            try:
                loaded = json.loads(text)
            except json.JSONDecodeError as err:
                raise NqpqError(f"--max-memory: not valid JSON: {err}") from err
            if not isinstance(loaded, dict):
                raise NqpqError("--max-memory: the JSON must be an object mapping devices to sizes")
            items = list(loaded.items())
        else:
            items = []
            for word in text.split():
                key, sep, size = word.partition("=")
                if not sep or not key or not size:
                    raise NqpqError(f"--max-memory {word!r}: write DEVICE=SIZE, e.g. 0=70GiB cpu=200GiB")
                items.append((key, size))
    if not items:
        raise NqpqError("--max-memory: give at least one DEVICE=SIZE")
    out: dict = {}
    for key, size in items:
        key = str(key)
        dev: int | str = int(key) if key.isdigit() else key
        if isinstance(dev, str) and dev not in ("cpu", "disk", "mps"):
            raise NqpqError(f"--max-memory {key!r}: a device is a GPU index (0, 1, ...), cpu or disk")
        if isinstance(size, bool) or not (isinstance(size, int) and size >= 0 or
                                          isinstance(size, str) and _SIZE_RE.fullmatch(size.strip())):
            raise NqpqError(f"--max-memory {key}={size!r}: a size is a byte count or e.g. 70GiB, 500MB")
        size = size.strip() if isinstance(size, str) else size
        out[dev] = int(size) if isinstance(size, str) and size.isdigit() else size  # accelerate wants bytes as int
    return out

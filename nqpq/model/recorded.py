"""The recorded arguments of a model's layer calls, as ``PrefixRunner`` keeps them: compared (one copy serves equal
arguments), copied (a record the body cannot change in place), moved to a layer's device, and the entries a call
wrote into its mapping arguments (Gemma 3n's shared key/value states)."""

from __future__ import annotations

from collections.abc import MutableMapping

import torch
from torch import Tensor


def same_value(a: object, b: object, memo: dict | None = None) -> bool:
    """Whether two recorded layer arguments are equal (tensors by value), so one copy can serve both.

    ``memo`` remembers tensor pairs already compared: the layers of a model usually share one mask object.
    """
    if a is b:
        return True
    memo = {} if memo is None else memo
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        if not (isinstance(a, Tensor) and isinstance(b, Tensor)):
            return False
        key = (id(a), id(b))
        if key not in memo:
            memo[key] = (a.shape == b.shape and a.dtype == b.dtype and a.device == b.device
                         and bool(torch.equal(a, b)))
        return memo[key]
    if isinstance(a, (tuple, list)) and type(a) is type(b):
        return len(a) == len(b) and all(same_value(x, y, memo) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same_value(a[k], b[k], memo) for k in a)
    try:
        return type(a) is type(b) and bool(a == b)
    except (RuntimeError, TypeError, ValueError):
        return False


def mappings_before(args: tuple, kwargs: dict) -> list[tuple[int | str, MutableMapping, dict]]:
    """The mapping arguments of a layer call (Gemma 3n's shared key/value states), with a copy of their entries."""
    found = [(k, v) for k, v in enumerate(args)] + list(kwargs.items())
    return [(where, v, dict(v)) for where, v in found if isinstance(v, MutableMapping)]


def writes_since(before: list, args: tuple, kwargs: dict) -> list[tuple[int | str, dict]]:
    """What a layer call wrote into its mapping arguments (new or replaced entries), copied."""
    out = []
    for where, mapping, old in before:
        entries = {k: clone_tree(v) for k, v in mapping.items() if k not in old or old[k] is not v}
        if entries:
            out.append((where, entries))
    return out


def clone_tree(obj: object, device: torch.device | None = None) -> object:
    """``obj`` with every tensor copied (onto ``device`` if given): a record the body cannot change in place."""
    if isinstance(obj, Tensor):
        return obj.to(device if device is not None else obj.device, copy=True)
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return type(obj)(*(clone_tree(x, device) for x in obj))
    if isinstance(obj, (tuple, list)):
        return type(obj)(clone_tree(x, device) for x in obj)
    if isinstance(obj, dict):
        return {k: clone_tree(v, device) for k, v in obj.items()}
    return obj


def continues(hidden: object, previous: Tensor) -> bool:
    """Whether a layer's input is the previous layer's output (the same values; a device map may have moved it)."""
    if hidden is previous:
        return True
    if not isinstance(hidden, Tensor) or hidden.shape != previous.shape or hidden.dtype != previous.dtype:
        return False
    return bool(torch.equal(hidden.to(previous.device), previous))


def to_device(obj: object, device: torch.device, memo: dict) -> object:
    """``obj`` (a layer argument: tensors, possibly in tuples, lists and dicts) with its tensors on ``device``;
    ``memo`` keeps one copy per (tensor, device). Tensors already there are returned as they are."""
    if isinstance(obj, Tensor):
        key = (id(obj), device)
        if key not in memo:
            memo[key] = obj.to(device)
        return memo[key]
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # a namedtuple takes its fields as arguments
        return type(obj)(*(to_device(x, device, memo) for x in obj))
    if isinstance(obj, (tuple, list)):
        return type(obj)(to_device(x, device, memo) for x in obj)
    if isinstance(obj, dict):
        return {k: to_device(v, device, memo) for k, v in obj.items()}
    return obj

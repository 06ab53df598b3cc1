"""What a user's choice of layers (and of query heads per layer) means: the one reader every entry point uses.

``layer_heads`` reads a list of layers (every head of each) or a mapping layer → query heads; ``layer_indices`` a
list of layers where heads have no place (``--layers``); ``as_index`` an integer the way every count and index is
read (numpy and torch integer scalars accepted, bools refused). Re-exported by ``nqpq.model.parts``.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterable, Mapping

import torch
from torch import Tensor

from ..errors import LayerChoiceError


def as_index(value: object, what: str) -> int:
    """``value`` as a Python int, accepting numpy/torch integer scalars; bools and non-integers are refused."""
    is_bool = isinstance(value, bool) or (isinstance(value, Tensor) and value.dtype == torch.bool)
    try:
        if not is_bool:
            return operator.index(value)  # int, numpy integer, one-element integer tensor; numpy bool raises
    except TypeError:
        pass
    raise ValueError(f"{what} must be an int, got {type(value).__name__}")


def layer_heads(layers: object, n_layers: int | None = None, n_heads: Callable[[int], int] | None = None,
                what: str = "layers") -> dict[int, tuple[int, ...] | None]:
    """A choice of layers, and of query heads per layer, as ``{layer: heads}``: ``heads`` a sorted tuple of distinct
    query-head indices, or None for every head of the layer; ``LayerChoiceError`` (one line naming what was passed)
    for anything that would be read as something other than what it says.

    The one place every entry point reads a choice of layers (``crystallize``, ``calibrate``, ``SweepConfig.layers``,
    ``--layers``). Two forms: a list of layer indices (every head of each), or a mapping layer → query heads
    (``{25: [0, 1]}``: heads 0 and 1 of layer 25, the others plain attention). Layer indices are in
    ``0..n_layers - 1`` (any index >= 0 when ``n_layers`` is None, before the model is known); head indices in
    ``0..n_heads(layer) - 1`` (any index >= 0 when ``n_heads`` is None). Refused: a string, a single index, entries
    of a list that are themselves sequences (heads belong in a mapping), bools, non-integers, negative indices (not
    counted from the end), repeats (of a layer, or of a head within a layer), none at all (no layer, or a layer with
    an empty list of heads), and indices past the model's last layer or a layer's last query head. numpy and torch
    integer scalars are ints; any other iterable of ints (a tuple, a range, a 1-D integer tensor) is accepted.
    """
    if isinstance(layers, Mapping):
        items = list(layers.items())
        chosen = _layer_list([key for key, _ in items], n_layers, what)
        return {li: _head_list(heads, li, n_heads, what) for li, (_, heads) in zip(chosen, items, strict=True)}
    return dict.fromkeys(_layer_list(layers, n_layers, what))


def layer_indices(layers: object, n_layers: int | None = None, what: str = "layers") -> tuple[int, ...]:
    """``layers`` as a tuple of distinct layer indices (``layer_heads``' rules for a list), where a choice of
    heads has no place (``--layers``, ``SweepConfig.layers``: heads are ``--heads``): a mapping is refused."""
    if isinstance(layers, Mapping):
        raise LayerChoiceError(f"{what} {dict(layers)!r}: pass a list of layer indices here (a choice of heads "
                               "goes to crystallize / calibrate as a mapping, or to the sweep as --heads)")
    return tuple(layer_heads(layers, n_layers, what=what))


def _layer_list(layers: object, n_layers: int | None, what: str) -> tuple[int, ...]:
    """A list of layer indices checked (``layer_heads``' rules)."""
    if isinstance(layers, (str, bytes)) or not isinstance(layers, Iterable) or getattr(layers, "ndim", 1) == 0:
        raise LayerChoiceError(f"{what} {layers!r}: pass a list of layer indices, e.g. [9, 10, 11], or a mapping "
                               "layer -> query heads, e.g. {25: [0, 1]}")
    given = list(layers)
    shown = [int(x) if isinstance(x, Tensor) and x.dim() == 0 and not x.is_floating_point() else x for x in given]
    out = []
    for entry in given:
        # A 1-D tensor or array of one element would pass operator.index: it is a nested sequence all the same.
        if isinstance(entry, (str, bytes, Mapping)) or (isinstance(entry, Iterable) and getattr(entry, "ndim", 1)):
            raise LayerChoiceError(f"{what} {shown!r}: entry {entry!r} is not a layer index; to choose heads pass a "
                                   "mapping layer -> query heads, e.g. {25: [0, 1]}")
        try:
            out.append(as_index(entry, "layer index"))
        except ValueError as err:
            raise LayerChoiceError(f"{what} {shown!r}: {err}") from None
    if not out:
        raise LayerChoiceError(f"{what}: choose at least one layer")
    negative = [li for li in out if li < 0]
    if negative:
        raise LayerChoiceError(f"{what} {negative}: layer indices start at 0 (they are not counted from the end)")
    if n_layers is not None:
        beyond = [li for li in out if li >= n_layers]
        if beyond:
            raise LayerChoiceError(f"{what} {beyond}: the model has layers 0..{n_layers - 1}")
    if len(set(out)) != len(out):
        raise LayerChoiceError(f"{what} repeats an index: {out}")
    return tuple(out)


def _head_list(heads: object, layer: int, n_heads: Callable[[int], int] | None, what: str) -> tuple[int, ...]:
    """The query heads chosen for ``layer`` checked (``layer_heads``' rules), sorted."""
    where = f"{what}: the heads of layer {layer}"
    if isinstance(heads, (str, bytes, Mapping)) or not isinstance(heads, Iterable) or getattr(heads, "ndim", 1) == 0:
        raise LayerChoiceError(f"{where} ({heads!r}) must be a list of query-head indices, e.g. [0, 1]")
    out = []
    for entry in heads:
        if isinstance(entry, Iterable) and getattr(entry, "ndim", 1):
            raise LayerChoiceError(f"{where}: entry {entry!r} is not a head index")
        try:
            out.append(as_index(entry, "head index"))
        except ValueError as err:
            raise LayerChoiceError(f"{where}: {err}") from None
    if not out:
        raise LayerChoiceError(f"{where}: an empty list chooses no head (leave the layer out instead)")
    negative = [h for h in out if h < 0]
    if negative:
        raise LayerChoiceError(f"{where} {negative}: head indices start at 0")
    if n_heads is not None:
        count = n_heads(layer)
        beyond = [h for h in out if h >= count]
        if beyond:
            raise LayerChoiceError(f"{where} {beyond}: layer {layer} has query heads 0..{count - 1}")
    if len(set(out)) != len(out):
        raise LayerChoiceError(f"{where} repeats a head: {out}")
    return tuple(sorted(out))

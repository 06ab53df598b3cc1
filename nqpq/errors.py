"""The user-facing error every nqpq module raises (the CLI prints its one line and exits 2), and its one-line form."""

from __future__ import annotations


class NqpqError(Exception):
    """A user-facing error: the CLI prints its message (no traceback) and exits non-zero."""


def one_line(err: BaseException) -> str:
    """The first non-blank line of ``err``'s message (its type name when it has none): errors stay one line."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__


class LayerChoiceError(NqpqError, ValueError):
    """``layers`` that nqpq would read differently from what they mean (a mapping of heads, nested lists, repeats,
    bools, non-integers, indices out of range): one line naming what was passed. A ``ValueError`` too, as every
    other bad argument of ``crystallize`` is."""


class UnsupportedModelError(NqpqError):
    """The model cannot be crystallized: not decoder-only, attention outside the interface, or an unsupported
    attention feature."""


"""nqpq's version: one source of truth for ``nqpq --version``, the package metadata (pyproject's dynamic version) and
the checkpoints a resumed run must match. A module of its own, at the floor of the layers, so that any layer may
read it without importing the package's face."""

__version__ = "0.1.0"

"""Benchmarks: ``python -m benchmarks.attention`` (kernel) and ``python -m benchmarks.sweep`` (EXP-Q03 end to end)."""

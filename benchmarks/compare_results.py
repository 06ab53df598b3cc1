"""Two runs' results.json (sweep, scan or eval), compared exactly apart from what differs from run to run: the
timings and the output folder (``config.out``). A refactor that claims "results unchanged" proves it with this:
run the same command on the commit before and after (issue 33's: a demo sweep with two sink settings, a scan of a
saved tiny Llama), e.g.

    python -m nqpq sweep --demo --n-blocks 8 --seq-len 64 --calib-blocks 2 --d-r 4 16 --sink-tokens 0 1 \
        --device cpu --out BEFORE
    python -m benchmarks.compare_results BEFORE AFTER

Prints each differing path (``sinks[1].curve[0].ppl``, ...) with both values and exits 1, or says "identical"
and exits 0. Floats are compared exactly (the same computation on the same machine gives the same bits); a
residual basis file beside each (``basis.pt``) is compared tensor by tensor, exactly, when both runs wrote one.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

# What a rerun of the same command changes by design.
RUN_SPECIFIC = {("timings",), ("config", "out")}


def differences(before: object, after: object, path: tuple = ()) -> list[str]:
    """Every path where ``before`` and ``after`` (parsed JSON) differ, skipping ``RUN_SPECIFIC``."""
    if path in RUN_SPECIFIC:
        return []
    where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path).lstrip(".") or "(top)"
    if isinstance(before, dict) and isinstance(after, dict):
        out = []
        for key in sorted(set(before) | set(after)):
            if key not in before or key not in after:
                if (*path, key) not in RUN_SPECIFIC:
                    name = f"{where}.{key}" if path else str(key)
                    out.append(f"{name}: only in {'after' if key not in before else 'before'}")
                continue
            out += differences(before[key], after[key], (*path, key))
        return out
    if isinstance(before, list) and isinstance(after, list):
        if len(before) != len(after):
            return [f"{where}: {len(before)} entries before, {len(after)} after"]
        return [d for i, (b, a) in enumerate(zip(before, after)) for d in differences(b, a, (*path, i))]
    same = before == after or (isinstance(before, float) and isinstance(after, float)
                               and math.isnan(before) and math.isnan(after))
    return [] if same and type(before) is type(after) else [f"{where}: {before!r} before, {after!r} after"]


def basis_differences(before: Path, after: Path) -> list[str]:
    """The tensors of two ``ResidualBasis.save`` files that are not bit for bit equal."""
    import torch

    b, a = torch.load(before, weights_only=True), torch.load(after, weights_only=True)
    out = []
    for field in sorted(set(b) | set(a)):
        if field not in b or field not in a or set(b[field]) != set(a[field]):
            out.append(f"basis.pt {field}: the layers differ")
            continue
        out += [f"basis.pt {field}[{li}] differs" for li in sorted(b[field])
                if not torch.equal(b[field][li], a[field][li])]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("before", type=Path, help="results.json of the first run (or its --out folder)")
    parser.add_argument("after", type=Path, help="results.json of the second run (or its --out folder)")
    args = parser.parse_args(argv)
    paths = [p / "results.json" if p.is_dir() else p for p in (args.before, args.after)]
    found = differences(*(json.loads(p.read_text()) for p in paths))
    bases = [p.parent / "basis.pt" for p in paths]
    if all(b.exists() for b in bases):
        found += basis_differences(*bases)
    for line in found:
        print(line)
    print("identical (timings and config.out aside)" if not found else f"{len(found)} difference(s)")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())

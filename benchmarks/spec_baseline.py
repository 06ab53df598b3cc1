"""The spec's own EXP-Q03 implementation, run as the baseline of the sweep benchmark.

We do not copy the spec: we import ``../shared/spec/exp_q03_residual.py`` as it is
and supply the ``crystallize.perplexity`` it imports (defined in its closing note).
Its timing loop mirrors ``run_exp_q03`` minus model loading and printing.
"""

from __future__ import annotations

import importlib.util
import math
import os
import sys
import time
import types
from pathlib import Path

import torch

DEFAULT_SPEC = Path(__file__).resolve().parents[2] / "shared" / "spec" / "exp_q03_residual.py"


def spec_path() -> Path:
    return Path(os.environ.get("NQPQ_SPEC", DEFAULT_SPEC))


@torch.no_grad()
def spec_perplexity(model, ids, seq_len, device, n_blocks):
    """The spec's perplexity: one block at a time, labels = the block, exp(mean of block losses)."""
    nb = min(n_blocks, ids.numel() // seq_len)
    losses = []
    for b in range(nb):
        blk = ids[b * seq_len:(b + 1) * seq_len].unsqueeze(0).to(device)
        losses.append(model(input_ids=blk, labels=blk).loss.item())
    return math.exp(sum(losses) / len(losses))


def load_spec(path: str | os.PathLike | None = None):
    """Import the spec module from ``path`` (default: ``spec_path()``), or return None if the file is not there
    (fresh clone without ../shared; the tests import the copy in tests/data)."""
    path = Path(path) if path is not None else spec_path()
    if not path.is_file():
        return None
    sys.modules.setdefault("crystallize", types.SimpleNamespace(perplexity=spec_perplexity))
    spec = importlib.util.spec_from_file_location("exp_q03_spec", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_spec_sweep(spec, model, ids, *, layers, d_r_sweep, n_blocks, seq_len, calib_blocks, device) -> dict:
    """The body of the spec's ``run_exp_q03`` on a given model and token ids; returns numbers and time."""
    sync = torch.cuda.synchronize if str(device).startswith("cuda") else (lambda: None)
    sync()
    t0 = time.perf_counter()
    d_head = model.config.n_embd // model.config.n_head
    ppl_fp = spec_perplexity(model, ids, seq_len, device, n_blocks)
    basis, spectrum = spec.collect_residual_svd(model, ids, seq_len, device, layers, n_blocks=calib_blocks)
    with spec.ResidualPatch(model, layers, basis, 0, "top1"):
        ppl_a = spec_perplexity(model, ids, seq_len, device, n_blocks)
    with spec.ResidualPatch(model, layers, basis, d_head, "full"):
        ppl_b = spec_perplexity(model, ids, seq_len, device, n_blocks)
    curve = []
    for d_r in d_r_sweep:
        with spec.ResidualPatch(model, layers, basis, d_r, "lowrank"):
            curve.append((d_r, spec_perplexity(model, ids, seq_len, device, n_blocks)))
    sync()
    return {"ppl_baseline": ppl_fp, "ppl_top1": ppl_a, "ppl_full": ppl_b, "curve": curve,
            "spectrum": spectrum, "seconds": time.perf_counter() - t0}

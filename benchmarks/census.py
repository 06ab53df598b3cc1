"""Every causal LM the installed transformers ships, tried as a new user would: exact, or refused by name.

    python -m benchmarks.census                       # every family, writes benchmarks/results/census.md
    python -m benchmarks.census --families llama gpt2 --out -   # a few, table to stdout

For each entry of ``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`` a tiny random config is built from the family's own
defaults (shrunk: hidden 64, 4 heads of 16, at most 6 layers, 4 experts, ...), the model is built from it in
float32 and run on 2 × 24 random tokens, no mask, under eager (at the default weight scale and with the
attention weights made sharper) and sdpa (default scale). A family whose forward takes more than a row of tokens
is fed what it takes (``model_inputs``; Musicgen: one row per codebook; the Gemma 4 assistants: their target
model's state). Outcomes:

- EXACT: full mode on the last attention layer and on every attention layer gives the model's logits
  (rel ≤ 1e-5, max |Δ| / max |logit|); the prefix replay (``PrefixRunner``, every layer from the first attention
  layer up, crystallized in full mode) gives the losses of the model's own logits; top-1 and low-rank on the last
  attention layer equal a float64 per-head computation on the q, k, v that layer handed its attention function.
- REFUSED: nqpq declined with a one-line reason (quoted).
- WRONG: it ran and differed (which check, by how much).
- CRASH: an exception that is not nqpq's refusal (type and message), or the worker died or hung.
- UNBUILT: the census could not build the family (its config, its model, or the model's own forward failed):
  not a verdict on nqpq.

Families run in worker subprocesses (one family after another; a worker that dies or hangs is replaced and the
family charged a CRASH), ``--jobs`` at a time.
"""

from __future__ import annotations

import argparse
import json
import os
import selectors
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

# The tiny models and the checks (tests use them too); this module runs them over every family and writes the table.
from nqpq.model.census import TOL, crystallized_checks, logits_of, model_inputs, sharpen
from nqpq.model.tiny_models import VOCAB, model_class, tiny_config

T, B = 24, 2
FAMILY_TIMEOUT_S = 180.0
RESULTS = Path(__file__).resolve().parent / "results" / "census.md"
OUTCOMES = ("EXACT", "REFUSED", "WRONG", "CRASH", "UNBUILT")

def _nqpq_refusal(err: BaseException) -> bool:
    """Whether ``err`` is nqpq declining with a message: an NqpqError, or a ValueError/TypeError raised by nqpq's
    own code (a checked argument, an unsupported mask), never one from transformers or torch."""
    from nqpq.errors import NqpqError

    if isinstance(err, NqpqError):
        return True
    if not isinstance(err, (ValueError, TypeError)):
        return False
    frames = traceback.extract_tb(err.__traceback__)
    repo = Path(__file__).resolve().parent.parent
    return bool(frames) and any(Path(frames[-1].filename).resolve().is_relative_to(repo / package)
                                for package in ("nqpq", "nqpq_kernels"))


def one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text[:400]


class _NoTimm:
    """Stands in for ``AutoModel`` in a multimodal model's module while it is built: a sub-model whose class needs
    timm (not installed here: it pulls torchvision; Gemma 3n's vision tower) is built as an empty module that
    refuses to run. The census scores text only, so the tower is never called; everything else is the real code."""

    def __init__(self, auto):
        self.auto = auto

    def from_config(self, config, *args, **kwargs):
        import torch

        try:
            return self.auto.from_config(config, *args, **kwargs)
        except ImportError as err:
            if "timm" not in str(err):
                raise

            class TimmTowerNotBuilt(torch.nn.Module):
                def forward(self, *args, **kwargs):
                    raise RuntimeError(f"{type(config).__name__}'s tower was not built (timm is not installed)")

            return TimmTowerNotBuilt()


def _build(model_type: str, config):
    """The family's model from ``config`` (eager attention, seed 0); a timm tower (only under a multimodal wrapper)
    left unbuilt when timm is missing. Returns (model, the note for the table's structure column)."""
    import torch

    cls = model_class(model_type)
    module = sys.modules[cls.__module__]
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            return cls._from_config(config, attn_implementation="eager"), ""
    except ImportError as err:
        if "timm" not in str(err) or not hasattr(module, "AutoModel"):
            raise
    auto = module.AutoModel
    module.AutoModel = _NoTimm(auto)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            return cls._from_config(config, attn_implementation="eager"), "vision tower not built (needs timm)"
    finally:
        module.AutoModel = auto


def census_family(model_type: str) -> dict:
    """One family's outcome: {family, cls, outcome, detail, attn_layers, errors}."""
    import torch
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    from nqpq.model.parts import model_parts

    row = {"family": model_type, "cls": MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type], "outcome": None,
           "detail": "", "structure": "", "errors": {}}
    try:
        config = tiny_config(model_type)
    except Exception as err:  # noqa: BLE001
        return {**row, "outcome": "UNBUILT", "detail": f"config: {type(err).__name__}: {one_line(err)}"}
    try:
        model, note = _build(model_type, config)
        model = model.float().eval()
        head = model.get_output_embeddings()
        vocab = head.weight.shape[0] if isinstance(getattr(head, "weight", None), torch.Tensor) else VOCAB
        # Musicgen's decoders take one row of codes per codebook: [B · num_codebooks, T] (their documented shape).
        rows = B * getattr(config, "num_codebooks", 1)
        ids = torch.randint(3, min(vocab, VOCAB), (rows, T), generator=torch.Generator().manual_seed(0))
        logits_of(model, model_inputs(model, ids))
    except Exception as err:  # noqa: BLE001
        return {**row, "outcome": "UNBUILT", "detail": f"model: {type(err).__name__}: {one_line(err)}"}
    errors: dict[str, float] = {}
    try:
        parts = model_parts(model)
        geos = {(g.n_heads, g.n_kv_heads, g.qk_dim, g.v_dim) for g in parts.geometry.values()}
        gaps = len(parts.attn_layers) < parts.n_layers
        row["structure"] = "; ".join(filter(None, [
            note,
            f"wrapper {parts.wrapper} → {parts.family}" if parts.wrapper else "",
            f"attention layers {list(parts.attn_layers)} of {parts.n_layers}" if gaps else "",
            "per-layer geometry" if len(geos) > 1 else "",
            "learned sinks" if any(g.learned_sink for g in parts.geometry.values()) else "",
            "q/k width ≠ v width" if any(g.qk_dim != g.v_dim for g in parts.geometry.values()) else "",
            "attention chunks" if any(g.attention_chunk for g in parts.geometry.values()) else "",
            "a transform before the LM head" if parts.head_transform is not None else "",
        ]))
        errors.update(crystallized_checks(model, parts, ids, "eager", modes=True))
        sharpen(parts)
        errors.update(crystallized_checks(model, parts, ids, "eager sharp", modes=True))
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                sdpa = model_class(model_type)._from_config(config, attn_implementation="sdpa")
        except (ValueError, ImportError):  # the family has no sdpa path: eager alone decides
            sdpa = None
        if sdpa is not None:
            errors.update(crystallized_checks(sdpa.float().eval(), model_parts(sdpa), ids, "sdpa", modes=False))
    except Exception as err:  # noqa: BLE001 - classified: nqpq's refusal, or a crash
        if _nqpq_refusal(err):
            return {**row, "outcome": "REFUSED", "detail": one_line(err), "errors": errors}
        else:
            where = traceback.extract_tb(err.__traceback__)[-1]
            return {**row, "outcome": "CRASH", "errors": errors,
                    "detail": f"{type(err).__name__}: {one_line(err)} ({Path(where.filename).name}:{where.lineno})"}
    bad = {k: v for k, v in errors.items() if not v <= TOL}
    if bad:
        return {**row, "outcome": "WRONG", "errors": errors,
                "detail": ", ".join(f"{k} {v:.1e}" for k, v in bad.items())}
    return {**row, "outcome": "EXACT", "errors": errors, "detail": f"max rel {max(errors.values()):.1e}"}


# ---------------------------------------------------------------------------------------------- workers

def _worker(families: list[str]) -> None:
    """Run ``families`` one after another, one JSON line per event on stdout."""
    import torch

    torch.set_num_threads(1)
    import warnings

    warnings.filterwarnings("ignore")
    from transformers.utils import logging

    logging.set_verbosity_error()
    for family in families:
        print(json.dumps({"start": family}), flush=True)
        t = time.perf_counter()
        try:
            row = census_family(family)
        except Exception as err:  # noqa: BLE001 - the census itself must go on
            row = {"family": family, "outcome": "CRASH", "detail": f"{type(err).__name__}: {one_line(err)}"}
        row["seconds"] = round(time.perf_counter() - t, 2)
        print(json.dumps({"done": row}), flush=True)


def run_census(families: list[str], jobs: int = 2, timeout: float = FAMILY_TIMEOUT_S, say=print) -> list[dict]:
    """Every family's row, each run in a worker subprocess; a worker that dies or hangs costs its family a CRASH."""
    todo = list(families)
    results: dict[str, dict] = {}
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    root = str(Path(__file__).resolve().parent.parent)
    running: dict = {}  # proc → {"queue": [...], "current": str | None, "since": float}
    sel = selectors.DefaultSelector()

    def launch(queue: list[str]) -> None:
        if not queue:
            return
        proc = subprocess.Popen([sys.executable, "-m", "benchmarks.census", "--worker", *queue], cwd=root, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        running[proc] = {"queue": list(queue), "current": None, "since": time.monotonic()}
        sel.register(proc.stdout, selectors.EVENT_READ, proc)

    def finish(proc, reason: str | None) -> None:
        state = running.pop(proc)
        sel.unregister(proc.stdout)
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        rest = [f for f in state["queue"] if f not in results]
        if reason is not None and state["current"] is not None:
            fam = state["current"]
            results[fam] = {"family": fam, "outcome": "CRASH", "detail": reason, "errors": {}}
            say(f"  {fam:28s} CRASH {reason}")
            rest = [f for f in rest if f != fam]
        launch(rest)

    shares = [todo[i::jobs] for i in range(jobs)]
    for share in shares:
        launch(share)
    while running:
        for key, _ in sel.select(timeout=1.0):
            proc = key.data
            line = proc.stdout.readline()
            if not line:
                code = proc.wait()
                finish(proc, None if code == 0 and running[proc]["current"] is None
                       else f"the worker died (exit status {code}) on this family")
                continue
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                continue  # a family printed something of its own
            state = running[proc]
            if "start" in event:
                state["current"], state["since"] = event["start"], time.monotonic()
            elif "done" in event:
                row = event["done"]
                results[row["family"]] = row
                state["current"] = None
                say(f"  {row['family']:28s} {row['outcome']:8s} {row['seconds']:6.1f}s  {row['detail'][:150]}")
        now = time.monotonic()
        for proc, state in list(running.items()):
            if state["current"] is not None and now - state["since"] > timeout:
                finish(proc, f"no result within {timeout:.0f} s (hung)")
    return [results[f] for f in families if f in results]


# ---------------------------------------------------------------------------------------------- the table

def render(rows: list[dict], seconds: float, jobs: int) -> str:
    import torch
    import transformers

    counts = {o: sum(r["outcome"] == o for r in rows) for o in OUTCOMES}
    lines = [
        "# Census: every causal LM of the installed transformers",
        "",
        f"transformers {transformers.__version__}, torch {torch.__version__}; {len(rows)} families of "
        "`MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`; "
        f"{seconds:.0f} s with {jobs} worker processes. Reproduce: `python -m benchmarks.census`.",
        "",
        "Each family: a tiny random config from its own defaults (shrunk), float32, 2 × 24 random tokens, no mask. "
        f"EXACT: every check ≤ {TOL:g} relative (max |Δ| / max |reference|): full mode on the last attention layer "
        "and on every attention layer vs the model's logits, the prefix replay (every layer from the first attention "
        "layer, crystallized in full mode) vs the losses of the model's logits (eager, eager with sharper attention "
        "weights, sdpa), and top-1 / low-rank on the last attention layer vs a float64 per-head computation on the "
        "q, k, v it received (eager, both weight scales). UNBUILT: the census could not build or run the family "
        "itself (not a verdict on nqpq).",
        "",
        "| outcome | families |",
        "|---|---|",
        *(f"| {o} | {counts[o]} |" for o in OUTCOMES),
        "",
        "| family | class | outcome | structure | detail |",
        "|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: (OUTCOMES.index(r["outcome"]), r["family"])):
        detail = r.get("detail", "").replace("|", "\\|")
        lines.append(f"| {r['family']} | {r.get('cls', '')} | {r['outcome']} | {r.get('structure', '')} | {detail} |")
    return "\n".join(lines) + "\n"


def read_table(path: Path = RESULTS) -> dict[str, str]:
    """family → outcome, from a committed census table."""
    out = {}
    for line in path.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 3 and cells[2] in OUTCOMES and cells[0] not in ("outcome", "family"):
            out[cells[0]] = cells[2]
    return out


def write_whole(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def all_families() -> list[str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return list(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--families", nargs="+", default=None, help="default: every entry of the causal-LM mapping")
    p.add_argument("--jobs", type=int, default=2, help="worker processes (default 2)")
    p.add_argument("--timeout", type=float, default=FAMILY_TIMEOUT_S, help="seconds per family before it is a hang")
    p.add_argument("--out", default=str(RESULTS), help="the table (markdown); '-' for stdout")
    p.add_argument("--json", default=None, help="also write the rows as JSON here")
    p.add_argument("--worker", nargs="*", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker is not None:
        _worker(args.worker)
        return 0
    families = args.families or all_families()
    unknown = sorted(set(families) - set(all_families()))
    if unknown:
        print(f"error: not in this transformers' causal-LM mapping: {unknown}", file=sys.stderr)
        return 2
    t = time.perf_counter()
    rows = run_census(families, jobs=max(1, args.jobs), timeout=args.timeout)
    seconds = time.perf_counter() - t
    text = render(rows, seconds, args.jobs)
    if args.json:
        write_whole(Path(args.json), json.dumps(rows, indent=1))
    if args.out == "-":
        print(text)
    else:
        write_whole(Path(args.out), text)
        counts = {o: sum(r["outcome"] == o for r in rows) for o in OUTCOMES}
        print(f"{counts} in {seconds:.0f} s → {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

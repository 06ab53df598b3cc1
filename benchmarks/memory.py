"""Memory benchmark: what a sweep holds as --n-blocks grows (issue 14, items 8-10).

Runs the real sweep (``nqpq.run_sweep``) on a random-weight GPT-2 (6 layers, d_model 256, 8 heads,
eager attention, so the model materialises its mask) once per --n-blocks value, each in a fresh
process, with one fixed batch size so the points differ only in the number of blocks. Per point:

- peak RSS growth of the sweep (``VmHWM`` after the run minus ``VmRSS`` before it, the high-water
  mark reset through ``/proc/self/clear_refs``; a warm-up sweep on 2 blocks runs first);
- the bytes the ``PrefixRunner`` really holds when the sweep ends: every tensor reachable from it,
  each storage counted once, split into recorded hidden states (device / host) and layer arguments;
- the Gram matrices the calibration hands over per observed call, and what the accumulator keeps;
- on CUDA, ``torch.cuda.max_memory_allocated`` growth.

Beside them, computed (not re-run): what the previous design held, one hidden state and one
``[b, 1, T, T]`` mask per batch on the device, and a ``[b·Hq·⌈T/64⌉, D, D]`` fp32 Gram partials
buffer per observed call plus its float64 copy.

The hidden states entering the first replayed layer are the record itself ([n_blocks, T, C]): they
grow with the data by design and live in host memory once over ``record_budget`` (on CPU the device
is the host). Everything else must stay flat; the summary prints the per-block slope of the peak RSS
next to the record's bytes per block.

    python -m benchmarks.memory --device cpu
    python -m benchmarks.memory --device cuda --n-blocks 64 256 1024 --record-budget-mib 64
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import torch

from benchmarks.common import run_tags, write_csv

RESULTS = Path(__file__).resolve().parent / "results"
MIB = 1 << 20
# The row tile of the previous Gram partials buffer (the kernel's 64x64 tiles); issue 14 item 9's
# 2.7 GiB at Hq 32, D 128, T 1024, batch 29 is this buffer (fp32) plus its float64 copy.
OLD_GRAM_BLOCK_M = 64
MMAP_THRESHOLD = 1 << 16  # bytes; see main()


def _status_bytes(field: str) -> int:
    """A ``/proc/self/status`` memory field (reported in kB) in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field} field (this benchmark needs Linux)")


def _reset_peak_rss() -> None:
    """Reset VmHWM to the current RSS (Linux >= 4.0), so the peak is the measured run's alone."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _tensors(obj: object, seen_ids: set[int]):
    """Every tensor reachable from ``obj`` through tuples, lists, dicts (each container visited once)."""
    if isinstance(obj, torch.Tensor):
        yield obj
        return
    if id(obj) in seen_ids or not isinstance(obj, (tuple, list, dict)):
        return
    seen_ids.add(id(obj))
    for item in obj.values() if isinstance(obj, dict) else obj:
        yield from _tensors(item, seen_ids)


def runner_bytes(runner, hidden_size: int) -> dict:
    """Bytes of every tensor a PrefixRunner keeps, each storage counted once.

    Walks all of the runner's attributes except the model and the inputs (``blocks`` are the token ids
    it was given), so a renamed or added record field is still counted. A floating tensor whose last
    dimension is the hidden size is a recorded hidden state; anything else is a layer argument.
    """
    storages: set[tuple[str, int]] = set()
    out = {"hidden_device": 0, "hidden_host": 0, "args": 0}
    seen_ids: set[int] = set()
    skip = {"model", "parts", "blocks", "batches"}
    for name, value in vars(runner).items():
        if name in skip:
            continue
        for t in _tensors(value, seen_ids):
            key = (str(t.device), t.untyped_storage().data_ptr())
            if key in storages:
                continue
            storages.add(key)
            nbytes = t.untyped_storage().nbytes()
            if t.is_floating_point() and t.dim() == 3 and t.shape[-1] == hidden_size:
                out["hidden_host" if t.device.type == "cpu" else "hidden_device"] += nbytes
            else:
                out["args"] += nbytes
    return out


def old_design_bytes(n_blocks: int, batch_size: int, seq_len: int, hidden: int, heads: int, head_dim: int,
                     elem: int) -> dict:
    """What the previous PrefixRunner and Gram reduction held, from their shapes (issue 14 items 8, 9)."""
    record = n_blocks * seq_len * hidden * elem  # one hidden state per batch
    masks = n_blocks * seq_len * seq_len * elem  # one additive [b, 1, T, T] mask per batch, model dtype
    partials = batch_size * heads * math.ceil(seq_len / OLD_GRAM_BLOCK_M) * head_dim * head_dim
    return {"old_record_bytes": record + masks, "old_masks_bytes": masks,
            "old_gram_call_bytes": partials * (4 + 8)}


def _point(opts: dict, n_blocks: int) -> dict:
    """One measurement, run in a fresh process (spawned): a warm-up sweep, then the measured one."""
    from transformers import GPT2Config, GPT2LMHeadModel

    import nqpq.experiments.setup as setup_module
    import nqpq.experiments.sweep as sweep_module
    from nqpq import SweepConfig, run_sweep

    device = torch.device(opts["device"])
    dtype = getattr(torch, opts["dtype"])
    config = GPT2Config(vocab_size=opts["vocab"], n_positions=opts["seq_len"], n_embd=opts["n_embd"],
                        n_layer=opts["n_layer"], n_head=opts["n_head"], attn_implementation=opts["attn"],
                        bos_token_id=opts["vocab"] - 1, eos_token_id=opts["vocab"] - 1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(opts["seed"])
        model = GPT2LMHeadModel(config).to(device=device, dtype=dtype).eval()
    g = torch.Generator().manual_seed(opts["seed"])
    ids = torch.randint(0, opts["vocab"], (n_blocks * opts["seq_len"],), generator=g)

    # run_sweep builds its PrefixRunner and GramAccumulator inside; these subclasses keep hold of them
    # (and apply --record-budget-mib) so the benchmark counts the very objects the sweep used.
    runners, grams = [], {"call_max": 0, "calls": 0, "held": 0}
    budget = None if opts["record_budget_mib"] is None else int(opts["record_budget_mib"] * MIB)

    phases: dict[str, int] = {}  # peak RSS of the baseline pass (+ calibration), then of the replays

    class Runner(sweep_module.PrefixRunner):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs, record_budget=budget)
            runners.append(self)

        def capture_baseline(self, *args, **kwargs) -> torch.Tensor:
            losses = super().capture_baseline(*args, **kwargs)
            phases["baseline"] = _status_bytes("VmHWM")
            _reset_peak_rss()
            return losses

    class Grams(setup_module.GramAccumulator):
        def add(self, layer: int, gram: torch.Tensor) -> None:
            super().add(layer, gram)
            grams["calls"] += 1
            grams["call_max"] = max(grams["call_max"], gram.numel() * gram.element_size())
            grams["held"] = sum(t.numel() * t.element_size() for t in self.grams.values())

    sweep_module.PrefixRunner, setup_module.GramAccumulator = Runner, Grams

    cfg = SweepConfig(model="gpt2 random (memory benchmark)", layers=tuple(opts["layers"]), d_r=tuple(opts["d_r"]),
                      n_blocks=n_blocks, seq_len=opts["seq_len"], calib_blocks=min(opts["calib_blocks"], n_blocks),
                      device=str(device), dtype=opts["dtype"], backend=opts["backend"],
                      batch_size=opts["batch_size"], progress=False)
    # Warm-up: thread pools, allocator pools and lazy imports stay out of the measured peak.
    warm = SweepConfig(**{**cfg.__dict__, "n_blocks": 2, "calib_blocks": 1})
    run_sweep(warm, model=model, ids=ids, log=lambda *_: None)
    runners.clear()
    grams.update(call_max=0, calls=0, held=0)
    gc.collect()

    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        cuda_before = torch.cuda.memory_allocated(device)
    rss_before = _status_bytes("VmRSS")
    _reset_peak_rss()
    t = time.perf_counter()
    results = run_sweep(cfg, model=model, ids=ids, log=lambda *_: None)
    if cuda:
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t
    phases["replays"] = _status_bytes("VmHWM")
    peak_growth = max(phases.values()) - rss_before
    rss_after = _status_bytes("VmRSS") - rss_before  # the runner is still alive here: its record included
    held = runner_bytes(runners[0], opts["n_embd"])
    row = {
        "n_blocks": n_blocks, "batch_size": results["config"]["batch_size"], "n_batches": len(runners[0].batches),
        "peak_rss_growth_mib": peak_growth / MIB,
        "baseline_peak_growth_mib": (phases["baseline"] - rss_before) / MIB,
        "replay_peak_growth_mib": (phases["replays"] - rss_before) / MIB,
        "rss_held_after_mib": rss_after / MIB,
        "record_hidden_host_mib": held["hidden_host"] / MIB,
        "record_hidden_device_mib": held["hidden_device"] / MIB,
        "record_args_kib": held["args"] / 1024,
        # Hidden states kept on a CUDA device are not in the RSS; those in host memory (pinned) are.
        "peak_beyond_hidden_mib": (peak_growth - held["hidden_host"]) / MIB,
        "gram_calls": grams["calls"], "gram_call_kib": grams["call_max"] / 1024, "gram_held_kib": grams["held"] / 1024,
        "seconds": seconds,
    }
    if cuda:
        row["cuda_peak_growth_mib"] = (torch.cuda.max_memory_allocated(device) - cuda_before) / MIB
    return row


def _fit_slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of ys over xs."""
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / den if den else 0.0


def plot(rows: list[dict], path: str) -> None:
    """Measured peak growth and record vs n_blocks, beside the previous design's computed record."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [int(r["n_blocks"]) for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    series = [("peak RSS growth (measured)", "peak_rss_growth_mib", "o-"),
              ("peak RSS growth beyond the hidden-state record", "peak_beyond_hidden_mib", "o-"),
              ("recorded hidden states (measured)", "record_hidden_host_mib", "s-"),
              ("recorded layer arguments (measured)", "record_args_mib", "s-"),
              ("previous design: record + a mask per batch (computed)", "old_record_mib", "x--")]
    if any(r.get("cuda_peak_growth_mib") not in (None, "") for r in rows):
        series.append(("CUDA max_memory_allocated growth", "cuda_peak_growth_mib", "d-"))
        series.append(("recorded hidden states on the device", "record_hidden_device_mib", "s:"))
    for label, key, style in series:
        ax.plot(xs, [float(r[key]) for r in rows], style, label=label, ms=4)
    ax.set_xscale("log", base=2)
    ax.set_xticks(xs, [str(x) for x in xs])
    ax.minorticks_off()
    r0 = rows[0]
    ax.set(xlabel="--n-blocks", ylabel="MiB",
           title=f"sweep memory: GPT-2 {r0['n_layer']}L d{r0['n_embd']} {r0['n_head']}h, T={r0['seq_len']}, "
                 f"batch {r0['batch_size']}, {r0['attn']} {r0['dtype']}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.suptitle(f"{r0['device']} · torch {r0['torch']} · transformers {r0['transformers']} · {r0['date']}",
                 fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--backend", default="auto", choices=["auto", "torch", "triton"])
    p.add_argument("--n-blocks", type=int, nargs="+", default=[8, 16, 32, 64])
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=4, help="fixed for every point, so they differ only in blocks")
    p.add_argument("--calib-blocks", type=int, default=4)
    p.add_argument("--layers", type=int, nargs="+", default=[4, 5])
    p.add_argument("--d-r", type=int, nargs="+", default=[8])
    p.add_argument("--n-layer", type=int, default=6)
    p.add_argument("--n-embd", type=int, default=256)
    p.add_argument("--n-head", type=int, default=8)
    p.add_argument("--vocab", type=int, default=2048, help="random token ids below this (the LM head's rows)")
    p.add_argument("--attn", default="eager", choices=["eager", "sdpa"],
                   help="the model's attention (eager materialises the mask the previous design kept per batch)")
    p.add_argument("--record-budget-mib", type=float, default=None,
                   help="PrefixRunner's device budget for recorded hidden states (default: its own, a quarter "
                        "of the free CUDA memory; no effect on CPU, where the device is the host)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="CSV path (default: benchmarks/results/memory_<device>.csv)")
    args = p.parse_args(argv)
    if sorted(set(args.n_blocks)) != args.n_blocks or args.n_blocks[0] < 2:
        p.error(f"--n-blocks must be increasing and distinct, each at least 2, got {args.n_blocks}")
    if args.n_embd % args.n_head:
        p.error(f"--n-embd {args.n_embd} must be a multiple of --n-head {args.n_head}")

    import transformers

    opts = {k: v for k, v in vars(args).items() if k != "out"}
    elem = torch.finfo(getattr(torch, args.dtype)).bits // 8
    head_dim = args.n_embd // args.n_head
    tags = {**run_tags(args.device), "transformers": transformers.__version__}
    print(f"[memory bench] GPT-2 {args.n_layer} layers, d_model {args.n_embd}, {args.n_head} heads, RANDOM weights, "
          f"{args.attn} {args.dtype}; T={args.seq_len}, batch {args.batch_size}, layers {args.layers}, "
          f"d_r {args.d_r}; {tags['device']}; one fresh process per point")
    # glibc's dynamic mmap threshold lets freed large blocks linger in the heap, so the peak RSS of one run
    # would depend on its allocation history; a fixed threshold (read by each spawned child at start-up)
    # maps every tensor-sized block on its own and unmaps it on free: RSS follows the live bytes.
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(MMAP_THRESHOLD))
    rows = []
    ctx = get_context("spawn")
    for n in args.n_blocks:
        with ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
            point = pool.submit(_point, opts, n).result()
        old = old_design_bytes(n, args.batch_size, args.seq_len, args.n_embd, args.n_head, head_dim, elem)
        row = {**tags, "dtype": args.dtype, "attn": args.attn, "backend": args.backend, "n_layer": args.n_layer,
               "n_embd": args.n_embd, "n_head": args.n_head, "seq_len": args.seq_len, "vocab": args.vocab,
               "layers": " ".join(map(str, args.layers)), "d_r": " ".join(map(str, args.d_r)),
               "record_budget_mib": args.record_budget_mib, "weights": "random", **point,
               "record_args_mib": point["record_args_kib"] / 1024,
               "old_record_mib": old["old_record_bytes"] / MIB, "old_masks_mib": old["old_masks_bytes"] / MIB,
               "old_gram_call_kib": old["old_gram_call_bytes"] / 1024}
        rows.append({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()})
        print(f"  n_blocks {n:>5}: peak RSS +{point['peak_rss_growth_mib']:.1f} MiB in {point['seconds']:.1f} s")

    cuda = args.device.startswith("cuda")
    cols = [("n_blocks", "n_blocks", 0), ("peak RSS+", "peak_rss_growth_mib", 1),
            ("baseline+", "baseline_peak_growth_mib", 1), ("replays+", "replay_peak_growth_mib", 1),
            ("beyond hidden", "peak_beyond_hidden_mib", 1), ("hidden host", "record_hidden_host_mib", 2),
            ("hidden dev", "record_hidden_device_mib", 2), ("args KiB", "record_args_kib", 1),
            ("gram KiB", "gram_call_kib", 1), ("old record", "old_record_mib", 2),
            ("old gram KiB", "old_gram_call_kib", 1)]
    if cuda:
        cols.append(("cuda peak+", "cuda_peak_growth_mib", 1))
    print("\n  MiB unless marked; + = peak RSS growth (whole run, baseline pass, replays); hidden = recorded hidden\n"
          "  states; args = recorded layer arguments; gram = one call's Gram handed to calibration; old = the\n"
          "  previous design, computed (its Gram partials buffer is the CUDA kernel's, [b*Hq*ceil(T/64), D, D])")
    print("  " + "".join(f"{name:>14}" for name, _, _ in cols))
    for r in rows:
        print("  " + "".join(f"{r[key]:>14.{digits}f}" for _, key, digits in cols))

    xs = [r["n_blocks"] for r in rows]
    per_block_hidden = args.seq_len * args.n_embd * elem / 1024
    peak_slope = _fit_slope(xs, [r["peak_rss_growth_mib"] * 1024 for r in rows])
    beyond_slope = _fit_slope(xs, [r["peak_beyond_hidden_mib"] * 1024 for r in rows])
    args_slope = _fit_slope(xs, [r["record_args_kib"] for r in rows])
    print(f"\n  per block: peak RSS {peak_slope:+.1f} KiB, of which the hidden-state record {per_block_hidden:.1f} KiB "
          f"(T*C*{elem} B); beyond it {beyond_slope:+.1f} KiB; layer arguments {args_slope:+.2f} KiB; "
          f"previous design {per_block_hidden + args.seq_len ** 2 * elem / 1024:.1f} KiB on the device")
    spread = max(r["peak_beyond_hidden_mib"] for r in rows) - min(r["peak_beyond_hidden_mib"] for r in rows)
    grown = rows[-1]["record_hidden_host_mib"] - rows[0]["record_hidden_host_mib"]
    print(f"  n_blocks {xs[0]}..{xs[-1]}: the peak beyond the hidden-state record varies by {spread:.1f} MiB "
          f"while that record grows by {grown:.1f} MiB")
    if cuda:
        dev_slope = _fit_slope(xs, [r["cuda_peak_growth_mib"] * 1024 for r in rows])
        print(f"  per block on the device: {dev_slope:+.1f} KiB (CUDA max_memory_allocated)")

    out = args.out or str(RESULTS / f"memory_{args.device.split(':')[0]}.csv")
    write_csv(out, rows)
    plot(rows, str(Path(out).with_suffix(".png")))
    print(f"  wrote {out} and {Path(out).with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

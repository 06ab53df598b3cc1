"""Kernel benchmark: fused residual attention vs the reference path vs PyTorch SDPA.

    python -m benchmarks.attention                 # full grid on CUDA (CPU: a small reference grid)
    python -m benchmarks.attention --quick         # a few cases
    python -m benchmarks.attention --dtypes bf16 --B 32 --T 1024
    python -m benchmarks.attention --no-grid --geometries llama3-8b mistral-7b gemma2-2b --dtypes bf16

On CUDA every provider is timed with ``triton.testing.do_bench`` (median, after
warm-up) while rotating through enough input sets to overflow L2; on CPU with
``torch.utils.benchmark`` (median of blocked_autorange). Writes a CSV and a PNG
under benchmarks/results/ and prints a table.

On CPU (``--device cpu``) the torch paths are compared with SDPA: the T × T reference (``reference_*``) and the
streamed path the ``"torch"`` backend runs there (``streamed_*``, nqpq_kernels/streamed.py), each mode, in ``--threads``
threads (default 1), timed as the best of ``--repeats`` interleaved calls (every provider once per round, so a load
that comes and goes from other processes hits them alike); ``peak_mem_mb`` is the growth of the peak resident set
(VmHWM, reset after the inputs are built) over one call in a fresh subprocess per configuration (torch's CPU
allocator is invisible to tracemalloc; a fresh process has no freed pages to reuse).

Geometry presets (``--geometries``) time today's models: GPT-2 medium/large heads; Llama-3-8B (Hq 32,
Hkv 8, D 128, T 1024/4096); Mistral-7B's sliding window (w 4096 at T 8192, next to the same T without
the window); Gemma 2 2B (Hq 8, Hkv 4, D 256, scores soft-capped at 50). SDPA runs the same GQA geometry
(``enable_gqa``) and a boolean mask for a window; it has no soft cap, so on soft-capped rows it runs
uncapped (``note`` says so). ``fused_*_top1_prob`` rows show what asking for the top-1 probability costs;
``*_sink1`` rows run with ``sink_tokens=1`` (the first key kept apart; issue 19), next to the same case at
n = 0: their ratio is the sink's cost.
``fused_lowrank`` (evaluation, no Gram) runs low rank through V·P_r: the key loop's P·V on d_r columns (padded to
16) of the launcher's V·P_r product, plus that product's time; ``fused_lowrank_gram`` keeps the whole ε
(calibration). Their ratio to ``fused_full`` is what issue 35 asks of a card (low rank <= 0.7x full).
TFLOP/s always counts 2·B·Hq·T²·D, also for windows (a speed-up shows as more "TFLOP/s").
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.common import run_tags, write_csv
from nqpq_kernels.reference import residual_attention_reference

RESULTS = Path(__file__).resolve().parent / "results"
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
SDPA_PROVIDERS = ("sdpa_flash", "sdpa_cudnn", "sdpa_efficient", "sdpa_math")
D_R_CASES = (8, 32)
SINK_SUFFIX = "_sink1"  # provider name suffix: the same provider with sink_tokens=1


def sdpa_backend(provider: str):
    from torch.nn.attention import SDPBackend

    return {"sdpa_flash": SDPBackend.FLASH_ATTENTION, "sdpa_cudnn": SDPBackend.CUDNN_ATTENTION,
            "sdpa_efficient": SDPBackend.EFFICIENT_ATTENTION, "sdpa_math": SDPBackend.MATH}[provider]


# name -> [(B, Hq, Hkv, T, D, sliding_window, softcap)]
GEOMETRIES = {
    "gpt2": [(8, 16, 16, 1024, 64, None, None), (8, 20, 20, 1024, 64, None, None)],  # gpt2-medium, gpt2-large
    "llama3-8b": [(4, 32, 8, 1024, 128, None, None), (2, 32, 8, 4096, 128, None, None)],
    "mistral-7b": [(1, 32, 8, 8192, 128, 4096, None), (1, 32, 8, 8192, 128, None, None)],
    "gemma2-2b": [(4, 8, 4, 1024, 256, 4096, 50.0), (2, 8, 4, 4096, 256, 4096, 50.0)],
    # SmolLM2-135M's heads (Hq 9, Hkv 3, D 64), at the lengths issue 35 targets on CPU (T 32768: the streamed path)
    "smollm2-135m": [(1, 9, 3, 1024, 64, None, None), (1, 9, 3, 4096, 64, None, None),
                     (1, 9, 3, 32768, 64, None, None)],
}
STREAMED_PROVIDERS = ("streamed_top1", "streamed_top1_top1_prob", "streamed_full", "streamed_lowrank",
                      "streamed_lowrank_gram")
REFERENCE_MODES = ("reference_top1", "reference_full")  # beside "reference" (low rank)


def make_inputs(B: int, H: int, T: int, D: int, dtype: torch.dtype, device: str, seed: int, Hkv: int | None = None):
    """q [B, H, T, D], k, v [B, Hkv, T, D] as transformers hands them (strided views of one packed qkv
    projection), plus an orthonormal basis per query head."""
    Hkv = Hkv or H
    g = torch.Generator(device=device).manual_seed(seed)
    qkv = torch.randn(B, T, (H + 2 * Hkv) * D, device=device, dtype=dtype, generator=g)
    q, k, v = (t.view(B, T, -1, D).transpose(1, 2) for t in qkv.split([H * D, Hkv * D, Hkv * D], dim=-1))
    basis = torch.linalg.qr(torch.randn(H, D, D, device=device, generator=g))[0].contiguous()
    return q, k, v, basis


def unfused(q, k, v, basis, d_r):
    """The best pipeline a user could write without the kernel: SDPA for ctx, argmax from materialized scores."""
    ctx = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    T = q.shape[2]
    scores = torch.matmul(q, k.transpose(-1, -2)).float()
    scores.masked_fill_(torch.ones(T, T, dtype=torch.bool, device=q.device).triu_(1), float("-inf"))
    i_star = scores.argmax(-1)
    del scores
    v_star = torch.gather(v, 2, i_star.unsqueeze(-1).expand_as(v)).float()
    P = basis[:, :, :d_r]
    eps = ctx.float() - v_star
    out = v_star + torch.einsum("bhtr,hdr->bhtd", torch.einsum("bhtd,hdr->bhtr", eps, P), P)
    return out.to(q.dtype)


def provider_fn(provider: str, d_r: int, sliding_window: int | None = None,
                softcap: float | None = None) -> Callable | None:
    """fn(q, k, v, basis) for a provider, or None if it cannot run here (or has no such variant)."""
    cuda = torch.cuda.is_available()
    attn = dict(sliding_window=sliding_window, softcap=softcap)
    sink = provider.endswith(SINK_SUFFIX)
    base = provider.removesuffix(SINK_SUFFIX)
    if sink:
        if not (base.startswith("fused") or base == "reference"):
            raise ValueError(provider)
        attn["sink_tokens"] = 1
    if base.startswith("fused"):
        if not cuda:
            return None
        from nqpq_kernels import residual_attention_triton

        mode = next((m for m in ("top1", "full") if base.startswith(f"fused_{m}")), "lowrank")
        gram = base == "fused_lowrank_gram"
        top1_prob = base.endswith("_top1_prob")
        return lambda q, k, v, b: residual_attention_triton(
            q, k, v, mode=mode, basis=b, d_r=d_r if mode == "lowrank" else None, return_gram=gram,
            return_top1_prob=top1_prob, **attn)
    if base == "reference":
        return lambda q, k, v, b: residual_attention_reference(q, k, v, mode="lowrank", basis=b, d_r=d_r, **attn)
    if base in REFERENCE_MODES:
        mode = base.removeprefix("reference_")
        return lambda q, k, v, b: residual_attention_reference(q, k, v, mode=mode, **attn)
    if base in STREAMED_PROVIDERS:
        from nqpq_kernels.streamed import residual_attention_streamed

        mode = next(m for m in ("top1", "full", "lowrank") if base.startswith(f"streamed_{m}"))
        gram = base == "streamed_lowrank_gram"
        top1_prob = base.endswith("_top1_prob")
        return lambda q, k, v, b: residual_attention_streamed(
            q, k, v, mode=mode, basis=b if mode == "lowrank" else None, d_r=d_r if mode == "lowrank" else None,
            return_gram=gram, return_top1_prob=top1_prob, **attn)
    if provider == "unfused":
        if sliding_window is not None or softcap is not None:
            return None
        return lambda q, k, v, b: unfused(q, k, v, b, d_r)
    if provider in SDPA_PROVIDERS:
        from torch.nn.attention import sdpa_kernel

        backend = sdpa_backend(provider)
        masks = {}

        def run(q, k, v, b):
            gqa = q.shape[1] != k.shape[1]
            T = q.shape[2]
            if sliding_window is None or sliding_window >= T:
                with sdpa_kernel(backend):
                    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
            if T not in masks:  # built once per length, outside the timed calls after the first
                i = torch.arange(T, device=q.device)
                masks[T] = (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - sliding_window)
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v, attn_mask=masks[T], enable_gqa=gqa)

        return run
    raise ValueError(provider)


def time_cuda(fn: Callable, input_sets: list) -> float:
    from triton.testing import do_bench

    state = {"i": 0}

    def call():
        args = input_sets[state["i"] % len(input_sets)]
        state["i"] += 1
        fn(*args)

    return do_bench(call, warmup=25, rep=100, return_mode="median")


def time_cpu_interleaved(fns: dict[str, Callable], inputs: tuple, repeats: int) -> dict[str, float]:
    """Best wall time (ms) of ``repeats`` rounds, each calling every fn once in turn (the caller has warmed them up):
    other processes' load hits every provider alike, and the best round is the one least disturbed."""
    best = {name: math.inf for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn(*inputs)
            best[name] = min(best[name], time.perf_counter() - t0)
    return {name: ms * 1e3 for name, ms in best.items()}


def cpu_peak_rss_mb(provider: str, d_r: int, case: tuple, threads: int) -> float | str:
    """The growth of ru_maxrss (MiB) over one call of ``provider`` on ``case``'s inputs, in a fresh subprocess:
    torch's CPU allocator is invisible to tracemalloc; a fresh process has no freed pages to reuse, and it builds
    its inputs before the call, so the growth is the call's extra peak. "" where the subprocess fails."""
    import json
    import subprocess
    import sys

    spec = json.dumps({"provider": provider, "d_r": d_r, "case": list(case), "threads": threads})
    code = f"from benchmarks.attention import _rss_child; _rss_child({spec!r})"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1])
    try:
        return float(done.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        return ""


def _high_water_kib() -> int:
    """The process's peak resident set (VmHWM, KiB) since start or since the last reset (Linux)."""
    import re

    with open("/proc/self/status") as f:
        return int(re.search(r"VmHWM:\s+(\d+)", f.read()).group(1))


def _rss_child(spec_json: str) -> None:
    """cpu_peak_rss_mb's subprocess: build the inputs, reset the peak resident set to the current one, call once,
    print the peak's growth in MiB. The reset (Linux's /proc/self/clear_refs "5") matters: importing torch and
    transformers peaks above the resident set that follows, which would hide a call's first tens of MiB; where it
    is unavailable ru_maxrss is read instead (a lower bound of the growth)."""
    import json
    import resource

    spec = json.loads(spec_json)
    torch.set_num_threads(spec["threads"])
    dt_name, B, H, Hkv, T, D, window, softcap = spec["case"]
    fn = provider_fn(spec["provider"], spec["d_r"], sliding_window=window, softcap=softcap)
    inputs = make_inputs(B, H, T, D, DTYPES[dt_name], "cpu", 0, Hkv=Hkv)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        peak = _high_water_kib
    except OSError:
        def peak() -> int:
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    before = peak()
    fn(*inputs)
    print((peak() - before) / 1024)


def peak_memory_mb(fn: Callable, inputs: tuple) -> float:
    """Peak memory allocated by one call beyond what was already allocated (inputs), in MiB."""
    if not torch.cuda.is_available():
        return ""  # no allocator statistics on the CPU
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn(*inputs)
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def cases(args) -> list[tuple]:
    """(dtype, B, Hq, Hkv, T, D, sliding_window, softcap) for the grid plus the model geometries asked for."""
    out = []
    if not args.no_grid:
        out += [(dt, B, args.H, args.Hkv or args.H, T, args.D, args.window, args.softcap)
                for dt in args.dtypes for B in args.B for T in args.T]
    if not args.no_models:
        out += [(dt, *geometry) for name in args.geometries for dt in args.dtypes for geometry in GEOMETRIES[name]]
    return out


def providers_for(device: str) -> list[tuple[str, int]]:
    """(provider, d_r) pairs; d_r is 0 where a provider does not project."""
    fused = [("fused_top1", 0), ("fused_top1_top1_prob", 0), ("fused_full", 0), ("fused_full_top1_prob", 0)]
    fused += [("fused_lowrank", d) for d in D_R_CASES] + [("fused_lowrank_gram", d) for d in D_R_CASES]
    # The sink's cost: the same providers with sink_tokens=1 (issue 19 asks for a few per cent over n = 0).
    fused += [("fused_top1" + SINK_SUFFIX, 0), ("fused_top1_top1_prob" + SINK_SUFFIX, 0),
              ("fused_full" + SINK_SUFFIX, 0)]
    fused += [("fused_lowrank" + SINK_SUFFIX, d) for d in D_R_CASES] + [("fused_lowrank_gram" + SINK_SUFFIX, 32)]
    rest = [("reference", 32), ("reference" + SINK_SUFFIX, 32), ("unfused", 32)] + [(p, 0) for p in SDPA_PROVIDERS]
    if device == "cuda":
        return fused + rest
    # CPU: the torch paths users run there (streamed) and the reference, per mode, beside SDPA.
    streamed = [("streamed_top1", 0), ("streamed_top1_top1_prob", 0), ("streamed_full", 0)]
    streamed += [("streamed_lowrank", d) for d in D_R_CASES] + [("streamed_lowrank_gram", 32)]
    return streamed + [(p, 0) for p in REFERENCE_MODES] + rest


def run(args, out: str | None = None) -> list[dict]:
    """Time every case; with ``out``, rewrite the CSV after each case (a cut-short run keeps what it measured)."""
    device = "cuda" if torch.cuda.is_available() and not args.cpu else "cpu"
    if device == "cpu":
        torch.set_num_threads(args.threads)
    tags = run_tags(device)
    rows = []
    for dt_name, B, H, Hkv, T, D, window, softcap in cases(args):
        dtype = DTYPES[dt_name]
        if device == "cpu" and dtype == torch.float16 and not args.cpu_fp16:
            continue
        set_bytes = (H + 2 * Hkv) * B * T * D * dtype.itemsize
        n_sets = 1 if device == "cpu" else max(1, min(16, math.ceil(2 * 64 * 2**20 / set_bytes)))
        input_sets = [make_inputs(B, H, T, D, dtype, device, seed, Hkv=Hkv) for seed in range(n_sets)]
        case_rows = []
        runnable = {}
        first_ms = {}  # CPU: the first call's time, the measurement itself above --long-t (one call each)
        for provider, d_r in providers_for(device):
            if d_r > D:
                continue
            fn = provider_fn(provider, d_r, sliding_window=window, softcap=softcap)
            if fn is None:
                continue
            eager = provider.removesuffix(SINK_SUFFIX) in ("reference", "unfused", "sdpa_math", *REFERENCE_MODES)
            if eager and B * H * T * T * 4 * 2 > args.max_ref_bytes:
                continue  # two fp32 T×T buffers that would not fit
            if args.providers and provider not in args.providers:
                continue
            if device == "cpu":
                if args.cpu_providers and provider not in args.cpu_providers:
                    continue
                try:
                    t0 = time.perf_counter()
                    fn(*input_sets[0])  # warm-up / check support (SDPA's CUDA-only backends refuse)
                    first_ms[(provider, d_r)] = (time.perf_counter() - t0) * 1e3
                except (RuntimeError, ValueError) as err:
                    if args.verbose:
                        print(f"  skip {provider} {dt_name} B={B} T={T}: {str(err).splitlines()[0][:100]}")
                    continue
            runnable[(provider, d_r)] = fn
        cpu_ms = first_ms
        if device == "cpu" and T <= args.long_t:  # every provider once per round, the best round each
            cpu_ms = time_cpu_interleaved(runnable, input_sets[0], args.repeats)
        for (provider, d_r), fn in runnable.items():
            try:
                if device == "cuda":
                    fn(*input_sets[0])  # compile / check support
                    ms = time_cuda(fn, input_sets)
                    mem = peak_memory_mb(fn, input_sets[0])
                else:
                    ms = cpu_ms[(provider, d_r)]
                    case = (dt_name, B, H, Hkv, T, D, window, softcap)
                    mem = cpu_peak_rss_mb(provider, d_r, case, args.threads) if args.cpu_memory else ""
            except (RuntimeError, ValueError) as err:  # SDPA backend unsupported for this dtype/card, OOM
                if args.verbose:
                    print(f"  skip {provider} {dt_name} B={B} T={T}: {str(err).splitlines()[0][:100]}")
                torch.cuda.empty_cache() if device == "cuda" else None
                continue
            flops = 2 * B * H * T * T * D  # the causal count asked for: 2·B·H·T²·D
            note = "sdpa_without_softcap" if provider in SDPA_PROVIDERS and softcap is not None else ""
            case_rows.append({**tags, "provider": provider, "dtype": dt_name, "B": B, "H": H, "T": T, "D": D,
                              "d_r": d_r, "median_ms": round(ms, 5), "tflops": round(flops / ms / 1e9, 3),
                              "peak_mem_mb": round(mem, 2) if mem != "" else "", "Hkv": Hkv,
                              "window": window or "", "softcap": softcap or "", "note": note})
        sdpa = {r["provider"]: r["median_ms"] for r in case_rows if r["provider"] in SDPA_PROVIDERS}
        sdpa_ref = sdpa.get("sdpa_flash") or (min(sdpa.values()) if sdpa else None)
        sdpa_name = "sdpa_flash" if "sdpa_flash" in sdpa else (min(sdpa, key=sdpa.get) if sdpa else "")
        ref_ms = next((r["median_ms"] for r in case_rows if r["provider"] == "reference"), None)
        for r in case_rows:
            r["ratio_vs_sdpa"] = round(r["median_ms"] / sdpa_ref, 3) if sdpa_ref else ""
            r["sdpa_baseline"] = sdpa_name
            r["ratio_vs_reference"] = round(r["median_ms"] / ref_ms, 4) if ref_ms else ""
        rows += case_rows
        print_case(case_rows)
        if out:
            write_csv(out, rows)
    return rows


def print_case(rows: list[dict]) -> None:
    if not rows:
        return
    r0 = rows[0]
    extra = f" Hkv={r0['Hkv']}" + (f" window={r0['window']}" if r0["window"] else "") + (
        f" softcap={r0['softcap']}" if r0["softcap"] else "")
    print(f"\n{r0['dtype']} B={r0['B']} H={r0['H']}{extra} T={r0['T']} D={r0['D']}  ({r0['device']})")
    print(f"  {'provider':<20}{'d_r':>4}{'ms':>10}{'TFLOP/s':>9}{'vs sdpa':>9}{'vs ref':>9}{'peak MiB':>10}")
    for r in rows:
        print(f"  {r['provider']:<20}{r['d_r']:>4}{r['median_ms']:>10.4f}{r['tflops']:>9.2f}"
              f"{str(r['ratio_vs_sdpa']):>9}{str(r['ratio_vs_reference']):>9}{str(r['peak_mem_mb']):>10}")


def plot(rows: list[dict], path: str) -> None:
    """TFLOP/s vs T, one line per provider; a panel per (dtype, B) for the H=12 grid (or, where the run has none,
    the geometry of its first row without a window or a cap: SmolLM2's on CPU)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plain_rows = [r for r in rows if not r.get("window") and not r.get("softcap")]
    grid = [r for r in plain_rows if int(r["H"]) == 12 and int(r.get("Hkv") or 12) == 12 and int(r["D"]) == 64]
    if not grid and plain_rows:
        geo = (plain_rows[0]["H"], plain_rows[0].get("Hkv"), plain_rows[0]["D"])
        grid = [r for r in plain_rows if (r["H"], r.get("Hkv"), r["D"]) == geo]
    dtypes = [d for d in DTYPES if any(r["dtype"] == d for r in grid)]
    batches = sorted({int(r["B"]) for r in grid})
    if not grid:
        return
    # At least 10 inches wide: the legend below (six columns) must fit a single panel too.
    fig, axes = plt.subplots(len(dtypes), len(batches), figsize=(max(10.0, 4.6 * len(batches)), 3.6 * len(dtypes)),
                             squeeze=False)
    keys = list(dict.fromkeys((r["provider"], int(r["d_r"])) for r in grid))
    colors = {key: plt.cm.tab20(i % 20) for i, key in enumerate(keys)}  # one colour per provider everywhere
    lines = {}
    for i, dt in enumerate(dtypes):
        for j, B in enumerate(batches):
            ax = axes[i][j]
            sel = [r for r in grid if r["dtype"] == dt and int(r["B"]) == B]
            for prov in dict.fromkeys((r["provider"], int(r["d_r"])) for r in sel):
                pts = sorted((int(r["T"]), float(r["tflops"])) for r in sel
                             if (r["provider"], int(r["d_r"])) == prov)
                label = prov[0] + (f" d_r={prov[1]}" if "lowrank" in prov[0] or prov[0] == "reference" else "")
                style = "o-" if prov[0].startswith(("fused", "streamed")) else "s--"
                (lines[label],) = ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=label, ms=3,
                                          lw=1.2, color=colors[prov])
            ts = sorted({int(r["T"]) for r in sel})
            ax.set_xscale("log", base=2)
            ax.set_xticks(ts, [str(t) for t in ts])
            ax.minorticks_off()
            g0 = sel[0] if sel else grid[0]
            ax.set(xlabel="T", ylabel="TFLOP/s (2·B·H·T²·D)",
                   title=f"{dt}, B={B}, H={g0['H']}, Hkv={g0.get('Hkv') or g0['H']}, D={g0['D']}")
            ax.grid(alpha=0.3)
    fig.legend(list(lines.values()), list(lines), loc="lower center", ncol=4 if len(batches) == 1 else 6, fontsize=8)
    r0 = rows[0]
    fig.suptitle(f"{r0['device']} · torch {r0['torch']} · triton {r0['triton']} · {r0['date']}")
    fig.tight_layout(rect=(0, 0.06 if len(batches) > 1 else 0.2, 1, 0.97))
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    p.add_argument("--B", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--T", type=int, nargs="+", default=[128, 256, 512, 1024, 2048])
    p.add_argument("--H", type=int, default=12)
    p.add_argument("--D", type=int, default=64)
    p.add_argument("--Hkv", type=int, default=None, help="kv heads of the grid (default: H, no GQA)")
    p.add_argument("--window", type=int, default=None, help="sliding window of the grid")
    p.add_argument("--softcap", type=float, default=None, help="score soft cap of the grid")
    p.add_argument("--geometries", nargs="+", default=["gpt2"], choices=list(GEOMETRIES),
                   help="model head geometries timed after the grid (default: gpt2)")
    p.add_argument("--no-grid", action="store_true", help="only the --geometries cases")
    p.add_argument("--quick", action="store_true", help="B=8, T in {256, 1024}, bf16/fp32, no model geometries")
    p.add_argument("--no-models", action="store_true", help="skip the --geometries cases")
    p.add_argument("--cpu", action="store_true", help="benchmark on CPU even if CUDA is present")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="cpu: the same as --cpu; auto: CUDA where present")
    p.add_argument("--threads", type=int, default=1, help="CPU threads (torch.set_num_threads; default 1)")
    p.add_argument("--repeats", type=int, default=5, help="CPU: interleaved rounds, best of (default 5)")
    p.add_argument("--long-t", type=int, default=8192,
                   help="CPU: above this T one call per provider, no warm-up (default 8192)")
    p.add_argument("--cpu-providers", nargs="+", default=None, help="CPU: time only these providers")
    p.add_argument("--providers", nargs="+", default=None,
                   help="time only these providers (either device; e.g. fused_full fused_lowrank sdpa_flash)")
    p.add_argument("--no-cpu-memory", dest="cpu_memory", action="store_false",
                   help="CPU: skip the peak-memory subprocesses")
    p.add_argument("--cpu-fp16", action="store_true", help="include fp16 on CPU (slow there)")
    p.add_argument("--max-ref-bytes", type=float, default=24e9, help="skip reference/unfused above this T×T size")
    p.add_argument("--out", default=None, help="CSV path (default: benchmarks/results/attention_<device>.csv)")
    p.add_argument("--verbose", action="store_true")
    p.add_argument("--plot-only", metavar="CSV", help="redraw the PNG of an existing CSV and exit")
    args = p.parse_args(argv)
    if args.plot_only:
        import csv

        with open(args.plot_only) as f:
            plot(list(csv.DictReader(f)), str(Path(args.plot_only).with_suffix(".png")))
        return 0
    args.cpu = args.cpu or args.device == "cpu"
    if args.threads < 1 or args.repeats < 1:
        p.error("--threads and --repeats must be >= 1")
    device = "cuda" if torch.cuda.is_available() and not args.cpu else "cpu"
    if args.quick:
        args.B, args.T, args.no_models = [8], [256, 1024], True
        args.dtypes = [d for d in args.dtypes if d != "fp16"] or args.dtypes
    if device == "cpu" and not args.quick and args.T == p.get_default("T"):
        args.B, args.T, args.no_models = [1, 4], [128, 256, 512], True  # the CPU grid stays small
    t0 = time.perf_counter()
    out = args.out or str(RESULTS / f"attention_{device}.csv")
    rows = run(args, out)
    plot(rows, str(Path(out).with_suffix(".png")))
    print(f"\nwrote {out} and {Path(out).with_suffix('.png')} ({len(rows)} rows, {time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Kernel benchmark: fused residual attention vs the reference path vs PyTorch SDPA.

    python -m benchmarks.attention                 # full grid on CUDA (CPU: a small reference grid)
    python -m benchmarks.attention --quick         # a few cases
    python -m benchmarks.attention --dtypes bf16 --B 32 --T 1024
    python -m benchmarks.attention --no-grid --geometries llama3-8b mistral-7b gemma2-2b --dtypes bf16

On CUDA every provider is timed with ``triton.testing.do_bench`` (median, after
warm-up) while rotating through enough input sets to overflow L2; on CPU with
``torch.utils.benchmark`` (median of blocked_autorange). Writes a CSV and a PNG
under benchmarks/results/ and prints a table.

Geometry presets (``--geometries``) time today's models: GPT-2 medium/large heads; Llama-3-8B (Hq 32,
Hkv 8, D 128, T 1024/4096); Mistral-7B's sliding window (w 4096 at T 8192, next to the same T without
the window); Gemma 2 2B (Hq 8, Hkv 4, D 256, scores soft-capped at 50). SDPA runs the same GQA geometry
(``enable_gqa``) and a boolean mask for a window; it has no soft cap, so on soft-capped rows it runs
uncapped (``note`` says so). ``fused_*_top1_prob`` rows show what asking for the top-1 probability costs;
``*_sink1`` rows run with ``sink_tokens=1`` (the first key kept apart; issue 19), next to the same case at
n = 0: their ratio is the sink's cost.
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
}


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


def time_cpu(fn: Callable, inputs: tuple) -> float:
    from torch.utils.benchmark import Timer

    m = Timer("fn(*inputs)", globals={"fn": fn, "inputs": inputs}).blocked_autorange(min_run_time=0.5)
    return m.median * 1e3


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
    return (fused if device == "cuda" else []) + rest


def run(args, out: str | None = None) -> list[dict]:
    """Time every case; with ``out``, rewrite the CSV after each case (a cut-short run keeps what it measured)."""
    device = "cuda" if torch.cuda.is_available() and not args.cpu else "cpu"
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
        for provider, d_r in providers_for(device):
            if d_r > D:
                continue
            fn = provider_fn(provider, d_r, sliding_window=window, softcap=softcap)
            if fn is None:
                continue
            eager = provider.removesuffix(SINK_SUFFIX) in ("reference", "unfused")
            if eager and B * H * T * T * 4 * 2 > args.max_ref_bytes:
                continue  # two fp32 T×T buffers that would not fit
            try:
                fn(*input_sets[0])  # compile / check support
                ms = time_cuda(fn, input_sets) if device == "cuda" else time_cpu(fn, input_sets[0])
                mem = peak_memory_mb(fn, input_sets[0])
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
    """TFLOP/s vs T, one line per provider; a panel per (dtype, B) for the H=12 grid."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = [r for r in rows if int(r["H"]) == 12 and int(r.get("Hkv") or 12) == 12 and int(r["D"]) == 64
            and not r.get("window") and not r.get("softcap")]
    dtypes = [d for d in DTYPES if any(r["dtype"] == d for r in grid)]
    batches = sorted({int(r["B"]) for r in grid})
    if not grid:
        return
    fig, axes = plt.subplots(len(dtypes), len(batches), figsize=(4.6 * len(batches), 3.6 * len(dtypes)),
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
                label = prov[0] + (f" d_r={prov[1]}" if prov[0].startswith("fused_lowrank") else "")
                style = "o-" if prov[0].startswith("fused") else "s--"
                (lines[label],) = ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=label, ms=3,
                                          lw=1.2, color=colors[prov])
            ts = sorted({int(r["T"]) for r in sel})
            ax.set_xscale("log", base=2)
            ax.set_xticks(ts, [str(t) for t in ts])
            ax.minorticks_off()
            ax.set(xlabel="T", ylabel="TFLOP/s (2·B·H·T²·D)", title=f"{dt}, B={B}, H=12, D=64")
            ax.grid(alpha=0.3)
    fig.legend(list(lines.values()), list(lines), loc="lower center", ncol=6, fontsize=8)
    r0 = rows[0]
    fig.suptitle(f"{r0['device']} · torch {r0['torch']} · triton {r0['triton']} · {r0['date']}")
    fig.tight_layout(rect=(0, 0.06, 1, 0.97))
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

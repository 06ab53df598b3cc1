"""Block-size exploration for the fused kernel on CUDA: time a few launch configs per case.

    python -m benchmarks.tune --dtype bf16 --T 256 1024
    python -m benchmarks.tune --dtype bf16 --T 1024 --H 32 --Hkv 8 --D 128   # Llama-3-8B heads

Prints the median time of every (BLOCK_M, BLOCK_N, num_warps, num_stages) per mode next to
SDPA; the winners feed the launch table's rules (nqpq_kernels/launch.py).

    python -m benchmarks.tune --compile-only [--arch 90]

needs no GPU: compiles the kernel, as the launcher would configure it, for every mode, dtype class, head-dim
class, with and without the Gram and the optional features (window, soft cap, top1_prob; and, on top of them,
the sink with its mass), for a CUDA arch, and prints each variant's shared memory; exits 1 if one fails to
compile or needs more than ``--smem-kib``. ``--sink-only`` compiles only the sink variants.
Run it with TRITON_INTERPRET unset (the interpreter's kernels cannot be compiled).
"""

from __future__ import annotations

import argparse
import itertools
from functools import partial

import torch.nn.functional as F
from triton.testing import do_bench

from benchmarks.attention import DTYPES, make_inputs
from nqpq_kernels import launch as launch_mod
from nqpq_kernels import prefill as ra
from nqpq_kernels import prefill_kernel

CONFIGS = [dict(BLOCK_M=m, BLOCK_N=n, num_warps=w, num_stages=s)
           for m, n, w, s in itertools.product((64, 128), (32, 64, 128), (4, 8), (2, 3)) if n <= m]


def time_configs(q, k, v, basis, mode: str) -> tuple[float, list]:
    """(time with the current table, sorted [(ms, cfg)] over CONFIGS) for one mode."""

    def run():
        return ra.residual_attention_triton(q, k, v, mode=mode, basis=basis, d_r=8)

    original = launch_mod.pick_config
    results = []
    try:
        for cfg in CONFIGS:
            launch_mod.pick_config = lambda *a, cfg=cfg, **kw: dict(cfg)
            try:
                run()
                results.append((do_bench(run, warmup=10, rep=40, return_mode="median"), cfg))
                print(f"    {mode} {results[-1][0]:.4f} ms {cfg}", flush=True)  # kept if a time limit cuts the run
            except Exception as err:  # out of shared memory / registers for this config
                print(f"  {mode} {cfg}: {type(err).__name__}")
    finally:
        launch_mod.pick_config = original
    return do_bench(run, return_mode="median"), sorted(results, key=lambda r: r[0])


def compile_check(arch: int, smem_limit: int, sink_only: bool = False) -> int:
    """Compile every kernel variant for ``sm_<arch>`` without a GPU; 0 if all compile within ``smem_limit``."""
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = prefill_kernel._residual_attn_fwd
    pointers = {"Q": None, "K": None, "V": None, "Out": None, "Argmax": "*i64", "Top1P": "*fp32",
                "Basis": "*fp32", "Gram": "*fp32", "SinkMass": "*fp32", "LearnedSink": "*fp32"}
    failures = 0
    # (window, softcap, top1_prob) all off or all on: each only adds code, so "all on" is the largest variant;
    # the sink (sink_tokens > 0, with its mass stored) adds code on top of that: a third variant, "all on + sink".
    # The number of sink keys is a runtime i32 like d_r: one compile serves every n >= 1.
    # fp16 compiles like bf16. About 150 variants, some seconds each (Triton caches them for a rerun).
    flags = [(True, True, True, True)] if sink_only else [
        (False, False, False, False), (True, True, True, False), (True, True, True, True)]
    for dtype, tname in ((torch.bfloat16, "bf16"), (torch.float32, "fp32")):
        for D, mode, gram in itertools.product((64, 96, 128, 256), ("top1", "full", "lowrank"), (False, True)):
            for windowed, softcap, top1_prob, sink in flags:
                meta, launch = launch_mod.kernel_meta(D, dtype, mode, "cuda", windowed=windowed, softcap=softcap,
                                                      return_argmax=True, return_gram=gram, return_top1_prob=top1_prob,
                                                      return_sink_mass=sink, sink=sink)
                signature = {}
                for name in fn.arg_names:
                    if name in meta:
                        signature[name] = "constexpr"
                    elif name in pointers:
                        signature[name] = pointers[name] or f"*{tname}"
                    else:
                        signature[name] = "fp32" if name in ("scale", "softcap") else "i32"
                src = ASTSource(fn=fn, signature=signature,
                                constexprs={(fn.arg_names.index(k),): v for k, v in meta.items()})
                what = (f"{tname} D={D} {mode} gram={gram} window={windowed} softcap={softcap} top1p={top1_prob} "
                        f"sink={sink}")
                try:
                    kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=launch)
                except Exception as err:  # a lowering failure names the variant
                    failures += 1
                    print(f"FAIL {what}: {type(err).__name__}: {str(err).splitlines()[0][:200]}", flush=True)
                    continue
                smem = kernel.metadata.shared
                failures += smem > smem_limit
                print(f"{'ok  ' if smem <= smem_limit else 'SMEM'} {what} {launch} BLOCK_M={meta['BLOCK_M']} "
                      f"BLOCK_N={meta['BLOCK_N']} smem {smem // 1024} KiB", flush=True)
    return 1 if failures else 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtype", default="bf16", choices=list(DTYPES))
    p.add_argument("--B", type=int, default=32)
    p.add_argument("--T", type=int, nargs="+", default=[256, 1024])
    p.add_argument("--modes", nargs="+", default=["full", "lowrank"])
    p.add_argument("--H", type=int, default=12, help="query heads")
    p.add_argument("--Hkv", type=int, default=None, help="kv heads (default: H)")
    p.add_argument("--D", type=int, default=64, help="head dim (a multiple of 16 up to 256)")
    p.add_argument("--block-m", type=int, nargs="+", default=None,
                   help="only configs with these BLOCK_M (a card session's time limit: fewer compiles)")
    p.add_argument("--compile-only", action="store_true", help="compile every variant for --arch; no GPU needed")
    p.add_argument("--arch", type=int, default=90, help="CUDA compute capability for --compile-only (90: H100)")
    p.add_argument("--smem-kib", type=int, default=227, help="shared memory per block of --arch, KiB")
    p.add_argument("--sink-only", action="store_true", help="--compile-only: only the sink_tokens > 0 variants")
    args = p.parse_args(argv)
    if args.compile_only:
        return compile_check(args.arch, args.smem_kib * 1024, sink_only=args.sink_only)
    if args.block_m:
        CONFIGS[:] = [c for c in CONFIGS if c["BLOCK_M"] in args.block_m]
    dtype = DTYPES[args.dtype]
    Hkv = args.Hkv or args.H
    for T in args.T:
        q, k, v, basis = make_inputs(args.B, args.H, T, args.D, dtype, "cuda", 0, Hkv=Hkv)
        sdpa = partial(F.scaled_dot_product_attention, q, k, v, is_causal=True, enable_gqa=Hkv != args.H)
        flash = do_bench(sdpa, return_mode="median")
        print(f"\n{args.dtype} B={args.B} H={args.H} Hkv={Hkv} T={T} D={args.D}: sdpa default {flash:.4f} ms")
        for mode in args.modes:
            current, ranked = time_configs(q, k, v, basis, mode)
            table = launch_mod.pick_config(launch_mod.padded_head_dim(args.D), dtype, mode, False, q.device)
            print(f"  {mode}: current table {current:.4f} ms (x{current / flash:.2f}) {table}")
            for ms, cfg in ranked[:4]:
                print(f"    {ms:.4f} ms  x{ms / flash:.2f} of sdpa  {cfg}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

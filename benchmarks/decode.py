"""Decode benchmark (issue 34): the split-KV decode kernel against SDPA, flash decode and the prefill kernel, on a card.

    python -m benchmarks.decode                                      # Llama-3-8B heads, bf16, B 1 and 8, Tk 1k-32k
    python -m benchmarks.decode --geometry gpt2 gemma2 --Tq 1 4 --Tk 4096

Each case is Tq queries (a decode step; a few: a speculative chunk) against a cache of Tk keys, the queries the last Tq
positions (bottom-right aligned causal). Providers: ``decode_<mode>`` (``nqpq_kernels.decode``, argmax returned, and
``lowrank`` at d_r 32), ``prefill_full`` (the prefill kernel with its query offset: what the Triton backend ran before
the decode kernel existed, B·Hq programs walking every key), ``sdpa`` (torch's SDPA with ``enable_gqa``; Tq > 1 with a
bottom-right causal mask) and ``flash_decode`` (flash-attn's ``flash_attn_with_kvcache`` when the package is
installed; the row says so when it is not).

Correctness first: before any timing, each case's ``decode_full`` output is compared with SDPA's and its argmax with
the reference's on fp32 scores (``max_abs_err``, ``argmax_agree``; a case that fails is timed all the same and says
so). Every provider is timed with ``triton.testing.do_bench`` (median) while rotating through enough cache copies to
overflow L2 (a decode step reads its cache from memory), and the row reports µs per call and the GB/s of K and V read
(2·B·Hkv·Tk·D·bytes). Needs CUDA.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.attention import time_cuda
from benchmarks.common import run_tags, write_csv

RESULTS = Path(__file__).resolve().parent / "results"
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
# name -> (Hq, Hkv, D, softcap)
GEOMETRIES = {"llama3-8b": (32, 8, 128, None), "gpt2": (12, 12, 64, None), "gemma2": (8, 4, 256, 50.0)}
L2_BYTES = 50 * 2**20  # an H100's L2: the copies of the cache rotated through exceed it four times over


def bottom_right_mask(Tq: int, Tk: int, device: torch.device) -> torch.Tensor | None:
    """SDPA's bool mask for Tq queries at positions Tk − Tq .. Tk − 1 (None for one query: it sees every key)."""
    if Tq == 1:
        return None
    return torch.arange(Tk, device=device)[None, :] <= torch.arange(Tk - Tq, Tk, device=device)[:, None]


def providers(Tq: int, Tk: int, softcap: float | None, device: torch.device) -> dict:
    from nqpq_kernels.decode import residual_attention_decode
    from nqpq_kernels.prefill import residual_attention_triton

    mask = bottom_right_mask(Tq, Tk, device)
    out = {
        "decode_top1": lambda q, k, v, b: residual_attention_decode(q, k, v, mode="top1", softcap=softcap,
                                                                    return_argmax=True),
        "decode_full": lambda q, k, v, b: residual_attention_decode(q, k, v, mode="full", softcap=softcap,
                                                                    return_argmax=True),
        "decode_lowrank": lambda q, k, v, b: residual_attention_decode(q, k, v, mode="lowrank", basis=b, d_r=32,
                                                                       softcap=softcap, return_argmax=True),
        "prefill_full": lambda q, k, v, b: residual_attention_triton(q, k, v, mode="full", softcap=softcap,
                                                                     return_argmax=True),
        "sdpa": lambda q, k, v, b: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True),
    }
    try:
        from flash_attn import flash_attn_with_kvcache
    except ImportError:
        return out
    # flash-attn's layout is [B, T, H, D]; the transposes are views made once per input set (see input_sets).
    out["flash_decode"] = lambda q, k, v, b: flash_attn_with_kvcache(b[1], b[2], b[3], causal=True,
                                                                     softcap=softcap or 0.0)
    return out


def input_sets(B: int, Hq: int, Hkv: int, Tq: int, Tk: int, D: int, dtype: torch.dtype, device: torch.device) -> list:
    """Copies of (q, k, v, extras) to rotate through: extras = (basis, q, k, v in flash-attn's layout)."""
    per_set = 2 * B * Hkv * Tk * D * torch.finfo(dtype).bits // 8
    n = max(1, min(16, math.ceil(4 * L2_BYTES / per_set)))
    g = torch.Generator(device=device).manual_seed(0)
    basis = torch.linalg.qr(torch.randn(Hq, D, D, device=device, generator=g))[0]
    sets = []
    for _ in range(n):
        q = torch.randn(B, Hq, Tq, D, device=device, dtype=dtype, generator=g)
        k = torch.randn(B, Hkv, Tk, D, device=device, dtype=dtype, generator=g)
        v = torch.randn(B, Hkv, Tk, D, device=device, dtype=dtype, generator=g)
        flash = tuple(t.transpose(1, 2).contiguous() for t in (q, k, v))
        sets.append((q, k, v, (basis, *flash)))
    return sets


def check_case(fns: dict, inputs: tuple, softcap: float | None) -> dict:
    """decode_full against SDPA (uncapped cases) and its argmax against the reference's (fp32 scores)."""
    from nqpq_kernels.reference import residual_attention_reference

    q, k, v, extra = inputs
    got, idx = fns["decode_full"](q, k, v, extra)
    ref = residual_attention_reference(q, k, v, mode="full", softcap=softcap, return_argmax=True)
    row = {"max_abs_err": float((got.float() - ref.out.float()).abs().max()),
           "argmax_agree": float((idx == ref.argmax).double().mean())}
    if softcap is None:
        row["sdpa_max_abs_err"] = float((got.float() - fns["sdpa"](q, k, v, extra).float()).abs().max())
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--geometry", nargs="+", default=["llama3-8b"], choices=sorted(GEOMETRIES))
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    p.add_argument("--B", type=int, nargs="+", default=[1, 8])
    p.add_argument("--Tq", type=int, nargs="+", default=[1])
    p.add_argument("--Tk", type=int, nargs="+", default=[1024, 4096, 16384, 32768])
    p.add_argument("--out", default=str(RESULTS / "decode_cuda.csv"))
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("error: benchmarks.decode times CUDA kernels; no CUDA device here", flush=True)
        return 2
    device = torch.device("cuda")
    dtype = DTYPES[args.dtype]
    rows = []
    for name in args.geometry:
        Hq, Hkv, D, softcap = GEOMETRIES[name]
        for B in args.B:
            for Tq in args.Tq:
                for Tk in args.Tk:
                    sets = input_sets(B, Hq, Hkv, Tq, Tk, D, dtype, device)
                    fns = providers(Tq, Tk, softcap, device)
                    base = dict(geometry=name, dtype=args.dtype, B=B, Hq=Hq, Hkv=Hkv, D=D, Tq=Tq, Tk=Tk,
                                softcap=softcap or "", **check_case(fns, sets[0], softcap), **run_tags(device))
                    if "flash_decode" not in fns:
                        rows.append(dict(base, provider="flash_decode", note="flash-attn not installed"))
                    kv_bytes = 2 * B * Hkv * Tk * D * torch.finfo(dtype).bits // 8
                    for provider, fn in fns.items():
                        ms = time_cuda(fn, sets)
                        rows.append(dict(base, provider=provider, us=round(ms * 1e3, 2),
                                         kv_gb_s=round(kv_bytes / (ms * 1e-3) / 1e9, 1)))
                        print(f"{name:10} B{B:<3} Tq{Tq:<3} Tk{Tk:<6} {provider:15} {ms * 1e3:9.1f} us "
                              f"{rows[-1]['kv_gb_s']:8.1f} GB/s  err {base['max_abs_err']:.2e} "
                              f"argmax {base['argmax_agree']:.3f}", flush=True)
                    del sets
                    torch.cuda.empty_cache()
    write_csv(args.out, rows)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

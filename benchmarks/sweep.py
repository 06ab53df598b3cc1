"""Sweep benchmark: EXP-Q03 end to end, this project vs the spec's implementation (the seed's code) and vs the
model's own forward floor.

Same model (GPT-2 small geometry, RANDOM weights: timing only), same tokens, same
device, one run. Model loading is excluded from both and reported apart. Each of the three is run
``--repeats`` times, interleaved (the machine may be shared), and the best time of each is kept:

- nqpq's sweep (``run_sweep``, the spec's calibration on the scored blocks);
- the spec's own code (``benchmarks/spec_baseline.py``: one full forward per block and configuration);
- the floor (``benchmarks.real_sweep.floor``): the model's own modules and loss, one full forward of
  every block and k = 2 + len(d_r) replays of the layers from the lowest crystallized one up + final norm
  + LM head + ``F.cross_entropy``, i.e. the prefix replay's cost with plain attention and the fp32 loss.
``--geometry llama-3.2-1b`` times nqpq alone on a random model of Llama-3.2-1B's
geometry (16 layers, Hq 32, Hkv 8, D 64, vocab 128256; the spec's code is GPT-2 only)
on random token ids.

    python -m benchmarks.sweep --device cpu --n-blocks 8
    python -m benchmarks.sweep --device cuda --dtype bfloat16
    python -m benchmarks.sweep --device cuda --dtype bfloat16 --geometry llama-3.2-1b
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

from benchmarks.common import run_tags, write_csv
from benchmarks.real_sweep import floor
from benchmarks.spec_baseline import load_spec, run_spec_sweep
from nqpq import SweepConfig, run_sweep
from nqpq.model.losses import make_blocks
from nqpq.sources.checkpoints import demo_model, load_tokenizer
from nqpq.sources.text import ids_for_blocks, rows_from_file

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
RESULTS = Path(__file__).resolve().parent / "results"


def llama_3_2_1b(device: str, dtype: torch.dtype, seed: int) -> torch.nn.Module:
    """Llama-3.2-1B's geometry with RANDOM weights (fixed seed), built on ``device``; RoPE settings left default."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=64, max_position_embeddings=131072,
                         rms_norm_eps=1e-5, tie_word_embeddings=True)
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model.to(dtype).eval()


GEOMETRIES = {"gpt2-small": (lambda device, dtype: demo_model(50257, 42, device, dtype), 50257),
              "llama-3.2-1b": (lambda device, dtype: llama_3_2_1b(device, dtype, 42), 128256)}


def tokens(n_needed: int, vocab: int, seed: int, real_text: bool = True) -> tuple[torch.Tensor, str]:
    """WikiText validation with the GPT-2 tokenizer when ../shared/data is present (and ``real_text``), else random
    ids."""
    data = Path(os.environ.get("NQPQ_SHARED_DATA", SHARED_DATA))
    if real_text and (data / "wiki.valid.raw").is_file() and (data / "vocab.json").is_file():
        ids = ids_for_blocks(rows_from_file(str(data / "wiki.valid.raw")), load_tokenizer(str(data)), max(n_needed, 1))
        return ids, "wiki.valid.raw (GPT-2 tokenizer)"
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n_needed,), generator=g), "random token ids"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--backend", default="auto", choices=["auto", "torch", "triton"])
    p.add_argument("--n-blocks", type=int, default=30)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--calib-blocks", type=int, default=4)
    p.add_argument("--geometry", default="gpt2-small", choices=sorted(GEOMETRIES))
    p.add_argument("--layers", type=int, nargs="+", default=None,
                   help="default: GPT-2 small 9 10 11, other geometries their last quarter")
    p.add_argument("--d-r", type=int, nargs="+", default=None, help="default: 1 2 4 8 16 32 (up to head_dim)")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--skip-spec", action="store_true", help="time this project only")
    p.add_argument("--skip-floor", action="store_true", help="do not time the model's own forward floor")
    p.add_argument("--repeats", type=int, default=2, help="runs of each, interleaved; the best time counts")
    p.add_argument("--out", default=None, help="CSV path (default: benchmarks/results/sweep_<device>.csv)")
    args = p.parse_args(argv)

    dtype = getattr(torch, args.dtype)
    build, vocab = GEOMETRIES[args.geometry]
    gpt2 = args.geometry == "gpt2-small"
    t = time.perf_counter()
    model = build(args.device, dtype)
    load_s = time.perf_counter() - t
    ids, source = tokens(args.n_blocks * args.seq_len, vocab, 0, real_text=gpt2)
    print(f"[sweep bench] {args.geometry} geometry, RANDOM weights (timing only); {source}; "
          f"{args.n_blocks}x{args.seq_len} tokens; layers {args.layers or 'default'}; d_r {args.d_r or 'default'}; "
          f"{args.device} {args.dtype}; model build {load_s:.2f} s (excluded)")

    cfg = SweepConfig(model=f"{args.geometry}-geometry (random)",
                      layers=None if args.layers is None else tuple(args.layers),
                      d_r=None if args.d_r is None else tuple(args.d_r),
                      n_blocks=args.n_blocks, seq_len=args.seq_len, calib_blocks=args.calib_blocks,
                      calib_from="eval",  # the spec's calibration: the comparison is with its numbers
                      device=args.device, dtype=args.dtype, backend=args.backend, batch_size=args.batch_size,
                      progress=False)
    # Warm-up on two blocks: kernel compilation and allocator growth stay out of the timing.
    warm = SweepConfig(**{**cfg.__dict__, "n_blocks": min(2, cfg.n_blocks), "calib_blocks": 1, "d_r": (1,)})
    run_sweep(warm, model=model, ids=ids, log=lambda *_: None)

    if not gpt2 and not args.skip_spec:
        print("  the spec's own code runs GPT-2 only: timing nqpq only")
    spec = None if args.skip_spec or not gpt2 else load_spec()
    if spec is None and gpt2 and not args.skip_spec:
        print("  spec implementation not found (../shared/spec/exp_q03_residual.py): timing nqpq only")
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    ours, ours_s, ref, fl, spec_error = None, float("inf"), None, None, None
    for _ in range(max(1, args.repeats)):
        t = time.perf_counter()
        result = run_sweep(cfg, model=model, ids=ids, log=lambda *_: None)
        sync()
        seconds = time.perf_counter() - t
        if seconds < ours_s:
            ours, ours_s = result, seconds
        layers, d_rs = ours["config"]["layers"], ours["config"]["d_r"]
        config_keys = [key for key in ours["timings"] if key.endswith("_s") and key not in
                       ("load_s", "baseline_s", "calibration_s", "sweep_s", "total_s")]
        if not args.skip_floor:
            blocks = make_blocks(ids, args.seq_len, args.n_blocks)
            got = floor(model, blocks, ours["config"]["batch_size"], min(layers), len(config_keys),
                        with_lm_losses=False)
            got["total_s"] = sum(got[key] for key in
                                 ("forward_body_s", "forward_head_s", "replay_layers_s", "replay_head_s"))
            fl = got if fl is None or got["total_s"] < fl["total_s"] else fl
        if spec is not None and spec_error is None:
            try:
                got = run_spec_sweep(spec, model, ids, layers=tuple(layers), d_r_sweep=tuple(d_rs),
                                     n_blocks=args.n_blocks, seq_len=args.seq_len, calib_blocks=args.calib_blocks,
                                     device=args.device)
                ref = got if ref is None or got["seconds"] < ref["seconds"] else ref
            except (RuntimeError, NotImplementedError) as err:  # e.g. its SVD has no bf16 kernel on CUDA
                spec_error = f"{type(err).__name__}: {err}".splitlines()[0]
                print(f"  spec's own code : fails here: {spec_error}")

    timings = ours["timings"]
    k = len(config_keys)
    per_config_s = sum(timings[key] for key in config_keys) / k
    row = {**run_tags(args.device), "geometry": args.geometry, "dtype": args.dtype, "backend": args.backend,
           "n_blocks": args.n_blocks, "seq_len": args.seq_len, "layers": " ".join(map(str, layers)),
           "d_r": " ".join(map(str, d_rs)), "batch_size": ours["config"]["batch_size"], "repeats": args.repeats,
           "nqpq_s": round(ours_s, 4), "nqpq_baseline_s": round(timings["baseline_s"], 4),
           "nqpq_per_config_s": round(per_config_s, 4), "model_build_s": round(load_s, 3), "data": source,
           "weights": "random"}
    print(f"  nqpq sweep      : {ours_s:8.3f} s   (baseline {timings['baseline_s']:.3f} s, "
          f"calibration {timings['calibration_s']:.3f} s, {per_config_s:.3f} s per configuration x {k})")
    if fl is not None:
        replay_s = (fl["replay_layers_s"] + fl["replay_head_s"]) / k
        row.update(floor_s=round(fl["total_s"], 4), floor_per_config_s=round(replay_s, 4),
                   floor_head_and_loss_per_config_s=round(fl["replay_head_s"] / k, 4),
                   vs_floor=round(ours_s / fl["total_s"], 3), per_config_vs_floor=round(per_config_s / replay_s, 3))
        forward_s = fl["forward_body_s"] + fl["forward_head_s"]
        print(f"  model's floor   : {fl['total_s']:8.3f} s   (forward {forward_s:.3f} s, {replay_s:.3f} s per "
              f"configuration, of which LM head + fp32 loss {fl['replay_head_s'] / k:.3f} s)")
        print(f"  nqpq / floor    : {ours_s / fl['total_s']:8.2f} x   "
              f"(per configuration {per_config_s / replay_s:.2f} x)")
    if spec_error is not None:
        row["spec_error"] = spec_error
    if ref is not None:
        pairs = [(ours["ppl_baseline"], ref["ppl_baseline"]), (ours["ppl_top1"], ref["ppl_top1"]),
                 (ours["ppl_full"], ref["ppl_full"])]
        pairs += [(c["ppl"], r[1]) for c, r in zip(ours["curve"], ref["curve"], strict=True)]
        max_rel = max(abs(a - b) / abs(b) for a, b in pairs)
        speedup = ref["seconds"] / ours_s
        row.update(spec_s=round(ref["seconds"], 4), speedup=round(speedup, 2), max_rel_ppl_diff=f"{max_rel:.2e}")
        print(f"  spec's own code : {ref['seconds']:8.3f} s")
        print(f"  speed-up        : {speedup:8.2f} x   (max relative PPL difference {max_rel:.2e})")
    suffix = "" if gpt2 else f"_{args.geometry}"
    out = args.out or str(RESULTS / f"sweep_{args.device.split(':')[0]}_{args.dtype}{suffix}.csv")
    write_csv(out, [row])
    print(f"  wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

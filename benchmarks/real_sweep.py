"""The default EXP-Q03 sweep on a real model against its floor, in one run (issue 17 item 5).

The sweep needs one baseline pass over every block plus, per configuration (top-1, full and one per d_r:
k = 2 + len(d_r)), the crystallized layers, the final norm and the LM head. This script measures:

- the sweep, as ``nqpq.run_sweep`` runs it (its own ``timings``: load, baseline + calibration, the
  eigendecomposition, each configuration), and its wall time;
- the floor, with the model's own modules and attention (plain transformers/torch, no nqpq op, no hooks but
  one to record the replay's inputs), on the same blocks and batch size: one full forward (body, LM head and
  the loss), and k times the layers from the lowest crystallized one up + final norm + LM head + loss from
  the recorded hidden states, which is what the sweep's prefix replay costs with plain attention;
- nqpq's own ``lm_losses`` on the same final hidden states (the LM head as the sweep computes it);
- the ratio sweep / floor (whole passes and per configuration) and the LM head's share of each.

The spec's own code (the seed's, ``benchmarks/spec_baseline.py``) patches GPT-2's modules only: the ratio
against it is ``benchmarks.sweep``'s (GPT-2 small geometry), which also times this floor on that model.

Default model: SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized to float32) from ``nqpq.sources.fetch`` (its converted
``save_pretrained`` folder, which loads in about a second); default text ``../shared/data/wiki.valid.raw``.

    python -m benchmarks.real_sweep                          # 30 blocks x 256, layers 23-29, d_r 1..32, CPU
    python -m benchmarks.real_sweep --n-blocks 8 --model path/to/SmolLM2-135M-Instruct.Q4_1.gguf
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.common import run_tags, write_csv
from nqpq.experiments.config import SweepConfig, sweep_ranks
from nqpq.experiments.setup import make_blocks_checked, open_run
from nqpq.experiments.sweep import run_sweep
from nqpq.model.lm_head import after_layers
from nqpq.model.losses import lm_losses
from nqpq.model.parts import model_parts
from nqpq.results.stats import ppl_from_losses

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_TEXT = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "wiki.valid.raw"
LOGIT_CHUNK = 1 << 26  # logits per F.linear in the floor's head, as nqpq.model.losses.MAX_LOGIT_ELEMENTS


def default_model() -> str:
    """The converted SmolLM2 folder from ``nqpq.sources.fetch`` (fetched and converted once, into the nqpq cache)."""
    from nqpq.sources.fetch import converted_smollm2

    return str(converted_smollm2())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def head_losses(parts, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-block mean next-token loss with the model's LM head and F.cross_entropy (the model's own loss,
    per block), in chunks of ``LOGIT_CHUNK`` logits."""
    N, T, C = hidden.shape
    flat, target = hidden[:, :-1].reshape(-1, C), labels[:, 1:].reshape(-1)
    chunk = max(1, LOGIT_CHUNK // parts.lm_head.weight.shape[0])
    nll = torch.cat([F.cross_entropy(parts.lm_head(flat[s : s + chunk]).float(), target[s : s + chunk],
                                     reduction="none") for s in range(0, target.numel(), chunk)])
    return nll.view(N, T - 1).double().mean(dim=1)


@torch.no_grad()
def calibration_pass(model, calib: torch.Tensor, batch_size: int, last: int) -> float:
    """Seconds of the model's own forward over held-out calibration blocks, layers 0..``last`` (no head)."""
    parts = model_parts(model)
    device = next(model.parameters()).device

    class Stop(Exception):
        pass

    def stop(module, args, kwargs):
        raise Stop

    handle = (parts.layers[last + 1].register_forward_pre_hook(stop, with_kwargs=True)
              if last + 1 < parts.n_layers else None)
    t = time.perf_counter()
    try:
        for s in range(0, calib.shape[0], batch_size):
            try:
                parts.body(input_ids=calib[s : s + batch_size].to(device), use_cache=False, return_dict=True)
            except Stop:
                pass
    finally:
        if handle is not None:
            handle.remove()
    _sync(device)
    return time.perf_counter() - t


@torch.no_grad()
def floor(model, blocks: torch.Tensor, batch_size: int, start: int, k: int, with_lm_losses: bool = True) -> dict:
    """The floor's parts, in seconds: one full forward (body, head + loss), then k replays of layers
    ``start..`` + final norm (layers) and head + loss (head) from the hidden states the forward recorded;
    nqpq's ``lm_losses`` on the same final hidden states (unless ``with_lm_losses`` is False); and the PPLs
    each computes (all the baseline's)."""
    parts = model_parts(model)
    device = next(model.parameters()).device
    batches = [blocks[s : s + batch_size].to(device) for s in range(0, blocks.shape[0], batch_size)]
    records, finals = [], []
    seen = {}

    def grab(module, args, kwargs):
        kwargs = dict(kwargs)
        hidden = args[0] if args else kwargs.pop("hidden_states")
        seen["rec"] = (hidden, tuple(args[1:]), kwargs)

    out = {"forward_body_s": 0.0, "forward_head_s": 0.0, "replay_layers_s": 0.0, "replay_head_s": 0.0,
           "lm_losses_s": 0.0}
    losses = []
    def keep_last(module, args, output):
        seen["last"] = output[0] if isinstance(output, tuple) else output

    handle = parts.layers[start].register_forward_pre_hook(grab, with_kwargs=True)
    last_handle = parts.layers[-1].register_forward_hook(keep_last)
    after = None
    try:
        for batch in batches:
            _sync(device)
            t = time.perf_counter()
            hidden = parts.body(input_ids=batch, use_cache=False, return_dict=True).last_hidden_state
            _sync(device)
            t1 = time.perf_counter()
            after = after or after_layers(parts, seen.pop("last"), hidden)  # what follows the layers
            losses.append(head_losses(parts, hidden, batch))
            _sync(device)
            out["forward_body_s"] += t1 - t
            out["forward_head_s"] += time.perf_counter() - t1
            records.append(seen.pop("rec"))
            finals.append(hidden)
    finally:
        handle.remove()
        last_handle.remove()
    out["ppl_forward"] = ppl_from_losses(torch.cat(losses))

    replay_ppls = []
    for _ in range(k):
        losses = []
        for batch, (hidden, rest, kwargs) in zip(batches, records):
            _sync(device)
            t = time.perf_counter()
            for layer in parts.layers[start:]:
                o = layer(hidden, *rest, **kwargs)
                hidden = o[0] if isinstance(o, tuple) else o
            hidden = after(hidden)
            _sync(device)
            t1 = time.perf_counter()
            losses.append(head_losses(parts, hidden, batch))
            _sync(device)
            out["replay_layers_s"] += t1 - t
            out["replay_head_s"] += time.perf_counter() - t1
        replay_ppls.append(ppl_from_losses(torch.cat(losses)))
    out["ppl_replay"] = replay_ppls
    if not with_lm_losses:
        return out

    losses = []
    for batch, hidden in zip(batches, finals):
        _sync(device)
        t = time.perf_counter()
        losses.append(lm_losses(model, hidden, batch, parts=parts))
        _sync(device)
        out["lm_losses_s"] += time.perf_counter() - t
    out["ppl_lm_losses"] = ppl_from_losses(torch.cat(losses))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="checkpoint folder or .gguf file (default: SmolLM2 via nqpq fetch)")
    p.add_argument("--text-file", default=str(DEFAULT_TEXT))
    p.add_argument("--n-blocks", type=int, default=30)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--calib-blocks", type=int, default=4)
    p.add_argument("--layers", type=int, nargs="+", default=None, help="default: the model's last quarter")
    p.add_argument("--d-r", type=int, nargs="+", default=None, help="default: 1 2 4 8 16 32 up to the head dim")
    p.add_argument("--device", default="cpu")
    p.add_argument("--backend", default="torch")
    p.add_argument("--batch-size", type=int, default=None, help="default: the sweep's own (default_batch_size)")
    p.add_argument("--out", default=None, help="CSV path (default: benchmarks/results/real_sweep_<device>.csv)")
    args = p.parse_args(argv)
    model_name = args.model or default_model()
    cfg = SweepConfig(model=model_name, text_file=args.text_file, layers=args.layers, d_r=args.d_r,
                      n_blocks=args.n_blocks, seq_len=args.seq_len, calib_blocks=args.calib_blocks,
                      device=args.device, dtype="float32", backend=args.backend, batch_size=args.batch_size,
                      progress=False)

    # (a) the sweep, as a user runs it (it loads the model itself).
    t, cpu = time.perf_counter(), time.process_time()
    results = run_sweep(cfg, log=lambda _line: None)
    sweep_wall, sweep_cpu = time.perf_counter() - t, time.process_time() - cpu
    timings, config = results["timings"], results["config"]
    batch_size, layers, d_rs = config["batch_size"], config["layers"], config["d_r"]
    config_keys = [key for key in timings if key.endswith("_s") and key not in
                   ("load_s", "baseline_s", "calibration_s", "sweep_s", "total_s")]
    k = len(config_keys)  # top1, full and one per d_r (per calibration draw): 2 + len(d_r) by default
    # The held-out calibration set (nqpq's default, blocks after the scored ones) costs a pass of its own.
    heldout = config.get("calib_from", "eval") != "eval" or bool(config.get("calib_text_file"))
    n_calib = cfg.calib_blocks * config.get("calib_draws", 1) if heldout else 0
    del results

    # (b) the floor: the same model, blocks and batch size, plain transformers.
    t = time.perf_counter()
    run = open_run(cfg, None, None, lambda _line: None, "[floor]")
    blocks = make_blocks_checked(run.ids, cfg.seq_len, cfg.n_blocks + n_calib, run.bos_id)
    load_s = time.perf_counter() - t
    parts = model_parts(run.model)
    assert sweep_ranks(cfg, parts.smallest("v_dim", tuple(layers))) == d_rs
    cpu = time.process_time()
    fl = floor(run.model, blocks[: cfg.n_blocks], batch_size, min(layers), k)
    calib_s = calibration_pass(run.model, blocks[cfg.n_blocks :], batch_size, max(layers)) if n_calib else 0.0
    floor_cpu = time.process_time() - cpu

    forward_s = fl["forward_body_s"] + fl["forward_head_s"]
    replay_s = (fl["replay_layers_s"] + fl["replay_head_s"]) / k
    floor_s = forward_s + fl["replay_layers_s"] + fl["replay_head_s"]  # the floor
    floor_cal_s = floor_s + calib_s  # with the held-out calibration pass nqpq's default adds
    floor_head_s = fl["forward_head_s"] + fl["replay_head_s"]
    sweep_s = timings["sweep_s"]  # baseline + calibration through the last configuration (no load)
    # lm_losses runs once per pass: the baseline and each configuration.
    sweep_head_s = (1 + k) * fl["lm_losses_s"]
    stages = [
        ("sweep_load", timings["load_s"], None),
        ("sweep_baseline_and_calibration", timings["baseline_s"], None),
        ("sweep_eigh_and_stats", timings["calibration_s"], None),
        *((f"sweep_{key.removesuffix('_s')}", timings[key], None) for key in config_keys),
        ("sweep_passes", sweep_s, None),
        ("sweep_total", timings["total_s"], None),
        ("sweep_wall", sweep_wall, None),
        ("floor_load", load_s, None),
        ("floor_forward_body", fl["forward_body_s"], None),
        ("floor_forward_head_and_loss", fl["forward_head_s"], None),
        ("floor_forward", forward_s, None),
        ("floor_replay_layers_per_config", fl["replay_layers_s"] / k, None),
        ("floor_replay_head_and_loss_per_config", fl["replay_head_s"] / k, None),
        ("floor_replay_per_config", replay_s, None),
        ("floor_total", floor_s, None),
        ("floor_heldout_calibration_pass", calib_s, None),
        ("floor_total_with_calibration_pass", floor_cal_s, None),
        ("nqpq_lm_losses_per_pass", fl["lm_losses_s"], None),
        ("cpu_sweep_whole_run", sweep_cpu, None),
        ("cpu_floor_whole", floor_cpu, None),
        ("ratio_sweep_passes_over_floor", None, sweep_s / floor_s),
        ("ratio_sweep_per_config_over_floor_per_config", None,
         sum(timings[key] for key in config_keys) / k / replay_s),
        ("ratio_sweep_passes_over_floor_with_calibration_pass", None, sweep_s / floor_cal_s),
        ("ratio_sweep_total_over_floor_plus_load", None, timings["total_s"] / (floor_cal_s + load_s)),
        ("share_head_in_floor", None, floor_head_s / floor_s),
        ("share_lm_losses_in_sweep", None, sweep_head_s / sweep_s),
    ]
    ppl_rel = max(abs(x / fl["ppl_forward"] - 1) for x in [*fl["ppl_replay"], fl["ppl_lm_losses"]])
    tags = {**run_tags(args.device), "transformers": _transformers_version(),
            "model": Path(model_name).name, "dtype": "float32", "backend": args.backend,
            "n_blocks": cfg.n_blocks, "seq_len": cfg.seq_len, "batch_size": batch_size,
            "layers": " ".join(map(str, layers)), "d_r": " ".join(map(str, d_rs)), "configs": k,
            "threads": torch.get_num_threads(), "attn_implementation": run.model.config._attn_implementation,
            "ppl_baseline": round(fl["ppl_forward"], 6), "floor_ppl_max_rel_diff": f"{ppl_rel:.1e}"}
    rows = [{**tags, "stage": name, "seconds": None if s is None else round(s, 3),
             "ratio": None if r is None else round(r, 3)} for name, s, r in stages]
    print(f"{Path(model_name).name}: {cfg.n_blocks} x {cfg.seq_len} tokens, layers {layers[0]}-{layers[-1]}, "
          f"d_r {' '.join(map(str, d_rs))} ({k} configurations), batch {batch_size}, "
          f"{torch.get_num_threads()} threads, {tags['device']}")
    for name, s, r in stages:
        print(f"  {name:40s} {'' if s is None else f'{s:9.2f} s'}{'' if r is None else f'{r:9.3f}'}")
    print(f"  floor PPL {fl['ppl_forward']:.4f} (replays and lm_losses within {ppl_rel:.1e} relative)")
    if not math.isclose(fl["ppl_forward"], fl["ppl_lm_losses"], rel_tol=1e-4):
        print("  WARNING: the floor's PPL and nqpq's lm_losses disagree")
    out = args.out or str(RESULTS / f"real_sweep_{torch.device(args.device).type}.csv")
    write_csv(out, rows)
    print(f"wrote {out}")
    return 0


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


if __name__ == "__main__":
    raise SystemExit(main())

"""The EXP-Q03 sweep: baseline, calibration, top-1 / full / low-rank perplexities, verdict.

Fast by construction: the layers below the lowest crystallized layer run once
(``PrefixRunner``), blocks are evaluated in batches, calibration rides along the
baseline pass, and under torchrun the blocks are split across ranks.
"""

from __future__ import annotations

import contextlib
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch

from . import distributed
from .calibration import GramAccumulator, ResidualBasis, basis_from_grams, reduce_grams
from .data import (
    ByteTokenizer,
    NqpqError,
    demo_model,
    demo_rows,
    join_rows,
    load_model,
    load_tokenizer,
    parse_dtype,
    rows_from_file,
    rows_from_hub,
    tokenize,
)
from .evaluate import PrefixRunner, make_blocks, ppl_from_losses
from .integration import crystallize, observe_residuals
from .ops import BACKENDS

RECOVERY_TARGET = 90.0  # % of the top-1 loss a rank must recover to call the residual compressible


@dataclass
class SweepConfig:
    """Every setting of an EXP-Q03 run (the CLI flags, one for one)."""

    model: str = "gpt2"
    text_file: str | None = None
    tokenizer: str | None = None
    layers: Sequence[int] = (9, 10, 11)
    d_r: Sequence[int] = (1, 2, 4, 8, 16, 32)
    n_blocks: int = 30
    seq_len: int = 256
    calib_blocks: int = 4
    device: str | None = None
    dtype: str = "float32"
    backend: str = "auto"
    batch_size: int | None = None
    seed: int = 42
    out: str | None = None
    demo: bool = False
    progress: bool = True


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def default_batch_size(device: torch.device, seq_len: int, n_embd: int, n_head: int, n_blocks: int) -> int:
    """Blocks per batch: 8 on CPU (larger GEMMs, bounded memory), as many as fit a quarter of free memory on CUDA."""
    if device.type != "cuda":
        return min(n_blocks, 8)
    free, _ = torch.cuda.mem_get_info(device)
    # Per block: ~16 activations of [T, C] in the layer plus two T×T fp32 buffers per head (reference path).
    per_block = seq_len * n_embd * 4 * 16 + n_head * seq_len * seq_len * 4 * 2
    return max(1, min(n_blocks, int(free * 0.25) // per_block))


def _check_config(cfg: SweepConfig, model_config) -> None:
    n_layer, n_head, n_embd = model_config.n_layer, model_config.n_head, model_config.n_embd
    d_head = n_embd // n_head
    if not cfg.layers:
        raise NqpqError("--layers: choose at least one layer")
    bad = [li for li in cfg.layers if not 0 <= li < n_layer]
    if bad:
        raise NqpqError(f"--layers {bad}: the model has layers 0..{n_layer - 1}")
    if len(set(cfg.layers)) != len(cfg.layers):
        raise NqpqError(f"--layers repeats an index: {list(cfg.layers)}")
    bad = [d for d in cfg.d_r if not 0 <= d <= d_head]
    if bad:
        raise NqpqError(f"--d-r {bad}: each d_r must be in 0..{d_head} (the head dimension)")
    if not cfg.d_r:
        raise NqpqError("--d-r: give at least one rank")
    if not 2 <= cfg.seq_len <= model_config.n_positions:
        raise NqpqError(f"--seq-len {cfg.seq_len}: must be in 2..{model_config.n_positions} (the model's positions)")
    if cfg.n_blocks < 1:
        raise NqpqError(f"--n-blocks {cfg.n_blocks}: must be at least 1")
    if not 1 <= cfg.calib_blocks <= cfg.n_blocks:
        raise NqpqError(f"--calib-blocks {cfg.calib_blocks}: must be in 1..--n-blocks ({cfg.n_blocks})")
    if cfg.batch_size is not None and cfg.batch_size < 1:
        raise NqpqError(f"--batch-size must be at least 1, got {cfg.batch_size}")
    if cfg.backend not in BACKENDS:
        raise NqpqError(f"--backend must be one of {BACKENDS}, got {cfg.backend!r}")


def _load(cfg: SweepConfig, device: str, dtype: torch.dtype):
    """(model, token ids, text source, tokenizer name)."""
    if cfg.demo:
        tokenizer = load_tokenizer(cfg.tokenizer) if cfg.tokenizer else ByteTokenizer()
        vocab = len(tokenizer) if cfg.tokenizer else ByteTokenizer.vocab_size
        model = demo_model(vocab, cfg.seed, device, dtype)
        tok_name = cfg.tokenizer or "utf-8 bytes"
    else:
        tokenizer = load_tokenizer(cfg.tokenizer or cfg.model)
        model = load_model(cfg.model, device, dtype)
        tok_name = cfg.tokenizer or cfg.model
    if cfg.text_file:
        rows, source = rows_from_file(cfg.text_file), cfg.text_file
    elif cfg.demo:
        rows, source = demo_rows(), "standard-library docstrings (demo)"
    else:
        rows, source = rows_from_hub(), "wikitext/wikitext-103-raw-v1 validation"
    ids = tokenize(join_rows(rows), tokenizer)
    return model, ids, source, tok_name


def _plan_batches(n_blocks: int, calib_blocks: int, batch_size: int) -> tuple[list[torch.Tensor], int]:
    """This rank's block batches, calibration blocks first and in batches of their own.

    Returns (batches as index tensors, how many leading batches hold calibration blocks).
    """
    r, w = distributed.rank(), distributed.world_size()
    calib = [i for i in range(calib_blocks) if i % w == r]
    rest = [i for i in range(calib_blocks, n_blocks) if i % w == r]

    def chunks(idx):
        return [torch.tensor(idx[s : s + batch_size]) for s in range(0, len(idx), batch_size)]

    calib_batches = chunks(calib)
    return calib_batches + chunks(rest), len(calib_batches)


def _gather_losses(local: torch.Tensor, batches: list[torch.Tensor], n_blocks: int) -> torch.Tensor:
    """Place this rank's per-block losses at their global positions and sum over ranks."""
    full = torch.zeros(n_blocks, dtype=torch.float64)
    if batches:
        full[torch.cat(batches)] = local
    return distributed.all_reduce_sum(full)


def _versions(device: torch.device) -> dict:
    import transformers

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "cpu")
    return {"torch": torch.__version__, "transformers": transformers.__version__, "triton": triton_version,
            "python": sys.version.split()[0], "device_name": name}


def run_sweep(
    cfg: SweepConfig,
    *,
    model: torch.nn.Module | None = None,
    ids: torch.Tensor | None = None,
    log: Callable[[str], None] | None = None,
) -> dict:
    """Run EXP-Q03 as configured; print the spec's report; return the results dict.

    Pass ``model`` (a loaded ``GPT2LMHeadModel``, on the device you want) and ``ids``
    (1-D token ids) to skip loading; ``cfg.model`` / ``cfg.text_file`` then only label the run.

    Raises ``NqpqError`` for bad settings or unavailable inputs (the CLI prints it).
    Writing files is the caller's job (``nqpq.report.write_results``).
    """
    from tqdm.auto import tqdm

    timings: dict = {}
    t0 = time.perf_counter()
    run = open_run(cfg, model, ids, log, "[EXP-Q03]")
    model, ids, device, say, is_main = run.model, run.ids, run.device, run.say, run.is_main
    source, tok_name = run.source, run.tokenizer
    _check_config(cfg, model.config)
    blocks = make_blocks_checked(ids, cfg.seq_len, cfg.n_blocks)
    timings["load_s"] = time.perf_counter() - t0

    layers = tuple(cfg.layers)
    d_head = model.config.n_embd // model.config.n_head
    batch_size = cfg.batch_size or default_batch_size(
        device, cfg.seq_len, model.config.n_embd, model.config.n_head, cfg.n_blocks
    )
    batches, n_calib_batches = _plan_batches(cfg.n_blocks, cfg.calib_blocks, batch_size)
    runner = PrefixRunner(model, blocks, batches, start=min(layers))
    n_local = sum(len(b) for b in batches)

    def bar(desc):
        return tqdm(total=n_local, desc=desc, unit="blk", leave=False, disable=not (cfg.progress and is_main))

    def timed_losses(key, desc, fn):
        t = time.perf_counter()
        with bar(desc) as pbar:
            local = fn(pbar)
        losses = _gather_losses(local, batches, cfg.n_blocks)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        timings[key] = time.perf_counter() - t
        return losses

    # Calibration rides along the baseline pass: the calibration batches come first and
    # their crystallized layers are observed (the model's own attention output is kept).
    t_sweep = time.perf_counter()
    sink = GramAccumulator()

    def observe_calibration(i):
        if i < n_calib_batches:
            return observe_residuals(model, layers, sink, backend=cfg.backend)
        return contextlib.nullcontext()

    base_losses = timed_losses(
        "baseline_s", "baseline + calibration",
        lambda pbar: runner.capture_baseline(pbar, context_for=observe_calibration),
    )
    ppl_fp = ppl_from_losses(base_losses)
    say(f" PPL baseline (full softmax) = {ppl_fp:.3f}")

    say(f"[EXP-Q03] SVD of excitation residuals eps for layers {layers}...")
    t = time.perf_counter()
    basis = basis_from_grams(reduce_grams(sink.grams, layers, model))
    timings["calibration_s"] = time.perf_counter() - t  # the eigendecomposition; Σ εεᵀ came with the baseline
    spectrum, mean_eff = _report_spectrum(basis, d_head, say)

    def config_ppl(mode, d_r, desc):
        with crystallize(model, layers, mode=mode, basis=basis.basis, d_r=d_r, backend=cfg.backend):
            losses = timed_losses(f"{desc}_s", desc, runner.losses)
        return ppl_from_losses(losses)

    ppl_a = config_ppl("top1", None, "top1")
    ppl_b = config_ppl("full", None, "full")
    say(f" [A] Top-1 pure (V_i*) = {ppl_a:.3f} dPPL={ppl_a - ppl_fp:+.3f}")
    say(f" [B] Top-1 + full eps (sanity) = {ppl_b:.3f} dPPL={ppl_b - ppl_fp:+.3f} (should ~ 0)")
    say(f"\n [C] Top-1 + low-rank residual (d_head={d_head}):")
    curve = []
    for d_r in cfg.d_r:
        ppl_c = config_ppl("lowrank", d_r, f"lowrank_d{d_r}")
        recovered = (ppl_a - ppl_c) / max(ppl_a - ppl_fp, 1e-9) * 100
        curve.append({"d_r": d_r, "ppl": ppl_c, "delta_ppl": ppl_c - ppl_fp, "recovered_pct": recovered})
        say(f" d_r={d_r:2d}/{d_head}: PPL={ppl_c:8.3f} dPPL={ppl_c - ppl_fp:+7.3f} "
            f"recovered={recovered:5.1f}% of Top-1 loss")
    timings["sweep_s"] = time.perf_counter() - t_sweep
    timings["total_s"] = time.perf_counter() - t0

    verdict = _verdict(curve, d_head, say)
    if cfg.demo:
        say(" NOTE: DEMO run on RANDOM weights: the pipeline is real, the numbers say nothing about GPT-2.")
    config = {k: v for k, v in asdict(cfg).items() if k != "progress"}
    if cfg.demo:
        config["model"] = "demo: random-init GPT-2 small geometry"
    config.update(layers=list(layers), d_r=list(cfg.d_r), device=str(device), batch_size=batch_size,
                  world_size=distributed.world_size(), text_source=source, tokenizer=tok_name,
                  n_tokens=int(ids.numel()), d_head=d_head, random_weights=cfg.demo, **_versions(device))
    return {
        "ppl_baseline": ppl_fp, "ppl_top1": ppl_a, "ppl_full": ppl_b, "curve": curve,
        "spectrum": spectrum, "mean_eff_dim": mean_eff, "verdict": verdict, "config": config,
        "timings": timings, "basis": basis,
    }


@dataclass
class RunInputs:
    """What a run works on, once torchrun is joined, the device resolved and the model loaded."""

    model: torch.nn.Module
    ids: torch.Tensor
    device: torch.device
    say: Callable[[str], None]  # prints on the main rank only
    is_main: bool
    source: str  # where the text came from
    tokenizer: str


def open_run(
    cfg: SweepConfig,
    model: torch.nn.Module | None,
    ids: torch.Tensor | None,
    log: Callable[[str], None] | None,
    tag: str,
) -> RunInputs:
    """Join torchrun, resolve ``cfg.device``, seed, and load the model and token ids (or take the caller's).

    Shared by ``run_sweep`` and ``nqpq.scan.run_scan``; ``tag`` prefixes the loading message.
    """
    device_name = distributed.init(cfg.device or default_device())
    is_main = distributed.is_main()
    say = (log or print) if is_main else (lambda *_: None)
    if str(device_name).startswith("cuda") and not torch.cuda.is_available():
        raise NqpqError(f"--device {device_name}: CUDA is not available on this machine (use --device cpu)")
    try:
        device = torch.device(device_name)
    except RuntimeError as err:
        raise NqpqError(f"--device {device_name!r} is not a valid device: {err}") from err
    dtype = parse_dtype(cfg.dtype)
    torch.manual_seed(cfg.seed)
    if model is None:
        say(f"{tag} Loading {'random-init GPT-2 (DEMO: random weights)' if cfg.demo else cfg.model}...")
        model, ids, source, tok_name = _load(cfg, str(device), dtype)
    else:
        if ids is None:
            raise NqpqError("a run given model=... needs ids (1-D token ids) too")
        device = next(model.parameters()).device
        source, tok_name = "ids given by the caller", "given by the caller"
        model.eval()
    return RunInputs(model, ids, device, say, is_main, source, tok_name)


def make_blocks_checked(ids: torch.Tensor, seq_len: int, n_blocks: int) -> torch.Tensor:
    try:
        return make_blocks(ids, seq_len, n_blocks)
    except ValueError as err:
        raise NqpqError(f"--n-blocks/--seq-len: {err}") from err


def _report_spectrum(basis: ResidualBasis, d_head: int, say) -> tuple[list[dict], float]:
    say(f"\n Residual effective dimension (cumulative variance, d_head={d_head}):")
    say(f" {'layer/head':>12} | r=1 r=2 r=4 r=8 r=16")
    spectrum, eff_dims = [], []
    for layer in basis.layers:
        cv_all, r90_all = basis.cumulative_variance[layer], basis.r90[layer]
        for head in range(cv_all.shape[0]):
            cv = cv_all[head]
            r90 = int(r90_all[head])
            eff_dims.append(r90)
            spectrum.append({"layer": layer, "head": head, "cumulative_variance": cv.tolist(), "r90": r90})
            if head == 0:  # head 0 of each layer keeps the table short, as in the spec

                def at(r, cv=cv):
                    return cv[min(r - 1, len(cv) - 1)].item()

                say(f" L{layer:2d}H{head:2d} | {at(1):.2f} {at(2):.2f} {at(4):.2f} {at(8):.2f} {at(16):.2f}")
    mean_eff = statistics.mean(eff_dims)
    say(f" mean effective dim (r for 90% var): {mean_eff:.1f} / {d_head}")
    return spectrum, mean_eff


def _verdict(curve: list[dict], d_head: int, say) -> dict:
    say(f"\n{'=' * 66}\n[EXP-Q03 VERDICT] is the excitation residual compressible?\n{'=' * 66}")
    good = [c["d_r"] for c in curve if c["recovered_pct"] >= RECOVERY_TARGET]
    best = max(curve, key=lambda c: c["recovered_pct"])
    if good:
        dr_min = min(good)
        say(f" => YES: d_r={dr_min}/{d_head} recovers >=90% of the Top-1 loss. Deep layers are "
            f"nearly crystalline + a rank-{dr_min} excitation. Compressible attention found.")
    else:
        dr_min = None
        say(f" => PARTIAL: best is d_r={best['d_r']} recovering {best['recovered_pct']:.0f}%. The residual is "
            f"not strongly low-rank; excitations are spread across many value dimensions.")
    return {"compressible": dr_min is not None, "d_r_min": dr_min, "best_d_r": best["d_r"],
            "best_recovered_pct": best["recovered_pct"]}

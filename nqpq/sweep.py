"""The EXP-Q03 sweep: baseline, calibration, top-1 / full / low-rank perplexities, verdict.

Fast by construction: the layers below the lowest crystallized layer run once
(``PrefixRunner``), blocks are evaluated in batches, calibration rides along the
baseline pass, and under torchrun the blocks are split across ranks.
"""

from __future__ import annotations

import math
import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch

from . import distributed
from .calibration import GramAccumulator, ResidualBasis, basis_from_grams, reduce_grams
from .crystallinity import CrystallinityAccumulator, format_table
from .data import (
    ByteTokenizer,
    NqpqError,
    check_ids_fit,
    demo_model,
    demo_rows,
    ids_for_blocks,
    load_model,
    load_tokenizer,
    open_text_file,
    parse_dtype,
    rows_from_file,
    rows_from_hub,
)
from .evaluate import PrefixRunner, make_blocks, ppl_from_losses
from .integration import crystallize, observe_residuals
from .ops import BACKENDS

SWEEP_FORMAT_VERSION = 1  # results.json layout; `nqpq report` refuses others
RECOVERY_TARGET = 90.0  # % of the top-1 loss a rank must recover to call the residual compressible
# At or below this fraction of the baseline PPL, top-1 loses nothing measurable: "recovered %" of a
# loss that is not there is noise divided by ~0, so it is reported as null and the verdict as inconclusive.
NO_LOSS_REL = 1e-6
INCONCLUSIVE = "top-1 loses nothing here; the test is inconclusive"
# A crystallized perplexity that is NaN or infinite (an overflow in the model's dtype) recovers nothing measurable.
NOT_FINITE = "a crystallized perplexity is not finite (NaN or inf); the test is inconclusive"
SPEC_D_R = (1, 2, 4, 8, 16, 32)  # the spec's ranks; the default keeps those <= the head dimension
_DEVICE_RE = re.compile(r"(cpu|cuda(:\d+)?)")


@dataclass
class SweepConfig:
    """Every setting of an EXP-Q03 run (the CLI flags, one for one)."""

    model: str = "gpt2"
    text_file: str | None = None
    tokenizer: str | None = None
    layers: Sequence[int] | None = None  # None: the model's default_layers (GPT-2 small: 9 10 11)
    d_r: Sequence[int] | None = None  # None: SPEC_D_R up to the head dimension
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


# The CUDA grid's y dimension is at most 65535: keep batch · Hq (one program row per block and head) under it.
CUDA_GRID_Y = 65535
BATCH_MEMORY_FRACTION = 0.25  # of the free memory measured at the start; the rest is for everything else


def free_memory(device: torch.device) -> int:
    """Bytes free on ``device``: CUDA's free memory, or the host's available RAM (``/proc/meminfo``)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def batch_bytes_per_block(parts, hidden: int, seq_len: int, dtype: torch.dtype) -> int:
    """Peak bytes one block adds to a batch, for the model's real dtype.

    - the layer's activations: ~16 tensors of [T, hidden] (attention projections, MLP at 4x hidden);
    - the model's own eager attention: scores and probabilities, [Hq, T, T] each, in the model dtype;
    - the reference op (CPU and the "torch" backend): two fp32 [Hq, T, T] buffers, and ε [Hq, T, D] fp32;
    - the kernel's Gram partials: [Hq · ⌈T/16⌉, D, D] fp32 (the smallest row tile), when calibrating.
    """
    elem = torch.finfo(dtype).bits // 8
    T, H, D = seq_len, parts.n_heads, parts.head_dim
    activations = 16 * T * hidden * elem
    eager_scores = 2 * H * T * T * elem
    reference = 2 * H * T * T * 4 + 2 * H * T * D * 4
    gram_partials = H * -(-T // 16) * D * D * 4
    return activations + eager_scores + reference + gram_partials


def default_batch_size(device: torch.device, parts, seq_len: int, n_blocks: int, dtype: torch.dtype, *,
                       hidden: int | None = None, free: int | None = None, n_records: int = 1) -> int:
    """Blocks per batch: as many as fit ``BATCH_MEMORY_FRACTION`` of the free memory (CUDA memory, or the
    host's available RAM on CPU), per ``batch_bytes_per_block``, after the prefix record of every block
    (the hidden state entering each of ``n_records`` replay start layers, [n_blocks, T, hidden] each, kept
    for the whole run) and, for a 16-bit model, the fp32 copy of the LM head's weight that ``lm_losses`` forms
    the logits with (2 GiB at Llama-3-8B's 128256 × 4096) are set aside; on CUDA also batch · Hq <= 65535 (the
    grid limit)."""
    hidden = hidden or parts.n_heads * parts.head_dim
    budget = int((free_memory(device) if free is None else free) * BATCH_MEMORY_FRACTION)
    record = n_records * n_blocks * seq_len * hidden * (torch.finfo(dtype).bits // 8)
    head_fp32 = 0 if dtype == torch.float32 else parts.lm_head.weight.numel() * 4
    budget = max(budget - record - head_fp32, budget // 4)  # a record that does not fit is kept off the device
    fit = budget // batch_bytes_per_block(parts, hidden, seq_len, dtype)
    if device.type == "cuda":
        fit = min(fit, CUDA_GRID_Y // parts.n_heads)
    return max(1, min(n_blocks, fit))


def check_flags(cfg: SweepConfig) -> None:
    """Every check that needs no model, made before anything is loaded (bad flags fail in seconds)."""
    if cfg.n_blocks < 1:
        raise NqpqError(f"--n-blocks {cfg.n_blocks}: must be at least 1")
    if cfg.seq_len < 2:
        raise NqpqError(f"--seq-len {cfg.seq_len}: must be at least 2 (one prediction per block)")
    if not 1 <= cfg.calib_blocks <= cfg.n_blocks:
        raise NqpqError(f"--calib-blocks {cfg.calib_blocks}: must be in 1..--n-blocks ({cfg.n_blocks})")
    if cfg.batch_size is not None and cfg.batch_size < 1:
        raise NqpqError(f"--batch-size must be at least 1, got {cfg.batch_size}")
    if cfg.backend not in BACKENDS:
        raise NqpqError(f"--backend must be one of {BACKENDS}, got {cfg.backend!r}")
    parse_dtype(cfg.dtype)
    if cfg.device is not None and not _DEVICE_RE.fullmatch(str(cfg.device)):
        raise NqpqError(f"--device {cfg.device!r}: nqpq runs on cpu, cuda or cuda:N")
    if cfg.layers is not None:
        if not cfg.layers:
            raise NqpqError("--layers: choose at least one layer")
        if any(li < 0 for li in cfg.layers):
            raise NqpqError(f"--layers {[li for li in cfg.layers if li < 0]}: layer indices start at 0")
        if len(set(cfg.layers)) != len(cfg.layers):
            raise NqpqError(f"--layers repeats an index: {list(cfg.layers)}")
    if cfg.d_r is not None:
        if not cfg.d_r:
            raise NqpqError("--d-r: give at least one rank")
        if any(d < 0 for d in cfg.d_r):
            raise NqpqError(f"--d-r {[d for d in cfg.d_r if d < 0]}: ranks must be >= 0")
    if cfg.text_file:
        open_text_file(cfg.text_file).close()


def _check_model_fit(cfg: SweepConfig, parts, layers: Sequence[int], d_rs: Sequence[int]) -> None:
    """The checks that need the model's geometry (``nqpq.models.ModelParts``)."""
    bad = [li for li in layers if not 0 <= li < parts.n_layers]
    if bad:
        raise NqpqError(f"--layers {bad}: the model has layers 0..{parts.n_layers - 1}")
    bad = [d for d in d_rs if not 0 <= d <= parts.head_dim]
    if bad:
        raise NqpqError(f"--d-r {bad}: each d_r must be in 0..{parts.head_dim} (the head dimension)")
    if parts.max_positions is not None and cfg.seq_len > parts.max_positions:
        raise NqpqError(f"--seq-len {cfg.seq_len}: must be in 2..{parts.max_positions} (the model's positions)")


def sweep_ranks(cfg: SweepConfig, head_dim: int) -> list[int]:
    """The ranks to sweep, deduplicated and sorted: ``cfg.d_r``, or the spec's ranks up to ``head_dim``."""
    if cfg.d_r is None:
        return [d for d in SPEC_D_R if d <= head_dim]
    return sorted(set(cfg.d_r))


def _load(cfg: SweepConfig, device: str, dtype: torch.dtype):
    """(model, token ids, text source, tokenizer name).

    Tokenizer and text come first (no model needed to find a bad text file), and only the
    ``n_blocks × seq_len`` tokens the blocks use are read and tokenized.
    """
    if cfg.demo:
        tokenizer = load_tokenizer(cfg.tokenizer) if cfg.tokenizer else ByteTokenizer()
        tok_name = cfg.tokenizer or "utf-8 bytes"
    else:
        tokenizer = load_tokenizer(cfg.tokenizer or cfg.model)
        tok_name = cfg.tokenizer or cfg.model
    vocab = len(tokenizer) if cfg.tokenizer or not cfg.demo else ByteTokenizer.vocab_size
    if cfg.text_file:
        rows, source = rows_from_file(cfg.text_file), cfg.text_file
    elif cfg.demo:
        rows, source = demo_rows(), "standard-library docstrings (demo)"
    else:
        rows, source = rows_from_hub(), "wikitext/wikitext-103-raw-v1 validation"
    ids = ids_for_blocks(rows, tokenizer, cfg.n_blocks * cfg.seq_len)
    model = demo_model(vocab, cfg.seed, device, dtype) if cfg.demo else load_model(cfg.model, device, dtype)
    check_ids_fit(ids, model, vocab)
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

    Pass ``model`` (a loaded decoder-only causal LM, on the device you want) and ``ids``
    (1-D token ids) to skip loading; ``cfg.model`` / ``cfg.text_file`` then only label the run.
    ``cfg.layers`` None means the model's default layers, ``cfg.d_r`` None the spec's ranks up
    to the head dimension; the ranks are swept in increasing order, each once.

    Raises ``NqpqError`` for bad settings or unavailable inputs (the CLI prints it).
    Writing files is the caller's job (``nqpq.report.write_results``).
    """
    from tqdm.auto import tqdm

    from .models import model_parts

    check_flags(cfg)
    timings: dict = {}
    t0 = time.perf_counter()
    run = open_run(cfg, model, ids, log, "[EXP-Q03]")
    model, ids, device, say, is_main = run.model, run.ids, run.device, run.say, run.is_main
    parts = model_parts(model)
    layers = tuple(parts.default_layers if cfg.layers is None else cfg.layers)
    d_rs = sweep_ranks(cfg, parts.head_dim)
    _check_model_fit(cfg, parts, layers, d_rs)
    blocks = make_blocks_checked(ids, cfg.seq_len, cfg.n_blocks)
    timings["load_s"] = time.perf_counter() - t0

    model_dtype = next(model.parameters()).dtype
    batch_size = cfg.batch_size or default_batch_size(
        device, parts, cfg.seq_len, cfg.n_blocks, model_dtype, hidden=getattr(model.config, "hidden_size", None))
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

    # Calibration and the crystallinity statistics ride along the baseline pass: the crystallized
    # layers of every batch are observed (the model's own attention output is kept); the calibration
    # batches come first and also feed Σ εεᵀ.
    t_sweep = time.perf_counter()
    sink = GramAccumulator()
    stats = CrystallinityAccumulator(layers, parts.n_heads)

    def observe_calibration(i):
        return observe_residuals(model, layers, sink if i < n_calib_batches else None, backend=cfg.backend,
                                 stats_sink=stats)

    base_losses = timed_losses(
        "baseline_s", "baseline + calibration",
        lambda pbar: runner.capture_baseline(pbar, context_for=observe_calibration),
    )
    ppl_fp = finite_baseline(ppl_from_losses(base_losses), model_dtype)

    t = time.perf_counter()
    basis = basis_from_grams(reduce_grams(sink.grams, layers, model))
    crystallinity = stats.results()
    timings["calibration_s"] = time.perf_counter() - t  # the eigendecomposition; Σ εεᵀ came with the baseline
    spectrum, mean_eff = _spectrum(basis)

    def config_ppl(mode, d_r, desc):
        with crystallize(model, layers, mode=mode, basis=basis.basis, d_r=d_r, backend=cfg.backend):
            losses = timed_losses(f"{desc}_s", desc, runner.losses)
        return ppl_from_losses(losses)

    ppl_a = config_ppl("top1", None, "top1")
    ppl_b = config_ppl("full", None, "full")
    curve = []
    for d_r in d_rs:
        ppl_c = config_ppl("lowrank", d_r, f"lowrank_d{d_r}")
        recovered = recovered_pct(ppl_fp, ppl_a, ppl_c)
        curve.append({"d_r": d_r, "ppl": ppl_c, "delta_ppl": ppl_c - ppl_fp, "recovered_pct": recovered})
    timings["sweep_s"] = time.perf_counter() - t_sweep
    timings["total_s"] = time.perf_counter() - t0

    verdict = _verdict(curve, ppl_fp, ppl_a)
    config = results_config(cfg, run, parts, layers, d_rs, batch_size, blocks)
    results = {
        "kind": "sweep", "format_version": SWEEP_FORMAT_VERSION,
        "ppl_baseline": ppl_fp, "ppl_top1": ppl_a, "ppl_full": ppl_b, "curve": curve,
        "spectrum": spectrum, "mean_eff_dim": mean_eff, "verdict": verdict, "crystallinity": crystallinity,
        "config": config,
        "timings": timings, "basis": basis,
    }
    print_sweep_report(results, say)
    return results


def print_sweep_report(results: dict, say: Callable[[str], None] = print) -> None:
    """The spec's printed report, from a sweep's results dict alone (the run and ``nqpq report`` both call it)."""
    cfg = results["config"]
    d_head, ppl_fp = cfg["d_head"], results["ppl_baseline"]
    if "family" in cfg:
        say(f" model: {describe_geometry(cfg)}")
    say(f" PPL baseline (full softmax) = {ppl_fp:.3f}")
    say(f"[EXP-Q03] SVD of excitation residuals eps for layers {tuple(cfg['layers'])}...")
    say(f"\n Residual effective dimension (cumulative variance, d_head={d_head}):")
    say(f" {'layer/head':>12} | r=1 r=2 r=4 r=8 r=16")
    for s in results["spectrum"]:
        if s["head"] == 0:  # head 0 of each layer keeps the table short, as in the spec
            cv = s["cumulative_variance"]

            def at(r, cv=cv):
                return cv[min(r - 1, len(cv) - 1)]

            say(f" L{s['layer']:2d}H{s['head']:2d} | {at(1):.2f} {at(2):.2f} {at(4):.2f} {at(8):.2f} {at(16):.2f}")
    say(f" mean effective dim (r for 90% var): {results['mean_eff_dim']:.1f} / {d_head}")
    ppl_a, ppl_b = results["ppl_top1"], results["ppl_full"]
    say(f" [A] Top-1 pure (V_i*) = {ppl_a:.3f} dPPL={ppl_a - ppl_fp:+.3f}")
    say(f" [B] Top-1 + full eps (sanity) = {ppl_b:.3f} dPPL={ppl_b - ppl_fp:+.3f} (should ~ 0)")
    say(f"\n [C] Top-1 + low-rank residual (d_head={d_head}):")
    for c in results["curve"]:
        recovered = "  n/a" if c["recovered_pct"] is None else f"{c['recovered_pct']:5.1f}%"
        say(f" d_r={c['d_r']:2d}/{d_head}: PPL={c['ppl']:8.3f} dPPL={c['delta_ppl']:+7.3f} "
            f"recovered={recovered} of Top-1 loss")
    say(f"\n{'=' * 66}\n[EXP-Q03 VERDICT] is the excitation residual compressible?\n{'=' * 66}")
    verdict = results["verdict"]
    if verdict["compressible"] is None and verdict["explanation"] != INCONCLUSIVE:
        say(f" => INCONCLUSIVE: {verdict['explanation']}.")
    elif verdict["compressible"] is None:
        say(f" => INCONCLUSIVE: {verdict['explanation']} (top-1 dPPL={ppl_a - ppl_fp:+.3g} <= {NO_LOSS_REL:g} x "
            "baseline): there is no loss for a low-rank residual to recover.")
    elif verdict["compressible"]:
        dr_min = verdict["d_r_min"]
        say(f" => YES: d_r={dr_min}/{d_head} recovers >=90% of the Top-1 loss. Deep layers are "
            f"nearly crystalline + a rank-{dr_min} excitation. Compressible attention found.")
    else:
        say(f" => PARTIAL: best is d_r={verdict['best_d_r']} recovering {verdict['best_recovered_pct']:.0f}%. "
            "The residual is not strongly low-rank; excitations are spread across many value dimensions.")
    say("")
    for line in format_table(results["crystallinity"]):
        say(line)
    if cfg["random_weights"]:
        say(" NOTE: DEMO run on RANDOM weights: the pipeline is real, the numbers say nothing about GPT-2.")


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
        check_ids_fit(ids, model)
    return RunInputs(model, ids, device, say, is_main, source, tok_name)


def results_config(cfg: SweepConfig, run: RunInputs, parts, layers: Sequence[int], d_rs: Sequence[int],
                   batch_size: int, blocks: torch.Tensor) -> dict:
    """results.json's ``config`` (sweep and scan): the settings as run, the text, the versions, and the model's
    own dtype and geometry whatever ``cfg`` says (a model passed in keeps its dtype)."""
    config = {k: v for k, v in asdict(cfg).items() if k != "progress"}
    if cfg.demo:
        config["model"] = "demo: random-init GPT-2 small geometry"
    config.update(layers=list(layers), d_r=list(d_rs), device=str(run.device), batch_size=batch_size,
                  dtype=str(next(run.model.parameters()).dtype).removeprefix("torch."),
                  world_size=distributed.world_size(), text_source=run.source, tokenizer=run.tokenizer,
                  n_tokens=int(blocks.numel()), d_head=parts.head_dim, random_weights=cfg.demo,
                  **geometry(parts, layers), **_versions(run.device))
    return config


def make_blocks_checked(ids: torch.Tensor, seq_len: int, n_blocks: int) -> torch.Tensor:
    try:
        return make_blocks(ids, seq_len, n_blocks)
    except ValueError as err:
        raise NqpqError(f"--n-blocks/--seq-len: {err}") from err


def _spectrum(basis: ResidualBasis) -> tuple[list[dict], float]:
    """Per (layer, head): cumulative variance of ε and r90; and the mean r90."""
    spectrum = []
    for layer in basis.layers:
        cv_all, r90_all = basis.cumulative_variance[layer], basis.r90[layer]
        for head in range(cv_all.shape[0]):
            spectrum.append({"layer": layer, "head": head, "cumulative_variance": cv_all[head].tolist(),
                             "r90": int(r90_all[head])})
    return spectrum, statistics.mean(s["r90"] for s in spectrum)


def finite_baseline(ppl: float, dtype: torch.dtype) -> float:
    """``ppl``, the baseline perplexity, or an ``NqpqError`` when it is NaN or infinite: every comparison with it
    would be NaN too, and a verdict drawn from NaNs says nothing."""
    if not math.isfinite(ppl):
        raise NqpqError(f"the baseline perplexity is {ppl}: the model's own forward gives non-finite losses on these "
                        f"blocks (an overflow in {str(dtype).removeprefix('torch.')}, or non-finite weights); there is "
                        "nothing to compare the crystallized layers with")
    return ppl


def top1_loses_nothing(ppl_baseline: float, ppl_top1: float) -> bool:
    """Whether top-1's perplexity cost is at or below ``NO_LOSS_REL`` of the baseline (nothing to recover)."""
    return ppl_top1 - ppl_baseline <= NO_LOSS_REL * ppl_baseline


def recovered_pct(ppl_baseline: float, ppl_top1: float, ppl_c: float) -> float | None:
    """The spec's "% of the top-1 loss recovered" by a configuration of PPL ``ppl_c``; None when there is no loss."""
    if top1_loses_nothing(ppl_baseline, ppl_top1):
        return None
    return (ppl_top1 - ppl_c) / max(ppl_top1 - ppl_baseline, 1e-9) * 100


def describe_geometry(cfg: dict) -> str:
    """One line for the report: family, Hq/Hkv/D and the window/softcaps in force on the crystallized layers."""
    windows = sorted({w for w in cfg["sliding_window"].values() if w is not None})
    return (f"{cfg['family']}, {cfg['n_layers']} layers, Hq={cfg['n_heads']}, Hkv={cfg['n_kv_heads']}, "
            f"D={cfg['head_dim']}, sliding window {'/'.join(map(str, windows)) if windows else 'none'}, "
            f"attention softcap {cfg['attn_softcap'] or 'none'}, logit softcap {cfg['final_logit_softcap'] or 'none'}"
            f" ({cfg['dtype']})")


def geometry(parts, layers: Sequence[int]) -> dict:
    """What results.json says about the model: family, heads, head dim, and the window/softcaps in force."""
    return {"family": parts.family, "n_layers": parts.n_layers, "n_heads": parts.n_heads,
            "n_kv_heads": parts.n_kv_heads, "head_dim": parts.head_dim,
            "sliding_window": {str(li): parts.sliding_window[li] for li in layers},
            "attn_softcap": parts.attn_softcap, "final_logit_softcap": parts.final_logit_softcap}


def _verdict(curve: list[dict], ppl_baseline: float, ppl_top1: float) -> dict:
    if not all(math.isfinite(p) for p in (ppl_top1, *(c["ppl"] for c in curve))):
        explanation = NOT_FINITE
    elif top1_loses_nothing(ppl_baseline, ppl_top1):
        explanation = INCONCLUSIVE
    else:
        explanation = None
    if explanation is not None:
        return {"compressible": None, "d_r_min": None, "best_d_r": None, "best_recovered_pct": None,
                "explanation": explanation}
    good = [c["d_r"] for c in curve if c["recovered_pct"] >= RECOVERY_TARGET]
    best = max(curve, key=lambda c: c["recovered_pct"])
    dr_min = min(good) if good else None
    return {"compressible": dr_min is not None, "d_r_min": dr_min, "best_d_r": best["d_r"],
            "best_recovered_pct": best["recovered_pct"]}

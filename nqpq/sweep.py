"""The EXP-Q03 sweep: baseline, calibration, top-1 / full / low-rank perplexities, verdict.

Fast by construction: the layers below the lowest crystallized layer run once
(``PrefixRunner``), blocks are evaluated in batches, calibration rides along the
baseline pass, and under torchrun the blocks are split across ranks.
"""

from __future__ import annotations

import contextlib
import math
import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass

import torch

from . import distributed
from .calibration import GramAccumulator, ResidualBasis, basis_from_grams, gram_passes, reduce_grams
from .crystallinity import CrystallinityAccumulator, format_table
from .data import (
    GGUF_DEVICE_MAP,
    ByteTokenizer,
    NqpqError,
    check_ids_fit,
    choose_bos,
    demo_model,
    demo_rows,
    ids_for_blocks,
    is_gguf,
    load_model,
    load_tokenizer,
    open_text_file,
    parse_dtype,
    rows_from_file,
    rows_from_hub,
)
from .devices import (
    compute_devices,
    execution_device,
    input_device,
    parse_device_map,
    parse_max_memory,
    refuse_tensor_parallel,
)
from .evaluate import PrefixRunner, make_blocks, ppl_from_losses, text_tokens_per_block
from .integration import Observer, crystallize, observe_residuals
from .ops import BACKENDS
from .stats import (
    BOOTSTRAP_RESAMPLES,
    CI_LEVEL,
    blocks_to_halve,
    delta_ppl_ci,
    half_width,
    recovered_pct_ci,
    resample_indices,
)

# results.json layout; `nqpq report` refuses others. 2: calibration source and draws, bootstrap intervals, block losses.
SWEEP_FORMAT_VERSION = 2
RECOVERY_TARGET = 90.0  # % of the top-1 loss a rank must recover to call the residual compressible
# At or below this fraction of the baseline PPL, top-1 loses nothing measurable: "recovered %" of a
# loss that is not there is noise divided by ~0, so it is reported as null and the verdict as inconclusive.
NO_LOSS_REL = 1e-6
INCONCLUSIVE = "top-1 loses nothing here; the test is inconclusive"
# A crystallized perplexity that is NaN or infinite (an overflow in the model's dtype) recovers nothing measurable.
NOT_FINITE = "a crystallized perplexity is not finite (NaN or inf); the test is inconclusive"
CALIB_SOURCES = ("heldout", "eval")  # --calib-from
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
    # Where the residual basis is fitted: "heldout", the calib_blocks blocks after the scored ones (no scored token
    # is seen by the basis); "eval", the first calib_blocks scored blocks (the spec's choice). calib_text_file: the
    # blocks of another text instead (with "heldout").
    calib_from: str = "heldout"
    calib_text_file: str | None = None
    calib_draws: int = 1  # bases fitted on this many disjoint calibration sets; the low-rank runs repeat per basis
    # The first keys kept exactly in the ground state (nqpq.residual_attention's sink_tokens); 0 is the spec. Several
    # settings share one baseline pass, each with its own bases, top-1 and low-rank runs; the first is the headline.
    sink_tokens: int | Sequence[int] = (0,)
    device: str | None = None
    dtype: str = "float32"
    backend: str = "auto"
    batch_size: int | None = None
    seed: int = 42
    out: str | None = None
    demo: bool = False
    progress: bool = True
    # Start every block with BOS: None follows the tokenizer (it puts BOS first: Gemma, Llama 3), True/False force
    # it. With a model and ids passed to run_sweep, None means no BOS and True uses model.config.bos_token_id.
    bos: bool | None = None
    # Models larger than one device (accelerate): a strategy ("auto", "balanced", "balanced_low_0", "sequential"),
    # a JSON file or a dict of module name -> device (0, "cpu", "disk"); max_memory: device -> size ({0: "70GiB",
    # "cpu": "200GiB"}); offload_folder: where "disk" weights go. A model passed to run_sweep keeps its own placement.
    device_map: str | dict | None = None
    max_memory: dict | str | None = None
    offload_folder: str | None = None


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
    T, H, D = seq_len, parts.largest("n_heads"), max(parts.largest("qk_dim"), parts.largest("v_dim"))
    activations = 16 * T * hidden * elem
    eager_scores = 2 * H * T * T * elem
    reference = 2 * H * T * T * 4 + 2 * H * T * D * 4
    gram_partials = H * -(-T // 16) * D * D * 4
    return activations + eager_scores + reference + gram_partials


def default_batch_size(device: torch.device, parts, seq_len: int, n_blocks: int, dtype: torch.dtype, *,
                       hidden: int | None = None, free: int | Mapping[torch.device, int] | None = None,
                       n_records: int = 1, devices: Sequence[torch.device] | None = None) -> int:
    """Blocks per batch: as many as fit ``BATCH_MEMORY_FRACTION`` of the free memory (CUDA memory, or the
    host's available RAM on CPU), per ``batch_bytes_per_block``, after the prefix record of every block
    (the hidden state entering each of ``n_records`` replay start layers, [n_blocks, T, hidden] each, kept
    for the whole run) and, for a 16-bit model, the fp32 copy of the LM head's weight that ``lm_losses`` forms
    the logits with (2 GiB at Llama-3-8B's 128256 × 4096) are set aside; on CUDA also batch · Hq <= 65535 (the
    grid limit).

    A model spread over several devices (a device map) runs each batch through every one of them: the fit is
    computed for each device the model computes on (``devices``; default: those of ``parts``' modules and
    ``device``) and the tightest decides. Each device is charged a whole block's activations and, conservatively,
    the whole record and head copy. ``free``: bytes free, one number for every device or a mapping per device
    (measured with ``free_memory`` where missing)."""
    hidden = hidden or parts.largest("n_heads") * parts.largest("v_dim")
    record = n_records * n_blocks * seq_len * hidden * (torch.finfo(dtype).bits // 8)
    head_fp32 = 0 if dtype == torch.float32 else parts.lm_head.weight.numel() * 4
    per_block = batch_bytes_per_block(parts, hidden, seq_len, dtype)
    used = list(dict.fromkeys([device, *(model_devices(parts) if devices is None else devices)]))
    fits = []
    for dev in used:
        dev_free = free.get(dev) if isinstance(free, Mapping) else free
        budget = int((free_memory(dev) if dev_free is None else dev_free) * BATCH_MEMORY_FRACTION)
        budget = max(budget - record - head_fp32, budget // 4)  # a record that does not fit is kept off the device
        fits.append(budget // per_block)
    fit = min(fits)
    if any(dev.type == "cuda" for dev in used):
        fit = min(fit, CUDA_GRID_Y // parts.largest("n_heads"))
    return max(1, min(n_blocks, fit))


def model_devices(parts) -> list[torch.device]:
    """The devices the decoder body and LM head of ``parts`` compute on (one, without a device map); none for a
    bare description of a geometry (no modules)."""
    body, head = getattr(parts, "body", None), getattr(parts, "lm_head", None)
    if not isinstance(body, torch.nn.Module) or not isinstance(head, torch.nn.Module):
        return []
    return list(dict.fromkeys([*compute_devices(body), execution_device(head)]))


def check_flags(cfg: SweepConfig) -> None:
    """Every check that needs no model, made before anything is loaded (bad flags fail in seconds)."""
    if cfg.n_blocks < 1:
        raise NqpqError(f"--n-blocks {cfg.n_blocks}: must be at least 1")
    if cfg.seq_len < 2:
        raise NqpqError(f"--seq-len {cfg.seq_len}: must be at least 2 (one prediction per block)")
    if cfg.calib_from not in CALIB_SOURCES:
        raise NqpqError(f"--calib-from {cfg.calib_from!r}: must be one of {', '.join(CALIB_SOURCES)} (heldout: the "
                        "blocks after the scored ones; eval: the first scored blocks, the spec's choice)")
    if cfg.calib_from == "eval":
        if cfg.calib_text_file:
            raise NqpqError("--calib-text-file calibrates on another text; --calib-from eval on the scored blocks: "
                            "give one or the other")
        if not 1 <= cfg.calib_blocks <= cfg.n_blocks:
            raise NqpqError(f"--calib-blocks {cfg.calib_blocks}: must be in 1..--n-blocks ({cfg.n_blocks}) with "
                            "--calib-from eval")
        if cfg.calib_draws != 1:
            raise NqpqError(f"--calib-draws {cfg.calib_draws}: the spec's choice (--calib-from eval) has one set of "
                            "calibration blocks, the first scored ones; draws need --calib-from heldout")
    sink_settings(cfg)
    if cfg.calib_blocks < 1:
        raise NqpqError(f"--calib-blocks {cfg.calib_blocks}: must be at least 1")
    if cfg.calib_draws < 1:
        raise NqpqError(f"--calib-draws {cfg.calib_draws}: must be at least 1")
    if cfg.batch_size is not None and cfg.batch_size < 1:
        raise NqpqError(f"--batch-size must be at least 1, got {cfg.batch_size}")
    if cfg.backend not in BACKENDS:
        raise NqpqError(f"--backend must be one of {BACKENDS}, got {cfg.backend!r}")
    parse_dtype(cfg.dtype)
    if cfg.device is not None and not _DEVICE_RE.fullmatch(str(cfg.device)):
        raise NqpqError(f"--device {cfg.device!r}: nqpq runs on cpu, cuda or cuda:N")
    _check_placement_flags(cfg)
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
    if cfg.calib_text_file:
        open_text_file(cfg.calib_text_file, "--calib-text-file").close()


def _check_placement_flags(cfg: SweepConfig) -> None:
    """``--device-map``, ``--max-memory``, ``--offload-folder``: parsed and checked before any model loads."""
    if cfg.device_map is None:
        given = [flag for flag, value in (("--max-memory", cfg.max_memory), ("--offload-folder", cfg.offload_folder))
                 if value is not None]
        if given:
            raise NqpqError(f"{' and '.join(given)} place a model loaded with --device-map; give --device-map too")
        return
    if is_gguf(cfg.model):
        raise NqpqError(GGUF_DEVICE_MAP)
    if cfg.demo:
        raise NqpqError("--device-map places a checkpoint's weights as they load; --demo builds a random model in "
                        "memory: give --model instead")
    import importlib.util

    if importlib.util.find_spec("accelerate") is None:
        raise NqpqError("--device-map needs accelerate, which places the layers: pip install accelerate")
    device_map = parse_device_map(cfg.device_map)
    parse_max_memory(cfg.max_memory)
    if isinstance(device_map, dict) and "disk" in device_map.values() and cfg.offload_folder is None:
        raise NqpqError("--device-map puts modules on \"disk\": give --offload-folder DIR for their weights")
    if cfg.offload_folder is not None and os.path.exists(cfg.offload_folder) and not os.path.isdir(cfg.offload_folder):
        raise NqpqError(f"--offload-folder {cfg.offload_folder!r} is a file, not a directory")
    distributed.check_device_map(device_map)


def _check_model_fit(cfg: SweepConfig, parts, layers: Sequence[int], d_rs: Sequence[int]) -> None:
    """The checks that need the model's geometry (``nqpq.models.ModelParts``)."""
    bad = [li for li in layers if not 0 <= li < parts.n_layers]
    if bad:
        raise NqpqError(f"--layers {bad}: the model has layers 0..{parts.n_layers - 1}")
    parts.check_attention_layers(layers, "--layers")
    D = parts.smallest("v_dim", layers)
    bad = [d for d in d_rs if not 0 <= d <= D]
    if bad:
        raise NqpqError(f"--d-r {bad}: each d_r must be in 0..{D} (the head dimension)")
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
    bos_id = choose_bos(tokenizer, cfg.bos)
    ids = ids_for_blocks(rows, tokenizer, text_blocks_needed(cfg) * text_tokens_per_block(cfg.seq_len, bos_id))
    calib_ids = _calib_text_ids(cfg, tokenizer, bos_id)
    model = demo_model(vocab, cfg.seed, device, dtype) if cfg.demo else load_model(
        cfg.model, device, dtype, device_map=parse_device_map(cfg.device_map),
        max_memory=parse_max_memory(cfg.max_memory), offload_folder=offload_folder_for_rank(cfg.offload_folder))
    check_ids_fit(ids, model, vocab)
    if calib_ids is not None:
        check_ids_fit(calib_ids, model, vocab)
    return model, ids, source, tok_name, bos_id, calib_ids


def _calib_text_ids(cfg: SweepConfig, tokenizer, bos_id: int | None) -> torch.Tensor | None:
    """The ids of ``--calib-text-file`` its calibration blocks use (None without one), read as the text is."""
    if not cfg.calib_text_file:
        return None
    needed = cfg.calib_blocks * cfg.calib_draws * text_tokens_per_block(cfg.seq_len, bos_id)
    return ids_for_blocks(rows_from_file(cfg.calib_text_file, "--calib-text-file"), tokenizer, needed)


def _mapped_input_device(cfg: SweepConfig, model: torch.nn.Module) -> torch.device:
    """With a device map, the device the token ids go to: the input embedding's. ``--device``, if given, must name
    it (it is where the inputs are placed; the map places everything else)."""
    device = input_device(model)
    if cfg.device is not None:
        wanted = torch.device(cfg.device)
        if wanted.type == "cuda" and wanted.index is None:
            wanted = torch.device("cuda", torch.cuda.current_device())
        if wanted != device:
            raise NqpqError(f"--device {cfg.device}: the device map puts the input embedding on {device}; with "
                            "--device-map the inputs go where the embedding is (drop --device, or change the map)")
    return device


def offload_folder_for_rank(folder: str | None) -> str | None:
    """``--offload-folder``, one subfolder per rank under torchrun (ranks must not share offloaded weight files)."""
    if folder is None or distributed.world_size() == 1:
        return folder
    return os.path.join(folder, f"rank{distributed.rank()}")


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
    calib_ids: torch.Tensor | None = None,
) -> dict:
    """Run EXP-Q03 as configured; print the spec's report; return the results dict.

    Pass ``model`` (a loaded decoder-only causal LM, on the device you want) and ``ids``
    (1-D token ids) to skip loading; ``cfg.model`` / ``cfg.text_file`` then only label the run.
    The residual basis is fitted where ``cfg.calib_from`` says: by default on the ``calib_blocks`` blocks
    of ``ids`` after the scored ones (``ids`` must hold them); with ``cfg.calib_text_file``, pass that
    text's ids as ``calib_ids``.
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
    run = open_run(cfg, model, ids, log, "[EXP-Q03]", calib_ids=calib_ids)
    model, ids, device, say, is_main = run.model, run.ids, run.device, run.say, run.is_main
    parts = model_parts(model)
    layers = tuple(parts.default_layers if cfg.layers is None else cfg.layers)
    _check_model_fit(cfg, parts, layers, [])
    d_rs = sweep_ranks(cfg, parts.smallest("v_dim", layers))
    _check_model_fit(cfg, parts, layers, d_rs)
    blocks = make_blocks_checked(ids, cfg.seq_len, cfg.n_blocks, run.bos_id)
    calibrations = calibration_sets(cfg, run)
    timings["load_s"] = time.perf_counter() - t0

    model_dtype = next(model.parameters()).dtype
    batch_size = cfg.batch_size or default_batch_size(
        device, parts, cfg.seq_len, cfg.n_blocks, model_dtype, hidden=getattr(model.config, "hidden_size", None))
    # The spec's choice calibrates on the leading scored blocks, in batches of their own during the baseline pass.
    eval_calib = cfg.calib_blocks if calibrations[0].blocks is None else 0
    batches, n_calib_batches = _plan_batches(cfg.n_blocks, eval_calib, batch_size)
    runner = PrefixRunner(model, blocks, batches, start=min(layers))
    n_local = sum(len(b) for b in batches)
    show = cfg.progress and is_main

    def bar(desc, total=n_local):
        return tqdm(total=total, desc=desc, unit="blk", leave=False, disable=not show)

    def timed_losses(key, desc, fn):
        t = time.perf_counter()
        with bar(desc) as pbar:
            local = fn(pbar)
        losses = _gather_losses(local, batches, cfg.n_blocks)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        timings[key] = time.perf_counter() - t
        return losses

    # The crystallinity statistics (and, for the spec's choice, Σ εεᵀ of the calibration batches, which come
    # first) ride along the baseline pass: the crystallized layers of every batch are observed, the model's
    # own attention output kept. Each sink setting observes the same calls with its own op call.
    t_sweep = time.perf_counter()
    sinks = sink_settings(cfg)
    watch = BaselineObservation(model, layers, {li: parts.geometry[li].n_heads for li in layers}, sinks, cfg.backend)

    def observe_calibration(i):
        return watch.context(calib=i < n_calib_batches)

    base_losses = timed_losses(
        "baseline_s", "baseline + calibration" if eval_calib else "baseline",
        lambda pbar: runner.capture_baseline(pbar, context_for=observe_calibration),
    )
    ppl_fp = finite_baseline(ppl_from_losses(base_losses), model_dtype)

    # One basis per calibration set and sink setting; held-out and other-text sets get a pass of their own (one
    # for every sink setting), up to max(layers).
    t = time.perf_counter()
    bases = [fit_bases(model, layers, cal, watch.grams(), sinks, batch_size, cfg.backend,
                       lambda n: bar("calibration", n)) for cal in calibrations]
    crystallinity = watch.crystallinity()
    timings["calibration_s"] = time.perf_counter() - t

    def config_losses(mode, d_r, key, basis=None, sink_tokens=0):
        with crystallize(model, layers, mode=mode, basis=None if basis is None else basis.basis, d_r=d_r,
                         backend=cfg.backend, sink_tokens=sink_tokens):
            return timed_losses(f"{key}_s", key, runner.losses)

    full_losses = config_losses("full", None, "full")  # ctx whatever the sink: once
    ppl_b = ppl_from_losses(full_losses)
    indices = resample_indices(cfg.n_blocks, cfg.seed)
    analyses = []
    for n in sinks:
        tag = "" if n == sinks[0] else f"_sink{n}"  # the headline setting keeps the plain timing keys
        top1_losses = config_losses("top1", None, f"top1{tag}", sink_tokens=n)
        ppl_a = ppl_from_losses(top1_losses)
        draws = []
        for cal, per_sink in zip(calibrations, bases):  # the low-rank configurations, once per basis
            suffix = tag + (f"_draw{cal.draw}" if cal.draw else "")
            draw_curve = [curve_entry(d_r, config_losses("lowrank", d_r, f"lowrank_d{d_r}{suffix}", per_sink[n], n),
                                      base_losses, top1_losses, indices) for d_r in d_rs]
            draws.append({"draw": cal.draw, "first_block": cal.first_block, "curve": draw_curve,
                          "d_r_min": _verdict(draw_curve, ppl_fp, ppl_a)["d_r_min"]})
        curve = with_draws(draws)
        spectrum, mean_eff = _spectrum(bases[0][n])
        analyses.append({
            "sink_tokens": n, "ppl_top1": ppl_a, "curve": curve,
            "top1_delta_ppl_ci95": delta_ppl_ci(base_losses, top1_losses, indices),
            "top1_block_losses": top1_losses.tolist(), "draws": draws,
            "spectrum": spectrum, "mean_eff_dim": mean_eff,
            "verdict": _verdict(curve, ppl_fp, ppl_a, n_blocks=cfg.n_blocks,
                                draws_d_r_min=[d["d_r_min"] for d in draws]),
            "crystallinity": crystallinity[n],
        })
    timings["sweep_s"] = time.perf_counter() - t_sweep
    timings["total_s"] = time.perf_counter() - t0

    head = analyses[0]  # the first sink setting is the headline: the spec's keys hold its numbers
    config = results_config(cfg, run, parts, layers, d_rs, batch_size, blocks)
    results = {
        "kind": "sweep", "format_version": SWEEP_FORMAT_VERSION,
        "ppl_baseline": ppl_fp, "ppl_top1": head["ppl_top1"], "ppl_full": ppl_b, "curve": head["curve"],
        "top1_delta_ppl_ci95": head["top1_delta_ppl_ci95"],
        "full_delta_ppl_ci95": delta_ppl_ci(base_losses, full_losses, indices),
        "block_losses": {"baseline": base_losses.tolist(), "top1": head["top1_block_losses"],
                         "full": full_losses.tolist()},
        "draws": head["draws"], "bootstrap": bootstrap_info(cfg),
        "spectrum": head["spectrum"], "mean_eff_dim": head["mean_eff_dim"], "verdict": head["verdict"],
        # The spec's statistics of the baseline (i* over every key); each sink setting's own are in "sinks".
        "crystallinity": crystallinity[0], "sink_tokens": sinks[0],
        "sinks": analyses,
        "config": config,
        "timings": timings, "basis": bases[0][sinks[0]],
    }
    print_sweep_report(results, say)
    return results


def print_sweep_report(results: dict, say: Callable[[str], None] = print) -> None:
    """The spec's printed report, from a sweep's results dict alone (the run and ``nqpq report`` both call it),
    with where the basis was fitted, the 95 % intervals, the calibration draws and how settled the verdict is."""
    cfg = results["config"]
    d_head, ppl_fp = cfg["d_head"], results["ppl_baseline"]
    if "family" in cfg:
        say(f" model: {describe_geometry(cfg)}")
    say(f" blocks: {describe_blocks(cfg)}")
    for line in describe_calibration(cfg):
        say(line)
    head_sink = results.get("sink_tokens", 0)
    for line in describe_sink(head_sink, [e["sink_tokens"] for e in results.get("sinks", ())]):
        say(line)
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
    ground = "V_i*" if not head_sink else f"sink exact + V_i*R, n={head_sink}"
    say(f" [A] Top-1 pure ({ground}) = {ppl_a:.3f} dPPL={ppl_a - ppl_fp:+.3f} "
        f"95% CI {format_ci(results['top1_delta_ppl_ci95'])}")
    say(f" [B] Top-1 + full eps (sanity) = {ppl_b:.3f} dPPL={ppl_b - ppl_fp:+.3f} (should ~ 0)")
    say(f"\n [C] Top-1 + low-rank residual (d_head={d_head}):")
    for c in results["curve"]:
        recovered = "  n/a" if c["recovered_pct"] is None else f"{c['recovered_pct']:5.1f}%"
        say(f" d_r={c['d_r']:2d}/{d_head}: PPL={c['ppl']:8.3f} dPPL={c['delta_ppl']:+7.3f} "
            f"recovered={recovered} of Top-1 loss | 95% CI dPPL {format_ci(c['delta_ppl_ci95'])}, "
            f"recovered {format_ci(c['recovered_pct_ci95'], '.1f')}")
    for line in interval_notes(results["bootstrap"], [c["recovered_pct_ci95"] for c in results["curve"]]):
        say(line)
    for line in draw_lines(results["curve"], cfg["calibration"]):
        say(line)
    say(f"\n{'=' * 66}\n[EXP-Q03 VERDICT] is the excitation residual compressible?\n{'=' * 66}")
    for line in verdict_lines(results["verdict"], results["curve"], d_head, ppl_a - ppl_fp):
        say(line)
    say("")
    for line in format_table(results["crystallinity"]):
        say(line)
    sinks = results.get("sinks", [])
    for entry in sinks:
        if entry["sink_tokens"]:
            for line in format_table(entry["crystallinity"], entry["sink_tokens"]):
                say(line)
    if len(sinks) > 1:
        for line in sink_comparison(sinks, ppl_fp, cfg["d_r"]):
            say(line)
    if cfg["random_weights"]:
        say(" NOTE: DEMO run on RANDOM weights: the pipeline is real, the numbers say nothing about GPT-2.")


def describe_sink(head: int, settings: Sequence[int]) -> list[str]:
    """The report's line on the ground state: the spec's V[i*], or the sink kept apart; and the settings compared."""
    lines = []
    if head:
        lines.append(f" ground state: the first {head} key(s) kept exactly (the sink), the rest of the mass on the "
                     "winner among the other keys (--sink-tokens)")
    if len(settings) > 1:
        lines.append(f" sink settings compared side by side: {', '.join(map(str, settings))} (the report's numbers: "
                     f"{head}; each setting has its own basis)")
    return lines


def verdict_summary(verdict: dict) -> str:
    """The verdict in a few words, for side-by-side tables."""
    if verdict["compressible"] is None:
        return "INCONCLUSIVE"
    if verdict["compressible"]:
        return f"YES d_r={verdict['d_r_min']}" + ("" if verdict.get("settled") else " (not settled)")
    return (f"PARTIAL best d_r={verdict['best_d_r']} {verdict['best_recovered_pct']:.0f}%"
            + ("" if verdict.get("settled") else " (not settled)"))


def sink_comparison(sinks: Sequence[dict], ppl_baseline: float, d_rs: Sequence[int]) -> list[str]:
    """The sink settings side by side: top-1 ΔPPL with its interval, mean r90, recovered % per d_r, verdict."""
    lines = ["", " Sink kept apart, side by side (n = sink tokens; each n its own basis, top-1 and low-rank runs):",
             f" {'n':>3} | {'top-1 dPPL':>10} {'95% CI':>20} | {'r90':>5} | "
             + " ".join(f"{f'd_r={d}':>7}" for d in d_rs) + " | verdict"]
    for e in sinks:
        recovered = " ".join("    n/a" if c["recovered_pct"] is None else f"{c['recovered_pct']:6.1f}%"
                             for c in e["curve"])
        lines.append(f" {e['sink_tokens']:3d} | {e['ppl_top1'] - ppl_baseline:+10.3f} "
                     f"{format_ci(e['top1_delta_ppl_ci95']):>20} | {e['mean_eff_dim']:5.1f} | {recovered} | "
                     f"{verdict_summary(e['verdict'])}")
    return lines


# A recovered-% bound beyond this is printed as "<-1000" / ">1000": it comes from resamples on which top-1 loses
# (almost) nothing, where the ratio has no scale (results.json keeps the number).
PCT_SHOWN = 1000.0


def _bound(v: float, fmt: str) -> str:
    if "+" not in fmt and abs(v) >= PCT_SHOWN:
        return f"<-{PCT_SHOWN:.0f}" if v < 0 else f">{PCT_SHOWN:.0f}"
    return format(v, fmt)


def format_ci(ci: Sequence[float] | None, fmt: str = "+.3f") -> str:
    """``[lo, hi]`` of a 95 % interval, or n/a (fmt "+..." for ΔPPL; otherwise a recovered %)."""
    return "n/a" if ci is None else f"[{_bound(ci[0], fmt)}, {_bound(ci[1], fmt)}]"


def _span(ci: Sequence[float]) -> str:
    return f"{_bound(ci[0], '.0f')}–{_bound(ci[1], '.0f')}"


def interval_notes(bootstrap: dict, recovered_cis: Sequence[Sequence[float] | None]) -> list[str]:
    """How the intervals were made; that there are none with one block; how many blocks would halve wide ones."""
    n = bootstrap["n_blocks"]
    if n < 2:
        return [f" no confidence intervals: {n} scored block (the bootstrap resamples the scored blocks; it needs 2 "
                "or more)"]
    lines = [f" 95% CI: {bootstrap['method']}, {bootstrap['resamples']} resamples of the {n} blocks "
             f"(seed {bootstrap['seed']})"]
    widths = [half_width(ci) for ci in recovered_cis if ci is not None]
    if widths and max(widths) > 10:
        lines.append(f" the widest interval of recovered % is ±{max(widths):.0f} points: about four times as many "
                     f"blocks (--n-blocks {blocks_to_halve(n)}) would halve the intervals")
    return lines


def draw_lines(curve: list[dict], calibration: dict) -> list[str]:
    """Each d_r's recovered % per calibration draw and their spread; or that calibration variability is unmeasured."""
    if calibration["draws"] < 2:
        return [" calibration variability not measured (one basis; --calib-draws K fits K bases on disjoint "
                "held-out sets)"]
    lines = [f" recovered % per calibration draw ({calibration['draws']} bases, {calibration['blocks_per_draw']} "
             "blocks each; draw 0 above):"]
    for c in curve:
        values = " ".join("  n/a" if r is None else f"{r:5.1f}" for r in c["recovered_pct_draws"])
        spread = "n/a" if c["recovered_pct_spread"] is None else f"{c['recovered_pct_spread']:.1f} points"
        lines.append(f" d_r={c['d_r']:2d}: {values} | spread {spread}")
    return lines


def verdict_lines(verdict: dict, curve: list[dict], d_head: int, top1_delta: float) -> list[str]:
    """The verdict, with d_r_min's (or the best d_r's) interval and, when not settled, why."""
    if verdict["compressible"] is None and verdict["explanation"] != INCONCLUSIVE:
        return [f" => INCONCLUSIVE: {verdict['explanation']}."]
    if verdict["compressible"] is None:
        return [f" => INCONCLUSIVE: {verdict['explanation']} (top-1 dPPL={top1_delta:+.3g} <= {NO_LOSS_REL:g} x "
                "baseline): there is no loss for a low-rank residual to recover."]
    ci, rec, n = verdict["ci95"], verdict["recovered_pct"], verdict["n_blocks"]
    with_ci = f" (95% CI {_span(ci)})" if ci is not None else ""
    reasons = []
    if ci is None:
        reasons.append(f"there is no interval ({n} scored block)")
    elif verdict["compressible"] and ci[0] < RECOVERY_TARGET:
        reasons.append(f"the 95% CI ({_span(ci)}) reaches below 90%")
    elif not verdict["compressible"]:
        reaching = [c["d_r"] for c in curve if c["recovered_pct_ci95"] and c["recovered_pct_ci95"][1] >= 90]
        if reaching:
            reasons.append(f"the 95% CI of d_r={', '.join(map(str, reaching))} reaches 90%")
    if verdict["draws_agree"] is False:
        mins = ", ".join("none" if d is None else str(d) for d in verdict["draws_d_r_min"])
        reasons.append(f"the {len(verdict['draws_d_r_min'])} calibration draws disagree (d_r_min per draw: {mins})")
    at = f"{n} block{'s' * (n != 1)}"
    unsettled = f"but {'; '.join(reasons)}: not settled at {at}." if reasons else ""
    if verdict["compressible"]:
        dr_min = verdict["d_r_min"]
        if reasons:
            return [f" => YES at d_r={dr_min}/{d_head} ({rec:.0f}% of the Top-1 loss), {unsettled}"]
        return [f" => YES: d_r={dr_min}/{d_head} recovers {rec:.0f}%{with_ci} of the Top-1 loss (>=90%). Deep layers "
                f"are nearly crystalline + a rank-{dr_min} excitation. Compressible attention found."]
    lines = [f" => PARTIAL: best is d_r={verdict['best_d_r']} recovering {rec:.0f}%{with_ci}. The residual is not "
             "strongly low-rank; excitations are spread across many value dimensions."]
    lines.append(f"    {unsettled}" if reasons else f"    Every d_r's 95% CI is below 90%: settled at {at}.")
    return lines


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
    bos_id: int | None  # every block starts with this token (None: blocks are cut from the text as they are)
    calib_ids: torch.Tensor | None = None  # token ids of --calib-text-file (None: calibration blocks come from ids)


def open_run(
    cfg: SweepConfig,
    model: torch.nn.Module | None,
    ids: torch.Tensor | None,
    log: Callable[[str], None] | None,
    tag: str,
    *,
    calib_ids: torch.Tensor | None = None,
) -> RunInputs:
    """Join torchrun, resolve ``cfg.device``, seed, and load the model and token ids (or take the caller's).

    Shared by ``run_sweep`` and ``nqpq.scan.run_scan``; ``tag`` prefixes the loading message.
    """
    mapped = cfg.device_map is not None and model is None
    if mapped:
        distributed.check_device_map(parse_device_map(cfg.device_map))
    # With a device map the map places the model; torchrun ranks then reduce over gloo (check_device_map).
    device_name = distributed.init("cpu" if mapped else cfg.device or default_device())
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
        model, ids, source, tok_name, bos_id, calib_ids = _load(cfg, str(device), dtype)
        refuse_tensor_parallel(model)
        if mapped:
            device = _mapped_input_device(cfg, model)
    else:
        if ids is None:
            raise NqpqError("a run given model=... needs ids (1-D token ids) too")
        if cfg.device_map is not None:
            raise NqpqError("device_map applies when nqpq loads the model; a model passed to run_sweep stays where it "
                            "is (load it with from_pretrained(..., device_map=...) and leave SweepConfig.device_map "
                            "unset)")
        refuse_tensor_parallel(model)
        device = input_device(model)  # a model loaded with a device map: where its token ids go
        source, tok_name = "ids given by the caller", "given by the caller"
        bos_id = None
        if cfg.bos:
            bos_id = getattr(model.config, "bos_token_id", None)
            if bos_id is None:
                raise NqpqError("bos=True: the model's config names no bos_token_id to start the blocks with")
            bos_id = int(bos_id)
        model.eval()
        check_ids_fit(ids, model)
        if cfg.calib_text_file:
            if calib_ids is None:
                raise NqpqError("a run given model=... with calib_text_file needs calib_ids (its 1-D token ids) too")
            check_ids_fit(calib_ids, model)
    return RunInputs(model, ids, device, say, is_main, source, tok_name, bos_id, calib_ids)


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
                  n_tokens=int(blocks.numel()),
                  bos=run.bos_id is not None, bos_token_id=run.bos_id, d_head=parts.smallest("v_dim", layers),
                  random_weights=cfg.demo,
                  **geometry(parts, layers), **_versions(run.device))
    config["calibration"] = calibration_config(cfg, run)
    from .checkpoints import gguf_file_info

    # A GGUF file is named by what identifies it (its hash, its quantization types), not by its path alone.
    config["checkpoint"] = gguf_file_info(cfg.model) if not cfg.demo and is_gguf(cfg.model) else None
    return config


def text_blocks_needed(cfg: SweepConfig) -> int:
    """How many blocks of text a run reads: the scored ones, then the held-out calibration blocks of every draw."""
    return cfg.n_blocks + (cfg.calib_blocks * cfg.calib_draws if calibration_source(cfg) == "heldout" else 0)


def calibration_source(cfg: SweepConfig) -> str:
    """"heldout" (blocks after the scored ones), "eval" (the first scored blocks: the spec) or "text" (another text)."""
    return "text" if cfg.calib_text_file else cfg.calib_from


def make_blocks_checked(ids: torch.Tensor, seq_len: int, n_blocks: int, bos_id: int | None = None,
                        first_block: int = 0) -> torch.Tensor:
    try:
        return make_blocks(ids, seq_len, n_blocks, bos_id=bos_id, first_block=first_block)
    except ValueError as err:
        raise NqpqError(f"--n-blocks/--seq-len: {err}") from err


@dataclass
class CalibrationSet:
    """One set of calibration blocks: one residual basis is fitted on each (a draw)."""

    draw: int
    first_block: int  # index of its first block in the text it is cut from
    blocks: torch.Tensor | None  # [calib_blocks, seq_len] ids; None: the leading scored blocks (the spec's choice)


def calibration_sets(cfg: SweepConfig, run: RunInputs) -> list[CalibrationSet]:
    """The ``cfg.calib_draws`` disjoint calibration sets: blocks n + k·c .. n + (k+1)·c − 1 of the evaluation text
    (held out), blocks k·c .. (k+1)·c − 1 of ``--calib-text-file``, or the first c scored blocks (``eval``)."""
    source, c, draws = calibration_source(cfg), cfg.calib_blocks, cfg.calib_draws
    if source == "eval":
        return [CalibrationSet(0, 0, None)]
    ids, offset = (run.calib_ids, 0) if source == "text" else (run.ids, cfg.n_blocks)
    per_block = text_tokens_per_block(cfg.seq_len, run.bos_id)
    needed = offset + c * draws
    available = ids.numel() // per_block
    if available < needed:
        have = f"the text has {ids.numel()} tokens ({available} blocks)"
        what = f"--calib-blocks {c} x --calib-draws {draws} = {c * draws} calibration blocks"
        if source == "text":
            raise NqpqError(f"--calib-text-file {cfg.calib_text_file!r}: {what} of {per_block} text tokens need "
                            f"{c * draws * per_block} tokens; {have}")
        raise NqpqError(f"held-out calibration (--calib-from heldout) needs {needed} blocks of {per_block} text tokens "
                        f"({needed * per_block} tokens): --n-blocks {cfg.n_blocks} scored, then {what}; {have} (use "
                        "a longer text, fewer blocks, --calib-text-file, or --calib-from eval, the spec's choice)")
    return [CalibrationSet(k, offset + k * c, make_blocks(ids, cfg.seq_len, c, bos_id=run.bos_id,
                                                          first_block=offset + k * c)) for k in range(draws)]


def _rank_batches(n_blocks: int, batch_size: int) -> list[torch.Tensor]:
    """This rank's share of blocks 0..n_blocks − 1, in batches (blocks i with i mod world_size = rank)."""
    return _plan_batches(n_blocks, 0, batch_size)[0]


class BaselineObservation:
    """What the baseline pass collects on the crystallized ``layers``, for each sink setting (every setting observes
    the same attention calls with its own op call): the crystallinity counts of every batch (also of n = 0, the
    spec's statistics, whatever the settings) and, on the spec's calibration batches, Σ εεᵀ."""

    def __init__(self, model: torch.nn.Module, layers: Sequence[int], n_heads: int | Mapping[int, int],
                 sinks: Sequence[int], backend: str) -> None:
        self.model, self.layers, self.backend = model, layers, backend
        self._grams = {n: GramAccumulator() for n in sinks}
        self._stats = {n: CrystallinityAccumulator(layers, n_heads, sink_tokens=n) for n in dict.fromkeys((0, *sinks))}

    def context(self, calib: bool):
        """The observation of one batch (``calib``: it is a calibration batch of the spec's choice)."""
        observers = [Observer(n, self._grams.get(n) if calib else None, acc) for n, acc in self._stats.items()]
        return observe_residuals(self.model, self.layers, None, backend=self.backend, observers=observers)

    def grams(self) -> dict[int, dict]:
        """{sink setting: {layer: Σ εεᵀ}} of the calibration batches (not yet summed across ranks)."""
        return {n: acc.grams for n, acc in self._grams.items()}

    def crystallinity(self) -> dict[int, list[dict]]:
        """{sink setting: per (layer, head) statistics}, summed across ranks (a collective)."""
        return {n: acc.results() for n, acc in self._stats.items()}


def fit_bases(model: torch.nn.Module, layers: Sequence[int], cal: CalibrationSet, eval_grams: dict[int, dict],
              sinks: Sequence[int], batch_size: int, backend: str,
              bar: Callable[[int], object] | None = None) -> dict[int, ResidualBasis]:
    """The residual basis of ``cal`` for each sink setting: from the Grams the baseline pass collected (``eval``),
    or from one pass of its own over ``cal.blocks`` (every setting observed on the same forward), split across
    ranks as the scored blocks are and summed (``reduce_grams``)."""
    grams = eval_grams
    if cal.blocks is not None:
        batches = [cal.blocks[b] for b in _rank_batches(cal.blocks.shape[0], batch_size)]
        with contextlib.nullcontext() if bar is None else bar(sum(len(b) for b in batches)) as pbar:
            grams = gram_passes(model, batches, layers, sinks, backend=backend, progress=pbar)
    return {n: basis_from_grams(reduce_grams(grams[n], layers, model)) for n in sinks}


def sink_settings(cfg: SweepConfig) -> tuple[int, ...]:
    """``cfg.sink_tokens`` as a tuple of distinct ints in the order given (the first is the headline); an
    ``NqpqError`` for none, or for a value that is not an int >= 0."""
    sinks = (cfg.sink_tokens,) if isinstance(cfg.sink_tokens, int) else tuple(cfg.sink_tokens)
    if not sinks:
        raise NqpqError("--sink-tokens: give at least one setting (0 is the spec)")
    bad = [n for n in sinks if isinstance(n, bool) or not isinstance(n, int) or n < 0]
    if bad:
        raise NqpqError(f"--sink-tokens {bad}: each must be an int >= 0 (the first keys kept apart; 0 is the spec)")
    return tuple(dict.fromkeys(sinks))


def curve_entry(d_r: int, losses: torch.Tensor, base_losses: torch.Tensor, top1_losses: torch.Tensor,
                indices) -> dict:
    """One low-rank configuration's results: PPL, ΔPPL and recovered %, their paired bootstrap intervals
    (``nqpq.stats``; None with one scored block) and its per-block losses."""
    ppl_fp, ppl_a, ppl_c = (ppl_from_losses(x) for x in (base_losses, top1_losses, losses))
    recovered = recovered_pct(ppl_fp, ppl_a, ppl_c)
    return {"d_r": d_r, "ppl": ppl_c, "delta_ppl": ppl_c - ppl_fp, "recovered_pct": recovered,
            "delta_ppl_ci95": delta_ppl_ci(base_losses, losses, indices),
            "recovered_pct_ci95": None if recovered is None else recovered_pct_ci(base_losses, top1_losses, losses,
                                                                                    indices),
            "block_losses": losses.tolist()}


def with_draws(draws: list[dict]) -> list[dict]:
    """The headline curve, draw 0's, each entry with every draw's recovered % and their spread (max − min; None
    with one draw or where a value is n/a)."""
    curve = []
    for j, entry in enumerate(draws[0]["curve"]):
        per_draw = [d["curve"][j]["recovered_pct"] for d in draws]
        finite = len(per_draw) > 1 and all(r is not None and math.isfinite(r) for r in per_draw)
        curve.append({**entry, "recovered_pct_draws": per_draw,
                      "recovered_pct_spread": max(per_draw) - min(per_draw) if finite else None})
    return curve


def bootstrap_info(cfg: SweepConfig) -> dict:
    """results.json's ``bootstrap``: how the intervals were computed (``nqpq.stats``)."""
    return {"method": "paired percentile bootstrap over the scored blocks", "resamples": BOOTSTRAP_RESAMPLES,
            "level": CI_LEVEL, "seed": cfg.seed, "n_blocks": cfg.n_blocks}


def calibration_config(cfg: SweepConfig, run: RunInputs) -> dict:
    """results.json's ``config["calibration"]``: where the basis (of each draw) was fitted."""
    source, c = calibration_source(cfg), cfg.calib_blocks
    offset = cfg.n_blocks if source == "heldout" else 0
    text = cfg.calib_text_file if source == "text" else run.source
    return {"source": source, "text": text, "blocks_per_draw": c, "draws": cfg.calib_draws,
            "first_blocks": [offset + k * c for k in range(cfg.calib_draws)],
            "scored_blocks_seen": c if source == "eval" else 0}


def describe_calibration(cfg: dict) -> list[str]:
    """The report's lines on where the basis was fitted (from results.json's ``config``)."""
    cal = cfg["calibration"]
    c, k, first = cal["blocks_per_draw"], cal["draws"], cal["first_blocks"][0]
    span = f"block {first}" if c * k == 1 else f"blocks {first}..{first + c * k - 1}"
    sets = f"{k} disjoint sets of {c} blocks ({span})" if k > 1 else span
    if cal["source"] == "eval":
        return [f" calibration: the spec's choice, the first {c} scored blocks ({span})",
                f" NOTE: the basis saw {cal['scored_blocks_seen']} of the {cfg['n_blocks']} scored blocks, so "
                "recovered % may be optimistic (--calib-from heldout fits it on blocks that are not scored)"]
    if cal["source"] == "text":
        return [f" calibration: another text, {cal['text']}: {sets}"]
    return [f" calibration: held out, {sets} of the same text, after the scored ones (no scored token seen by "
            "the basis)"]


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


def describe_blocks(cfg: dict) -> str:
    """One line for the report: how many blocks of what were scored, and whether each starts with BOS."""
    if cfg.get("bos"):
        return (f"{cfg['n_blocks']} x {cfg['seq_len']} tokens, each BOS (id {cfg['bos_token_id']}) + "
                f"{cfg['seq_len'] - 1} text tokens (BOS is never scored; 'sink' = the BOS position)")
    return (f"{cfg['n_blocks']} x {cfg['seq_len']} tokens cut from the text, no BOS ('sink' = the block's first "
            "token)")


def describe_geometry(cfg: dict) -> str:
    """One line for the report: family, Hq/Hkv/D and the window/softcaps in force on the crystallized layers."""
    windows = sorted({w for w in cfg["sliding_window"].values() if w is not None})
    return (f"{cfg['family']}, {cfg['n_layers']} layers, Hq={cfg['n_heads']}, Hkv={cfg['n_kv_heads']}, "
            f"D={cfg['head_dim']}, sliding window {'/'.join(map(str, windows)) if windows else 'none'}, "
            f"attention softcap {cfg['attn_softcap'] or 'none'}, logit softcap {cfg['final_logit_softcap'] or 'none'}"
            f" ({cfg['dtype']})")


def geometry(parts, layers: Sequence[int]) -> dict:
    """What results.json says about the model: family, heads, head dim, and the window/softcaps in force."""
    def per_layer(field):  # one number when the chosen layers agree, else one per layer
        values = {str(li): getattr(parts.geometry[li], field) for li in layers}
        return next(iter(values.values())) if len(set(values.values())) == 1 else values

    return {"family": parts.family, "wrapper": parts.wrapper, "n_layers": parts.n_layers,
            "attn_layers": list(parts.attn_layers), "n_heads": per_layer("n_heads"),
            "n_kv_heads": per_layer("n_kv_heads"), "head_dim": per_layer("v_dim"), "qk_dim": per_layer("qk_dim"),
            "v_dim": per_layer("v_dim"),
            "sliding_window": {str(li): parts.geometry[li].sliding_window for li in layers},
            "attn_softcap": parts.attn_softcap, "final_logit_softcap": parts.final_logit_softcap}


def _verdict(curve: list[dict], ppl_baseline: float, ppl_top1: float, *, n_blocks: int | None = None,
             draws_d_r_min: list[int | None] | None = None) -> dict:
    """The spec's verdict (the smallest d_r recovering >= 90 %, else the best d_r) with its interval.

    ``recovered_pct`` / ``ci95``: d_r_min's (YES) or the best d_r's (PARTIAL) recovered % and 95 % interval (None
    without intervals). ``settled``: YES with d_r_min's whole interval >= 90, or PARTIAL with every interval below
    90, and, with several calibration draws (``draws_d_r_min``, each draw's own d_r_min), every draw agreeing.
    """
    if not all(math.isfinite(p) for p in (ppl_top1, *(c["ppl"] for c in curve))):
        explanation = NOT_FINITE
    elif top1_loses_nothing(ppl_baseline, ppl_top1):
        explanation = INCONCLUSIVE
    else:
        explanation = None
    several = draws_d_r_min is not None and len(draws_d_r_min) > 1
    extra = {"n_blocks": n_blocks, "draws_d_r_min": draws_d_r_min}
    if explanation is not None:
        return {"compressible": None, "d_r_min": None, "best_d_r": None, "best_recovered_pct": None,
                "recovered_pct": None, "ci95": None, "settled": None, "draws_agree": None, **extra,
                "explanation": explanation}
    good = [c["d_r"] for c in curve if c["recovered_pct"] >= RECOVERY_TARGET]
    best = max(curve, key=lambda c: c["recovered_pct"])
    dr_min = min(good) if good else None
    agree = all(d == dr_min for d in draws_d_r_min) if several else None
    if dr_min is not None:
        chosen = next(c for c in curve if c["d_r"] == dr_min)
        ci = chosen.get("recovered_pct_ci95")
        settled = ci is not None and ci[0] >= RECOVERY_TARGET
    else:
        chosen, ci = best, best.get("recovered_pct_ci95")
        cis = [c.get("recovered_pct_ci95") for c in curve]
        settled = all(i is not None and i[1] < RECOVERY_TARGET for i in cis)
    return {"compressible": dr_min is not None, "d_r_min": dr_min, "best_d_r": best["d_r"],
            "best_recovered_pct": best["recovered_pct"], "recovered_pct": chosen["recovered_pct"], "ci95": ci,
            "settled": settled and agree is not False, "draws_agree": agree, **extra}

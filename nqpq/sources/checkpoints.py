"""Where a model comes from: the hub, a local directory, a GGUF file, the demo's random GPT-2, and their tokenizers.

Every path ends in the same checks: decoder-only causal LMs only (``check_architecture``), every weight from the
checkpoint (``unloaded_weights``), never remote code. GGUF files (llama.cpp's format) are read by transformers' own
loader with the ``gguf`` package; this module adds what nqpq needs around it: the file is checked before anything is
built (magic bytes, a tensor table that fits the file, an architecture transformers can load), every weight is
dequantized into the requested dtype (nqpq reads and upcasts plain ``nn.Linear`` weights, never packed GGUF blocks),
and ``gguf_file_info`` says what the file was (name, size, sha256, quantization types) for results.json.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import NqpqError, one_line
from .hub import OFFLINE_HINT, cache_only, is_offline_error

# transformers dequantizes a GGUF file whole, in host memory, before any placement: a device map would not spread
# the load, only the result. Save the dequantized model once and map that.
# How both loaders call from_pretrained. Mismatched shapes are listed in the loading info (and refused by
# unloaded_weights) rather than raised with a pointer to transformers' load report. use_kernels=False:
# transformers >= 5.25 swaps layers for Hugging Face hub kernels by default, which is not the model nqpq measures
# (and, with a weight left on the meta device, fails before the loading info can be read).
LOAD_AS_STORED = {"ignore_mismatched_sizes": True, "output_loading_info": True, "use_kernels": False}
GGUF_DEVICE_MAP = ("--device-map with a .gguf file: the file is dequantized whole before any placement; save it "
                   "with save_pretrained first (nqpq fetch --converted does it for SmolLM2) and map that directory")

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
          "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


class ByteTokenizer:
    """UTF-8 bytes as token ids (vocabulary 256): the demo's tokenizer, present on any machine."""

    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))


def is_gguf(name: str | os.PathLike) -> bool:
    """Whether ``name`` names a GGUF file (by its extension: the file may not exist yet, and is then refused)."""
    return str(name).lower().endswith(".gguf")


def parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise NqpqError(f"--dtype must be one of {sorted(set(DTYPES))}, got {name!r}")
    return DTYPES[name]


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence transformers' load report and progress bars while loading: nqpq reports what matters in one line."""
    from transformers.utils import logging as hf_logging

    previous, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(previous)
        if bars:
            hf_logging.enable_progress_bar()


def check_architecture(config, name: str) -> None:
    """Refuse, before any weight is read, models that are not decoder-only causal LMs."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    kind = getattr(config, "model_type", None) or type(config).__name__
    if getattr(config, "is_encoder_decoder", False):
        raise NqpqError(f"--model {name!r} is an encoder-decoder model ({kind}): nqpq handles decoder-only causal LMs")
    # Every model type transformers can load both as a masked LM and as a causal LM is a bidirectional
    # encoder (BERT, RoBERTa, ...) or an encoder-decoder; its "causal LM" head is not a decoder-only model.
    if kind in MODEL_FOR_MASKED_LM_MAPPING_NAMES:
        raise NqpqError(f"--model {name!r} is an encoder model ({kind}, a masked-LM architecture): nqpq handles "
                        "decoder-only causal LMs")
    if kind not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise NqpqError(f"--model {name!r}: model type {kind!r} has no causal-LM class in transformers "
                        f"{_transformers_version()}; nqpq handles decoder-only causal LMs")


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


def unloaded_weights(model: nn.Module, info: dict) -> list[str]:
    """The problems of a ``from_pretrained(..., output_loading_info=True)`` load, one short string each.

    A missing key is no problem when its parameter is tied to (shares storage with) a loaded one:
    checkpoints legitimately omit ``lm_head.weight`` when it is the input embedding.
    """
    params = dict(model.named_parameters(remove_duplicate=False))
    missing = set(info.get("missing_keys") or ())

    def storage(p: torch.Tensor) -> tuple:
        # Weights offloaded by a device map sit on the meta device, where every data_ptr is 0: there, a tied weight
        # is the same Parameter object.
        return ("meta", id(p)) if p.is_meta else ("data", p.data_ptr())

    loaded = {storage(p) for n, p in params.items() if n not in missing}
    really_missing = sorted(k for k in missing if k not in params or storage(params[k]) not in loaded)
    problems = []
    for label, keys in (("missing", really_missing), ("unexpected", sorted(info.get("unexpected_keys") or ())),
                        ("mismatched", sorted(str(k[0]) if isinstance(k, tuple) else str(k)
                                              for k in info.get("mismatched_keys") or ()))):
        if keys:
            shown = ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")
            problems.append(f"{len(keys)} {label} ({shown})")
    problems += [str(e).splitlines()[0] for e in info.get("error_msgs") or ()]
    return problems


def load_model(name: str, device: str, dtype: torch.dtype, *, device_map: str | dict | None = None,
               max_memory: dict | None = None, offload_folder: str | None = None) -> nn.Module:
    """``AutoModelForCausalLM.from_pretrained(name)`` in eval mode on ``device``, every weight from the checkpoint.

    With ``device_map`` (a strategy such as ``"auto"`` or a dict of module name → device, ``max_memory`` and
    ``offload_folder`` as in ``from_pretrained``) accelerate places the modules and ``device`` is not used: the
    model stays where the map put it (``nqpq.model.devices.execution_device`` says where each part computes).

    Never runs remote code. Raises ``NqpqError`` for encoder(-decoder) models, unreadable or truncated
    checkpoints, and checkpoints whose weights do not all load (missing, unexpected or mismatched keys),
    so a model is never run with randomly initialised weights.
    """
    if is_gguf(name):  # a GGUF file, never a hub name
        if device_map is not None:
            raise NqpqError(GGUF_DEVICE_MAP)
        return load_gguf(name, device, dtype)
    from safetensors import SafetensorError
    from transformers import AutoConfig, AutoModelForCausalLM

    local = os.path.isdir(name)
    offline = cache_only(name)
    try:
        with _quiet_transformers():
            config = AutoConfig.from_pretrained(name, local_files_only=offline, trust_remote_code=False)
        check_architecture(config, name)
        with _quiet_transformers():
            model, info = AutoModelForCausalLM.from_pretrained(
                name, config=config, dtype=dtype, local_files_only=offline, trust_remote_code=False,
                **LOAD_AS_STORED,
                **({} if device_map is None else
                   {"device_map": device_map, "max_memory": max_memory, "offload_folder": offload_folder}))
    except NqpqError:
        raise
    except (OSError, ValueError) as err:
        if not local and is_offline_error(err):
            raise NqpqError(OFFLINE_HINT.format(what="model", name=name, err=one_line(err))) from err
        raise NqpqError(f"Could not load the model from {name!r}: {one_line(err)}{_names_hint(name)}") from err
    except (SafetensorError, RuntimeError, KeyError) as err:  # truncated/corrupt weights, shape mismatches
        raise NqpqError(f"Could not load the model from {name!r}: {type(err).__name__}: {one_line(err)}") from err
    problems = unloaded_weights(model, info)
    if problems:
        raise NqpqError(f"--model {name!r}: the checkpoint does not fit {type(model).__name__}: "
                        f"{'; '.join(problems)}. Refusing to run with randomly initialised weights.")
    return (model if device_map is not None else model.to(device)).eval()


def _names_hint(name: str) -> str:
    """For a name that is no local folder: the names nqpq fetches itself (a mistyped one lands here)."""
    from .registry import MODELS

    return "" if os.path.exists(name) else f" (nqpq fetches {', '.join(MODELS)} by name: nqpq models)"


def _bare_gpt2_files(name: str) -> bool:
    """A folder holding only GPT-2's BPE files (vocab.json + merges.txt, as OpenAI published them): nothing in it
    tells AutoTokenizer its type, and GPT-2's byte-level BPE is what those two files define."""
    files = set(os.listdir(name)) if os.path.isdir(name) else set()
    return {"vocab.json", "merges.txt"} <= files and not files & {"tokenizer.json", "tokenizer_config.json",
                                                                  "config.json"}


def load_tokenizer(name: str):
    """``AutoTokenizer.from_pretrained(name)`` (no remote code), refusing empty tokenizers."""
    if is_gguf(name):  # the tokenizer stored in a GGUF file
        return load_gguf_tokenizer(name)
    from transformers import AutoTokenizer

    try:
        with _quiet_transformers():
            if _bare_gpt2_files(name):
                from transformers import GPT2TokenizerFast

                tok = GPT2TokenizerFast.from_pretrained(name)
            else:
                tok = AutoTokenizer.from_pretrained(name, local_files_only=cache_only(name), trust_remote_code=False)
    except (OSError, ValueError, KeyError) as err:
        if not os.path.isdir(name) and is_offline_error(err):
            raise NqpqError(OFFLINE_HINT.format(what="tokenizer", name=name, err=one_line(err))) from err
        raise NqpqError(f"Could not load a tokenizer from {name!r}: {one_line(err)}{_names_hint(name)}") from err
    if len(tok) <= 1:
        if not os.path.isdir(name):  # transformers 5 returns an empty tokenizer for an unreachable hub name
            raise NqpqError(OFFLINE_HINT.format(what="tokenizer", name=name, err="no tokenizer files found"))
        raise NqpqError(f"The tokenizer at {name!r} is empty (no tokenizer.json, vocab.json/merges.txt?)")
    return tok


def demo_model(vocab_size: int, seed: int, device: str, dtype: torch.dtype) -> nn.Module:
    """GPT-2 small geometry (12 layers, 12 heads, d_model 768) with RANDOM weights, fixed seed."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=vocab_size, n_positions=1024, n_embd=768, n_layer=12, n_head=12,
                        bos_token_id=vocab_size - 1, eos_token_id=vocab_size - 1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GPT2LMHeadModel(config)
    return model.to(device=device, dtype=dtype).eval()



# --- GGUF files ----------------------------------------------------------------------------------------------

GGUF_MAGIC = b"GGUF"  # the first four bytes of every GGUF file
INSTALL_HINT = 'pip install -e ".[gguf]"'
# llama.cpp names of architectures that transformers' GGUF loader renames before it looks them up in its table
# (modeling_gguf_pytorch_utils.load_gguf_checkpoint): refusing them would refuse files it loads.
_TRANSFORMERS_RENAMES = {"qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe", "gpt-oss": "gpt_oss",
                         "minimax-m2": "minimax_m2", "t5encoder": "t5"}


def _require_gguf_packages() -> None:
    """transformers' GGUF loader needs ``gguf`` (the reader) and ``accelerate``: a one-line error naming the extra."""
    for package in ("gguf", "accelerate"):
        try:
            __import__(package)
        except ImportError as err:
            raise NqpqError(f"loading a .gguf checkpoint needs the {package!r} package: {INSTALL_HINT}") from err


def supported_architectures() -> set[str]:
    """The ``general.architecture`` values this transformers' GGUF loader accepts (after its own renames)."""
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    # The table's keys are config sections; "general" and "tokenizer" are sections of every file, not models.
    names = set(GGUF_SUPPORTED_ARCHITECTURES) - {"general", "tokenizer"}
    try:  # transformers >= 5.x also has a second GGUF path with architectures of its own
        from transformers.integrations.gguf import GGUF_ARCHS

        names |= set(GGUF_ARCHS)
    except ImportError:
        pass
    return names


def read_gguf(path: str | os.PathLike):
    """``gguf.GGUFReader`` of ``path`` after checking it is a whole GGUF file; ``NqpqError`` otherwise.

    Checked: the file exists, starts with the GGUF magic, its metadata and tensor table parse, and every tensor's
    data lies inside the file (a truncated download fails here, not halfway through dequantizing).
    """
    _require_gguf_packages()
    from gguf import GGUFReader

    path = Path(path)
    if not path.is_file():
        raise NqpqError(f"--model {str(path)!r}: no such GGUF file")
    try:
        with open(path, "rb") as f:
            magic = f.read(len(GGUF_MAGIC))
    except OSError as err:
        raise NqpqError(f"--model {str(path)!r}: cannot read the file: {err}") from err
    if magic != GGUF_MAGIC:
        raise NqpqError(f"--model {str(path)!r} is not a GGUF file (it starts with {magic!r}, not {GGUF_MAGIC!r})")
    size = path.stat().st_size
    try:
        reader = GGUFReader(path)
    except (ValueError, IndexError, KeyError, OSError, UnicodeDecodeError) as err:
        raise NqpqError(f"--model {str(path)!r}: truncated or corrupt GGUF file ({one_line(err)})") from err
    for tensor in reader.tensors:
        if tensor.data_offset + tensor.n_bytes > size:
            raise NqpqError(f"--model {str(path)!r}: truncated GGUF file (tensor {tensor.name!r} ends at byte "
                            f"{tensor.data_offset + tensor.n_bytes}, the file has {size})")
    return reader


@dataclass(frozen=True)
class GgufSummary:
    """What nqpq reads of a checked GGUF file: its ``general.architecture``, its ``general.name`` (None when the file
    names none) and its tensors' ggml type names."""

    architecture: str
    name: str | None
    tensor_types: tuple[str, ...]


def gguf_summary(path: str | os.PathLike) -> GgufSummary:
    """``read_gguf``'s checks and the file's architecture, name and tensor types, read once per file version.

    ``GGUFReader`` parses every metadata field in Python (seconds for a 49k-token vocabulary); a sweep asks three
    times (tokenizer, model, results.json), so the answer is kept per (path, size, modification time).
    """
    st = Path(path).stat() if Path(path).is_file() else None
    key = (str(Path(path).resolve()), st.st_size if st else -1, st.st_mtime_ns if st else -1)
    return _summary(*key)


def _string_field(reader, key: str) -> str | None:
    field = reader.get_field(key)
    if field is None:
        return None
    # ReaderField.contents() is gguf >= 0.11; a string field's bytes are its part at data[0] in every version.
    return str(field.contents() if hasattr(field, "contents") else bytes(field.parts[field.data[0]]).decode("utf-8"))


@functools.lru_cache(maxsize=8)
def _summary(path: str, size: int, mtime_ns: int) -> GgufSummary:
    reader = read_gguf(path)
    arch = _string_field(reader, "general.architecture")
    if arch is None:
        raise NqpqError(f"--model {path!r}: the GGUF file names no general.architecture")
    return GgufSummary(arch, _string_field(reader, "general.name"),
                       tuple(sorted({t.tensor_type.name for t in reader.tensors})))


def check_gguf(path: str | os.PathLike) -> str:
    """The architecture of a whole, readable GGUF file that transformers can load; ``NqpqError`` otherwise."""
    arch = gguf_summary(path).architecture
    supported = supported_architectures()
    if arch not in supported and _TRANSFORMERS_RENAMES.get(arch) not in supported:
        raise NqpqError(f"--model {str(path)!r}: GGUF architecture {arch!r} is not supported by transformers "
                        f"{_transformers_version()}'s GGUF loader (supported: {', '.join(sorted(supported))})")
    return arch


def _folder_and_file(path: str | os.PathLike) -> tuple[str, str]:
    """``from_pretrained``'s way of naming a local GGUF file: its folder and its file name."""
    path = Path(path).resolve()
    return str(path.parent), path.name


def load_gguf(path: str | os.PathLike, device: str | torch.device = "cpu",
              dtype: torch.dtype = torch.float32) -> nn.Module:
    """The causal LM in the GGUF file ``path``, every weight dequantized into ``dtype``, in eval mode on ``device``.

    Refuses (``NqpqError``) what ``read_gguf`` and ``check_gguf`` refuse, models that are not decoder-only causal
    LMs, and files whose tensors do not fill every weight of the model. Never runs remote code.
    """
    _require_gguf_packages()
    from transformers import AutoConfig, AutoModelForCausalLM, GgufConfig

    check_gguf(path)
    name = str(path)
    folder, file = _folder_and_file(path)
    try:
        with _quiet_transformers():
            config = AutoConfig.from_pretrained(folder, gguf_file=file, trust_remote_code=False)
        check_architecture(config, name)
        with _quiet_transformers():
            model, info = AutoModelForCausalLM.from_pretrained(
                folder, gguf_file=file, config=config, dtype=dtype, trust_remote_code=False,
                # Plain dense weights: nqpq forms the logits from the LM head's weight and patches attention,
                # neither of which works on weights left packed in GGUF blocks (transformers' other mode).
                quantization_config=GgufConfig(gguf_file=file, dequantize=True),
                **LOAD_AS_STORED)
    except NqpqError:
        raise
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as err:
        raise NqpqError(f"Could not load the model from {name!r}: {type(err).__name__}: {one_line(err)}") from err
    problems = unloaded_weights(model, info)
    if problems:
        raise NqpqError(f"--model {name!r}: the GGUF file does not fit {type(model).__name__}: "
                        f"{'; '.join(problems)}. Refusing to run with randomly initialised weights.")
    packed = sorted({p.dtype for p in model.parameters()} - {dtype})
    if packed:
        raise NqpqError(f"--model {name!r}: weights were left in {packed[0]} after dequantizing into {dtype}")
    # The weights are plain tensors now: drop the quantizer so the model is an ordinary one (save_pretrained works,
    # nothing downstream takes it for a quantized model).
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    return model.to(device).eval()


def load_gguf_tokenizer(path: str | os.PathLike):
    """The tokenizer stored in the GGUF file ``path`` (``AutoTokenizer``, no remote code)."""
    _require_gguf_packages()
    from transformers import AutoTokenizer

    check_gguf(path)
    folder, file = _folder_and_file(path)
    try:
        with _quiet_transformers():
            tok = AutoTokenizer.from_pretrained(folder, gguf_file=file, trust_remote_code=False)
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as err:
        raise NqpqError(f"Could not load a tokenizer from {str(path)!r}: {type(err).__name__}: "
                        f"{one_line(err)}") from err
    if len(tok) <= 1:
        raise NqpqError(f"The GGUF file {str(path)!r} holds no tokenizer; pass --tokenizer")
    return tok


def sha256_of(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """The hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def gguf_file_info(path: str | os.PathLike, registry_name: str | None = None) -> dict:
    """What results.json records of a GGUF checkpoint, never its local path: ``{"name", "registry_name", "file",
    "size_bytes", "sha256", "quantization_types"}``.

    ``name`` is the file's own ``general.name`` (None when it names none), ``registry_name`` the ``--model`` name it
    was fetched by (``nqpq.sources.registry``; None for a file given by path), ``quantization_types`` the sorted ggml
    type names of its tensors (e.g. ``["F32", "Q4_1", "Q8_0"]``).
    """
    summary = gguf_summary(path)
    return {"name": summary.name, "registry_name": registry_name, "file": Path(path).name,
            "size_bytes": Path(path).stat().st_size, "sha256": sha256_of(path),
            "quantization_types": list(summary.tensor_types)}


def gguf_label(info: dict) -> str:
    """How reports and plot titles name a GGUF checkpoint (``gguf_file_info``'s record): what it is, its registry
    name, its file and the start of its sha256, e.g. ``Gemma 3 270m (gemma3-270m: gemma-3-270m-q4_k_m.gguf,
    sha256 a5fd3b62230a)``."""
    where = f"{info['registry_name']}: {info['file']}" if info.get("registry_name") else info["file"]
    return f"{info.get('name') or info['file']} ({where}, sha256 {info['sha256'][:12]})"

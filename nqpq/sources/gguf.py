"""GGUF files (llama.cpp's format), read by transformers' own loader with the ``gguf`` package. This module adds what
nqpq needs around it: the file is checked before anything is built (magic bytes, a tensor table that fits the file, an
architecture transformers can load), every weight is dequantized into the requested dtype (nqpq reads and upcasts
plain ``nn.Linear`` weights, never packed GGUF blocks), and ``gguf_file_info`` says what the file was (name, size,
sha256, quantization types) for results.json.
"""

from __future__ import annotations

import functools
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import NqpqError, one_line
from .loading import LOAD_AS_STORED, check_architecture, quiet_transformers, transformers_version, unloaded_weights

# transformers dequantizes a GGUF file whole, in host memory, before any placement: a device map would not spread
# the load, only the result. Save the dequantized model once and map that.
GGUF_DEVICE_MAP = ("--device-map with a .gguf file: the file is dequantized whole before any placement; save it "
                   "with save_pretrained first (nqpq fetch --converted does it for SmolLM2) and map that directory")


def is_gguf(name: str | os.PathLike) -> bool:
    """Whether ``name`` names a GGUF file (by its extension: the file may not exist yet, and is then refused)."""
    return str(name).lower().endswith(".gguf")


GGUF_MAGIC = b"GGUF"  # the first four bytes of every GGUF file
INSTALL_HINT = 'pip install -e ".[gguf]"'
# llama.cpp names of architectures that transformers' GGUF loader renames before it looks them up in its table
# (modeling_gguf_pytorch_utils.load_gguf_checkpoint): refusing them would refuse files it loads.
_TRANSFORMERS_RENAMES = {"qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe", "gpt-oss": "gpt_oss",
                         "minimax-m2": "minimax_m2", "t5encoder": "t5"}


def require_gguf_packages() -> None:
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
    require_gguf_packages()
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
                        f"{transformers_version()}'s GGUF loader (supported: {', '.join(sorted(supported))})")
    return arch


def folder_and_file(path: str | os.PathLike) -> tuple[str, str]:
    """``from_pretrained``'s way of naming a local GGUF file: its folder and its file name."""
    path = Path(path).resolve()
    return str(path.parent), path.name


def load_gguf(path: str | os.PathLike, device: str | torch.device = "cpu",
              dtype: torch.dtype = torch.float32) -> nn.Module:
    """The causal LM in the GGUF file ``path``, every weight dequantized into ``dtype``, in eval mode on ``device``.

    Refuses (``NqpqError``) what ``read_gguf`` and ``check_gguf`` refuse, models that are not decoder-only causal
    LMs, and files whose tensors do not fill every weight of the model. Never runs remote code.
    """
    require_gguf_packages()
    from transformers import AutoConfig, AutoModelForCausalLM, GgufConfig

    check_gguf(path)
    name = str(path)
    folder, file = folder_and_file(path)
    try:
        with quiet_transformers():
            config = AutoConfig.from_pretrained(folder, gguf_file=file, trust_remote_code=False)
        check_architecture(config, name)
        with quiet_transformers():
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
    require_gguf_packages()
    from transformers import AutoTokenizer

    check_gguf(path)
    folder, file = folder_and_file(path)
    try:
        with quiet_transformers():
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

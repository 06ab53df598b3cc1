"""Where a model comes from: the hub, a local directory, a GGUF file (``nqpq.sources.gguf``), the demo's random GPT-2,
and their tokenizers.

Every path ends in the same checks (``nqpq.sources.loading``): decoder-only causal LMs only (``check_architecture``),
every weight from the checkpoint (``unloaded_weights``), never remote code.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from ..errors import NqpqError, one_line
from .gguf import (
    GGUF_DEVICE_MAP,
    check_gguf,
    folder_and_file,
    is_gguf,
    load_gguf,
    load_gguf_tokenizer,
    require_gguf_packages,
)
from .hub import OFFLINE_HINT, OWNERLESS_HUB_MODELS, cache_only, in_hub_cache, is_offline_error
from .loading import LOAD_AS_STORED, check_architecture, quiet_transformers, unloaded_weights

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
          "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


class ByteTokenizer:
    """UTF-8 bytes as token ids (vocabulary 256): the demo's tokenizer, present on any machine."""

    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))


def parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise NqpqError(f"--dtype must be one of {sorted(set(DTYPES))}, got {name!r}")
    return DTYPES[name]


def check_model_name(name: str) -> None:
    """Refuse, in one line, a ``--model`` that names nothing nqpq could open.

    A model is a name nqpq fetches (``nqpq.sources.registry``), a .gguf file, a local directory, or a hub id. Hub ids
    are ``owner/name`` but for a few legacy owner-less ones (``OWNERLESS_HUB_MODELS``, e.g. ``gpt2``). So a bare name
    (no path separator) that is none of these, names no existing path and is not in the local hub cache is a
    mistake (``smollm3-135m``): refused here, naming the known names, rather than by the tokenizer's long error
    once the hub has been asked.
    """
    from .registry import MODELS, is_registry_name

    if (is_registry_name(name) or is_gguf(name) or "/" in name or os.sep in name or os.path.exists(name)
            or name in OWNERLESS_HUB_MODELS or in_hub_cache(name)):
        return
    raise NqpqError(f"unknown model name {name!r}; known: {', '.join(MODELS)} (or a local directory / hub id "
                    "org/name; nqpq models lists the known names)")


def load_config(name: str):
    """The config of checkpoint ``name`` (a local directory, a hub name or a .gguf file), read without any weight,
    checked to be a decoder-only causal LM (``check_architecture``); ``NqpqError`` otherwise, the load's own errors.

    Never runs remote code. A .gguf file is checked first (``check_gguf``) and its metadata read (seconds).
    """
    from transformers import AutoConfig

    if is_gguf(name):
        require_gguf_packages()
        check_gguf(name)
        folder, file = folder_and_file(name)
        try:
            with quiet_transformers():
                config = AutoConfig.from_pretrained(folder, gguf_file=file, trust_remote_code=False)
        except (OSError, ValueError, RuntimeError, KeyError, TypeError) as err:
            raise NqpqError(f"Could not load the model from {name!r}: {type(err).__name__}: {one_line(err)}") from err
    else:
        try:
            with quiet_transformers():
                config = AutoConfig.from_pretrained(name, local_files_only=cache_only(name), trust_remote_code=False)
        except (OSError, ValueError, KeyError) as err:
            if not os.path.isdir(name) and is_offline_error(err):
                raise NqpqError(OFFLINE_HINT.format(what="model", name=name, err=one_line(err))) from err
            raise NqpqError(f"Could not load the model from {name!r}: {one_line(err)}{_names_hint(name)}") from err
    check_architecture(config, name)
    return config


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
    from transformers import AutoModelForCausalLM

    local = os.path.isdir(name)
    offline = cache_only(name)
    config = load_config(name)
    try:
        with quiet_transformers():
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
        with quiet_transformers():
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


def demo_config(vocab_size: int):
    """The demo's GPT-2 small geometry (12 layers, 12 heads, d_model 768, 1024 positions)."""
    from transformers import GPT2Config

    return GPT2Config(vocab_size=vocab_size, n_positions=1024, n_embd=768, n_layer=12, n_head=12,
                      bos_token_id=vocab_size - 1, eos_token_id=vocab_size - 1)


def demo_model(vocab_size: int, seed: int, device: str, dtype: torch.dtype) -> nn.Module:
    """GPT-2 small geometry (12 layers, 12 heads, d_model 768) with RANDOM weights, fixed seed."""
    from transformers import GPT2LMHeadModel

    config = demo_config(vocab_size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GPT2LMHeadModel(config)
    return model.to(device=device, dtype=dtype).eval()

"""Loading the model, the tokenizer and the evaluation text (hub, local, or the offline demo)."""

from __future__ import annotations

import contextlib
import functools
import inspect
import os
import urllib.error
import urllib.request
from collections.abc import Iterable, Iterator

import torch
from torch import Tensor, nn


class NqpqError(Exception):
    """A user-facing error: the CLI prints its message (no traceback) and exits non-zero."""


OFFLINE_HINT = (
    "Could not load {what} {name!r}: the Hugging Face hub is unreachable and nothing is cached. "
    "Point nqpq at local files instead: --model PATH (a directory saved with save_pretrained, "
    "holding config, weights and tokenizer files; --tokenizer PATH if the tokenizer lives elsewhere) "
    "and --text-file PATH (raw text, e.g. WikiText's wiki.valid.raw), or try the no-download "
    "demo with --demo (random weights). Original error: {err}"
)

# transformers dequantizes a GGUF file whole, in host memory, before any placement: a device map would not spread
# the load, only the result. Save the dequantized model once and map that.
GGUF_DEVICE_MAP = ("--device-map with a .gguf file: the file is dequantized whole before any placement; save it "
                   "with save_pretrained first (python -m nqpq.fetch --converted does it for SmolLM2) and map that "
                   "directory")

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


def _is_offline_error(err: Exception) -> bool:
    text = f"{type(err).__name__}: {err}".lower()
    return any(s in text for s in ("offline", "connect", "resolve", "network", "hub", "does not appear to have",
                                   "couldn't", "could not", "not a valid", "repository", "timed out", "http"))


@functools.lru_cache(maxsize=1)
def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers at all (any HTTP reply counts), within ``timeout`` seconds.

    Asked once per process so that an unreachable hub costs seconds, not the minutes of
    retries the download clients would spend before giving up.
    """
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    try:
        urllib.request.urlopen(constants.ENDPOINT, timeout=timeout).close()
    except urllib.error.HTTPError:
        return True
    except (OSError, ValueError):
        return False
    return True


def _cache_only(name: str) -> bool:
    """Load ``name`` from the local cache only: it is not a folder and the hub cannot be reached."""
    return not os.path.isdir(name) and not hub_reachable()


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
    model stays where the map put it (``nqpq.devices.execution_device`` says where each part computes).

    Never runs remote code. Raises ``NqpqError`` for encoder(-decoder) models, unreadable or truncated
    checkpoints, and checkpoints whose weights do not all load (missing, unexpected or mismatched keys),
    so a model is never run with randomly initialised weights.
    """
    if is_gguf(name):  # a GGUF file, never a hub name (nqpq.checkpoints)
        from .checkpoints import load_gguf

        if device_map is not None:
            raise NqpqError(GGUF_DEVICE_MAP)
        return load_gguf(name, device, dtype)
    from safetensors import SafetensorError
    from transformers import AutoConfig, AutoModelForCausalLM

    local = os.path.isdir(name)
    cache_only = _cache_only(name)
    try:
        with _quiet_transformers():
            config = AutoConfig.from_pretrained(name, local_files_only=cache_only, trust_remote_code=False)
        check_architecture(config, name)
        with _quiet_transformers():
            model, info = AutoModelForCausalLM.from_pretrained(
                name, config=config, dtype=dtype, local_files_only=cache_only, trust_remote_code=False,
                # Mismatched shapes are listed in the loading info (and refused below) rather than raised
                # with a pointer to transformers' load report.
                ignore_mismatched_sizes=True, output_loading_info=True,
                **({} if device_map is None else
                   {"device_map": device_map, "max_memory": max_memory, "offload_folder": offload_folder}))
    except NqpqError:
        raise
    except (OSError, ValueError) as err:
        if not local and _is_offline_error(err):
            raise NqpqError(OFFLINE_HINT.format(what="model", name=name, err=_one_line(err))) from err
        raise NqpqError(f"Could not load the model from {name!r}: {_one_line(err)}") from err
    except (SafetensorError, RuntimeError, KeyError) as err:  # truncated/corrupt weights, shape mismatches
        raise NqpqError(f"Could not load the model from {name!r}: {type(err).__name__}: {_one_line(err)}") from err
    problems = unloaded_weights(model, info)
    if problems:
        raise NqpqError(f"--model {name!r}: the checkpoint does not fit {type(model).__name__}: "
                        f"{'; '.join(problems)}. Refusing to run with randomly initialised weights.")
    return (model if device_map is not None else model.to(device)).eval()


def _one_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__


def _bare_gpt2_files(name: str) -> bool:
    """A folder holding only GPT-2's BPE files (vocab.json + merges.txt, as OpenAI published them): nothing in it
    tells AutoTokenizer its type, and GPT-2's byte-level BPE is what those two files define."""
    files = set(os.listdir(name)) if os.path.isdir(name) else set()
    return {"vocab.json", "merges.txt"} <= files and not files & {"tokenizer.json", "tokenizer_config.json",
                                                                  "config.json"}


def load_tokenizer(name: str):
    """``AutoTokenizer.from_pretrained(name)`` (no remote code), refusing empty tokenizers."""
    if is_gguf(name):  # the tokenizer stored in a GGUF file (nqpq.checkpoints)
        from .checkpoints import load_gguf_tokenizer

        return load_gguf_tokenizer(name)
    from transformers import AutoTokenizer

    try:
        with _quiet_transformers():
            if _bare_gpt2_files(name):
                from transformers import GPT2TokenizerFast

                tok = GPT2TokenizerFast.from_pretrained(name)
            else:
                tok = AutoTokenizer.from_pretrained(name, local_files_only=_cache_only(name), trust_remote_code=False)
    except (OSError, ValueError, KeyError) as err:
        if not os.path.isdir(name) and _is_offline_error(err):
            raise NqpqError(OFFLINE_HINT.format(what="tokenizer", name=name, err=_one_line(err))) from err
        raise NqpqError(f"Could not load a tokenizer from {name!r}: {_one_line(err)}") from err
    if len(tok) <= 1:
        if not os.path.isdir(name):  # transformers 5 returns an empty tokenizer for an unreachable hub name
            raise NqpqError(OFFLINE_HINT.format(what="tokenizer", name=name, err="no tokenizer files found"))
        raise NqpqError(f"The tokenizer at {name!r} is empty (no tokenizer.json, vocab.json/merges.txt?)")
    return tok


def open_text_file(path: str, flag: str = "--text-file"):
    """``path`` opened for reading as UTF-8 text, or a clear ``NqpqError`` naming ``flag`` (checked before any model
    loads)."""
    try:
        return open(path, encoding="utf-8")
    except OSError as err:
        raise NqpqError(f"Could not read {flag} {path!r}: {err}") from err


def rows_from_file(path: str, flag: str = "--text-file") -> Iterator[str]:
    """The lines of ``path`` with their newline, as ``datasets`` gives WikiText rows, read lazily.

    The same rows as ``f.read().splitlines(keepends=True)``: universal newlines first, then
    ``str.splitlines``' other line boundaries within each line.
    """
    f = open_text_file(path, flag)
    with f:
        try:
            for line in f:
                yield from line.splitlines(keepends=True)
        except (OSError, UnicodeDecodeError) as err:
            raise NqpqError(f"Could not read {flag} {path!r}: {err}") from err


def rows_from_hub(batch_rows: int = 1024) -> Iterator[str]:
    """The WikiText-103 raw validation split, the spec's text, row by row.

    ``datasets`` keeps the split memory-mapped on disk; rows are read in batches as they
    are consumed, never the whole column at once.
    """
    try:
        import datasets

        if not hub_reachable():  # use a cached copy if there is one, without minutes of retries
            datasets.config.HF_HUB_OFFLINE = True
        split = datasets.load_dataset("wikitext", "wikitext-103-raw-v1", split="validation")
    except Exception as err:  # datasets raises many types when offline
        raise NqpqError(OFFLINE_HINT.format(what="dataset", name="wikitext/wikitext-103-raw-v1", err=err)) from err
    for batch in split.iter(batch_size=batch_rows):
        yield from batch["text"]


def demo_rows() -> list[str]:
    """Offline demo text present on any machine: docstrings of standard-library modules."""
    import argparse
    import collections
    import dataclasses
    import json
    import logging
    import pathlib
    import re
    import subprocess
    import threading
    import typing
    import unittest

    rows = []
    for mod in (argparse, collections, dataclasses, json, logging, pathlib, re, subprocess, threading,
                typing, unittest, os, inspect):
        for _, obj in sorted(vars(mod).items()):
            doc = inspect.getdoc(obj) if callable(obj) or inspect.ismodule(obj) else None
            if doc:
                rows.extend(line + "\n" for line in doc.splitlines())
    return rows


def join_rows(rows: Iterable[str]) -> str:
    """The spec's text preparation: keep rows with non-space content, join with blank lines."""
    return "\n\n".join(t for t in rows if t.strip())


def tokenize(text: str, tokenizer) -> Tensor:
    """The text's own tokens, without the special tokens a tokenizer adds (BOS goes in per block, see
    ``nqpq.evaluate.make_blocks``); for a tokenizer that adds none, exactly ``tokenizer.encode(text)``."""
    if hasattr(tokenizer, "bos_token_id"):  # a transformers tokenizer
        ids = tokenizer.encode(text, add_special_tokens=False)
    else:
        ids = tokenizer.encode(text)
    return torch.tensor(ids, dtype=torch.long)


def tokenizer_bos_id(tokenizer) -> int | None:
    """The BOS id when the tokenizer puts BOS first in every text it encodes (Gemma, Llama 3: the model was
    trained to always see it), else None (GPT-2, SmolLM2: they add none)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return None
    ids = tokenizer("x").input_ids
    return int(bos) if len(ids) and ids[0] == bos else None


def choose_bos(tokenizer, force: bool | None) -> int | None:
    """The BOS id to start every block with: the tokenizer's rule (``force`` None), or forced on (True: the
    tokenizer must have a BOS token) or off (False)."""
    if force is False:
        return None
    if force is None:
        return tokenizer_bos_id(tokenizer)
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        raise NqpqError("--bos: the tokenizer has no BOS token to start the blocks with (use --no-bos)")
    return int(bos)


# Tokens tokenized beyond those used. Tokenizing a prefix of the text can change only its last
# few tokens (BPE merges and whitespace pre-tokens at the cut, an end-of-text token some
# tokenizers append); everything this far before the cut is what the whole text gives.
CUT_MARGIN_TOKENS = 256


def ids_for_blocks(rows: Iterable[str], tokenizer, needed: int, chars_per_token: float = 4.0) -> Tensor:
    """The first ``needed`` ids of ``tokenize(join_rows(rows), tokenizer)``, reading only the rows they need.

    Rows are consumed lazily; the joined prefix is tokenized when it may hold enough tokens
    (``needed + CUT_MARGIN_TOKENS``), and the character budget doubles until it does, so the
    work and memory are a small multiple of what the blocks use, whatever the size of the text.
    If the text runs out first, every id of the whole text is returned: fewer than ``needed``
    when the text is too short (the caller reports that).
    """
    if needed < 1:
        raise ValueError(f"needed must be at least 1, got {needed}")
    row_iter = iter(rows)
    kept: list[str] = []
    chars, budget = 0, int((needed + CUT_MARGIN_TOKENS) * chars_per_token) + 1
    while True:
        exhausted = False
        while chars < budget:
            row = next(row_iter, None)
            if row is None:
                exhausted = True
                break
            if row.strip():
                kept.append(row)
                chars += len(row) + 2
        ids = tokenize(join_rows(kept), tokenizer)
        if exhausted or ids.numel() >= needed + CUT_MARGIN_TOKENS:
            return ids[:needed].clone()
        budget *= 2


def demo_model(vocab_size: int, seed: int, device: str, dtype: torch.dtype) -> nn.Module:
    """GPT-2 small geometry (12 layers, 12 heads, d_model 768) with RANDOM weights, fixed seed."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=vocab_size, n_positions=1024, n_embd=768, n_layer=12, n_head=12,
                        bos_token_id=vocab_size - 1, eos_token_id=vocab_size - 1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GPT2LMHeadModel(config)
    return model.to(device=device, dtype=dtype).eval()


def check_ids_fit(ids: Tensor, model: nn.Module, vocab_size: int | None = None) -> None:
    """Refuse token ids the model's input embedding has no row for (a tokenizer bigger than the model)."""
    rows = model.get_input_embeddings().num_embeddings
    if ids.numel() and int(ids.max()) >= rows:
        tok = f"the tokenizer's vocabulary ({vocab_size} tokens)" if vocab_size is not None else "the token ids"
        raise NqpqError(f"{tok} does not fit the model's embedding ({rows} rows): token id {int(ids.max())} "
                        "is out of range; use the tokenizer the model was trained with (--tokenizer)")
    if ids.numel() and int(ids.min()) < 0:
        raise NqpqError(f"token id {int(ids.min())} is negative")

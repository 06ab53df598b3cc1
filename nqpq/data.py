"""Loading the model, the tokenizer and the evaluation text (hub, local, or the offline demo)."""

from __future__ import annotations

import functools
import inspect
import os
import urllib.error
import urllib.request

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


def load_model(name: str, device: str, dtype: torch.dtype) -> nn.Module:
    """``GPT2LMHeadModel.from_pretrained(name)`` in eval mode on ``device``."""
    from transformers import GPT2LMHeadModel

    local = os.path.isdir(name)
    try:
        model = GPT2LMHeadModel.from_pretrained(name, dtype=dtype, local_files_only=_cache_only(name))
    except (OSError, ValueError) as err:
        if not local and _is_offline_error(err):
            raise NqpqError(OFFLINE_HINT.format(what="model", name=name, err=err)) from err
        raise NqpqError(f"Could not load the model from {name!r}: {err}") from err
    return model.to(device).eval()


def load_tokenizer(name: str):
    from transformers import GPT2TokenizerFast

    try:
        tok = GPT2TokenizerFast.from_pretrained(name, local_files_only=_cache_only(name))
    except (OSError, ValueError) as err:
        if not os.path.isdir(name) and _is_offline_error(err):
            raise NqpqError(OFFLINE_HINT.format(what="tokenizer", name=name, err=err)) from err
        raise NqpqError(f"Could not load a GPT-2 tokenizer from {name!r}: {err}") from err
    if len(tok) <= 1:
        if not os.path.isdir(name):  # transformers 5 returns an empty tokenizer for an unreachable hub name
            raise NqpqError(OFFLINE_HINT.format(what="tokenizer", name=name, err="no tokenizer files found"))
        raise NqpqError(f"The tokenizer at {name!r} is empty (no vocab.json/merges.txt or tokenizer.json?)")
    return tok


def rows_from_file(path: str) -> list[str]:
    """Lines with their newline, as ``datasets`` gives WikiText rows."""
    try:
        with open(path, encoding="utf-8") as f:
            return f.read().splitlines(keepends=True)
    except (OSError, UnicodeDecodeError) as err:
        raise NqpqError(f"Could not read --text-file {path!r}: {err}") from err


def rows_from_hub() -> list[str]:
    """The WikiText-103 raw validation split, the spec's text."""
    try:
        import datasets

        if not hub_reachable():  # use a cached copy if there is one, without minutes of retries
            datasets.config.HF_HUB_OFFLINE = True
        return list(datasets.load_dataset("wikitext", "wikitext-103-raw-v1", split="validation")["text"])
    except Exception as err:  # datasets raises many types when offline
        raise NqpqError(OFFLINE_HINT.format(what="dataset", name="wikitext/wikitext-103-raw-v1", err=err)) from err


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


def join_rows(rows: list[str]) -> str:
    """The spec's text preparation: keep rows with non-space content, join with blank lines."""
    return "\n\n".join(t for t in rows if t.strip())


def tokenize(text: str, tokenizer) -> Tensor:
    ids = tokenizer.encode(text)
    return torch.tensor(ids, dtype=torch.long)


def demo_model(vocab_size: int, seed: int, device: str, dtype: torch.dtype) -> nn.Module:
    """GPT-2 small geometry (12 layers, 12 heads, d_model 768) with RANDOM weights, fixed seed."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=vocab_size, n_positions=1024, n_embd=768, n_layer=12, n_head=12,
                        bos_token_id=vocab_size - 1, eos_token_id=vocab_size - 1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GPT2LMHeadModel(config)
    return model.to(device=device, dtype=dtype).eval()

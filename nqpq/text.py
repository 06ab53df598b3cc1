"""The evaluation text: rows (a file, the hub's WikiText, the demo's docstrings), tokenization, BOS, the ids blocks use.

Nothing here loads a model: ``nqpq.checkpoints`` says where models and tokenizers come from; this module turns text
into the token ids the blocks (``nqpq.evaluate.make_blocks``) are cut from.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Iterable, Iterator

import torch
from torch import Tensor, nn

from .errors import NqpqError
from .hub import OFFLINE_HINT, hub_reachable


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


def check_ids_fit(ids: Tensor, model: nn.Module, vocab_size: int | None = None) -> None:
    """Refuse token ids the model's input embedding has no row for (a tokenizer bigger than the model)."""
    rows = model.get_input_embeddings().num_embeddings
    if ids.numel() and int(ids.max()) >= rows:
        tok = f"the tokenizer's vocabulary ({vocab_size} tokens)" if vocab_size is not None else "the token ids"
        raise NqpqError(f"{tok} does not fit the model's embedding ({rows} rows): token id {int(ids.max())} "
                        "is out of range; use the tokenizer the model was trained with (--tokenizer)")
    if ids.numel() and int(ids.min()) < 0:
        raise NqpqError(f"token id {int(ids.min())} is negative")

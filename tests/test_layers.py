"""The house in layers (issue 33): the import graph of ``nqpq`` and ``nqpq_kernels``, drawn from the source, has no
cycle and points one way; the kernel package stands alone (no transformers, datasets or nqpq).

The graph counts every import in a module: at the top, inside functions (lazy imports) and under
``TYPE_CHECKING`` (a type hint is an arrow too).
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("nqpq", "nqpq_kernels")

# Bottom to top: a module may import modules of its own layer or of the layers below it, never above. The kernel
# package is the bottom (the op, standing alone); errors is the research package's floor; sources (checkpoints, text);
# results (numbers in, text out: stats, verdict, report, plots) need nothing of the model, so `nqpq report DIR` loads
# no model stack, and the model adaptation may use their statistics (perplexity); the experiments that produce
# results above both; the CLI and the package's face on top.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("kernels", ("nqpq_kernels",)),
    ("errors", ("nqpq.errors", "nqpq.version")),
    ("sources", ("nqpq.sources",)),
    ("results", ("nqpq.results",)),
    ("model", ("nqpq.model",)),
    ("experiments", ("nqpq.experiments",)),
    ("top", ("nqpq.cli", "nqpq.__main__", "nqpq")),
]

# Arrows that still point up (none today). An entry that no longer exists fails the test below: delete it then, so
# that the list only ever shrinks.
KNOWN_UPWARD: set[tuple[str, str]] = set()


def source_modules() -> dict[str, Path]:
    """Every module of the two packages by dotted name (a package by its own name, for its __init__)."""
    found = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            parts = path.relative_to(REPO).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imported_modules(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The modules of ``known`` that the module ``name`` imports anywhere in its source."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                module = ".".join([*base, node.module] if node.module else base)
            else:
                module = node.module
            # ``from pkg import name``: name may be a submodule of pkg (then it is the arrow) or an attribute.
            targets = [module, *(f"{module}.{alias.name}" for alias in node.names)]
        else:
            continue
        for target in targets:
            parts = target.split(".")
            for i in range(len(parts), 0, -1):  # the longest known module the name starts with
                candidate = ".".join(parts[:i])
                if candidate in known:
                    if candidate != name:
                        out.add(candidate)
                    break
    return out


def import_graph() -> dict[str, set[str]]:
    known = source_modules()
    return {name: imported_modules(name, path, known) for name, path in known.items()}


def layer_of(module: str) -> int:
    """The index in LAYERS of the layer holding ``module`` (the longest matching prefix decides)."""
    best, best_len = None, -1
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best_len:
                best, best_len = index, len(prefix)
    assert best is not None, f"{module} is in no layer: add it to LAYERS"
    return best


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a list of modules (first = last), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start)):
            return found
    return None


def test_graph_sees_lazy_and_type_checking_imports():
    """The drawing counts what the rules need it to: a relative import inside a function, a package import
    (``from . import x``) and an import under TYPE_CHECKING."""
    graph = import_graph()
    assert "nqpq.experiments.scan" in graph["nqpq.cli_commands"]  # imported inside sweep_command
    assert "nqpq.experiments.distributed" in graph["nqpq.experiments.config"]  # from . import distributed
    assert "nqpq_kernels.prefill" in graph["nqpq_kernels"]  # under TYPE_CHECKING only
    assert "nqpq_kernels.prefill" in graph["nqpq_kernels.dispatch"]  # lazily, in residual_attention_impl
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_imports_point_down_the_layers():
    graph = import_graph()
    upward = {(src, dst) for src, dsts in graph.items() for dst in dsts if layer_of(dst) > layer_of(src)}
    new = sorted(upward - KNOWN_UPWARD)
    assert not new, "imports pointing up the layers: " + ", ".join(
        f"{src} ({LAYERS[layer_of(src)][0]}) -> {dst} ({LAYERS[layer_of(dst)][0]})" for src, dst in new)
    gone = sorted(KNOWN_UPWARD - upward)
    assert not gone, f"KNOWN_UPWARD lists arrows that are gone: delete {gone}"


def test_every_module_has_a_layer():
    for module in source_modules():
        layer_of(module)


def test_kernel_package_imports_only_torch_triton_and_itself():
    """From the source: nqpq_kernels names no third-party package but torch and triton, and nothing of nqpq."""
    allowed = {"torch", "triton", "nqpq_kernels"}
    stdlib = set(sys.stdlib_module_names) | {"__future__"}
    for path in sorted((REPO / "nqpq_kernels").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                roots = [alias.name.split(".")[0] for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                roots = [node.module.split(".")[0]]
            else:
                continue
            bad = [r for r in roots if r not in allowed and r not in stdlib]
            assert not bad, f"{path.relative_to(REPO)}:{node.lineno} imports {bad}"


# Run in a fresh interpreter with transformers, datasets and nqpq made unimportable. The inputs have a clear maximum
# by construction: T orthonormal keys, and query t = 20 · key w(t) with w(t) <= t, so row t's scaled scores are
# 20/sqrt(D) = 5 at w(t) and 0 at every other visible key. The float64 reference is written out here.
STANDALONE = r"""
import importlib.abc
import sys

BLOCKED = {"transformers", "datasets", "nqpq"}


class Blocked(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname.split(".")[0] in BLOCKED:
            raise ImportError(f"{fullname} is blocked: the kernel package must stand alone")
        return None


sys.meta_path.insert(0, Blocked())
for name in list(sys.modules):
    assert name.split(".")[0] not in BLOCKED, name

import torch

import nqpq_kernels
from nqpq_kernels import residual_attention

KERNEL_MODULES = ("prefill", "prefill_kernel", "prefill_loop", "tile_helpers", "decode", "decode_kernel")
loaded = [name for name in KERNEL_MODULES if f"nqpq_kernels.{name}" in sys.modules]
assert not loaded, f"importing nqpq_kernels loaded the Triton kernel modules {loaded}"
try:
    import transformers  # noqa: F401
except ImportError:
    pass
else:
    raise AssertionError("the import blocker did not block transformers")

backend = sys.argv[1]
B, Hq, Hkv, T, D = 1, 2, 1, 8, 16
gen = torch.Generator().manual_seed(0)
keys = torch.linalg.qr(torch.randn(D, D, dtype=torch.float64, generator=gen))[0][:T]  # orthonormal rows
winners = torch.stack([torch.arange(T) // 2, torch.arange(T)])  # head 0: key t // 2; head 1: itself
q = (20.0 * keys[winners]).unsqueeze(0)  # [1, Hq, T, D]
k = keys.expand(B, Hkv, T, D)
v = torch.randn(B, Hkv, T, D, dtype=torch.float64, generator=gen)

# float64 reference: causal softmax attention, query head h reads kv head h // (Hq // Hkv) = 0.
scores = q @ k.transpose(-1, -2) * D**-0.5
scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
ctx = torch.softmax(scores, dim=-1) @ v
assert torch.equal(scores.argmax(-1)[0], winners)

q32, k32, v32 = (x.float() for x in (q, k, v))
full = residual_attention(q32, k32, v32, mode="full", backend=backend)
torch.testing.assert_close(full.double(), ctx, atol=2e-6, rtol=1e-5)
top1, argmax = residual_attention(q32, k32, v32, mode="top1", backend=backend, return_argmax=True)
assert torch.equal(argmax[0], winners), argmax
assert torch.equal(top1[0], v32[0, 0][winners])  # V[i*], gathered: exact
print("ok", backend, "nqpq_kernels.prefill_kernel" in sys.modules)
"""


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_kernel_package_stands_alone(backend):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if backend == "triton":
        env["TRITON_INTERPRET"] = "1"  # the kernel in Triton's CPU interpreter (set before triton is imported)
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(STANDALONE), backend], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    # The torch backend never loads the kernel; the Triton backend does, on first use.
    assert result.stdout.split() == ["ok", backend, str(backend == "triton")]

"""Residual bases from calibration text, streamed through Gram matrices.

The spec stacks every ε row and takes an SVD. The right-singular vectors of E
are the eigenvectors of Eᵀ E and the squared singular values its eigenvalues,
so we accumulate G = Σ ε εᵀ (float64, ``[H, D, D]`` per layer) block by block
and eigendecompose once: memory stays O(D²) whatever the calibration length.

D is the value width D_v: ε = ctx − ground lives where V does, which multi-head latent attention (DeepSeek
V2/V3, MiniCPM3, ...) makes narrower than q/k. A layer whose module calls its attention function once per part
of V on the same q and k (DiffLlama: each half) has one basis for its parts, fitted to all of them: each call's
ε joins the layer's Gram (the least-squares basis shared by the parts), while its rows are one attention's.
With a learned sink (gpt-oss) ε = ctx − (1 − m_L) V[i*]: the sink's mass is kept out of the ground state's
winner, as it is at crystallization.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..model.crystallize import Observer, observe_residuals
from ..model.devices import execution_device, input_device
from ..model.losses import check_batch_size
from ..model.parts import ModelParts, layer_heads, model_parts
from .distributed import all_reduce_sum

VARIANCE_TARGET = 0.90


def float64_device(device: torch.device) -> torch.device:
    """Where float64 sums can live: the device itself, or the CPU for devices without float64 (Apple MPS)."""
    return torch.device("cpu") if device.type == "mps" else device


class GramAccumulator:
    """Sums the per-layer Gram matrices handed over by crystallized attention.

    Each layer's sum stays on the device its attention ran on (under a device map, the layer's own device:
    no transfer per call); ``reduce_grams`` sums them across ranks once, at the end.
    """

    def __init__(self) -> None:
        self.grams: dict[int, Tensor] = {}

    def add(self, layer: int, gram: Tensor) -> None:
        gram = gram.to(float64_device(gram.device)).to(torch.float64)
        if layer in self.grams:
            self.grams[layer] += gram
        else:
            self.grams[layer] = gram.clone()


@dataclass
class ResidualBasis:
    """Per-layer residual bases and spectra.

    ``basis[layer]``: ``[H, D, D]`` float32 (D the layer's value width D_v), column r the r-th principal
    direction of ε.
    ``eigenvalues[layer]``: ``[H, D]`` float64, descending (the spec's S²).
    ``cumulative_variance[layer]``: ``[H, D]``; ``r90[layer]``: ``[H]`` smallest r reaching 90 %.
    """

    basis: dict[int, Tensor]
    eigenvalues: dict[int, Tensor]
    cumulative_variance: dict[int, Tensor]
    r90: dict[int, Tensor]

    @property
    def layers(self) -> list[int]:
        return sorted(self.basis)

    def save(self, path: str) -> None:
        torch.save({k: getattr(self, k) for k in ("basis", "eigenvalues", "cumulative_variance", "r90")}, path)

    @classmethod
    def load(cls, path: str) -> ResidualBasis:
        return cls(**torch.load(path, map_location="cpu", weights_only=True))


@contextlib.contextmanager
def _one_thread():
    """Run the block on one intra-op thread, then restore the count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def basis_from_grams(grams: dict[int, Tensor]) -> ResidualBasis:
    """Eigendecompose each layer's ``[H, D, D]`` Gram into basis, spectrum and r90.

    On one thread: MKL's threaded eigensolver on these small matrices (D <= 256) spends its time in OpenMP
    barriers, catastrophically so when another process holds a core (12 Grams of 64 x 64 on 2 shared cores:
    0.95 s on 2 threads, 5 ms on 1, torch 2.13 + MKL 2024.2)."""
    basis, eigenvalues, cumvar, r90 = {}, {}, {}, {}
    for layer, gram in grams.items():
        with _one_thread():
            evals, evecs = torch.linalg.eigh(gram.to(torch.float64).cpu())  # ascending
        evals = evals.flip(-1).clamp_(min=0.0)
        evecs = evecs.flip(-1)
        cv = evals.cumsum(-1) / evals.sum(-1, keepdim=True).clamp(min=1e-12)
        basis[layer] = evecs.to(torch.float32)
        eigenvalues[layer] = evals
        cumvar[layer] = cv
        r90[layer] = (cv < VARIANCE_TARGET).sum(-1) + 1  # the spec's count, kept as is
    return ResidualBasis(basis, eigenvalues, cumvar, r90)


@torch.no_grad()
def calibrate(
    model: torch.nn.Module,
    blocks: Tensor,
    layers: Sequence[int] | Mapping[int, Sequence[int]],
    *,
    batch_size: int = 4,
    backend: str = "auto",
    sink_tokens: int = 0,
    parts: ModelParts | None = None,
) -> ResidualBasis:
    """Residual bases of ``layers`` from calibration ``blocks`` ``[N, T]`` (token ids).

    Runs the unmodified model (its own attention, bit for bit) up to the highest of ``layers`` and accumulates
    Σ εεᵀ per query head on the way from the same q, k, v. ``sink_tokens=n`` fits the residual of the ground
    state that keeps the first n keys exactly (``nqpq.residual_attention``; 0: the spec's ε = ctx − V[i*]).
    Under torch.distributed, pass each rank its share of the blocks: the Gram matrices are summed across ranks.
    ``layers`` is a list of layer indices or a mapping layer → query heads, read and checked as ``crystallize``
    reads it (``nqpq.model.parts.layer_heads``): the basis of every head of each layer is fitted either way (the
    Gram of ε is collected for every head), so the one basis serves any choice of heads.
    ``parts``: the model's ``model_parts``, when the caller has them already; found here otherwise.
    """
    if not isinstance(blocks, Tensor) or blocks.dim() != 2:
        shape = tuple(blocks.shape) if isinstance(blocks, Tensor) else type(blocks).__name__
        raise ValueError(f"blocks must be [N, T] token ids (e.g. make_blocks(ids, seq_len, n)), got {shape}")
    batch_size = check_batch_size(batch_size)
    if parts is None:
        parts = model_parts(model)
    # Read once, as crystallize reads them: the heads are checked against each layer's query heads.
    layers = tuple(layer_heads(layers, parts.n_layers, parts.query_heads))
    batches = [blocks[s : s + batch_size] for s in range(0, blocks.shape[0], batch_size)]
    grams = gram_passes(model, batches, layers, (sink_tokens,), backend=backend, parts=parts)[sink_tokens]
    return basis_from_grams(reduce_grams(grams, layers, parts))


class _StopForward(Exception):
    """Raised on entering the first layer above those observed: the rest of the forward is not needed."""


@contextlib.contextmanager
def _stop_above(parts, last: int) -> Iterator[None]:
    """Make the body's forward end (``_StopForward``) where layer ``last + 1`` would start."""
    if last + 1 >= parts.n_layers:
        yield
        return

    def stop(module, args, kwargs):
        raise _StopForward

    handle = parts.layers[last + 1].register_forward_pre_hook(stop, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


@torch.no_grad()
def gram_passes(model: torch.nn.Module, batches: Iterable[Tensor], layers: Sequence[int],
                sink_tokens: Sequence[int], *, backend: str = "auto", progress=None,
                parts: ModelParts | None = None) -> dict[int, dict[int, Tensor]]:
    """This process's Σ εεᵀ (``[Hq, D_v, D_v]`` float64 per layer) of ``layers`` over the token-id ``batches``, for each
    sink setting n in ``sink_tokens``: ``{n: {layer: gram}}``, every setting observed on the same forward (its ε
    from its own op call on the same q, k, v).

    The model's own attention output is kept and the body runs only up to the highest of ``layers``: no layer
    above it, no final norm, no LM head (a calibration pass has no loss to compute). Not yet summed across ranks
    (``reduce_grams``). ``parts``: the model's ``model_parts``, when the caller has them already.
    """
    if parts is None:
        parts = model_parts(model)
    device = input_device(model)
    gram_accs = {n: GramAccumulator() for n in dict.fromkeys(sink_tokens)}  # one per sink setting
    observers = [Observer(n, acc) for n, acc in gram_accs.items()]
    with observe_residuals(model, layers, None, backend=backend, observers=observers, parts=parts), \
            _stop_above(parts, max(layers)):
        for batch in batches:
            try:
                parts.body(input_ids=batch.to(device), use_cache=False, return_dict=True)
            except _StopForward:
                pass
            if progress is not None:
                progress.update(batch.shape[0])
    return {n: acc.grams for n, acc in gram_accs.items()}


def reduce_grams(grams: dict[int, Tensor], layers: Sequence[int], parts: ModelParts) -> dict[int, Tensor]:
    """Sum ``[Hq, D, D]`` Gram matrices across ranks (a rank with no calibration blocks contributes zeros).

    Each layer's Gram is reduced where it was accumulated, its layer's execution device (device maps put
    layers on different devices); a missing one is created there as zeros, so every rank reduces the same
    layers in the same order. ``parts``: the model's ``model_parts``.
    """
    out = {}
    for li in layers:
        g = grams.get(li)
        if g is None:
            device = float64_device(execution_device(parts.attn[li]))
            geo = parts.geometry[li]  # the Gram lives in value space: [Hq, D_v, D_v]
            g = torch.zeros(geo.n_heads, geo.v_dim, geo.v_dim, dtype=torch.float64, device=device)
        out[li] = all_reduce_sum(g)
    return out

"""Each sweep configuration's attention cost: ``nqpq.results.cost``'s formulas and the op timed on the run's device.

The op is timed on its own, on the run's q/k/v shapes (one block of ``seq_len`` tokens, each distinct layer
geometry of the crystallized layers, the model's dtype) with random inputs, through the backend the sweep uses.
Every configuration is timed together, once the sweep's passes are done, in ``repeats`` interleaved rounds (each round
calls every configuration once, in a rotated order), after one warm-up call each (Triton compiles there); each
configuration keeps its fastest round, summed over the crystallized layers. Interleaving is what makes the ratios
mean something on a shared machine: configurations timed minutes apart, as the passes run, see different loads (a
SmolLM2 sweep at T 8192 on 2 busy cores measured full at 177 s and low rank d_r 4 at 7 s that way). The baseline is
timed as PyTorch's SDPA on the same shapes (what a model's own attention runs). A few op calls per configuration: a
small fraction of a configuration's forward passes over every block.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F

from nqpq_kernels.dispatch import residual_attention_impl, resolve_backend

from ..results.cost import AttentionShape, configuration_cost

TIMING_REPEATS = 3


def attention_shape(geometry) -> AttentionShape:
    """The cost formulas' view of a ``LayerGeometry``."""
    return AttentionShape(n_heads=geometry.n_heads, n_kv_heads=geometry.n_kv_heads, qk_dim=geometry.qk_dim,
                          v_dim=geometry.v_dim, sliding_window=geometry.sliding_window,
                          attention_chunk=geometry.attention_chunk)


class CostRecorder:
    """Collects ``configuration_cost`` plus the measured op time of each configuration the sweep runs."""

    def __init__(self, geometry: Mapping[int, object], layers: Sequence[int], seq_len: int, device: torch.device,
                 dtype: torch.dtype, backend: str, decode_context_len: int | None = None,
                 repeats: int = TIMING_REPEATS, seed: int = 0) -> None:
        self.shapes = [attention_shape(geometry[li]) for li in layers]
        self.seq_len = seq_len
        self.decode_context_len = decode_context_len or seq_len
        self.device, self.dtype, self.backend, self.repeats = torch.device(device), dtype, backend, repeats
        self.elem_bytes = torch.empty((), dtype=dtype).element_size()
        self.seed = seed
        self.configurations: list[dict] = []
        self._inputs: dict[AttentionShape, tuple] = {}
        self.timing_s = 0.0  # what the op timings took (the sweep's overhead for costing)
        self._timed = False

    def _qkv(self, shape: AttentionShape) -> tuple:
        """Random q, k, v (and an orthonormal basis per query head) of one layer geometry, made once."""
        if shape not in self._inputs:
            g = torch.Generator().manual_seed(self.seed)
            T = self.seq_len
            q = torch.randn(1, shape.n_heads, T, shape.qk_dim, generator=g)
            k = torch.randn(1, shape.n_kv_heads, T, shape.qk_dim, generator=g)
            v = torch.randn(1, shape.n_kv_heads, T, shape.v_dim, generator=g)
            basis = torch.linalg.qr(torch.randn(shape.n_heads, shape.v_dim, shape.v_dim, generator=g))[0]
            self._inputs[shape] = tuple(t.to(self.device, self.dtype) for t in (q, k, v)) + (basis.to(self.device),)
        return self._inputs[shape]

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _op_call(self, shape: AttentionShape, mode: str, d_r: int | None, sink_tokens: int):
        """One call of the op (SDPA for the baseline) on this geometry's inputs."""
        q, k, v, basis = self._qkv(shape)
        window, chunk = shape.sliding_window, shape.attention_chunk
        gqa = shape.n_heads != shape.n_kv_heads
        if mode == "baseline":
            visible = None
            if window is not None or chunk is not None:
                i = torch.arange(self.seq_len, device=self.device)
                visible = i[None, :] <= i[:, None]
                visible &= (i[:, None] - i[None, :] < window) if window is not None else \
                    (i[None, :] // chunk == i[:, None] // chunk)
            return lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=visible, is_causal=visible is None,
                                                          enable_gqa=gqa)
        backend = resolve_backend(self.backend, self.device.type, shape.qk_dim, shape.v_dim)
        impl = residual_attention_impl(backend)
        return lambda: impl(q, k, v, mode=mode, basis=basis if mode == "lowrank" else None, d_r=d_r,
                            sliding_window=window, attention_chunk=chunk, sink_tokens=sink_tokens)

    def _time_all(self) -> None:
        """Every recorded configuration's op time: ``repeats`` interleaved rounds after one warm-up call each, the
        fastest round kept per geometry and summed over the crystallized layers."""
        t0 = time.perf_counter()
        calls = []  # (configuration index, layers of this geometry, the call)
        with torch.no_grad():
            for i, c in enumerate(self.configurations):
                for shape, count in Counter(self.shapes).items():
                    call = self._op_call(shape, c["mode"], c["d_r"], c["sink_tokens"])
                    call()  # warm-up: a Triton compile, CUDA's lazy initialization, CPU allocator growth
                    self._sync()
                    calls.append((i, count, call))
            best = [float("inf")] * len(calls)
            for r in range(self.repeats):
                shift = r % len(calls)
                for j in list(range(shift, len(calls))) + list(range(shift)):  # rotated: no call always first
                    t = time.perf_counter()
                    calls[j][2]()
                    self._sync()
                    best[j] = min(best[j], time.perf_counter() - t)
        totals = [0.0] * len(self.configurations)
        for (i, count, _), seconds in zip(calls, best):
            totals[i] += count * 1000.0 * seconds
        for c, ms in zip(self.configurations, totals):
            c["op_time_ms"] = ms
        self.timing_s = time.perf_counter() - t0
        self._timed = True

    def record(self, key: str, mode: str, d_r: int | None = None, sink_tokens: int = 0) -> None:
        """Add one configuration (the sweep's key for it) with its formulas; its op time is measured with every
        other configuration's when ``results`` is asked for."""
        self.configurations.append({"key": key, **configuration_cost(self.shapes, mode, d_r, sink_tokens,
                                                                     self.seq_len, self.decode_context_len,
                                                                     self.elem_bytes)})
        self._timed = False

    def results(self) -> dict:
        """results.json's ``cost``: each configuration, its op time also relative to full's."""
        if not self._timed:
            self._time_all()
        full = next((c["op_time_ms"] for c in self.configurations if c["mode"] == "full"), None)
        for c in self.configurations:
            c["relative_op_time"] = c["op_time_ms"] / full if full else None
        return {"seq_len": self.seq_len, "decode_context_len": self.decode_context_len,
                "device": str(self.device), "dtype": str(self.dtype).removeprefix("torch."),
                "backend": self.backend, "elem_bytes": self.elem_bytes, "repeats": self.repeats,
                "op_time_statistic": "fastest of interleaved rounds",
                "n_layers": len(self.shapes), "timing_s": self.timing_s,
                "configurations": self.configurations}

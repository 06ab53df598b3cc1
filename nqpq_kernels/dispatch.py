"""The public residual-attention op and its backend dispatch."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from torch import Tensor

from .contract import TRITON_HEAD_DIMS, ResidualAttentionResult, check_choice, check_tensor
from .reference import residual_attention_reference
from .streamed import residual_attention_streamed

BACKENDS = ("auto", "torch", "triton")


def resolve_backend(backend: str, device_type: str, head_dim: int | None = None, value_dim: int | None = None) -> str:
    """Map ``auto`` to the Triton kernel on CUDA and the torch path elsewhere.

    With ``head_dim`` (q/k's width) and/or ``value_dim`` (v's width, for MLA) given, ``auto`` also falls back
    to the torch path on CUDA when the kernel does not support one of them (``TRITON_HEAD_DIMS``), and an
    explicit ``"triton"`` refuses it. A KV cache (fewer queries than keys, no mask) runs on either backend: the
    Triton one picks the split-KV decode kernel or the prefill kernel with its query offset
    (``triton_residual_attention``).
    """
    check_choice("backend", backend, BACKENDS)
    unsupported = [d for d in (head_dim, value_dim) if d is not None and d not in TRITON_HEAD_DIMS]
    if backend == "auto":
        return "triton" if device_type == "cuda" and not unsupported else "torch"
    if backend == "triton":
        if unsupported:
            raise ValueError(
                f"backend='triton' supports head dims that are multiples of 16 up to 256, got D={unsupported[0]}; "
                "use backend='torch' (or 'auto', which falls back to it)"
            )
        if device_type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError(
                f"backend='triton' needs CUDA tensors (got {device_type}) or TRITON_INTERPRET=1 set before "
                "the kernel is imported; use backend='torch' for the reference path"
            )
    return backend


def residual_attention_torch(q: Tensor, k: Tensor, v: Tensor, **kwargs: Any) -> ResidualAttentionResult:
    """The ``"torch"`` backend: on CPU tensors the streamed path (``nqpq_kernels.streamed``: memory O(T · block), not
    the reference's T × T), elsewhere the reference. Same contract and keywords as ``residual_attention_reference``."""
    if isinstance(q, Tensor) and q.device.type == "cpu":
        return residual_attention_streamed(q, k, v, **kwargs)
    return residual_attention_reference(q, k, v, **kwargs)


def triton_residual_attention(q: Tensor, k: Tensor, v: Tensor, **kwargs: Any) -> ResidualAttentionResult:
    """The ``"triton"`` backend: a KV cache of few queries (``launch.use_decode_kernel``: no mask, Tq < Tk,
    Tq <= ``DECODE_MAX_QUERIES``) runs the split-KV decode kernel, everything else the prefill kernel (whose query
    offset serves longer cached chunks). Same contract and keywords as ``residual_attention_triton``."""
    # Imported lazily: keeps CPU start-up free of Triton.
    from .launch import use_decode_kernel

    shaped = all(isinstance(t, Tensor) and t.dim() == 4 for t in (q, k))
    # Heads left plain (crystal_heads) are the prefill kernel's alone: the decode kernel has no per-head mode yet.
    per_head = kwargs.get("crystal_heads") is not None
    if shaped and not per_head and use_decode_kernel(q.shape[2], k.shape[2], kwargs.get("attn_mask") is not None):
        from .decode import residual_attention_decode

        return residual_attention_decode(q, k, v, **kwargs)
    from .prefill import residual_attention_triton

    return residual_attention_triton(q, k, v, **kwargs)


def residual_attention_impl(backend: str) -> Callable[..., ResidualAttentionResult]:
    """The function that runs residual attention for a resolved backend."""
    return triton_residual_attention if backend == "triton" else residual_attention_torch


def residual_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    mode: str,
    basis: Tensor | None = None,
    d_r: int | None = None,
    scale: float | None = None,
    backend: str = "auto",
    sliding_window: int | None = None,
    softcap: float | None = None,
    return_argmax: bool = False,
    return_top1_prob: bool = False,
    sink_tokens: int = 0,
    return_sink_mass: bool = False,
    learned_sink: Tensor | None = None,
    attention_chunk: int | None = None,
    attn_mask: Tensor | None = None,
    crystal_heads: Tensor | None = None,
) -> Tensor | tuple[Tensor, ...]:
    """Causal residual attention, SDPA-like: q ``[B, Hq, T, D]``, k, v ``[B, Hkv, T, D]`` → ``[B, Hq, T, D]``.

    Multi-head latent attention: v may be ``[B, Hkv, T, Dv]`` with Dv != D (q and k share D). The scores live
    in D (``scale`` defaults to D**-0.5); out, ctx, V[i*], ε and the basis ``[Hq, Dv, R]`` in Dv, d_r <= Dv.

    Query head h reads kv head ``h // (Hq // Hkv)`` (grouped-query / multi-query attention).
    ``mode``: ``"top1"`` → V[i*]; ``"full"`` → p @ V; ``"lowrank"`` → V[i*] + P_r P_rᵀ (p@V − V[i*])
    with ``P_r = basis[:, :, :d_r]`` (``basis`` ``[Hq, D, R]``, R ≥ d_r). ``scale`` defaults to D**-0.5.
    ``sliding_window=w``: query i sees keys i - w < j <= i. ``softcap=c``: scores become c·tanh(s/c)
    before masking. ``attention_chunk=C`` (Llama 4's chunked layers): query i sees keys j <= i with
    j // C == i // C (not with a window). i* is the first index of the maximum of those scores (argmax p is argmax s).
    Computes in float32 and returns the input dtype.

    A KV cache: without ``attn_mask``, q may hold Tq <= Tk queries ``[B, Hq, Tq, D]``; they are the last Tq
    positions (bottom-right aligned causal, as FlashAttention >= 2.1): query row r sits at absolute position
    Tk − Tq + r, and the window, chunk, sink keys and argmax use absolute positions, so each row equals the
    matching row of the whole Tk × Tk call. On the Triton backend up to ``launch.DECODE_MAX_QUERIES`` cached queries
    (decode steps, speculative chunks) run the split-KV decode kernel (``nqpq_kernels.decode_kernel``), more the
    prefill kernel with its query offset.

    ``backend="torch"`` on CPU runs ``nqpq_kernels.streamed`` (query blocks: memory O(T · block)); elsewhere, and for
    tests, ``residual_attention_reference`` (one T × T buffer).

    ``sink_tokens=n`` keeps the first n keys (the attention sink) apart: with S the visible keys j < n and
    R the visible keys j >= n (p still the softmax over all visible keys), i*ᴿ = the first index of the
    maximal score over R, the sink mass m_S = Σ_{j∈S} p[j], and the ground state
    ``ground = Σ_{j∈S} p[j] V[j] + (1 − m_S) V[i*ᴿ]`` replaces V[i*]: top1 → ground, lowrank → ground +
    P_r P_rᵀ (ctx − ground); full is unchanged. A row whose R holds no finite score (every row t < n) has
    ground = ctx. Under a sliding window or a chunk S holds only the sink keys the row still sees. n = 0 (the default)
    is the spec, bit for bit.

    ``learned_sink`` (float ``[Hq]``, one raw logit s_h per query head: gpt-oss's ``sinks``; or ``[B, Hq, T]``,
    one per query row: Inkling 2's ``sink_proj``) is a key every row sees with logit s_h and value zero: p = the
    softmax over the visible scores and s_h, ctx = Σ_j p[j] V[j] (the model's output), m_L = p_sink. It is always
    kept apart like the sink_tokens keys:
    ``ground = Σ_{j∈S} p[j] V[j] + (1 − m_S − m_L) V[i*ᴿ]`` (``(1 − m_L) V[i*]`` with n = 0); top1 → ground,
    lowrank → ground + P_r P_rᵀ (ctx − ground). The argmax stays over the real keys, top1_prob is p[argmax] in
    the softmax with the sink, and sink_mass is m_S + m_L. A NaN or +inf logit makes its rows
    non-finite. None (the default) is every number of today, bit for bit.

    ``attn_mask`` (None: the causal mask above) is torch SDPA's: a bool tensor (True: the key takes part) or a
    floating-point one added to the scaled, capped scores (as transformers' eager attention adds the mask a model
    builds: learned biases, a dynamic or a sparse selection), broadcastable to ``[B, Hq, Tq, Tk]``. It alone
    decides which keys a row sees: no causal mask is applied and ``sliding_window`` / ``attention_chunk`` must be
    None; k and v may hold Tk != Tq keys (keys a model appends, DeepSeek V4's compressed entries). i* is the first
    index of the maximum of the masked scores, over all Tk keys (so argmax may be >= Tq); sink_tokens, the learned
    sink and the statistics are as above with "visible" read as "a finite masked score" (a key masked with a
    finite very negative value, as transformers' float masks do, takes part with weight 0). A row that sees no key
    under the mask (a pad query of a padded batch) is empty: a finite zero output, argmax -1, top1_prob and sink_mass
    0, nothing in the Gram.

    ``crystal_heads`` (None: every head) is a bool tensor ``[Hq]`` on q's device choosing the query heads to
    crystallize: a head marked False outputs plain attention (ctx = p @ V, ``"full"``'s output) in every mode, in
    the same launch (a per-head flag read in the kernel's epilogue; the query heads of one kv group may differ), and
    its statistics are computed as for any head.

    Returns ``out``; with ``return_argmax``, ``return_top1_prob`` and/or ``return_sink_mass`` a tuple
    ``(out, argmax, top1_prob, sink_mass)`` holding only what was asked, in that order: argmax int64
    ``[B, Hq, T]`` = i* (i*ᴿ with n > 0; on rows t < n the first maximum over all visible keys; -1 on a
    non-finite row), top1_prob float32 ``[B, Hq, T]`` = p[argmax] (max_j p[j] for n = 0; NaN on a
    non-finite row), sink_mass float32 ``[B, Hq, T]`` = m_S + m_L (0 for n = 0 without a learned sink, exactly
    1 where ground = ctx, NaN on a non-finite row). A row whose scores contain NaN, or whose best score is
    ±inf, gives a NaN output row.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, t)
    impl = residual_attention_impl(resolve_backend(
        backend, q.device.type, q.shape[-1] if q.dim() == 4 else None, v.shape[-1] if v.dim() == 4 else None
    ))
    res = impl(
        q, k, v, mode=mode, basis=basis, d_r=d_r, scale=scale, sliding_window=sliding_window, softcap=softcap,
        return_argmax=return_argmax, return_top1_prob=return_top1_prob, sink_tokens=sink_tokens,
        return_sink_mass=return_sink_mass, learned_sink=learned_sink, attention_chunk=attention_chunk,
        attn_mask=attn_mask, **({} if crystal_heads is None else {"crystal_heads": crystal_heads}),
    )
    asked = ((res.argmax, return_argmax), (res.top1_prob, return_top1_prob), (res.sink_mass, return_sink_mass))
    extra = [x for x, want in asked if want]
    return (res.out, *extra) if extra else res.out
